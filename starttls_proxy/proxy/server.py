"""The asyncio shell: listeners, capability probes, metrics endpoint, signals.

As in uvicorn's ``server.py``, this module owns the lifecycle and nothing
else: start-up (probe the backends, bind), the main wait, and shut-down.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import socket
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import generate_latest

from protocols import proxy_header
from protocols._base import BackendIdentity, Peer, ProxyMachine, SessionSettings
from protocols.registry import PROTOCOLS, ProtocolSpec
from starttls_proxy.config import Config, ListenerConfig, SocketAddress, load_config
from starttls_proxy.privileges import drop_privileges
from starttls_proxy.proxy import metrics
from starttls_proxy.proxy.admission import ClientEndpoint, SessionTable
from starttls_proxy.proxy.handoff import TLSHelper
from starttls_proxy.proxy.routes import Router
from starttls_proxy.proxy.session import Session
from starttls_proxy.settings import ConfigError
from starttls_proxy.wire import ProxyExit, WorkerExit

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024
PROBE_READ_SIZE = 64 * 1024

_EXIT_REASONS = {
    WorkerExit.OK: "normal",
    WorkerExit.HANDSHAKE_FAILED: "handshake_failed",
    WorkerExit.NOT_TLS: "not_tls",
    WorkerExit.CLIENT_GONE: "client_gone",
    WorkerExit.TLS_ERROR: "tls_error",
    WorkerExit.DEADLINE: "timeout",
    WorkerExit.SANDBOX_FAILED: "sandbox_failed",
    WorkerExit.INTERNAL_ERROR: "crash",
    -signal.SIGSYS: "seccomp",
}


class ProbeError(Exception):
    pass


def session_settings(config: ListenerConfig, capabilities: tuple[str, ...]) -> SessionSettings:
    """What the machines of ``config``'s sessions are made with."""
    return SessionSettings(
        hostname=config.hostname,
        tls_mode=config.tls,
        require_tls=config.require_tls,
        capabilities=capabilities,
        identity=config.backend.identity if config.backend else BackendIdentity.NONE,
        max_line_length=config.max_line_length,
        smtp_bare_line_endings=config.smtp.bare_line_endings,
        max_literal_size=config.limits.max_literal_size,
        max_stanza_size=config.max_stanza_size,
        max_xml_depth=config.limits.max_xml_depth,
        max_attribute_size=config.limits.max_attribute_size,
        domains=config.domains,
        peer_certificate_failure=(
            config.peer_certificates.on_failure if config.peer_certificates else None
        ),
    )


async def probe_backend(config: ListenerConfig) -> tuple[str, ...]:
    """Ask ``config``'s backend for its capabilities, over one short dialogue."""
    spec = PROTOCOLS[config.protocol.value]
    async with asyncio.timeout(config.timeouts.backend_connect):
        backend = config.fixed_backend
        reader, writer = await open_backend(backend.address)
        try:
            writer.write(proxy_header.probe_header(backend.identity, own_connection(writer)))
            probe = spec.probe(config.hostname)
            while True:
                while (out := probe.next_send()) is not None:
                    writer.write(out)
                if probe.error is not None:
                    raise ProbeError(probe.error)
                if probe.result is not None:
                    await writer.drain()
                    return probe.result
                data = await reader.read(PROBE_READ_SIZE)
                if not data:
                    raise ProbeError("the backend closed the connection")
                probe.receive_data(data)
        finally:
            writer.close()


