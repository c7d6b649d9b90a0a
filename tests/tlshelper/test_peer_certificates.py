"""Peer certificates on xmpp-server listeners, through the real helper.

The helper (``running_helper``) holds two trust stores, each the root of
one test authority; a spawn request naming store 1 or 2 makes its worker
ask the client for a certificate, verify it after the handshake, and say
in its report what came of it and which names the certificate holds. The
client is the standard library's ``ssl`` with a certificate made here
(``tests.peer_certs``: trustme cannot write xmppAddrs). Each report then
goes through the main process's own reading (``wire.read_report``) and
matching (``protocols.xmpp.peer_verification``), so that every case ends
in the outcome a stream from ``a.example`` would get: verified, untrusted,
no certificate or a name mismatch.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols._base import PeerCertificate, PeerVerification, TLSInfo
from protocols.xmpp import peer_verification
from starttls_proxy.wire import (
    MAX_PEER_DNS_NAMES,
    MAX_PEER_XMPP_ADDRS,
    SpawnRequest,
    WorkerExit,
    read_report,
)
from tests.peer_certs import Authority, Issued, xmpp_addr
from tests.tlshelper.harness import (
    Connection,
    RunningHelper,
    helper_trusting,
)

#: The domain the peer's stream claims in these cases.
PEER = "a.example"


@pytest.fixture(scope="module")
def helper(
    cert_dir: Path,
    peer_authorities: tuple[Authority, Authority],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningHelper]:
    directory = tmp_path_factory.mktemp("peer-certificates")
    certificates = [(cert_dir / "cert.pem", cert_dir / "key.pem")]
    with helper_trusting(directory, certificates, peer_authorities) as running:
        yield running


def _handshake(
    helper: RunningHelper,
    directory: Path,
    issued: Issued | None,
    *,
    peer_trust: int = 1,
    version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> dict[str, Any]:
    """A TLS client presenting ``issued`` (or no certificate); the worker's report."""
    connection = helper.spawn(peer_trust=peer_trust)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    if issued is not None:
        cert, key = issued.write(directory, "client")
        context.load_cert_chain(cert, key)
    try:
        connection.client.settimeout(10)
        with context.wrap_socket(connection.client) as tls:
            report = connection.report()
            tls.sendall(b"<stream:stream>")
            assert connection.channel.recv(100) == b"<stream:stream>"
        return report
    finally:
        _finish(helper, connection)


def _finish(helper: RunningHelper, connection: Connection) -> None:
    connection.close()
    assert helper.exit_of(connection.pid) in (WorkerExit.OK, WorkerExit.CLIENT_GONE)


def _verdict(report: dict[str, Any]) -> tuple[PeerVerification, PeerCertificate | None]:
    """What the main process makes of ``report`` for a stream from ``PEER``."""
    info = read_report(json.dumps(report).encode(), (), peer=True)
    assert isinstance(info, TLSInfo)
    return peer_verification(info.peer_certificate, PEER), info.peer_certificate


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_certificate_from_the_trusted_authority_verifies(
    helper: RunningHelper,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
    version: ssl.TLSVersion,
) -> None:
    issued = peer_authorities[0].issue(dns=[PEER, "conference.a.example"], xmpp=[PEER])
    report = _handshake(helper, tmp_path, issued, version=version)
    assert report["peer"] == {
        "verify": "ok",
        "error": None,
        "dns_names": [PEER, "conference.a.example"],
        "xmpp_addrs": [PEER],
    }
    assert _verdict(report)[0] is PeerVerification.VERIFIED


