"""Main-process side of the TLS helper: start it (through the keeper), hand
it client sockets, follow its restarts.

Every message on its two sockets is in ``wire`` (``KEEPER_TO_MAIN``,
``HELPER_TO_MAIN``, ``MAIN_TO_KEEPER``, ``SpawnRequest``). ``TLSHelper.start`` is
blocking and runs before the event loop (while the process may still be
root: the keeper and the helper keep those privileges); ``spawn`` is called
from the loop and never blocks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from starttls_proxy._process import start_process
from starttls_proxy.proxy import metrics
from starttls_proxy.settings import ConfigError, IsolationConfig, TLSConfig, encode
from starttls_proxy.wire import (
    HELPER_TO_MAIN,
    KEEPER_TO_MAIN,
    MAX_EARLY_BYTES,
    MAX_MESSAGE,
    Configuration,
    Fatal,
    HelperStarted,
    HelperUnusable,
    KeeperToMain,
    KeyServerCounts,
    LayerStatus,
    Problems,
    Reload,
    ReloadFailed,
    SpawnRequest,
    WireError,
    WorkerExited,
)

log = logging.getLogger(__name__)

#: How long the keeper may take to start the first helper (sandbox probe
#: and certificates included).
STARTUP_TIMEOUT = 60.0
#: How long ``stop`` waits for the keeper (and through it the helper) to leave.
STOP_TIMEOUT = 15.0
#: A reload starts a whole new helper (sandbox probe, certificates).
RELOAD_TIMEOUT = STARTUP_TIMEOUT
#: Each end's send buffer on a worker's plaintext channel (SO_SNDBUF; the
#: kernel doubles it for its bookkeeping). The default (208 KiB) is less than
#: the 256 KiB the worker and uvloop each move at once, so bulk transfers
#: went in partial writes and twice the wake-ups: measured, this is worth
#: 10-20 % of IMAP FETCH throughput. Pages are taken only while data waits,
#: so an idle session costs nothing more; a stalled one at most this much
#: more per direction, before the proxy stops reading its other side.
CHANNEL_SEND_BUFFER = 512 * 1024
#: The ceiling an unprivileged process may ask for (stock kernels: 208 KiB).
SEND_BUFFER_CEILING = Path("/proc/sys/net/core/wmem_max")


def channel_buffer_shortfall(ceiling: Path = SEND_BUFFER_CEILING) -> str | None:
    """What to raise when the kernel caps the channels' send buffers below
    ``CHANNEL_SEND_BUFFER``, or None."""
    try:
        allowed = int(ceiling.read_text())
    except (OSError, ValueError):
        return None
    if allowed >= CHANNEL_SEND_BUFFER:
        return None
    return (
        f"net.core.wmem_max is {allowed}: TLS worker channels get less than their"
        f" {CHANNEL_SEND_BUFFER} bytes of send buffer, which slows bulk transfers;"
        f" raise it (sysctl -w net.core.wmem_max={CHANNEL_SEND_BUFFER})"
    )


def _configuration(tls: TLSConfig, isolation: IsolationConfig) -> Configuration:
    return Configuration(tls=encode(tls), isolation=encode(isolation))


class HandoffError(Exception):
    """The TLS helper could not take the connection."""


def _receive(sock: socket.socket) -> tuple[KeeperToMain | None, int | None]:
    """The keeper's next message (None: it has left) and the descriptor that
    came with a ``HelperStarted``; ``WireError`` for anything else (any
    descriptor that came with it closed)."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
    if not data:
        return None, None
    try:
        message = KEEPER_TO_MAIN.decode(data)
        if isinstance(message, HelperStarted) != (len(fds) == 1):
            raise WireError(f"{type(message).__name__} with {len(fds)} descriptors")
    except WireError:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds[0] if fds else None


class _HelperGoneError(Exception):
    """The control socket refused a spawn request: the helper has died."""


