"""The connection driver: one ``Session`` per accepted client.

It is the only place where a protocol machine meets real transports (as
uvicorn's ``H11Protocol`` drives h11). Transport callbacks (``endpoints.py``)
feed the machine; every command the machine returns is one transport
action. The protocols are parsed by the machines, not here.

A session's client side changes once: before TLS it is the accepted TCP
socket; at ``StartTLS`` the socket is handed to a TLS worker and from then on
the client side is the worker's plaintext channel, whose first bytes are the
worker's handshake report. An outgoing stream (``xmpp-server-out``) changes
its backend side instead: the remote server's socket goes to a worker that
does the client's part of the handshake, and the local server, the client
here, stays in plaintext.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol

from protocols import proxy_header
from protocols._base import (
    CloseConnection,
    LocalProtocolError,
    OpenBackend,
    Peer,
    PeerChecked,
    ProxyMachine,
    SendToBackend,
    SendToClient,
    Side,
    StartTLS,
    TLSInfo,
)
from starttls_proxy.proxy import metrics
from starttls_proxy.proxy.connect import connect_backend, connect_route
from starttls_proxy.proxy.endpoints import ChannelEndpoint, Endpoint
from starttls_proxy.proxy.handoff import HandoffError, TLSHelper
from starttls_proxy.proxy.routes import RouteError, Router
from starttls_proxy.wire import HandshakeFailure, SpawnRequest, TLSRole, usable_hint

if TYPE_CHECKING:
    from starttls_proxy.config import ListenerConfig

log = logging.getLogger(__name__)
_P = ParamSpec("_P")

#: Client bytes the machine may hold uninterpreted (waiting for a backend
#: reply) before the driver stops reading from the client.
HOLD_LIMIT = 64 * 1024
#: How long the upgrade reply may take to leave before the handoff gives up.
FLUSH_TIMEOUT = 5.0
#: The main process waits this much longer than the worker's own deadline.
HANDSHAKE_GRACE = 2.0


class Phase(enum.Enum):
    #: Talking plaintext with the client, answered by the proxy itself.
    PRE_TLS = "plaintext"
    #: The client socket is with a worker; waiting for its report.
    HANDSHAKE = "handshake"
    #: Relaying a TLS session through the worker.
    TLS = "tls"
    #: Relaying a plaintext session (``require_tls: false``).
    PLAINTEXT_RELAY = "plaintext-relay"
    CLOSED = "closed"


class Deadline(enum.Enum):
    """The limits that end a session which takes too long (a metric label)."""

    #: ``timeouts.pre_tls``: the whole exchange before TLS.
    PRE_TLS = "pre_tls"
    #: ``timeouts.handshake``, enforced by the worker; this is the backstop.
    HANDSHAKE = "handshake"
    #: ``timeouts.command``: from a command's first byte to its last.
    COMMAND = "command"
    #: ``session_idle``: a relayed session with no traffic either way.
    IDLE = "idle"

    def seconds(self, config: ListenerConfig) -> float:
        """How long the limit is on a listener of ``config``."""
        # A match, not a dict built per call: each session asks several
        # times, and an Enum member hashes in Python.
        match self:
            case Deadline.PRE_TLS:
                return config.timeouts.pre_tls
            case Deadline.HANDSHAKE:
                return config.timeouts.handshake
            case Deadline.COMMAND:
                return config.timeouts.command
            case Deadline.IDLE:
                return config.session_idle
        raise AssertionError(self)

    def reason(self, config: ListenerConfig) -> str:
        """What the session's log line says."""
        what = {
            Deadline.PRE_TLS: "no TLS within",
            Deadline.HANDSHAKE: "TLS handshake not done within",
            Deadline.COMMAND: "command not complete within",
            Deadline.IDLE: "idle for",
        }[self]
        return f"{what} {self.seconds(config):g} s"


def _set_reading(transport: asyncio.Transport, reading: bool) -> None:
    if reading:
        transport.resume_reading()
    else:
        transport.pause_reading()


class Sessions(Protocol):
    """Where a session is counted while it lasts."""

    def add(self, session: Session) -> None: ...

    def discard(self, session: Session) -> None: ...


class Listener(Protocol):
    """What a session needs of its listener (``server.ListenerRuntime``): its
    configuration, a protocol machine, the TLS helper, its count of sessions."""

    @property
    def config(self) -> ListenerConfig: ...

    @property
    def helper(self) -> TLSHelper: ...

    @property
    def sessions(self) -> Sessions: ...

    @property
    def router(self) -> Router | None:
        """Where outgoing streams go (``xmpp-server-out`` listeners only)."""

    def new_machine(self, peer: Peer) -> ProxyMachine[Any, Any]: ...


