"""One TLS policy, two code paths: the C helper's workers and pyOpenSSL agree.

The keeper sends the C helper the policy constants of ``tls.description``
(minimum version, TLS 1.2 ciphers, TLS 1.3 suites, key share groups);
``tls.contexts`` builds a pyOpenSSL context from the same constants, and
that is where the policy is validated (``--check``). This module runs one
handshake matrix against both and asserts that they give the same results,
and the expected ones:

* the real helper (``running_helper``), each handshake a real worker over
  loopback TCP, its report read from the plaintext channel;
* a small pyOpenSSL server in the test: ``tls.contexts.load_certificates``
  of the same certificates, over memory BIOs fed from a loopback socket by a thread (the way a
  worker drives OpenSSL), with the listener's ALPN as the connection's app
  data, as ``tls.contexts._select_alpn`` expects.

The client is always the standard library's ``ssl``: TLS 1.2 only or 1.3
only, a TLS 1.2 cipher list (static RSA; ECDHE-ECDSA; ECDHE-RSA), a single
key share group (``set_ecdh_curve``: Python 3.11 has no ``set_groups``),
SNI, ALPN, and a second connection resuming the first one's session
ticket (on the C side in another worker: the ticket keys are the helper's,
inherited by every worker). The certificates are the ECDSA ones of
``cert_dir`` plus an RSA one (trustme's default key type is ECDSA) chosen
by SNI.

For each case the outcome compared is what the client saw (version,
cipher, which certificate by serial, ALPN, whether it resumed) and what the
server saw (version, cipher, server name, ALPN: the C worker's report,
pyOpenSSL's connection), or for a refused handshake the server's OpenSSL
reason. The C report is also checked against the client's view.

Note what "agree" means here: pyOpenSSL runs on the OpenSSL bundled with
``cryptography``, while the C helper (and the client) use the system's
OpenSSL, which can be another release (4.0 and 3.0 when this was written).
The test compares the *policy as applied by two code paths*, not one
OpenSSL build with itself; a difference between releases would show as a
disagreement too, and would deserve a look all the same.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from OpenSSL import SSL

from starttls_proxy.settings import CertificateConfig, TLSConfig
from starttls_proxy.tls.contexts import CertificateStore, load_certificates
from starttls_proxy.wire import Ready, WorkerExit
from tests.tlshelper.harness import RunningHelper, running_helper

TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3
#: What the server says once the handshake is done: reading it, the client
#: has also read the session tickets sent before it.
GREETING = b"* OK ready\r\n"
#: The certificates, in the order the listener configures them (the first
#: is the default): files in the module's directory.
CERTIFICATES = {
    "localhost": ("cert.pem", "key.pem"),  # ECDSA: localhost, mail.example.test
    "other": ("other.pem", "other-key.pem"),  # ECDSA: other.example.test, *.wild.example.test
    "rsa": ("rsa.pem", "rsa-key.pem"),  # RSA: rsa.example.test
}


@dataclass(frozen=True)
class Served:
    """A handshake as the client saw it."""

    version: str
    cipher: str
    #: Which of CERTIFICATES the server presented (by serial number).
    certificate: str
    alpn: str | None = None
    resumed: bool = False


@dataclass(frozen=True)
class Report:
    """A handshake as the server saw it (the C worker's report's fields)."""

    version: str
    cipher: str
    server_name: str | None
    alpn: str | None


@dataclass(frozen=True)
class Failed:
    """A refused handshake: OpenSSL's reason on the server's side."""

    reason: str


@dataclass(frozen=True)
class Result:
    #: None when the client's handshake failed.
    client: Served | None
    server: Report | Failed


@dataclass(frozen=True)
class Case:
    expected: Served | Failed
    sni: str | None = "localhost"
    minimum: ssl.TLSVersion | None = None
    maximum: ssl.TLSVersion | None = None
    #: The client's TLS 1.2 cipher list (OpenSSL syntax).
    ciphers: str | None = None
    #: The only key share group the client supports.
    group: str | None = None
    alpn: tuple[str, ...] = ()
    #: The listener's ALPN protocols (the spawn request's).
    listener_alpn: tuple[str, ...] = ()
    #: Which servers: those with ``tls.min_version`` "1.2" or "1.3".
    server: str = "1.2"
    #: Resume a session of a first connection to these servers (None: don't).
    ticket_from: str | None = None

    def client_context(self, ca_file: Path) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(ca_file))
        # The chain is verified; which certificate came is the point.
        context.check_hostname = False
        if self.minimum is not None:
            context.minimum_version = self.minimum
        if self.maximum is not None:
            context.maximum_version = self.maximum
        if self.ciphers is not None:
            context.set_ciphers(self.ciphers)
        if self.group is not None:
            context.set_ecdh_curve(self.group)
        if self.alpn:
            context.set_alpn_protocols(list(self.alpn))
        return context


AES256 = "TLS_AES_256_GCM_SHA384"


def _tls13(
    certificate: str = "localhost", alpn: str | None = None, resumed: bool = False
) -> Served:
    return Served("TLSv1.3", AES256, certificate, alpn, resumed)


def _tls12(cipher: str, certificate: str = "localhost", resumed: bool = False) -> Served:
    return Served("TLSv1.2", cipher, certificate, resumed=resumed)


ECDSA_AES128 = "ECDHE-ECDSA-AES128-GCM-SHA256"
ECDSA_AES256 = "ECDHE-ECDSA-AES256-GCM-SHA384"
ECDSA_CHACHA20 = "ECDHE-ECDSA-CHACHA20-POLY1305"
RSA_CHACHA20 = "ECDHE-RSA-CHACHA20-POLY1305"
NO_SHARED_CIPHER = Failed("no shared cipher")
RSA_SNI = "rsa.example.test"
#: TLS 1.2 only clients: id -> (expected, the ciphers offered (None: the
#: default list), SNI, which picks the ECDSA or the RSA certificate).
TLS12_CIPHERS: dict[str, tuple[Served | Failed, str | None, str]] = {
    "static-rsa-ecdsa-certificate": (NO_SHARED_CIPHER, "AES128-GCM-SHA256", "localhost"),
    "static-rsa-rsa-certificate": (
        NO_SHARED_CIPHER,
        "AES128-GCM-SHA256:AES256-GCM-SHA384",
        RSA_SNI,
    ),
    "ecdhe-ecdsa": (_tls12(ECDSA_AES128), ECDSA_AES128, "localhost"),
    "ecdhe-ecdsa-chacha20": (_tls12(ECDSA_CHACHA20), ECDSA_CHACHA20, "localhost"),
    "tls12-server-order": (
        _tls12(ECDSA_AES256),
        f"{ECDSA_CHACHA20}:{ECDSA_AES128}:{ECDSA_AES256}",
        "localhost",
    ),
    "ecdhe-ecdsa-cbc": (
        NO_SHARED_CIPHER,
        "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA",
        "localhost",
    ),
    "ecdhe-rsa-ecdsa-certificate": (NO_SHARED_CIPHER, "ECDHE-RSA-AES128-GCM-SHA256", "localhost"),
    "ecdhe-rsa": (_tls12("ECDHE-RSA-AES256-GCM-SHA384", "rsa"), None, RSA_SNI),
    "ecdhe-rsa-chacha20": (_tls12(RSA_CHACHA20, "rsa"), RSA_CHACHA20, RSA_SNI),
}

CASES = [
    # Versions.
    pytest.param(Case(_tls13(), minimum=TLS13), id="tls13-only"),
    pytest.param(Case(_tls12(ECDSA_AES256), maximum=TLS12), id="tls12-only"),
    pytest.param(Case(_tls13(), server="1.3"), id="min13-tls13-client"),
    pytest.param(
        Case(Failed("unsupported protocol"), maximum=TLS12, server="1.3"),
        id="min13-refuses-tls12-client",
    ),
    # TLS 1.2 ciphers: ECDHE with AES-GCM or ChaCha20 only.
    *(
        pytest.param(Case(expected, sni=sni, maximum=TLS12, ciphers=ciphers), id=case_id)
        for case_id, (expected, ciphers, sni) in TLS12_CIPHERS.items()
    ),
    pytest.param(Case(_tls13("rsa"), sni="rsa.example.test", minimum=TLS13), id="tls13-rsa"),
    # Key share groups: X25519 and P-256.
    pytest.param(Case(_tls13(), group="X25519"), id="x25519"),
    pytest.param(Case(_tls13(), group="prime256v1"), id="p256"),
    pytest.param(Case(Failed("no suitable key share"), group="secp384r1"), id="p384"),
    pytest.param(Case(Failed("no suitable key share"), group="X448"), id="x448"),
    pytest.param(
        Case(Failed("no shared cipher"), maximum=TLS12, group="secp384r1"), id="p384-tls12"
    ),
    # SNI: the certificate served.
    pytest.param(Case(_tls13(), sni="localhost"), id="sni-localhost"),
    pytest.param(Case(_tls13(), sni="mail.example.test"), id="sni-second-name"),
    pytest.param(Case(_tls13("other"), sni="other.example.test"), id="sni-other"),
    pytest.param(Case(_tls13("other"), sni="OTHER.Example.Test"), id="sni-case"),
    pytest.param(Case(_tls13("other"), sni="a.wild.example.test"), id="sni-wildcard"),
    pytest.param(Case(_tls13(), sni="b.a.wild.example.test"), id="sni-wildcard-one-label"),
    pytest.param(Case(_tls13(), sni="wild.example.test"), id="sni-wildcard-no-label"),
    pytest.param(Case(_tls13(), sni="unknown.example.test"), id="sni-unknown"),
    pytest.param(Case(_tls13(), sni=None), id="no-sni"),
    # ALPN: the first of the listener's protocols the client offers.
    pytest.param(
        Case(_tls13(alpn="xmpp-client"), alpn=("xmpp-client",), listener_alpn=("xmpp-client",)),
        id="alpn-match",
    ),
    pytest.param(
        Case(
            _tls13(alpn="xmpp-client"),
            alpn=("h2", "xmpp-client"),
            listener_alpn=("xmpp-client",),
        ),
        id="alpn-second-offered",
    ),
    pytest.param(
        Case(
            _tls13(alpn="xmpp-client"),
            alpn=("h2", "xmpp-client"),
            listener_alpn=("xmpp-client", "h2"),
        ),
        id="alpn-listener-order",
    ),
    pytest.param(Case(_tls13(), alpn=("h2",), listener_alpn=("xmpp-client",)), id="alpn-none"),
    pytest.param(Case(_tls13(), alpn=("xmpp-client",)), id="alpn-listener-without"),
    # Resumption: a ticket from the first connection (another worker).
    pytest.param(Case(_tls13(resumed=True), ticket_from="1.2"), id="resume-tls13"),
    pytest.param(
        Case(
            _tls12(ECDSA_AES256, resumed=True),
            maximum=TLS12,
            ticket_from="1.2",
        ),
        id="resume-tls12",
    ),
    pytest.param(
        Case(_tls13("other", resumed=True), sni="other.example.test", ticket_from="1.2"),
        id="resume-after-sni-switch",
    ),
    pytest.param(
        Case(
            _tls13(alpn="xmpp-client", resumed=True),
            alpn=("xmpp-client",),
            listener_alpn=("xmpp-client",),
            ticket_from="1.2",
        ),
        id="resume-with-alpn",
    ),
    # A ticket made with another helper's keys: a full handshake.
    pytest.param(Case(_tls13(), ticket_from="1.3"), id="ticket-of-another-helper"),
]


@dataclass
class Servers:
    """One policy (``tls.min_version``) served both ways."""

    helper: RunningHelper
    store: CertificateStore


@dataclass
class Setting:
    directory: Path
    #: serial number -> name in CERTIFICATES
    names: dict[int, str]
    servers: dict[str, Servers]


@pytest.fixture(scope="module")
def setting(
    cert_dir: Path, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setting]:
    directory = tmp_path_factory.mktemp("handshakes")
    for name in ("ca.pem", "cert.pem", "key.pem", "other.pem", "other-key.pem"):
        (directory / name).write_bytes((cert_dir / name).read_bytes())
    rsa = ca.issue_cert("rsa.example.test", key_type=trustme.KeyType.RSA)
    rsa.private_key_pem.write_to_path(str(directory / "rsa-key.pem"))
    rsa.cert_chain_pems[0].write_to_path(str(directory / "rsa.pem"))
    pairs = [(directory / cert, directory / key) for cert, key in CERTIFICATES.values()]
    names = {
        x509.load_pem_x509_certificate((directory / cert).read_bytes()).serial_number: name
        for name, (cert, _) in CERTIFICATES.items()
    }
    with contextlib.ExitStack() as stack:
        servers = {}
        for minimum in ("1.2", "1.3"):
            helper = stack.enter_context(
                running_helper(directory / minimum, pairs, tls={"min_version": minimum})
            )
            assert isinstance(helper.reply, Ready), helper.reply
            store = load_certificates(
                TLSConfig(
                    certificates=[CertificateConfig(cert=c, key=k) for c, k in pairs],
                    min_version=minimum,
                )
            )
            servers[minimum] = Servers(helper, store)
        yield Setting(directory, names, servers)


# ----------------------------------------------------------------------
# The client.


def _connect(
    sock: socket.socket, context: ssl.SSLContext, sni: str | None, session: ssl.SSLSession | None
) -> ssl.SSLSocket | None:
    """The client's handshake; None when it fails (the socket is then closed)."""
    sock.settimeout(10)
    try:
        return context.wrap_socket(sock, server_hostname=sni, session=session)
    except ssl.SSLError:
        return None


