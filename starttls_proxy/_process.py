"""Starting the proxy's other processes, each with a control socket.

The keeper, the key server and the TLS helper are exec'd fresh (never
forked from a process that runs an event loop or holds keys), each with one
end of a SOCK_SEQPACKET pair whose number is its last argument; the other
end is how its parent talks to it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator, Sequence

#: How long a started process may take to say it is ready (the helper
#: prepares the sandbox and loads the certificates).
STARTUP_TIMEOUT = 30.0
#: How long one may take to leave once its control socket is closed.
EXIT_TIMEOUT = 10.0


def start_process(
    argv_prefix: Sequence[str], env: dict[str, str] | None = None, *, user: int | None = None
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Exec ``ARGV_PREFIX... FD`` with one end of a new SOCK_SEQPACKET pair
    as FD; return the process and the other end.

    ``user``: run it with this UID, as GID too and with no other groups
    (tests run the helper unprivileged that way); None: as this process.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        process = subprocess.Popen(
            [*argv_prefix, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
            user=user,
            group=user,
            extra_groups=None if user is None else [],
        )
    return process, ours


@contextlib.contextmanager
def memfd(data: bytes) -> Iterator[int]:
    """A memfd holding ``data``, read from its start; closed on leaving."""
    fd = os.memfd_create("stp-description", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)
