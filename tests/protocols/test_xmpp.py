"""Tests of the XMPP machine, its XML stream reader and its probe, written as transcripts.

``run(machine, ...)`` (see ``tests/protocols/transcript.py``) takes events and
the exact commands expected after each. The proxy's stream ids are random;
here they are all ``ID``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from protocols._base import (
    CloseConnection,
    Command,
    LocalProtocolError,
    OpenBackend,
    PeerCertificate,
    PeerCertificateFailure,
    PeerChecked,
    PeerVerification,
    SendToBackend,
    SendToClient,
    Side,
    StartTLS,
    TLSInfo,
    TLSMode,
)
from protocols._xmlstream import (
    NS_STREAM_ERRORS,
    NS_STREAMS,
    STREAM_ERROR_TEXT_LIMIT,
    Limits,
    StreamElement,
    StreamEnd,
    StreamErrorCondition,
    StreamHeader,
    Token,
    Whitespace,
    XMLStreamError,
    XMLStreamReader,
    error_text,
    stream_error,
)
from protocols._xmpp_relay import new_stream_id
from protocols.facts import FACTS
from protocols.xmpp import (
    State,
    XMPPClientMachine,
    XMPPClientProbe,
    XMPPMachine,
    XMPPServerMachine,
    XMPPServerProbe,
    peer_verification,
    pre_tls_features,
)
from tests.protocols.dialogues import (
    BACKEND_FEATURES,
    BACKEND_HEADER,
    MECHANISMS,
    REQUIRED_FEATURES,
    STRIPPED_FEATURES,
    XMPP,
    Transcripts,
    client_header,
    proxy_header,
    split_invariance_tests,
)
from tests.protocols.dialogues import stream_error as error
from tests.protocols.transcript import (
    EOF,
    HOST,
    TLS,
    Backend,
    Client,
    Connected,
    Event,
    Failed,
    ShuttingDown,
    Timeout,
    backend_bytes,
    check_probe_error,
    client_bytes,
    drain,
    exchange,
    run,
)

PEER = XMPP.peer
settings = XMPP.settings
relaying = XMPP.relaying


HEADER = XMPP.client_opening
STARTTLS = XMPP.starttls
PROCEED = XMPP.tls_ready
AUTH = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHB3</auth>"
SUCCESS = b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
BIND_FEATURES = (
    b"<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>"
)
#: A message whose body holds markup as text, CDATA and non-ASCII characters.
MESSAGE = (
    "<message to='bob@example.com' type='chat' id='m1'><body>&lt;starttls/&gt; "
    "<![CDATA[<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>]]> caf\u00e9 \U0001f600"
    "</body></message>"
).encode()


#: A STARTTLS listener's session up to the backend connection.
TO_BACKEND = (*XMPP.opening(), *XMPP.started_tls(), TLS(), *XMPP.to_backend())
#: A direct-TLS listener's session up to the relayed stream header.
DIRECT_TO_BACKEND: tuple[Event | Command, ...] = (
    StartTLS(b""),
    TLS(),
    Client(HEADER),
    OpenBackend(),
    Connected(),
    SendToBackend(HEADER),
)


def refused(machine: XMPPMachine, data: bytes) -> tuple[bytes, CloseConnection]:
    """Feed ``data`` from the client; what the client got and how it ended."""
    machine.receive_data(Side.CLIENT, data)
    commands = drain(machine)
    assert not any(isinstance(c, SendToBackend | OpenBackend | StartTLS) for c in commands)
    assert isinstance(commands[-1], CloseConnection)
    return client_bytes(commands), commands[-1]


def said(data: bytes) -> tuple[str, str | None]:
    """The condition and the ``<text/>`` of the stream error that ends
    ``data`` (what the client got), as lxml reads them. Where the proxy's
    own header opens ``data``, all of it must parse as one document."""
    if data.startswith(b"<?xml"):
        assert etree.fromstring(data).tag == f"{{{NS_STREAMS}}}stream"
    start = data.rindex(b"<stream:error ")
    end = data.index(b"</stream:error>", start) + len(b"</stream:error>")
    assert data[end:].startswith(b"</") and data.endswith(b"stream>")
    condition, *rest = etree.fromstring(data[start:end])
    assert etree.QName(condition).namespace == NS_STREAM_ERRORS
    if not rest:
        return etree.QName(condition).localname, None
    (text,) = rest
    assert text.tag == f"{{{NS_STREAM_ERRORS}}}text"
    assert text.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"
    assert text.text is not None and 0 < len(text.text) <= STREAM_ERROR_TEXT_LIMIT
    return etree.QName(condition).localname, text.text


# --------------------------------------------------------------------------
# Whole sessions.


#: SASL success and the stream restart it calls for, relayed.
SASL_RESTART: tuple[Event | Command, ...] = (
    *exchange(AUTH, SUCCESS),
    Client(HEADER),
    SendToBackend(HEADER),
)


def test_full_starttls_session() -> None:
    machine = relaying()
    run(
        machine,
        *SASL_RESTART,
        Backend(BACKEND_HEADER + BIND_FEATURES),
        SendToClient(BACKEND_HEADER),
        SendToClient(BIND_FEATURES),
        Client(MESSAGE + b" "),
        SendToBackend(MESSAGE),
        SendToBackend(b" "),
        Backend(MESSAGE),
        SendToClient(MESSAGE),
        *exchange(b"</stream:stream>", b"</stream:stream>"),
        CloseConnection("backend closed the stream", clean=True),
    )
    assert machine.state is State.CLOSED
    run(machine, Client(b"<iq/>"), Backend(b"<iq/>"), Timeout(), EOF(Side.CLIENT))


def test_direct_tls_session() -> None:
    machine = XMPPClientMachine(settings(tls_mode=TLSMode.IMPLICIT), PEER)
    run(
        machine,
        StartTLS(b""),
        TLS(),
        Client(HEADER),
        OpenBackend(),
        Client(b"<iq type='get' id='early'/>"),
        Connected(),
        SendToBackend(HEADER),
        Backend(BACKEND_HEADER),
        SendToClient(BACKEND_HEADER),
        SendToBackend(b"<iq type='get' id='early'/>"),
        Backend(BACKEND_FEATURES),
        SendToClient(STRIPPED_FEATURES),
        Client(STARTTLS + b"<iq/>"),
        SendToClient(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>"),
        CloseConnection("STARTTLS under TLS"),
    )


def test_plaintext_session_shows_the_backend_features() -> None:
    capabilities = (MECHANISMS.decode(), "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    machine = XMPPClientMachine(settings(require_tls=False, capabilities=capabilities), PEER)
    run(
        machine,
        Client(HEADER),
        SendToClient(
            proxy_header() + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
            b'<mechanisms xmlns="urn:ietf:params:xml:ns:xmpp-sasl"><mechanism>PLAIN</mechanism>'
            b"<mechanism>SCRAM-SHA-1</mechanism></mechanisms></stream:features>"
        ),
        Client(AUTH + b"<iq type='set' id='held'/>"),
        OpenBackend(),
        Connected(),
        SendToBackend(HEADER),
        # The client has the proxy's header and features: the backend's are swallowed.
        Backend(BACKEND_HEADER + BACKEND_FEATURES),
        SendToBackend(AUTH),
        SendToBackend(b"<iq type='set' id='held'/>"),
        Backend(SUCCESS),
        SendToClient(SUCCESS),
        Client(HEADER),
        SendToBackend(HEADER),
        Backend(BACKEND_HEADER + BACKEND_FEATURES),
        SendToClient(BACKEND_HEADER),
        SendToClient(STRIPPED_FEATURES),
        Client(STARTTLS),
        SendToClient(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>"),
        CloseConnection("STARTTLS in a plaintext relay"),
    )


def test_plaintext_backend_refusal_is_relayed() -> None:
    machine = XMPPClientMachine(settings(require_tls=False), PEER)
    refusal = (
        b"<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
    )
    run(
        machine,
        Client(HEADER),
        SendToClient(
            proxy_header()
            + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
            + b"</stream:features>"
        ),
        Client(AUTH),
        OpenBackend(),
        Connected(),
        SendToBackend(HEADER),
        Backend(BACKEND_HEADER + refusal + b"</stream:stream>"),
        SendToClient(refusal),
        SendToClient(b"</stream:stream>"),
        CloseConnection("backend closed the stream"),
    )


S2S_HEADER = (
    b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
    b"xmlns:db='jabber:server:dialback' from='remote.example' to='example.com' version='1.0'>"
)
#: A server stream from ``remote.example`` up to its TLS handshake.
S2S_TO_TLS: tuple[Event | Command, ...] = (
    Client(S2S_HEADER),
    SendToClient(
        b"<?xml version='1.0'?><stream:stream xmlns=\"jabber:server\" "
        b'xmlns:stream="http://etherx.jabber.org/streams" '
        b'xmlns:db="jabber:server:dialback" id="ID" from="example.com" '
        b'to="remote.example" version="1.0">' + REQUIRED_FEATURES
    ),
    Client(STARTTLS),
    PROCEED,
    StartTLS(b"", server_name_hint="example.com"),
)


def test_server_to_server_stream_with_dialback() -> None:
    header = S2S_HEADER
    db_result = (
        b"<db:result from='remote.example' to='example.com'>"
        b"b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3</db:result>"
    )
    machine = XMPPServerMachine(settings(), PEER)
    run(
        machine,
        *S2S_TO_TLS,
        TLS(),
        Client(header),
        OpenBackend(),
        Connected(),
        SendToBackend(header),
        Backend(header.replace(b"from='remote.example' to='example.com'", b"id='s2s'")),
        SendToClient(header.replace(b"from='remote.example' to='example.com'", b"id='s2s'")),
        Backend(
            b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
        ),
        SendToClient(
            b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
        ),
        Client(db_result),
        SendToBackend(db_result),
    )


# --------------------------------------------------------------------------
# Peer certificates on server-to-server streams.

#: What the worker reports of a certificate for ``remote.example``.
TRUSTED = PeerCertificate(trusted=True, dns_names=("remote.example",))
EXPIRED = PeerCertificate(
    trusted=False, problem="certificate has expired", dns_names=("remote.example",)
)
OTHER_DOMAIN = PeerCertificate(trusted=True, dns_names=("other.example",))


def _s2s_after_tls(
    on_failure: PeerCertificateFailure,
    certificate: PeerCertificate | None,
    header: bytes = S2S_HEADER,
) -> list[Command]:
    """A server stream through STARTTLS; what its restarted ``header`` gets."""
    machine = XMPPServerMachine(settings(peer_certificate_failure=on_failure), PEER)
    machine.receive_data(Side.CLIENT, S2S_HEADER + STARTTLS)
    drain(machine)
    TLS(certificate).apply(machine)
    machine.receive_data(Side.CLIENT, header)
    return drain(machine)


@pytest.mark.parametrize("on_failure", list(PeerCertificateFailure))
def test_a_verified_peer_goes_through_and_its_domain_to_the_driver(
    on_failure: PeerCertificateFailure,
) -> None:
    machine = XMPPServerMachine(settings(peer_certificate_failure=on_failure), PEER)
    run(
        machine,
        *S2S_TO_TLS,
        TLS(TRUSTED),
        Client(S2S_HEADER),
        PeerChecked(PeerVerification.VERIFIED, "remote.example"),
        OpenBackend(),
        Connected(),
        SendToBackend(S2S_HEADER),
    )


def test_direct_tls_peers_are_checked_too() -> None:
    machine = XMPPServerMachine(
        settings(tls_mode=TLSMode.IMPLICIT, peer_certificate_failure=PeerCertificateFailure.REFUSE),
        PEER,
    )
    assert drain(machine) == [StartTLS(b"")]
    TLS(EXPIRED).apply(machine)
    machine.receive_data(Side.CLIENT, S2S_HEADER)
    commands = drain(machine)
    assert commands[0] == PeerChecked(PeerVerification.UNTRUSTED, None, "certificate has expired")
    assert client_bytes(commands).endswith(
        error("not-authorized", text="peer certificate: untrusted (certificate has expired)")
    )
    assert not any(isinstance(c, SendToBackend | OpenBackend) for c in commands)


@pytest.mark.parametrize(
    ("certificate", "header", "checked"),
    [
        (None, S2S_HEADER, PeerChecked(PeerVerification.NO_CERTIFICATE, None, "no certificate")),
        (
            EXPIRED,
            S2S_HEADER,
            PeerChecked(PeerVerification.UNTRUSTED, None, "certificate has expired"),
        ),
        (
            OTHER_DOMAIN,
            S2S_HEADER,
            PeerChecked(PeerVerification.NAME_MISMATCH, None, "not valid for 'remote.example'"),
        ),
        (
            TRUSTED,
            S2S_HEADER.replace(b" from='remote.example'", b""),
            PeerChecked(PeerVerification.NAME_MISMATCH, None, "no 'from'"),
        ),
    ],
    ids=["no-certificate", "untrusted", "name-mismatch", "no-from"],
)
def test_dialback_lets_a_peer_that_fails_through_to_the_backend(
    certificate: PeerCertificate | None, header: bytes, checked: PeerChecked
) -> None:
    commands = _s2s_after_tls(PeerCertificateFailure.DIALBACK, certificate, header)
    assert commands == [checked, OpenBackend()]


@pytest.mark.parametrize(
    ("certificate", "header", "result", "condition", "text"),
    [
        (
            None,
            S2S_HEADER,
            PeerVerification.NO_CERTIFICATE,
            "not-authorized",
            "peer certificate: no_certificate (no certificate)",
        ),
        (
            EXPIRED,
            S2S_HEADER,
            PeerVerification.UNTRUSTED,
            "not-authorized",
            "peer certificate: untrusted (certificate has expired)",
        ),
        (
            OTHER_DOMAIN,
            S2S_HEADER,
            PeerVerification.NAME_MISMATCH,
            "invalid-from",
            "peer certificate: name_mismatch (not valid for 'remote.example')",
        ),
        (
            TRUSTED,
            S2S_HEADER.replace(b" from='remote.example'", b""),
            PeerVerification.NAME_MISMATCH,
            "improper-addressing",
            "peer certificate: name_mismatch (no 'from')",
        ),
        (
            TRUSTED,
            S2S_HEADER.replace(b"from='remote.example'", b"from='Remote.Example.'"),
            PeerVerification.VERIFIED,
            None,
            None,
        ),
    ],
    ids=["no-certificate", "untrusted", "name-mismatch", "no-from", "case-and-dot"],
)
def test_refuse_ends_a_peer_that_fails_before_the_backend(
    certificate: PeerCertificate | None,
    header: bytes,
    result: PeerVerification,
    condition: str | None,
    text: str | None,
) -> None:
    commands = _s2s_after_tls(PeerCertificateFailure.REFUSE, certificate, header)
    assert isinstance(commands[0], PeerChecked) and commands[0].result is result
    if condition is None:
        assert commands[1:] == [OpenBackend()]
        return
    assert not any(isinstance(c, SendToBackend | OpenBackend) for c in commands)
    sent = client_bytes(commands)
    # The proxy's own header first: the restarted stream has none yet.
    assert sent.startswith(b"<?xml version='1.0'?><stream:stream xmlns=\"jabber:server\"")
    assert sent.endswith(error(condition, text=text))
    assert said(sent) == (condition, text)
    assert isinstance(commands[-1], CloseConnection)
    assert commands[-1].reason.startswith(f"peer certificate: {result.value}")


@pytest.mark.parametrize("on_failure", list(PeerCertificateFailure))
@pytest.mark.parametrize("sender", [b"user@remote.example", b"remote.example/resource", b""])
def test_a_from_that_is_no_domain_is_improper_addressing(
    on_failure: PeerCertificateFailure, sender: bytes
) -> None:
    header = S2S_HEADER.replace(b"from='remote.example'", b"from='%s'" % sender)
    commands = _s2s_after_tls(on_failure, TRUSTED, header)
    assert commands[0] == PeerChecked(PeerVerification.NAME_MISMATCH, None, "'from' no domain")
    assert not any(isinstance(c, SendToBackend | OpenBackend) for c in commands)
    assert client_bytes(commands).endswith(
        error("improper-addressing", text="'from' is not a domain")
    )


def test_only_the_stream_under_tls_is_judged() -> None:
    """The header before STARTTLS claims nothing yet: its 'from' is the
    proxy's 'to', whatever it is, and no certificate exists."""
    machine = XMPPServerMachine(
        settings(peer_certificate_failure=PeerCertificateFailure.REFUSE), PEER
    )
    machine.receive_data(Side.CLIENT, S2S_HEADER.replace(b"remote.example", b"a@b") + STARTTLS)
    commands = drain(machine)
    assert not any(isinstance(c, PeerChecked | CloseConnection) for c in commands)


