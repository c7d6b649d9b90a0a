"""Loopback networking helpers shared by the real-server fixtures."""

from __future__ import annotations

import socket
import time


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
