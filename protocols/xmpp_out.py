"""XMPP outgoing server-to-server streams: the local server's way out, under TLS.

Theory of operation
-------------------
The local server connects to an ``xmpp-server-out`` listener on loopback and
opens its stream in plaintext (RFC 6120 section 4.7; ``jabber:server``,
``from`` one of its domains, ``to`` the remote domain), as it would to the
remote server. The proxy is the *initiating entity* towards the remote one:

1. The local header is checked (``to`` must be a domain, ``from`` one of
   the listener's ``domains``) and kept; nothing is answered yet.
   ``OpenBackend(route=to)``: the driver resolves the domain (SRV
   ``_xmpps-server`` and ``_xmpp-server``, XEP-0368, or the listener's
   static routes) and connects, then says whether TLS starts at once there
   (``route_connected``).
2. STARTTLS (section 5.4.2): the proxy opens its own stream to the remote
   (the local header's ``from`` and ``to``), reads its header and features,
   which must offer ``<starttls/>`` (never plaintext), sends ``<starttls/>``
   and waits for ``<proceed/>``; bytes the remote sends after it are
   discarded, never interpreted. Direct TLS skips this step.
3. ``StartTLS(side=BACKEND)``: a TLS worker does the client's part of the
   handshake (SNI: the remote domain; ALPN ``xmpp-server`` on direct TLS),
   presents the certificate of the local ``from`` domain if asked, and
   reports the remote's certificate. It must be valid for the remote domain
   (RFC 6120 section 13.7.2, RFC 7590, as ``xmpp.peer_checked`` judges
   it: the domain itself, never an SRV target). With ``on_failure:
   refuse`` a remote that fails gets nothing and the local server a
   ``<remote-connection-failed/>`` stream error; with ``dialback`` the
   stream goes on and the remote is trusted as far as DNS is, as the local
   server would without the proxy.
4. The local header goes to the remote under TLS; the remote's header and
   everything after it come back to the local server, which thus sees the
   remote's stream id (dialback, XEP-0220, keys on it) and its features
   under TLS. From here ``_xmpp_relay`` relays both ways.

Refusals of the local header: a ``to`` that is not a domain is
``<host-unknown/>`` (none at all ``<improper-addressing/>``), a ``from``
outside ``domains`` ``<invalid-from/>`` (section 4.9.3); the remote's
failures (no STARTTLS, ``<failure/>``, a stream error, a closed
connection, DNS) are ``<remote-connection-failed/>``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Final

from protocols._base import (
    LocalProtocolError,
    OpenBackend,
    Peer,
    PeerCertificateFailure,
    PeerVerification,
    SessionSettings,
    Side,
    StartTLS,
    TLSInfo,
    ending_transitions,
    event,
)
from protocols._xmlstream import (
    NS_DIALBACK,
    STREAM,
    StreamElement,
    StreamEnd,
    StreamErrorCondition,
    StreamHeader,
    Token,
    stream_header,
)
from protocols._xmpp_relay import (
    DOMAIN,
    FEATURES,
    JABBER_SERVER,
    NS_TLS,
    STARTTLS,
    STREAM_ERROR,
    VERSION,
    XMPPRelayMachine,
    busy_reply,
    local_name,
    normalize_domain,
)
from protocols.xmpp import peer_checked


class State(enum.Enum):
    """Where an outgoing stream stands."""

    #: Waiting for the local server's stream header.
    LOCAL_HEADER = enum.auto()
    #: ``OpenBackend(route=...)`` queued: resolving and connecting.
    ROUTING = enum.auto()
    #: The proxy's header went to the remote; waiting for the remote's.
    REMOTE_HEADER = enum.auto()
    #: Waiting for the remote's features.
    REMOTE_FEATURES = enum.auto()
    #: ``<starttls/>`` sent; waiting for ``<proceed/>``.
    REMOTE_PROCEED = enum.auto()
    #: The remote's socket is with a TLS worker.
    TLS_HANDSHAKE = enum.auto()
    #: The local header went to the remote under TLS; waiting for its header.
    BACKEND_GREETING = enum.auto()
    #: Both directions relayed, token by token.
    RELAY = enum.auto()
    CLOSED = enum.auto()
    ERROR = enum.auto()


class Input(enum.Enum):
    LOCAL_HEADER = enum.auto()  #: The local server opened an acceptable stream.
    ROUTED_STARTTLS = enum.auto()  #: Connected where TLS starts by STARTTLS.
    ROUTED_DIRECT = enum.auto()  #: Connected where TLS starts at once.
    REMOTE_HEADER = enum.auto()  #: The remote answered the proxy's header.
    REMOTE_STARTTLS = enum.auto()  #: Its features offer STARTTLS; asked for it.
    REMOTE_PROCEED = enum.auto()  #: It said ``<proceed/>``.
    TLS_ESTABLISHED = enum.auto()  #: The worker finished the handshake.
    BACKEND_READY = enum.auto()  #: The remote answered the local header under TLS.
    CLOSE = enum.auto()
    VIOLATION = enum.auto()


TRANSITIONS: Final[Mapping[tuple[State, Input], State]] = {
    (State.LOCAL_HEADER, Input.LOCAL_HEADER): State.ROUTING,
    (State.ROUTING, Input.ROUTED_STARTTLS): State.REMOTE_HEADER,
    (State.ROUTING, Input.ROUTED_DIRECT): State.TLS_HANDSHAKE,
    (State.REMOTE_HEADER, Input.REMOTE_HEADER): State.REMOTE_FEATURES,
    (State.REMOTE_FEATURES, Input.REMOTE_STARTTLS): State.REMOTE_PROCEED,
    (State.REMOTE_PROCEED, Input.REMOTE_PROCEED): State.TLS_HANDSHAKE,
    (State.TLS_HANDSHAKE, Input.TLS_ESTABLISHED): State.BACKEND_GREETING,
    (State.BACKEND_GREETING, Input.BACKEND_READY): State.RELAY,
    **ending_transitions(State, Input),
}

_STARTTLS: Final = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
_PROCEED: Final = f"{{{NS_TLS}}}proceed"
_TLS_REFUSED: Final = f"{{{NS_TLS}}}failure"


#: A domain as DNS and SNI take it: letters, digits, hyphens (A-labels),
#: dots, and underscores, which DNS allows.
_ASCII_DOMAIN: Final = re.compile(r"[A-Za-z0-9_.-]{1,253}")


def ascii_domain(domain: str) -> str | None:
    """``domain`` as DNS and SNI take it (A-labels), or None if it is none."""
    try:
        ace = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return ace if _ASCII_DOMAIN.fullmatch(ace) else None


class XMPPOutgoingMachine(XMPPRelayMachine):
    """``xmpp-server-out``: one outgoing server-to-server stream; see the module docstring."""

    states = State
    inputs = Input
    transitions = TRANSITIONS
    content_namespace = JABBER_SERVER
    reads_client = frozenset({State.LOCAL_HEADER, State.RELAY})
    reads_backend = frozenset(
        {
            State.REMOTE_HEADER,
            State.REMOTE_FEATURES,
            State.REMOTE_PROCEED,
            State.BACKEND_GREETING,
            State.RELAY,
        }
    )
    backend_lost = StreamErrorCondition.REMOTE_CONNECTION_FAILED
    tls_side = Side.BACKEND

    def __init__(self, settings: SessionSettings, peer: Peer) -> None:
        super().__init__(settings, peer)
        self._domains = frozenset(normalize_domain(domain) for domain in settings.domains)
        #: The remote domain, as the local header named it and in A-labels.
        self._remote = ""
        self._remote_ascii = ""
        self.state = State.LOCAL_HEADER

    @staticmethod
    def busy_reply(hostname: str) -> bytes:
        return busy_reply(JABBER_SERVER, hostname)

    # ------------------------------------------------------------------
    # The driver's inputs.

    @event
    def backend_connected(self) -> None:
        raise LocalProtocolError("an outgoing stream asks for routes only (route_connected)")

    @event
    def route_connected(self, direct_tls: bool) -> None:
        if direct_tls:
            self._go(Input.ROUTED_DIRECT)
            self._start_tls(b"")
            return
        self._go(Input.ROUTED_STARTTLS)
        self._send_backend(
            stream_header(
                JABBER_SERVER,
                sender=self._peer_address,
                recipient=self._remote,
                dialback=self._dialback,
            )
        )

    @event
    def tls_established(self, info: TLSInfo) -> None:
        self._go(Input.TLS_ESTABLISHED)
        self._tls = True
        checked = peer_checked(info.peer_certificate, self._remote)
        self._outbox.push(checked)
        refuse = self.settings.peer_certificate_failure is PeerCertificateFailure.REFUSE
        if checked.result is not PeerVerification.VERIFIED and refuse:
            detail = f" ({checked.detail})" if checked.detail else ""
            reason = f"remote certificate: {checked.result.value}{detail}"
            self._fail(StreamErrorCondition.REMOTE_CONNECTION_FAILED, reason, text=reason)
            return
        self._send_backend(self._client_header)
        self._pump_backend()

    # ------------------------------------------------------------------
    # The local server's stream.

    def _client_stream_token(self, token: Token) -> None:
        if isinstance(token, StreamHeader):
            problem = self._check_local_header(token)
            if problem is not None:
                self._refuse(problem)
                return
            self._client_header = token.raw
            self._outbox.push(OpenBackend(route=self._remote_ascii))
            self._go(Input.LOCAL_HEADER)
        elif isinstance(token, StreamEnd):
            self._end("local server closed the stream", clean=True)
        else:
            name = local_name(token.element.tag) if isinstance(token, StreamElement) else "text"
            self._fail(StreamErrorCondition.POLICY_VIOLATION, f"{name} before a stream header")

    def _check_restarted_header(
        self, header: StreamHeader
    ) -> tuple[StreamErrorCondition, str] | None:
        # After SASL with the remote: the same two domains, or nothing.
        sender, to = header.element.get("from"), header.element.get("to")
        if header.element.tag != STREAM or header.element.nsmap.get(None) != JABBER_SERVER:
            return StreamErrorCondition.INVALID_NAMESPACE, "not a server-to-server stream"
        if to is None or normalize_domain(to) != self._remote:
            return StreamErrorCondition.HOST_UNKNOWN, f"restarted stream not to {self._remote!r}"
        if sender is None or normalize_domain(sender) != self._peer_address:
            return StreamErrorCondition.INVALID_FROM, "restarted stream from another domain"
        return None

    def _check_local_header(self, header: StreamHeader) -> tuple[StreamErrorCondition, str] | None:
        root = header.element
        sender, to = root.get("from"), root.get("to")
        self._dialback = root.nsmap.get("db") == NS_DIALBACK
        if sender is not None and DOMAIN.fullmatch(normalize_domain(sender)):
            self._peer_address = normalize_domain(sender)
        if to is not None and DOMAIN.fullmatch(normalize_domain(to)):
            self._domain = self._remote = normalize_domain(to)
        if root.tag != STREAM or root.nsmap.get(None) != JABBER_SERVER:
            return StreamErrorCondition.INVALID_NAMESPACE, "not a server-to-server stream"
        if to is None:
            return StreamErrorCondition.IMPROPER_ADDRESSING, "no 'to'"
        ace = ascii_domain(self._remote) if self._remote else None
        if ace is None:
            return StreamErrorCondition.HOST_UNKNOWN, "'to' is not a domain"
        self._remote_ascii = ace
        if self._peer_address is None:
            return StreamErrorCondition.IMPROPER_ADDRESSING, "'from' is not a domain"
        if self._domains and self._peer_address not in self._domains:
            return StreamErrorCondition.INVALID_FROM, f"not a local domain: {self._peer_address!r}"
        if not VERSION.fullmatch(root.get("version") or ""):
            return (
                StreamErrorCondition.UNSUPPORTED_VERSION,
                f"stream version {root.get('version')!r}",
            )
        return None

    # ------------------------------------------------------------------
    # The remote's stream before TLS.

    def _backend_token(self, token: Token) -> None:
        if self.state not in (State.REMOTE_HEADER, State.REMOTE_FEATURES, State.REMOTE_PROCEED):
            super()._backend_token(token)
            return
        if isinstance(token, StreamHeader) and self.state is State.REMOTE_HEADER:
            root = token.element
            if root.tag != STREAM or root.nsmap.get(None) != JABBER_SERVER:
                self._remote_failed("its stream is not a server-to-server stream")
                return
            if not VERSION.fullmatch(root.get("version") or ""):
                # Before XMPP 1.0 there was no STARTTLS (RFC 6120 section 4.7.5).
                self._remote_failed(f"stream version {root.get('version')!r}")
                return
            self._go(Input.REMOTE_HEADER)
        elif isinstance(token, StreamElement):
            self._remote_element(token)
        elif isinstance(token, StreamEnd):
            self._remote_failed("it closed the stream before TLS")
        # Whitespace keepalives between elements mean nothing here.

    def _remote_element(self, token: StreamElement) -> None:
        element = token.element
        if element.tag == STREAM_ERROR:
            conditions = " ".join(local_name(child.tag) for child in element)
            self._remote_failed(f"stream error: {conditions}")
        elif self.state is State.REMOTE_FEATURES and element.tag == FEATURES:
            if element.find(STARTTLS) is None:
                self._remote_failed("it offers no STARTTLS")
                return
            self._send_backend(_STARTTLS)
            self._go(Input.REMOTE_STARTTLS)
        elif self.state is State.REMOTE_PROCEED and element.tag == _PROCEED:
            self._go(Input.REMOTE_PROCEED)
            self._start_tls(self._backend.discard())
            self._backend.restart()
        elif self.state is State.REMOTE_PROCEED and element.tag == _TLS_REFUSED:
            self._remote_failed("it refused STARTTLS")
        else:
            self._remote_failed(f"unexpected {local_name(element.tag)} before TLS")

    def _remote_failed(self, why: str) -> None:
        # The remote's doing: the local server's administrator is told what.
        reason = f"remote {self._remote}: {why}"
        self._fail(StreamErrorCondition.REMOTE_CONNECTION_FAILED, reason, text=reason)

    def _start_tls(self, discarded: bytes) -> None:
        self._outbox.push(
            StartTLS(
                discarded,
                server_name_hint=self._peer_address,
                side=Side.BACKEND,
                peer_name=self._remote_ascii,
            )
        )