def test_client_streams_never_ask_for_peer_certificates() -> None:
    machine = XMPPClientMachine(
        settings(peer_certificate_failure=PeerCertificateFailure.REFUSE), PEER
    )
    run(machine, *XMPP.opening(), *XMPP.started_tls(), TLS(), *XMPP.to_backend())


def test_servers_without_a_policy_are_not_judged() -> None:
    machine = XMPPServerMachine(settings(), PEER)
    machine.receive_data(Side.CLIENT, S2S_HEADER + STARTTLS)
    drain(machine)
    TLS().apply(machine)
    machine.receive_data(Side.CLIENT, S2S_HEADER)
    assert drain(machine) == [OpenBackend()]


# The stream restarted after SASL (RFC 6120 section 6.4.6).

S2S_BACKEND_HEADER = S2S_HEADER.replace(b"from='remote.example' to='example.com'", b"id='s2s'")
S2S_EXTERNAL_FEATURES = (
    b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
    b"<mechanism>EXTERNAL</mechanism></mechanisms></stream:features>"
)
#: SASL EXTERNAL for ``remote.example``.
EXTERNAL = (
    b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>"
    b"cmVtb3RlLmV4YW1wbGU=</auth>"
)


def s2s_proxy_header(to: str | None) -> bytes:
    """The proxy's own header on a server stream (to ``to``, if any)."""
    recipient = b' to="%s"' % to.encode() if to is not None else b""
    return (
        b"<?xml version='1.0'?><stream:stream xmlns=\"jabber:server\" "
        b'xmlns:stream="http://etherx.jabber.org/streams" xmlns:db="jabber:server:dialback" '
        b'id="ID" from="example.com"%s version="1.0">' % recipient
    )


