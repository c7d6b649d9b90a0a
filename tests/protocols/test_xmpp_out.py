"""The outgoing server-to-server machine (``protocols/xmpp_out.py``): the
local server's plaintext stream, taken to the remote server under TLS.

Transcripts first (STARTTLS, direct TLS, the remote's certificate), then
what the local server's header and the remote's misbehaviour get, then
split invariance over a whole session."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols._base import (
    CloseConnection,
    LocalProtocolError,
    OpenBackend,
    Peer,
    PeerCertificate,
    PeerCertificateFailure,
    PeerChecked,
    PeerVerification,
    ProxyMachine,
    SendToBackend,
    SendToClient,
    Side,
    StartTLS,
)
from protocols.xmpp_out import State, XMPPOutgoingMachine
from tests.protocols.dialogues import stream_error
from tests.protocols.transcript import (
    EOF,
    TLS,
    Backend,
    Client,
    Connected,
    Event,
    drain,
    make_settings,
    play,
    run,
)

PEER = Peer("127.0.0.1", 40000, "127.0.0.1", 5270)

LOCAL_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"from='local.example' to='remote.example' version='1.0'>"
)
#: The proxy's own header to the remote, before TLS.
OPENING = (
    b"<?xml version='1.0'?><stream:stream xmlns=\"jabber:server\" "
    b'xmlns:stream="http://etherx.jabber.org/streams" xmlns:db="jabber:server:dialback" '
    b'from="local.example" to="remote.example" version="1.0">'
)
REMOTE_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"id='r3m0t3' from='remote.example' to='local.example' version='1.0'>"
)
STARTTLS_FEATURES = (
    b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"
    b"</starttls><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
)
STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
TLS_FEATURES = b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
DB_RESULT = b"<db:result from='local.example' to='remote.example'>k3y</db:result>"
HANDOFF = StartTLS(
    b"", server_name_hint="local.example", side=Side.BACKEND, peer_name="remote.example"
)
TRUSTED = PeerCertificate(trusted=True, dns_names=("remote.example",))
WILDCARD = PeerCertificate(trusted=True, dns_names=("*.example",))
UNTRUSTED = PeerCertificate(trusted=False, problem="self-signed certificate", dns_names=())
OTHER = PeerCertificate(trusted=True, dns_names=("other.example",))
VERIFIED = PeerChecked(PeerVerification.VERIFIED, "remote.example")


@dataclasses.dataclass(frozen=True)
class Routed(Event):
    """The driver connected one of the domain's servers."""

    direct_tls: bool = False

    def apply(self, machine: ProxyMachine[Any, Any]) -> None:
        machine.route_connected(self.direct_tls)


def new(
    on_failure: PeerCertificateFailure = PeerCertificateFailure.REFUSE, **overrides: object
) -> XMPPOutgoingMachine:
    settings = make_settings((), peer_certificate_failure=on_failure, **overrides)
    return XMPPOutgoingMachine(settings, PEER)


def local_header(**attributes: str) -> bytes:
    values = {"from": "local.example", "to": "remote.example", "version": "1.0"} | attributes
    named = b" ".join(b"%s='%s'" % (k.encode(), v.encode()) for k, v in values.items() if v)
    return (
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
        b"xmlns:stream='http://etherx.jabber.org/streams' %s>" % named
    )


#: The remote's side of STARTTLS, up to the hand-off.
NEGOTIATION: tuple[Event | Any, ...] = (
    Client(LOCAL_HEADER),
    OpenBackend(route="remote.example"),
    Routed(),
    SendToBackend(OPENING),
    Backend(REMOTE_HEADER),
    Backend(STARTTLS_FEATURES),
    SendToBackend(STARTTLS),
    Backend(PROCEED),
    HANDOFF,
)


def test_outgoing_stream_through_starttls() -> None:
    """The remote's stream id and features under TLS reach the local server:
    dialback keys on that id (XEP-0220 section 2.1.1)."""
    run(
        new(),
        *NEGOTIATION,
        TLS(TRUSTED),
        VERIFIED,
        SendToBackend(LOCAL_HEADER),
        Backend(REMOTE_HEADER),
        SendToClient(REMOTE_HEADER),
        Backend(TLS_FEATURES),
        SendToClient(TLS_FEATURES),
        Client(DB_RESULT),
        SendToBackend(DB_RESULT),
        Backend(b"<db:result from='remote.example' to='local.example' type='valid'/>"),
        SendToClient(b"<db:result from='remote.example' to='local.example' type='valid'/>"),
    )


