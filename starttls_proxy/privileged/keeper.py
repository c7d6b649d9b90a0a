"""The keeper: the small privileged process that (re)starts the TLS helper.

Why it exists: the main process binds its sockets and then drops root
(``isolation.main_user``), but the TLS helper must stay root to put each
worker in namespaces, a chroot and a UID of its own. Restarting a dead
helper therefore needs a privileged parent that the network-facing process
cannot steer. The keeper is that parent, and nothing more:

* the main process execs it fresh (``python -m starttls_proxy.privileged.keeper FD``)
  before its event loop exists, while still root; it reads no key, imports
  no TLS code but ``cryptography.x509`` (for the certificate chains), and
  only ever parses the main process's settings (``wire.Configuration``,
  ``wire.Reload``), which it validates (``validated``: the helper and the
  key server take them from the keeper without validating them again);
* it starts the helper (C, ``tls/helper/stp-helper FD``) with a new control
  socket and hands it its *description* (``tls.description``): the
  settings and the certificate chains, with what needs Python or a look at
  this machine done beforehand (the chains checked, the workers' seccomp
  filter compiled, the chroot directory prepared). It waits for the
  helper's ``Ready`` and passes the main process the other end of that
  socket over its own socket (SCM_RIGHTS); it does so again whenever the
  helper dies, so the main process never needs privileges to get a new one;
* it is a child subreaper (PR_SET_CHILD_SUBREAPER): the workers of a dead
  helper, which keep serving their sessions (each talks to the main process
  over its own channel), become its children; it reaps them and reports
  their exits so that they are still counted;
* with ``isolation.key_server`` it also starts the key server
  (``keys.server``) before the first helper, opens the configured key files
  for it (the key server opens nothing; the keeper never reads them), has it
  load them for every helper it starts, and gives that helper the key
  references and a link to the key server. It sets ``OPENSSL_CONF`` (the
  key-reference provider, ``provider``) for the helpers only. A dead key
  server is restarted with the key files in service, then a fresh helper
  takes over (the old one's link is dead; sessions go on);
* more than ``isolation.max_helper_restarts`` deaths (of helpers or of the
  key server) within ``isolation.restart_window`` seconds make it give up
  and say so: the main process then exits non-zero instead of spinning;
* on a reload (SIGHUP in the main process) it starts a *new* helper; if
  that one loads every certificate (mismatched pairs refused) the main
  process gets it and the old helper is retired (it leaves when the main
  process closes its socket; its workers go on serving their sessions);
  otherwise nothing changes and the main process is told why.

Its messages (with the main process, the helper and the key server) and
its exit statuses are in ``wire``.

When the main process closes its socket, the keeper stops restarting and
waits for the helper, which leaves once its own control socket is closed.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starttls_proxy import procname
from starttls_proxy._process import EXIT_TIMEOUT, STARTUP_TIMEOUT, start_process
from starttls_proxy.keys import provider
from starttls_proxy.privileged.helper_start import (
    HelperStartError,
    describe_helper,
    launch_helper,
    require_helper,
)
from starttls_proxy.privileged.uid_map import UIDMap
from starttls_proxy.settings import (
    ConfigError,
    IsolationConfig,
    TLSConfig,
    checked,
    encode,
)
from starttls_proxy.wire import (
    KEY_SERVER_TO_KEEPER,
    MAIN_TO_KEEPER,
    MAX_MESSAGE,
    Configuration,
    Fatal,
    HelperStarted,
    HelperUnusable,
    KeyServerCounts,
    KeyServerStart,
    KeyServerToKeeper,
    KeysLoaded,
    LoadKeys,
    Message,
    Problems,
    Ready,
    Reload,
    ReloadFailed,
    SubordinateExit,
    WireError,
    WorkerExited,
)

PR_SET_CHILD_SUBREAPER = 36


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def open_key_files(configuration: dict[str, Any]) -> list[int]:
    """Open every configured key file (for the key server to read)."""
    fds: list[int] = []
    problems: list[str] = []
    for index, entry in enumerate(configuration["tls"]["certificates"]):
        where = f"tls.certificates[{index}].key"
        try:
            fds.append(os.open(entry["key"], os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            problems.append(f"{where}: file not found: {entry['key']}")
        except OSError as error:
            problems.append(f"{where}: cannot open: {error.strerror}")
    if problems:
        _close_all(fds)
        raise HelperStartError(problems)
    return fds


class KeyServerProcess:
    """The keeper's side of the key server."""

    def __init__(
        self, isolation: dict[str, Any], on_counts: Callable[[KeyServerCounts], None]
    ) -> None:
        self.isolation = isolation
        self.on_counts = on_counts
        self.process, self.control = self._start()

    def _start(self) -> tuple[subprocess.Popen[bytes], socket.socket]:
        # The keeper's own environment: OPENSSL_CONF with the provider is
        # only ever set for the helpers.
        process, control = start_process([sys.executable, "-m", "starttls_proxy.keys.server"])
        control.settimeout(STARTUP_TIMEOUT)
        try:
            control.send(KeyServerStart(self.isolation).encode())
            reply = KEY_SERVER_TO_KEEPER.decode(control.recv(MAX_MESSAGE))
        except (OSError, TimeoutError):
            reply = Problems(("the key server did not start in time",))
        except WireError as error:
            reply = Problems((f"the key server failed to start: {error}",))
        if not isinstance(reply, Ready):
            control.close()
            process.kill()
            process.wait()
            raise HelperStartError.refusal(reply, "the key server failed to start")
        self.layers = reply.layers
        return process, control

    def restart(self) -> None:
        self.control.close()
        self.process, self.control = self._start()

    def load(self, key_files: list[int]) -> tuple[list[str], socket.socket]:
        """Have the key server read ``key_files`` (its copies); return the
        key references and the helper's end of a link to those keys."""
        helper_end, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        wheres = [f"tls.certificates[{index}].key" for index in range(len(key_files))]
        try:
            with ours:
                message = LoadKeys(tuple(wheres)).encode()
                socket.send_fds(self.control, [message], [ours.fileno(), *key_files])
            reply = self.receive()
        except (OSError, TimeoutError, WireError) as error:
            helper_end.close()
            raise HelperStartError([f"the key server did not answer: {error}"]) from None
        if not isinstance(reply, KeysLoaded):
            helper_end.close()
            raise HelperStartError.refusal(reply, "the key server refused the keys")
        return list(reply.references), helper_end

    def receive(self) -> KeyServerToKeeper:
        """The next answer of the key server; counts on the way are passed on."""
        while True:
            message = self.control.recv(MAX_MESSAGE)
            if not message:
                raise OSError("the key server closed its socket")
            reply = KEY_SERVER_TO_KEEPER.decode(message)
            if not isinstance(reply, KeyServerCounts):
                return reply
            self.on_counts(reply)

    def read_counts(self) -> bool:
        """Pass on what the key server sent (counts); False at its end."""
        self.control.setblocking(False)
        try:
            while True:
                message = self.control.recv(MAX_MESSAGE)
                if not message:
                    return False
                try:
                    counts = KEY_SERVER_TO_KEEPER.decode(message)
                except WireError as error:
                    print(f"keeper: unusable message from the key server: {error}", file=sys.stderr)
                    continue
                if isinstance(counts, KeyServerCounts):
                    self.on_counts(counts)
        except BlockingIOError:
            return True
        finally:
            self.control.settimeout(STARTUP_TIMEOUT)

    def stop(self) -> None:
        """Close its socket (it leaves) and wait for it."""
        self.control.close()
        try:
            self.process.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _send(main: socket.socket, message: Message, fds: list[int] | None = None) -> None:
    # A main process that has left (it is shutting down) is noticed by
    # ``Keeper.run`` when its socket reads EOF; what it would have been told
    # (the key server's last counts, a worker's exit) no longer matters.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        socket.send_fds(main, [message.encode()], fds or [])


