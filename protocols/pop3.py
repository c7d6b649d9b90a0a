"""POP3: STLS termination in front of a mail store such as Dovecot.

Theory of operation
-------------------
*Before TLS* the proxy is the POP3 server in the AUTHORIZATION state (RFC
1939 section 4) and no backend exists yet. Its greeting carries no APOP
timestamp: the proxy knows no secrets. CAPA (RFC 2449 section 5) lists the
backend's capabilities with the proxy's STLS in place of the backend's, and
with ``require_tls`` without USER and SASL, so that no credentials cross the
wire in clear (RFC 2595 section 2.2). NOOP and QUIT are answered locally;
with ``require_tls`` everything else is refused, the login commands with the
[AUTH] response code (RFC 3206 section 5); without it, the first command the
proxy cannot answer starts a *plaintext relay*.

*STLS* (RFC 2595 section 4) gets its +OK and the client goes to a TLS worker.
Bytes pipelined after it come back in ``StartTLS.discarded`` and bytes sent
before the handshake ends are dropped, never interpreted (CVE-2011-0411).
Implicit TLS (RFC 8314 section 3.3, port 995) starts here.

*The relay*: the backend's greeting is swallowed (the client had the proxy's;
an implicit-TLS client, who had none, gets the backend's). With the
POP3_XCLIENT identity the proxy then sends Dovecot's XCLIENT alone and
swallows its reply. Dovecot obeys XCLIENT only from its
login_trusted_networks and tells such peers so with "[XCLIENT]" in its
greeting; an untrusted proxy gets "+OK ... ignoring", so the greeting, not
the reply, proves that the identity went through.

Client commands then go to the backend as they come (PIPELINING, RFC 2449
section 6.6) but for those the proxy must still answer: STLS, XCLIENT and
XOIP (only the proxy speaks for the client), malformed lines. Responses keep
command order, so the proxy's own answers wait behind the responses owed
before them. After +OK, the responses to CAPA, to LIST and UIDL without an
argument, to RETR and TOP are multi-line (RFC 1939 section 3): they stream to
the client byte for byte, dot-stuffing untouched, until the line holding only
".", and nothing in them is ever taken for a status line. CAPA lists lose STLS
and the SASL ``-PLUS`` mechanisms, whose channel binding (RFC 5056) cannot
cross a terminated TLS session. AUTH (RFC 5034 section 4) holds the client's
bytes until the backend answers: a "+" continuation makes the client's next
line a SASL response, relayed verbatim ("*" included, which cancels).

*Shutdown*: the client gets -ERR [SYS/TEMP] (RFC 3206 section 4), except
while a multi-line response streams to it, where the connection just closes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from protocols._base import (
    BackendIdentity,
    Peer,
    RemoteProtocolError,
    SessionSettings,
    TLSMode,
    ending_transitions,
)
from protocols._buffers import LineBuffer, LineTooLong
from protocols._line import LineProbe, Owed, PipelinedMachine, clean_line, opening_transitions


class State(enum.Enum):
    """Where a POP3 session stands."""

    #: The proxy answers the client itself; no backend yet.
    PRE_TLS = enum.auto()
    #: STLS accepted (or implicit TLS): waiting for the worker's handshake.
    TLS_HANDSHAKE = enum.auto()
    #: ``OpenBackend`` queued, waiting for ``backend_connected``.
    BACKEND_CONNECTING = enum.auto()
    #: Waiting for the backend's +OK greeting.
    BACKEND_GREETING = enum.auto()
    #: XCLIENT sent; its reply is swallowed.
    XCLIENT_REPLY = enum.auto()
    #: Client commands go to the backend, responses come back in order.
    RELAY = enum.auto()
    #: AUTH or a SASL response forwarded; client bytes are held until the
    #: backend answers it.
    AUTH_PENDING = enum.auto()
    #: The backend sent a "+" continuation: the client's next line is a SASL
    #: response, not a command.
    SASL_RESPONSE = enum.auto()
    #: The session ended; ``CloseConnection`` has been queued.
    CLOSED = enum.auto()
    #: An impossible input or a misbehaving backend ended the session.
    ERROR = enum.auto()


class Input(enum.Enum):
    """What moves a POP3 session from one state to another."""

    CLIENT_STARTTLS = enum.auto()  #: The client issued an acceptable STLS.
    PLAINTEXT_RELAY = enum.auto()  #: Without ``require_tls``, a command needs the backend.
    TLS_ESTABLISHED = enum.auto()  #: The TLS worker finished the handshake.
    BACKEND_CONNECTED = enum.auto()  #: The driver connected the backend.
    PROXY_XCLIENT = enum.auto()  #: The proxy sent XCLIENT.
    BACKEND_READY = enum.auto()  #: The backend is ready for the client's commands.
    AUTH_SENT = enum.auto()  #: An AUTH naming a mechanism was forwarded.
    CHALLENGE = enum.auto()  #: The backend sent a "+" continuation.
    RESPONSE_SENT = enum.auto()  #: A SASL response was forwarded.
    AUTH_DONE = enum.auto()  #: The backend ended the exchange with +OK or -ERR.
    CLOSE = enum.auto()  #: The session ends (quit, timeout, either side gone).
    VIOLATION = enum.auto()  #: A ``ProtocolError`` ended the session.


TRANSITIONS: Final[Mapping[tuple[State, Input], State]] = {
    **opening_transitions(State, Input),
    (State.BACKEND_GREETING, Input.PROXY_XCLIENT): State.XCLIENT_REPLY,
    (State.BACKEND_GREETING, Input.BACKEND_READY): State.RELAY,
    (State.XCLIENT_REPLY, Input.BACKEND_READY): State.RELAY,
    (State.RELAY, Input.AUTH_SENT): State.AUTH_PENDING,
    (State.AUTH_PENDING, Input.CHALLENGE): State.SASL_RESPONSE,
    (State.SASL_RESPONSE, Input.RESPONSE_SENT): State.AUTH_PENDING,
    (State.AUTH_PENDING, Input.AUTH_DONE): State.RELAY,
    **ending_transitions(State, Input),
}

_CRLF: Final = b"\r\n"
#: RFC 1939 section 3: a multi-line response ends with a line holding only
#: "."; the status line's CRLF counts as the first two octets.
_END_OF_BODY: Final = b"\r\n.\r\n"
_END_OF_LIST: Final = b".\r\n"
#: A status line (RFC 1939 section 3) or a SASL continuation (RFC 5034
#: section 4), whose text may be absent.
_STATUS_LINE: Final = re.compile(rb"(\+OK|-ERR|\+)(?: [^\r\n]*)?\r\n")
_OK: Final = b"+OK"
_CONTINUATION: Final = b"+"
#: Dovecot's response code for peers in its login_trusted_networks.
_XCLIENT_GREETING: Final = b"+OK [XCLIENT] "
#: Capabilities the proxy terminates (STLS) or reserves for itself.
_PROXY_ONLY: Final = frozenset({b"STLS", b"XCLIENT"})
#: Capabilities that announce a way to send credentials.
_LOGIN_CAPABILITIES: Final = frozenset({b"USER", b"SASL"})
_LOGIN_COMMANDS: Final = frozenset({b"USER", b"PASS", b"APOP", b"AUTH"})
#: XOIP is Dovecot's alias of XCLIENT ADDR= (for Zimbra's proxy).
_IDENTITY_COMMANDS: Final = frozenset({b"XCLIENT", b"XOIP"})
#: RFC 5034 section 4: the client's way to abandon an exchange.
_CANCEL: Final = b"*\r\n"

_BAD_LINE: Final = b"-ERR bare CR or LF received\r\n"
_BAD_SYNTAX: Final = b"-ERR bad syntax\r\n"
_NOT_PERMITTED: Final = b"-ERR command not permitted\r\n"
_AUTH_NEEDS_TLS: Final = b"-ERR [AUTH] Authentication requires TLS: use STLS first\r\n"
_TLS_FIRST: Final = b"-ERR TLS required: use STLS first\r\n"
_STLS_SYNTAX: Final = b"-ERR Syntax: STLS\r\n"
_TLS_READY: Final = b"+OK Begin TLS negotiation\r\n"
_TLS_ACTIVE: Final = b"-ERR TLS already active\r\n"
_TLS_UNAVAILABLE: Final = b"-ERR TLS not available: session already started in plaintext\r\n"
_NOOP: Final = b"+OK\r\n"
_CAPA_STATUS: Final = b"+OK Capability list follows\r\n"


class _Shape(enum.Enum):
    """What the backend's response to a command looks like."""

    #: One status line.
    LINE = enum.auto()
    #: After +OK, a multi-line body streamed to the client untouched.
    BODY = enum.auto()
    #: After +OK, a CAPA list to filter.
    CAPABILITIES = enum.auto()
    #: After +OK, the SASL mechanisms (AUTH without argument, as Dovecot and
    #: Outlook use it), to filter.
    MECHANISMS = enum.auto()
    #: A SASL exchange: "+" continuations until +OK or -ERR.
    EXCHANGE = enum.auto()