def test_outgoing_stream_through_direct_tls() -> None:
    """XEP-0368: a direct-TLS server gets the ClientHello first; the local
    header is its first stream."""
    run(
        new(),
        Client(LOCAL_HEADER),
        OpenBackend(route="remote.example"),
        Routed(direct_tls=True),
        HANDOFF,
        TLS(WILDCARD),
        VERIFIED,
        SendToBackend(LOCAL_HEADER),
        Backend(REMOTE_HEADER + TLS_FEATURES),
        SendToClient(REMOTE_HEADER),
        SendToClient(TLS_FEATURES),
    )


def test_what_the_remote_sends_after_proceed_is_discarded() -> None:
    machine = new()
    run(machine, *NEGOTIATION[:-2])
    machine.receive_data(Side.BACKEND, PROCEED + b"<message>injected</message>")
    assert drain(machine) == [
        dataclasses.replace(HANDOFF, discarded=b"<message>injected</message>")
    ]


def test_the_local_servers_early_bytes_wait_for_the_relay() -> None:
    """Unlike a client's during its handshake, the local server's bytes are
    not the TLS side's: kept, and relayed once the remote answered."""
    machine = new()
    run(
        machine,
        *NEGOTIATION,
        Client(DB_RESULT),
        TLS(TRUSTED),
        VERIFIED,
        SendToBackend(LOCAL_HEADER),
    )
    assert machine.unprocessed_client_bytes == len(DB_RESULT)
    run(
        machine,
        Backend(REMOTE_HEADER),
        SendToClient(REMOTE_HEADER),
        SendToBackend(DB_RESULT),
    )


def reason(result: PeerVerification, detail: str) -> str:
    return f"remote certificate: {result.value} ({detail})"


@pytest.mark.parametrize(
    ("certificate", "result", "detail"),
    [
        (None, PeerVerification.NO_CERTIFICATE, "no certificate"),
        (UNTRUSTED, PeerVerification.UNTRUSTED, "self-signed certificate"),
        (OTHER, PeerVerification.NAME_MISMATCH, "not valid for 'remote.example'"),
    ],
)
def test_a_remote_that_fails_verification_is_refused(
    certificate: PeerCertificate | None, result: PeerVerification, detail: str
) -> None:
    """Nothing of the local stream reaches a remote the proxy could not
    verify; the local server hears that the remote connection failed."""
    run(
        new(),
        *NEGOTIATION,
        TLS(certificate),
        PeerChecked(result, None, detail),
        SendToClient(
            b"<?xml version='1.0'?><stream:stream xmlns=\"jabber:server\" "
            b'xmlns:stream="http://etherx.jabber.org/streams" xmlns:db="jabber:server:dialback" '
            b'id="ID" from="remote.example" to="local.example" version="1.0">'
            + stream_error("remote-connection-failed", text=reason(result, detail))
        ),
        CloseConnection(f"{reason(result, detail)} (remote-connection-failed)"),
    )


def test_dialback_lets_an_unverified_remote_through() -> None:
    run(
        new(PeerCertificateFailure.DIALBACK),
        *NEGOTIATION,
        TLS(UNTRUSTED),
        PeerChecked(PeerVerification.UNTRUSTED, None, "self-signed certificate"),
        SendToBackend(LOCAL_HEADER),
    )


def _refusal(machine: XMPPOutgoingMachine, data: bytes) -> tuple[bytes, list[object]]:
    machine.receive_data(Side.CLIENT, data)
    commands = drain(machine)
    sent = b"".join(c.data for c in commands if isinstance(c, SendToClient))
    return sent, [c for c in commands if not isinstance(c, SendToClient)]


@pytest.mark.parametrize(
    ("header", "condition"),
    [
        (local_header(to=""), "improper-addressing"),
        (local_header(to="a@b"), "host-unknown"),
        (local_header(to="a\x7fb.example"), "host-unknown"),
        (local_header(to="a" * 254), "host-unknown"),
        (local_header(**{"from": ""}), "improper-addressing"),
        (local_header(**{"from": "intruder.example"}), "invalid-from"),
        (local_header(version=""), "unsupported-version"),
        (local_header().replace(b"jabber:server", b"jabber:client"), "invalid-namespace"),
    ],
)
def test_local_header_checks(header: bytes, condition: str) -> None:
    machine = new(domains=("local.example",))
    sent, others = _refusal(machine, header)
    assert b"<%s xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text " % condition.encode() in sent
    assert len(others) == 1 and isinstance(others[0], CloseConnection)
    assert machine.state is State.CLOSED


