"""The TLS workers' sandbox, layer by layer.

Threat model: a bug in the TLS stack (a Heartbleed-class disclosure, or code
execution) in one worker must expose at most the attacker's own connection.
Every worker is a fresh fork of the TLS helper (``zygote``) that serves one
connection and exits. Forked ahead of time as a spare, it enters layers 1-7
(``Sandbox.enclose``) while it waits for a connection; with the
connection's descriptors it sets RLIMIT_NOFILE and loads the seccomp filter
(``Sandbox.confine``), before it reads a byte from the client. In order:

1. **clean slate** (always): the helper was exec'd fresh and holds only the
   TLS contexts; the worker closes every descriptor but stdin/out/err and
   its assignment socket, then, once the connection came through it, all
   but the client socket and its plaintext channel (renumbered 3 and 4);
2. **pid_namespace**: the helper forks it as PID 1 of a PID namespace of its
   own, so nothing it could spawn outlives it, and a UID is free again the
   moment the worker is reaped (the "dynamic UIDs" titus never got);
3. **namespaces**: empty network, IPC and UTS namespaces (no interface, not
   even loopback: the two sockets it holds keep working, nothing new can
   connect anywhere). The helper makes one set at start and every worker
   joins it: a new network namespace per connection cost more CPU than the
   TLS handshake (its teardown is slow kernel work), and what a private one
   would add is kept by the other layers: a worker cannot make a socket
   (seccomp, RLIMIT_NOFILE), so it cannot reach another worker's abstract
   sockets either, and a UID of its own keeps it from the others' SysV IPC;
4. **chroot** into an empty directory nobody can write, cwd ``/``;
5. **identity**: no supplementary groups, then a UID and GID of its own from
   ``isolation.uid_range`` (the helper never hands one UID to two live
   workers), so workers cannot signal or trace one another;
6. **hardening**: not dumpable, no_new_privs, RLIMIT_CORE 0, RLIMIT_NPROC 0,
   and, with the connection, RLIMIT_NOFILE exactly the descriptors it holds
   (none can be opened);
7. **memory_limit**: RLIMIT_AS at what it inherited plus
   ``isolation.memory_limit``;
8. **seccomp**: the allow-list of ``seccomp_policy``.

The handshake deadline is armed by the worker before all this: SIGALRM's
handler is the C library's ``_exit`` itself. A Python handler could be
starved by a long C call, and the default action would not work at all: a
PID namespace's init ignores every signal it has no handler for, the
kernel's own SIGALRM included (``EXIT_DEADLINE``).

Without root (best-effort mode) the helper first enters a user namespace of
its own: network/IPC/UTS namespaces, chroot (into a deleted directory, in
which nothing can be created), hardening and seccomp still apply; per-worker
UIDs and the PID namespace need root.

``Sandbox.prepare`` finds out which layers work here for real: it forks a
throwaway child that enters them exactly as a worker does and reports each
failure. That report is the startup log, the ``--isolation-report`` table,
and, in strict mode, the reason to refuse to start.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import json
import os
import pwd
import resource
import signal
import socket
import stat
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from starttls_proxy import seccomp_policy
from starttls_proxy.settings import IsolationConfig, IsolationMode

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
LIBC.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
LIBC.signal.restype = ctypes.c_void_p

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
#: The namespaces all workers share, by their name in /proc/PID/ns.
NAMESPACE_KINDS = {"net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

#: Exit status of a worker that could not enter a layer it was meant to.
EXIT_SANDBOX_FAILED = 16
#: Exit status of a worker past its handshake deadline (``_exit(SIGALRM)``).
EXIT_DEADLINE = int(signal.SIGALRM)
#: Descriptors every worker keeps: stdin, stdout, stderr (the proxy's log).
STANDARD_FDS = 3


class Layer(enum.Enum):
    """The switchable layers, in the order a worker enters them."""

    PID_NAMESPACE = "pid_namespace"
    NAMESPACES = "namespaces"
    CHROOT = "chroot"
    IDENTITY = "identity"
    HARDENING = "hardening"
    MEMORY_LIMIT = "memory_limit"
    SECCOMP = "seccomp"


DESCRIPTIONS = {
    Layer.PID_NAMESPACE: "PID namespace of its own (worker is PID 1)",
    Layer.NAMESPACES: "empty network, IPC and UTS namespaces (shared by the workers)",
    Layer.CHROOT: "chroot into an empty unwritable directory",
    Layer.IDENTITY: "UID/GID of its own, no groups",
    Layer.HARDENING: "no dumps, no_new_privs, no fork, no new descriptors",
    Layer.MEMORY_LIMIT: "address space limit",
    Layer.SECCOMP: "seccomp-bpf allow-list",
}


@dataclass(frozen=True)
class LayerStatus:
    name: str
    applied: bool
    detail: str


def check(result: int, what: str) -> int:
    """Raise the C library's errno as an ``OSError`` when ``result`` is -1."""
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def prctl(option: int, value: int) -> None:
    check(LIBC.prctl(option, value, 0, 0, 0), f"prctl({option})")


