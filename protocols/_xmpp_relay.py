"""What the XMPP machines share: two streams relayed token by token.

Theory of operation
-------------------
Whichever way a session began (a client that upgraded to TLS with the proxy,
``protocols.xmpp``; a local server whose outgoing stream the proxy took to a
remote one under TLS, ``protocols.xmpp_out``), it ends up the same: the
client's stream header has gone to the backend, the backend's header comes
back (the *greeting*, state ``backend_greeting``), and from then on (state
``relay``) both directions are relayed token by token, as received, and
still parsed (RFC 6120 section 4):

- the backend's ``<stream:features>`` lose what the proxy terminates
  (STARTTLS, stream compression (XEP-0138), SASL ``-PLUS`` mechanisms and
  channel-binding types, whose binding (RFC 5056) cannot cross a
  terminated TLS session), and are the only element re-serialized;
- a client's ``<starttls/>`` gets ``<failure/>`` and the stream ends
  (section 5.4.2.2), its ``<compress/>`` a ``<setup-failed/>``;
- after SASL ``<success/>`` both sides restart their streams (section
  6.4.6), and so do both parsers.

A machine here names, in its ``State`` and ``Input`` enums, the members of
``RelayStates`` and ``RelayInputs`` besides the shared ones, and says in
which states the client's tokens are read (``reads_client``) and the
backend's (``reads_backend``); tokens wait in their reader otherwise. A
stream the client restarts during the relay (after SASL) is checked by the
machine (``_check_restarted_header``) before it goes on.

The proxy's own words to the client are stream errors (``_fail``), opened
with a header of the proxy's own when the client has none yet (section
4.9.1.2). They carry a ``<text/>`` (section 4.9.2) for the peer's
administrator where the peer caused them: what is wrong with its header, its
certificate or its XML, in the log's words, which may quote what the peer
sent (``_xmlstream.error_text`` makes them one line of at most 200
characters without what XML forbids, and ``stream_error`` escapes it). The
proxy's own endings say what the line protocols say (``backend
unavailable``, ``timeout exceeded``, ``server shutting down``, ``too many
connections``), never the driver's reason, which names sockets and
addresses; ``<internal-server-error/>`` (a misbehaving backend, or the
proxy's own bug) says nothing.
"""

from __future__ import annotations

import abc
import re
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from lxml import etree

from protocols._base import (
    Peer,
    ProxyMachine,
    RemoteProtocolError,
    SessionSettings,
    SharedInputs,
    SharedStates,
    Side,
    event,
)
from protocols._xmlstream import (
    NS_STREAMS,
    STREAM,
    Limits,
    StreamElement,
    StreamEnd,
    StreamErrorCondition,
    StreamHeader,
    Token,
    XMLStreamError,
    XMLStreamReader,
    stream_error,
    stream_header,
)

JABBER_CLIENT: Final = "jabber:client"
JABBER_SERVER: Final = "jabber:server"
NS_TLS: Final = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL: Final = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_SASL2: Final = "urn:xmpp:sasl:2"
NS_COMPRESS: Final = "http://jabber.org/protocol/compress"
NS_COMPRESS_FEATURE: Final = "http://jabber.org/features/compress"
NS_CHANNEL_BINDING: Final = "urn:xmpp:sasl-cb:0"

FEATURES: Final = f"{{{NS_STREAMS}}}features"
STREAM_ERROR: Final = f"{{{NS_STREAMS}}}error"
STARTTLS: Final = f"{{{NS_TLS}}}starttls"
SASL_AUTH: Final = f"{{{NS_SASL}}}auth"
SASL_SUCCESS: Final = f"{{{NS_SASL}}}success"
COMPRESS: Final = f"{{{NS_COMPRESS}}}compress"
#: Features the proxy terminates or that cannot cross it.
_TERMINATED_FEATURES: Final = frozenset(
    {
        STARTTLS,
        f"{{{NS_COMPRESS_FEATURE}}}compression",
        f"{{{NS_CHANNEL_BINDING}}}sasl-channel-binding",
    }
)
#: Feature elements listing SASL mechanisms, one ``<mechanism>`` child each.
_MECHANISM_LISTS: Final = frozenset({f"{{{NS_SASL}}}mechanisms", f"{{{NS_SASL2}}}authentication"})

