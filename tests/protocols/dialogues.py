"""The four protocols' dialogues, for the tests every protocol shares.

``SMTP``, ``POP3``, ``IMAP`` and ``XMPP`` (all in ``DIALOGUES``) hold the bits
of each protocol's dialogue that the cross-protocol scenarios of
``test_attacks.py`` need: how the session opens, the STARTTLS command and its
answer, the backend's greeting, and the replies to a few refusals.
``Transcripts`` and ``split_invariance_tests`` give every protocol module its
split invariance tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols._base import (
    CloseConnection,
    Command,
    OpenBackend,
    Peer,
    ProxyMachine,
    SendToBackend,
    SendToClient,
    SessionSettings,
    StartTLS,
)
from protocols.imap import IMAPMachine
from protocols.pop3 import POP3Machine
from protocols.smtp import SMTPMachine
from protocols.xmpp import XMPPClientMachine
from tests.protocols.transcript import (
    TLS,
    Backend,
    Client,
    Connected,
    Event,
    bytewise,
    drawn_cuts,
    make_settings,
    play,
    run,
)


@runtime_checkable
class Stateful(Protocol):
    """What all the protocol machines have beyond ``ProxyMachine``."""

    @property
    def state(self) -> Enum: ...


MachineT = TypeVar("MachineT", bound="ProxyMachine[Any, Any]", covariant=True)
Step = Event | Command


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dialogue(Generic[MachineT]):
    """One protocol's dialogue, as far as the cross-protocol scenarios need it.

    Byte fields are what a client or backend sends, whole commands or
    replies, so that they can be pipelined by concatenation.
    """

    name: str
    machine: Callable[[SessionSettings, Peer], MachineT]
    capabilities: tuple[str, ...]
    setting_defaults: Mapping[str, object] = dataclasses.field(default_factory=dict)
    peer: Peer
    #: What the client sends before the proxy's greeting (XMPP's stream header).
    client_opening: bytes = b""
    greeting: SendToClient
    #: A request for the capabilities before TLS, and the proxy's answer.
    capability: bytes
    capability_reply: tuple[SendToClient, ...]
    starttls: bytes
    tls_ready: SendToClient
    server_name_hint: str | None = None
    backend_greeting: bytes
    #: What the client sees of ``backend_greeting`` when it is not forwarded as is.
    backend_greeting_relayed: tuple[SendToClient, ...] = ()
    #: A command the relay forwards, and the backend's answer.
    relayed: bytes
    relayed_answer: bytes
    #: Commands an attacker pipelines after STARTTLS.
    injected: bytes
    #: The answer to a TLS ClientHello as the client's first bytes.
    client_hello_refused: tuple[SendToClient, CloseConnection]
    #: Protocol words the fuzzers mix with random octets.
    words: tuple[bytes, ...]

    def settings(self, **overrides: object) -> SessionSettings:
        return make_settings(self.capabilities, **{**self.setting_defaults, **overrides})

    def new(self, **overrides: object) -> MachineT:
        return self.machine(self.settings(**overrides), self.peer)

    def opening(self) -> tuple[Step, ...]:
        """A STARTTLS listener's session up to where STARTTLS may come."""
        return (*self._client_opening(Client), self.greeting)

    def started_tls(self, pipelined: bytes = b"") -> tuple[Step, ...]:
        """The client's STARTTLS with ``pipelined`` behind it, and the answer."""
        return (
            Client(self.starttls + pipelined),
            self.tls_ready,
            StartTLS(pipelined, server_name_hint=self.server_name_hint),
        )

    def to_backend(self) -> tuple[Step, ...]:
        """From the end of the handshake to the backend connection."""
        return (*self._client_opening(Client), OpenBackend())

    def backend_greeted(self) -> tuple[Step, ...]:
        """From the backend connection to the relay."""
        return (
            Connected(),
            *self._client_opening(SendToBackend),
            Backend(self.backend_greeting),
            *self.backend_greeting_relayed,
        )

    def connecting(self, **overrides: object) -> MachineT:
        """A machine past STARTTLS that has just asked for the backend."""
        machine = self.new(**overrides)
        run(machine, *self.opening(), *self.started_tls(), TLS(), *self.to_backend())
        return machine

    def relaying(self, **overrides: object) -> MachineT:
        """A machine past STARTTLS, with the backend greeted and nothing owed."""
        machine = self.connecting(**overrides)
        run(machine, *self.backend_greeted())
        assert isinstance(machine, Stateful)
        assert machine.state.name == "RELAY"
        return machine

    def _client_opening(self, step: Callable[[bytes], Step]) -> tuple[Step, ...]:
        return (step(self.client_opening),) if self.client_opening else ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class LineDialogue(Dialogue[MachineT]):
    """A line-based protocol's dialogue: SMTP, POP3, IMAP."""

    #: A command the proxy answers itself before TLS, and the answer.
    local: bytes
    local_reply: SendToClient
    line_too_long: SendToClient
    #: The answer to a line that starts with a ClientHello's first octet,
    #: once the session has begun.
    handshake_octet_line_reply: SendToClient
    tls_active: SendToClient
    shutdown_goodbye: SendToClient
    #: What the client is told when the backend cannot serve it.
    unavailable: SendToClient
    #: A backend greeting that refuses the session.
    refusal: bytes
    #: What the protocol calls what the backend sends back to a command.
    answer: str


