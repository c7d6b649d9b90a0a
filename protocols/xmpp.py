"""XMPP: STARTTLS and direct TLS termination in front of Prosody, ejabberd & co.

Theory of operation
-------------------
*Before TLS* the proxy is the receiving entity (RFC 6120 section 4): it
answers the client's stream header with its own (a fresh ``id``, ``from`` the
domain the client asked for in ``to``, section 4.7) and stream features that
offer STARTTLS (section 5.3), ``<required/>`` when the listener requires TLS.
No backend exists yet. ``<starttls/>`` gets ``<proceed/>`` and the client goes
to a TLS worker; bytes pipelined after it are handed back in
``StartTLS.discarded``, never interpreted. The stream's ``to`` domain picks
the certificate when the client sends no SNI. Everything else before TLS is
refused: SASL ``<auth/>`` with ``<encryption-required/>`` (section 6.5.5),
other elements with a ``<policy-violation/>`` stream error. A header in the
wrong namespace, of another version or for a domain the listener does not
serve gets ``<invalid-namespace/>``, ``<unsupported-version/>`` or
``<host-unknown/>``, always after a stream header of the proxy's own
(section 4.9.1.2). XML the stream may not carry (section 11.1) ends it
before the parser sees it; see ``protocols._xmlstream``.

*After TLS* the client restarts the stream (section 5.4.3.3); direct TLS
(XEP-0368) starts here. Its new header is checked like the first, then the
backend is connected and announced (PROXY header, by the driver), and the
header is relayed: the backend sees it as the first stream. From then on both
directions are relayed token by token, as received, and still parsed: the
backend's ``<stream:features>`` lose what the proxy terminates (STARTTLS,
stream compression, SASL ``-PLUS`` mechanisms and channel-binding types,
whose binding (RFC 5056) cannot cross a terminated TLS session) and are the
only element re-serialized. A second ``<starttls/>`` gets ``<failure/>`` and the
stream ends (section 5.4.2.2). After SASL ``<success/>`` both sides restart
their streams (section 6.4.6), and so do both parsers; the client's new
header is checked like the first before it is relayed. Server-to-server
streams (``jabber:server``, incoming) are relayed the same way; dialback
(XEP-0220) and SASL EXTERNAL are ordinary elements to the relay.

*Peer certificates* (``xmpp-server``, RFC 6120 section 13.7, RFC 7590): the
TLS worker asked the connecting server for its certificate and verified the
chain; the restarted stream's ``from`` says which domain the peer claims, and
the certificate must name it (``peer_verification``: a subjectAltName
dNSName, a single left-most wildcard label standing for one label, or an
``id-on-xmppAddr`` equal to it; RFC 9525: no CN). What came of it goes to the
driver first (``PeerChecked``: a metric, and the domain for the backend's
PROXY v2 header); a peer that fails gets, with ``on_failure: refuse``,
``<not-authorized/>`` (no certificate, or an untrusted one: the stream may
not be negotiated without authenticating, section 4.9.3.12),
``<invalid-from/>`` (a trusted certificate for other domains, section
4.9.3.9) or ``<improper-addressing/>`` (no ``from`` to check); with
``dialback`` its stream goes on and the backend authenticates it as it would
without the proxy. A ``from`` that is not a domain is
``<improper-addressing/>`` either way. The stream a verified peer restarts
after SASL ``<success/>`` (section 6.4.6) must claim the same domain: another
is ``<invalid-from/>`` (section 4.9.3.9: not the domain validated), none
``<improper-addressing/>`` (section 4.7.1: a server MUST name itself; so on
the first stream), and the header never reaches the backend. That takes no
second ``PeerChecked``. A peer that failed under ``dialback`` may restart
from any domain, the backend authenticates it; but a ``from`` that is no
domain is ``<improper-addressing/>`` here too.

*Stream errors* carry a ``<text/>`` (section 4.9.2) where the peer caused
them, in the log's words; see ``protocols._xmpp_relay``.

*Plaintext sessions* (``require_tls: false``): the pre-TLS features also list
the backend's own, learned by the capability probe. The first element that
needs the backend opens it; the proxy replays the client's stream header,
swallows the backend's header and features (the client already has the
proxy's), and relays the rest. Stream ids then differ between the two halves,
which SASL does not mind but dialback does.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from typing import ClassVar, Final

from lxml import etree

from protocols._base import (
    CapabilityProbe,
    OpenBackend,
    Peer,
    PeerCertificate,
    PeerCertificateFailure,
    PeerChecked,
    PeerVerification,
    RemoteProtocolError,
    SessionSettings,
    StartTLS,
    TLSInfo,
    TLSMode,
    ending_transitions,
    event,
)
from protocols._xmlstream import (
    NS_DIALBACK,
    NS_STREAMS,
    STREAM,
    Limits,
    StreamElement,
    StreamEnd,
    StreamErrorCondition,
    StreamHeader,
    Token,
    XMLStreamReader,
    stream_header,
)
from protocols._xmpp_relay import (
    BACKEND_LIMIT_FACTOR,
    DOMAIN,
    FEATURES,
    JABBER_CLIENT,
    JABBER_SERVER,
    SASL_AUTH,
    STARTTLS,
    STREAM_ERROR,
    VERSION,
    XMPPRelayMachine,
    busy_reply,
    local_name,
    normalize_domain,
    serialize,
    strip_features,
)


class State(enum.Enum):
    """Where an XMPP session stands."""

    #: Waiting for the client's initial stream header.
    PRE_TLS_HEADER = enum.auto()
    #: The proxy's header and features are out; waiting for ``<starttls/>``.
    PRE_TLS = enum.auto()
    #: ``<proceed/>`` sent (or direct TLS): waiting for the worker's handshake.
    TLS_HANDSHAKE = enum.auto()
    #: Under TLS, waiting for the client's restarted stream header.
    TLS_HEADER = enum.auto()
    #: ``OpenBackend`` queued, waiting for ``backend_connected``.
    BACKEND_CONNECTING = enum.auto()
    #: The client's header went to the backend; waiting for the backend's.
    BACKEND_GREETING = enum.auto()
    #: Both directions relayed, token by token.
    RELAY = enum.auto()
    #: The session ended; ``CloseConnection`` has been queued.
    CLOSED = enum.auto()
    #: An impossible input or a misbehaving backend ended the session.
    ERROR = enum.auto()


class Input(enum.Enum):
    """What moves an XMPP session from one state to another."""

    CLIENT_HEADER = enum.auto()  #: The client opened an acceptable stream.
    CLIENT_STARTTLS = enum.auto()  #: The client sent ``<starttls/>`` before TLS.
    PLAINTEXT_RELAY = enum.auto()  #: Without ``require_tls``, an element needs the backend.
    TLS_ESTABLISHED = enum.auto()  #: The TLS worker finished the handshake.
    BACKEND_CONNECTED = enum.auto()  #: The driver connected the backend.
    BACKEND_READY = enum.auto()  #: The backend answered the stream header.
    CLOSE = enum.auto()  #: The session ends (stream closed, timeout, refused client...).
    VIOLATION = enum.auto()  #: A ``ProtocolError`` ended the session.


TRANSITIONS: Final[Mapping[tuple[State, Input], State]] = {
    (State.PRE_TLS_HEADER, Input.CLIENT_HEADER): State.PRE_TLS,
    (State.PRE_TLS, Input.CLIENT_STARTTLS): State.TLS_HANDSHAKE,
    (State.PRE_TLS, Input.PLAINTEXT_RELAY): State.BACKEND_CONNECTING,
    (State.TLS_HANDSHAKE, Input.TLS_ESTABLISHED): State.TLS_HEADER,
    (State.TLS_HEADER, Input.CLIENT_HEADER): State.BACKEND_CONNECTING,
    (State.BACKEND_CONNECTING, Input.BACKEND_CONNECTED): State.BACKEND_GREETING,
    (State.BACKEND_GREETING, Input.BACKEND_READY): State.RELAY,
    **ending_transitions(State, Input),
}

#: States in which client tokens are interpreted; in the others they wait.
_READS_CLIENT: Final = frozenset(
    {State.PRE_TLS_HEADER, State.PRE_TLS, State.TLS_HEADER, State.RELAY}
)

#: A stream header's ``from``: a JID (RFC 7622 section 3), loosely.
_ADDRESS: Final = re.compile(r"[^\s<>&'\"]{1,3071}")

_PROCEED: Final = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
_ENCRYPTION_REQUIRED: Final = (
    b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><encryption-required/></failure>"
)
_REQUIRED_STARTTLS: Final = (
    b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
)
_OPTIONAL_STARTTLS: Final = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


_FRAGMENT_PARSER: Final = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False
)


@functools.lru_cache(maxsize=32)
def pre_tls_features(capabilities: tuple[str, ...], require_tls: bool) -> bytes:
    """The proxy's own ``<stream:features>``: STARTTLS, and without
    ``require_tls`` the backend's features (its capabilities, as XML)."""
    if require_tls:
        return b"<stream:features>%s</stream:features>" % _REQUIRED_STARTTLS
    features = etree.Element(FEATURES, nsmap={"stream": NS_STREAMS})
    for text in capabilities:
        # Configured or probed fragments: one that does not parse is left out.
        if "<!" in text or "<?" in text:
            continue
        try:
            features.append(etree.fromstring(text.encode(), _FRAGMENT_PARSER))
        except etree.XMLSyntaxError:
            continue
    strip_features(features)
    own = b""
    for child in features:
        try:
            own += serialize(child)
        except RemoteProtocolError:
            continue
    return b"<stream:features>%s%s</stream:features>" % (_OPTIONAL_STARTTLS, own)