def arm_deadline(seconds: float) -> None:
    """Exit with ``EXIT_DEADLINE`` after ``seconds`` (see the module docstring)."""
    exit_function = ctypes.cast(LIBC._exit, ctypes.c_void_p).value
    LIBC.signal(signal.SIGALRM, exit_function)
    signal.alarm(max(1, round(seconds)))


def drop_privileges(user: str) -> None:
    """Become ``user`` for good (the main process, once its sockets are bound)."""
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)


def keep_only(keep: list[int]) -> list[int]:
    """Close every descriptor but stdio and ``keep``, renumbered from 3 up."""
    renumbered: list[int] = []
    # Move the kept ones above everything first, so that dup2 below never
    # overwrites one still to be moved.
    parked = [os.dup(fd) for fd in keep]
    for fd in parked:
        target = STANDARD_FDS + len(renumbered)
        if fd == target:  # dup3() refuses to copy a descriptor onto itself
            os.set_inheritable(fd, False)
        else:
            os.dup2(fd, target, inheritable=False)
        renumbered.append(target)
    os.closerange(STANDARD_FDS + len(renumbered), os.sysconf("SC_OPEN_MAX"))
    return renumbered


def _address_space() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _enter_user_namespace() -> None:
    """Without root: become root of a user namespace of our own (maps only us)."""
    uid, gid = os.geteuid(), os.getegid()
    check(LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(user, mount)")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def prepare_root_directory(path: Path) -> None:
    """Create ``path`` root-owned 0555 if needed; refuse one that is not empty."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o555)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, f"{path} is not a directory")
    if any(path.iterdir()):
        raise OSError(errno.ENOTEMPTY, f"{path} is not empty")
    if (info.st_uid, info.st_gid) != (0, 0):
        os.chown(path, 0, 0)
    if stat.S_IMODE(info.st_mode) != 0o555:
        os.chmod(path, 0o555)


def _deleted_directory() -> int:
    """A descriptor of an empty directory that no longer has a name."""
    path = tempfile.mkdtemp(prefix="starttls-proxy-root-")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    os.rmdir(path)
    return fd


class Sandbox:
    """What the helper knows to put each worker in (see the module docstring)."""

    def __init__(self, config: IsolationConfig) -> None:
        self.config = config
        self.layers = frozenset(layer for layer in Layer if getattr(config.layers, layer.value))
        self.seccomp_program = b""
        #: Without root: the deleted directory every worker chroots into.
        self.root_fd: int | None = None
        #: The helper's own PID namespace, to return to after each fork.
        self.own_pid_namespace: int | None = None
        #: The empty network, IPC and UTS namespaces every worker joins.
        self.shared_namespaces: list[int] = []

    @classmethod
    def prepare(cls, config: IsolationConfig, probe_uid: int) -> tuple[Sandbox, list[LayerStatus]]:
        """Set up what the layers need and probe them; keep those that work."""
        sandbox = cls(config)
        missing = sandbox._set_up()
        sandbox.layers -= missing.keys()
        try:
            probed = sandbox._probe(probe_uid)
        except OSError as error:  # unshare(CLONE_NEWPID) refused, e.g. in a container
            missing[Layer.PID_NAMESPACE] = str(error)
            sandbox.layers -= {Layer.PID_NAMESPACE}
            probed = sandbox._probe(probe_uid)
        for layer, reason in probed.items():
            missing[layer] = f"failed in a probe worker: {reason}"
        sandbox.layers -= missing.keys()
        statuses = [
            LayerStatus(
                layer.value,
                layer in sandbox.layers,
                DESCRIPTIONS[layer]
                if layer in sandbox.layers
                else missing.get(layer, "off (isolation.layers)"),
            )
            for layer in Layer
        ]
        return sandbox, statuses

    def problems(self, statuses: list[LayerStatus]) -> list[str]:
        """In strict mode, one line per enabled layer that is not in force."""
        if self.config.mode is not IsolationMode.STRICT:
            return []
        return [
            f"isolation.layers.{status.name}: cannot be applied ({status.detail}); "
            "set isolation.mode: best-effort or turn the layer off"
            for status in statuses
            if not status.applied and getattr(self.config.layers, status.name)
        ]

    def _set_up(self) -> dict[Layer, str]:
        missing: dict[Layer, str] = {}
        if os.geteuid() != 0:
            for layer in (Layer.IDENTITY, Layer.PID_NAMESPACE):
                missing[layer] = "needs root"
            if self.layers & {Layer.NAMESPACES, Layer.CHROOT}:
                try:
                    _enter_user_namespace()
                    if Layer.CHROOT in self.layers:
                        self.root_fd = _deleted_directory()
                except OSError as error:
                    missing[Layer.NAMESPACES] = missing[Layer.CHROOT] = (
                        f"needs root or a user namespace ({error})"
                    )
        elif Layer.CHROOT in self.layers:
            try:
                prepare_root_directory(self.config.chroot)
            except OSError as error:
                missing[Layer.CHROOT] = f"isolation.chroot: {error.strerror or error}"
        if Layer.NAMESPACES in self.layers - missing.keys():
            try:
                self.shared_namespaces = _make_empty_namespaces()
            except OSError as error:
                missing[Layer.NAMESPACES] = str(error)
        if Layer.PID_NAMESPACE in self.layers - missing.keys():
            self.own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY)
        if Layer.SECCOMP in self.layers:
            try:
                self.seccomp_program = seccomp_policy.compile_filter()
            except (ImportError, RuntimeError, OSError) as error:
                missing[Layer.SECCOMP] = f"libseccomp not usable: {error}"
        return missing

    def fork(self) -> int:
        """``os.fork``, the child being PID 1 of a new PID namespace if planned."""
        if self.own_pid_namespace is None or Layer.PID_NAMESPACE not in self.layers:
            return os.fork()
        check(LIBC.unshare(CLONE_NEWPID), "unshare(pid)")
        try:
            pid = os.fork()
        except OSError:
            self._return_to_own_pid_namespace()
            raise
        if pid:
            self._return_to_own_pid_namespace()
        return pid

    def _return_to_own_pid_namespace(self) -> None:
        assert self.own_pid_namespace is not None
        check(LIBC.setns(self.own_pid_namespace, CLONE_NEWPID), "setns(pid)")

    def enter(
        self,
        uid: int | None,
        keep: list[int],
        failures: dict[Layer, str] | None = None,
        checkpoints: dict[Layer, Callable[[], None]] | None = None,
    ) -> list[int]:
        """Enter every planned layer (in the forked child); return ``keep`` renumbered.

        A layer that fails raises, unless ``failures`` collects the error.
        ``checkpoints`` run just before their layer, once (the self check's
        looks at the sandbox under construction).
        """
        return self.confine(self.enclose(uid, keep, failures, checkpoints), failures, checkpoints)

    def enclose(
        self,
        uid: int | None,
        keep: list[int],
        failures: dict[Layer, str] | None = None,
        checkpoints: dict[Layer, Callable[[], None]] | None = None,
    ) -> list[int]:
        """What a spare worker does before it has a connection: every layer
        but the descriptor limit and seccomp (the connection's descriptors
        are still to come, through a system call seccomp does not allow).
        Returns ``keep`` renumbered."""
        # Read while /proc is still in reach.
        memory_limit = _address_space() + self.config.memory_limit
        # Joined first: the descriptors of the namespaces are not kept.
        self._enter_layers([(Layer.NAMESPACES, self._join_namespaces)], failures)
        fds = keep_only([*keep, self.root_fd] if self.root_fd is not None else keep)
        root_fd = fds.pop() if self.root_fd is not None else None
        steps: list[tuple[Layer, Callable[[], None]]] = [
            (Layer.CHROOT, lambda: self._chroot(root_fd)),
            (Layer.IDENTITY, lambda: become(uid)),
            (Layer.HARDENING, harden),
            (Layer.MEMORY_LIMIT, lambda: _limit(resource.RLIMIT_AS, memory_limit)),
        ]
        self._enter_layers(steps, failures, checkpoints)
        return fds

    def _join_namespaces(self) -> None:
        for fd, kind in zip(self.shared_namespaces, NAMESPACE_KINDS.values(), strict=True):
            check(LIBC.setns(fd, kind), "setns(net, ipc, uts)")

    def confine(
        self,
        keep: list[int],
        failures: dict[Layer, str] | None = None,
        checkpoints: dict[Layer, Callable[[], None]] | None = None,
    ) -> list[int]:
        """The rest, once the connection's descriptors are in ``keep``: no
        descriptor beyond them, then seccomp. Returns ``keep`` renumbered."""
        fds = keep_only(keep)
        steps: list[tuple[Layer, Callable[[], None]]] = [
            (Layer.HARDENING, lambda: _limit(resource.RLIMIT_NOFILE, STANDARD_FDS + len(fds))),
            (Layer.SECCOMP, lambda: seccomp_policy.load_filter(self.seccomp_program, LIBC)),
        ]
        self._enter_layers(steps, failures, checkpoints)
        return fds

    def _enter_layers(
        self,
        steps: list[tuple[Layer, Callable[[], None]]],
        failures: dict[Layer, str] | None,
        checkpoints: dict[Layer, Callable[[], None]] | None = None,
    ) -> None:
        for layer, step in steps:
            if checkpoints and layer in checkpoints:
                checkpoints.pop(layer)()
            if layer not in self.layers:
                continue
            try:
                step()
            except Exception as error:
                if failures is None:
                    raise
                failures[layer] = str(error)

    def _chroot(self, root_fd: int | None) -> None:
        if root_fd is not None:
            os.fchdir(root_fd)
            os.chroot(".")
            os.close(root_fd)
        else:
            os.chroot(self.config.chroot)
        os.chdir("/")

    def _probe(self, uid: int) -> dict[Layer, str]:
        """Fork a throwaway worker that enters every layer; collect what failed."""
        read_end, write_end = os.pipe()
        pid = self.fork()
        if pid == 0:
            status = 1
            try:
                os.close(read_end)
                failures: dict[Layer, str] = {}
                (report,) = self.enter(uid, [write_end], failures)
                os.write(report, json.dumps({k.value: v for k, v in failures.items()}).encode())
                status = 0
            except BaseException:
                traceback.print_exc()  # the proxy's log says why the probe failed
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            answer = reader.read()
        _, wait_status = os.waitpid(pid, 0)
        if not answer:
            reason = f"the probe worker ended with status {wait_status:#x}"
            return dict.fromkeys(self.layers, reason)
        return {Layer(name): reason for name, reason in json.loads(answer).items()}


def unshare_namespaces() -> None:
    check(LIBC.unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare(net, ipc, uts)")


def _make_empty_namespaces() -> list[int]:
    """Descriptors of new network, IPC and UTS namespaces (``NAMESPACE_KINDS``
    order), made by a throwaway child so that the caller stays where it is."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            unshare_namespaces()
            fds = [os.open(f"/proc/self/ns/{name}", os.O_RDONLY) for name in NAMESPACE_KINDS]
            socket.send_fds(theirs, [b""], fds)
        except OSError as error:
            theirs.send(str(error).encode())
        finally:
            os._exit(0)
    theirs.close()
    with ours:
        message, fds, _, _ = socket.recv_fds(ours, 4096, len(NAMESPACE_KINDS))
    os.waitpid(pid, 0)
    if len(fds) != len(NAMESPACE_KINDS):
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EPERM, message.decode(errors="replace") or "no namespaces")
    return fds


def become(uid: int | None) -> None:
    if uid is None:
        raise OSError(errno.EINVAL, "no UID left in isolation.uid_range")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def harden() -> None:
    """Not dumpable, no_new_privs, no core, no fork. (RLIMIT_NOFILE comes
    later, with the connection: ``Sandbox.confine``; the key server keeps
    receiving descriptors.)"""
    # After the UID change: changing UIDs resets "dumpable" to the
    # fs.suid_dumpable sysctl, which may be 1.
    prctl(PR_SET_DUMPABLE, 0)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, 0)