#: A stream header's ``to``: a domain (RFC 7622 section 3.2), loosely.
DOMAIN: Final = re.compile(r"[^\s@/<>&'\"]{1,1023}")
#: A stream header's ``version``: XMPP 1.x (RFC 6120 section 4.7.5).
VERSION: Final = re.compile(r"1\.[0-9]+")

#: Backend stanzas come from other users and the server itself; the backend
#: enforces its own limits on what clients send, so the proxy allows it more.
BACKEND_LIMIT_FACTOR: Final = 4

TLS_FAILURE: Final = b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
#: What the proxy's own endings tell the peer (``<text/>``): the words the
#: line protocols use, never the driver's reason, which names sockets and
#: addresses.
_EARLY_TLS: Final = "TLS handshake received before STARTTLS"
_UNAVAILABLE: Final = "backend unavailable"
_TIMEOUT: Final = "timeout exceeded"
_SHUTDOWN: Final = "server shutting down"
_BUSY: Final = "too many connections"
_COMPRESSION_FAILURE: Final = (
    b"<failure xmlns='http://jabber.org/protocol/compress'><setup-failed/></failure>"
)


def new_stream_id() -> str:
    """A fresh, unpredictable stream id (RFC 6120 section 4.7.3)."""
    return secrets.token_hex(8)


def busy_reply(content_namespace: str, hostname: str) -> bytes:
    """A stream of the proxy's own that ends at once: it is too busy."""
    header = stream_header(content_namespace, sender=hostname, stream_id=new_stream_id())
    return header + stream_error(StreamErrorCondition.RESOURCE_CONSTRAINT, text=_BUSY)


def serialize(element: etree._Element) -> bytes:
    """Exclusive canonical XML: only the namespace declarations it uses.

    libxml2 refuses to canonicalize some documents that it parses, such as
    a namespace name that is not a URI (``xmlns='a|b'``): that is a peer's
    violation, not the proxy's failure.
    """
    try:
        return etree.tostring(element, method="c14n", exclusive=True)
    except (etree.LxmlError, ValueError) as error:
        raise RemoteProtocolError(
            f"{local_name(element.tag)} cannot be canonicalized: {error}"
        ) from None


def strip_features(features: etree._Element) -> bool:
    """Remove from ``features`` what the proxy terminates; True if anything went."""
    changed = False
    for child in list(features):
        if child.tag in _TERMINATED_FEATURES:
            features.remove(child)
            changed = True
        elif child.tag in _MECHANISM_LISTS:
            for mechanism in list(child):
                name = (mechanism.text or "").strip().upper()
                if local_name(mechanism.tag) == "mechanism" and name.endswith("-PLUS"):
                    child.remove(mechanism)
                    changed = True
            if not any(local_name(node.tag) == "mechanism" for node in child):
                features.remove(child)
    return changed


def normalize_domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def local_name(tag: object) -> str:
    # Not etree.QName, which raises on a namespace name holding a "}": a
    # local name never holds one, so it is all after the last.
    return tag.rpartition("}")[2] if isinstance(tag, str) else "element"


@dataclass(frozen=True)
class RelayStates(SharedStates[Any]):
    """The states of a relayed session (see the module docstring)."""

    #: The client's header went to the backend; waiting for the backend's.
    backend_greeting: Any
    #: Both directions relayed, token by token.
    relay: Any


@dataclass(frozen=True)
class RelayInputs(SharedInputs[Any]):
    #: The backend answered the client's stream header.
    backend_ready: Any


