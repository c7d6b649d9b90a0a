"""The client side of every workload: SMTP, IMAP and POP3 dialogues with STARTTLS.

A dialogue is a table of exchanges (what to send, how the reply ends, what it must
start with), played by an asyncio client for the session-rate and idle workloads and
by a blocking client for bulk transfers, where one session moves 100 MB and a plain
``recv_into`` loop costs the generator far less than asyncio's TLS transport.

The load clients check the server certificate only in the preflight session of each
target (:func:`preflight`): certificate verification is client-side work that would
make the generator, not the target, the bottleneck.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Name the clients send as SNI and check in the preflight session.
SERVER_NAME = "localhost"
#: A session that takes longer than this counts as an error.
SESSION_TIMEOUT = 15.0
#: Whole bulk transfers (100 MB) must end within this.
BULK_TIMEOUT = 300.0
#: Mail user of the Dovecot fixture (tests/realservers/dovecot.py USERS).
IMAP_USER = ("bob", "bobpw")
MAIL_FROM = "bench@client.test"
RCPT_TO = "bulk@example.test"


@dataclass(frozen=True)
class Exchange:
    """One command and its reply."""

    #: The command line, or ``b""`` for the greeting.
    send: bytes
    #: Whether a reply line is the reply's last.
    last: Callable[[bytes], bool]
    #: The last line must start with this.
    expect: bytes


def _smtp_last(line: bytes) -> bool:
    return line[3:4] != b"-"


def _any_line(line: bytes) -> bool:
    return True


def _pop3_multiline_end(line: bytes) -> bool:
    return line in (b".\r\n", b".\n") or line.startswith(b"-ERR")


def _tagged(tag: bytes) -> Callable[[bytes], bool]:
    return lambda line: line.startswith(tag + b" ")


@dataclass(frozen=True)
class Dialogue:
    """The exchanges of one protocol (see the module docstring)."""

    greeting: Exchange
    #: EHLO / CAPABILITY / CAPA: sent before STARTTLS and once more inside TLS.
    capability: Exchange
    starttls: Exchange
    #: The command sent on held idle sessions to show they are still alive (before login).
    noop: Exchange
    quit: Exchange


def _imap(tag: str, command: str, expect: str = "OK") -> Exchange:
    return Exchange(
        f"{tag} {command}\r\n".encode(), _tagged(tag.encode()), f"{tag} {expect}".encode()
    )


DIALOGUES: dict[str, Dialogue] = {
    "smtp": Dialogue(
        greeting=Exchange(b"", _smtp_last, b"220"),
        capability=Exchange(b"EHLO bench.client.test\r\n", _smtp_last, b"250"),
        starttls=Exchange(b"STARTTLS\r\n", _smtp_last, b"220"),
        noop=Exchange(b"NOOP\r\n", _smtp_last, b"250"),
        quit=Exchange(b"QUIT\r\n", _smtp_last, b"221"),
    ),
    "imap": Dialogue(
        greeting=Exchange(b"", _any_line, b"* OK"),
        capability=_imap("C", "CAPABILITY"),
        starttls=_imap("S", "STARTTLS"),
        noop=_imap("N", "NOOP"),
        quit=_imap("Q", "LOGOUT"),
    ),
    "pop3": Dialogue(
        greeting=Exchange(b"", _any_line, b"+OK"),
        capability=Exchange(b"CAPA\r\n", _pop3_multiline_end, b"."),
        starttls=Exchange(b"STLS\r\n", _any_line, b"+OK"),
        # NOOP exists only after login (RFC 1939 section 5); CAPA works in every state.
        noop=Exchange(b"CAPA\r\n", _pop3_multiline_end, b"."),
        quit=Exchange(b"QUIT\r\n", _any_line, b"+OK"),
    ),
}


class DialogueError(Exception):
    """The server answered something the dialogue did not expect."""


#: What a failed session raises (timeouts and TLS errors are OSErrors; ``readline``
#: raises ValueError on an overlong line).
SESSION_ERRORS: tuple[type[Exception], ...] = (OSError, DialogueError, ValueError)


def client_context(ca: Path | None) -> ssl.SSLContext:
    """TLS 1.3 only; checks the certificate against ``ca`` when given, else not at all."""
    if ca is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    return context


def _check(exchange: Exchange, line: bytes) -> None:
    if not line.startswith(exchange.expect):
        shown = line[:120].decode("ascii", "replace").rstrip()
        raise DialogueError(f"expected {exchange.expect!r}, got {shown!r}")


# -- asyncio client (session rate, idle sessions) --------------------------------------


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, step: Exchange
) -> None:
    """Send ``step``'s command (if any) and read its whole reply."""
    if step.send:
        writer.write(step.send)
    while True:
        line = await reader.readline()
        if not line:
            raise DialogueError("connection closed by the server")
        if step.last(line):
            _check(step, line)
            return


@dataclass
class Session:
    """An open client session (plaintext or upgraded)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: Seconds from connect() to the end of the greeting.
    greeting_latency: float
    #: When connect() was called (monotonic clock).
    started: float


async def open_session(
    host: str, port: int, protocol: str, context: ssl.SSLContext | None
) -> Session:
    """Connect, read the greeting, ask for capabilities and, with a context, upgrade.

    Inside TLS the capabilities are asked once more: this is the session's "one command".
    """
    dialogue = DIALOGUES[protocol]
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await exchange(reader, writer, dialogue.greeting)
        greeting_latency = time.monotonic() - started
        await exchange(reader, writer, dialogue.capability)
        if context is not None:
            await exchange(reader, writer, dialogue.starttls)
            await writer.start_tls(context, server_hostname=SERVER_NAME)
        await exchange(reader, writer, dialogue.capability)
    except BaseException:
        writer.transport.abort()
        raise
    return Session(reader, writer, greeting_latency, started)


async def close_session(session: Session, protocol: str) -> None:
    """QUIT / LOGOUT, then close without waiting for the server's close."""
    try:
        await exchange(session.reader, session.writer, DIALOGUES[protocol].quit)
    finally:
        session.writer.close()


