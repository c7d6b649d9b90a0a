"""SMTP: STARTTLS termination in front of an MTA such as Postfix.

Theory of operation
-------------------
*Before TLS* the proxy is the SMTP server (RFC 5321) and no backend exists
yet: it greets, answers EHLO with the backend's extensions minus those it
terminates or reserves, and answers the harmless commands itself. AUTH waits
for TLS (RFC 4954 section 4), and with ``require_tls`` so does every command
that needs the backend; without it, the first such command starts a
*plaintext relay*: the backend is connected, the client's HELO/EHLO replayed,
and the session goes on below without TLS.

*STARTTLS* (RFC 3207 section 4) gets its 220 and the client goes to a TLS
worker. Bytes pipelined after it come back in ``StartTLS.discarded`` and
bytes sent before the handshake ends are dropped, never interpreted (section
4.2, CVE-2011-0411). The server must forget what it learned in plaintext; only
the HELO name is kept, as XCLIENT ``HELO=`` for the backend's logs until the
client's post-TLS EHLO replaces it. Implicit TLS (RFC 8314) starts here.

*The relay*: the backend's greeting is swallowed (the client had the proxy's;
an implicit-TLS client gets the backend's). With XCLIENT identity (Postfix
XCLIENT_README) the proxy sends EHLO, then XCLIENT alone, since its 220 reply
is a new greeting that would eat anything pipelined behind it; values are
xtext (RFC 3461 section 4). Client commands then go to the backend unchanged
but for those the proxy must still answer: STARTTLS, XCLIENT and XFORWARD
(only the proxy speaks for the client), malformed lines. Under PIPELINING
(RFC 2920 section 3) replies keep command order, so the proxy's own replies
wait behind the backend replies owed before them. Replies are read whole
(RFC 5321 section 4.2.1); EHLO replies lose the extensions the proxy keeps
and the SASL ``-PLUS`` mechanisms, whose channel binding (RFC 5056) cannot
cross a terminated TLS session.

*Message content* is never parsed as commands. A DATA body (RFC 5321 section
4.1.1.4) streams to the backend until CRLF "." CRLF, dot-stuffing untouched
(the backend undoes it, section 4.5.2). A bare CR or LF there is what SMTP
smuggling exploits (the two ends disagree on where the message stops), so by
default it ends the session, as in Postfix 3.9. Both are looked for in one
pass by ``_smtp_data`` (C: the body is the proxy's bulk path). A BDAT chunk
(RFC 3030 section 2) is exactly its announced octets, counted and never
looked at; the chunk of a refused BDAT is consumed all the same.

*Shutdown*: the client gets 421 (RFC 5321 section 3.8), except inside a DATA
body or a BDAT chunk, where the connection just closes: the message is not
accepted, and the client sends it again later.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from protocols import _smtp_data
from protocols._base import (
    BackendIdentity,
    BareLineEndings,
    CapabilityProbe,
    Peer,
    RemoteProtocolError,
    SessionSettings,
    TLSMode,
    ending_transitions,
)
from protocols._buffers import LineBuffer, LineTooLong
from protocols._line import Owed, PipelinedMachine, clean_line, opening_transitions


class State(enum.Enum):
    """Where an SMTP session stands."""

    #: The proxy answers the client itself; no backend yet.
    PRE_TLS = enum.auto()
    #: STARTTLS accepted (or implicit TLS): waiting for the worker's handshake.
    TLS_HANDSHAKE = enum.auto()
    #: ``OpenBackend`` queued, waiting for ``backend_connected``.
    BACKEND_CONNECTING = enum.auto()
    #: Waiting for the backend's 220 greeting.
    BACKEND_GREETING = enum.auto()
    #: The proxy sent its own EHLO to learn whether XCLIENT is offered.
    XCLIENT_EHLO = enum.auto()
    #: XCLIENT sent; its 220 reply is the backend's new greeting.
    XCLIENT_REPLY = enum.auto()
    #: Plaintext relay: the client's HELO/EHLO replayed, reply to swallow.
    REPLAY_HELO = enum.auto()
    #: Client commands go to the backend, replies come back in order.
    RELAY = enum.auto()
    #: DATA forwarded; client bytes are held until the backend answers it.
    DATA_PENDING = enum.auto()
    #: Streaming the message body until the end-of-data line.
    DATA_BODY = enum.auto()
    #: Forwarding the counted octets of a BDAT chunk.
    BDAT_CHUNK = enum.auto()
    #: The session ended; ``CloseConnection`` has been queued.
    CLOSED = enum.auto()
    #: An impossible input or a misbehaving backend ended the session.
    ERROR = enum.auto()


class Input(enum.Enum):
    """What moves an SMTP session from one state to another."""

    CLIENT_STARTTLS = enum.auto()  #: The client issued an acceptable STARTTLS.
    PLAINTEXT_RELAY = enum.auto()  #: Without ``require_tls``, a command needs the backend.
    TLS_ESTABLISHED = enum.auto()  #: The TLS worker finished the handshake.
    BACKEND_CONNECTED = enum.auto()  #: The driver connected the backend.
    PROXY_EHLO = enum.auto()  #: The proxy sent EHLO to look for XCLIENT.
    PROXY_XCLIENT = enum.auto()  #: The proxy sent XCLIENT.
    REPLAY_HELO = enum.auto()  #: The proxy replayed the client's HELO/EHLO.
    BACKEND_READY = enum.auto()  #: The backend is ready for the client's commands.
    DATA_SENT = enum.auto()  #: DATA was forwarded.
    DATA_ACCEPTED = enum.auto()  #: The backend answered DATA with 354.
    DATA_REFUSED = enum.auto()  #: The backend answered DATA with anything else.
    END_OF_DATA = enum.auto()  #: The end-of-data line was forwarded.
    BDAT_SENT = enum.auto()  #: A BDAT command was forwarded.
    END_OF_CHUNK = enum.auto()  #: The last octet of a BDAT chunk was forwarded.
    CLOSE = enum.auto()  #: The session ends (quit, timeout, either side gone, refused client).
    VIOLATION = enum.auto()  #: A ``ProtocolError`` ended the session.


TRANSITIONS: Final[Mapping[tuple[State, Input], State]] = {
    **opening_transitions(State, Input),
    (State.BACKEND_GREETING, Input.PROXY_EHLO): State.XCLIENT_EHLO,
    (State.BACKEND_GREETING, Input.REPLAY_HELO): State.REPLAY_HELO,
    (State.BACKEND_GREETING, Input.BACKEND_READY): State.RELAY,
    (State.XCLIENT_EHLO, Input.PROXY_XCLIENT): State.XCLIENT_REPLY,
    (State.XCLIENT_REPLY, Input.REPLAY_HELO): State.REPLAY_HELO,
    (State.XCLIENT_REPLY, Input.BACKEND_READY): State.RELAY,
    (State.REPLAY_HELO, Input.BACKEND_READY): State.RELAY,
    (State.RELAY, Input.DATA_SENT): State.DATA_PENDING,
    (State.DATA_PENDING, Input.DATA_ACCEPTED): State.DATA_BODY,
    (State.DATA_PENDING, Input.DATA_REFUSED): State.RELAY,
    (State.DATA_BODY, Input.END_OF_DATA): State.RELAY,
    (State.RELAY, Input.BDAT_SENT): State.BDAT_CHUNK,
    (State.BDAT_CHUNK, Input.END_OF_CHUNK): State.RELAY,
    **ending_transitions(State, Input),
}

_CRLF: Final = b"\r\n"
#: RFC 5321 section 4.1.1.4; the body starts at a line start, so the CRLF
#: that ended the DATA command counts as the first two octets.
_END_OF_DATA: Final = b"\r\n.\r\n"


#: One reply line, RFC 5321 section 4.2.1: the text may be absent.
_REPLY_LINE: Final = re.compile(rb"([2-5][0-9][0-9])(?:([- ])([^\r\n]*))?\r\n")
#: Extensions the proxy terminates (STARTTLS) or reserves for itself.
_PROXY_ONLY: Final = frozenset({b"STARTTLS", b"XCLIENT", b"XFORWARD"})
_IDENTITY_COMMANDS: Final = frozenset({b"XCLIENT", b"XFORWARD"})
#: The backend's greeting and its replies to the proxy's own commands: one
#: reply each, after which the backend waits for the proxy's next command.
_LOCKSTEP: Final = frozenset(
    {State.BACKEND_GREETING, State.XCLIENT_EHLO, State.XCLIENT_REPLY, State.REPLAY_HELO}
)

_BARE_IN_COMMAND: Final = b"500 5.5.2 Error: bare <CR> or <LF> received\r\n"
_BAD_SYNTAX: Final = b"500 5.5.2 Error: bad syntax\r\n"
_NOT_IMPLEMENTED: Final = b"502 5.5.1 Error: command not implemented\r\n"
_TLS_FIRST: Final = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
_BDAT_SYNTAX: Final = b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"
_STARTTLS_SYNTAX: Final = b"501 5.5.4 Syntax: STARTTLS\r\n"
_TLS_READY: Final = b"220 2.0.0 Ready to start TLS\r\n"
_TLS_ACTIVE: Final = b"503 5.5.1 Error: TLS already active\r\n"
_TLS_UNAVAILABLE: Final = b"454 4.7.0 TLS not available: session already started in plaintext\r\n"
_BYE: Final = b"221 2.0.0 Bye\r\n"
#: Commands the proxy answers identically before TLS.
_LOCAL_REPLIES: Final[Mapping[bytes, bytes]] = {
    b"NOOP": b"250 2.0.0 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"HELP": b"214 2.0.0 See RFC 5321\r\n",
}


@dataclass(frozen=True)
class Reply:
    """One complete, well-formed reply from an SMTP server."""

    code: int
    #: The lines as received, CRLF included.
    lines: tuple[bytes, ...]

    @property
    def raw(self) -> bytes:
        return b"".join(self.lines)

    @property
    def texts(self) -> list[bytes]:
        """Each line without its code, separator and CRLF."""
        return [line[4:-2] for line in self.lines]

    @property
    def text(self) -> str:
        """For logs and error messages."""
        return " ".join(line[:-2].decode("utf-8", "replace") for line in self.lines)


class ReplyReader:
    """Assembles multi-line replies (RFC 5321 section 4.2.1) from a byte stream.

    A malformed or overlong line raises ``RemoteProtocolError``: the stream can
    no longer be matched to the commands it answers.
    """

    def __init__(self, limit: int) -> None:
        self._lines = LineBuffer(limit)
        self._partial: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self._lines.feed(data)

    @property
    def holds_more(self) -> bool:
        """Bytes of another reply are in, whole or not."""
        return bool(self._partial) or len(self._lines) > 0

    def pop(self) -> Reply | None:
        while (line := self._lines.pop_line()) is not None:
            if isinstance(line, LineTooLong):
                raise RemoteProtocolError("reply line too long from backend")
            match = _REPLY_LINE.fullmatch(line)
            # Every line of a reply carries the same code.
            if match is None or (self._partial and not line.startswith(self._partial[0][:3])):
                raise RemoteProtocolError(f"malformed reply from backend: {line[:64]!r}")
            self._partial.append(line)
            if match[2] != b"-":
                lines, self._partial = tuple(self._partial), []
                return Reply(int(match[1]), lines)
        return None


def xtext(value: bytes) -> bytes:
    """RFC 3461 section 4: octets outside "!".."~", and "+" and "=", as +HH."""
    return b"".join(
        bytes((octet,)) if 33 <= octet <= 126 and octet not in b"+=" else b"+%02X" % octet
        for octet in value
    )


def _require_2xx(reply: Reply, what: str) -> None:
    if reply.code // 100 != 2:
        raise RemoteProtocolError(f"{what}: {reply.text}")


#: What ends an EHLO keyword (compiled once: ``re.split`` looks its pattern
#: up in re's cache on every call, three times the split's cost).
_split_keyword: Final = re.compile(rb"[ =]").split


def _keyword(text: bytes) -> bytes:
    """The EHLO keyword of an extension line; ``AUTH=...`` is an old AUTH form."""
    return _split_keyword(text, maxsplit=1)[0].upper()


def _advertised(texts: Iterable[bytes], *, auth: bool) -> list[bytes]:
    """The extension lines a client may see: no proxy-only extension, AUTH
    only when ``auth`` and then without channel-binding mechanisms."""
    kept = []
    for text in texts:
        keyword = _keyword(text)
        if keyword == b"AUTH" and auth:
            mechanisms = [name for name in text[5:].split() if not name.upper().endswith(b"-PLUS")]
            if mechanisms:
                kept.append(text[:5] + b" ".join(mechanisms))
        elif keyword != b"AUTH" and keyword not in _PROXY_ONLY:
            kept.append(text)
    return kept


@functools.lru_cache(maxsize=64)
def _extensions(capabilities: tuple[str, ...]) -> tuple[bool, tuple[bytes, ...]]:
    """Whether the backend's EHLO ``capabilities`` include CHUNKING, and the
    extension lines offered before TLS: the same for every session of a
    listener, so worked out once, not per session."""
    lines = [line.encode() for line in capabilities]
    return b"CHUNKING" in map(_keyword, lines), tuple(_advertised(lines, auth=False))


def _multiline(code: bytes, texts: Sequence[bytes]) -> bytes:
    """A reply with ``code-`` on every line but the last (RFC 5321 section 4.2.1)."""
    last = len(texts) - 1
    return b"".join(
        b"%s%s%s\r\n" % (code, b" " if index == last else b"-", text)
        for index, text in enumerate(texts)
    )


def _bdat_size(arg: bytes) -> int | None:
    """The chunk size of ``BDAT <size> [LAST]`` (RFC 3030 section 2), or None."""
    words = arg.upper().split()
    if 1 <= len(words) <= 2 and words[0].isdigit() and words[1:] in ([], [b"LAST"]):
        return int(words[0])
    return None


class SMTPMachine(PipelinedMachine[State, Input, Owed]):
    """One SMTP session; see the module docstring. A reply owed for the end
    of a message has the verb ``.``."""

    states = State
    inputs = Input
    transitions = TRANSITIONS
    unavailable_reply = b"421 4.3.0 %s Service not available\r\n"
    timeout_reply = b"421 4.4.2 %s Error: timeout exceeded\r\n"
    busy_reply_template = b"421 4.7.0 %s Error: too many connections\r\n"
    #: RFC 5321 section 3.8.
    shutdown_reply = b"421 4.3.2 %s Service shutting down\r\n"
    early_tls_reply = b"500 5.5.1 Error: TLS handshake received before STARTTLS\r\n"
    upgrade_command = "STARTTLS"
    line_too_long_reply = b"500 5.5.0 Error: line too long\r\n"

    def __init__(self, settings: SessionSettings, peer: Peer) -> None:
        greeting = b"220 %s ESMTP starttls-proxy\r\n" % settings.hostname.encode()
        super().__init__(settings, peer, greeting=greeting)
        self._chunking, self._offered = _extensions(settings.capabilities)
        self._replies = ReplyReader(settings.max_reply_line_length)
        #: The client's HELO or EHLO before TLS, as (verb, name).
        self._helo: tuple[bytes, bytes] | None = None
        #: The backend's last reply was a 334 challenge: the next client line
        #: is the SASL response.
        self._sasl_exchange = False
        #: Octets of a refused BDAT's chunk still to drop.
        self._drop = 0
        #: Octets of a relayed BDAT's chunk still to forward.
        self._chunk = 0
        #: The body's last octets forwarded (at first the CRLF that ended
        #: the DATA command), enough to see an end-of-data line begin.
        self._body_seen = b""
        self._steps = {
            State.PRE_TLS: self._command_step,
            State.RELAY: self._command_step,
            State.DATA_BODY: self._body_step,
            State.BDAT_CHUNK: self._chunk_step,
        }

    def _backend_data(self, data: bytes) -> None:
        self._replies.feed(data)
        while not self.finished and (reply := self._replies.pop()) is not None:
            self._backend_reply(reply)

    @property
    def _mid_transfer(self) -> bool:
        # The chunk of a refused BDAT is on its way too.
        return self.state in (State.DATA_BODY, State.BDAT_CHUNK) or self._drop > 0

    # ------------------------------------------------------------------
    # The client's byte stream.

    def _command_step(self) -> bool:
        if self._drop:
            self._drop -= len(self._client.pop_bytes(self._drop))
            if self._drop:
                return False
        return super()._command_step()

    def _command(self, line: bytes) -> None:
        if not clean_line(line):
            self._answer(_BARE_IN_COMMAND)
            return
        if self._sasl_exchange:
            # RFC 4954 section 4: after a 334 the client's line is a SASL
            # response (base64, "*" or empty), not a command.
            self._sasl_exchange = False
            self._send_backend(line)
            self._owed.append(Owed(b"AUTH"))
            return
        verb, _, arg = line[:-2].strip().partition(b" ")
        verb, arg = verb.upper(), arg.strip()
        size = _bdat_size(arg) if verb == b"BDAT" else 0
        if not verb:
            self._answer(_BAD_SYNTAX)
        elif verb in _IDENTITY_COMMANDS:
            self._answer(_NOT_IMPLEMENTED)
        elif verb == b"AUTH" and not self._tls:
            self._answer(_TLS_FIRST)
        elif size is None:
            self._answer(_BDAT_SYNTAX)
        elif self.state is State.PRE_TLS:
            self._local_command(line, verb, arg, size)
        else:
            self._relay_command(line, verb, size)

    def _refuse(self, reply: bytes, chunk_size: int) -> None:
        """Refuse a command; a BDAT's chunk is consumed all the same (RFC
        3030 section 2), else its octets would be taken for commands."""
        self._answer(reply)
        self._drop = chunk_size

    def _local_command(self, line: bytes, verb: bytes, arg: bytes, size: int) -> None:
        if verb in (b"EHLO", b"HELO"):
            self._greet(verb, arg)
        elif verb in _LOCAL_REPLIES:
            self._answer(_LOCAL_REPLIES[verb])
        elif verb == b"QUIT":
            self._answer(_BYE)
            self._end("client quit", clean=True)
        elif verb == b"STARTTLS" and arg:
            self._answer(_STARTTLS_SYNTAX)
        elif verb == b"STARTTLS":
            self._upgrade(_TLS_READY)
        elif self.settings.require_tls:
            self._refuse(_TLS_FIRST, size)
        else:
            self._start_plaintext_relay(line)

    def _greet(self, verb: bytes, name: bytes) -> None:
        if not name:
            self._answer(b"501 5.5.4 Syntax: %s hostname\r\n" % verb)
            return
        self._helo = (verb, name)
        if verb == b"HELO":
            self._answer(b"250 %s\r\n" % self._host)
        else:
            self._answer(_multiline(b"250", [self._host, *self._offered, b"STARTTLS"]))

    def _relay_command(self, line: bytes, verb: bytes, size: int) -> None:
        if verb == b"STARTTLS":
            self._answer(_TLS_ACTIVE if self._tls else _TLS_UNAVAILABLE)
        elif verb == b"BDAT" and not self._chunking:
            # A backend without CHUNKING would read the chunk as commands.
            self._refuse(_NOT_IMPLEMENTED, size)
        else:
            self._send_backend(line)
            self._owed.append(Owed(verb))
            if verb == b"DATA":
                self._go(Input.DATA_SENT)
            elif verb == b"BDAT":
                self._chunk = size
                self._go(Input.BDAT_SENT)

    def _chunk_step(self) -> bool:
        if not self._chunk:
            self._go(Input.END_OF_CHUNK)
            return True
        data = self._client.pop_bytes(self._chunk)
        if not data:
            return False
        self._chunk -= len(data)
        self._send_backend(data)
        return True

    def _body_step(self) -> bool:
        """Forward the body as it comes; True at its end.

        An end-of-data line that straddles two reads is found with the
        body's last octets, kept aside, so each octet is looked at once
        however the body is split; only a final CR waits for the next read
        (bare or not, the octet after it tells).
        """
        data = self._client.pop_all()
        seen = self._body_seen
        reject = self.settings.smtp_bare_line_endings is BareLineEndings.REJECT
        straddling = (seen + data[: len(_END_OF_DATA) - 1]).find(_END_OF_DATA)
        if straddling >= 0:
            # What is left of that line holds no bare CR or LF: a CR is
            # never forwarded before the octet after it is known.
            stop, at = _smtp_data.END_OF_DATA, straddling - len(seen)
        else:
            stop, at = _smtp_data.first_stop(data, reject)
        ended = stop == _smtp_data.END_OF_DATA
        body = data[: at + len(_END_OF_DATA)] if ended else data[:at]
        if stop == _smtp_data.BARE:
            # No end-of-data ever reaches the backend: it drops the partial
            # message when the connection goes.
            if body:
                self._send_backend(body)
            reply = b"521 5.5.2 %s Error: bare <CR> or <LF> received\r\n" % self._host
            self._end("bare CR or LF in DATA", reply=reply)
            return False
        if body:
            self._send_backend(body)
        if not ended:
            self._client.feed(data[at:])
            self._body_seen = (seen + body[1 - len(_END_OF_DATA) :])[1 - len(_END_OF_DATA) :]
            return False
        self._client.feed(data[at + len(_END_OF_DATA) :])
        self._owed.append(Owed(b"."))
        self._go(Input.END_OF_DATA)
        return True

    # ------------------------------------------------------------------
    # The backend's replies.

    def _backend_reply(self, reply: Reply) -> None:
        if self.state in _LOCKSTEP and self._replies.holds_more:
            # The proxy has yet to send what the next reply would answer.
            raise RemoteProtocolError(f"backend spoke out of turn after: {reply.text}")
        if self.state is State.BACKEND_GREETING:
            _require_2xx(reply, "backend refused the session")
            if self.settings.identity is BackendIdentity.XCLIENT:
                self._send_backend(b"EHLO %s\r\n" % self._host)
                self._go(Input.PROXY_EHLO)
            else:
                self._greeted(reply)
        elif self.state is State.XCLIENT_EHLO:
            _require_2xx(reply, "backend refused the proxy's EHLO")
            offered = [t.split()[1:] for t in reply.texts[1:] if _keyword(t) == b"XCLIENT"]
            if not offered or not offered[0]:
                raise RemoteProtocolError("backend does not offer XCLIENT to the proxy")
            self._send_backend(self._xclient({name.upper() for name in offered[0]}))
            self._go(Input.PROXY_XCLIENT)
        elif self.state is State.XCLIENT_REPLY:
            _require_2xx(reply, "backend refused XCLIENT")
            self._greeted(reply)
        elif self.state is State.REPLAY_HELO:
            _require_2xx(reply, "backend refused the replayed HELO")
            self._ready()
        elif self.state in (State.RELAY, State.DATA_PENDING, State.DATA_BODY, State.BDAT_CHUNK):
            self._relay_reply(reply)
        else:
            raise RemoteProtocolError(f"backend reply in state {self.state.name}")

    def _xclient(self, offered: set[bytes]) -> bytes:
        """The XCLIENT command, with the attributes the backend lists."""
        address = self.peer.client_address.encode()
        attributes = [
            (b"ADDR", b"IPV6:" + address if b":" in address else address),
            (b"PORT", b"%d" % self.peer.client_port),
        ]
        if self._helo is not None:
            verb, name = self._helo
            attributes += [(b"PROTO", b"ESMTP" if verb == b"EHLO" else b"SMTP"), (b"HELO", name)]
        attributes.append((b"NAME", b"[UNAVAILABLE]"))
        fields = [b"%s=%s" % (key, xtext(value)) for key, value in attributes if key in offered]
        return b"XCLIENT %s\r\n" % b" ".join(fields)

    def _greeted(self, greeting: Reply) -> None:
        """The backend greeted its final client: the proxy."""
        if self.settings.tls_mode is TLSMode.IMPLICIT:
            # The client has not been greeted yet.
            self._send_client(greeting.raw)
        if not self._tls and self._helo is not None:
            verb, name = self._helo
            self._send_backend(b"%s %s\r\n" % (verb, name))
            self._go(Input.REPLAY_HELO)
        else:
            self._ready()

    def _relay_reply(self, reply: Reply) -> None:
        if not self._owed:
            raise RemoteProtocolError(f"unsolicited reply from backend: {reply.text}")
        verb = self._owed[0].verb
        if verb == b"EHLO" and reply.code == 250:
            texts = reply.texts
            relayed = _multiline(b"250", [texts[0], *_advertised(texts[1:], auth=self._tls)])
            self._send_client(relayed)
        else:
            self._send_client(reply.raw)
        if self._settle() is None:
            return
        self._sasl_exchange = verb == b"AUTH" and reply.code == 334
        if verb == b"DATA":
            if reply.code == 354:
                self._body_seen = _CRLF
                self._go(Input.DATA_ACCEPTED)
            else:
                self._go(Input.DATA_REFUSED)
            self._pump_client()


class SMTPCapabilityProbe(CapabilityProbe):
    """Reads the greeting, sends EHLO, keeps its extension lines, says QUIT."""

    def __init__(self, hostname: str) -> None:
        super().__init__(hostname)
        self._replies = ReplyReader(SessionSettings.max_reply_line_length)
        self._greeted = False

    def receive_data(self, data: bytes) -> None:
        self._replies.feed(data)
        try:
            while self.result is None and self.error is None:
                reply = self._replies.pop()
                if reply is None:
                    return
                self._reply(reply)
        except RemoteProtocolError as violation:
            self.error = str(violation)

    def _reply(self, reply: Reply) -> None:
        if self._replies.holds_more:
            # What comes before the probe's command cannot answer it.
            raise RemoteProtocolError(f"backend spoke out of turn after: {reply.text}")
        if not self._greeted:
            _require_2xx(reply, "backend refused the session")
            self._greeted = True
            self._send = b"EHLO %s\r\n" % self.hostname.encode()
        else:
            _require_2xx(reply, "backend refused EHLO")
            # The first line names the server; the others are extensions.
            self.result = tuple(text.decode("utf-8", "replace") for text in reply.texts[1:])
            self._send = b"QUIT\r\n"