def _s2s_restarted(
    on_failure: PeerCertificateFailure | None,
    certificate: PeerCertificate | None,
    restarted: bytes,
) -> list[Command]:
    """A server stream from ``remote.example`` through TLS, SASL EXTERNAL
    and its success: what its ``restarted`` header gets."""
    machine = XMPPServerMachine(settings(peer_certificate_failure=on_failure), PEER)
    for event in (
        Client(S2S_HEADER + STARTTLS),
        TLS(certificate),
        Client(S2S_HEADER),
        Connected(),
        Backend(S2S_BACKEND_HEADER + S2S_EXTERNAL_FEATURES),
        Client(EXTERNAL),
        Backend(SUCCESS),
    ):
        event.apply(machine)
        drain(machine)
    assert machine.state is State.RELAY
    machine.receive_data(Side.CLIENT, restarted)
    return drain(machine)


@pytest.mark.parametrize("on_failure", list(PeerCertificateFailure))
def test_a_verified_peer_restarts_from_its_domain(on_failure: PeerCertificateFailure) -> None:
    machine = XMPPServerMachine(settings(peer_certificate_failure=on_failure), PEER)
    restarted = S2S_HEADER.replace(b"from='remote.example'", b"from='Remote.Example.'")
    run(
        machine,
        *S2S_TO_TLS,
        TLS(TRUSTED),
        Client(S2S_HEADER),
        PeerChecked(PeerVerification.VERIFIED, "remote.example"),
        OpenBackend(),
        Connected(),
        SendToBackend(S2S_HEADER),
        Backend(S2S_BACKEND_HEADER + S2S_EXTERNAL_FEATURES),
        SendToClient(S2S_BACKEND_HEADER),
        SendToClient(S2S_EXTERNAL_FEATURES),
        *exchange(EXTERNAL, SUCCESS),
        # Checked, relayed, and no second PeerChecked.
        Client(restarted),
        SendToBackend(restarted),
        Backend(S2S_BACKEND_HEADER + b"<stream:features/>"),
        SendToClient(S2S_BACKEND_HEADER),
        SendToClient(b"<stream:features/>"),
    )


@pytest.mark.parametrize(
    ("restarted", "condition", "text", "to"),
    [
        (
            S2S_HEADER.replace(b"remote.example", b"evil.example"),
            "invalid-from",
            "restarted stream from 'evil.example', verified 'remote.example'",
            "evil.example",
        ),
        (
            S2S_HEADER.replace(b" from='remote.example'", b""),
            "improper-addressing",
            "restarted stream without 'from', verified 'remote.example'",
            None,
        ),
        (
            S2S_HEADER.replace(b"from='remote.example'", b"from='user@remote.example'"),
            "improper-addressing",
            "'from' is not a domain",
            "user@remote.example",
        ),
        (
            S2S_HEADER.replace(b"xmlns='jabber:server'", b"xmlns='jabber:client'"),
            "invalid-namespace",
            "wrong content namespace",
            "remote.example",
        ),
        (
            S2S_HEADER.replace(b" version='1.0'", b""),
            "unsupported-version",
            "stream version None",
            "remote.example",
        ),
    ],
    ids=["other-domain", "no-from", "no-domain", "client-namespace", "no-version"],
)
@pytest.mark.parametrize("on_failure", list(PeerCertificateFailure))
def test_a_verified_peer_s_restart_is_checked_before_the_backend(
    on_failure: PeerCertificateFailure,
    restarted: bytes,
    condition: str,
    text: str,
    to: str | None,
) -> None:
    commands = _s2s_restarted(on_failure, TRUSTED, restarted)
    assert commands == [
        SendToClient(s2s_proxy_header(to) + error(condition, text=text)),
        CloseConnection(f"{text} ({condition})"),
    ]


@pytest.mark.parametrize(
    ("on_failure", "certificate"),
    [
        (PeerCertificateFailure.DIALBACK, OTHER_DOMAIN),
        (PeerCertificateFailure.DIALBACK, None),
        (None, TRUSTED),
    ],
    ids=["dialback-name-mismatch", "dialback-no-certificate", "no-policy"],
)
def test_an_unverified_peer_s_restart_is_relayed_from_any_domain(
    on_failure: PeerCertificateFailure | None, certificate: PeerCertificate | None
) -> None:
    restarted = S2S_HEADER.replace(b"remote.example", b"evil.example")
    assert _s2s_restarted(on_failure, certificate, restarted) == [SendToBackend(restarted)]


