"""Fakes for driving a real ``Session`` without a network or a TLS helper.

``FakeTransport`` records what the driver does to a transport;
``FakeListener`` is what ``session.Listener`` asks for, with a real
``ListenerConfig``, a real ``SessionTable`` and a real protocol machine, and
a ``FakeHelper`` whose workers are the far ends of socket pairs.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from protocols._base import Peer, ProxyMachine
from protocols.registry import PROTOCOLS
from starttls_proxy.config import ListenerConfig
from starttls_proxy.proxy.admission import SessionTable
from starttls_proxy.proxy.endpoints import Endpoint
from starttls_proxy.proxy.handoff import TLSHelper
from starttls_proxy.proxy.routes import Router
from starttls_proxy.proxy.server import session_settings
from starttls_proxy.wire import SpawnRequest

PEER = Peer("192.0.2.7", 40000, "198.51.100.1", 25)


class FakeTransport(asyncio.Transport):
    """Records writes and flow control; holds no socket unless given one."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        extra: dict[str, Any] = {
            "peername": (PEER.client_address, PEER.client_port),
            "sockname": (PEER.local_address, PEER.local_port),
        }
        if sock is not None:
            extra["socket"] = sock
        super().__init__(extra)
        #: ("write", data), ("pause_reading",), ("resume_reading",), ("close",)...
        self.events: list[tuple[Any, ...]] = []
        self.reading = True
        self.closing = False
        self.write_buffer_size = 0

    @property
    def written(self) -> bytes:
        return b"".join(event[1] for event in self.events if event[0] == "write")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.events.append(("write", bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def pause_reading(self) -> None:
        self.events.append(("pause_reading",))
        self.reading = False

    def resume_reading(self) -> None:
        self.events.append(("resume_reading",))
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self.events.append(("close",))
        self.closing = True

    def abort(self) -> None:
        self.events.append(("abort",))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.events.append(("write_eof",))

    def get_write_buffer_size(self) -> int:
        return self.write_buffer_size


class FakeHelper(TLSHelper):
    """A helper handle whose every worker is the far end of a socket pair."""

    def __init__(self) -> None:  # no keeper: nothing of the real one is set up
        self.requests: list[SpawnRequest] = []
        #: The worker's end of each channel handed out.
        self.workers: list[socket.socket] = []
        #: The client sockets the worker got (duplicates; the driver closes its own).
        self.clients_seen = 0
        #: Set by a test to hold ``spawn`` until it says so.
        self.gate: asyncio.Event | None = None
        #: The trust stores a test pretends the helper holds.
        self.trust_stores = ()

    async def spawn(
        self, client: socket.socket, request: SpawnRequest, patience: float
    ) -> socket.socket:
        self.requests.append(request)
        self.clients_seen += 1
        if self.gate is not None:
            await self.gate.wait()
        ours, worker = socket.socketpair()
        self.workers.append(worker)
        return ours

    def close_all(self) -> None:
        for worker in self.workers:
            worker.close()


class FakeListener:
    """``session.Listener``: a real configuration, table and machine."""

    def __init__(
        self,
        config: ListenerConfig,
        helper: FakeHelper | None = None,
        sessions: SessionTable | None = None,
    ) -> None:
        self._config = config
        self._helper = helper or FakeHelper()
        self._sessions = sessions if sessions is not None else SessionTable()
        spec = PROTOCOLS[config.protocol.value]
        self._settings = session_settings(config, spec.facts.fallback_capabilities)
        self._machine = spec.machine
        routes = config.routes
        self._router = Router(routes, config.timeouts.backend_connect) if routes else None

    @property
    def config(self) -> ListenerConfig:
        return self._config

    @property
    def helper(self) -> FakeHelper:
        return self._helper

    @property
    def sessions(self) -> SessionTable:
        return self._sessions

    @property
    def router(self) -> Router | None:
        return self._router

    def new_machine(self, peer: Peer) -> ProxyMachine[Any, Any]:
        return self._machine(self._settings, peer)


def fake_backend(
    greeting: list[bytes],
) -> tuple[Callable[..., Any], list[FakeTransport]]:
    """A stand-in for ``loop.create_connection`` whose backend sends
    ``greeting`` (each item one read) before the connection is returned,
    as a fast backend's greeting can arrive before the driver's await
    resumes. Returns it and the list its transports go to."""
    transports: list[FakeTransport] = []

    async def create_connection(
        factory: Callable[[], Endpoint], host: str, port: int
    ) -> tuple[FakeTransport, Endpoint]:
        endpoint = factory()
        transport = FakeTransport()
        transports.append(transport)
        endpoint.connection_made(transport)
        for data in greeting:
            endpoint.data_received(data)
        return transport, endpoint

    return create_connection, transports
