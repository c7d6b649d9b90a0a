"""TEST ONLY (``isolation.self_test: true``): a real worker checks its sandbox
from inside and logs what it found.

The check runs in parts. ``checkpoints`` look at the process while it
enters the sandbox: its root and identity before RLIMIT_NOFILE leaves no
descriptor to list a directory with, its limits before the seccomp filter
refuses the calls that read them. ``after_sandbox`` then tries what an
attacker with code execution would try: open a file, make a socket,
connect, fork, signal and trace the other live workers (the helper passes
their PIDs), and reads ``/proc/self/status`` through a descriptor opened
before the chroot. The result is one stderr line (the proxy's log):
``starttls_proxy.selftest {json}``.

A client whose SNI is ``FORBIDDEN_SYSCALL_SNI`` makes its worker call a
system call outside the allow-list after the handshake; the filter must
kill it (the main process counts a ``seccomp`` exit).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import socket
import struct
import sys
from collections.abc import Callable

from starttls_proxy.sandbox import LIBC, Layer

LOG_PREFIX = "starttls_proxy.selftest "
FORBIDDEN_SYSCALL_SNI = "forbidden-syscall.self-test"
PR_GET_DUMPABLE = 3
PR_GET_NO_NEW_PRIVS = 39
PTRACE_ATTACH = 16
PTRACE_DETACH = 17


def _outcome(result: int) -> str:
    if result == -1:
        return errno.errorcode.get(ctypes.get_errno(), "E?")
    return "succeeded"


def _fork_once() -> None:
    if os.fork() == 0:
        os._exit(0)


#: What an attacker with code execution would try first.
ATTEMPTS: dict[str, Callable[[], None]] = {
    "open": lambda: os.close(os.open("/etc/passwd", os.O_RDONLY)),
    "socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close(),
    "fork": _fork_once,
}


def open_status() -> int:
    """Opened before the sandbox, read after it."""
    return os.open("/proc/self/status", os.O_RDONLY)


def checkpoints(report: dict[str, object]) -> dict[Layer, Callable[[], None]]:
    """Looks taken while the worker enters its sandbox (see ``Sandbox.enter``)."""
    return {Layer.HARDENING: lambda: _identity(report), Layer.SECCOMP: lambda: _limits(report)}


def _identity(report: dict[str, object]) -> None:
    # Before RLIMIT_NOFILE, which leaves no descriptor to list a directory with.
    root = os.stat("/")
    report["root_entries"] = os.listdir("/")
    report["root_inode"] = [root.st_dev, root.st_ino]
    report["uids"] = list(os.getresuid())
    report["gids"] = list(os.getresgid())
    report["groups"] = os.getgroups()
    report["pid"] = os.getpid()


def _limits(report: dict[str, object]) -> None:
    report["dumpable"] = LIBC.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    report["no_new_privs"] = LIBC.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
    report["rlimits"] = {
        name: resource.getrlimit(getattr(resource, f"RLIMIT_{name.upper()}"))[1]
        for name in ("core", "nproc", "nofile", "as")
    }


def after_sandbox(
    report: dict[str, object], status_fd: int, client_fd: int, siblings: tuple[int, ...]
) -> None:
    """Every forbidden action, then log ``report`` (see the module docstring)."""
    for action, attempt in ATTEMPTS.items():
        try:
            attempt()
            report[action] = "succeeded"
        except OSError as error:
            report[action] = errno.errorcode.get(error.errno or 0, str(error))
    address = struct.pack(
        "=H2s4s8x", socket.AF_INET, (25).to_bytes(2, "big"), bytes([127, 0, 0, 1])
    )
    report["connect"] = _outcome(LIBC.connect(client_fd, address, len(address)))
    report["kill"] = {pid: _outcome(LIBC.kill(pid, 0)) for pid in siblings}
    ptrace = {}
    for pid in siblings:
        ptrace[pid] = _outcome(LIBC.ptrace(PTRACE_ATTACH, pid, None, None))
        if ptrace[pid] == "succeeded":
            LIBC.ptrace(PTRACE_DETACH, pid, None, None)
    report["ptrace"] = ptrace
    status = os.read(status_fd, 65536).decode()
    report["status"] = {
        key: value.strip()
        for key, _, value in (line.partition(":") for line in status.splitlines())
        if key in ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "NSpid")
    }
    os.close(status_fd)
    print(LOG_PREFIX + json.dumps(report), file=sys.stderr, flush=True)


def forbidden_syscall() -> None:
    """uname(2) is not on the allow-list: the filter kills the process here."""
    os.uname()