def _shape(verb: bytes, arg: bytes) -> _Shape:
    if verb == b"CAPA":
        return _Shape.CAPABILITIES
    if verb == b"AUTH":
        return _Shape.EXCHANGE if arg else _Shape.MECHANISMS
    if verb in (b"RETR", b"TOP") or (verb in (b"LIST", b"UIDL") and not arg):
        return _Shape.BODY
    return _Shape.LINE


@dataclass
class _Owed(Owed):
    """A response owed, and what it looks like."""

    shape: _Shape


class _EndOfBody:
    """Finds where a multi-line body ends in the stream that carries it.

    Nothing is held back, since the body passes unchanged: only its last
    four octets are remembered, in case the end line straddles two reads.
    """

    def __init__(self) -> None:
        self._recent = _CRLF

    def find(self, data: bytes) -> int | None:
        """How many octets of ``data`` finish the body, or None if all of
        them belong to it."""
        window = self._recent + data
        end = window.find(_END_OF_BODY)
        if end >= 0:
            return end + len(_END_OF_BODY) - len(self._recent)
        self._recent = window[-(len(_END_OF_BODY) - 1) :]
        return None


def _indicator(line: bytes) -> bytes:
    """``+OK``, ``-ERR`` or ``+`` (a continuation), from a status line."""
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise RemoteProtocolError(f"malformed response from backend: {line[:64]!r}")
    return match[1]


