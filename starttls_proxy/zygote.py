"""The TLS helper process: holds the TLS contexts and forks one sandboxed
worker per connection.

Workers are forked ahead of time (``isolation.spare_workers``): a spare
enters the outer layers and waits for an ``Assignment`` (``wire``) on a
socket of its own; a connection goes to the oldest spare, or to one forked
for it when none waits. Replacements are forked only when no request is
pending, so an upgrade never waits behind a fork it does not need.

The keeper (``keeper``) starts it as a fresh interpreter (``python -m
starttls_proxy.zygote FD``), as root when the proxy was started as root, so
the helper never inherits the main process's memory and no fork ever
happens inside a running event loop. It first prepares the sandbox
(``sandbox.Sandbox.prepare``: chroot directory, seccomp filter, a probe
worker; all before any private key is read, so the probe never has one in
memory), then loads the certificates, freezes the garbage collector (so
that forked workers keep sharing the pages copy-on-write), and serves
requests on a SOCK_SEQPACKET control socket whose other end the keeper has
passed to the main process.

The helper stays privileged: entering namespaces, chroot and a fresh UID per
worker all need root. It talks only to the main process (which cannot make
it parse anything but the JSON below) and never to a client.

With ``isolation.key_server`` the helper reads no private key: the keeper
passes it the key server's references for the keys (``provider``) and a
link to the key server, through which it gives each worker a connection of
its own, good for the certificates that worker may serve (``keyserver``).

Wire format: one JSON object per datagram.

* keeper -> helper, first: ``{"tls": <TLSConfig>, "isolation": <IsolationConfig>}``,
  with the key server: also ``"key_references": [PEM, ...]`` and the link
  attached (SCM_RIGHTS)
* helper -> keeper: ``{"ready": true, "layers": [[name, applied, detail], ...]}``
  or ``{"problems": ["tls.certificates[0].key: ...", ...]}``
* main -> helper: a ``SpawnRequest`` (see ``wire``) with two descriptors
  attached (SCM_RIGHTS): the client socket and the worker's end of the
  plaintext channel.
* helper -> spare worker: an ``Assignment`` with the client socket, the
  channel and, with the key server, the worker's connection to it.
* helper -> main: ``{"spawned": ID, "pid": PID}`` and later
  ``{"exited": PID, "status": CODE}`` (a negative code is the killing signal).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

from starttls_proxy import procname
from starttls_proxy.keyserver import Link
from starttls_proxy.provider import Attachment
from starttls_proxy.sandbox import Layer, Sandbox
from starttls_proxy.settings import ConfigError, IsolationConfig, TLSConfig, decode
from starttls_proxy.tls_contexts import CertificateStore, load_certificates
from starttls_proxy.wire import MAX_SPAWN_REQUEST, Assignment, SpawnRequest
from starttls_proxy.worker import serve_spare

MAX_MESSAGE = 64 * 1024
#: Seconds between handing out a spare and forking its replacement (see
#: ``Helper.top_up_timeout``): longer than a handshake takes here (4-9 ms).
TOP_UP_DELAY = 0.01


def _send(control: socket.socket, message: dict[str, object]) -> None:
    # The main process may be gone (shutdown, or a reload retired this
    # helper) while workers still exit: nobody is left to tell.
    with contextlib.suppress(OSError):
        control.send(json.dumps(message).encode())


def _sent(sock: socket.socket, message: bytes, fds: list[int]) -> bool:
    """Whether ``message`` went (False: the spare at the other end is gone)."""
    try:
        socket.send_fds(sock, [message], fds)
    except OSError:
        return False
    return True


def _real_uid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


class UidPool:
    """The UIDs of ``isolation.uid_range``: one per live worker, never two.

    A UID is free again once its worker has been reaped: the worker was PID
    1 of its namespace, so nothing it could have started is left. Workers of
    an earlier helper (which died) are not this helper's children; their
    UIDs, found in /proc at start, stay taken until that process is gone.
    """

    def __init__(self, first: int, count: int) -> None:
        self.uids = range(first, first + count)
        self._cursor = 0
        self._taken: set[int] = set()
        self._by_pid: dict[int, int] = {}
        #: uid -> pid of a process from before this helper.
        self._inherited: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                uid = _real_uid(int(entry.name))
                if uid is not None and uid in self.uids:
                    self._inherited[uid] = int(entry.name)

    def take(self) -> int | None:
        """A free UID, round robin (so a UID is reused as late as possible)."""
        for _ in range(len(self.uids)):
            uid = self.uids[self._cursor]
            self._cursor = (self._cursor + 1) % len(self.uids)
            if uid in self._taken:
                continue
            holder = self._inherited.pop(uid, None)
            if holder is not None and _real_uid(holder) == uid:
                self._inherited[uid] = holder
                continue
            self._taken.add(uid)
            return uid
        return None

    def bind(self, uid: int, pid: int) -> None:
        self._by_pid[pid] = uid

    def give_back(self, uid: int) -> None:
        self._taken.discard(uid)

    def release(self, pid: int) -> None:
        uid = self._by_pid.pop(pid, None)
        if uid is not None:
            self._taken.discard(uid)


@dataclasses.dataclass
class Spare:
    """A forked worker waiting (enclosed, see ``worker.serve_spare``) for a connection."""

    pid: int
    #: The helper's end of its assignment socket.
    assignment: socket.socket


class Helper:
    def __init__(
        self,
        control: socket.socket,
        store: CertificateStore,
        sandbox: Sandbox,
        pool: UidPool,
        key_server: Link | None = None,
    ) -> None:
        self.control = control
        self.store = store
        self.sandbox = sandbox
        self.pool = pool
        self.key_server = key_server
        # Looked up now: a worker cannot load anything once sandboxed.
        self.attach = Attachment() if key_server is not None else None
        self.identity = Layer.IDENTITY in sandbox.layers
        #: Every live child, spares included.
        self.workers: set[int] = set()
        self.spares: collections.deque[Spare] = collections.deque()
        #: A spare died before it was given a connection (see ``reap``).
        self.spares_failing = False
        #: When the replacement of the spare last handed out may be forked.
        self.top_up_at = 0.0

    def fork_spare(self) -> Spare | None:
        """A new spare worker, or None when every UID is taken."""
        uid = self.pool.take() if self.identity else None
        if self.identity and uid is None:
            print("TLS helper: no free UID in isolation.uid_range", file=sys.stderr, flush=True)
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = self.sandbox.fork()
        except OSError:
            if uid is not None:
                self.pool.give_back(uid)
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # GROUP_STOP_SIGNALS stay ignored, as in the helper: a worker
            # ends when the main process closes its channel, after the drain.
            procname.name_process(procname.SPARE)
            serve_spare(theirs.fileno(), self.store, self.sandbox, uid, self.attach)
        theirs.close()
        self.workers.add(pid)
        if uid is not None:
            self.pool.bind(uid, pid)
        return Spare(pid, ours)

    @property
    def spares_short(self) -> bool:
        """Fewer than ``isolation.spare_workers`` wait (and none just failed)."""
        return len(self.spares) < self.sandbox.config.spare_workers and not self.spares_failing

    def top_up_timeout(self) -> float | None:
        """How long the serving loop may wait for messages before ``top_up``.

        A fork and the new spare's sandbox set-up take ~3 ms of CPU, which
        would compete with the handshake just assigned (and on a small
        machine with the key server it waits for: traced, the key server
        waited 1.9 ms behind a top-up): the replacement waits until
        ``TOP_UP_DELAY`` after that assignment, unless no spare is left
        (the next connection would wait for a fork)."""
        if not self.spares_short:
            return None
        if not self.spares:
            return 0.0
        return max(0.0, self.top_up_at - time.monotonic())

    def handed_out(self) -> None:
        """A spare got a connection: its replacement is due in ``TOP_UP_DELAY``
        (unless one is due already: later assignments do not push it)."""
        now = time.monotonic()
        if self.top_up_at <= now:
            self.top_up_at = now + TOP_UP_DELAY

    def top_up(self) -> None:
        """Fork one spare if ``spares_short``."""
        if self.spares_short:
            spare = self.fork_spare()
            if spare is not None:
                self.spares.append(spare)

    def assign(self, request: SpawnRequest, fds: list[int]) -> int | None:
        """Give the connection in ``fds`` (client, channel) to a spare (forked
        now if none waits); return the worker's PID, None if there is none."""
        self.spares_failing = False
        try:
            while True:
                spare = self.spares.popleft() if self.spares else self.fork_spare()
                if spare is None:
                    return None
                with spare.assignment:
                    if self._send_assignment(spare, request, fds):
                        self.handed_out()
                        return spare.pid
        finally:
            for fd in fds:
                os.close(fd)

    def _send_assignment(self, spare: Spare, request: SpawnRequest, fds: list[int]) -> bool:
        """False when the spare is gone (killed while it waited)."""
        siblings = tuple(self.workers - {spare.pid}) if self.sandbox.config.self_test else ()
        message = Assignment(request, siblings).encode()
        if self.key_server is None:
            return _sent(spare.assignment, message, fds)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            sent = _sent(spare.assignment, message, [*fds, theirs.fileno()])
        if not sent:
            ours.close()
            return False
        # Only now: the worker starts on its ClientHello meanwhile (granting
        # first was 0.2 ms of every handshake's wait, traced); should the
        # worker ask for its signature first, the request waits in the socket.
        context = self.store.context_for(request.server_name_hint)
        self.key_server.grant(ours, self.store.reachable_from(context))
        return True

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.pool.release(pid)
            self.workers.discard(pid)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            waiting = [spare for spare in self.spares if spare.pid == pid]
            for spare in waiting:
                self.spares.remove(spare)
                spare.assignment.close()
                # A spare that could not enter its sandbox is reported, and no
                # other is forked ahead until the next connection: a layer
                # that fails must not turn into a fork loop.
                self.spares_failing = True
            _send(self.control, {"exited": pid, "status": code})

    def serve_forever(self) -> int:
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        gc.freeze()
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ)
        selector.register(wake_read, selectors.EVENT_READ)
        while True:
            # Spares are forked only when nothing else is waiting: a request
            # never queues behind one.
            events = selector.select(self.top_up_timeout())
            if not events:
                self.top_up()
            for key, _ in events:
                if key.fileobj == wake_read:
                    while True:
                        try:
                            os.read(wake_read, 512)
                        except BlockingIOError:
                            break
                    self.reap()
                    continue
                try:
                    message, fds, _, _ = socket.recv_fds(self.control, MAX_SPAWN_REQUEST, 2)
                except InterruptedError:
                    continue
                if not message:
                    return 0
                request = SpawnRequest.decode(message)
                if len(fds) != 2:
                    for fd in fds:
                        os.close(fd)
                    continue
                pid = self.assign(request, fds)
                if pid is not None:
                    _send(self.control, {"spawned": request.id, "pid": pid})


