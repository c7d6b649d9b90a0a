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


def smtp_starttls(
    sock: socket.socket, certs: CertFiles, *, ehlo: bool = False, pipelined: bytes = b""
) -> ssl.SSLSocket:
    """``sock``, a new SMTP session, past the greeting (and an EHLO if
    ``ehlo``), upgraded by STARTTLS (``pipelined`` sent behind it in the
    same segment) to a TLS session that trusts ``certs``."""
    if ehlo:
        smtp_greeted(sock)
    else:
        assert read_smtp_reply(sock).startswith(b"220 ")
    sock.sendall(b"STARTTLS\r\n" + pipelined)
    ready = read_until(sock, b"Ready to start TLS\r\n")
    assert ready.endswith(b"220 2.0.0 Ready to start TLS\r\n"), ready
    return certs.client_context().wrap_socket(sock, server_hostname="localhost")


def smtp_upgraded(sock: socket.socket, certs: CertFiles, *, ehlo: bool = True) -> ssl.SSLSocket:
    """``sock``, a new SMTP session, greeted (with an EHLO unless not
    ``ehlo``), upgraded by STARTTLS to a TLS session that trusts ``certs``
    and greeted again."""
    tls = smtp_starttls(sock, certs, ehlo=ehlo)
    tls.sendall(b"EHLO client.test\r\n")
    assert read_smtp_reply(tls).startswith(b"250-")
    return tls