def test_a_client_s_restart_is_checked_too() -> None:
    """A client stream cannot restart as a server's after SASL."""
    machine = relaying()
    run(machine, *exchange(AUTH, SUCCESS))
    data, close = refused(machine, client_header(namespace="jabber:server"))
    assert data == proxy_header() + error("invalid-namespace", text="wrong content namespace")
    assert close.reason == "wrong content namespace (invalid-namespace)"


@pytest.mark.parametrize(
    ("certificate", "domain", "result"),
    [
        (PeerCertificate(True, dns_names=("a.example",)), "a.example", "verified"),
        (PeerCertificate(True, dns_names=("*.example",)), "a.example", "verified"),
        (PeerCertificate(True, dns_names=("*.example",)), "b.a.example", "name_mismatch"),
        (PeerCertificate(True, dns_names=("*.example",)), "example", "name_mismatch"),
        (PeerCertificate(True, dns_names=("*.a.example",)), "a.example", "name_mismatch"),
        (PeerCertificate(True, dns_names=("a*.example",)), "ab.example", "name_mismatch"),
        (
            PeerCertificate(True, dns_names=("xn--mnchen-3ya.example",)),
            "m\u00fcnchen.example",
            "verified",
        ),
        (
            PeerCertificate(True, xmpp_addrs=("m\u00fcnchen.example",)),
            "m\u00fcnchen.example",
            "verified",
        ),
        (PeerCertificate(True, xmpp_addrs=("A.example",)), "a.example", "verified"),
        # xmppAddr: the domain exactly, no wildcard.
        (PeerCertificate(True, xmpp_addrs=("*.example",)), "a.example", "name_mismatch"),
        (PeerCertificate(True, xmpp_addrs=("a.example",)), "b.example", "name_mismatch"),
        (PeerCertificate(True, dns_names=("a.example",)), None, "name_mismatch"),
        (PeerCertificate(False, "expired", ("a.example",)), "a.example", "untrusted"),
        (None, "a.example", "no_certificate"),
        # A domain IDNA cannot encode matches no dNSName.
        (PeerCertificate(True, dns_names=("a.example",)), "a..example", "name_mismatch"),
    ],
)
def test_peer_verification(
    certificate: PeerCertificate | None, domain: str | None, result: str
) -> None:
    assert peer_verification(certificate, domain).value == result


