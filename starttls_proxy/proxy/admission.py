"""Who may open a session on a listener: ``ClientEndpoint``, what a listener
makes of each accepted connection (the PROXY header of a trusted balancer
first, then the limits), and the listener's open sessions, counted whole
and per client address.

One client address may not take a listener's every slot: past
``max_connections_per_client`` (Postfix's smtpd_client_connection_count_limit)
it gets the protocol's busy reply while other clients are still served
(but for ``per_client_exceptions``), and ``max_connections`` bounds them
all. The counts live with the sessions, so a reload that keeps a listener
keeps counting its sessions.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from protocols import proxy_header
from protocols._base import Peer, Side
from starttls_proxy.proxy import metrics
from starttls_proxy.proxy.endpoints import Endpoint
from starttls_proxy.proxy.session import Session

if TYPE_CHECKING:
    from starttls_proxy.config import Limits
    from starttls_proxy.proxy.server import ListenerRuntime

log = logging.getLogger(__name__)


class Refusal(enum.Enum):
    """Why a connection got the busy reply (a metric label)."""

    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_CLIENT = "max_connections_per_client"


#: The counter of each reason for the busy reply.
_REFUSALS = {
    Refusal.MAX_CONNECTIONS: metrics.REFUSED_BUSY,
    Refusal.MAX_CONNECTIONS_PER_CLIENT: metrics.REFUSED_PER_CLIENT,
}


class SessionTable:
    """A listener's open sessions, and how many each client address holds."""

    def __init__(self) -> None:
        self._sessions: set[Session] = set()
        self._per_client: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(self._sessions)

    def refusal(self, client_address: str, limits: Limits) -> Refusal | None:
        """Why a new session from ``client_address`` must be refused, if it must."""
        if len(self._sessions) >= limits.max_connections:
            return Refusal.MAX_CONNECTIONS
        held = self._per_client[client_address]
        if held >= limits.max_connections_per_client and limits.counts_per_client(client_address):
            return Refusal.MAX_CONNECTIONS_PER_CLIENT
        return None

    def add(self, session: Session) -> None:
        self._sessions.add(session)
        self._per_client[session.peer.client_address] += 1

    def discard(self, session: Session) -> None:
        if session not in self._sessions:
            return
        self._sessions.remove(session)
        address = session.peer.client_address
        self._per_client[address] -= 1
        if not self._per_client[address]:
            del self._per_client[address]


class ClientEndpoint(Endpoint):
    """What a listener creates per accepted connection.

    A connection from one of the listener's ``trusted_proxies`` must start
    with a PROXY header (an L4 load balancer in front of several instances);
    the session starts once it is read, with the addresses it announces.
    """

    def __init__(self, runtime: ListenerRuntime) -> None:
        super().__init__(None, Side.CLIENT)
        self.runtime = runtime
        self._socket_peer: Peer | None = None
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        runtime = self.runtime
        metrics.labelled(
            metrics.CONNECTIONS, runtime.config.name, runtime.config.protocol.value
        ).inc()
        peername = transport.get_extra_info("peername")
        if peername is None:
            # Reset before the loop got to it (a balancer's health check
            # does that): there is nobody to answer.
            self.transport.abort()
            return
        client_host, client_port = peername[:2]
        local_host, local_port = transport.get_extra_info("sockname")[:2]
        peer = Peer(client_host, client_port, local_host, local_port)
        if runtime.config.trusts(client_host):
            self._socket_peer = peer
            self.held = bytearray()
            self._header_deadline = asyncio.get_running_loop().call_later(
                runtime.config.timeouts.pre_tls, self._refuse, "no PROXY header in time"
            )
            return
        self._open_session(peer)

    def _open_session(self, peer: Peer) -> None:
        runtime = self.runtime
        refusal = runtime.sessions.refusal(peer.client_address, runtime.config.limits)
        if refusal is None:
            self.session = Session(runtime, self, peer)
            return
        _REFUSALS[refusal].labels(runtime.config.name).inc()
        log.info(
            "%s: %s:%s refused: %s reached",
            runtime.config.name,
            peer.client_address,
            peer.client_port,
            refusal.value,
        )
        assert self.transport is not None
        self.transport.write(runtime.spec.machine.busy_reply(runtime.config.hostname))
        self.close_lingering()

    def data_received(self, data: bytes) -> None:
        if self._socket_peer is None:
            super().data_received(data)
            return
        assert self.held is not None
        self.held += data
        try:
            header = proxy_header.parse(bytes(self.held))
        except proxy_header.ProxyHeaderError as error:
            self._refuse(str(error))
            return
        if header is None:
            return
        peer, self._socket_peer = self._socket_peer, None
        if header.addresses is not None:
            peer = Peer(*header.addresses)
        rest, self.held = bytes(self.held[header.length :]), None
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._open_session(peer)
        if rest and self.session is not None:
            # Through the endpoint: an implicit-TLS session is holding already.
            self.data_received(rest)

    def _refuse(self, reason: str) -> None:
        assert self._socket_peer is not None
        log.warning(
            "%s: %s:%s: %s; closing",
            self.runtime.config.name,
            self._socket_peer.client_address,
            self._socket_peer.client_port,
            reason,
        )
        metrics.PROXY_HEADER_REFUSED.labels(self.runtime.config.name).inc()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)
