"""Reading replies off raw sockets, for tests that speak a protocol by hand."""

from __future__ import annotations

import socket
import ssl

from tests.realservers.certs import CertFiles


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


def smtp_greeted(sock: socket.socket) -> socket.socket:
    """``sock``, a new SMTP session, past the greeting and an EHLO."""
    assert read_smtp_reply(sock).startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    assert read_smtp_reply(sock).startswith(b"250-")
    return sock


def smtp_upgraded(sock: socket.socket, certs: CertFiles) -> ssl.SSLSocket:
    """``sock``, a new SMTP session, greeted, upgraded by STARTTLS to a TLS
    session that trusts ``certs`` and greeted again."""
    smtp_greeted(sock).sendall(b"STARTTLS\r\n")
    read_until(sock, b"Ready to start TLS\r\n")
    tls = certs.client_context().wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"EHLO client.test\r\n")
    assert read_smtp_reply(tls).startswith(b"250-")
    return tls
