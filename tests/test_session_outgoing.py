"""The driver on an ``xmpp-server-out`` listener: the route is connected,
the *backend* side goes to a worker that connects (the spawn request's
connect role, SNI and ALPN), its channel becomes the backend side, and what
the remote sent after ``<proceed/>`` is discarded and counted. A real
``Session``, a real outgoing machine and router (static routes), fake
transports and a fake helper (``tests.driver_fakes``)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from starttls_proxy.config import SYSTEM_TRUST, ListenerConfig
from starttls_proxy.proxy import metrics
from starttls_proxy.proxy.endpoints import Endpoint
from starttls_proxy.proxy.session import Phase, Session
from starttls_proxy.wire import REPORT_HEADER, SpawnRequest, TLSRole
from tests.driver_fakes import FakeHelper, FakeListener, FakeTransport
from tests.test_session import client, handed_off, open_session, until

LOCAL_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"from='local.example' to='remote.example' version='1.0'>"
)
REMOTE_HEADER = (
    b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
    b"id='r3m0t3' from='remote.example' version='1.0'>"
)
FEATURES = b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>"
PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


def outgoing_config(tls: str) -> ListenerConfig:
    return ListenerConfig.model_validate(
        {
            "name": f"s2s-out-{tls}",
            "protocol": "xmpp-server-out",
            "listen": "127.0.0.1:5299",
            "domains": ["local.example"],
            "peer_certificates": {"on_failure": "refuse"},
            "routes": {"static": {"remote.example": [{"address": "192.0.2.9:5270", "tls": tls}]}},
        }
    )


def report(names: list[str]) -> bytes:
    payload = json.dumps(
        {
            "ok": True,
            "version": "TLSv1.3",
            "cipher": "TLS_AES_256_GCM_SHA384",
            "server_name": "remote.example",
            "alpn": None,
            "peer": {"verify": "ok", "error": None, "dns_names": names, "xmpp_addrs": []},
        }
    ).encode()
    return REPORT_HEADER.pack(len(payload)) + payload


@pytest.fixture
def helper() -> Iterator[FakeHelper]:
    fake = FakeHelper()
    fake.trust_stores = (SYSTEM_TRUST,)
    yield fake
    fake.close_all()


def run_routed(
    monkeypatch: pytest.MonkeyPatch, test: Callable[[list[Endpoint]], Any]
) -> list[tuple[str, int]]:
    """Run ``test`` with connections that land on socket pairs; the
    addresses asked for are returned."""
    asked: list[tuple[str, int]] = []
    remotes: list[socket.socket] = []

    async def main() -> None:
        async def create_connection(
            factory: Callable[[], Endpoint], host: str, port: int
        ) -> tuple[FakeTransport, Endpoint]:
            asked.append((host, port))
            ours, theirs = socket.socketpair()
            remotes.extend((ours, theirs))
            endpoint = factory()
            endpoint.connection_made(FakeTransport(ours))
            return endpoint.transport, endpoint  # type: ignore[return-value]

        monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", create_connection)
        await test([])

    try:
        asyncio.run(main())
    finally:
        for remote in remotes:
            remote.close()
    return asked


def discarded(listener: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "starttls_proxy_discarded_after_starttls_bytes_total",
        {"listener": listener, "protocol": "xmpp-server-out"},
    )
    return value or 0.0


def test_a_direct_tls_route_hands_the_backend_side_to_a_connecting_worker(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    config = outgoing_config("implicit")

    async def test(_: list[Endpoint]) -> None:
        session: Session = open_session(FakeListener(config, helper))
        endpoint, local = client(session)
        endpoint.data_received(LOCAL_HEADER)
        channel = await handed_off(session)
        assert channel.side.name == "BACKEND"
        assert session.phase is Phase.HANDSHAKE and session.client is endpoint
        assert helper.requests == [
            SpawnRequest(
                handshake_timeout=config.timeouts.handshake,
                server_name_hint="local.example",
                alpn=("xmpp-server",),
                peer_trust=1,
                role=TLSRole.CONNECT,
                peer_name="remote.example",
            )
        ]
        worker = helper.workers[0]
        worker.sendall(report(["remote.example"]))
        await until(lambda: session.phase is Phase.TLS)
        assert session.backend is channel
        # Verified: the local header went to the remote, whose answer comes back.
        assert worker.recv(4096) == LOCAL_HEADER
        worker.sendall(REMOTE_HEADER)
        await until(lambda: REMOTE_HEADER in local.written)
        session.close("test over")

    assert run_routed(monkeypatch, test) == [("192.0.2.9", 5270)]


def test_a_starttls_route_discards_what_the_remote_sends_after_proceed(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    config = outgoing_config("starttls")
    before = discarded(config.name)

    async def test(_: list[Endpoint]) -> None:
        session: Session = open_session(FakeListener(config, helper))
        endpoint, _local = client(session)
        endpoint.data_received(LOCAL_HEADER)
        await until(lambda: session.backend is not None)
        backend = session.backend
        assert backend is not None and isinstance(backend.transport, FakeTransport)
        assert b'to="remote.example"' in backend.transport.written
        backend.data_received(REMOTE_HEADER + FEATURES)
        assert backend.transport.written.endswith(
            b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        )
        backend.data_received(PROCEED + b"<junk/>")
        # Arrived in the moment before the hand-off: never a worker's early bytes.
        backend.data_received(b"<more/>")
        await handed_off(session)
        request = helper.requests[0]
        assert (request.role, request.alpn, request.early) == (TLSRole.CONNECT, (), b"")
        assert discarded(config.name) - before == len(b"<junk/><more/>")
        session.close("test over")

    run_routed(monkeypatch, test)
