"""The compiled allow-lists themselves (``sandbox.seccomp``), loaded into a
forked child: what they let through and what kills.

The in-worker checks (``test_sandbox_layers``) show the workers' filter at
work from inside real workers; these pin down one rule with arguments,
which those checks cannot reach: memory may be mapped, never executable.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal

import pytest

from starttls_proxy.sandbox.layers import LIBC
from starttls_proxy.sandbox.seccomp import (
    KEY_SERVER_ALLOWED,
    WORKER_ALLOWED,
    compile_filter,
    load_filter,
)

MAP_FAILED = ctypes.c_void_p(-1).value


def _status_of_mapping(allowed: tuple[str, ...], prot: int) -> int:
    """The wait status of a child that loads the filter of ``allowed``, maps
    a page with ``prot`` and exits 0 (or 1 if the mapping failed)."""
    program = compile_filter(allowed)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            load_filter(program, LIBC)
            mapped = libc.mmap(None, mmap.PAGESIZE, prot, flags, -1, 0)
            os._exit(0 if mapped not in (None, MAP_FAILED) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize(
    "allowed", [WORKER_ALLOWED, KEY_SERVER_ALLOWED], ids=["worker", "key-server"]
)
def test_memory_is_mapped_read_write(allowed: tuple[str, ...]) -> None:
    status = _status_of_mapping(allowed, mmap.PROT_READ | mmap.PROT_WRITE)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize(
    "allowed", [WORKER_ALLOWED, KEY_SERVER_ALLOWED], ids=["worker", "key-server"]
)
@pytest.mark.parametrize(
    "prot",
    [mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC, mmap.PROT_READ | mmap.PROT_EXEC],
    ids=["rwx", "rx"],
)
def test_executable_memory_kills(allowed: tuple[str, ...], prot: int) -> None:
    # Code an attacker writes into a confined process's memory stays data.
    status = _status_of_mapping(allowed, prot)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
