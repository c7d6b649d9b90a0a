"""Shared vocabulary of the protocol machines.

Theory of operation
-------------------
Every protocol module holds one *machine*: a sans-I/O object that sits between
the client and the backend for the whole life of a connection.  The driver
(the proxy's ``Session``) feeds it what happened on the wire --
``receive_data(side, data)``, ``receive_eof(side)``, ``tls_established(info)``,
``backend_connected()``, ``backend_failed(reason)`` -- and then drains
``next_command()`` until it returns ``None``.  Each command is exactly one
transport action (events in, commands out, as in mitmproxy's proxy core).

States are enums and legal moves are a transitions table (``transition``).

Errors
------
Two kinds, as in h11, both ``ProtocolError``:

``RemoteProtocolError``
    A peer broke its protocol beyond what one reply mends: a backend's
    malformed or untimely reply, an XMPP stream that cannot go on
    (``_xmlstream.XMLStreamError``), a load balancer's PROXY header
    (``proxy_header.ProxyHeaderError``). Raised where the fault is found and
    caught at the machine's boundary (``event``): the client gets the
    protocol's last words (an error reply, a stream error), the session ends
    with ``CloseConnection`` in the ERROR state. A probe turns it into its
    ``error``; only ``proxy_header.parse``, a parser of the driver's, raises
    it to its caller. A client's lesser faults (an unknown command, a line
    too long) get an error reply and raise nothing. Machines never raise on
    input from the network.
``LocalProtocolError``
    The proxy broke the rules of its own machine: the driver gave an input
    the transitions table does not allow in the current state
    (``backend_connected`` with no ``OpenBackend`` asked for,
    ``tls_established`` with no ``StartTLS``), or the machine's own code took
    a step its table lacks. A bug, never a peer's doing: ``event`` ends the
    session as after a remote error, so the client still gets the protocol's
    last words, then raises it to the driver, which logs an internal error
    and carries out the queued commands.
"""

from __future__ import annotations

import abc
import enum
import functools
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, Protocol, Self, TypeVar


def opens_tls(first_bytes: bytes) -> bool:
    """Whether a client's first bytes are a TLS handshake record (RFC 8446
    section 5.1, content type 22): a client that starts TLS at once, on a
    port where it must ask first."""
    return first_bytes[:1] == b"\x16"


class Side(enum.Enum):
    """Which end of the proxied connection bytes came from or go to."""

    #: The remote client (plaintext before TLS, decrypted after).
    CLIENT = enum.auto()
    #: The server behind the proxy (always plaintext).
    BACKEND = enum.auto()


class TLSMode(enum.Enum):
    """How a listener gets to TLS."""

    #: Plaintext first, upgraded in-band (RFC 3207, RFC 2595, RFC 6120 section 5).
    STARTTLS = "starttls"
    #: TLS from the first byte (RFC 8314 ports 465/993/995, XEP-0368).
    IMPLICIT = "implicit"


class BackendIdentity(enum.Enum):
    """How the backend learns who the client is."""

    NONE = "none"
    PROXY_V1 = "proxy-v1"
    PROXY_V2 = "proxy-v2"
    #: SMTP: Postfix's XCLIENT command.
    XCLIENT = "xclient"
    #: IMAP: ``ID ("x-originating-ip" ...)`` as Dovecot's login proxy sends it.
    IMAP_ID = "imap-id"
    #: POP3: ``XCLIENT ADDR= PORT= CLIENT-TRANSPORT=`` (Dovecot).
    POP3_XCLIENT = "pop3-xclient"


class PeerCertificateFailure(enum.Enum):
    """What an incoming server-to-server stream gets when its peer's
    certificate does not verify for the domain the stream claims."""

    #: Through to the backend, which authenticates the peer by dialback
    #: (XEP-0220) as it would without the proxy.
    DIALBACK = "dialback"
    #: A stream error; nothing reaches the backend.
    REFUSE = "refuse"


class PeerVerification(enum.Enum):
    """What came of a connecting server's certificate (a metric label)."""

    #: Trusted, and valid for the stream's ``from``.
    VERIFIED = "verified"
    NO_CERTIFICATE = "no_certificate"
    #: Its chain does not lead to the trust store (or it expired...).
    UNTRUSTED = "untrusted"
    #: Trusted, but not for the stream's ``from`` (or the stream has none).
    NAME_MISMATCH = "name_mismatch"