def test_s2s_default_carries_a_full_size_client_stanza_with_the_senders_stamps() -> None:
    """A server relays what its own c2s limit let through, with ``from`` added:
    the s2s default must carry it, or one user's stanza ends the whole stream
    between two servers and everything queued on it (found with Prosody and
    ejabberd federating through the proxy, tests/e2e/test_federation.py)."""
    c2s_limit = FACTS["xmpp-client"].max_stanza_size
    opening, closing = b"<message to='bob@example.com' type='chat'><body>", b"</body></message>"
    body = b"x" * (c2s_limit - len(opening) - len(closing))
    assert len(opening + body + closing) == c2s_limit
    stamped = (
        b"<message from='alice@remote.example/phone' to='bob@example.com' type='chat'><body>"
        + body
        + closing
    )
    header = (
        b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
        b"xmlns:db='jabber:server:dialback' from='remote.example' to='example.com' version='1.0'>"
    )
    backend_header = header.replace(b"from='remote.example' to='example.com'", b"id='s2s'")
    features = b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
    server_default = FACTS["xmpp-server"].max_stanza_size
    machine = XMPPServerMachine(settings(max_stanza_size=server_default), PEER)
    machine.receive_data(Side.CLIENT, header + STARTTLS)
    machine.tls_established(TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", "example.com"))
    machine.receive_data(Side.CLIENT, header)
    machine.backend_connected()
    machine.receive_data(Side.BACKEND, backend_header + features)
    assert machine.state is State.RELAY
    drain(machine)
    machine.receive_data(Side.CLIENT, stamped)
    assert drain(machine) == [SendToBackend(stamped)]
    # The client default stays Prosody's c2s limit.
    client = XMPPClientMachine(settings(max_stanza_size=c2s_limit), PEER)
    assert refused(client, HEADER + stamped)[1].reason.startswith("client: element larger than")


def test_stream_ids_are_fresh() -> None:
    ids = {new_stream_id() for _ in range(3)}
    assert len(ids) == 3
    assert all(len(stream_id) == 16 and int(stream_id, 16) >= 0 for stream_id in ids)


# --------------------------------------------------------------------------
# Stream headers before TLS.


@pytest.mark.parametrize(
    ("header", "domains", "condition", "domain", "text"),
    [
        (client_header("Example.COM."), ("example.com",), None, "example.com", None),
        (
            client_header("other.example"),
            ("example.com",),
            "host-unknown",
            HOST,
            "unknown domain 'other.example'",
        ),
        (client_header("bad domain"), (), "host-unknown", HOST, "malformed domain in 'to'"),
        (
            client_header(namespace="jabber:server"),
            (),
            "invalid-namespace",
            "example.com",
            "wrong content namespace",
        ),
        (
            HEADER.replace(b"etherx.jabber.org/streams", b"example.org/x"),
            (),
            "invalid-namespace",
            "example.com",
            "stream root is '{http://example.org/x}stream'",
        ),
        (
            HEADER.replace(b" version='1.0'>", b">"),
            (),
            "unsupported-version",
            "example.com",
            "stream version None",
        ),
        (
            HEADER.replace(b"version='1.0'>", b"version='2.0'>"),
            (),
            "unsupported-version",
            "example.com",
            "stream version '2.0'",
        ),
        (HEADER.replace(b" to='example.com'", b""), ("example.com",), None, HOST, None),
    ],
)
def test_stream_header_checks(
    header: bytes, domains: tuple[str, ...], condition: str | None, domain: str, text: str | None
) -> None:
    machine = XMPPClientMachine(settings(domains=domains), PEER)
    machine.receive_data(Side.CLIENT, header)
    commands = drain(machine)
    if condition is None:
        assert commands == [SendToClient(proxy_header(domain) + REQUIRED_FEATURES)]
        assert machine.state is State.PRE_TLS
    else:
        assert commands[0] == SendToClient(proxy_header(domain) + error(condition, text=text))
        assert isinstance(commands[1], CloseConnection)
        assert condition in commands[1].reason
        assert machine.state is State.CLOSED


def test_server_machine_refuses_client_streams() -> None:
    machine = XMPPServerMachine(settings(), PEER)
    data, close = refused(machine, HEADER)
    assert data == proxy_header(namespace="jabber:server") + error(
        "invalid-namespace", text="wrong content namespace"
    )
    assert close.reason == "wrong content namespace (invalid-namespace)"


@pytest.mark.parametrize(
    "restarted",
    [
        S2S_HEADER.replace(b"xmlns='jabber:server'", b"xmlns='jabber:client'"),
        S2S_HEADER.replace(b"xmlns:stream='http://etherx.jabber.org/streams'", b"xmlns:stream='x'"),
    ],
    ids=["content-namespace", "stream-namespace"],
)
def test_a_server_stream_that_switches_namespaces_after_tls_is_refused(restarted: bytes) -> None:
    """The restarted stream (RFC 6120 section 5.3.3) is checked as the first
    was: a peer that began as a server cannot continue as a client (or with
    another stream namespace) and so reach the backend's c2s handling."""
    machine = XMPPServerMachine(settings(), PEER)
    machine.receive_data(Side.CLIENT, S2S_HEADER + STARTTLS)
    drain(machine)
    TLS().apply(machine)
    machine.receive_data(Side.CLIENT, restarted)
    commands = drain(machine)
    assert said(client_bytes(commands))[0] == "invalid-namespace"
    assert not any(isinstance(c, OpenBackend | SendToBackend) for c in commands)
    assert machine.state is State.CLOSED


def test_starttls_without_to_gives_no_hint() -> None:
    machine = XMPPClientMachine(settings(), PEER)
    run(
        machine,
        Client(HEADER.replace(b" to='example.com'", b" from='alice@example.com'")),
        SendToClient(
            proxy_header(HOST).replace(b' version="1.0"', b' to="alice@example.com" version="1.0"')
            + REQUIRED_FEATURES
        ),
        Client(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'></starttls>"),
        PROCEED,
        StartTLS(b""),
    )


def test_sasl_before_tls_is_refused_then_tls_is_still_possible() -> None:
    machine = XMPPClientMachine(settings(), PEER)
    run(
        machine,
        Client(HEADER),
        SendToClient(proxy_header() + REQUIRED_FEATURES),
        Client(AUTH + b"\n"),
        SendToClient(
            b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><encryption-required/></failure>"
        ),
        Client(STARTTLS),
        PROCEED,
        StartTLS(b"", server_name_hint="example.com"),
    )


def test_stanza_before_tls_is_a_policy_violation() -> None:
    machine = XMPPClientMachine(settings(), PEER)
    run(machine, Client(HEADER), SendToClient(proxy_header() + REQUIRED_FEATURES))
    data, close = refused(machine, b"<message to='bob@example.com'><body>hi</body></message>")
    assert data == error("policy-violation", text="message before STARTTLS")
    assert close.reason == "message before STARTTLS (policy-violation)"


def test_client_closes_before_tls() -> None:
    machine = XMPPClientMachine(settings(), PEER)
    run(
        machine,
        Client(HEADER),
        SendToClient(proxy_header() + REQUIRED_FEATURES),
        Client(b" </stream:stream>"),
        SendToClient(b"</stream:stream>"),
        CloseConnection("client closed the stream", clean=True),
    )


def test_header_after_tls_is_checked_too() -> None:
    machine = XMPPClientMachine(settings(tls_mode=TLSMode.IMPLICIT, domains=("example.com",)), PEER)
    run(machine, StartTLS(b""), TLS())
    data, close = refused(machine, client_header("elsewhere.example"))
    assert data == proxy_header(HOST) + error(
        "host-unknown", text="unknown domain 'elsewhere.example'"
    )
    assert "elsewhere.example" in close.reason


# --------------------------------------------------------------------------
# The <text/> of the proxy's stream errors.


def test_error_text_is_escaped_fit_and_bounded() -> None:
    text = "a<b>&c]]>'\"\x00\x1b\x7f\x85\ud800\ufffe\r\n\tz" + "\u00e9" * 300
    sent = stream_error(StreamErrorCondition.POLICY_VIOLATION, text=text)
    sent.decode("utf-8")
    assert b"<b>" not in sent and b"]]>" not in sent
    assert said(sent) == ("policy-violation", error_text(text))
    fit = error_text(text)
    assert fit.startswith("a<b>&c]]>'\"" + "\ufffd" * 6 + " z\u00e9")
    assert len(fit) == STREAM_ERROR_TEXT_LIMIT and fit.endswith("\u00e9\u2026")
    assert error_text("x" * STREAM_ERROR_TEXT_LIMIT) == "x" * STREAM_ERROR_TEXT_LIMIT


def test_an_empty_text_is_left_out() -> None:
    bare = stream_error(StreamErrorCondition.BAD_FORMAT)
    assert stream_error(StreamErrorCondition.BAD_FORMAT, text=" \r\n") == bare
    assert said(bare) == ("bad-format", None)


def test_the_peer_s_words_in_the_text_stay_text() -> None:
    """The version the client sent comes back in the text: markup in it is escaped."""
    header = HEADER.replace(
        b" version='1.0'>", b" version='1.0&lt;/text&gt;&lt;evil/&gt;&amp;&quot;&apos;'>"
    )
    data, close = refused(XMPPClientMachine(settings(), PEER), header)
    assert said(data) == ("unsupported-version", "stream version '1.0</text><evil/>&\"\\''")
    assert b"<evil/>" not in data
    assert close.reason == "stream version '1.0</text><evil/>&\"\\'' (unsupported-version)"


def test_a_long_domain_in_the_text_is_cut() -> None:
    domain = "\u00e9" * 300 + ".example"
    machine = XMPPClientMachine(settings(domains=("example.com",)), PEER)
    data, close = refused(machine, client_header(domain))
    expected = f"unknown domain {domain!r}"[: STREAM_ERROR_TEXT_LIMIT - 1] + "\u2026"
    assert said(data) == ("host-unknown", expected)
    # The log keeps all of it.
    assert domain in close.reason


def test_the_peer_never_reads_the_driver_s_or_the_proxy_s_own_reasons() -> None:
    unreachable = "backend 10.1.2.3:5222 unreachable: [Errno 111] Connection refused"
    machine = XMPPClientMachine(settings(), PEER)
    run(machine, *TO_BACKEND)
    machine.backend_failed(unreachable)
    data = client_bytes(drain(machine))
    assert said(data) == ("remote-connection-failed", "backend unavailable")
    assert b"10.1.2.3" not in data and b"Errno" not in data

    machine = relaying()
    machine.timed_out("idle for 300 s")
    assert said(client_bytes(drain(machine))) == ("connection-timeout", "timeout exceeded")

    machine = relaying()
    machine.receive_data(Side.BACKEND, b"<a>\xff</a>")
    commands = drain(machine)
    assert said(client_bytes(commands)) == ("internal-server-error", None)
    assert isinstance(commands[-1], CloseConnection)
    assert "backend: not well-formed" in commands[-1].reason

    machine = XMPPClientMachine(settings(), PEER)
    with pytest.raises(LocalProtocolError):
        machine.tls_established(TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256"))
    commands = drain(machine)
    assert said(client_bytes(commands)) == ("internal-server-error", None)
    assert isinstance(commands[-1], CloseConnection)
    assert commands[-1].reason.startswith("internal error: ")


# --------------------------------------------------------------------------
# The relay.


def test_features_stripping() -> None:
    machine = relaying()
    features = (
        b"<stream:features>"
        b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
        b"<compression xmlns='http://jabber.org/features/compress'><method>zlib</method></compression>"
        b"<sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'><channel-binding type='tls-exporter'/>"
        b"</sasl-channel-binding>"
        b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
        b"<mechanism>SCRAM-SHA-256-PLUS</mechanism></mechanisms>"
        b"<authentication xmlns='urn:xmpp:sasl:2'><mechanism>SCRAM-SHA-1-PLUS</mechanism>"
        b"<mechanism>SCRAM-SHA-1</mechanism></authentication>"
        b"</stream:features>"
    )
    run(
        machine,
        *SASL_RESTART,
        Backend(BACKEND_HEADER + features),
        SendToClient(BACKEND_HEADER),
        SendToClient(
            b'<stream:features xmlns:stream="http://etherx.jabber.org/streams">'
            b'<authentication xmlns="urn:xmpp:sasl:2"><mechanism>SCRAM-SHA-1</mechanism>'
            b"</authentication></stream:features>"
        ),
        Client(
            b"<compress xmlns='http://jabber.org/protocol/compress'><method>zlib</method></compress>"
        ),
        SendToClient(
            b"<failure xmlns='http://jabber.org/protocol/compress'><setup-failed/></failure>"
        ),
    )


def test_backend_prefix_is_used_to_close_the_stream() -> None:
    machine = XMPPClientMachine(settings(tls_mode=TLSMode.IMPLICIT), PEER)
    header = (
        b"<s:stream xmlns='jabber:client' xmlns:s='http://etherx.jabber.org/streams' "
        b"id='x' version='1.0'>"
    )
    run(
        machine,
        *DIRECT_TO_BACKEND,
        Backend(header),
        SendToClient(header),
        Timeout(),
        SendToClient(error("connection-timeout", b"</s:stream>", text="timeout exceeded")),
        CloseConnection("idle timeout (connection-timeout)"),
    )


def test_endings() -> None:
    assert XMPPClientMachine.busy_reply("busy.example").startswith(
        b"<?xml version='1.0'?><stream:stream xmlns=\"jabber:client\""
    )
    assert XMPPServerMachine.busy_reply("busy.example").endswith(
        error("resource-constraint", text="too many connections")
    )
    assert b'from="busy.example"' in XMPPServerMachine.busy_reply("busy.example")
    run(
        XMPPClientMachine(settings(), PEER),
        Timeout(),
        SendToClient(proxy_header(HOST) + error("connection-timeout", text="timeout exceeded")),
        CloseConnection("idle timeout (connection-timeout)"),
    )
    run(relaying(), EOF(Side.CLIENT), CloseConnection("client closed"))
    run(
        relaying(),
        ShuttingDown(),
        SendToClient(error("system-shutdown", text="server shutting down")),
        CloseConnection("proxy shutting down (system-shutdown)"),
    )
    run(
        relaying(),
        EOF(Side.BACKEND),
        SendToClient(error("internal-server-error")),
        CloseConnection("backend closed (internal-server-error)"),
    )
    machine = relaying()
    run(
        machine,
        Client(b"</stream:stream>"),
        SendToBackend(b"</stream:stream>"),
        EOF(Side.BACKEND),
        CloseConnection("client closed the stream", clean=True),
    )


def test_backend_unreachable() -> None:
    machine = XMPPClientMachine(settings(), PEER)
    run(
        machine,
        *TO_BACKEND,
        Failed("backend 127.0.0.1:5222 unreachable: refused"),
        # The driver's reason names the backend's address: the peer gets none of it.
        SendToClient(
            proxy_header() + error("remote-connection-failed", text="backend unavailable")
        ),
        CloseConnection("backend 127.0.0.1:5222 unreachable: refused (remote-connection-failed)"),
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"HTTP/1.1 400\r\n", "backend: the stream does not start with a tag"),
        (b"<html>", "backend stream root is 'html'"),
        (BACKEND_HEADER + b"<a>\xff</a>", "backend: not well-formed: Invalid bytes"),
    ],
)
def test_misbehaving_backend(data: bytes, reason: str) -> None:
    machine = XMPPClientMachine(settings(tls_mode=TLSMode.IMPLICIT), PEER)
    run(machine, *DIRECT_TO_BACKEND)
    machine.receive_data(Side.BACKEND, data)
    commands = drain(machine)
    assert client_bytes(commands).endswith(error("internal-server-error"))
    assert isinstance(commands[-1], CloseConnection)
    assert commands[-1].reason.startswith(reason)
    assert machine.state is State.ERROR


def test_held_client_bytes_are_reported_while_the_backend_connects() -> None:
    machine = XMPPClientMachine(settings(tls_mode=TLSMode.IMPLICIT), PEER)
    run(machine, StartTLS(b""), TLS(), Client(HEADER), OpenBackend(), Client(b"<iq/><presence"))
    assert machine.unprocessed_client_bytes == len(b"<iq/><presence")
    run(
        machine,
        Connected(),
        SendToBackend(HEADER),
        Backend(BACKEND_HEADER),
        SendToClient(BACKEND_HEADER),
        SendToBackend(b"<iq/>"),
    )
    assert machine.unprocessed_client_bytes == 0


def test_driver_misuse_is_a_local_error() -> None:
    machine = XMPPClientMachine(settings(), PEER)
    message = "BACKEND_CONNECTED is not allowed in state PRE_TLS_HEADER"
    with pytest.raises(LocalProtocolError, match=f"^{message}$"):
        machine.backend_connected()
    assert drain(machine) == [
        SendToClient(proxy_header(HOST) + error("internal-server-error")),
        CloseConnection(f"internal error: {message} (internal-server-error)"),
    ]
    assert machine.state is State.ERROR
    run(machine, TLS(), Connected(), Client(b"<iq/>"), EOF(Side.CLIENT), Failed("x"))


# --------------------------------------------------------------------------
# Named attacks: each is answered with its stream error, after a bounded
# number of bytes, in bounded time, and nothing reaches a backend.

BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">' % (n, (b"&lol%d;" % (n - 1) if n > 1 else b"&lol;") * 10)
        for n in range(1, 10)
    )
    + b"]><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
    b"to='example.com' version='1.0'>&lol9;"
)
EXTERNAL_ENTITY = (
    b'<?xml version="1.0"?><!DOCTYPE stream [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>' + HEADER
)