def serve(control: socket.socket) -> int:
    """Prepare the sandbox, load the certificates, then fork workers until
    the main process leaves."""
    procname.name_subordinate(procname.HELPER)
    message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 1)
    first = json.loads(message)
    isolation = decode(IsolationConfig, first["isolation"])
    references = first.get("key_references")
    link = Link(socket.socket(fileno=fds[0])) if references is not None and fds else None
    first_uid, count = isolation.uid_range
    # The key server has the last UID of the range.
    pool = UidPool(first_uid, count - 1 if isolation.key_server else count)
    probe_uid = pool.take()
    sandbox, statuses = Sandbox.prepare(isolation, probe_uid or 0)
    if probe_uid is not None:
        pool.give_back(probe_uid)
    problems = sandbox.problems(statuses)
    try:
        if problems:
            raise ConfigError(problems)
        if references is not None and link is None:
            raise ConfigError(["the keeper sent key references without a key server link"])
        store = load_certificates(
            decode(TLSConfig, first["tls"]),
            [reference.encode() for reference in references] if references is not None else None,
        )
    except ConfigError as error:
        _send(control, {"problems": error.problems})
        return 1
    _send(control, {"ready": True, "layers": [dataclasses.astuple(s) for s in statuses]})
    store.warm_up()
    return Helper(control, store, sandbox, pool, link).serve_forever()


if __name__ == "__main__":
    sys.exit(serve(socket.socket(fileno=int(sys.argv[1]))))
