"""A raw XMPP client stream, to look at the bytes (the end-to-end tests) and
to count on them (the robustness runs): it sends what it is told and reads
until a marker."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl

import slixmpp

DOMAIN = "localhost"


def stream_header(to: str = DOMAIN) -> bytes:
    return (
        b"<?xml version='1.0'?><stream:stream to='%s' xmlns='jabber:client' "
        b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>" % to.encode()
    )


STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


class XMPPStream:
    """One client connection, plaintext until ``wrap``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket = sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before {marker!r}; got {self.buffer!r}")
            self.buffer += data
        end = self.buffer.index(marker) + len(marker)
        received, self.buffer = self.buffer[:end], self.buffer[end:]
        return received

    def read_all(self) -> bytes:
        while data := self.sock.recv(65536):
            self.buffer += data
        received, self.buffer = self.buffer, b""
        return received

    def starttls(self, context: ssl.SSLContext, server_name: str | None = DOMAIN) -> bytes:
        """STARTTLS and the handshake; the features offered before it."""
        self.send(stream_header())
        features = self.read_until(b"</stream:features>")
        self.send(STARTTLS)
        self.read_until(PROCEED)
        self.wrap(context, server_name)
        return features

    def wrap(self, context: ssl.SSLContext, server_name: str | None) -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname=server_name)

    def login(self, user: str, password: str) -> bytes:
        """SASL PLAIN, the restart, resource binding; the bound JID."""
        self.send(stream_header())
        features = self.read_until(b"</stream:features>")
        if b"starttls" in features or b"<mechanism>PLAIN</mechanism>" not in features:
            raise ConnectionError(f"unexpected features after TLS: {features!r}")
        if b"-PLUS" in features:
            raise ConnectionError(f"channel binding offered through the proxy: {features!r}")
        credentials = base64.b64encode(f"\0{user}\0{password}".encode())
        self.send(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>%s</auth>"
            % credentials
        )
        self.read_until(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'")
        self.send(stream_header())
        self.read_until(b"</stream:features>")
        self.send(
            b"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
        )
        bound = re.search(rb"<jid>([^<]+)</jid>", self.read_until(b"</iq>"))
        if bound is None:
            raise ConnectionError("no JID bound")
        return bound[1]

    def close(self) -> None:
        self.sock.close()


async def start_session(client: slixmpp.ClientXMPP, port: int) -> None:
    """Connect ``client`` to ``127.0.0.1:port`` and wait until its session has
    started and its presence is sent; disconnect it again if that fails."""
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def started(_: object) -> None:
        client.send_presence()
        if not ready.done():
            ready.set_result(None)

    def failed(event: object) -> None:
        if not ready.done():
            ready.set_exception(ConnectionError(f"slixmpp {client.boundjid}: {event}"))

    client.add_event_handler("session_start", started)
    client.add_event_handler("failed_auth", failed)
    client.add_event_handler("connection_failed", failed)
    client.connect("127.0.0.1", port)
    try:
        await asyncio.wait_for(ready, 20)
    except BaseException:
        await client.disconnect()
        raise


async def slixmpp_session(jid: str, password: str, port: int) -> slixmpp.ClientXMPP:
    """A slixmpp client logged in as ``jid`` on ``127.0.0.1:port``, a server's
    plaintext c2s listener (PLAIN without TLS), its presence sent."""
    client = slixmpp.ClientXMPP(jid, password)
    client.enable_direct_tls = False
    client.enable_starttls = False
    client.enable_plaintext = True
    client.plugin["feature_mechanisms"].unencrypted_plain = True
    await start_session(client, port)
    return client
