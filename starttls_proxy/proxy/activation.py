"""systemd socket activation: listening sockets passed by the service manager.

With a ``.socket`` unit (``deploy/systemd/starttls-proxy.socket``) systemd
binds the listeners' ports itself, starts the proxy on the first connection
and hands the sockets over (``sd_listen_fds(3)``: ``LISTEN_PID`` names this
process, ``LISTEN_FDS`` counts the descriptors from 3 on). A listener whose
``listen`` address matches a passed socket serves on it; the others bind
their own as usual. A passed socket that matches no listener stops the
start: connections to it would wait for an answer that never comes.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import MutableMapping

from starttls_proxy.config import SocketAddress

#: The first passed descriptor (``SD_LISTEN_FDS_START``).
FIRST_FD = 3
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


Endpoint = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def _endpoint(address: tuple[object, ...]) -> Endpoint:
    """An IP socket address, comparable whatever its family and text form."""
    host, port = str(address[0]), int(str(address[1]))
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


def _describe(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except (OSError, ValueError):
        return f"descriptor {sock.fileno()}"
    return str(SocketAddress(host=host, port=port))


class PassedSockets:
    """The listening sockets the service manager passed, until listeners take them."""

    def __init__(self, sockets: list[socket.socket], problems: list[str] | None = None) -> None:
        self.sockets = sockets
        #: Passed descriptors that are no sockets.
        self.problems = problems or []

    @classmethod
    def take_from_environment(
        cls, environ: MutableMapping[str, str] | None = None, first_fd: int = FIRST_FD
    ) -> PassedSockets:
        """The sockets passed to this process; the variables are removed, so
        that no process started from here takes them for its own."""
        environ = os.environ if environ is None else environ
        pid, count = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS", "")
        for name in VARIABLES:
            environ.pop(name, None)
        if pid != str(os.getpid()) or not count.isdigit():
            return cls([])
        sockets, problems = [], []
        for fd in range(first_fd, first_fd + int(count)):
            try:
                os.set_inheritable(fd, False)
                sockets.append(socket.socket(fileno=fd))
            except OSError as error:
                problems.append(f"the service manager passed descriptor {fd}: {error.strerror}")
        return cls(sockets, problems)

    def take(self, address: SocketAddress) -> socket.socket | None:
        """The passed TCP socket listening on ``address``, or None."""
        try:
            wanted = {
                _endpoint(info[4])
                for info in socket.getaddrinfo(
                    address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            }
        except (OSError, ValueError):
            return None
        for sock in self.sockets:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                bound = _endpoint(sock.getsockname())
            except OSError:
                continue
            if bound in wanted and sock.type == socket.SOCK_STREAM:
                self.sockets.remove(sock)
                return sock
        return None

    def leftover_problems(self) -> list[str]:
        """One line per passed descriptor no listener took."""
        return self.problems + [
            f"the service manager passed a socket on {_describe(sock)} that matches no "
            "listener's listen address"
            for sock in self.sockets
        ]