def _read_greeting(tls: ssl.SSLSocket) -> None:
    data = b""
    while len(data) < len(GREETING):
        chunk = tls.recv(len(GREETING) - len(data))
        assert chunk, "the server closed before its greeting"
        data += chunk
    assert data == GREETING


def _seen_by_client(tls: ssl.SSLSocket, names: dict[int, str]) -> Served:
    version, cipher = tls.version(), tls.cipher()
    certificate = tls.getpeercert(binary_form=True)
    assert version is not None and cipher is not None and certificate is not None
    return Served(
        version=version,
        cipher=cipher[0],
        certificate=names[x509.load_der_x509_certificate(certificate).serial_number],
        alpn=tls.selected_alpn_protocol(),
        resumed=bool(tls.session_reused),
    )


# ----------------------------------------------------------------------
# The two servers.


def _through_helper(
    servers: Servers,
    case: Case,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None,
    names: dict[int, str],
) -> tuple[Result, ssl.SSLSession | None, int]:
    """One handshake with a new worker; also the session and the worker's PID."""
    helper = servers.helper
    connection = helper.spawn(alpn=case.listener_alpn)
    with contextlib.closing(connection.channel):
        tls = _connect(connection.client, context, case.sni, session)
        report = connection.report()
        if tls is None:
            assert report["ok"] is False, report
            assert helper.exit_of(connection.pid) == WorkerExit.HANDSHAKE_FAILED
            reason = str(report["reason"])
            assert reason.startswith("handshake failed: "), reason
            return (
                Result(None, Failed(reason.removeprefix("handshake failed: "))),
                None,
                connection.pid,
            )
        with tls:
            connection.channel.sendall(GREETING)
            _read_greeting(tls)
            client = _seen_by_client(tls, names)
            session = tls.session
        assert report.pop("ok") is True, report
        server = Report(**report)
    assert helper.exit_of(connection.pid) == WorkerExit.OK
    return Result(client, server), session, connection.pid


