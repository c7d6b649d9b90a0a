"""IMAP: STARTTLS termination in front of a server such as Dovecot.

Theory of operation
-------------------
*Before TLS* the proxy is the IMAP server (RFC 9051, and RFC 3501 for
IMAP4rev1) and no backend exists yet. Its greeting lists the backend's
capabilities minus those it terminates, plus STARTTLS; with ``require_tls``
also LOGINDISABLED and no AUTH= at all (RFC 9051 section 6.2.3), and every
command but CAPABILITY, NOOP, LOGOUT, ID, STARTTLS (and COMPRESS, below)
gets ``NO [PRIVACYREQUIRED]``. Without ``require_tls`` the first such command
starts a *plaintext relay*: the backend is connected and the session goes on
below without TLS.

*STARTTLS* (RFC 9051 section 6.2.1, RFC 2595 section 3.1) gets its tagged OK
and the client goes to a TLS worker. Bytes pipelined after it come back in
``StartTLS.discarded``, bytes sent before the handshake ends are dropped,
never interpreted (CVE-2011-0411). Implicit TLS (RFC 8314) starts here.

*The relay*: the backend's greeting is swallowed (an implicit-TLS client,
never greeted, gets it). With IMAP_ID identity the proxy first sends an ID
command of its own, alone, with the client's addresses as Dovecot's login
proxy does; Dovecot honours only the first ID of a trusted peer, which is
also why a client's ID is always answered by the proxy (RFC 2971): forwarded,
it could carry an ``x-originating-ip`` of the client's choosing.

*Commands* are parsed from their tag and verb, then relayed unchanged but
for those the proxy answers: STARTTLS, ID, and COMPRESS, refused (RFC 4978:
after it both streams are deflated and could no longer be watched, so it is
never advertised either). A line ending in a literal ``{n}`` (section 4.3;
``~{n}`` of RFC 3516 too) is followed by n octets of data that are never
parsed, then by the rest of the command. Every literal reaches the backend
only after the backend asked for it with a ``+`` continuation: a client's
synchronizing literal waits for it anyway, and a non-synchronizing ``{n+}``
(RFC 7888) is sent on as ``{n}`` with its ``+`` kept from the client. A
backend may refuse a command before reading its literal (an unknown command,
a parse error) and would then read the octets as commands the proxy never
saw; a tagged refusal instead of the ``+`` makes the proxy drop them too.
While a command waits for a ``+`` the client's later bytes are held, so that
each ``+`` belongs to one command; a tag already in flight is refused, so
that each tagged response does. AUTHENTICATE (RFC 9051 section 6.2.2, SASL-IR
of RFC 4959) and IDLE (RFC 2177) are the other commands that wait for a
``+``: what the client sends after it is a SASL response, which must look
like one, or the DONE that ends IDLE.

*Responses* are read with the same literal awareness, so that message
content never looks like a response. Only data responses carry literals;
status responses end in free text (section 7.1) whatever it looks like.
Lines too long to hold are streamed, except capability lists: untagged
CAPABILITY and ``[CAPABILITY ...]`` codes lose STARTTLS, COMPRESS=, the SASL
``-PLUS`` mechanisms, whose channel binding (RFC 5056) cannot cross a
terminated TLS session, and on a TLS client LOGINDISABLED, which speaks of
the proxy's plaintext hop. The proxy's own answers wait for the end of the
backend response being relayed, never cutting into it; responses carry tags
and need no other ordering.

*Limits*: a client line over ``max_line_length`` or a client literal over
``max_literal_size`` is refused with BAD ``[TOOBIG]``, or ends the session
once the backend holds the start of its command, which IMAP cannot take
back. ``max_reply_line_length`` bounds the backend lines the proxy must see
whole; a larger literal from the backend ends the session.

*Shutdown*: the client gets BYE [UNAVAILABLE] (RFC 5530 section 3), except
in the middle of a literal or of a response relayed to it, where the
connection just closes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
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
from protocols._buffers import LineTooLong
from protocols._line import LineMachine, LineProbe, clean_line, opening_transitions
from protocols.imap_syntax import (
    ATOM,
    SASL_RESPONSE,
    TAG,
    Head,
    Literal,
    ResponseReader,
    capability_atoms,
    literal_at_end,
    tag_of,
    untagged,
    visible_capabilities,
    with_visible_capabilities,
)


class State(enum.Enum):
    """Where an IMAP session stands."""

    #: The proxy answers the client itself; no backend yet.
    PRE_TLS = enum.auto()
    #: STARTTLS accepted (or implicit TLS): waiting for the worker's handshake.
    TLS_HANDSHAKE = enum.auto()
    #: ``OpenBackend`` queued, waiting for ``backend_connected``.
    BACKEND_CONNECTING = enum.auto()
    #: Waiting for the backend's ``* OK`` greeting.
    BACKEND_GREETING = enum.auto()
    #: The proxy's ID sent; waiting for its tagged response.
    BACKEND_ID = enum.auto()
    #: Client commands go to the backend, responses come back.
    RELAY = enum.auto()
    #: A relayed command waits for the backend's ``+``; client bytes are held.
    CONTINUATION = enum.auto()
    #: AUTHENTICATE: the client's next line answers the backend's challenge.
    SASL = enum.auto()
    #: IDLE accepted: the client's next line should be DONE.
    IDLING = enum.auto()
    #: The session ended; ``CloseConnection`` has been queued.
    CLOSED = enum.auto()
    #: An impossible input or a misbehaving backend ended the session.
    ERROR = enum.auto()


class Input(enum.Enum):
    """What moves an IMAP session from one state to another."""

    CLIENT_STARTTLS = enum.auto()  #: The client issued an acceptable STARTTLS.
    PLAINTEXT_RELAY = enum.auto()  #: Without ``require_tls``, a command needs the backend.
    TLS_ESTABLISHED = enum.auto()  #: The TLS worker finished the handshake.
    BACKEND_CONNECTED = enum.auto()  #: The driver connected the backend.
    PROXY_ID = enum.auto()  #: The proxy sent its ID to announce the client.
    BACKEND_READY = enum.auto()  #: The backend is ready for the client's commands.
    AWAIT_CONTINUATION = enum.auto()  #: A relayed command needs the backend's ``+``.
    GO_AHEAD = enum.auto()  #: The backend's ``+`` for a literal: its octets follow.
    CHALLENGE = enum.auto()  #: The backend's ``+`` during AUTHENTICATE.
    SASL_RESPONSE = enum.auto()  #: The client's SASL response was forwarded.
    IDLE_ACCEPTED = enum.auto()  #: The backend's ``+`` for IDLE.
    DONE = enum.auto()  #: The client's DONE was forwarded.
    COMPLETED = enum.auto()  #: The waiting command got its tagged response instead.
    CLOSE = enum.auto()  #: The session ends (logout, timeout, either side gone, refused client).
    VIOLATION = enum.auto()  #: A ``ProtocolError`` ended the session.


_WAITING: Final = (State.CONTINUATION, State.SASL, State.IDLING)
_RELAYING: Final = (State.RELAY, *_WAITING)

TRANSITIONS: Final[Mapping[tuple[State, Input], State]] = {
    **opening_transitions(State, Input),
    (State.BACKEND_GREETING, Input.PROXY_ID): State.BACKEND_ID,
    (State.BACKEND_GREETING, Input.BACKEND_READY): State.RELAY,
    (State.BACKEND_ID, Input.BACKEND_READY): State.RELAY,
    (State.RELAY, Input.AWAIT_CONTINUATION): State.CONTINUATION,
    (State.CONTINUATION, Input.GO_AHEAD): State.RELAY,
    (State.CONTINUATION, Input.CHALLENGE): State.SASL,
    (State.SASL, Input.SASL_RESPONSE): State.CONTINUATION,
    (State.CONTINUATION, Input.IDLE_ACCEPTED): State.IDLING,
    (State.IDLING, Input.DONE): State.RELAY,
    **{(state, Input.COMPLETED): State.RELAY for state in _WAITING},
    **ending_transitions(State, Input),
}

#: The tag of the proxy's own ID; sent before any client command, it cannot
#: be mistaken for one.
_ID_TAG: Final = b"stp0"
_ID_ANSWER: Final = b'* ID ("name" "starttls-proxy")\r\n'

#: Commands the proxy answers itself before TLS, once their arguments are in.
_PRE_TLS_LOCAL: Final = frozenset({b"CAPABILITY", b"NOOP", b"LOGOUT", b"ID"})
_PRE_TLS_ALLOWED: Final = _PRE_TLS_LOCAL | {b"STARTTLS"}
_LOCAL_ANSWERS: Final[Mapping[bytes, bytes]] = {
    b"CAPABILITY": b"* CAPABILITY %(caps)s\r\n%(tag)s OK CAPABILITY completed\r\n",
    b"NOOP": b"%(tag)s OK NOOP completed\r\n",
    b"LOGOUT": b"* BYE %(host)s IMAP4 starttls-proxy logging out\r\n"
    b"%(tag)s OK LOGOUT completed\r\n",
    b"ID": _ID_ANSWER + b"%(tag)s OK ID completed\r\n",
}
_BARE: Final = b"Bare CR or LF received"


class _Fate(enum.Enum):
    """What becomes of the rest of a client command."""

    #: Relayed to the backend.
    FORWARD = enum.auto()
    #: Answered by the proxy once its last line is in.
    LOCAL = enum.auto()
    #: Already answered; what is left of it is dropped.
    DROP = enum.auto()


@dataclass
class _Command:
    """A client command whose lines and literals are still coming."""

    tag: bytes
    verb: bytes
    fate: _Fate
    #: The backend has its first line and waits for the rest.
    open_at_backend: bool = False


@dataclass(frozen=True)
class _Wait:
    """A relayed command that waits for the backend's ``+``: for a literal,
    or for AUTHENTICATE or IDLE."""

    tag: bytes
    verb: bytes
    literal: Literal | None


class IMAPMachine(LineMachine[State, Input]):
    """One IMAP session; see the module docstring."""

    states = State
    inputs = Input
    transitions = TRANSITIONS
    #: RFC 5530 section 3: UNAVAILABLE, a temporary failure.
    unavailable_reply = b"* BYE [UNAVAILABLE] %s backend unavailable\r\n"
    timeout_reply = b"* BYE %s Autologout; idle for too long\r\n"
    busy_reply_template = b"* BYE [UNAVAILABLE] %s too many connections\r\n"
    shutdown_reply = b"* BYE [UNAVAILABLE] %s Server shutting down\r\n"
    early_tls_reply = b"* BYE TLS handshake received before STARTTLS\r\n"
    upgrade_command = "STARTTLS"

    def __init__(self, settings: SessionSettings, peer: Peer) -> None:
        backend = [atom.encode() for atom in settings.capabilities]
        atoms = [
            *visible_capabilities(backend, tls=False, auth=not settings.require_tls),
            b"STARTTLS",
        ]
        if settings.require_tls and b"LOGINDISABLED" not in map(bytes.upper, atoms):
            atoms.append(b"LOGINDISABLED")
        capabilities = b" ".join(atoms)
        greeting = b"* OK [CAPABILITY %s] %s IMAP4 starttls-proxy ready\r\n" % (
            capabilities,
            settings.hostname.encode(),
        )
        super().__init__(settings, peer, greeting=greeting)
        self._capabilities = capabilities
        self._responses = ResponseReader(settings.max_reply_line_length, settings.max_literal_size)
        #: The command whose next line continues it, after a literal.
        self._command: _Command | None = None
        #: Octets of the current client literal still to forward or drop.
        self._literal = 0
        self._wait: _Wait | None = None
        #: Tags of the relayed commands still without a tagged response.
        self._in_flight: set[bytes] = set()
        #: The proxy's own answers, held while a backend response is relayed.
        self._held: list[bytes] = []
        #: Whether the rest of the backend response being read goes to the client.
        self._relay_rest = False
        self._bye = False
        self._steps = {
            State.PRE_TLS: self._command_step,
            State.RELAY: self._command_step,
            State.SASL: self._sasl_step,
            State.IDLING: self._idle_step,
        }

    def _backend_data(self, data: bytes) -> None:
        self._responses.feed(data)
        while not self.finished and (piece := self._responses.pop()) is not None:
            if isinstance(piece, Head):
                self._relay_rest = False
                self._response(piece)
            elif self._relay_rest:
                self._send_client(piece)
            if self._responses.between_responses:
                self._release_held()

    def _backend_closed(self) -> None:
        if self._bye:
            self._end("backend said BYE", clean=True)
        else:
            self._end("backend closed", reply=self._unavailable)

    @property
    def _mid_transfer(self) -> bool:
        # A response partly relayed, or a client literal under way: its
        # octets arriving, or announced non-synchronizing and held until the
        # backend's "+".
        wait = self._wait
        return (
            not self._responses.between_responses
            or self._literal > 0
            or (wait is not None and wait.literal is not None and wait.literal.nonsync)
        )

    def _answer(self, reply: bytes) -> None:
        if self._responses.between_responses:
            self._send_client(reply)
        else:
            self._held.append(reply)

    def _release_held(self) -> None:
        for answer in self._held:
            self._send_client(answer)
        self._held.clear()

    # ------------------------------------------------------------------
    # The client's byte stream.

    def _command_step(self) -> bool:
        command = self._command
        if self._literal:
            data = self._client.pop_bytes(self._literal)
            self._literal -= len(data)
            if data and command is not None and command.fate is _Fate.FORWARD:
                self._send_backend(data)
            return bool(data)
        line = self._client.pop_line()
        if line is None:
            return False
        if isinstance(line, bytes) and clean_line(line):
            if command is None:
                self._first_line(line)
            else:
                self._command_line(command, line)
            return True
        complaint = b"[TOOBIG] Line too long" if isinstance(line, LineTooLong) else _BARE
        if command is not None and command.open_at_backend:
            # The backend holds the start of this command, and IMAP has no
            # way to take it back.
            self._end("unusable line in a relayed command", reply=b"* BYE %s\r\n" % complaint)
            return False
        self._command = None
        self._answer(b"* BAD %s\r\n" % complaint)
        return True

    def _first_line(self, line: bytes) -> None:
        tag, _, rest = line[:-2].partition(b" ")
        verb, _, arguments = rest.partition(b" ")
        verb = verb.upper()
        refusal = self._refusal(tag, verb, arguments)
        if refusal is not None:
            self._answer(refusal)
            fate = _Fate.DROP
        elif verb == b"STARTTLS":
            self._upgrade(b"%s OK Begin TLS negotiation now\r\n" % tag)
            return
        elif verb == b"ID" or (self.state is State.PRE_TLS and verb in _PRE_TLS_LOCAL):
            fate = _Fate.LOCAL
        elif self.state is State.PRE_TLS:
            self._start_plaintext_relay(line)
            return
        else:
            fate = _Fate.FORWARD
        self._command_line(_Command(tag, verb, fate), line)

    def _refusal(self, tag: bytes, verb: bytes, arguments: bytes) -> bytes | None:
        """The proxy's answer to a command it will not run, or ``None``."""
        if not TAG.fullmatch(tag):
            return b"* BAD Invalid tag\r\n"
        if not ATOM.fullmatch(verb):
            return b"%s BAD Missing or invalid command\r\n" % tag
        if tag in self._in_flight:
            return b"%s BAD Tag already in use\r\n" % tag
        if verb == b"COMPRESS":
            return b"%s NO [CANNOT] COMPRESS is not available through this proxy\r\n" % tag
        if verb == b"STARTTLS" and self._tls:
            return b"%s BAD TLS already active\r\n" % tag
        if verb == b"STARTTLS" and self.state is not State.PRE_TLS:
            return b"%s BAD STARTTLS not available: session started in plaintext\r\n" % tag
        if verb == b"STARTTLS" and arguments:
            return b"%s BAD STARTTLS takes no arguments\r\n" % tag
        if (
            self.state is State.PRE_TLS
            and self.settings.require_tls
            and verb not in _PRE_TLS_ALLOWED
        ):
            return b"%s NO [PRIVACYREQUIRED] TLS required: use STARTTLS first\r\n" % tag
        return None

    def _command_line(self, command: _Command, line: bytes) -> None:
        """One line of ``command``, its first or one after a literal."""
        literal = literal_at_end(line)
        if literal is not None and literal.size > self.settings.max_literal_size:
            if command.open_at_backend:
                self._end("literal too large", reply=b"* BYE [TOOBIG] Literal too large\r\n")
                return
            if command.fate is not _Fate.DROP:
                self._answer(b"%s BAD [TOOBIG] Literal too large\r\n" % command.tag)
                command.fate = _Fate.DROP
        self._command = command if literal is not None else None
        if command.fate is _Fate.FORWARD:
            self._forward(command, line, literal)
        elif literal is None:
            if command.fate is _Fate.LOCAL:
                self._local_answer(command)
        elif literal.nonsync:
            self._literal = literal.size
        elif command.fate is _Fate.LOCAL:
            self._answer(b"+ Ready for literal data\r\n")
            self._literal = literal.size
        else:
            # A refused command's synchronizing literal is never sent.
            self._command = None

    def _local_answer(self, command: _Command) -> None:
        values = {b"tag": command.tag, b"caps": self._capabilities, b"host": self._host}
        self._answer(_LOCAL_ANSWERS[command.verb] % values)
        if command.verb == b"LOGOUT":
            self._end("client logged out", clean=True)

    def _forward(self, command: _Command, line: bytes, literal: Literal | None) -> None:
        if not command.open_at_backend:
            command.open_at_backend = True
            self._in_flight.add(command.tag)
        if literal is not None and literal.nonsync:
            # Sent on as synchronizing: see the module docstring.
            line = line[: -len(b"+}\r\n")] + b"}\r\n"
        self._send_backend(line)
        if literal is not None or command.verb in (b"AUTHENTICATE", b"IDLE"):
            self._wait = _Wait(command.tag, command.verb, literal)
            self._go(Input.AWAIT_CONTINUATION)

    def _sasl_step(self) -> bool:
        line = self._client.pop_line()
        if line is None:
            return False
        # Anything but base64 cancels the exchange: if the backend has ended
        # it meanwhile, a line without a space cannot pass for a command.
        if isinstance(line, LineTooLong) or not SASL_RESPONSE.fullmatch(line):
            line = b"*\r\n"
        self._send_backend(line)
        self._go(Input.SASL_RESPONSE)
        return True

    def _idle_step(self) -> bool:
        line = self._client.pop_line()
        if line is None:
            return False
        if isinstance(line, bytes) and line.upper() == b"DONE\r\n":
            self._send_backend(line)
            self._wait = None
            self._go(Input.DONE)
        else:
            # Forwarded, it would end IDLE at the backend without being run
            # there as the command the proxy took it for.
            self._answer(b"* BAD Expected DONE\r\n")
        return True

    # ------------------------------------------------------------------
    # The backend's responses.

    def _response(self, head: Head) -> None:
        if self.state is State.BACKEND_GREETING:
            self._greeting(head)
        elif self.state is State.BACKEND_ID:
            self._id_response(head)
        elif self.state in _RELAYING:
            self._relay_response(head)
        else:
            raise RemoteProtocolError(f"backend response in state {self.state.name}")

    def _greeting(self, head: Head) -> None:
        if untagged(head.data) != b"OK":
            text = head.data.decode("utf-8", "replace").strip()
            raise RemoteProtocolError(f"backend refused the session: {text}")
        if self.settings.tls_mode is TLSMode.IMPLICIT:
            # The client has not been greeted yet.
            self._relay(head)
        if self.settings.identity is BackendIdentity.IMAP_ID:
            self._send_backend(self._identity())
            self._go(Input.PROXY_ID)
        else:
            self._ready()

    def _identity(self) -> bytes:
        """Dovecot's forwarding fields (its forwarding_parameters documentation)."""
        peer = self.peer
        fields = (
            (b"x-originating-ip", peer.client_address.encode()),
            (b"x-originating-port", b"%d" % peer.client_port),
            (b"x-connected-ip", peer.local_address.encode()),
            (b"x-connected-port", b"%d" % peer.local_port),
            (b"x-client-transport", b"TLS" if self._tls else b"insecure"),
        )
        pairs = b" ".join(b'"%s" "%s"' % pair for pair in fields)
        return b"%s ID (%s)\r\n" % (_ID_TAG, pairs)

    def _id_response(self, head: Head) -> None:
        word = untagged(head.data)
        if word == b"BYE":
            text = head.data.decode("utf-8", "replace").strip()
            raise RemoteProtocolError(f"backend refused the proxy's ID: {text}")
        if word is None:
            if tag_of(head.data) != _ID_TAG:
                raise RemoteProtocolError(
                    f"unexpected response to the proxy's ID: {head.data[:64]!r}"
                )
            # NO or BAD too: an untrusted proxy is the backend's to log.
            self._ready()

    def _relay(self, head: Head) -> None:
        """Send a response on, its capability list filtered."""
        filtered = with_visible_capabilities(head.data, tls=self._tls)
        if filtered is not None and not head.whole:
            raise RemoteProtocolError("capability list too long from backend")
        self._send_client(head.data if filtered is None else filtered)
        self._relay_rest = True

    def _relay_response(self, head: Head) -> None:
        data = head.data
        if data.startswith(b"+"):
            self._continuation(head)
            return
        word = untagged(data)
        tag = None if word is not None else tag_of(data)
        if word is not None:
            self._bye = self._bye or word == b"BYE"
        elif tag in self._in_flight:
            self._in_flight.remove(tag)
        else:
            raise RemoteProtocolError(f"unexpected response from backend: {data[:64]!r}")
        self._relay(head)
        wait = self._wait
        if wait is not None and tag == wait.tag:
            self._wait = None
            if wait.literal is not None and wait.literal.nonsync and self._command is not None:
                # The client sent the octets anyway; they are not commands.
                self._command.fate = _Fate.DROP
                self._command.open_at_backend = False
                self._literal = wait.literal.size
            elif wait.literal is not None:
                self._command = None
            self._go(Input.COMPLETED)
            self._pump_client()

    def _continuation(self, head: Head) -> None:
        wait = self._wait
        if self.state is not State.CONTINUATION or wait is None:
            raise RemoteProtocolError(f"unexpected continuation from backend: {head.data[:64]!r}")
        if wait.literal is None:
            self._relay(head)
            self._go(Input.CHALLENGE if wait.verb == b"AUTHENTICATE" else Input.IDLE_ACCEPTED)
        else:
            if not wait.literal.nonsync:
                self._relay(head)
            self._wait = None
            self._literal = wait.literal.size
            self._go(Input.GO_AHEAD)
        self._pump_client()


class IMAPCapabilityProbe(LineProbe):
    """Reads the greeting's capabilities, or asks CAPABILITY, then logs out."""

    def __init__(self, hostname: str) -> None:
        super().__init__(hostname)
        self._greeted = False
        self._atoms: list[bytes] | None = None

    def _line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        atoms = capability_atoms(line)
        if atoms is not None:
            self._atoms = atoms
        if not self._greeted:
            if not line.upper().startswith(b"* OK"):
                self.error = f"backend refused the session: {text}"
                return
            self._greeted = True
            if self._atoms is None:
                self._send = b"p1 CAPABILITY\r\n"
                return
        elif not line.startswith(b"p1 "):
            return
        elif not line.upper().startswith(b"P1 OK") or self._atoms is None:
            self.error = f"backend refused CAPABILITY: {text}"
            return
        self.result = tuple(atom.decode("ascii", "replace") for atom in self._atoms)
        self._send = b"p2 LOGOUT\r\n"