class XMPPMachine(XMPPRelayMachine):
    """One XMPP session; see the module docstring. Use a subclass per stream type."""

    states = State
    inputs = Input
    transitions = TRANSITIONS
    reads_client = _READS_CLIENT
    reads_backend = frozenset({State.BACKEND_GREETING, State.RELAY})

    def __init__(self, settings: SessionSettings, peer: Peer) -> None:
        super().__init__(settings, peer)
        self._domains = frozenset(normalize_domain(domain) for domain in settings.domains)
        #: The client's ``to``, as the certificate hint.
        self._requested: str | None = None
        #: The client element that started a plaintext relay.
        self._held: Token | None = None
        self._peer_certificate: PeerCertificate | None = None
        if settings.tls_mode is TLSMode.STARTTLS:
            self.state = State.PRE_TLS_HEADER
        else:
            self.state = State.TLS_HANDSHAKE
            self._outbox.push(StartTLS(b""))

    # ------------------------------------------------------------------
    # Inputs.

    @event
    def tls_established(self, info: TLSInfo) -> None:
        self._go(Input.TLS_ESTABLISHED)
        self._tls = True
        self._peer_certificate = info.peer_certificate
        self._pump_client()

    @event
    def backend_connected(self) -> None:
        self._go(Input.BACKEND_CONNECTED)
        self._send_backend(self._client_header)

    # ------------------------------------------------------------------
    # Stream headers.

    def _check_header(self, header: StreamHeader) -> tuple[StreamErrorCondition, str] | None:
        """Remember who the client is and what it asks for; what is wrong with it."""
        root = header.element
        self._peer_address = _peer_address(root.get("from"))
        to = root.get("to")
        requested = normalize_domain(to) if to is not None else None
        if requested is not None and DOMAIN.fullmatch(requested):
            if self._domains and requested not in self._domains:
                return StreamErrorCondition.HOST_UNKNOWN, f"unknown domain {requested!r}"
            self._domain = self._requested = requested
        elif to is not None:
            return StreamErrorCondition.HOST_UNKNOWN, "malformed domain in 'to'"
        self._dialback = root.nsmap.get("db") == NS_DIALBACK
        if root.tag != STREAM:
            return StreamErrorCondition.INVALID_NAMESPACE, f"stream root is {root.tag!r}"
        if root.nsmap.get(None) != self.content_namespace:
            return StreamErrorCondition.INVALID_NAMESPACE, "wrong content namespace"
        version = root.get("version")
        if version is None or not VERSION.fullmatch(version):
            return StreamErrorCondition.UNSUPPORTED_VERSION, f"stream version {version!r}"
        return None

    def _check_peer(self, sender: str | None) -> tuple[StreamErrorCondition, str] | None:
        """What is wrong with the peer the stream under TLS comes from
        (``sender``: its ``from``); nothing, but on server streams."""
        return None

    def _check_restart(self, sender: str | None) -> tuple[StreamErrorCondition, str] | None:
        """What is wrong with the ``from`` of a stream restarted after SASL;
        nothing, but on server streams."""
        return None

    def _check_restarted_header(
        self, header: StreamHeader
    ) -> tuple[StreamErrorCondition, str] | None:
        # Checked as the first was.
        return self._check_header(header) or self._check_restart(header.element.get("from"))

    # ------------------------------------------------------------------
    # The client's stream before the relay.

    def _client_stream_token(self, token: Token) -> None:
        if isinstance(token, StreamHeader):
            self._client_header_token(token)
        elif isinstance(token, StreamEnd):
            self._end("client closed the stream", reply=self._closing_tag, clean=True)
        elif isinstance(token, StreamElement):
            self._pre_tls_element(token)

    def _client_header_token(self, header: StreamHeader) -> None:
        problem = self._check_header(header)
        if problem is None and self.state is State.TLS_HEADER:
            problem = self._check_peer(header.element.get("from"))
        if problem is not None:
            self._refuse(problem)
            return
        self._client_header = header.raw
        if self.state is State.PRE_TLS_HEADER:
            self._send_client(
                self._own_header()
                + pre_tls_features(self.settings.capabilities, self.settings.require_tls)
            )
        else:
            self._outbox.push(OpenBackend())
        self._go(Input.CLIENT_HEADER)

    def _pre_tls_element(self, token: StreamElement) -> None:
        tag = token.element.tag
        if tag == STARTTLS:
            self._send_client(_PROCEED)
            self._outbox.push(StartTLS(self._client.discard(), server_name_hint=self._requested))
            self._client_stream_open = False
            self._go(Input.CLIENT_STARTTLS)
        elif not self.settings.require_tls:
            self._held = token
            self._outbox.push(OpenBackend())
            self._go(Input.PLAINTEXT_RELAY)
        elif tag == SASL_AUTH:
            self._send_client(_ENCRYPTION_REQUIRED)
        else:
            reason = f"{local_name(tag)} before STARTTLS"
            self._fail(StreamErrorCondition.POLICY_VIOLATION, reason, text=reason)

    def _ready(self) -> None:
        self._go(Input.BACKEND_READY)
        held, self._held = self._held, None
        if held is not None:
            self._relay_client_token(held)
        self._pump_client()