class BareLineEndings(enum.Enum):
    """What an SMTP machine does with a bare CR or LF inside DATA."""

    #: Refuse the message and end the session, as Postfix 3.9 does against
    #: SMTP smuggling: the backend may see a line end where we saw none.
    REJECT = "reject"
    #: Relay the bytes untouched: only for a backend that refuses them itself
    #: (Postfix 3.9's smtpd_forbid_bare_newline); Postfix 3.7 ends DATA at a
    #: bare-LF dot and runs what follows, which this lets through.
    ALLOW = "allow"


# --------------------------------------------------------------------------
# What the driver tells the machine about the outside world.


@dataclass(frozen=True)
class Peer:
    """Addresses of one client connection, as the proxy's socket saw them."""

    client_address: str
    client_port: int
    local_address: str
    local_port: int


@dataclass(frozen=True)
class PeerCertificate:
    """The certificate a connecting server presented (``xmpp-server``
    listeners ask for one), as the TLS worker found it."""

    #: Its chain leads to the listener's trust store, and its extended key
    #: usage, if any, allows TLS.
    trusted: bool
    #: Why it is not trusted, in OpenSSL's words ("certificate has expired").
    problem: str | None = None
    #: Its subjectAltName dNSNames (A-labels, perhaps a wildcard) and
    #: id-on-xmppAddr values (RFC 6120 section 13.7.1.4).
    dns_names: tuple[str, ...] = ()
    xmpp_addrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class TLSInfo:
    """Outcome of a successful handshake, as reported by the TLS worker."""

    version: str
    cipher: str
    server_name: str | None = None
    alpn: str | None = None
    #: The client's certificate, where the listener asked for one and the
    #: client sent it; None otherwise.
    peer_certificate: PeerCertificate | None = None


@dataclass(frozen=True)
class SessionSettings:
    """Everything a machine needs to know from the configuration."""

    #: Name the proxy uses in its own greetings and replies.
    hostname: str
    tls_mode: TLSMode
    #: Refuse everything but the upgrade and harmless commands before TLS.
    require_tls: bool
    #: The backend's capabilities (EHLO keywords, CAPABILITY atoms, CAPA
    #: lines), probed or configured; the machine filters and extends them.
    capabilities: tuple[str, ...]
    identity: BackendIdentity = BackendIdentity.NONE
    #: Longest command line accepted from a client, CRLF included.
    max_line_length: int = 2048
    #: Longest reply line accepted from the backend, CRLF included.
    max_reply_line_length: int = 8192
    smtp_bare_line_endings: BareLineEndings = BareLineEndings.REJECT
    #: Largest IMAP literal ``{n}`` accepted in either direction, in octets.
    max_literal_size: int = 100 * 1024 * 1024
    #: XMPP: largest top-level element (stanza), in octets.
    max_stanza_size: int = 256 * 1024
    #: XMPP: deepest element nesting below the stream root.
    max_xml_depth: int = 64
    #: XMPP: longest attribute value, in octets.
    max_attribute_size: int = 64 * 1024
    #: XMPP: domains this listener serves; empty means any (no host-unknown).
    domains: tuple[str, ...] = ()
    #: ``xmpp-server``: what a peer whose certificate does not verify gets;
    #: None: peers' certificates are not looked at.
    peer_certificate_failure: PeerCertificateFailure | None = None


# --------------------------------------------------------------------------
# What the machine tells the driver to do.


@dataclass(frozen=True)
class SendToClient:
    """Write bytes to the client (through the TLS worker once upgraded)."""

    data: bytes


@dataclass(frozen=True)
class SendToBackend:
    """Write bytes to the backend connection."""

    data: bytes


@dataclass(frozen=True)
class OpenBackend:
    """Connect the backend and announce the client, then report the result
    with ``backend_connected()`` or ``backend_failed(reason)``.

    With a ``route`` (``xmpp-server-out``) the backend is the server of that
    domain, found by the listener's routes or DNS and not announced; the
    result is ``route_connected(direct_tls)`` or ``backend_failed(reason)``.
    """

    route: str | None = None