def _flush(tls: SSL.Connection, sock: socket.socket) -> None:
    """What OpenSSL wrote for the client, sent."""
    with contextlib.suppress(SSL.WantReadError):
        while True:
            sock.sendall(tls.bio_read(65536))


def _serve_pyopenssl(
    store: CertificateStore, sock: socket.socket, alpn: tuple[str, ...]
) -> Report | Failed:
    """One connection on ``store.default``, TLS over memory BIOs fed from ``sock``."""
    sock.settimeout(10)
    tls = SSL.Connection(store.default)
    tls.set_accept_state()
    tls.set_app_data(tuple(name.encode() for name in alpn))
    while True:
        try:
            tls.do_handshake()
            break
        except SSL.WantReadError:
            _flush(tls, sock)
            data = sock.recv(65536)
            if not data:
                return Failed("the client left during the handshake")
            tls.bio_write(data)
        except SSL.Error as error:
            _flush(tls, sock)  # the alert
            # The most recent error, as the C worker's ERR_peek_last_error.
            return Failed(error.args[0][-1][2])
    tls.sendall(GREETING)
    _flush(tls, sock)
    server_name = tls.get_servername()
    selected = tls.get_alpn_proto_negotiated()
    cipher, version = tls.get_cipher_name(), tls.get_protocol_version_name()
    assert cipher is not None
    return Report(
        version=version,
        cipher=cipher,
        server_name=server_name.decode() if server_name is not None else None,
        alpn=selected.decode() if selected else None,
    )