class Session:
    def __init__(self, runtime: Listener, endpoint: Endpoint, peer: Peer) -> None:
        """``peer``: the socket's addresses, or those a trusted load balancer
        announced in its PROXY header."""
        self.runtime = runtime
        self.loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        self.peer = peer
        self.machine = runtime.new_machine(self.peer)
        self._labels = (runtime.config.name, runtime.config.protocol.value)
        self._phase = Phase.PRE_TLS
        metrics.labelled(metrics.SESSIONS_ACTIVE, *self._labels, self._phase.value).inc()
        self._handshake_started = 0.0
        self.client: Endpoint | None = endpoint
        self.backend: Endpoint | None = None
        self.tls: TLSInfo | None = None
        #: The domain the client's certificate was verified for (XMPP peers).
        self.verified_peer: str | None = None
        self.bytes_from_client = 0
        self.bytes_from_backend = 0
        # Per side, as attributes: this is looked at after every read, and
        # a dict keyed by Side hashes the member in Python each time.
        self._client_write_paused = self._backend_write_paused = False
        self._client_reading = self._backend_reading = True
        self._last_activity = self._phase_started = self.loop.time()
        #: When the client began the command it has not finished, if any.
        self._command_started: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: The worker's channel until its report makes it the client side
        #: (the backend side, for an outgoing stream).
        self._pending_channel: Endpoint | None = None
        #: ALPN protocols to offer the remote server of an outgoing stream.
        self._route_alpn: tuple[str, ...] = ()
        self.outcome = "open"
        runtime.sessions.add(self)
        self._arm_timer()
        self._run_commands()

    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, phase: Phase) -> None:
        log.debug(
            "%s: %s:%s %s -> %s",
            self.runtime.config.name,
            self.peer.client_address,
            self.peer.client_port,
            self._phase.value,
            phase.value,
        )
        metrics.labelled(metrics.SESSIONS_ACTIVE, *self._labels, self._phase.value).dec()
        if phase is not Phase.CLOSED:
            metrics.labelled(metrics.SESSIONS_ACTIVE, *self._labels, phase.value).inc()
        self._phase = phase
        self._phase_started = self.loop.time()
        if phase is not Phase.CLOSED:
            # Each phase has its own deadline (pre-TLS, handshake, session).
            self._arm_timer()

    # ------------------------------------------------------------------
    # Inputs from transports.

    def data_received(self, side: Side, data: bytes) -> None:
        if self._phase is Phase.CLOSED:
            return
        self._last_activity = self.loop.time()
        if side is Side.CLIENT:
            self.bytes_from_client += len(data)
        else:
            self.bytes_from_backend += len(data)
        self._tell(self.machine.receive_data, side, data)
        self._watch_command()

    def connection_lost(self, endpoint: Endpoint) -> None:
        if self.phase is Phase.HANDSHAKE and endpoint is self._pending_channel:
            # Killed by its handshake deadline, or crashed.
            metrics.HANDSHAKES.labels(*self._labels, "worker_ended").inc()
            self.close("the TLS worker ended without a handshake report")
            return
        if self.phase is Phase.CLOSED or endpoint not in (self.client, self.backend):
            return
        self._tell(self.machine.receive_eof, endpoint.side)

    def set_write_paused(self, side: Side, paused: bool) -> None:
        if side is Side.CLIENT:
            self._client_write_paused = paused
        else:
            self._backend_write_paused = paused
        self._update_reading()

    def tls_report(self, outcome: TLSInfo | HandshakeFailure, channel: ChannelEndpoint) -> None:
        if self.phase is not Phase.HANDSHAKE:
            return
        if isinstance(outcome, HandshakeFailure):
            metrics.HANDSHAKES.labels(*self._labels, "failed").inc()
            self.close(f"TLS handshake failed: {outcome.reason}")
            return
        metrics.labelled(metrics.HANDSHAKES, *self._labels, "ok").inc()
        metrics.labelled(metrics.HANDSHAKE_SECONDS, *self._labels).observe(
            time.monotonic() - self._handshake_started
        )
        self.tls = outcome
        metrics.labelled(
            metrics.TLS_SESSIONS, self.runtime.config.name, self.tls.version, self.tls.cipher
        ).inc()
        # The TLS side from now on; the client's ends lingering, as a client's does.
        if channel.side is Side.CLIENT:
            self.client = channel
        else:
            self.backend = channel
        self._pending_channel = None
        self.phase = Phase.TLS
        self._tell(self.machine.tls_established, self.tls)

    # ------------------------------------------------------------------
    # Carrying out the machine's commands.

    def _tell(self, event: Callable[_P, None], *args: _P.args, **kwargs: _P.kwargs) -> None:
        """Give the machine one input, then carry out what it asks for. A
        ``LocalProtocolError`` is the proxy's bug, not a peer's: logged as
        such, after the machine has queued the end of the session."""
        try:
            event(*args, **kwargs)
        except LocalProtocolError:
            log.exception(
                "%s: %s:%s internal error in the protocol machine",
                self.runtime.config.name,
                self.peer.client_address,
                self.peer.client_port,
            )
        self._run_commands()

    def _run_commands(self) -> None:
        # What one batch of input makes the machine send leaves in one write
        # a side: one system call here and, towards the client, one TLS
        # record in the worker instead of one per reply line.
        to_client: list[bytes] = []
        to_backend: list[bytes] = []
        next_command = self.machine.next_command
        while self._phase is not Phase.CLOSED:
            command = next_command()
            if command is None:
                break
            if isinstance(command, SendToClient):
                to_client.append(command.data)
                continue
            if isinstance(command, SendToBackend):
                to_backend.append(command.data)
                continue
            # Whatever comes next (a hand-off, a close) comes after them.
            self._write(to_client, to_backend)
            match command:
                case OpenBackend(route):
                    if self.phase is Phase.PRE_TLS and route is None:
                        self.phase = Phase.PLAINTEXT_RELAY
                    self._start_task(self._open_backend(route))
                case StartTLS():
                    self._start_tls(command)
                case PeerChecked():
                    self._peer_checked(command)
                case CloseConnection(reason, clean):
                    self.close(reason, clean=clean)
                case _:
                    raise RuntimeError(f"Unexpected command: {command}")
        self._write(to_client, to_backend)
        self._update_reading()

    def _write(self, to_client: list[bytes], to_backend: list[bytes]) -> None:
        for pending, endpoint in ((to_client, self.client), (to_backend, self.backend)):
            if pending:
                assert endpoint is not None and endpoint.transport is not None
                endpoint.transport.writelines(pending)
                pending.clear()

    def _start_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_backend(self, route: str | None) -> None:
        """Connect the listener's backend, or the server of ``route`` (a domain)."""
        config = self.runtime.config
        started = time.monotonic()
        try:
            if route is None:
                transport, endpoint = await connect_backend(
                    self.loop,
                    config.fixed_backend.address,
                    config.timeouts.backend_connect,
                    self._backend_endpoint,
                )
                direct_tls = False
            else:
                transport, endpoint, direct_tls = await self._connect_route(route)
        except (RouteError, ConnectionError) as error:
            metrics.BACKEND_FAILURES.labels(config.name).inc()
            log.warning("%s: %s", config.name, error)
            self._tell(self.machine.backend_failed, str(error))
            return
        metrics.labelled(metrics.BACKEND_CONNECT_SECONDS, config.name).observe(
            time.monotonic() - started
        )
        if self.phase is Phase.CLOSED:
            transport.close()
            return
        self.backend = endpoint
        if route is None:
            header = proxy_header.session_header(
                config.fixed_backend.identity, self.peer, self.tls, self.verified_peer
            )
            if header:
                transport.write(header)
            self._tell(self.machine.backend_connected)
        else:
            self._route_alpn = config.alpn_protocols if direct_tls else ()
            self._tell(self.machine.route_connected, direct_tls)
        # Unless it went to a TLS worker meanwhile (a direct-TLS route).
        if self.backend is endpoint:
            endpoint.release()

    def _backend_endpoint(self) -> Endpoint:
        return Endpoint(self, Side.BACKEND)

    async def _connect_route(self, domain: str) -> tuple[asyncio.Transport, Endpoint, bool]:
        """The first of ``domain``'s servers that answers, and whether TLS
        starts there at once."""
        config = self.runtime.config
        router = self.runtime.router
        if router is None:
            raise RouteError(f"listener {config.name} has no routes")
        transport, endpoint, target = await connect_route(
            self.loop, router, domain, config.timeouts.backend_connect, self._backend_endpoint
        )
        log.info(
            "%s: %s:%s to %s via %s",
            config.name,
            self.peer.client_address,
            self.peer.client_port,
            domain,
            target,
        )
        return transport, endpoint, target.direct_tls

    def _peer_checked(self, checked: PeerChecked) -> None:
        config = self.runtime.config
        self.verified_peer = checked.domain
        metrics.S2S_PEER_VERIFICATION.labels(config.name, checked.result.value).inc()
        log.info(
            "%s: %s:%s peer certificate: %s%s",
            config.name,
            self.peer.client_address,
            self.peer.client_port,
            checked.result.value,
            f" for {checked.domain}" if checked.domain else f" ({checked.detail})",
        )

    def _discarded(self, side: Side, size: int) -> None:
        """Count and log what ``side`` sent after the upgrade, unread."""
        config = self.runtime.config
        metrics.DISCARDED_BYTES.labels(config.name, config.protocol.value).inc(size)
        if side is Side.CLIENT:
            what = "%s: %s:%s sent %d bytes after the TLS upgrade command; discarded"
        else:
            what = "%s: %s:%s: the remote server sent %d bytes after <proceed/>; discarded"
        log.warning(what, config.name, self.peer.client_address, self.peer.client_port, size)

    def _start_tls(self, command: StartTLS) -> None:
        if command.discarded:
            self._discarded(command.side, len(command.discarded))
        if command.side is Side.CLIENT:
            endpoint, self.client = self.client, None
        else:
            endpoint, self.backend = self.backend, None
        assert endpoint is not None and endpoint.transport is not None
        endpoint.held = bytearray()
        endpoint.transport.pause_reading()
        self.phase = Phase.HANDSHAKE
        self._handshake_started = time.monotonic()
        self._start_task(self._hand_off(endpoint, endpoint.transport, command))

    def _spawn_request(self, endpoint: Endpoint, command: StartTLS) -> SpawnRequest:
        config = self.runtime.config
        trust = config.peer_certificates
        peer_trust = self.runtime.helper.trust_number(trust.trust_file) if trust else 0
        held = bytes(endpoint.held or b"")
        request = SpawnRequest(
            handshake_timeout=config.timeouts.handshake,
            server_name_hint=usable_hint(command.server_name_hint),
            peer_trust=peer_trust,
        )
        if command.side is Side.CLIENT:
            return dataclasses.replace(request, alpn=config.alpn_protocols, early=held)
        # The remote server speaks after the ClientHello: anything before
        # came after <proceed/>, and is never interpreted.
        if held:
            self._discarded(Side.BACKEND, len(held))
        return dataclasses.replace(
            request, alpn=self._route_alpn, role=TLSRole.CONNECT, peer_name=command.peer_name
        )

    async def _hand_off(
        self, endpoint: Endpoint, transport: asyncio.Transport, command: StartTLS
    ) -> None:
        # The upgrade reply must be on the wire before the worker owns the
        # socket. It nearly always is (a short reply to a socket with room):
        # then no timer is armed and cancelled.
        if transport.get_write_buffer_size():
            try:
                async with asyncio.timeout(FLUSH_TIMEOUT):
                    while transport.get_write_buffer_size():
                        await asyncio.sleep(0.005)
            except TimeoutError:
                transport.abort()
                self.close("client did not take the TLS upgrade reply")
                return
        raw = transport.get_extra_info("socket")
        connection = socket.socket(fileno=os.dup(raw.fileno()))
        # The duplicate keeps the TCP connection alive: closing the transport
        # only drops the event loop's descriptor, no FIN is sent.
        transport.abort()
        request = self._spawn_request(endpoint, command)
        timeout = self.runtime.config.timeouts.handshake
        try:
            channel = await self.runtime.helper.spawn(connection, request, timeout)
        except HandoffError as error:
            self.close(str(error))
            return
        finally:
            connection.close()
        if self.phase is Phase.CLOSED:
            channel.close()
            return
        _, endpoint = await self.loop.connect_accepted_socket(
            lambda: ChannelEndpoint(
                self, command.side, alpn=request.alpn, peer=request.peer_trust > 0
            ),
            sock=channel,
        )
        # Until the report arrives the channel is not the TLS side yet, but
        # closing the session must close it.
        self._pending_channel = endpoint
        if self.closed and endpoint.transport is not None:
            endpoint.transport.close()

    # ------------------------------------------------------------------
    # Flow control and timers.

    def _update_reading(self) -> None:
        if self._phase is Phase.CLOSED:
            return
        client, backend = self.client, self.backend
        if client is not None and client.transport is not None:
            wanted = (
                not self._backend_write_paused
                and self.machine.unprocessed_client_bytes < HOLD_LIMIT
            )
            if wanted != self._client_reading:
                self._client_reading = wanted
                _set_reading(client.transport, wanted)
        if backend is not None and backend.transport is not None:
            wanted = not self._client_write_paused
            if wanted != self._backend_reading:
                self._backend_reading = wanted
                _set_reading(backend.transport, wanted)

    def _watch_command(self) -> None:
        if not self.machine.client_mid_command:
            self._command_started = None
        elif self._command_started is None:
            self._command_started = self.loop.time()
            self._arm_timer()

    def _deadline(self) -> tuple[float, Deadline]:
        """When the session ends if nothing changes, and which limit that is.

        Before TLS the whole phase counts, however busy the client keeps it,
        and a command must arrive whole in time whatever the phase: a timer
        that any byte restarts is no limit against a client that sends one
        byte at a time (slowloris).
        """
        config = self.runtime.config
        if self.phase is Phase.PRE_TLS:
            since, which = self._phase_started, Deadline.PRE_TLS
        elif self.phase is Phase.HANDSHAKE:
            since, which = self._phase_started + HANDSHAKE_GRACE, Deadline.HANDSHAKE
        else:
            since, which = max(self._last_activity, self._phase_started), Deadline.IDLE
        deadline = (since + which.seconds(config), which)
        if self._command_started is not None and self.phase is not Phase.HANDSHAKE:
            command = self._command_started + Deadline.COMMAND.seconds(config)
            return min(deadline, (command, Deadline.COMMAND), key=lambda pair: pair[0])
        return deadline

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(self._deadline()[0], self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.phase is Phase.CLOSED:
            return
        deadline, which = self._deadline()
        if self.loop.time() < deadline:
            self._arm_timer()
            return
        if which is Deadline.HANDSHAKE:
            metrics.HANDSHAKES.labels(*self._labels, "timeout").inc()
            self.close(which.reason(self.runtime.config))
            return
        metrics.SESSIONS_TIMED_OUT.labels(*self._labels, which.value).inc()
        self._tell(self.machine.timed_out, which.reason(self.runtime.config))

    # ------------------------------------------------------------------
    # The end.

    def shut_down(self) -> None:
        """The proxy stops: the protocol's goodbye (421, BYE, -ERR...), then close."""
        if self.phase is Phase.HANDSHAKE or self.client is None:
            self.close("proxy shutting down")
            return
        self._tell(self.machine.shutting_down)
        self.close("proxy shutting down")

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def close(self, reason: str, *, clean: bool = False) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.outcome = reason
        if self._timer is not None:
            self._timer.cancel()
        if self.client is not None:
            self.client.close_lingering()
        for endpoint in (self.backend, self._pending_channel):
            if endpoint is not None and endpoint.transport is not None:
                endpoint.transport.close()
        self.runtime.sessions.discard(self)
        config = self.runtime.config
        metrics.labelled(
            metrics.SESSIONS_CLOSED, *self._labels, "clean" if clean else "other"
        ).inc()
        metrics.labelled(metrics.SESSION_SECONDS, *self._labels).observe(
            time.monotonic() - self.started
        )
        log.info(
            "%s: %s:%s closed after %.3fs: %s; tls=%s cipher=%s sni=%s in=%d out=%d",
            config.name,
            self.peer.client_address,
            self.peer.client_port,
            time.monotonic() - self.started,
            reason,
            self.tls.version if self.tls else "-",
            self.tls.cipher if self.tls else "-",
            self.tls.server_name if self.tls and self.tls.server_name else "-",
            self.bytes_from_client,
            self.bytes_from_backend,
            extra={"session": self._summary(reason, clean)},
        )

    def _summary(self, reason: str, clean: bool) -> dict[str, object]:
        """The session's end, as fields (for ``--log-format json``)."""
        return {
            "event": "session_end",
            "listener": self.runtime.config.name,
            "protocol": self.runtime.config.protocol.value,
            "client_address": self.peer.client_address,
            "client_port": self.peer.client_port,
            "outcome": reason,
            "clean": clean,
            "tls_version": self.tls.version if self.tls else None,
            "cipher": self.tls.cipher if self.tls else None,
            "sni": self.tls.server_name if self.tls else None,
            "bytes_from_client": self.bytes_from_client,
            "bytes_from_backend": self.bytes_from_backend,
            "duration_seconds": round(time.monotonic() - self.started, 3),
        }