@dataclass(frozen=True)
class StartTLS:
    """The upgrade reply has been queued; hand the client to a TLS worker.

    ``discarded`` holds whatever the client sent after the upgrade command in
    plaintext. It is never interpreted (RFC 3207 section 4.2, CVE-2011-0411);
    the driver logs and counts it.
    """

    discarded: bytes
    #: Certificate to present when the client sends no SNI: XMPP knows the
    #: domain from the stream header's ``to`` (RFC 6120 section 4.7.2). On
    #: the backend side, the one to present if the remote server asks.
    server_name_hint: str | None = None
    #: The side whose connection goes to the worker: the backend only for an
    #: outgoing stream, whose worker does the client's part of the handshake.
    side: Side = Side.CLIENT
    #: The backend side's server name: sent as SNI, and the name its
    #: certificate is judged for.
    peer_name: str | None = None


@dataclass(frozen=True)
class PeerChecked:
    """The connecting server's certificate was judged against the domain its
    stream claims (``xmpp-server``), before anything went to the backend:
    count it; the backend's PROXY v2 header names ``domain``, set when the
    certificate verified for it."""

    result: PeerVerification
    domain: str | None = None
    #: Why not, for the log (OpenSSL's words, or the name that did not match).
    detail: str = ""


@dataclass(frozen=True)
class CloseConnection:
    """Flush what was queued for the client, then close both sides."""

    reason: str
    #: True when the session ended as the protocol intends (QUIT, LOGOUT...).
    clean: bool = False


Command = SendToClient | SendToBackend | OpenBackend | StartTLS | PeerChecked | CloseConnection


# --------------------------------------------------------------------------
# Shared machinery.


StateT = TypeVar("StateT", bound=enum.Enum)
InputT = TypeVar("InputT", bound=enum.Enum)


class ProtocolError(Exception):
    """A protocol's rules were broken; the subclass says by whom."""


class RemoteProtocolError(ProtocolError):
    """A peer broke its protocol: it ends the session, never the driver's call
    (see the module docstring)."""


class LocalProtocolError(ProtocolError):
    """The proxy misused its machine, a bug: the session ends and the driver
    hears of it (see the module docstring)."""


def transition(
    table: Mapping[tuple[StateT, InputT], StateT], state: StateT, input_: InputT
) -> StateT:
    """Look up the next state. Every input a peer can cause is checked before
    it gets here, so a missing entry is the proxy's own error."""
    try:
        return table[(state, input_)]
    except KeyError:
        raise LocalProtocolError(f"{input_.name} is not allowed in state {state.name}") from None


MemberT = TypeVar("MemberT", bound=enum.Enum)


@dataclass(frozen=True)
class Members(Generic[MemberT]):
    """The members of one of a machine's enums that shared code uses.

    Each field holds the member its name names in upper case (``closed``,
    ``CLOSED``). ``of`` finds them once, when a machine's class is made, and
    fails then if one is missing; from there on shared code reads the fields,
    typed, and never looks a member up by its name.
    """

    @classmethod
    def of(cls, members: type[MemberT]) -> Self:
        """The fields' members in ``members``; ``TypeError`` names those it lacks."""
        names = {entry.name: entry.name.upper() for entry in fields(cls)}
        missing = sorted(name for name in names.values() if name not in members.__members__)
        if missing:
            raise TypeError(f"{members.__name__} lacks {', '.join(missing)}")
        return cls(**{attribute: members[name] for attribute, name in names.items()})


@dataclass(frozen=True)
class SharedStates(Members[StateT]):
    """The states every machine has: the handshake, and how a session ends."""

    #: The upgrade accepted (or implicit TLS): waiting for the worker's handshake.
    tls_handshake: StateT
    #: The session ended; ``CloseConnection`` has been queued.
    closed: StateT
    #: A protocol error ended the session.
    error: StateT


@dataclass(frozen=True)
class SharedInputs(Members[InputT]):
    """The inputs every machine has: the ways out of a session."""

    #: The session ends as the protocol or the driver says.
    close: InputT
    #: A protocol error ends the session.
    violation: InputT


def ending_transitions(
    states: type[StateT], inputs: type[InputT]
) -> dict[tuple[StateT, InputT], StateT]:
    """The table entries that let a session end from every live state: CLOSE
    leads to CLOSED, VIOLATION to ERROR."""
    end, by = SharedStates.of(states), SharedInputs.of(inputs)
    live = [state for state in states if state not in (end.closed, end.error)]
    return {
        **{(state, by.close): end.closed for state in live},
        **{(state, by.violation): end.error for state in live},
    }


