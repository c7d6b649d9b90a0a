"""The Postfix backend fixture itself, before any proxy is involved.

Each listener is exercised the way the proxy will use it: plain SMTP (byte-exact
delivery), PROXY protocol v2, XCLIENT from 127.0.0.1, and STARTTLS offered by Postfix.
"""

from __future__ import annotations

import smtplib
import socket
import struct
import time
import uuid

from protocols.proxy_header import V2_SIGNATURE
from tests.realservers.certs import CertFiles
from tests.realservers.postfix import PostfixInstance, header, header_values, message_body

#: A body with lines a careless proxy might mangle: a command word, and lines starting
#: with a dot (smtplib stuffs ".x" to "..x" and "..x" to "...x" on the wire).
BODY = b"first line\r\nSTARTTLS\r\n.x\r\n..x\r\n\tindented . text\r\nlast line\r\n"


def _message(token: str, body: bytes = BODY) -> bytes:
    return (
        b"From: sender@example.test\r\n"
        b"To: rcpt@example.test\r\n"
        b"Subject: " + token.encode() + b"\r\n"
        b"Message-ID: <" + token.encode() + b"@client.test>\r\n"
        b"\r\n" + body
    )


def _wait_for_message(postfix: PostfixInstance, token: str, timeout: float = 20.0) -> bytes:
    """The delivered message whose Subject is ``token``."""
    deadline = time.monotonic() + timeout
    while True:
        for raw in postfix.delivered():
            if header(raw, "Subject") == token:
                return raw
        if time.monotonic() >= deadline:
            tail = "\n".join(postfix.log().splitlines()[-30:])
            raise AssertionError(f"no message {token!r} after {timeout} s; maillog:\n{tail}")
        time.sleep(0.05)


class _SMTPLines:
    """A minimal SMTP client over a raw socket (for dialogues smtplib cannot do)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def reply(self) -> tuple[int, list[bytes]]:
        lines: list[bytes] = []
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), f"truncated reply: {[*lines, line]!r}"
            lines.append(line[4:-2])
            if line[3:4] == b" ":
                return int(line[:3]), lines

    def command(self, line: bytes) -> tuple[int, list[bytes]]:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()


def test_plain_port_delivers_body_byte_identical(postfix: PostfixInstance) -> None:
    token = f"plain-{uuid.uuid4().hex}"
    with smtplib.SMTP(postfix.host, postfix.plain_port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        client.sendmail("sender@example.test", ["rcpt@example.test"], _message(token))

    raw = _wait_for_message(postfix, token)
    assert message_body(raw) == BODY
    # Postfix only prepends its trace headers; the client's header block is intact too.
    assert raw.replace(b"\n", b"\r\n").endswith(_message(token))
    assert header(raw, "Message-ID") == f"<{token}@client.test>"
    assert header(raw, "Delivered-To") == "rcpt@example.test"
    assert "127.0.0.1" in header_values(raw, "Received")[0]


def test_proxy_port_takes_proxy_v2_header(postfix: PostfixInstance) -> None:
    token = f"proxy-{uuid.uuid4().hex}"
    addresses = socket.inet_aton("127.0.0.9") + socket.inet_aton("127.0.0.1")
    ports = struct.pack("!HH", 40009, postfix.proxy_port)
    proxy_header = (
        V2_SIGNATURE
        + bytes([0x21, 0x11])
        + struct.pack("!H", len(addresses + ports))
        + addresses
        + ports
    )
    with socket.create_connection((postfix.host, postfix.proxy_port), timeout=10) as sock:
        sock.sendall(proxy_header)
        smtp = _SMTPLines(sock)
        try:
            assert smtp.reply()[0] == 220
            assert smtp.command(b"EHLO client.test")[0] == 250
            assert smtp.command(b"MAIL FROM:<sender@example.test>")[0] == 250
            assert smtp.command(b"RCPT TO:<rcpt@example.test>")[0] == 250
            assert smtp.command(b"DATA")[0] == 354
            # Dot-stuff by hand, as smtplib would.
            wire = _message(token).replace(b"\r\n.", b"\r\n..")
            assert smtp.command(wire + b".")[0] == 250
            assert smtp.command(b"QUIT")[0] == 221
        finally:
            smtp.close()

    raw = _wait_for_message(postfix, token)
    assert raw.replace(b"\n", b"\r\n").endswith(_message(token))
    assert "127.0.0.9" in header_values(raw, "Received")[0]
    postfix.wait_for_log("connect from unknown[127.0.0.9]")


def test_plain_port_accepts_xclient_from_localhost(postfix: PostfixInstance) -> None:
    token = f"xclient-{uuid.uuid4().hex}"
    with smtplib.SMTP(postfix.host, postfix.plain_port, timeout=10) as client:
        code, _ = client.ehlo("x")
        assert code == 250
        assert client.has_extn("xclient")
        assert "ADDR" in client.esmtp_features["xclient"].split()
        code, banner = client.docmd(
            "XCLIENT", "ADDR=127.0.0.7 PORT=4242 PROTO=ESMTP HELO=client.test NAME=[UNAVAILABLE]"
        )
        assert code == 220, banner
        # XCLIENT starts a new session: the client greets again.
        assert client.ehlo("client.test")[0] == 250
        client.sendmail("sender@example.test", ["rcpt@example.test"], _message(token))

    raw = _wait_for_message(postfix, token)
    received = header_values(raw, "Received")[0]
    assert "client.test" in received
    assert "127.0.0.7" in received
    assert raw.replace(b"\n", b"\r\n").endswith(_message(token))
    postfix.wait_for_log("unknown[127.0.0.7]")


def test_tls_port_offers_starttls(postfix: PostfixInstance, test_certs: CertFiles) -> None:
    with smtplib.SMTP(postfix.host, postfix.tls_port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=test_certs.client_context())
        assert code == 220
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        assert client.noop()[0] == 250


def test_proxy_and_tls_ports_offer_no_xclient_and_proxy_port_no_tls(
    postfix: PostfixInstance,
) -> None:
    with smtplib.SMTP(postfix.host, postfix.tls_port, timeout=10) as client:
        client.ehlo("x")
        assert not client.has_extn("xclient")
    with socket.create_connection((postfix.host, postfix.proxy_port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.8 127.0.0.1 40008 25\r\n")
        smtp = _SMTPLines(sock)
        try:
            assert smtp.reply()[0] == 220
            code, lines = smtp.command(b"EHLO x")
            assert code == 250
            keywords = {line.split()[0].upper() for line in lines[1:]}
            assert not keywords & {b"STARTTLS", b"XCLIENT"}
            assert smtp.command(b"QUIT")[0] == 221
        finally:
            smtp.close()


def test_message_helpers() -> None:
    raw = b"Return-Path: <a@b>\nSubject: one\n two\nX: 1\nx: 2\n\nbody\r\n.\n"
    assert header(raw, "subject") == "one two"
    assert header_values(raw, "X") == ["1", "2"]
    assert header(raw, "Missing") is None
    assert message_body(raw) == b"body\r\r\n.\r\n"
    assert message_body(b"A: 1\r\n\r\nx\r\n") == b"x\r\n"
