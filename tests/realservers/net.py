"""Loopback networking helpers shared by the real-server fixtures."""

from __future__ import annotations

import imaplib
import poplib
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Binds port 0, reads the port the kernel picked and closes the socket.  Another
    process may grab the port before the caller binds it; on loopback in a test run
    that race is rare enough to accept.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def accepts_connections(host: str, port: int, timeout: float = 1.0) -> bool:
    """Return whether a TCP connection to ``host:port`` succeeds (it is closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(host: str, ports: list[int], *, listening: bool, timeout: float) -> bool:
    """Poll until every port in ``ports`` accepts (or refuses) connections.

    Returns ``True`` once all ports are in the wanted state, ``False`` when ``timeout``
    seconds have passed first.  Each probe is bounded too, so this never hangs.
    """
    deadline = time.monotonic() + timeout
    while True:
        if all(accepts_connections(host, port, 0.5) == listening for port in ports):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


ClientT = TypeVar("ClientT", imaplib.IMAP4, poplib.POP3)


def sourced(client_class: type[ClientT], source: str) -> type[ClientT]:
    """``client_class`` (``imaplib.IMAP4`` or ``poplib.POP3``), connecting from
    the loopback address ``source`` instead of the kernel's choice."""

    def create_socket(client: ClientT, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (client.host, client.port), timeout, source_address=(source, 0)
        )

    name = f"{client_class.__name__}From{source}"
    subclass: type[ClientT] = type(name, (client_class,), {"_create_socket": create_socket})
    return subclass


def read_to_end(sock: socket.socket, *, ends: tuple[type[BaseException], ...] = ()) -> bytes:
    """Everything ``sock`` still receives until the peer's end of stream.

    ``ends``: errors that count as that end too (a reset, a TLS alert, the
    socket's timeout), for the tests where how a peer hangs up is not the point;
    any other error propagates.
    """
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ends:
        pass
    return bytes(data)


class Channel(Protocol):
    """A socket, or a TLS session over one (``ssl.SSLSocket``, ``MemoryTLS``)."""

    def sendall(self, data: bytes, /) -> Any: ...
    def recv(self, size: int, /) -> bytes: ...


def read_until(channel: Channel, done: Callable[[bytes], bool]) -> bytes:
    """What ``channel`` receives until ``done`` holds of all of it, or the peer's end."""
    data = b""
    while not done(data):
        chunk = channel.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