SHUTDOWN = CloseConnection("proxy shutting down")

SMTP = LineDialogue(
    name="smtp",
    machine=SMTPMachine,
    capabilities=(
        "PIPELINING",
        "SIZE 10240000",
        "VRFY",
        "ETRN",
        "STARTTLS",
        "AUTH PLAIN LOGIN",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "CHUNKING",
        "XCLIENT NAME ADDR PROTO HELO",
    ),
    peer=Peer("192.0.2.10", 49152, "198.51.100.1", 25),
    greeting=SendToClient(b"220 proxy.example ESMTP starttls-proxy\r\n"),
    capability=b"EHLO client.example\r\n",
    capability_reply=(
        SendToClient(
            b"250-proxy.example\r\n"
            b"250-PIPELINING\r\n"
            b"250-SIZE 10240000\r\n"
            b"250-VRFY\r\n"
            b"250-ETRN\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n"
            b"250-8BITMIME\r\n"
            b"250-DSN\r\n"
            b"250-SMTPUTF8\r\n"
            b"250-CHUNKING\r\n"
            b"250 STARTTLS\r\n"
        ),
    ),
    starttls=b"STARTTLS\r\n",
    tls_ready=SendToClient(b"220 2.0.0 Ready to start TLS\r\n"),
    backend_greeting=b"220 mx.backend.test ESMTP Postfix\r\n",
    relayed=b"RSET\r\n",
    relayed_answer=b"250 2.0.0 Ok\r\n",
    injected=b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\n",
    words=(b"EHLO x", b"STARTTLS", b"MAIL FROM:<>", b"DATA", b"BDAT 3", b"\r\n.\r\n", b"\r\n"),
    local=b"NOOP\r\n",
    local_reply=SendToClient(b"250 2.0.0 Ok\r\n"),
    line_too_long=SendToClient(b"500 5.5.0 Error: line too long\r\n"),
    client_hello_refused=(
        SendToClient(b"500 5.5.1 Error: TLS handshake received before STARTTLS\r\n"),
        CloseConnection("TLS ClientHello before STARTTLS"),
    ),
    handshake_octet_line_reply=SendToClient(b"530 5.7.0 Must issue a STARTTLS command first\r\n"),
    tls_active=SendToClient(b"503 5.5.1 Error: TLS already active\r\n"),
    shutdown_goodbye=SendToClient(b"421 4.3.2 proxy.example Service shutting down\r\n"),
    unavailable=SendToClient(b"421 4.3.0 proxy.example Service not available\r\n"),
    refusal=b"554 5.3.2 No service\r\n",
    answer="reply",
)

POP3 = LineDialogue(
    name="pop3",
    machine=POP3Machine,
    capabilities=(
        "CAPA",
        "TOP",
        "UIDL",
        "RESP-CODES",
        "PIPELINING",
        "AUTH-RESP-CODE",
        "STLS",
        "USER",
        "SASL PLAIN LOGIN SCRAM-SHA-256-PLUS",
    ),
    peer=Peer("192.0.2.10", 49152, "198.51.100.1", 110),
    greeting=SendToClient(b"+OK proxy.example POP3 starttls-proxy ready\r\n"),
    capability=b"CAPA\r\n",
    capability_reply=(
        SendToClient(
            b"+OK Capability list follows\r\n"
            b"CAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
            b"STLS\r\n.\r\n"
        ),
    ),
    starttls=b"STLS\r\n",
    tls_ready=SendToClient(b"+OK Begin TLS negotiation\r\n"),
    backend_greeting=b"+OK Dovecot (Debian) ready.\r\n",
    relayed=b"USER alice\r\n",
    relayed_answer=b"+OK\r\n",
    injected=b"USER u\r\nPASS p\r\n",
    words=(b"USER x", b"STLS", b"AUTH PLAIN", b"RETR 1", b"+OK", b"\r\n.\r\n", b"\r\n"),
    local=b"NOOP\r\n",
    local_reply=SendToClient(b"+OK\r\n"),
    line_too_long=SendToClient(b"-ERR line too long\r\n"),
    client_hello_refused=(
        SendToClient(b"-ERR TLS handshake received before STLS\r\n"),
        CloseConnection("TLS ClientHello before STLS"),
    ),
    handshake_octet_line_reply=SendToClient(b"-ERR TLS required: use STLS first\r\n"),
    tls_active=SendToClient(b"-ERR TLS already active\r\n"),
    shutdown_goodbye=SendToClient(b"-ERR [SYS/TEMP] proxy.example Server shutting down\r\n"),
    unavailable=SendToClient(b"-ERR [SYS/TEMP] proxy.example backend unavailable\r\n"),
    refusal=b"-ERR [SYS/TEMP] Service unavailable\r\n",
    answer="response",
)

