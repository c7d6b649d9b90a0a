"""The keeper: the small privileged process that (re)starts the TLS helper.

Why it exists: the main process binds its sockets and then drops root
(``isolation.main_user``), but the TLS helper must stay root to put each
worker in namespaces, a chroot and a UID of its own. Restarting a dead
helper therefore needs a privileged parent that the network-facing process
cannot steer. The keeper is that parent, and nothing more:

* the main process execs it fresh (``python -m starttls_proxy.keeper FD``)
  before its event loop exists, while still root; it imports no TLS code,
  reads no key, and only ever parses the configuration message below;
* it starts the helper (``zygote``) with a new control socket, waits for
  its "ready", and passes the main process the other end of that socket
  over its own socket (SCM_RIGHTS); it does so again whenever the helper
  dies, so the main process never needs privileges to get a new one;
* it is a child subreaper (PR_SET_CHILD_SUBREAPER): the workers of a dead
  helper, which keep serving their sessions (each talks to the main process
  over its own channel), become its children; it reaps them and reports
  their exits so that they are still counted;
* more than ``isolation.max_helper_restarts`` helper deaths within
  ``isolation.restart_window`` seconds make it give up and say so: the main
  process then exits non-zero instead of spinning.

Wire format with the main process (SOCK_SEQPACKET, one JSON object per
datagram):

* main -> keeper, once: ``{"tls": <TLSConfig>, "isolation": <IsolationConfig>}``
  (passed on verbatim to every helper it starts);
* keeper -> main: ``{"helper": PID, "layers": [[name, applied, detail], ...]}``
  with the main's end of the helper's control socket attached, at start and
  after every restart;
* keeper -> main: ``{"problems": [...]}`` when the first helper refused the
  configuration (the keeper then exits);
* keeper -> main: ``{"exited": PID, "status": CODE}`` for a dead helper's workers;
* keeper -> main: ``{"fatal": "..."}``, then the keeper exits.
* main -> keeper: ``{"reload": {"tls": ..., "isolation": ...}}`` (SIGHUP): the
  keeper starts a *new* helper with it; if that one loads every certificate
  (mismatched pairs refused) it answers ``{"helper": PID, "layers": ...,
  "reloaded": true}`` with the new control socket, and the old helper is
  retired (it leaves when the main process closes its socket; its workers go
  on serving their sessions). Otherwise it answers ``{"reload_failed":
  [...]}`` and nothing changes.

When the main process closes its socket, the keeper stops restarting and
waits for the helper, which leaves once its own control socket is closed.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

MAX_MESSAGE = 64 * 1024
#: How long a helper may take to prepare the sandbox and load certificates.
STARTUP_TIMEOUT = 30.0
#: How long the keeper waits for the helper once the main process is gone.
EXIT_TIMEOUT = 10.0
PR_SET_CHILD_SUBREAPER = 36


class HelperStartError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def start_interpreter(module: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Exec ``python -m MODULE FD`` with one end of a new SOCK_SEQPACKET pair
    as FD; return the process and the other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
    return process, ours


def _send(main: socket.socket, message: dict[str, object], fds: list[int] | None = None) -> None:
    socket.send_fds(main, [json.dumps(message).encode()], fds or [])


class Keeper:
    def __init__(self, main: socket.socket, configuration: bytes) -> None:
        self.main = main
        self.configuration = configuration
        isolation = json.loads(configuration)["isolation"]
        self.max_restarts = int(isolation["max_helper_restarts"])
        self.window = float(isolation["restart_window"])
        self.deaths: collections.deque[float] = collections.deque()
        self.helper: subprocess.Popen[bytes] | None = None
        #: Helpers replaced by a reload: their exit is neither a death nor a worker's.
        self.retired: set[int] = set()

    def start_helper(self, configuration: bytes | None = None, *, reloaded: bool = False) -> None:
        """Start a helper, wait until it is ready, hand its socket to the main process."""
        process, ours = start_interpreter("starttls_proxy.zygote")
        with ours:
            ours.settimeout(STARTUP_TIMEOUT)
            ours.send(configuration or self.configuration)
            try:
                reply = json.loads(ours.recv(MAX_MESSAGE) or b"{}")
            except TimeoutError:
                process.kill()
                raise HelperStartError(["the TLS helper did not start in time"]) from None
            if not reply.get("ready"):
                process.wait(5)
                raise HelperStartError(reply.get("problems") or ["the TLS helper failed to start"])
            self.helper = process
            _send(
                self.main,
                {"helper": process.pid, "layers": reply["layers"], "reloaded": reloaded},
                [ours.fileno()],
            )

    def reload(self, configuration: bytes) -> None:
        """Swap in a helper built from ``configuration``, or keep the old one."""
        old = self.helper
        try:
            self.start_helper(configuration, reloaded=True)
        except (HelperStartError, OSError) as error:
            problems = error.problems if isinstance(error, HelperStartError) else [str(error)]
            _send(self.main, {"reload_failed": problems})
            return
        self.configuration = configuration
        if old is not None:
            self.retired.add(old.pid)

    def on_child_exit(self, pid: int, code: int) -> bool:
        """Restart a dead helper or report a worker's exit; False to give up."""
        if pid in self.retired:
            self.retired.discard(pid)
            return True
        if self.helper is None or pid != self.helper.pid:
            _send(self.main, {"exited": pid, "status": code})
            return True
        self.helper = None
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.window:
            self.deaths.popleft()
        if len(self.deaths) > self.max_restarts:
            _send(
                self.main,
                {
                    "fatal": f"the TLS helper died {len(self.deaths)} times within "
                    f"{self.window:g} s (isolation.max_helper_restarts is "
                    f"{self.max_restarts}); last status {code}"
                },
            )
            return False
        print(f"keeper: the TLS helper died (status {code}); restarting it", file=sys.stderr)
        try:
            self.start_helper()
        except (HelperStartError, OSError) as error:
            _send(self.main, {"fatal": f"the TLS helper could not be restarted: {error}"})
            return False
        return True

    def run(self) -> int:
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        selector = selectors.DefaultSelector()
        selector.register(self.main, selectors.EVENT_READ)
        selector.register(wake_read, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is self.main:
                    message = self.main.recv(MAX_MESSAGE)
                    if not message:
                        return self._finish()
                    request = json.loads(message)
                    if "reload" in request:
                        self.reload(json.dumps(request["reload"]).encode())
                    continue
                while True:
                    try:
                        os.read(wake_read, 512)
                    except BlockingIOError:
                        break
                for pid, code in _reap():
                    if not self.on_child_exit(pid, code):
                        return 3

    def _finish(self) -> int:
        if self.helper is not None:
            try:
                self.helper.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.helper.kill()
        return 0


def _reap() -> list[tuple[int, int]]:
    exits: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return exits
        if pid == 0:
            return exits
        exits.append(
            (pid, -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
        )


def serve(main: socket.socket) -> int:
    # Ctrl-C reaches the whole process group; the main process decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("keeper: cannot become a child subreaper", file=sys.stderr)
    keeper = Keeper(main, main.recv(MAX_MESSAGE))
    try:
        keeper.start_helper()
    except HelperStartError as error:
        _send(main, {"problems": error.problems})
        return 1
    return keeper.run()


if __name__ == "__main__":
    sys.exit(serve(socket.socket(fileno=int(sys.argv[1]))))