def peer_checked(certificate: PeerCertificate | None, domain: str | None) -> PeerChecked:
    """The verdict on ``certificate`` for a stream with ``domain`` (see
    ``peer_verification``): the domain when it verified, else why not, for
    the log."""
    result = peer_verification(certificate, domain)
    detail = {
        PeerVerification.VERIFIED: "",
        PeerVerification.NO_CERTIFICATE: "no certificate",
        PeerVerification.UNTRUSTED: (certificate.problem or "") if certificate else "",
        PeerVerification.NAME_MISMATCH: f"not valid for {domain!r}" if domain else "no 'from'",
    }[result]
    return PeerChecked(result, domain if result is PeerVerification.VERIFIED else None, detail)


def peer_verification(certificate: PeerCertificate | None, domain: str | None) -> PeerVerification:
    """What ``certificate`` (None: none was sent) proves for a stream from
    ``domain`` (normalized; None: the stream names none)."""
    if certificate is None:
        return PeerVerification.NO_CERTIFICATE
    if not certificate.trusted:
        return PeerVerification.UNTRUSTED
    if domain is None or not _names(certificate, domain):
        return PeerVerification.NAME_MISMATCH
    return PeerVerification.VERIFIED


def _names(certificate: PeerCertificate, domain: str) -> bool:
    """RFC 6125 section 6.4 as RFC 7590 applies it: an xmppAddr equal to the
    domain, or a dNSName equal to its A-label form, or ``*.`` followed by
    all of it but its first label."""
    if any(address.lower() == domain for address in certificate.xmpp_addrs):
        return True
    try:
        ace = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    first, _, rest = ace.partition(".")
    return any(
        name == ace or (name.startswith("*.") and bool(first) and name[2:] == rest)
        for name in certificate.dns_names
    )