class ListenerRuntime:
    """One configured listener and what it learned at run time."""

    def __init__(
        self, config: ListenerConfig, helper: TLSHelper, probed: tuple[str, ...] | None = None
    ) -> None:
        """``probed``: the backend's capabilities as a probe found them (the
        listener's previous runtime's), advertised until a probe answers."""
        self.config = config
        self.helper = helper
        self.spec: ProtocolSpec = PROTOCOLS[config.protocol.value]
        self.sessions = SessionTable()
        self.server: asyncio.Server | None = None
        self.probed_capabilities = probed
        self.settings = self._settings(
            config.capabilities or probed or self.spec.facts.fallback_capabilities
        )
        #: Set once the first probe has succeeded or failed.
        self.probed = asyncio.Event()
        routes = config.routes
        self.router = Router(routes, config.timeouts.backend_connect) if routes else None

    def _settings(self, capabilities: tuple[str, ...]) -> SessionSettings:
        return session_settings(self.config, capabilities)

    def probed_for(self, config: ListenerConfig) -> tuple[str, ...] | None:
        """What the probes learned, if ``config`` (a reload's) asks the same
        backend in the same way: a reload would otherwise advertise the
        fallback list until the next probe answers, for good while the
        backend is down."""

        def asks(listener: ListenerConfig) -> object:
            backend = listener.backend
            return listener.protocol, backend and (backend.address, backend.identity)

        return self.probed_capabilities if asks(config) == asks(self.config) else None

    def new_machine(self, peer: Peer) -> ProxyMachine[Any, Any]:
        return self.spec.machine(self.settings, peer)

    async def probe(self) -> tuple[str, ...]:
        """Ask the backend for its capabilities, over one short dialogue."""
        return await probe_backend(self.config)

    async def probe_forever(self) -> None:
        """Keep the advertised capabilities equal to the backend's."""
        unused = self.spec.facts.probe_only_for_plaintext and self.config.require_tls
        if self.config.capabilities is not None or unused:
            self.probed.set()
            return
        while True:
            try:
                capabilities = await self.probe()
            except (OSError, TimeoutError, ProbeError) as error:
                log.warning(
                    "%s: capability probe of %s failed (%s); advertising %s",
                    self.config.name,
                    self.config.fixed_backend.address,
                    probe_failure(error, self.config.timeouts.backend_connect),
                    " ".join(self.settings.capabilities),
                )
            else:
                self.probed_capabilities = capabilities
                if capabilities != self.settings.capabilities:
                    log.info(
                        "%s: backend capabilities: %s", self.config.name, " | ".join(capabilities)
                    )
                    self.settings = self._settings(capabilities)
            self.probed.set()
            await asyncio.sleep(self.config.fixed_backend.probe_interval)


def probe_failure(error: Exception, timeout: float) -> str:
    """What ended a probe, for its log line: ``asyncio.timeout``'s
    TimeoutError carries no message at all."""
    if isinstance(error, TimeoutError) and not str(error):
        return f"timed out after {timeout:g} s"
    return str(error) or repr(error)


def own_connection(writer: asyncio.StreamWriter) -> Peer:
    local = writer.get_extra_info("sockname")
    remote = writer.get_extra_info("peername")
    if not isinstance(local, tuple) or not isinstance(remote, tuple):  # a unix socket
        return Peer("127.0.0.1", 0, "127.0.0.1", 0)
    return Peer(local[0], local[1], remote[0], remote[1])