IMAP = LineDialogue(
    name="imap",
    machine=IMAPMachine,
    capabilities=(
        "IMAP4rev1",
        "SASL-IR",
        "LOGIN-REFERRALS",
        "ID",
        "ENABLE",
        "IDLE",
        "LITERAL+",
        "STARTTLS",
        "AUTH=PLAIN",
        "AUTH=LOGIN",
    ),
    peer=Peer("192.0.2.10", 49152, "198.51.100.1", 143),
    greeting=SendToClient(
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+"
        b" STARTTLS LOGINDISABLED] proxy.example IMAP4 starttls-proxy ready\r\n"
    ),
    capability=b"a0 CAPABILITY\r\n",
    capability_reply=(
        SendToClient(
            b"* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS"
            b" LOGINDISABLED\r\na0 OK CAPABILITY completed\r\n"
        ),
    ),
    starttls=b"a1 STARTTLS\r\n",
    tls_ready=SendToClient(b"a1 OK Begin TLS negotiation now\r\n"),
    backend_greeting=(
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS"
        b" AUTH=PLAIN AUTH=LOGIN] Dovecot (Debian) ready.\r\n"
    ),
    relayed=b"a3 NOOP\r\n",
    relayed_answer=b"a3 OK done\r\n",
    injected=b"b LOGIN user pass\r\n",
    words=(
        *(b"a1 ", b"NOOP", b"STARTTLS", b"LOGIN", b"IDLE", b"{3}", b"{2+}"),
        *(b"\r\n", b"\n", b"x", b" "),
    ),
    local=b"a2 NOOP\r\n",
    local_reply=SendToClient(b"a2 OK NOOP completed\r\n"),
    line_too_long=SendToClient(b"* BAD [TOOBIG] Line too long\r\n"),
    client_hello_refused=(
        SendToClient(b"* BYE TLS handshake received before STARTTLS\r\n"),
        CloseConnection("TLS ClientHello before STARTTLS"),
    ),
    handshake_octet_line_reply=SendToClient(b"* BAD Invalid tag\r\n"),
    tls_active=SendToClient(b"a1 BAD TLS already active\r\n"),
    shutdown_goodbye=SendToClient(b"* BYE [UNAVAILABLE] proxy.example Server shutting down\r\n"),
    unavailable=SendToClient(b"* BYE [UNAVAILABLE] proxy.example backend unavailable\r\n"),
    refusal=b"* BYE Too many connections\r\n",
    answer="response",
)


def client_header(to: str = "example.com", namespace: str = "jabber:client") -> bytes:
    return (
        b"<?xml version='1.0'?><stream:stream to='%s' xmlns='%s' "
        b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
        % (to.encode(), namespace.encode())
    )


def proxy_header(domain: str = "example.com", namespace: str = "jabber:client") -> bytes:
    """The proxy's stream header, with the stream id the tests fix to ``ID``."""
    return (
        b"<?xml version='1.0'?><stream:stream xmlns=\"%s\" "
        b'xmlns:stream="http://etherx.jabber.org/streams" id="ID" from="%s" version="1.0">'
        % (namespace.encode(), domain.encode())
    )


def stream_error(
    condition: str, closing: bytes = b"</stream:stream>", text: str | None = None
) -> bytes:
    """The proxy's stream error ``condition``, with ``text`` (as sent: fit and
    escaped) if any, and the end of its stream."""
    described = (
        b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='en'>%s</text>" % text.encode()
        if text is not None
        else b""
    )
    return (
        b"<stream:error xmlns:stream='http://etherx.jabber.org/streams'>"
        b"<%s xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>%s</stream:error>%s"
        % (condition.encode(), described, closing)
    )


