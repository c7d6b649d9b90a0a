"""A TLS client over ``ssl.MemoryBIO``: the test decides what travels with
its records (what is pipelined around the ClientHello, how the records are
cut, where the handshake stops)."""

from __future__ import annotations

import socket
import ssl

from tests.realservers.certs import CertFiles


class MemoryTLS:
    """A TLS client over ``ssl.MemoryBIO``: the test decides what travels in
    the segment that carries its ClientHello."""

    def __init__(self, sock: socket.socket, certs: CertFiles) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = certs.client_context().wrap_bio(
            self._incoming, self._outgoing, server_hostname="localhost"
        )

    def client_hello(self) -> bytes:
        """The first flight, not sent: the records of the ClientHello."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return self._outgoing.read()
        raise AssertionError("a TLS client handshake cannot end before the server speaks")

    def handshake(self, before: bytes = b"", after: bytes = b"") -> None:
        """Handshake, with ``before`` and ``after`` around the ClientHello in one send."""
        first = True
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                flight = self._outgoing.read()
                if first:
                    flight, first = before + flight + after, False
                self._sock.sendall(flight)
                self._fill()
            else:
                self._sock.sendall(self._outgoing.read())
                return

    def _fill(self) -> bool:
        data = self._sock.recv(65536)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        return bool(data)

    def sendall(self, data: bytes) -> None:
        self._tls.write(data)
        self._sock.sendall(self._outgoing.read())

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return self._tls.read(size)
            except ssl.SSLWantReadError:
                if not self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