async def open_backend(address: SocketAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.unix_path is not None:
        return await asyncio.open_unix_connection(address.unix_path)
    return await asyncio.open_connection(address.host, address.port)


async def _serve_metrics(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(10):
            request = await reader.readuntil(b"\r\n\r\n")
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        writer.close()
        return
    if request.startswith((b"GET /metrics ", b"GET /metrics?")):
        body = generate_latest(metrics.REGISTRY)
        status = b"200 OK"
    else:
        body, status = b"not found\n", b"404 Not Found"
    writer.write(
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    await writer.drain()
    writer.close()


def _count_worker_exit(pid: int, status: int) -> None:
    if status == WorkerExit.SPARE_UNUSED:
        return
    reason = _EXIT_REASONS.get(status, "crash")
    metrics.labelled(metrics.WORKER_EXITS, reason).inc()
    if reason in ("crash", "seccomp", "sandbox_failed"):
        log.warning("TLS worker %d ended abnormally (%s, status %d)", pid, reason, status)


#: What the main process holds per session once a worker has the client:
#: the worker's plaintext channel and the backend's socket.
DESCRIPTORS_PER_SESSION = 2
#: Its own: listeners, the keeper's and the helper's sockets, the event loop.
DESCRIPTOR_RESERVE = 64


def descriptor_room(config: Config) -> str | None:
    """Raise the soft descriptor limit to the hard one; say so when the
    listeners' ``max_connections`` together need more descriptors than that
    (sessions beyond it would fail to connect their backend or worker)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return None
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sessions = sum(listener.limits.max_connections for listener in config.listeners)
    room = max(0, hard - DESCRIPTOR_RESERVE) // DESCRIPTORS_PER_SESSION
    if sessions <= room:
        return None
    return (
        f"the listeners allow {sessions} sessions together, but the descriptor limit "
        f"({hard}) holds about {room}: raise LimitNOFILE (deploy/systemd's unit sets 65536) "
        "or lower limits.max_connections"
    )


def _why(error: OSError) -> str:
    """The system's words for ``error`` ("Address already in use"), not the
    event loop's sentence around them."""
    return os.strerror(error.errno) if error.errno else str(error)


def publish_certificate_expiry(config: Config) -> None:
    """Export each certificate's notAfter; only the public part is read here."""
    # Only the certificates of this configuration: one a reload removed (or
    # moved) would keep its series, and its expiry alert would keep firing.
    metrics.CERTIFICATE_NOT_AFTER.clear()
    for entry in config.tls.certificates:
        try:
            leaf = x509.load_pem_x509_certificate(entry.cert.read_bytes())
        except (OSError, ValueError) as error:
            log.warning("cannot read %s for its expiry date: %s", entry.cert, error)
            continue
        metrics.CERTIFICATE_NOT_AFTER.labels(str(entry.cert)).set(
            leaf.not_valid_after_utc.timestamp()
        )


class Server:
    def __init__(
        self,
        config: Config,
        helper: TLSHelper,
        config_path: Path | None = None,
        passed: dict[str, socket.socket] | None = None,
    ) -> None:
        """``config_path``: where SIGHUP re-reads the configuration from;
        ``passed``: listening sockets from the service manager, by listener
        name (``activation``)."""
        self.config = config
        self.config_path = config_path
        self.helper = helper
        self.passed = dict(passed or {})
        #: The listeners by name; new connections look their runtime up here,
        #: so a reload changes what new sessions get and nothing else.
        self.runtimes = {
            listener.name: ListenerRuntime(listener, helper) for listener in config.listeners
        }
        self._probes: dict[str, asyncio.Task[None]] = {}
        publish_certificate_expiry(config)
        metrics.LAST_RELOAD_SUCCESS.set_to_current_time()
        self._stopping = asyncio.Event()
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        #: What the process exits with once ``serve`` returns.
        self.exit_status = ProxyExit.OK

    def _helper_lost(self, reason: str) -> None:
        log.critical("giving up: %s", reason)
        self.exit_status = ProxyExit.HELPER_LOST
        self._stopping.set()

    def _drop_privileges(self) -> None:
        """Leave root once every socket is bound (the keeper keeps what the helper needs)."""
        user = self.config.isolation.main_user
        if user is None or os.geteuid() != 0:
            log.info("main process runs as uid %d", os.geteuid())
            return
        drop_privileges(user)
        log.info("main process dropped root: now runs as %s (uid %d)", user, os.geteuid())

    async def _bind(self, listener: ListenerConfig) -> asyncio.Server:
        """A listening socket for ``listener`` (the service manager's, if it
        passed one), not yet accepting; ``ConfigError`` when it cannot be had."""
        loop = asyncio.get_running_loop()
        listen = listener.listen
        name = listener.name

        def endpoint() -> ClientEndpoint:
            return ClientEndpoint(self.runtimes[name])

        passed = self.passed.pop(name, None)
        if passed is not None:
            log.info("%s: serving the socket the service manager passed", name)
            return await loop.create_server(
                endpoint, sock=passed, backlog=LISTEN_BACKLOG, start_serving=False
            )
        try:
            return await loop.create_server(
                endpoint,
                listen.host,
                listen.port,
                family=socket.AF_INET6 if ":" in listen.host else socket.AF_UNSPEC,
                reuse_address=True,
                reuse_port=listener.reuse_port,
                backlog=LISTEN_BACKLOG,
                start_serving=False,
            )
        except OSError as error:
            raise ConfigError([f"{name}: cannot listen on {listen}: {_why(error)}"]) from None

    async def _open(self, runtime: ListenerRuntime, server: asyncio.Server) -> None:
        runtime.server = server
        await server.start_serving()
        config = runtime.config
        backend = config.backend
        log.info(
            "%s: %s %s on %s -> %s",
            config.name,
            config.protocol.value,
            config.tls.value,
            config.listen,
            f"{backend.address} (identity {backend.identity.value})" if backend else "routes",
        )

    def _start_probe(self, runtime: ListenerRuntime) -> None:
        old = self._probes.pop(runtime.config.name, None)
        if old is not None:
            old.cancel()
        self._probes[runtime.config.name] = asyncio.create_task(runtime.probe_forever())

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.helper.on_worker_exit = _count_worker_exit
        self.helper.on_fatal = self._helper_lost
        self.helper.attach(loop)
        self.helper.log_layers()
        if (shortage := descriptor_room(self.config)) is not None:
            log.warning("%s", shortage)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        for runtime in self.runtimes.values():
            self._start_probe(runtime)
        # One probe round before accepting: clients should see the real list.
        await asyncio.wait(
            [asyncio.create_task(runtime.probed.wait()) for runtime in self.runtimes.values()],
            timeout=max(r.config.timeouts.backend_connect for r in self.runtimes.values()) + 1,
        )
        metrics_server = None
        if self.config.metrics.listen is not None:
            address = self.config.metrics.listen
            try:
                metrics_server = await asyncio.start_server(
                    _serve_metrics, address.host, address.port
                )
            except OSError as error:
                raise ConfigError([f"metrics: cannot listen on {address}: {_why(error)}"]) from None
        for runtime in self.runtimes.values():
            await self._open(runtime, await self._bind(runtime.config))
        self._drop_privileges()
        # What start-up made (modules, configuration, metrics) lives as long
        # as the process: kept out of the collector's way, each full
        # collection only walks what sessions made.
        gc.freeze()
        log.info("ready")
        await self._stopping.wait()
        await self._shut_down()
        if metrics_server is not None:
            metrics_server.close()
        self.helper.stop()

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        """SIGHUP: new configuration and certificates for new connections.

        All or nothing: an unreadable or invalid file, a certificate whose key
        does not match, or a listen address that cannot be bound keeps the
        running configuration in service. Sessions in progress are never
        touched (their workers hold their own TLS state).
        """
        async with self._reloading:
            try:
                await self._reload()
            except ConfigError as error:
                metrics.CONFIG_RELOADS.labels("failed").inc()
                log.error(
                    "reload refused, the running configuration stays: %s",
                    "; ".join(error.problems),
                )
                return
            metrics.CONFIG_RELOADS.labels("ok").inc()
            metrics.LAST_RELOAD_SUCCESS.set_to_current_time()
            log.info("reloaded %s", self.config_path)

    async def _reload(self) -> None:
        if self.config_path is None:
            raise ConfigError(["no configuration file to reload from"])
        new = load_config(self.config_path)
        rebind = [
            f"{listener.name}: reuse_port changes only at a restart"
            for listener in new.listeners
            if listener.name in self.runtimes
            and self.runtimes[listener.name].config.listen == listener.listen
            and self.runtimes[listener.name].config.reuse_port != listener.reuse_port
        ]
        if rebind:
            # The socket would have to be bound again beside itself, which
            # the kernel allows only when both have SO_REUSEPORT.
            raise ConfigError(rebind)
        changed = [
            listener
            for listener in new.listeners
            if listener.name not in self.runtimes
            or self.runtimes[listener.name].config.listen != listener.listen
        ]
        bound: dict[str, asyncio.Server] = {}
        try:
            for listener in changed:
                bound[listener.name] = await self._bind(listener)
            problems = await self.helper.reload(new.helper_tls, new.isolation)
            if problems:
                raise ConfigError(problems)
        except ConfigError:
            for server in bound.values():
                server.close()
            raise
        await self._apply(new, bound)

    async def _apply(self, new: Config, bound: dict[str, asyncio.Server]) -> None:
        for name in set(self.runtimes) - {listener.name for listener in new.listeners}:
            runtime = self.runtimes.pop(name)
            self._probes.pop(name).cancel()
            if runtime.server is not None:
                runtime.server.close()
            log.info("%s: listener closed (its sessions go on)", name)
        for listener in new.listeners:
            old = self.runtimes.get(listener.name)
            runtime = ListenerRuntime(
                listener, self.helper, None if old is None else old.probed_for(listener)
            )
            if old is not None:
                # One set: max_connections keeps counting the old sessions.
                runtime.sessions = old.sessions
                runtime.server = old.server
            self.runtimes[listener.name] = runtime
            if listener.name in bound:
                if old is not None and old.server is not None:
                    old.server.close()
                await self._open(runtime, bound[listener.name])
            self._start_probe(runtime)
        self.config = new
        publish_certificate_expiry(new)
        if (shortage := descriptor_room(new)) is not None:
            log.warning("%s", shortage)

    async def _shut_down(self) -> None:
        """Stop accepting, let sessions finish, then say goodbye to the rest."""
        drain = self.config.shutdown.drain_timeout
        log.info("shutting down: waiting up to %gs for sessions to end", drain)
        for task in self._probes.values():
            task.cancel()
        for runtime in self.runtimes.values():
            if runtime.server is not None:
                runtime.server.close()
        deadline = asyncio.get_running_loop().time() + drain
        while self._sessions() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        remaining = self._sessions()
        if remaining:
            log.info("closing %d sessions still open", len(remaining))
        for session in remaining:
            session.shut_down()
        # Let the goodbyes reach the transports' buffers and the wire.
        await asyncio.sleep(0.2)

    def _sessions(self) -> list[Session]:
        return [session for runtime in self.runtimes.values() for session in runtime.sessions]