def _through_pyopenssl(
    servers: Servers,
    case: Case,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None,
    names: dict[int, str],
) -> tuple[Result, ssl.SSLSession | None]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = socket.create_connection(listener.getsockname(), timeout=10)
        accepted, _ = listener.accept()
    with accepted, concurrent.futures.ThreadPoolExecutor(1) as pool:
        serving = pool.submit(_serve_pyopenssl, servers.store, accepted, case.listener_alpn)
        tls = _connect(sock, context, case.sni, session)
        client = None
        if tls is not None:
            with tls:
                _read_greeting(tls)
                client = _seen_by_client(tls, names)
                session = tls.session
        server = serving.result(timeout=10)
    return Result(client, server), session if tls is not None else None


# ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_the_helper_and_pyopenssl_agree(setting: Setting, case: Case) -> None:
    ca_file = setting.directory / "ca.pem"
    servers = setting.servers[case.server]
    names = setting.names
    results = {}
    for side in ("helper", "pyopenssl"):
        context = case.client_context(ca_file)
        session = None
        first_pid = None
        if case.ticket_from is not None:
            # The first connection goes to the same kind of server.
            origin = setting.servers[case.ticket_from]
            if side == "helper":
                first, session, first_pid = _through_helper(origin, case, context, None, names)
            else:
                first, session = _through_pyopenssl(origin, case, context, None, names)
            assert first.client is not None and not first.client.resumed, first
            assert session is not None
        if side == "helper":
            result, _, pid = _through_helper(servers, case, context, session, names)
            # Tickets work across workers: the first connection had another one.
            assert pid != first_pid
        else:
            result, _ = _through_pyopenssl(servers, case, context, session, names)
        results[side] = result
    assert results["helper"] == results["pyopenssl"]
    expected = case.expected
    if isinstance(expected, Failed):
        assert results["helper"] == Result(None, expected)
    else:
        # The worker's report says what the client saw.
        assert results["helper"] == Result(
            expected, Report(expected.version, expected.cipher, case.sni, expected.alpn)
        )