def _peer_address(sender: str | None) -> str | None:
    return sender if sender is not None and _ADDRESS.fullmatch(sender) else None


class XMPPClientMachine(XMPPMachine):
    """``xmpp-client``: client-to-server streams (``jabber:client``, port 5222)."""

    content_namespace = JABBER_CLIENT

    @staticmethod
    def busy_reply(hostname: str) -> bytes:
        return busy_reply(JABBER_CLIENT, hostname)


class XMPPServerMachine(XMPPMachine):
    """``xmpp-server``: incoming server-to-server streams (``jabber:server``, port 5269)."""

    content_namespace = JABBER_SERVER
    #: The domain the peer's certificate verified on the stream under TLS.
    _verified: str | None = None

    @staticmethod
    def busy_reply(hostname: str) -> bytes:
        return busy_reply(JABBER_SERVER, hostname)

    def _check_peer(self, sender: str | None) -> tuple[StreamErrorCondition, str] | None:
        on_failure = self.settings.peer_certificate_failure
        if on_failure is None:
            return None
        domain = normalize_domain(sender) if sender is not None else None
        if domain is not None and not DOMAIN.fullmatch(domain):
            # RFC 6120 section 4.7.1: a server's stream is from a domain.
            self._outbox.push(PeerChecked(PeerVerification.NAME_MISMATCH, None, "'from' no domain"))
            return StreamErrorCondition.IMPROPER_ADDRESSING, "'from' is not a domain"
        checked = peer_checked(self._peer_certificate, domain)
        self._verified = checked.domain
        self._outbox.push(checked)
        result, detail = checked.result, checked.detail
        if result is PeerVerification.VERIFIED or on_failure is PeerCertificateFailure.DIALBACK:
            return None
        reason = f"peer certificate: {result.value}" + (f" ({detail})" if detail else "")
        if result is not PeerVerification.NAME_MISMATCH:
            return StreamErrorCondition.NOT_AUTHORIZED, reason
        if domain is None:
            return StreamErrorCondition.IMPROPER_ADDRESSING, reason
        return StreamErrorCondition.INVALID_FROM, reason

    def _check_restart(self, sender: str | None) -> tuple[StreamErrorCondition, str] | None:
        if self.settings.peer_certificate_failure is None:
            return None
        domain = normalize_domain(sender) if sender is not None else None
        if domain is not None and not DOMAIN.fullmatch(domain):
            return StreamErrorCondition.IMPROPER_ADDRESSING, "'from' is not a domain"
        verified = self._verified
        if verified is None or domain == verified:
            return None
        if domain is None:
            reason = f"restarted stream without 'from', verified {verified!r}"
            return StreamErrorCondition.IMPROPER_ADDRESSING, reason
        reason = f"restarted stream from {domain!r}, verified {verified!r}"
        return StreamErrorCondition.INVALID_FROM, reason