def test_an_idn_goes_to_dns_and_sni_as_a_labels() -> None:
    machine = new()
    machine.receive_data(Side.CLIENT, local_header(to="M\u00fcnchen.example"))
    assert drain(machine) == [OpenBackend(route="xn--mnchen-3ya.example")]


@pytest.mark.parametrize(
    ("remote", "reason"),
    [
        (REMOTE_HEADER + TLS_FEATURES, "it offers no STARTTLS"),
        (
            REMOTE_HEADER
            + STARTTLS_FEATURES
            + b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
            "it refused STARTTLS",
        ),
        (
            REMOTE_HEADER
            + b"<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            b"</stream:error>",
            "stream error: host-unknown",
        ),
        (REMOTE_HEADER + b"</stream:stream>", "it closed the stream before TLS"),
        (REMOTE_HEADER.replace(b" version='1.0'>", b">"), "stream version None"),
        (REMOTE_HEADER + b"<message/>", "unexpected message before TLS"),
    ],
)
def test_the_remote_must_do_starttls(remote: bytes, reason: str) -> None:
    """Never plaintext: a remote that will not do TLS gets nothing of the
    local stream, and the local server a stream error."""
    machine = new()
    run(machine, *NEGOTIATION[:4])
    machine.receive_data(Side.BACKEND, remote)
    commands = drain(machine)
    sent = [c for c in commands if isinstance(c, SendToBackend)]
    assert sent in ([], [SendToBackend(STARTTLS)])
    assert commands[-1] == CloseConnection(
        f"remote remote.example: {reason} (remote-connection-failed)"
    )


def test_the_remote_closing_mid_stream_is_a_failed_remote_connection() -> None:
    machine = new()
    run(machine, *NEGOTIATION[:4])
    EOF(Side.BACKEND).apply(machine)
    commands = drain(machine)
    assert commands[0] == SendToClient(
        b"<?xml version='1.0'?><stream:stream xmlns=\"jabber:server\" "
        b'xmlns:stream="http://etherx.jabber.org/streams" xmlns:db="jabber:server:dialback" '
        b'id="ID" from="remote.example" to="local.example" version="1.0">'
        + stream_error("remote-connection-failed")
    )
    assert commands[1:] == [CloseConnection("backend closed (remote-connection-failed)")]
    assert machine.state is State.CLOSED


def test_starttls_from_the_local_server_ends_the_relay() -> None:
    machine = new()
    run(
        machine,
        *NEGOTIATION,
        TLS(TRUSTED),
        VERIFIED,
        SendToBackend(LOCAL_HEADER),
        Backend(REMOTE_HEADER),
        SendToClient(REMOTE_HEADER),
        Client(STARTTLS),
        SendToClient(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>"),
        CloseConnection("STARTTLS under TLS"),
    )


def test_driver_misuse_is_a_local_error() -> None:
    machine = new()
    run(machine, Client(LOCAL_HEADER), OpenBackend(route="remote.example"))
    with pytest.raises(LocalProtocolError):
        Connected().apply(machine)


#: A whole session; the data events may be cut anywhere.
SESSION: list[Event] = [
    Client(LOCAL_HEADER),
    Routed(),
    Backend(REMOTE_HEADER + STARTTLS_FEATURES + PROCEED),
    TLS(TRUSTED),
    Backend(REMOTE_HEADER + TLS_FEATURES),
    Client(DB_RESULT + b"<message to='a@remote.example'><body>&lt;starttls/&gt;</body></message>"),
    Backend(b"<db:result from='remote.example' to='local.example' type='valid'/>"),
]


@given(st.data())
def test_split_invariance(data: st.DataObject) -> None:
    whole = play(new(), SESSION)
    cuts = [
        sorted(data.draw(st.sets(st.integers(1, max(1, len(e.data) - 1)), max_size=4)))
        if isinstance(e, Client | Backend) and len(e.data) > 1
        else []
        for e in SESSION
    ]
    assert play(new(), SESSION, cuts) == whole