def _require_ok(line: bytes, what: str) -> None:
    if _indicator(line) != _OK:
        raise RemoteProtocolError(f"{what}: {_text(line)}")


def _text(line: bytes) -> str:
    """A backend line, for logs and error messages."""
    return line.rstrip(b"\r\n").decode("utf-8", "replace")


def _list_item(line: bytes) -> bytes:
    """A line of a multi-line list without its CRLF and dot-stuffing."""
    if not line.endswith(_CRLF) or b"\r" in line[:-2]:
        raise RemoteProtocolError(f"malformed list line from backend: {line[:64]!r}")
    return line[1:-2] if line.startswith(b".") else line[:-2]


def _multiline(status: bytes, items: Iterable[bytes]) -> bytes:
    """A multi-line response (RFC 1939 section 3): dot-stuffed lines, then "."."""
    stuffed = (b"." + item if item.startswith(b".") else item for item in items)
    return status + b"".join(item + _CRLF for item in stuffed) + _END_OF_LIST


def _channel_bound(mechanism: bytes) -> bool:
    return mechanism.upper().endswith(b"-PLUS")


def _advertised(capabilities: Iterable[bytes], *, login: bool) -> list[bytes]:
    """The CAPA lines a client may see: no proxy-only capability, the login
    ones only when ``login`` and then without channel-binding mechanisms."""
    kept = []
    for capability in capabilities:
        keyword = capability.split(b" ", 1)[0].upper()
        if keyword in _PROXY_ONLY or (keyword in _LOGIN_CAPABILITIES and not login):
            continue
        if keyword == b"SASL":
            mechanisms = [name for name in capability.split()[1:] if not _channel_bound(name)]
            if mechanisms:
                kept.append(b" ".join([b"SASL", *mechanisms]))
        else:
            kept.append(capability)
    return kept