class XMPPRelayMachine(ProxyMachine[Any, Any]):
    """The relay of an XMPP session; see the module docstring."""

    state_members = RelayStates
    input_members = RelayInputs
    shared_states: RelayStates
    shared_inputs: RelayInputs
    #: The content namespace of the streams the client opens.
    content_namespace: ClassVar[str]
    #: States in which the client's tokens are interpreted, and the backend's.
    reads_client: ClassVar[frozenset[Any]]
    reads_backend: ClassVar[frozenset[Any]]
    #: What the client hears when the backend's connection ends mid-stream.
    backend_lost: ClassVar[StreamErrorCondition] = StreamErrorCondition.INTERNAL_SERVER_ERROR

    def __init__(self, settings: SessionSettings, peer: Peer) -> None:
        super().__init__(settings, peer)
        limits = Limits(
            settings.max_stanza_size, settings.max_xml_depth, settings.max_attribute_size
        )
        self._client = XMLStreamReader(limits)
        self._backend = XMLStreamReader(limits.scaled(BACKEND_LIMIT_FACTOR))
        #: The ``from`` and ``to`` of the proxy's own headers to the client.
        self._domain = settings.hostname
        self._peer_address: str | None = None
        self._dialback = False
        #: The stream header the backend gets first.
        self._client_header = b""
        #: Whether the client has a stream header for its current stream, and
        #: the end tag that closes that stream.
        self._client_stream_open = False
        self._closing_tag = b"</stream:stream>"
        self._client_stream_ended = False
        #: The relayed streams run under TLS (the backend's header then
        #: opens the client's stream).
        self._tls = False

    # ------------------------------------------------------------------
    # Inputs.

    def _from_backend(self, data: bytes) -> None:
        self._backend.feed(data)
        self._pump_backend()

    def _from_client(self, data: bytes) -> None:
        self._client.feed(data)
        self._pump_client()

    def _refuse_early_tls(self) -> None:
        self._fail(
            StreamErrorCondition.NOT_WELL_FORMED, "TLS ClientHello before STARTTLS", text=_EARLY_TLS
        )

    @event
    def receive_eof(self, side: Side) -> None:
        if side is Side.CLIENT:
            self._end("client closed")
        elif self._client_stream_ended:
            self._end("client closed the stream", clean=True)
        else:
            self._fail(self.backend_lost, "backend closed")

    @event
    def backend_failed(self, reason: str) -> None:
        self._fail(StreamErrorCondition.REMOTE_CONNECTION_FAILED, reason, text=_UNAVAILABLE)

    @event
    def timed_out(self, reason: str) -> None:
        self._fail(StreamErrorCondition.CONNECTION_TIMEOUT, reason, text=_TIMEOUT)

    @event
    def shutting_down(self) -> None:
        self._fail(StreamErrorCondition.SYSTEM_SHUTDOWN, "proxy shutting down", text=_SHUTDOWN)

    @property
    def client_mid_command(self) -> bool:
        # The reader holds bytes only until they make a whole token.
        return self.state in self.reads_client and self._client.buffered > 0

    @property
    def unprocessed_client_bytes(self) -> int:
        # Elsewhere the reader takes everything, within its limits.
        return 0 if self.state in self.reads_client else self._client.buffered

    def violated(self, reason: str) -> None:
        self._fail(StreamErrorCondition.INTERNAL_SERVER_ERROR, reason, violation=True)

    # ------------------------------------------------------------------
    # The proxy's own words.

    def _own_header(self) -> bytes:
        self._client_stream_open = True
        self._closing_tag = b"</stream:stream>"
        return stream_header(
            self.content_namespace,
            sender=self._domain,
            recipient=self._peer_address,
            stream_id=new_stream_id(),
            dialback=self._dialback,
        )

    def _fail(
        self,
        condition: StreamErrorCondition,
        reason: str,
        *,
        text: str | None = None,
        violation: bool = False,
    ) -> None:
        """End the session with a stream error, opening the client's stream
        first if it has no header yet (RFC 6120 section 4.9.1.2). ``reason``
        is for the log; ``text``, for the peer (see the module docstring),
        is none unless the caller gives one."""
        header = b"" if self._client_stream_open else self._own_header()
        reply = header + stream_error(condition, self._closing_tag, text=text)
        self._end(f"{reason} ({condition.value})", reply=reply, violation=violation)

    def _refuse(self, problem: tuple[StreamErrorCondition, str]) -> None:
        """End the session for what is wrong with the client's stream header:
        the peer's doing, so its administrator is told what."""
        condition, reason = problem
        self._fail(condition, reason, text=reason)

    # ------------------------------------------------------------------
    # The client's stream.

    def _pump_client(self) -> None:
        while self.state in self.reads_client:
            try:
                token = self._client.next_token()
            except XMLStreamError as error:
                self._fail(error.condition, f"client: {error.reason}", text=error.reason)
                return
            if token is None:
                return
            if self.state is self.shared_states.relay:
                self._relay_client_token(token)
            else:
                self._client_stream_token(token)

    @abc.abstractmethod
    def _client_stream_token(self, token: Token) -> None:
        """A client token before the relay (the machine's own phase)."""

    @abc.abstractmethod
    def _check_restarted_header(
        self, header: StreamHeader
    ) -> tuple[StreamErrorCondition, str] | None:
        """What is wrong with a stream the client restarted during the relay."""

    def _relay_client_token(self, token: Token) -> None:
        if isinstance(token, StreamHeader):
            # Restarted after SASL success (section 6.4.6).
            problem = self._check_restarted_header(token)
            if problem is not None:
                self._refuse(problem)
                return
        if isinstance(token, StreamElement) and token.element.tag == STARTTLS:
            # RFC 6120 section 5.4.2.2: failure, then the stream ends.
            reason = "STARTTLS under TLS" if self._tls else "STARTTLS in a plaintext relay"
            self._end(reason, reply=TLS_FAILURE + self._closing_tag)
            return
        if isinstance(token, StreamElement) and token.element.tag == COMPRESS:
            # The proxy parses the stream: it cannot be compressed (XEP-0138).
            self._send_client(_COMPRESSION_FAILURE)
            return
        if isinstance(token, StreamEnd):
            self._client_stream_ended = True
        self._send_backend(token.raw)

    # ------------------------------------------------------------------
    # The backend's stream.

    def _pump_backend(self) -> None:
        while self.state in self.reads_backend:
            try:
                token = self._backend.next_token()
            except XMLStreamError as error:
                raise RemoteProtocolError(f"backend: {error.reason}") from None
            if token is None:
                return
            self._backend_token(token)

    def _backend_token(self, token: Token) -> None:
        greeting = self.state is self.shared_states.backend_greeting
        if isinstance(token, StreamHeader):
            if token.element.tag != STREAM:
                raise RemoteProtocolError(f"backend stream root is {token.element.tag!r}")
            # Plaintext relay: the client has the proxy's header already.
            if self._tls or not greeting:
                self._send_client(token.raw)
                self._client_stream_open = True
                prefix = token.element.prefix
                self._closing_tag = b"</%s:stream>" % prefix.encode() if prefix else b"</stream>"
            if self._tls and greeting:
                self._ready()
        elif isinstance(token, StreamElement):
            self._backend_element(token, greeting)
        elif isinstance(token, StreamEnd):
            self._end("backend closed the stream", reply=token.raw, clean=self._client_stream_ended)
        else:
            self._send_client(token.raw)

    def _backend_element(self, token: StreamElement, greeting: bool) -> None:
        element = token.element
        if element.tag == FEATURES and greeting:
            # Plaintext relay: the client has the proxy's features already.
            self._ready()
        elif element.tag == FEATURES:
            self._send_client(serialize(element) if strip_features(element) else token.raw)
        elif element.tag == SASL_SUCCESS:
            self._send_client(token.raw)
            self._client.restart()
            self._backend.restart()
            self._client_stream_open = False
        else:
            self._send_client(token.raw)

    def _ready(self) -> None:
        self._go(self.shared_inputs.backend_ready)
        self._pump_client()
