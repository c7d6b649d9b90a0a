"""The seccomp-bpf allow-lists of the TLS workers and of the key server.

Each filter is compiled with libseccomp (through ``pyseccomp``, which binds
the system's ``libseccomp.so.2`` with ctypes) before anything is confined by
it: the workers' by the keeper, once per TLS helper it starts, which hands
the finished BPF program to the helper in its description
(``tls.description``); the key server's by the key server itself, before it
holds a key. A confined process only hands its program to the kernel, so
libseccomp's compiler never runs in a worker and costs nothing per
connection.

What a worker does once sandboxed is small and known: the handshake and the
pump over its two sockets (``tls/helper/worker.c``), reading and writing,
waiting in poll, cancelling the handshake deadline, memory for OpenSSL,
fresh randomness for OpenSSL's DRBG, and exiting. ``WORKER_ALLOWED`` is the
list of what the C worker calls after its filter is loaded (``strace -f``
of real workers: SMTP and IMAP, TLS 1.2 and 1.3, megabytes each way), plus
the other spellings of the same calls on other architectures (ppoll where
there is no poll) and the C library's own (futex, gettid, rt_sigreturn).
It never calls ioctl, so the workers' filter has no ioctl rule at all;
the key server's allows FIONBIO, which Python's ``socket.setblocking``
uses.

Anything else kills the whole process (``SECCOMP_RET_KILL_PROCESS``; the
helper sees a worker end by SIGSYS and the main process counts it as
``seccomp``), except a few calls that library code makes on error paths,
which fail with EPERM instead: Python's traceback printer (the key server)
opens and stats source files, and ``abort()`` signals itself. Calls an
attacker would want first (socket, connect, fork/clone, execve, kill,
ptrace, open) are in that EPERM set too rather than killing at once: they
fail either way, and the test-only self check can then show each of them
failing from inside a real worker.
"""

from __future__ import annotations

import ctypes
import errno
import tempfile

#: What every confined process of the proxy needs.
_COMMON = (
    # Its sockets (and stderr, for last words).
    "read",
    "write",
    "recvfrom",
    "sendto",
    "close",
    "restart_syscall",
    "clock_gettime",
    "gettimeofday",
    "rt_sigreturn",
    "rt_sigprocmask",
    # Memory, bounded by RLIMIT_AS. mmap only without PROT_EXEC
    # (compile_filter) and no mprotect: no page is ever made executable, so
    # code an attacker writes into a worker's memory cannot be run.
    "brk",
    "munmap",
    "mremap",
    "madvise",
    # OpenSSL: fresh randomness for its DRBG, its fork check (getpid).
    "getrandom",
    "getpid",
    # The C library (single-threaded: locks are never contended).
    "futex",
    "gettid",
    "exit",
    "exit_group",
)

#: What the C worker calls once confined (see the module docstring).
WORKER_ALLOWED = (
    *_COMMON,
    "shutdown",
    # Waiting (poll is ppoll on arm64).
    "poll",
    "ppoll",
    # Cancelling the handshake deadline. Its handler cannot be changed:
    # rt_sigaction is not allowed.
    "setitimer",
    # The sanitizers' runtime (scripts/test-sanitized.sh) asks for it at
    # exit; it concerns the caller's own signal delivery only.
    "sigaltstack",
)

#: The key server (``keys.server``) once confined: since it waits in epoll,
#: neither poll nor the deadline; descriptors arriving with SCM_RIGHTS (the
#: workers' connections; the key files the keeper opened, read with pread).
KEY_SERVER_ALLOWED = (
    *_COMMON,
    "getsockopt",
    # Python's socket(fileno=...) asks for the family.
    "getsockname",
    "getpeername",
    "pread64",
    "recvmsg",
    "sendmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
)

#: Calls that fail with EPERM instead of killing (see the module docstring).
REFUSED = (
    "open",
    "openat",
    "openat2",
    "stat",
    "lstat",
    "fstat",
    "newfstatat",
    "statx",
    "readlink",
    "readlinkat",
    "getcwd",
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "fork",
    "vfork",
    "clone",
    "clone3",
    "execve",
    "execveat",
    "kill",
    "tkill",
    "tgkill",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
)

#: ``mmap``'s ``prot`` argument (its third) may not hold this.
PROT_EXEC = 0x4

#: ``ioctl`` only for FIONBIO (``compile_filter(fionbio=True)``), which
#: Python's ``socket.setblocking`` uses; never TIOCSTI and friends on an
#: inherited terminal.
FIONBIO = 0x5421

PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
#: libseccomp's answer for a name it does not know.
NR_SCMP_ERROR = -1
SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def compile_filter(allowed: tuple[str, ...], *, fionbio: bool = False) -> bytes:
    """The BPF program allowing ``allowed``, mmap without PROT_EXEC (and,
    with ``fionbio``, ioctl FIONBIO) for this machine's architecture (raw
    ``sock_filter``s).

    Raises ``ImportError`` or ``OSError`` when libseccomp is not usable.
    """
    import pyseccomp  # type: ignore[import-untyped]

    native = pyseccomp.system_arch()
    selected = pyseccomp.SyscallFilter(pyseccomp.KILL_PROCESS)
    # A binary tree of syscall numbers, not a linear chain: the kernel walks
    # the program for every syscall number when it loads it (its
    # constant-action cache), ~40 us less per process.
    selected.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    for action, names in ((pyseccomp.ALLOW, allowed), (pyseccomp.ERRNO(errno.EPERM), REFUSED)):
        for name in names:
            if pyseccomp.resolve_syscall(native, name) == NR_SCMP_ERROR:
                continue  # unknown to this libseccomp
            selected.add_rule(action, name)
    selected.add_rule(pyseccomp.ALLOW, "mmap", pyseccomp.Arg(2, pyseccomp.MASKED_EQ, PROT_EXEC, 0))
    if fionbio:
        selected.add_rule(pyseccomp.ALLOW, "ioctl", pyseccomp.Arg(1, pyseccomp.EQ, FIONBIO))
    with tempfile.TemporaryFile() as out:
        selected.export_bpf(out)
        out.seek(0)
        program: bytes = out.read()
    return program


def load_filter(program: bytes, libc: ctypes.CDLL) -> None:
    """Set no_new_privs (the kernel's condition for an unprivileged filter), install ``program``."""
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"seccomp: {errno.errorcode.get(code, code)}")
