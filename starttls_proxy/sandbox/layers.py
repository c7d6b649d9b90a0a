"""The sandbox layers, and the Python processes' part of them.

Threat model: a bug in the TLS stack (a Heartbleed-class disclosure, or code
execution) in one worker must expose at most the attacker's own connection.
Every worker is a fresh fork of the TLS helper that serves one connection
and exits. The workers' sandbox is C (``tls/helper/sandbox.c``): forked ahead
of time as a spare, a worker enters every layer but the last two while it
waits for a connection; with the connection's descriptors it sets
RLIMIT_NOFILE and loads the seccomp filter, before it reads a byte from the
client. In order:

1. **clean slate** (always): the helper is a small C program exec'd fresh
   that holds only the TLS contexts; the worker closes every descriptor but
   stdin/out/err and its assignment socket, then, once the connection came
   through it, all but the client socket and its plaintext channel;
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
8. **seccomp**: the allow-list of ``sandbox.seccomp``, compiled by the keeper
   and loaded as a finished BPF program.

The handshake deadline is armed by the worker before all this: SIGALRM's
handler exits at once. The default action would not work: a PID namespace's
init ignores every signal it has no handler for, the kernel's own SIGALRM
included (``wire.WorkerExit.DEADLINE``).

Without root (best-effort mode) the helper first enters a user namespace of
its own: network/IPC/UTS namespaces, chroot (into a deleted directory, in
which nothing can be created), hardening and seccomp still apply; per-worker
UIDs and the PID namespace need root.

The helper finds out which layers work here for real: it forks a throwaway
probe worker that enters them exactly as a worker does and reports each
failure. That report is the startup log, the ``--isolation-report`` table,
and, in strict mode, the reason to refuse to start (``problems``).

What stays in Python is what the Python processes apply to themselves: the
main process drops root (``privileges.drop_privileges``), the key server confines
itself with layers of the same kind (``keys.server.confine``), and the keeper
prepares the empty root directory both chroot into.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import stat
from collections.abc import Iterable
from pathlib import Path

from starttls_proxy import privileges
from starttls_proxy.settings import IsolationConfig, IsolationMode
from starttls_proxy.wire import LayerStatus

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38


def check(result: int, what: str) -> int:
    """Raise the C library's errno as an ``OSError`` when ``result`` is -1."""
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def prctl(option: int, value: int) -> None:
    check(LIBC.prctl(option, value, 0, 0, 0), f"prctl({option})")


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


def unshare_namespaces() -> None:
    check(LIBC.unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare(net, ipc, uts)")


def become(uid: int | None) -> None:
    if uid is None:
        raise OSError(errno.EINVAL, "no UID left in isolation.uid_range")
    privileges.become(uid, uid)


def _limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def harden() -> None:
    """Not dumpable, no_new_privs, no core, no fork (the key server: it keeps
    receiving descriptors, so no RLIMIT_NOFILE)."""
    # After the UID change: changing UIDs resets "dumpable" to the
    # fs.suid_dumpable sysctl, which may be 1.
    prctl(PR_SET_DUMPABLE, 0)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, 0)


def problems(config: IsolationConfig, statuses: Iterable[LayerStatus]) -> list[str]:
    """In strict mode, one line per enabled layer that is not in force."""
    if config.mode is not IsolationMode.STRICT:
        return []
    return [
        f"isolation.layers.{status.name}: cannot be applied ({status.detail}); "
        "set isolation.mode: best-effort or turn the layer off"
        for status in statuses
        if not status.applied and getattr(config.layers, status.name)
    ]