async def timed_session(
    host: str, port: int, protocol: str, context: ssl.SSLContext | None
) -> tuple[float, float]:
    """One whole session; returns (seconds from connect to the QUIT reply, greeting latency)."""
    started = time.monotonic()
    session = await open_session(host, port, protocol, context)
    await close_session(session, protocol)
    return time.monotonic() - started, session.greeting_latency


def preflight(host: str, port: int, protocol: str, ca: Path | None) -> float:
    """One session with full certificate and host-name checks; its latency, or an exception."""

    async def run() -> float:
        context = client_context(ca) if ca is not None else None
        latency, _ = await asyncio.wait_for(
            timed_session(host, port, protocol, context), SESSION_TIMEOUT
        )
        return latency

    return asyncio.run(run())


# -- blocking client (bulk) -------------------------------------------------------------


class LineSocket:
    """A blocking socket (plain or TLS) with a read buffer for line-based replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise DialogueError("connection closed by the server")
        self.buffer += chunk

    def readline(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            self._fill()
        line = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return line

    def read_exactly(self, count: int) -> None:
        """Read and drop ``count`` bytes (without keeping them: they may be 100 MB)."""
        taken = min(count, len(self.buffer))
        del self.buffer[:taken]
        remaining = count - taken
        scratch = bytearray(1 << 20)
        while remaining > 0:
            received = self.sock.recv_into(scratch, min(len(scratch), remaining))
            if received == 0:
                raise DialogueError("connection closed inside a literal")
            remaining -= received

    def exchange(self, step: Exchange) -> bytes:
        if step.send:
            self.sock.sendall(step.send)
        while True:
            line = self.readline()
            if step.last(line):
                _check(step, line)
                return line

    def upgrade(self, context: ssl.SSLContext) -> None:
        if self.buffer:
            raise DialogueError("the server sent data after its STARTTLS reply")
        self.sock = context.wrap_socket(self.sock, server_hostname=SERVER_NAME)


def _connect(host: str, port: int, protocol: str, context: ssl.SSLContext | None) -> LineSocket:
    dialogue = DIALOGUES[protocol]
    conn = LineSocket(socket.create_connection((host, port), timeout=SESSION_TIMEOUT))
    conn.exchange(dialogue.greeting)
    conn.exchange(dialogue.capability)
    if context is not None:
        conn.exchange(dialogue.starttls)
        conn.upgrade(context)
        conn.exchange(dialogue.capability)
    conn.sock.settimeout(BULK_TIMEOUT)
    return conn


def make_message(size: int) -> bytes:
    """A mail message of exactly ``size`` bytes: short header, 80-byte CRLF lines."""
    header = f"From: <{MAIL_FROM}>\r\nTo: <{RCPT_TO}>\r\nSubject: bulk\r\n\r\n".encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdef\r\n"
    body_size = size - len(header)
    if body_size < 0:
        raise ValueError(f"a message needs at least {len(header)} bytes")
    lines, rest = divmod(body_size, len(line))
    tail = b"x" * (rest - 2) + b"\r\n" if rest >= 2 else b""
    message = header + line * lines + tail
    return message + b" " * (size - len(message))


def smtp_send(host: str, port: int, context: ssl.SSLContext | None, message: bytes) -> float:
    """Deliver ``message`` in one SMTP session; seconds from the first DATA byte to ``250``."""
    conn = _connect(host, port, "smtp", context)
    conn.exchange(Exchange(f"MAIL FROM:<{MAIL_FROM}>\r\n".encode(), _smtp_last, b"250"))
    conn.exchange(Exchange(f"RCPT TO:<{RCPT_TO}>\r\n".encode(), _smtp_last, b"250"))
    conn.exchange(Exchange(b"DATA\r\n", _smtp_last, b"354"))
    started = time.monotonic()
    view = memoryview(message)
    for offset in range(0, len(message), 1 << 18):
        conn.sock.sendall(view[offset : offset + (1 << 18)])
    conn.exchange(Exchange(b".\r\n", _smtp_last, b"250"))
    elapsed = time.monotonic() - started
    conn.exchange(DIALOGUES["smtp"].quit)
    conn.sock.close()
    return elapsed


_LITERAL = re.compile(rb"\{(\d+)\}\r?\n$")


def imap_fetch(host: str, port: int, context: ssl.SSLContext | None) -> tuple[float, int]:
    """Log in, FETCH message 1 whole; (seconds from FETCH to the tagged OK, literal bytes)."""
    conn = _connect(host, port, "imap", context)
    user, password = IMAP_USER
    conn.exchange(_imap("L", f"LOGIN {user} {password}"))
    conn.exchange(_imap("E", "EXAMINE INBOX"))
    started = time.monotonic()
    conn.sock.sendall(b"F FETCH 1 BODY.PEEK[]\r\n")
    size = 0
    while True:
        line = conn.readline()
        literal = _LITERAL.search(line)
        if literal:
            size += int(literal.group(1))
            conn.read_exactly(int(literal.group(1)))
            continue
        if line.startswith(b"F "):
            _check(_imap("F", "FETCH"), line)
            break
    elapsed = time.monotonic() - started
    conn.exchange(DIALOGUES["imap"].quit)
    conn.sock.close()
    return elapsed, size