REQUIRED_FEATURES = (
    b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
    b"<required/></starttls></stream:features>"
)
BACKEND_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' id='b4ck3nd' from='example.com' "
    b"version='1.0' xml:lang='en'>"
)
MECHANISMS = (
    b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-1-PLUS</mechanism>"
    b"<mechanism>PLAIN</mechanism><mechanism>SCRAM-SHA-1</mechanism></mechanisms>"
)
BACKEND_FEATURES = (
    b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    + MECHANISMS
    + b"<register xmlns='http://jabber.org/features/iq-register'/></stream:features>"
)
STRIPPED_FEATURES = (
    b'<stream:features xmlns:stream="http://etherx.jabber.org/streams">'
    b'<mechanisms xmlns="urn:ietf:params:xml:ns:xmpp-sasl"><mechanism>PLAIN</mechanism>'
    b"<mechanism>SCRAM-SHA-1</mechanism></mechanisms>"
    b'<register xmlns="http://jabber.org/features/iq-register"></register></stream:features>'
)

XMPP = Dialogue(
    name="xmpp",
    machine=XMPPClientMachine,
    capabilities=(),
    # Small limits, so that the tests can cross them.
    setting_defaults={"max_stanza_size": 8192, "max_xml_depth": 16, "max_attribute_size": 1024},
    peer=Peer("192.0.2.10", 49152, "198.51.100.1", 5222),
    client_opening=client_header(),
    greeting=SendToClient(proxy_header() + REQUIRED_FEATURES),
    # The features come with the greeting.
    capability=b"",
    capability_reply=(),
    starttls=b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
    tls_ready=SendToClient(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"),
    server_name_hint="example.com",
    backend_greeting=BACKEND_HEADER + BACKEND_FEATURES,
    backend_greeting_relayed=(SendToClient(BACKEND_HEADER), SendToClient(STRIPPED_FEATURES)),
    relayed=b"<iq type='get' id='ok'/>",
    relayed_answer=b"<iq type='result' id='ok'/>",
    injected=b"<iq type='set' id='evil'><query xmlns='jabber:iq:roster'/></iq>",
    client_hello_refused=(
        SendToClient(
            proxy_header("proxy.example")
            + stream_error("not-well-formed", text="TLS handshake received before STARTTLS")
        ),
        CloseConnection("TLS ClientHello before STARTTLS (not-well-formed)"),
    ),
    words=(b"<iq>", b"</iq>", b"<a x='", b"'>", b"<![CDATA[", b"]]>", b"&amp;", b"\xe9"),
)

LINE_DIALOGUES: tuple[LineDialogue[Any], ...] = (SMTP, POP3, IMAP)
DIALOGUES: tuple[Dialogue[Any], ...] = (*LINE_DIALOGUES, XMPP)


@dataclasses.dataclass(frozen=True)
class Transcripts:
    """Whole sessions of one protocol by name: the settings of the listener
    and the events, for the tests where only the bytes matter."""

    dialogue: Dialogue[Any]
    sessions: Mapping[str, tuple[SessionSettings, tuple[Event, ...]]]

    def outcome(
        self, name: str, cuts: Sequence[Sequence[int]] | None = None
    ) -> tuple[bytes, bytes, list[Command]]:
        """What session ``name`` sends the client and the backend, and its
        other commands, with its data cut at ``cuts`` (see ``play``)."""
        settings, events = self.sessions[name]
        return play(self.dialogue.machine(settings, self.dialogue.peer), events, cuts)


def split_invariance_tests(
    transcripts: Transcripts,
) -> tuple[Callable[[str], None], Callable[..., None]]:
    """The two split invariance tests of ``transcripts``, for a protocol's
    test module to name ``test_split_one_byte_at_a_time`` and
    ``test_split_invariance``: the same bytes cut anywhere give the same
    session."""

    @pytest.mark.parametrize("name", list(transcripts.sessions))
    def one_byte_at_a_time(name: str) -> None:
        events = transcripts.sessions[name][1]
        assert transcripts.outcome(name, bytewise(events)) == transcripts.outcome(name)

    @given(st.sampled_from(sorted(transcripts.sessions)), st.data())
    def cut_anywhere(name: str, data: st.DataObject) -> None:
        events = transcripts.sessions[name][1]
        assert transcripts.outcome(name, drawn_cuts(data, events)) == transcripts.outcome(name)

    return one_byte_at_a_time, cut_anywhere