def test_another_authority_is_untrusted_and_the_store_is_the_requests(
    helper: RunningHelper, peer_authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    issued = peer_authorities[1].issue(dns=[PEER])
    report = _handshake(helper, tmp_path, issued, peer_trust=1)
    assert report["peer"]["verify"] == "untrusted"
    assert report["peer"]["error"] == "unable to get local issuer certificate"
    assert report["peer"]["dns_names"] == [PEER]
    assert _verdict(report)[0] is PeerVerification.UNTRUSTED
    # The same certificate, verified against the store that holds its root.
    assert _verdict(_handshake(helper, tmp_path, issued, peer_trust=2))[0] is (
        PeerVerification.VERIFIED
    )


def test_a_peer_without_a_certificate_still_gets_its_session(
    helper: RunningHelper, tmp_path: Path
) -> None:
    report = _handshake(helper, tmp_path, None)
    assert report["peer"] == {"verify": "none", "error": None, "dns_names": [], "xmpp_addrs": []}
    assert _verdict(report) == (PeerVerification.NO_CERTIFICATE, None)


def test_a_wildcard_stands_for_one_left_most_label(
    helper: RunningHelper, peer_authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    report = _handshake(helper, tmp_path, peer_authorities[0].issue(dns=["*.example"]))
    assert report["peer"]["dns_names"] == ["*.example"]
    _, certificate = _verdict(report)
    assert peer_verification(certificate, "a.example") is PeerVerification.VERIFIED
    assert peer_verification(certificate, "b.a.example") is PeerVerification.NAME_MISMATCH
    assert peer_verification(certificate, "example") is PeerVerification.NAME_MISMATCH


def test_an_xmpp_addr_alone_verifies_and_keeps_its_utf8(
    helper: RunningHelper, peer_authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    issued = peer_authorities[0].issue(xmpp=[PEER, "m\u00fcnchen.example"])
    report = _handshake(helper, tmp_path, issued)
    verdict, certificate = _verdict(report)
    assert verdict is PeerVerification.VERIFIED
    assert certificate is not None
    assert certificate.xmpp_addrs == (PEER, "m\u00fcnchen.example")
    assert certificate.dns_names == ()
    assert peer_verification(certificate, "m\u00fcnchen.example") is PeerVerification.VERIFIED


def test_a_trusted_certificate_for_another_domain_is_a_name_mismatch(
    helper: RunningHelper, peer_authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    report = _handshake(
        helper, tmp_path, peer_authorities[0].issue(dns=["b.example"], xmpp=["c.example"])
    )
    assert report["peer"]["verify"] == "ok"
    assert _verdict(report)[0] is PeerVerification.NAME_MISMATCH


def test_no_common_name_fallback(
    helper: RunningHelper, peer_authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    """RFC 9525: subjectAltName only, even without one."""
    report = _handshake(helper, tmp_path, peer_authorities[0].issue(common_name=PEER))
    assert report["peer"] == {"verify": "ok", "error": None, "dns_names": [], "xmpp_addrs": []}
    assert _verdict(report)[0] is PeerVerification.NAME_MISMATCH


def test_a_chain_through_an_intermediate_verifies(
    helper: RunningHelper, peer_authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    intermediate = peer_authorities[0].issue(ca=True, common_name="Peer intermediate").authority()
    report = _handshake(helper, tmp_path, intermediate.issue(dns=[PEER]))
    assert report["peer"]["verify"] == "ok", report


@pytest.mark.parametrize(
    ("issue", "error"),
    [
        ({"expired": True}, "certificate has expired"),
        (
            {"usages": [ExtendedKeyUsageOID.EMAIL_PROTECTION]},
            "the certificate's extended key usage allows no TLS",
        ),
    ],
)
def test_expired_or_not_for_tls_is_untrusted(
    helper: RunningHelper,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
    issue: dict[str, Any],
    error: str,
) -> None:
    report = _handshake(helper, tmp_path, peer_authorities[0].issue(dns=[PEER], **issue))
    assert (report["peer"]["verify"], report["peer"]["error"]) == ("untrusted", error)
    assert _verdict(report)[0] is PeerVerification.UNTRUSTED


SERVER_AUTH, CLIENT_AUTH = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
EMAIL, ANY = ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE


def _intermediate(root: Authority, usages: Sequence[x509.ObjectIdentifier] | None) -> Authority:
    """An intermediate CA of ``root`` with the extended key usage ``usages``
    (None: no such extension; ``Authority.issue`` gives a CA none)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Peer intermediate")]))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    certificate = builder.sign(root.key, hashes.SHA256())
    return Authority(key, certificate, [certificate, *root.chain])


@pytest.mark.parametrize(
    ("intermediate", "leaf"),
    [
        (None, None),
        ([SERVER_AUTH], None),
        ([SERVER_AUTH], [SERVER_AUTH]),
        ([CLIENT_AUTH], [CLIENT_AUTH]),
        ([SERVER_AUTH, CLIENT_AUTH], [CLIENT_AUTH]),
        ([CLIENT_AUTH], [SERVER_AUTH, CLIENT_AUTH]),
        ([SERVER_AUTH, EMAIL], [SERVER_AUTH, CLIENT_AUTH]),
        ([ANY], None),
        (None, [ANY]),
    ],
    ids=[
        "none-none",
        "server-none",
        "server-server",
        "client-client",
        "both-client",
        "client-both",
        "server+email-both",
        "any-none",
        "none-any",
    ],
)
def test_a_chain_verifies_when_all_of_it_allows_one_tls_purpose(
    helper: RunningHelper,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
    intermediate: list[x509.ObjectIdentifier] | None,
    leaf: list[x509.ObjectIdentifier] | None,
) -> None:
    """The intermediate's extended key usage, then the leaf's: either TLS
    purpose will do (peer servers connect with their server certificates),
    as long as every certificate allows it."""
    issuer = _intermediate(peer_authorities[0], intermediate)
    report = _handshake(helper, tmp_path, issuer.issue(dns=[PEER], usages=leaf))
    assert (report["peer"]["verify"], report["peer"]["error"]) == ("ok", None)
    assert _verdict(report)[0] is PeerVerification.VERIFIED


@pytest.mark.parametrize(
    ("intermediate", "leaf"),
    [
        ([EMAIL], None),
        ([EMAIL], [SERVER_AUTH, CLIENT_AUTH]),
        ([SERVER_AUTH], [CLIENT_AUTH]),
        ([CLIENT_AUTH], [SERVER_AUTH]),
    ],
    ids=["email-none", "email-both", "server-client", "client-server"],
)
def test_an_intermediate_that_leaves_the_leaf_no_tls_purpose_makes_it_untrusted(
    helper: RunningHelper,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
    intermediate: list[x509.ObjectIdentifier],
    leaf: list[x509.ObjectIdentifier] | None,
) -> None:
    """Regression: only the leaf's extended key usage was checked, so a CA
    confined to e-mail (S/MIME) under a trusted root could issue a
    certificate for any server that verified."""
    issuer = _intermediate(peer_authorities[0], intermediate)
    report = _handshake(helper, tmp_path, issuer.issue(dns=[PEER], usages=leaf))
    assert (report["peer"]["verify"], report["peer"]["error"]) == (
        "untrusted",
        "unsuitable certificate purpose",
    )
    assert _verdict(report)[0] is PeerVerification.UNTRUSTED


@pytest.mark.parametrize(
    "usages",
    [[ExtendedKeyUsageOID.SERVER_AUTH], [ExtendedKeyUsageOID.CLIENT_AUTH], None],
    ids=["server-auth-only", "client-auth-only", "no-extended-key-usage"],
)
def test_a_server_certificate_is_a_peers_certificate(
    helper: RunningHelper,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
    usages: list[Any] | None,
) -> None:
    """CAs stopped issuing clientAuth; servers connect with what they serve."""
    report = _handshake(helper, tmp_path, peer_authorities[0].issue(dns=[PEER], usages=usages))
    assert report["peer"]["verify"] == "ok"


def test_the_names_reported_are_bounded_and_well_formed(
    helper: RunningHelper, peer_authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    """A hostile certificate's names: too many, too long, not host names,
    not UTF-8, with control characters, of the wrong ASN.1 type."""
    dns = ["under_score.example", "space .example", "x" * 256]
    dns += [f"n{i}.example" for i in range(120)]
    xmpp: list[str | x509.OtherName] = [
        xmpp_addr(b"\xff\xfe.example"),
        xmpp_addr(b"\xc0\xae.example"),  # an overlong '.'
        xmpp_addr("bell\x07.example"),
        xmpp_addr("c1\u0085.example"),
        xmpp_addr("ia5.example", tag=0x16),
        xmpp_addr("y" * 256),
        *(f"x{i}.example" for i in range(12)),
    ]
    report = _handshake(helper, tmp_path, peer_authorities[0].issue(dns=dns, xmpp=xmpp))
    peer = report["peer"]
    assert peer["dns_names"] == [f"n{i}.example" for i in range(MAX_PEER_DNS_NAMES)]
    assert peer["xmpp_addrs"] == [f"x{i}.example" for i in range(MAX_PEER_XMPP_ADDRS)]
    assert _verdict(report)[0] is PeerVerification.NAME_MISMATCH


def test_sessions_are_not_resumed_on_a_listener_that_verifies_peers(
    helper: RunningHelper, peer_authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    """A resumed session's certificate would come without its chain: each
    connection presents its certificate anew."""
    cert, key = peer_authorities[0].issue(dns=[PEER]).write(tmp_path, "client")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    session = None
    for _ in range(2):
        connection = helper.spawn(peer_trust=1)
        connection.client.settimeout(10)
        with context.wrap_socket(connection.client, session=session) as tls:
            assert connection.report()["peer"]["verify"] == "ok"
            assert not tls.session_reused
            session = tls.session
        _finish(helper, connection)


def test_a_listener_that_names_no_store_asks_for_no_certificate(
    helper: RunningHelper, peer_authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    report = _handshake(helper, tmp_path, peer_authorities[0].issue(dns=[PEER]), peer_trust=0)
    assert "peer" not in report
    info = read_report(json.dumps(report).encode(), ())
    assert isinstance(info, TLSInfo) and info.peer_certificate is None


def test_a_request_for_a_store_the_helper_does_not_hold_is_refused(
    helper: RunningHelper,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        accepted, _ = listener.accept()
    ours, theirs = socket.socketpair()
    with client, accepted, ours, theirs:
        helper.send_request(
            SpawnRequest(10.0, peer_trust=3).encode(), [accepted.fileno(), theirs.fileno()]
        )
        accepted.close()
        theirs.close()
        ours.settimeout(5)
        assert ours.recv(1) == b"", "a worker took a request for a trust store it lacks"
    assert helper.process.poll() is None