@pytest.mark.parametrize(
    ("opening", "attack", "condition", "reason"),
    [
        (b"", BILLION_LAUGHS, "restricted-xml", "a DTD or entity declaration"),
        (b"", EXTERNAL_ENTITY, "restricted-xml", "a DTD or entity declaration"),
        (HEADER, b"<!DOCTYPE html>", "restricted-xml", "a DTD or entity declaration"),
        (HEADER, b"<iq><!DOCTYPE x [<!ENTITY e 'e'>]>", "restricted-xml", "a DTD"),
        (HEADER, b"<message><body>&xxe;</body></message>", "restricted-xml", "an entity reference"),
        (HEADER, b"<message><body><!-- hi --></body></message>", "restricted-xml", "a comment"),
        (b"<?xml-stylesheet href='x'?>", HEADER, "restricted-xml", "a processing instruction"),
        (HEADER, b"<iq><?php x ?></iq>", "restricted-xml", "a processing instruction"),
        (
            b"",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            "not-well-formed",
            "TLS ClientHello",
        ),
        (HEADER, b"<message><body>\xff\xfe</body></message>", "not-well-formed", "not well-formed"),
        (
            HEADER,
            b"<message><body>\xed\xa0\x80</body></message>",
            "not-well-formed",
            "not well-formed",
        ),
        (HEADER, b"<message><body>\xc0\xbc</body></message>", "not-well-formed", "not well-formed"),
        (
            b"",
            HEADER.replace(b"example.com", b"ex\xffample.com"),
            "not-well-formed",
            "not well-formed",
        ),
        (HEADER, b"<message><x:body/></message>", "not-well-formed", "undeclared namespace prefix"),
        (HEADER, b"<message></presence>", "not-well-formed", "not well-formed"),
        (HEADER, b"hello", "bad-format", "text at the stream level"),
        (b"", b"GET / HTTP/1.1\r\n", "not-well-formed", "does not start with a tag"),
        (b"", b"<?xml version='1.0' encoding='ISO-8859-1'?>", "unsupported-encoding", "ISO-8859-1"),
        (HEADER, b"<iq a='" + b"x" * 2000, "policy-violation", "attribute value longer than 1024"),
        (HEADER, b"<iq>" + b"x" * 9000, "policy-violation", "element larger than 8192"),
        (HEADER, b"<a>" * 100, "policy-violation", "elements nested deeper than 16"),
    ],
)
def test_attacks_before_tls(opening: bytes, attack: bytes, condition: str, reason: str) -> None:
    machine = XMPPClientMachine(settings(), PEER)
    data, close = refused(machine, opening + attack)
    assert data.startswith(b"<?xml version='1.0'?><stream:stream ")
    sent_condition, text = said(data)
    assert sent_condition == condition
    # The peer is told what the log says of its bytes (a ClientHello, in SMTP's words).
    assert text is not None
    assert reason in text or close.reason == "TLS ClientHello before STARTTLS (not-well-formed)"
    assert reason in close.reason
    assert close.reason.endswith(f"({condition})")