class Guarded(Protocol):
    """What ``event`` needs from a machine."""

    @property
    def finished(self) -> bool:
        """The session has ended: inputs are ignored from now on."""

    def violated(self, reason: str) -> None:
        """End the session after a ``ProtocolError``."""


GuardedT = TypeVar("GuardedT", bound=Guarded)
_P = ParamSpec("_P")


def event(
    method: Callable[Concatenate[GuardedT, _P], None],
) -> Callable[Concatenate[GuardedT, _P], None]:
    """Marks a machine's public input: ignored once the session has ended,
    and turning a ``ProtocolError`` into the machine's error ending; a
    ``LocalProtocolError`` then goes on to the driver."""

    @functools.wraps(method)
    def guarded(machine: GuardedT, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        if machine.finished:
            return
        try:
            method(machine, *args, **kwargs)
        except RemoteProtocolError as error:
            if not machine.finished:
                machine.violated(str(error))
        except LocalProtocolError as error:
            if not machine.finished:
                machine.violated(f"internal error: {error}")
            raise

    return guarded


@dataclass
class CommandQueue:
    """The outbox every machine appends to and the driver drains."""

    _commands: deque[Command] = field(default_factory=deque)

    def push(self, command: Command) -> None:
        self._commands.append(command)

    def pop(self) -> Command | None:
        return self._commands.popleft() if self._commands else None


class ProxyMachine(abc.ABC, Generic[StateT, InputT]):
    """One proxied session of one protocol, from accept to close.

    The constructor queues the opening commands: the proxy's own greeting on
    a STARTTLS listener, or ``StartTLS(b"")`` on an implicit-TLS listener,
    and sets the first ``state``.

    A subclass sets ``states``, ``inputs`` and ``transitions``. Shared code
    reads the members it needs from ``shared_states`` and ``shared_inputs``,
    found when the subclass is made (see ``Members``): its ``State`` enum has
    TLS_HANDSHAKE, CLOSED and ERROR, its ``Input`` enum CLOSE and VIOLATION
    (see ``ending_transitions``), or the class is refused. It says what the
    bytes of each side mean (``_from_client``, ``_from_backend``) and how it
    refuses an early ClientHello; ``receive_data`` keeps the rules of the
    handshake for all.
    """

    states: type[StateT]
    inputs: type[InputT]
    transitions: Mapping[tuple[StateT, InputT], StateT]
    state: StateT
    #: What shared code uses of ``states`` and ``inputs``; a subclass whose
    #: shared code takes steps of its own names more.
    state_members: ClassVar[type[SharedStates[Any]]] = SharedStates
    input_members: ClassVar[type[SharedInputs[Any]]] = SharedInputs
    #: Those members, found when the class is made.
    shared_states: SharedStates[StateT]
    shared_inputs: SharedInputs[InputT]
    #: The side that goes to a TLS worker: the client, but for an outgoing
    #: stream, whose client (the local server) stays in plaintext.
    tls_side: ClassVar[Side] = Side.CLIENT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not (hasattr(cls, "states") and hasattr(cls, "inputs")):
            return  # a base class on the way: its subclass names the enums
        try:
            cls.shared_states = cls.state_members.of(cls.states)
            cls.shared_inputs = cls.input_members.of(cls.inputs)
        except TypeError as error:
            raise TypeError(f"{cls.__name__}: {error}") from None

    def __init__(self, settings: SessionSettings, peer: Peer) -> None:
        self.settings = settings
        self.peer = peer
        self._outbox = CommandQueue()
        self._ended = (self.shared_states.closed, self.shared_states.error)
        #: No client byte has come yet on a plaintext connection.
        self._before_first_byte = settings.tls_mode is TLSMode.STARTTLS

    @event
    def receive_data(self, side: Side, data: bytes) -> None:
        """Bytes arrived from ``side`` (decrypted, for a TLS client).

        Between the upgrade reply and the end of the handshake nothing from
        the client (``tls_side``) is interpreted, not even buffered (RFC 3207 section 4.2,
        RFC 2595 section 3.1, RFC 6120 section 5.4.3.3, CVE-2011-0411). A TLS
        ClientHello as the client's first bytes on a plaintext connection is
        an implicit-TLS client on the wrong port, refused by the protocol's
        ``_refuse_early_tls``.
        """
        if side is Side.BACKEND:
            self._from_backend(data)
        elif self.state is self.shared_states.tls_handshake and self.tls_side is Side.CLIENT:
            pass
        elif self._before_first_byte and opens_tls(data):
            self._refuse_early_tls()
        else:
            self._before_first_byte = self._before_first_byte and not data
            self._from_client(data)

    @abc.abstractmethod
    def receive_eof(self, side: Side) -> None:
        """``side`` closed its sending direction."""

    @abc.abstractmethod
    def tls_established(self, info: TLSInfo) -> None:
        """The worker finished the handshake the last ``StartTLS`` asked for."""

    @abc.abstractmethod
    def backend_connected(self) -> None:
        """The connection asked for by ``OpenBackend`` is up, identity sent."""

    def route_connected(self, direct_tls: bool) -> None:
        """The connection asked for by ``OpenBackend(route=...)`` is up;
        TLS starts at once there (``direct_tls``) or by STARTTLS. Only a
        machine that asks for routes has it."""
        raise LocalProtocolError(f"{type(self).__name__} asks for no route")

    @abc.abstractmethod
    def backend_failed(self, reason: str) -> None:
        """The connection asked for by ``OpenBackend`` could not be made."""

    @abc.abstractmethod
    def timed_out(self, reason: str) -> None:
        """One of the driver's deadlines passed (``reason`` says which): say
        goodbye and close."""

    @property
    @abc.abstractmethod
    def client_mid_command(self) -> bool:
        """The client began a command (a line, a stanza) and has not sent
        all of it: the driver's per-command deadline runs. A message body
        or a literal on its way is not a command; it moves at its own pace."""

    @property
    @abc.abstractmethod
    def unprocessed_client_bytes(self) -> int:
        """Client bytes held because they cannot be interpreted yet (for
        instance while the backend has not answered DATA). The driver stops
        reading from the client while this is large."""

    @staticmethod
    @abc.abstractmethod
    def busy_reply(hostname: str) -> bytes:
        """What a client gets when the listener is at its connection limit."""

    def shutting_down(self) -> None:
        """The proxy is stopping: tell the client, where the protocol has the
        words and the stream allows them, and close. This default only closes."""
        self._outbox.push(CloseConnection("proxy shutting down"))

    def next_command(self) -> Command | None:
        """The next transport action, or ``None`` when the machine waits."""
        return self._outbox.pop()

    @property
    def finished(self) -> bool:
        """The session has ended (what ``event`` needs)."""
        return self.state in self._ended

    @abc.abstractmethod
    def violated(self, reason: str) -> None:
        """End the session after a ``ProtocolError`` (what ``event`` needs)."""

    # ------------------------------------------------------------------
    # Steps every protocol takes.

    def _go(self, input_: InputT) -> None:
        self.state = transition(self.transitions, self.state, input_)

    def _end(
        self,
        reason: str,
        *,
        reply: bytes | None = None,
        clean: bool = False,
        violation: bool = False,
    ) -> None:
        """Send the client its last words, if any, and close both sides."""
        self._go(self.shared_inputs.violation if violation else self.shared_inputs.close)
        if reply is not None:
            self._send_client(reply)
        self._outbox.push(CloseConnection(reason, clean))

    def _send_client(self, data: bytes) -> None:
        self._outbox.push(SendToClient(data))

    def _send_backend(self, data: bytes) -> None:
        self._outbox.push(SendToBackend(data))

    # ------------------------------------------------------------------
    # What each protocol says (see ``receive_data``): what the client's bytes
    # mean outside the handshake, what the backend's mean, and how a client
    # whose first bytes are a ClientHello is refused.

    @abc.abstractmethod
    def _from_client(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def _from_backend(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def _refuse_early_tls(self) -> None: ...


class CapabilityProbe(abc.ABC):
    """Learns a backend's capabilities over one short plaintext dialogue.

    The driver connects (sending a PROXY ``LOCAL`` header when the backend
    requires one), then alternates ``receive_data`` and ``next_send`` until
    ``result`` or ``error`` is set, and closes.
    """

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.result: tuple[str, ...] | None = None
        self.error: str | None = None
        #: The next command for the backend: each waits for the answer to the
        #: one before.
        self._send: bytes | None = None

    @abc.abstractmethod
    def receive_data(self, data: bytes) -> None: ...

    def next_send(self) -> bytes | None:
        send, self._send = self._send, None
        return send