def checked_configuration(message: bytes) -> dict[str, Any]:
    """The main process's first message (``wire.Configuration``), validated
    and re-encoded; raise ``HelperStartError`` naming what is wrong."""
    try:
        configuration = MAIN_TO_KEEPER.decode(message)
    except WireError as error:
        raise HelperStartError([f"unusable configuration message: {error}"]) from None
    if not isinstance(configuration, Configuration):
        raise HelperStartError(["unusable configuration message: not a Configuration"])
    return validated(configuration)


def validated(configuration: Configuration) -> dict[str, Any]:
    """``configuration``'s sections validated and re-encoded; raise
    ``HelperStartError`` naming each problem.

    The main process runs unprivileged and faces the network; what is built
    from this message (the helper, the key server) runs as root and trusts
    it (``settings.decode``), so it is checked here, at the boundary.
    """
    try:
        return {
            "tls": encode(checked(TLSConfig, configuration.tls, "tls")),
            "isolation": encode(checked(IsolationConfig, configuration.isolation, "isolation")),
        }
    except ConfigError as error:
        raise HelperStartError(error.problems) from None


class Keeper:
    def __init__(self, main: socket.socket, configuration: bytes) -> None:
        self.main = main
        self.configuration = checked_configuration(configuration)
        isolation = self.configuration["isolation"]
        self.max_restarts: int = isolation["max_helper_restarts"]
        self.window: float = isolation["restart_window"]
        self.deaths: collections.deque[float] = collections.deque()
        self.helper: subprocess.Popen[bytes] | None = None
        #: Helpers replaced by a reload: their exit is neither a death nor a worker's.
        self.retired: set[int] = set()
        self.key_server: KeyServerProcess | None = None
        #: The key files of the configuration in service (a restarted key
        #: server reads these, whatever the files' names point to now).
        self.key_files: list[int] = []
        #: Holds the helpers' OpenSSL configuration (the provider).
        self.runtime: Path | None = None
        #: Which UIDs of the range are taken, shared by every helper started.
        self.uid_map = UIDMap(*isolation["uid_range"])

    def start_helper(
        self, configuration: dict[str, Any] | None = None, *, reloaded: bool = False
    ) -> None:
        """Start a helper, wait until it is ready, hand its socket to the main process.

        ``configuration`` None: the one in service (a restart). With the key
        server, it first loads the keys (their files opened here), and the
        helper gets their references and a link to it.
        """
        require_helper()
        settings = configuration or self.configuration
        key_files: list[int] = []
        references: list[str] | None = None
        link: socket.socket | None = None
        try:
            if settings["isolation"]["key_server"]:
                key_server = self._key_server(settings["isolation"])
                if configuration is None and self.key_files:
                    key_files = [os.dup(fd) for fd in self.key_files]
                else:
                    key_files = open_key_files(settings)
                references, link = key_server.load(key_files)
            self._start_helper_process(settings, references, link, reloaded)
        except BaseException:
            _close_all(key_files)
            raise
        finally:
            if link is not None:
                link.close()
        _close_all(self.key_files)
        self.key_files = key_files

    def _key_server(self, isolation: dict[str, Any]) -> KeyServerProcess:
        if self.key_server is None:
            problem = provider.missing()
            if problem is not None:
                raise HelperStartError([f"isolation.key_server: {problem}"])
            self.key_server = KeyServerProcess(isolation, lambda counts: _send(self.main, counts))
        return self.key_server

    def _helper_environment(self, with_provider: bool) -> dict[str, str] | None:
        """OPENSSL_CONF with the provider, for a helper that loads key references."""
        if not with_provider:
            return None
        if self.runtime is None:
            self.runtime = Path(tempfile.mkdtemp(prefix="starttls-proxy-"))
            provider.write_openssl_config(self.runtime)
        return {**os.environ, "OPENSSL_CONF": str(self.runtime / "openssl.cnf")}

    def _start_helper_process(
        self,
        settings: dict[str, Any],
        references: list[str] | None,
        link: socket.socket | None,
        reloaded: bool,
    ) -> None:
        process, ours, reply = launch_helper(
            describe_helper(settings, references, uid_map=self.uid_map),
            link,
            self._helper_environment(references is not None),
            uid_map=self.uid_map,
        )
        with ours:
            if not isinstance(reply, Ready):
                process.wait(5)
                raise HelperStartError.refusal(reply, "the TLS helper failed to start")
            self.helper = process
            key_server_layers = (
                self.key_server.layers if link is not None and self.key_server else None
            )
            started = HelperStarted(process.pid, reply.layers, key_server_layers, reloaded)
            _send(self.main, started, [ours.fileno()])

    def reload(self, configuration: Configuration) -> None:
        """Swap in a helper built from ``configuration``, or keep the old one."""
        old = self.helper
        try:
            settings = validated(configuration)
            # The UID map is the range's, and workers still hold its UIDs;
            # the key server's is the range's last, which helpers hand out
            # only while there is no key server.
            for setting in ("uid_range", "key_server"):
                if settings["isolation"][setting] != self.configuration["isolation"][setting]:
                    raise HelperStartError([f"isolation.{setting} changes only at a restart"])
            self.start_helper(settings, reloaded=True)
        except (HelperStartError, OSError) as error:
            problems = error.problems if isinstance(error, HelperStartError) else [str(error)]
            _send(self.main, ReloadFailed(tuple(problems)))
            return
        self.configuration = settings
        if old is not None:
            self.retired.add(old.pid)

    def on_child_exit(self, pid: int, code: int, uid: int) -> bool:
        """Restart a dead helper or key server, or report a worker's exit
        (``uid``: the one it ran as, free again); False to give up."""
        if pid in self.retired:
            self.retired.discard(pid)
            return True
        if self.key_server is not None and pid == self.key_server.process.pid:
            return self._restart_key_server(code)
        if self.helper is None or pid != self.helper.pid:
            # An orphan: its helper is gone, and gives nothing back.
            self.uid_map.release(uid)
            _send(self.main, WorkerExited(pid, code))
            return True
        self.helper = None
        if not self._may_restart("the TLS helper", code):
            return False
        print(f"keeper: the TLS helper died (status {code}); restarting it", file=sys.stderr)
        try:
            self.start_helper()
        except (HelperStartError, OSError) as error:
            _send(self.main, Fatal(f"the TLS helper could not be restarted: {error}"))
            return False
        return True

    def _may_restart(self, what: str, code: int) -> bool:
        """Count a death; past the budget tell the main process and say no."""
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.window:
            self.deaths.popleft()
        if len(self.deaths) <= self.max_restarts:
            return True
        _send(
            self.main,
            Fatal(
                f"{what} died {len(self.deaths)} times within "
                f"{self.window:g} s (isolation.max_helper_restarts is "
                f"{self.max_restarts}); last status {code}"
            ),
        )
        return False

    def _restart_key_server(self, code: int) -> bool:
        """A new key server, then a new helper linked to it: the old helper's
        link died with the key server (its workers' handshakes fail cleanly
        meanwhile; established sessions need no signature)."""
        assert self.key_server is not None
        if not self._may_restart("the key server", code):
            return False
        print(f"keeper: the key server died (status {code}); restarting it", file=sys.stderr)
        _send(self.main, HelperUnusable("the key server died"))
        old = self.helper
        try:
            self.key_server.restart()
            self.start_helper()
        except (HelperStartError, OSError) as error:
            _send(self.main, Fatal(f"the key server could not be restarted: {error}"))
            return False
        if old is not None:
            self.retired.add(old.pid)
        return True

    def _watch_key_server(self, selector: selectors.BaseSelector) -> None:
        """Keep the key server's current socket (it changes on restart) in ``selector``."""
        current = self.key_server.control if self.key_server is not None else None
        for key in list(selector.get_map().values()):
            if key.data == "key_server" and key.fileobj is not current:
                selector.unregister(key.fileobj)
        if current is not None and current.fileno() >= 0:
            with contextlib.suppress(KeyError):
                selector.register(current, selectors.EVENT_READ, "key_server")

    def run(self) -> int:
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        selector = selectors.DefaultSelector()
        selector.register(self.main, selectors.EVENT_READ)
        selector.register(wake_read, selectors.EVENT_READ)
        while True:
            self._watch_key_server(selector)
            for key, _ in selector.select():
                if key.data == "key_server":
                    assert self.key_server is not None
                    if not self.key_server.read_counts():
                        selector.unregister(key.fileobj)
                    continue
                if key.fileobj is self.main:
                    try:
                        message = self.main.recv(MAX_MESSAGE)
                    except ConnectionResetError:
                        # The main process left with our messages unread.
                        message = b""
                    if not message:
                        return self._finish()
                    self.on_request(message)
                    continue
                while True:
                    try:
                        os.read(wake_read, 512)
                    except BlockingIOError:
                        break
                for pid, code, uid in _reap():
                    if not self.on_child_exit(pid, code, uid):
                        return SubordinateExit.GAVE_UP

    def on_request(self, message: bytes) -> None:
        """Serve a message of the main process after the first (a ``Reload``)."""
        try:
            request = MAIN_TO_KEEPER.decode(message)
        except WireError as error:
            print(f"keeper: unusable message from the main process: {error}", file=sys.stderr)
            return
        match request:
            case Reload(configuration=configuration):
                self.reload(configuration)
            case _:
                print(f"keeper: unexpected {type(request).__name__} message", file=sys.stderr)

    def _finish(self) -> int:
        if self.helper is not None:
            try:
                self.helper.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.helper.kill()
        return SubordinateExit.DONE

    def close(self) -> None:
        """Stop the key server, forget the key files, the OpenSSL configuration
        and the UID map."""
        if self.key_server is not None:
            self.key_server.stop()
        self.uid_map.close()
        _close_all(self.key_files)
        self.key_files = []
        if self.runtime is not None:
            shutil.rmtree(self.runtime, ignore_errors=True)


def _reap() -> list[tuple[int, int, int]]:
    """Each child that ended: its PID, its exit code (a negative one is the
    killing signal) and the UID it ran as."""
    exits: list[tuple[int, int, int]] = []
    while True:
        try:
            ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return exits
        if ended is None:
            return exits
        code = ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status
        exits.append((ended.si_pid, code, ended.si_uid))


def serve(main: socket.socket) -> int:
    procname.name_subordinate(procname.KEEPER)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("keeper: cannot become a child subreaper", file=sys.stderr)
    try:
        keeper = Keeper(main, main.recv(MAX_MESSAGE))
    except HelperStartError as error:
        _send(main, Problems(tuple(error.problems)))
        return SubordinateExit.REFUSED
    try:
        try:
            keeper.start_helper()
        except HelperStartError as error:
            _send(main, Problems(tuple(error.problems)))
            return SubordinateExit.REFUSED
        return keeper.run()
    finally:
        keeper.close()


if __name__ == "__main__":
    sys.exit(serve(socket.socket(fileno=int(sys.argv[1]))))