def test_attacks_after_tls_never_reach_the_backend() -> None:
    for attack, condition in (
        (b"<!DOCTYPE x [<!ENTITY e SYSTEM 'http://evil.example/'>]>", "restricted-xml"),
        (b"<iq>" + b"<a>" * 10_000, "policy-violation"),
        (b"<message><body>\x80</body></message>", "not-well-formed"),
    ):
        machine = relaying()
        machine.receive_data(Side.CLIENT, attack)
        commands = drain(machine)
        assert backend_bytes(commands) == b""
        assert len(commands) == 2 and isinstance(commands[0], SendToClient)
        assert said(commands[0].data)[0] == condition
        assert isinstance(commands[-1], CloseConnection)


def test_s2s_sasl_restart_cannot_switch_domain() -> None:
    """A peer whose certificate verified for remote.example authenticates by
    SASL EXTERNAL, then restarts its stream from evil.example: the backend,
    whose PROXY header names remote.example, must never read a stream from
    evil.example on that connection."""
    machine = XMPPServerMachine(
        settings(peer_certificate_failure=PeerCertificateFailure.REFUSE), PEER
    )
    run(
        machine,
        *S2S_TO_TLS,
        TLS(TRUSTED),
        Client(S2S_HEADER),
        PeerChecked(PeerVerification.VERIFIED, "remote.example"),
        OpenBackend(),
        Connected(),
        SendToBackend(S2S_HEADER),
        Backend(S2S_BACKEND_HEADER + S2S_EXTERNAL_FEATURES),
        SendToClient(S2S_BACKEND_HEADER),
        SendToClient(S2S_EXTERNAL_FEATURES),
        *exchange(EXTERNAL, SUCCESS),
    )
    evil = S2S_HEADER.replace(b"remote.example", b"evil.example")
    data, close = refused(machine, evil + b"<db:result from='evil.example' to='example.com'/>")
    assert data == s2s_proxy_header("evil.example") + error(
        "invalid-from", text="restarted stream from 'evil.example', verified 'remote.example'"
    )
    assert said(data) == (
        "invalid-from",
        "restarted stream from 'evil.example', verified 'remote.example'",
    )
    assert close.reason.endswith("(invalid-from)")
    assert machine.state is State.CLOSED


def test_billion_laughs_in_bounded_time() -> None:
    started = time.monotonic()
    machine = XMPPClientMachine(settings(), PEER)
    data, _ = refused(machine, BILLION_LAUGHS)
    assert said(data) == ("restricted-xml", "a DTD or entity declaration")
    assert time.monotonic() - started < 0.5


def test_ten_thousand_deep_nesting_is_cut_at_the_limit() -> None:
    reader = XMLStreamReader(Limits(256 * 1024, 64, 64 * 1024))
    reader.feed(HEADER)
    assert isinstance(reader.next_token(), StreamHeader)
    reader.feed(b"<iq>" + b"<a>" * 10_000)
    started = time.monotonic()
    with pytest.raises(XMLStreamError, match="nested deeper than 64") as caught:
        reader.next_token()
    assert caught.value.condition is StreamErrorCondition.POLICY_VIOLATION
    assert time.monotonic() - started < 0.5


def test_ten_megabyte_attribute_is_refused_after_the_limit() -> None:
    limit = 64 * 1024
    machine = XMPPClientMachine(
        settings(max_attribute_size=limit, max_stanza_size=256 * 1024), PEER
    )
    run(machine, Client(HEADER), SendToClient(proxy_header() + REQUIRED_FEATURES))
    chunk = b"A" * 16 * 1024
    fed = 0
    machine.receive_data(Side.CLIENT, b"<message to='")
    while not (commands := drain(machine)):
        machine.receive_data(Side.CLIENT, chunk)
        fed += len(chunk)
        assert fed < 10 * 1024 * 1024
    assert fed <= limit + len(chunk)
    assert commands[0] == SendToClient(
        error("policy-violation", text=f"attribute value longer than {limit} bytes")
    )


def test_limits_are_inclusive() -> None:
    reader = XMLStreamReader(Limits(4096, 3, 40))
    reader.feed(HEADER + b"<a b='%s'><c><d/></c></a>" % (b"x" * 40))
    tokens = [reader.next_token(), reader.next_token()]
    assert isinstance(tokens[1], StreamElement)
    reader.feed(b"<a><c><d><e/></d></c></a>")
    with pytest.raises(XMLStreamError, match="deeper than 3"):
        reader.next_token()
    reader = XMLStreamReader(Limits(4096, 3, 40))
    reader.feed(HEADER + b"<a b='%s'/>" % (b"x" * 41))
    assert isinstance(reader.next_token(), StreamHeader)
    with pytest.raises(XMLStreamError, match="longer than 40"):
        reader.next_token()


# --------------------------------------------------------------------------
# Split invariance: the same bytes cut anywhere give the same session.

TRANSCRIPTS = Transcripts(
    XMPP,
    {
        "starttls": (
            settings(),
            (
                Client(b"\n" + HEADER + b" " + STARTTLS),
                TLS(),
                Client(HEADER),
                Connected(),
                Backend(BACKEND_HEADER + BACKEND_FEATURES),
                Client(AUTH),
                Backend(SUCCESS),
                Client(
                    client_header()
                    + b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
                ),
                Backend(
                    BACKEND_HEADER
                    + BIND_FEATURES
                    + "\n<iq type='result' id='b' a='>\u00e9'/>".encode()
                ),
                Client(MESSAGE + b" \t\r\n" + MESSAGE.replace(b"m1", b"m2") + b"</stream:stream>"),
                Backend(MESSAGE + b"</stream:stream>"),
            ),
        ),
        "plaintext": (
            settings(require_tls=False, capabilities=(MECHANISMS.decode(),)),
            (
                Client(HEADER + AUTH),
                Connected(),
                Backend(BACKEND_HEADER + BACKEND_FEATURES + SUCCESS),
                Client(HEADER + MESSAGE),
                Backend(BACKEND_HEADER + BIND_FEATURES + b"<a><![CDATA[</a>]]></a>"),
                Client(b"</stream:stream>"),
                Backend(b"</stream:stream>"),
            ),
        ),
        "attack": (
            settings(),
            (Client(HEADER + "<message><body>\u00e9\u00e9".encode() + b"<a>" * 20),),
        ),
        "bad utf-8": (
            settings(tls_mode=TLSMode.IMPLICIT),
            (
                TLS(),
                Client(HEADER + "<message><body>caf\u00e9".encode() + b"\xe9</body></message>"),
                Connected(),
                Backend(BACKEND_HEADER),
            ),
        ),
    },
)


@pytest.mark.parametrize("name", TRANSCRIPTS.sessions)
def test_transcripts_end_as_expected(name: str) -> None:
    to_client, to_backend, others = TRANSCRIPTS.outcome(name)
    assert isinstance(others[-1], CloseConnection)
    assert b"<iq/>" not in to_backend
    if name in ("starttls", "plaintext"):
        assert MESSAGE in to_backend
        assert others[-1].clean
    if name == "starttls":
        assert to_backend.endswith(
            MESSAGE + b" \t\r\n" + MESSAGE.replace(b"m1", b"m2") + b"</stream:stream>"
        )
        assert to_client.endswith(MESSAGE + b"</stream:stream>")
    if name == "attack":
        assert said(to_client) == ("policy-violation", "elements nested deeper than 16")
    if name == "bad utf-8":
        assert said(to_client)[0] == "not-well-formed"


test_split_one_byte_at_a_time, test_split_invariance = split_invariance_tests(TRANSCRIPTS)


def _tokens(stream: bytes, cuts: Sequence[int]) -> list[tuple[str, bytes]] | str:
    reader = XMLStreamReader(Limits(4096, 8, 512))
    tokens: list[Token] = []
    bounds = [0, *sorted(cuts), len(stream)]
    try:
        for start, end in itertools.pairwise(bounds):
            reader.feed(stream[start:end])
            while (token := reader.next_token()) is not None:
                tokens.append(token)
    except XMLStreamError as failure:
        return failure.condition.value
    # Whitespace may come in pieces; join neighbours to compare.
    joined: list[tuple[str, bytes]] = []
    for token in tokens:
        kind = type(token).__name__
        if joined and kind == joined[-1][0] == "Whitespace":
            joined[-1] = (kind, joined[-1][1] + token.raw)
        else:
            joined.append((kind, token.raw))
    return joined