class XMPPCapabilityProbe(CapabilityProbe):
    """Opens a stream to the backend and keeps its pre-TLS features.

    The result is one serialized child of ``<stream:features>`` per entry,
    shown to plaintext clients (``require_tls: false``) next to the proxy's
    STARTTLS. Use a subclass per stream type.
    """

    content_namespace: ClassVar[str]

    def __init__(self, hostname: str) -> None:
        super().__init__(hostname)
        defaults = SessionSettings
        limits = Limits(
            defaults.max_stanza_size, defaults.max_xml_depth, defaults.max_attribute_size
        )
        self._reader = XMLStreamReader(limits.scaled(BACKEND_LIMIT_FACTOR))
        self._send = stream_header(self.content_namespace, recipient=hostname)

    def receive_data(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while self.result is None and self.error is None:
                token = self._reader.next_token()
                if token is None:
                    return
                self._token(token)
        except RemoteProtocolError as error:  # an XMLStreamError among them
            self.error = f"backend: {error}"

    def _token(self, token: Token) -> None:
        if isinstance(token, StreamEnd):
            self.error = "the backend closed the stream"
        elif isinstance(token, StreamElement) and token.element.tag == FEATURES:
            self.result = tuple(serialize(child).decode() for child in token.element)
            self._send = b"</stream:stream>"
        elif isinstance(token, StreamElement) and token.element.tag == STREAM_ERROR:
            conditions = [local_name(child.tag) for child in token.element]
            self.error = f"backend stream error: {' '.join(conditions)}"
        elif isinstance(token, StreamElement):
            self.error = f"unexpected {local_name(token.element.tag)} from the backend"


class XMPPClientProbe(XMPPCapabilityProbe):
    content_namespace = JABBER_CLIENT


class XMPPServerProbe(XMPPCapabilityProbe):
    content_namespace = JABBER_SERVER
