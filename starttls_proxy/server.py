"""The asyncio shell: listeners, capability probes, metrics endpoint, signals.

As in uvicorn's ``server.py``, this module owns the lifecycle and nothing
else: start-up (probe the backends, bind), the main wait, and shut-down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from cryptography import x509
from prometheus_client import generate_latest

from protocols import PROTOCOLS, ProtocolSpec
from protocols._base import Peer, ProxyMachine, SessionSettings
from starttls_proxy import identity, metrics
from starttls_proxy.config import Config, ListenerConfig, SocketAddress
from starttls_proxy.connection import ClientEndpoint, Session
from starttls_proxy.handoff import TLSHelper
from starttls_proxy.sandbox import EXIT_DEADLINE, EXIT_SANDBOX_FAILED, drop_privileges
from starttls_proxy.wire import (
    EXIT_CLIENT_GONE,
    EXIT_HANDSHAKE_FAILED,
    EXIT_NOT_TLS,
    EXIT_OK,
    EXIT_TLS_ERROR,
)

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024
PROBE_READ_SIZE = 64 * 1024

_EXIT_REASONS = {
    EXIT_OK: "normal",
    EXIT_HANDSHAKE_FAILED: "handshake_failed",
    EXIT_NOT_TLS: "not_tls",
    EXIT_CLIENT_GONE: "client_gone",
    EXIT_TLS_ERROR: "tls_error",
    EXIT_DEADLINE: "timeout",
    EXIT_SANDBOX_FAILED: "sandbox_failed",
    -signal.SIGSYS: "seccomp",
}
#: Exit status of the proxy when no TLS helper can be had any more.
EXIT_HELPER_LOST = 3


class ProbeError(Exception):
    pass


class ListenerRuntime:
    """One configured listener and what it learned at run time."""

    def __init__(self, config: ListenerConfig, helper: TLSHelper) -> None:
        self.config = config
        self.helper = helper
        self.spec: ProtocolSpec = PROTOCOLS[config.protocol.value]
        self.sessions: set[Session] = set()
        self.server: asyncio.Server | None = None
        self.settings = self._settings(config.capabilities or self.spec.fallback_capabilities)
        #: Set once the first probe has succeeded or failed.
        self.probed = asyncio.Event()

    def _settings(self, capabilities: tuple[str, ...]) -> SessionSettings:
        config = self.config
        return SessionSettings(
            hostname=config.hostname,
            tls_mode=config.tls,
            require_tls=config.require_tls,
            capabilities=capabilities,
            identity=config.backend.identity,
            max_line_length=config.max_line_length,
            smtp_bare_line_endings=config.smtp.bare_line_endings,
            max_literal_size=config.limits.max_literal_size,
            max_stanza_size=config.limits.max_stanza_size,
            max_xml_depth=config.limits.max_xml_depth,
            max_attribute_size=config.limits.max_attribute_size,
            domains=config.domains,
        )

    def new_machine(self, peer: Peer) -> ProxyMachine:
        return self.spec.machine(self.settings, peer)

    async def probe(self) -> tuple[str, ...]:
        """Ask the backend for its capabilities, over one short dialogue."""
        config = self.config
        async with asyncio.timeout(config.timeouts.backend_connect):
            reader, writer = await _open(config.backend.address)
            try:
                writer.write(
                    identity.probe_header(config.backend.identity, _own_connection(writer))
                )
                probe = self.spec.probe(config.hostname)
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

    async def probe_forever(self) -> None:
        """Keep the advertised capabilities equal to the backend's."""
        if self.config.capabilities is not None:
            self.probed.set()
            return
        while True:
            try:
                capabilities = await self.probe()
            except (OSError, TimeoutError, ProbeError) as error:
                log.warning(
                    "%s: capability probe of %s failed (%s); advertising %s",
                    self.config.name,
                    self.config.backend.address,
                    error or "timeout",
                    " ".join(self.settings.capabilities),
                )
            else:
                if capabilities != self.settings.capabilities:
                    log.info(
                        "%s: backend capabilities: %s", self.config.name, " | ".join(capabilities)
                    )
                    self.settings = self._settings(capabilities)
            self.probed.set()
            await asyncio.sleep(self.config.backend.probe_interval)


def _own_connection(writer: asyncio.StreamWriter) -> Peer:
    local = writer.get_extra_info("sockname")
    remote = writer.get_extra_info("peername")
    if not isinstance(local, tuple) or not isinstance(remote, tuple):  # a unix socket
        return Peer("127.0.0.1", 0, "127.0.0.1", 0)
    return Peer(local[0], local[1], remote[0], remote[1])


async def _open(address: SocketAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
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
    reason = _EXIT_REASONS.get(status, "crash")
    metrics.WORKER_EXITS.labels(reason).inc()
    if reason in ("crash", "seccomp", "sandbox_failed"):
        log.warning("TLS worker %d ended abnormally (%s, status %d)", pid, reason, status)


def publish_certificate_expiry(config: Config) -> None:
    """Export each certificate's notAfter; only the public part is read here."""
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
    def __init__(self, config: Config, helper: TLSHelper) -> None:
        self.config = config
        self.helper = helper
        self.listeners = [ListenerRuntime(listener, helper) for listener in config.listeners]
        publish_certificate_expiry(config)
        self._stopping = asyncio.Event()
        #: What the process exits with once ``serve`` returns.
        self.exit_status = 0

    def _helper_lost(self, reason: str) -> None:
        log.critical("giving up: %s", reason)
        self.exit_status = EXIT_HELPER_LOST
        self._stopping.set()

    def _drop_privileges(self) -> None:
        """Leave root once every socket is bound (the keeper keeps what the helper needs)."""
        user = self.config.isolation.main_user
        if user is None or os.geteuid() != 0:
            log.info("main process runs as uid %d", os.geteuid())
            return
        drop_privileges(user)
        log.info("main process dropped root: now runs as %s (uid %d)", user, os.geteuid())

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.helper.on_worker_exit = _count_worker_exit
        self.helper.on_fatal = self._helper_lost
        self.helper.attach(loop)
        self.helper.log_layers()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        probes = [asyncio.create_task(runtime.probe_forever()) for runtime in self.listeners]
        # One probe round before accepting: clients should see the real list.
        await asyncio.wait(
            [asyncio.create_task(runtime.probed.wait()) for runtime in self.listeners],
            timeout=max(r.config.timeouts.backend_connect for r in self.listeners) + 1,
        )
        metrics_server = None
        if self.config.metrics.listen is not None:
            address = self.config.metrics.listen
            metrics_server = await asyncio.start_server(_serve_metrics, address.host, address.port)
        for runtime in self.listeners:
            listen = runtime.config.listen
            runtime.server = await loop.create_server(
                lambda runtime=runtime: ClientEndpoint(runtime),
                listen.host,
                listen.port,
                family=socket.AF_INET6 if ":" in listen.host else socket.AF_UNSPEC,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
            log.info(
                "%s: %s %s on %s -> %s (identity %s)",
                runtime.config.name,
                runtime.config.protocol.value,
                runtime.config.tls.value,
                listen,
                runtime.config.backend.address,
                runtime.config.backend.identity.value,
            )
        self._drop_privileges()
        log.info("ready")
        await self._stopping.wait()
        log.info("shutting down")
        for task in probes:
            task.cancel()
        for runtime in self.listeners:
            if runtime.server is not None:
                runtime.server.close()
            for session in list(runtime.sessions):
                session.close("proxy shutting down")
        if metrics_server is not None:
            metrics_server.close()
        self.helper.stop()