_PIECES = [
    b"<a b='1>2'/>",
    b'<a b="\xc3\xa9\xe2\x82\xac"></a>',
    b"<m><![CDATA[<x>]]]]></m>",
    b"<caf\xc3\xa9/>",
    b"<n xmlns='urn:x'><o/>text &amp; &#x1F600;</n>",
    b" ",
    b"\r\n",
    b"<a>\xf0\x9f\x98\x80</a>",
    b"<a>\xf0\x9f\x98</a>",
    b"<a><!-- c --></a>",
    b"<a>",
    b"</a>",
    b"junk",
]


@given(st.lists(st.sampled_from(_PIECES), max_size=8), st.lists(st.integers(0, 200), max_size=8))
def test_reader_split_invariance(pieces: list[bytes], cuts: list[int]) -> None:
    stream = HEADER + b"".join(pieces)
    whole = _tokens(stream, [])
    assert _tokens(stream, [min(cut, len(stream)) for cut in cuts]) == whole
    if isinstance(whole, list):
        assert b"".join(raw for _, raw in whole) == stream[: sum(len(raw) for _, raw in whole)]


def test_reader_tokens() -> None:
    reader = XMLStreamReader(Limits(4096, 8, 512))
    reader.feed(b"\n" + HEADER + b" <a/>\n</stream:stream>")
    tokens = [reader.next_token() for _ in range(5)]
    assert [type(token) for token in tokens] == [
        StreamHeader,
        Whitespace,
        StreamElement,
        Whitespace,
        StreamEnd,
    ]
    assert isinstance(tokens[0], StreamHeader) and tokens[0].raw == HEADER
    assert reader.next_token() is None
    reader.feed(b"<a/>")
    with pytest.raises(XMLStreamError, match="after the end of the stream"):
        reader.next_token()


def test_reader_restarts_and_discards() -> None:
    reader = XMLStreamReader(Limits(4096, 8, 512))
    reader.feed(HEADER + STARTTLS + b"<iq/><pres")
    assert isinstance(reader.next_token(), StreamHeader)
    assert isinstance(reader.next_token(), StreamElement)
    assert reader.discard() == b"<iq/><pres"
    reader.feed(HEADER + b"\n" + HEADER)
    assert isinstance(reader.next_token(), StreamHeader)
    assert isinstance(reader.next_token(), Whitespace)
    reader.restart()
    assert isinstance(reader.next_token(), StreamHeader)
    assert reader.buffered == 0
    reader.feed(b"<iq/>")
    reader.restart()
    with pytest.raises(XMLStreamError, match="closes the stream at once"):
        reader.next_token()


def test_reader_replaces_its_parser() -> None:
    reader = XMLStreamReader(Limits(64 * 1024, 8, 64 * 1024))
    reader.feed(HEADER)
    assert isinstance(reader.next_token(), StreamHeader)
    stanza = b"<message><body>%s</body></message>" % (b"x" * 60_000)
    for index in range(40):
        reader.feed(
            stanza.replace(b"<body>", b"<body%d xmlns='urn:n%d'>" % (index, index)).replace(
                b"</body>", b"</body%d>" % index
            )
        )
        token = reader.next_token()
        assert isinstance(token, StreamElement)
        assert token.element[0].tag == f"{{urn:n{index}}}body{index}"


# --------------------------------------------------------------------------
# Pieces.


def test_pre_tls_features_skip_broken_capabilities() -> None:
    features = pre_tls_features(
        (
            "<bad",
            "<!DOCTYPE x>",
            "<?pi?>",
            "<register xmlns='http://jabber.org/features/iq-register'/>",
        ),
        False,
    )
    assert features == (
        b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        b'<register xmlns="http://jabber.org/features/iq-register"></register></stream:features>'
    )


def test_probe() -> None:
    server_header = XMPPServerProbe("example.com").next_send()
    assert server_header is not None and b'xmlns="jabber:server"' in server_header
    probe = XMPPClientProbe("example.com")
    sent = probe.next_send()
    assert sent is not None and b'to="example.com"' in sent and b'xmlns="jabber:client"' in sent
    assert probe.next_send() is None
    probe.receive_data(BACKEND_HEADER + BACKEND_FEATURES[:40])
    assert probe.result is None
    probe.receive_data(BACKEND_FEATURES[40:])
    assert probe.result == (
        '<starttls xmlns="urn:ietf:params:xml:ns:xmpp-tls"></starttls>',
        '<mechanisms xmlns="urn:ietf:params:xml:ns:xmpp-sasl">'
        "<mechanism>SCRAM-SHA-1-PLUS</mechanism><mechanism>PLAIN</mechanism><mechanism>SCRAM-SHA-1</mechanism></mechanisms>",
        '<register xmlns="http://jabber.org/features/iq-register"></register>',
    )
    assert probe.next_send() == b"</stream:stream>"
    assert probe.error is None


@pytest.mark.parametrize(
    ("reply", "error_text"),
    [
        (
            BACKEND_HEADER + b"<stream:error><host-unknown "
            b"xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
            "backend stream error: host-unknown",
        ),
        (BACKEND_HEADER + b"</stream:stream>", "the backend closed the stream"),
        (BACKEND_HEADER + b"<iq/>", "unexpected iq from the backend"),
        (b"HTTP/1.1 400 Bad Request\r\n", "backend: the stream does not start with a tag"),
    ],
)
def test_probe_errors(reply: bytes, error_text: str) -> None:
    check_probe_error(XMPPClientProbe("example.com"), [reply], error_text)


# --------------------------------------------------------------------------
# Found by the coverage-guided fuzzers (tests/fuzz): lxml raised on names
# and namespaces that its pull parser had accepted.


def test_fuzz_namespace_holding_a_brace_before_starttls() -> None:
    """``etree.QName`` raised ValueError on ``{urn:a}b}starttls``, a tag the
    parser makes of ``xmlns='urn:a}b'``: the refusal must still be a stream
    error."""
    machine = XMPP.new()
    run(
        machine,
        Client(HEADER),
        SendToClient(proxy_header() + REQUIRED_FEATURES),
        Client(b"<starttls xmlns='urn:a}b'/>"),
        SendToClient(error("policy-violation", text="starttls before STARTTLS")),
        CloseConnection("starttls before STARTTLS (policy-violation)"),
    )


def test_fuzz_backend_features_that_cannot_be_canonicalized() -> None:
    """Features the proxy must filter, in a namespace that is not a URI:
    libxml2's C14N refused them with C14NError, which escaped the machine."""
    machine = relaying()
    features = (
        b"<stream:features><mechanisms xmlns='urn:x|y'><mechanism>X-PLUS</mechanism>"
        b"</mechanisms><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>"
    )
    run(
        machine,
        Backend(features),
        SendToClient(error("internal-server-error")),
        CloseConnection("features cannot be canonicalized: C14N failed (internal-server-error)"),
    )
    assert machine.state is State.ERROR


@pytest.mark.parametrize(
    ("reply", "error_text"),
    [
        (b"<stream:/>", "unexpected stream: from the backend"),
        (
            b"<stream:features><m xmlns='urn:x|y'/></stream:features>",
            "backend: m cannot be canonicalized: C14N failed",
        ),
    ],
)
def test_fuzz_probe_names_and_features_lxml_refuses(reply: bytes, error_text: str) -> None:
    check_probe_error(XMPPClientProbe("example.com"), [BACKEND_HEADER + reply], error_text)