class TLSHelper:
    def __init__(self, keeper: subprocess.Popen[bytes], keeper_socket: socket.socket) -> None:
        self.keeper = keeper
        self.keeper_socket = keeper_socket
        #: The current helper's control socket; ``None`` while it restarts.
        self.control: socket.socket | None = None
        self.helper_pid = 0
        #: The sandbox layers as the helper's probe found them.
        self.layers: tuple[LayerStatus, ...] = ()
        #: The same for the key server; None when the helper holds the keys.
        self.key_server_layers: tuple[LayerStatus, ...] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Called with (pid, status) when a worker exits.
        self.on_worker_exit: Callable[[int, int], None] = lambda pid, status: None
        #: Called with a reason when no helper can be had any more.
        self.on_fatal: Callable[[str], None] = lambda reason: None
        #: The keeper's answer to a pending reload: the problems, [] if none.
        self._reloaded: asyncio.Future[list[str]] | None = None
        #: Set while a helper takes connections (not while the keeper restarts one).
        self._running = asyncio.Event()
        #: The peer trust files of the helper in service, its stores 1, 2, ...
        self.trust_stores: tuple[Path, ...] = ()
        #: Those of the helper a pending reload starts.
        self._reload_trust_stores: tuple[Path, ...] = ()

    @classmethod
    def start(cls, tls: TLSConfig, isolation: IsolationConfig) -> TLSHelper:
        """Start the keeper and wait until the first helper is ready."""
        keeper, ours = start_process([sys.executable, "-m", "starttls_proxy.privileged.keeper"])
        ours.settimeout(STARTUP_TIMEOUT)
        ours.send(_configuration(tls, isolation).encode())
        try:
            message, fd = _receive(ours)
        except TimeoutError:
            keeper.kill()
            keeper.wait()
            raise ConfigError(["tls: the TLS helper did not start in time"]) from None
        except WireError as error:
            message, fd = None, None
            log.error("unusable message from the keeper: %s", error)
        match message:
            case HelperStarted() if fd is not None:
                ours.setblocking(False)
                helper = cls(keeper, ours)
                helper.trust_stores = tls.peer_trust
                helper._adopt(message, fd)
                if shortfall := channel_buffer_shortfall():
                    log.warning("%s", shortfall)
                return helper
            case Problems(problems=problems):
                keeper.wait(5)
                raise ConfigError(list(problems))
            case _:
                keeper.wait(5)
                raise ConfigError(["tls: the TLS helper failed to start"])

    def trust_number(self, path: Path) -> int:
        """The helper's number for the trust store of ``path``, for a spawn
        request; 0 when it has none (a listener a reload changed, in the
        moment before its new configuration replaces the old one): the
        worker then asks for no certificate."""
        try:
            return self.trust_stores.index(path) + 1
        except ValueError:
            return 0

    def _adopt(self, message: HelperStarted, fd: int) -> None:
        self.control = socket.socket(fileno=fd)
        self.control.setblocking(False)
        self.helper_pid = message.pid
        self.layers = message.layers
        self.key_server_layers = message.key_server_layers
        if self._loop is not None:
            self._loop.add_reader(self.control.fileno(), self._on_helper_message)
        self._running.set()

    def log_layers(self) -> None:
        """The startup log line of the sandbox layers in force (and missing)."""
        applied = [name for name, ok, _ in self.layers if ok]
        for name, ok, _ in self.layers:
            metrics.ISOLATION_LAYERS.labels(name).set(1 if ok else 0)
        log.info("TLS worker sandbox: clean slate, %s, handshake deadline", ", ".join(applied))
        for name, ok, detail in self.layers:
            if not ok:
                log.warning("TLS worker sandbox: %s NOT applied: %s", name, detail)
        if self.key_server_layers is None:
            log.warning("private keys are in the TLS helper (isolation.key_server: false)")
            return
        applied = [name for name, ok, _ in self.key_server_layers if ok]
        log.info("private keys in the key server: %s", ", ".join(applied) or "no sandbox layer")
        for name, ok, detail in self.key_server_layers:
            if not ok:
                log.warning("key server sandbox: %s NOT applied: %s", name, detail)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.keeper_socket.fileno(), self._on_keeper_message)
        if self.control is not None:
            loop.add_reader(self.control.fileno(), self._on_helper_message)

    def _on_helper_message(self) -> None:
        assert self.control is not None and self._loop is not None
        while True:
            try:
                data = self.control.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                # Killed with messages unread: a reset rather than an end.
                data = b""
            if not data:
                log.error("the TLS helper (pid %d) died; the keeper restarts it", self.helper_pid)
                self._drop_control()
                return
            try:
                exited = HELPER_TO_MAIN.decode(data)
            except WireError as error:
                log.error("unusable message from the TLS helper: %s", error)
                continue
            self.on_worker_exit(exited.pid, exited.status)

    def _on_keeper_message(self) -> None:
        while True:
            try:
                message, fd = _receive(self.keeper_socket)
            except BlockingIOError:
                return
            except WireError as error:
                log.error("unusable message from the keeper: %s", error)
                continue
            match message:
                case None:
                    self.on_fatal("the keeper process exited")
                    self._stop_reading_keeper()
                    return
                case HelperStarted() if fd is not None:
                    self._drop_control()
                    self._adopt(message, fd)
                    if message.reloaded and self._reloaded is not None:
                        self.trust_stores = self._reload_trust_stores
                        self._reloaded.set_result([])
                    else:
                        log.info("the TLS helper runs again (pid %d)", self.helper_pid)
                case HelperUnusable(reason=reason):
                    # Its control socket stays open for its workers' exits;
                    # hand-offs wait for the helper that replaces it.
                    log.warning("%s: new connections wait for a new TLS helper", reason)
                    self._running.clear()
                case ReloadFailed(problems=problems) if self._reloaded is not None:
                    self._reloaded.set_result(list(problems))
                case WorkerExited(pid=pid, status=status):
                    self.on_worker_exit(pid, status)
                case KeyServerCounts(counts=counts):
                    metrics.KEY_SERVER_REQUESTS.labels("signed").inc(counts.signed)
                    metrics.KEY_SERVER_REQUESTS.labels("refused").inc(counts.refused)
                    metrics.KEY_SERVER_REQUESTS.labels("dropped").inc(counts.dropped)
                case Fatal(reason=reason):
                    self.on_fatal(reason)
                    self._stop_reading_keeper()
                    return
                case ReloadFailed(problems=problems):
                    log.warning("a reload answered too late failed: %s", "; ".join(problems))
                case _:
                    log.error("unexpected message from the keeper: %s", message)

    async def reload(self, tls: TLSConfig, isolation: IsolationConfig) -> list[str]:
        """Have the keeper start a helper with new certificates; return the
        problems that kept the old one in service ([] when the new one took over).

        Workers already running keep their TLS sessions whatever happens.
        """
        assert self._loop is not None
        self._reloaded = self._loop.create_future()
        self._reload_trust_stores = tls.peer_trust
        try:
            self.keeper_socket.send(Reload(_configuration(tls, isolation)).encode())
            async with asyncio.timeout(RELOAD_TIMEOUT):
                return await self._reloaded
        except (OSError, TimeoutError) as error:
            return [f"the keeper did not answer the reload: {error or 'timeout'}"]
        finally:
            self._reloaded = None

    def _drop_control(self) -> None:
        self._running.clear()
        if self.control is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.control.fileno())
        self.control.close()
        self.control = None

    def _stop_reading_keeper(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.keeper_socket.fileno())

    async def spawn(
        self, client: socket.socket, request: SpawnRequest, patience: float
    ) -> socket.socket:
        """Give ``client`` to a new worker; return the main end of its channel.

        While the keeper restarts a helper that died, wait for the new one
        (up to ``patience`` seconds): the client has its upgrade reply and is
        in its handshake, where no error of its protocol can reach it any
        more. The caller still owns (and must close) ``client``: the worker
        has its own descriptor for it.
        """
        if len(request.early) > MAX_EARLY_BYTES:
            raise HandoffError(f"{len(request.early)} bytes before the TLS handshake started")
        try:
            message = request.encode()
        except ValueError as error:
            raise HandoffError(f"unusable spawn request: {error}") from None
        if self._running.is_set() and self.control is not None:
            # The usual case, without a timer armed and cancelled.
            try:
                return self._send_spawn(client, message)
            except _HelperGoneError:
                self._drop_control()
        try:
            async with asyncio.timeout(patience):
                while True:
                    await self._running.wait()
                    try:
                        return self._send_spawn(client, message)
                    except _HelperGoneError:
                        # Dead before its end of the control socket told us.
                        self._drop_control()
        except TimeoutError:
            raise HandoffError(f"no TLS helper came back within {patience:g} s") from None

    def _send_spawn(self, client: socket.socket, message: bytes) -> socket.socket:
        assert self.control is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_SEND_BUFFER)
        try:
            socket.send_fds(self.control, [message], [client.fileno(), theirs.fileno()])
        except OSError:
            ours.close()
            raise _HelperGoneError from None
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours

    def stop(self) -> None:
        """Close both sockets (the helper, then the keeper, leave) and reap the keeper."""
        if self.keeper_socket.fileno() < 0:
            return
        self._drop_control()
        self._stop_reading_keeper()
        self.keeper_socket.close()
        try:
            self.keeper.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Once the main process has dropped root it may not signal the
            # keeper: it is left to finish on its own.
            log.warning("the keeper (pid %d) did not exit in time", self.keeper.pid)