class POP3Machine(PipelinedMachine[State, Input, _Owed]):
    """One POP3 session; see the module docstring."""

    states = State
    inputs = Input
    transitions = TRANSITIONS
    unavailable_reply = b"-ERR [SYS/TEMP] %s backend unavailable\r\n"
    timeout_reply = b"-ERR %s autologout: idle for too long\r\n"
    busy_reply_template = b"-ERR [SYS/TEMP] %s too many connections\r\n"
    #: RFC 3206 section 4: SYS/TEMP, a problem that may go away.
    shutdown_reply = b"-ERR [SYS/TEMP] %s Server shutting down\r\n"
    early_tls_reply = b"-ERR TLS handshake received before STLS\r\n"
    upgrade_command = "STLS"
    line_too_long_reply = b"-ERR line too long\r\n"

    def __init__(self, settings: SessionSettings, peer: Peer) -> None:
        greeting = b"+OK %s POP3 starttls-proxy ready\r\n" % settings.hostname.encode()
        super().__init__(settings, peer, greeting=greeting)
        self._capabilities = [line.encode() for line in settings.capabilities]
        self._responses = LineBuffer(settings.max_reply_line_length)
        self._greeting = b""
        #: Set while a multi-line body streams to the client.
        self._body: _EndOfBody | None = None
        #: While a list to filter is read: its status line, then its items.
        self._listing: list[bytes] | None = None
        self._steps = {
            State.PRE_TLS: self._command_step,
            State.RELAY: self._command_step,
            State.SASL_RESPONSE: self._sasl_step,
        }

    def _backend_data(self, data: bytes) -> None:
        self._responses.feed(data)
        self._pump_backend()

    @property
    def _mid_transfer(self) -> bool:
        # A list to filter is held whole, so the client has none of it yet.
        return self._body is not None

    # ------------------------------------------------------------------
    # The client's byte stream.

    def _command(self, line: bytes) -> None:
        if not clean_line(line):
            self._answer(_BAD_LINE)
            return
        verb, _, arg = line[:-2].partition(b" ")
        verb, arg = verb.upper(), arg.strip()
        if not verb:
            self._answer(_BAD_SYNTAX)
        elif verb in _IDENTITY_COMMANDS:
            self._answer(_NOT_PERMITTED)
        elif self.state is State.PRE_TLS:
            self._local_command(line, verb, arg)
        elif verb == b"STLS":
            self._answer(_TLS_ACTIVE if self._tls else _TLS_UNAVAILABLE)
        else:
            self._send_backend(line)
            shape = _shape(verb, arg)
            self._owed.append(_Owed(verb, shape))
            if shape is _Shape.EXCHANGE:
                self._go(Input.AUTH_SENT)

    def _local_command(self, line: bytes, verb: bytes, arg: bytes) -> None:
        if verb == b"CAPA":
            login = not self.settings.require_tls
            capabilities = [*_advertised(self._capabilities, login=login), b"STLS"]
            self._answer(_multiline(_CAPA_STATUS, capabilities))
        elif verb == b"NOOP":
            self._answer(_NOOP)
        elif verb == b"QUIT":
            self._answer(b"+OK %s closing connection\r\n" % self._host)
            self._end("client quit", clean=True)
        elif verb == b"STLS" and arg:
            self._answer(_STLS_SYNTAX)
        elif verb == b"STLS":
            self._upgrade(_TLS_READY)
        elif self.settings.require_tls:
            self._answer(_AUTH_NEEDS_TLS if verb in _LOGIN_COMMANDS else _TLS_FIRST)
        else:
            self._start_plaintext_relay(line)

    def _sasl_step(self) -> bool:
        line = self._client.pop_line()
        if line is None:
            return False
        if isinstance(line, LineTooLong) or not clean_line(line):
            # The backend waits for a response that cannot be relayed:
            # cancel, and its -ERR answers the client.
            line = _CANCEL
        self._send_backend(line)
        self._go(Input.RESPONSE_SENT)
        return True

    # ------------------------------------------------------------------
    # The backend's responses.

    def _pump_backend(self) -> None:
        while not self.finished:
            if self._body is not None:
                if not self._stream_body(self._body):
                    return
                continue
            line = self._responses.pop_line()
            if line is None:
                return
            if isinstance(line, LineTooLong):
                raise RemoteProtocolError("response line too long from backend")
            self._backend_line(line)

    def _stream_body(self, body: _EndOfBody) -> bool:
        """Forward what has come of a body; True at its end."""
        data = self._responses.pop_all()
        if not data:
            return False
        end = body.find(data)
        if end is None:
            self._send_client(data)
            return False
        self._send_client(data[:end])
        self._responses.feed(data[end:])
        self._body = None
        self._complete()
        return True

    def _backend_line(self, line: bytes) -> None:
        if self.state in (State.BACKEND_GREETING, State.XCLIENT_REPLY) and len(self._responses):
            # One line, then the backend waits for the proxy's command: what
            # comes before that command cannot answer it.
            raise RemoteProtocolError(f"backend spoke out of turn after: {_text(line)}")
        if self.state is State.BACKEND_GREETING:
            _require_ok(line, "backend refused the session")
            self._greeting = line
            if self.settings.identity is BackendIdentity.POP3_XCLIENT:
                if not line.startswith(_XCLIENT_GREETING):
                    raise RemoteProtocolError(
                        "backend does not offer XCLIENT to the proxy: add the proxy's"
                        " address to Dovecot's login_trusted_networks"
                    )
                self._send_backend(self._xclient())
                self._go(Input.PROXY_XCLIENT)
            else:
                self._ready()
        elif self.state is State.XCLIENT_REPLY:
            _require_ok(line, "backend refused XCLIENT")
            self._ready()
        elif self.state in (State.RELAY, State.AUTH_PENDING, State.SASL_RESPONSE):
            self._relay_line(line)
        else:
            raise RemoteProtocolError(f"backend response in state {self.state.name}")

    def _xclient(self) -> bytes:
        """Dovecot's XCLIENT; without TLS, CLIENT-TRANSPORT keeps a trusted
        proxy's session from counting as secured."""
        transport = b"TLS" if self._tls else b"insecure"
        address = self.peer.client_address.encode()
        port = self.peer.client_port
        return b"XCLIENT ADDR=%s PORT=%d CLIENT-TRANSPORT=%s\r\n" % (address, port, transport)

    def _ready(self) -> None:
        if self.settings.tls_mode is TLSMode.IMPLICIT:
            # The client has not been greeted yet; XCLIENT is the proxy's.
            greeting = self._greeting
            if greeting.startswith(_XCLIENT_GREETING):
                greeting = _OK + b" " + greeting[len(_XCLIENT_GREETING) :]
            self._send_client(greeting)
        super()._ready()

    def _relay_line(self, line: bytes) -> None:
        if not self._owed:
            raise RemoteProtocolError(f"unsolicited response from backend: {_text(line)}")
        shape = self._owed[0].shape
        if self._listing is not None:
            if line != _END_OF_LIST:
                self._listing.append(_list_item(line))
                return
            status, items = self._listing[0], self._listing[1:]
            self._listing = None
            if shape is _Shape.CAPABILITIES:
                items = _advertised(items, login=True)
            else:
                items = [name for name in items if not _channel_bound(name)]
            self._send_client(_multiline(status, items))
            self._complete()
            return
        indicator = _indicator(line)
        if indicator == _CONTINUATION:
            if shape is not _Shape.EXCHANGE or self.state is not State.AUTH_PENDING:
                raise RemoteProtocolError(f"unexpected continuation from backend: {_text(line)}")
            self._send_client(line)
            self._go(Input.CHALLENGE)
            self._pump_client()
        elif indicator == _OK and shape in (_Shape.CAPABILITIES, _Shape.MECHANISMS):
            self._listing = [line]
        else:
            self._send_client(line)
            if indicator == _OK and shape is _Shape.BODY:
                self._body = _EndOfBody()
            else:
                self._complete()

    def _complete(self) -> None:
        """The response at the head of the queue has been relayed whole."""
        owed = self._settle()
        if owed is not None and owed.shape is _Shape.EXCHANGE:
            if self.state is State.SASL_RESPONSE:
                raise RemoteProtocolError("backend ended the SASL exchange before the response")
            self._go(Input.AUTH_DONE)
            self._pump_client()


class POP3CapabilityProbe(LineProbe):
    """Reads the greeting, sends CAPA, keeps its lines, says QUIT."""

    def __init__(self, hostname: str) -> None:
        super().__init__(hostname)
        self._greeted = False
        #: The CAPA lines read so far, once its +OK has come.
        self._capabilities: list[str] | None = None

    def _line(self, line: bytes) -> None:
        if self._capabilities is not None:
            if line == _END_OF_LIST:
                self.result = tuple(self._capabilities)
                self._send = b"QUIT\r\n"
            else:
                self._capabilities.append(_list_item(line).decode("utf-8", "replace"))
        elif not self._greeted:
            if len(self._lines):
                # What comes before the probe's CAPA cannot answer it.
                raise RemoteProtocolError(f"backend spoke out of turn after: {_text(line)}")
            _require_ok(line, "backend refused the session")
            self._greeted = True
            self._send = b"CAPA\r\n"
        else:
            _require_ok(line, "backend refused CAPA")
            self._capabilities = []
