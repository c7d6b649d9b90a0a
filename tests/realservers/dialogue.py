"""Reading replies off raw sockets, for tests that speak a protocol by hand."""

from __future__ import annotations

import socket
import ssl


def read_smtp_reply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """Bytes up to the end of the next complete SMTP reply (or EOF)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return data


def read_until(sock: socket.socket | ssl.SSLSocket, ending: bytes) -> bytes:
    """Bytes up to and including ``ending`` (or up to EOF)."""
    data = b""
    while not data.endswith(ending):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
