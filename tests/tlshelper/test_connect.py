"""Workers that connect: the client side of TLS, through the real helper.

For an outgoing XMPP server-to-server stream the main process connects to
the remote server itself (and may have negotiated STARTTLS in plaintext),
then hands the socket to a worker in the connect role
(``TLSRole.CONNECT``). The worker sends its ClientHello with the spawn
request's peer name as SNI and its ALPN list, answers a TLS 1.3
CertificateRequest with the certificate the server name hint picks (a TLS
1.2 one with no certificate: the key server signs no TLS 1.2 client's
CertificateVerify, and the worker behaves the same without it), verifies
the server's chain after the handshake against the request's trust store,
reports as on accept, and pumps.

The remote server here is pyOpenSSL over memory BIOs on the test's end of
a loopback TCP connection (``Remote``; the worker holds the end that
connected, as the main process would): it records what the worker sent
(SNI, the ALPN list offered, a client certificate, the handshake messages
the worker sent in the clear), and fails the handshake in the ways a remote
can (an alert, plaintext, leaving, silence). Reports
also go through the main process's reading (``wire.read_report``).

The helper holds two certificates (``cert_dir``'s: localhost and
other.example.test) and two trust stores: 1 the root of the remote's
authority, 2 another one's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from OpenSSL import SSL

from protocols._base import PeerCertificate, TLSInfo
from starttls_proxy.keys import provider
from starttls_proxy.keys.server import encode_grant
from starttls_proxy.privileged.keeper import KeyServerProcess, open_key_files
from starttls_proxy.settings import IsolationConfig, checked, encode
from starttls_proxy.wire import KeyServerCounts, Ready, TLSRole, WorkerExit, read_report
from tests.peer_certs import Authority
from tests.realservers.net import read_to_end
from tests.tlshelper.harness import (
    Connection,
    RunningHelper,
    helper_trusting,
    running_helper,
    signing_through_test,
    spawn_on,
    stdlib_reason,
    trust_stores,
)

#: The remote server's name: the peer name, and its certificate's.
REMOTE = "remote.example"
#: The key server's UIDs (the helper's are the harness's).
KEY_SERVER_UIDS = (340_000, 1_000)
TLS12 = SSL.TLS1_2_VERSION
TLS13 = SSL.TLS1_3_VERSION


def _helper_certificates(cert_dir: Path) -> list[tuple[Path, Path]]:
    """The first is the default: localhost, mail.example.test; then
    other.example.test, *.wild.example.test."""
    return [
        (cert_dir / "cert.pem", cert_dir / "key.pem"),
        (cert_dir / "other.pem", cert_dir / "other-key.pem"),
    ]


@pytest.fixture(scope="module")
def helper(
    cert_dir: Path,
    peer_authorities: tuple[Authority, Authority],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningHelper]:
    directory = tmp_path_factory.mktemp("connect")
    with helper_trusting(directory, _helper_certificates(cert_dir), peer_authorities) as running:
        yield running


@dataclass
class Signing:
    """A helper whose workers sign through a real key server."""

    helper: RunningHelper
    key_server: KeyServerProcess
    counts: list[KeyServerCounts]

    def signed(self) -> int:
        self.key_server.read_counts()
        return sum(message.counts.signed for message in self.counts)


@pytest.fixture(scope="module")
def signing(
    cert_dir: Path,
    peer_authorities: tuple[Authority, Authority],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Signing]:
    directory = tmp_path_factory.mktemp("connect-key-server")
    isolation = checked(
        IsolationConfig,
        {"chroot": directory / "empty", "uid_range": KEY_SERVER_UIDS, "key_server": True},
        "isolation",
    )
    counts: list[KeyServerCounts] = []
    key_server = KeyServerProcess(encode(isolation), counts.append)
    certificates = _helper_certificates(cert_dir)
    files = open_key_files({"tls": {"certificates": [{"key": str(k)} for _, k in certificates]}})
    try:
        references, link = key_server.load(files)
    finally:
        for fd in files:
            os.close(fd)
    env = {**os.environ, "OPENSSL_CONF": str(provider.write_openssl_config(directory))}
    try:
        with (
            link,
            running_helper(
                directory / "helper",
                certificates,
                key_references=references,
                link=link,
                env=env,
                tls={"peer_trust": trust_stores(directory, peer_authorities)},
            ) as running,
        ):
            link.close()
            assert isinstance(running.reply, Ready), running.reply
            yield Signing(running, key_server, counts)
    finally:
        key_server.stop()


@pytest.fixture(scope="module")
def remote_certificate(
    peer_authorities: tuple[Authority, Authority], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The remote server's chain and key, from the authority of trust store 1."""
    issued = peer_authorities[0].issue(dns=[REMOTE, f"conference.{REMOTE}"], xmpp=[REMOTE])
    return issued.write(tmp_path_factory.mktemp("remote"), "remote")


# ----------------------------------------------------------------------
# The remote server.


@dataclass
class Seen:
    """What the remote server saw of the worker's side."""

    server_name: bytes | None = None
    #: The ALPN protocols offered; None: no ALPN extension.
    alpn: list[bytes] | None = None
    client_certificate: x509.Certificate | None = None
    #: Every byte the worker sent, as it came.
    received: bytes = b""


#: TLS record and handshake message types (RFC 5246, RFC 8446).
CHANGE_CIPHER_SPEC, HANDSHAKE = 20, 22
CERTIFICATE, CERTIFICATE_VERIFY = 11, 15


def _clear_handshake_messages(received: bytes) -> list[tuple[int, bytes]]:
    """The handshake messages (type, body) the worker sent before its
    ChangeCipherSpec: all of a TLS 1.2 client's but its Finished, only the
    ClientHello of a TLS 1.3 client's."""
    stream, at = b"", 0
    while at + 5 <= len(received) and received[at] == HANDSHAKE:
        size = int.from_bytes(received[at + 3 : at + 5], "big")
        stream += received[at + 5 : at + 5 + size]
        at += 5 + size
    assert at < len(received) and received[at] == CHANGE_CIPHER_SPEC, "no ChangeCipherSpec"
    messages = []
    while stream:
        size = int.from_bytes(stream[1:4], "big")
        messages.append((stream[0], stream[4 : 4 + size]))
        stream = stream[4 + size :]
    return messages


class Remote:
    """A TLS server (pyOpenSSL) over memory BIOs fed from ``sock``: the test
    decides when it reads and what it sends."""

    def __init__(
        self,
        sock: socket.socket,
        certificate: tuple[Path, Path],
        *,
        select_alpn: bytes | None = None,
        request_certificate: bool = False,
        require_certificate: bool = False,
        maximum: int | None = None,
        ciphers: str | None = None,
    ) -> None:
        self.sock = sock
        sock.settimeout(10)
        self.seen = Seen()
        self.select_alpn = select_alpn
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate_chain_file(str(certificate[0]))
        context.use_privatekey_file(str(certificate[1]))
        if maximum is not None:
            context.set_max_proto_version(maximum)
        if ciphers is not None:
            context.set_cipher_list(ciphers.encode())
        context.set_alpn_select_callback(self._on_alpn)
        if request_certificate or require_certificate:
            # Any certificate: which one came is the point.
            mode = SSL.VERIFY_PEER
            if require_certificate:
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            context.set_verify(mode, lambda *_: True)
        self.tls = SSL.Connection(context)
        self.tls.set_accept_state()

    def _on_alpn(self, _: SSL.Connection, offered: list[bytes]) -> bytes:
        self.seen.alpn = list(offered)
        if self.select_alpn in offered:
            assert self.select_alpn is not None
            return self.select_alpn
        return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

    def flush(self) -> None:
        with contextlib.suppress(SSL.WantReadError):
            while True:
                self.sock.sendall(self.tls.bio_read(65536))

    def _read_more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the worker closed")
        self.seen.received += data
        self.tls.bio_write(data)

    def handshake(self) -> None:
        """The server's side; SSL.Error (after sending its alert) when it fails."""
        while True:
            try:
                self.tls.do_handshake()
            except SSL.WantReadError:
                self.flush()
                self._read_more()
            except SSL.Error:
                self.flush()
                raise
            else:
                self.flush()
                break
        self.seen.server_name = self.tls.get_servername()
        self.seen.client_certificate = self.tls.get_peer_certificate(as_cryptography=True)

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)
        self.flush()

    def receive(self) -> bytes:
        """Plaintext, once a whole record came; b"" at close_notify."""
        while True:
            try:
                return self.tls.recv(65536)
            except SSL.WantReadError:
                self._read_more()
            except SSL.ZeroReturnError:
                return b""

    def receive_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.receive()
            assert chunk, f"close_notify after {len(data)} of {size} bytes"
            data += chunk
        return data


# ----------------------------------------------------------------------
# Helpers.


def _connect(
    helper: RunningHelper,
    *,
    peer_name: str = REMOTE,
    peer_trust: int = 1,
    hint: str | None = None,
    alpn: tuple[str, ...] = (),
    handshake_timeout: float = 10.0,
) -> Connection:
    """A worker connecting to the test (``Connection.client``: the remote's
    end; which end of the TCP connection opened it does not matter to TLS)."""
    return helper.spawn(
        server_name_hint=hint,
        alpn=alpn,
        handshake_timeout=handshake_timeout,
        peer_trust=peer_trust,
        role=TLSRole.CONNECT,
        peer_name=peer_name,
    )


def _handshake(
    helper: RunningHelper, certificate: tuple[Path, Path], **options: Any
) -> tuple[Connection, Remote, dict[str, Any]]:
    """A worker's handshake with a remote server (``options``: ``Remote``'s
    and ``_connect``'s); the worker's report."""
    remote_options = {
        key: options.pop(key)
        for key in (
            "select_alpn",
            "request_certificate",
            "require_certificate",
            "maximum",
            "ciphers",
        )
        if key in options
    }
    connection = _connect(helper, **options)
    remote = Remote(connection.client, certificate, **remote_options)
    try:
        remote.handshake()
    except BaseException:
        connection.close()
        raise
    return connection, remote, connection.report()


def _finish(helper: RunningHelper, connection: Connection) -> int:
    """The remote leaves first, then the main process; the worker's exit status."""
    connection.client.close()
    status = helper.exit_of(connection.pid)
    connection.channel.close()
    return status


def _read(report: dict[str, Any], alpn: tuple[str, ...] = ()) -> TLSInfo:
    """The report as the main process reads it (a connect report always has "peer")."""
    info = read_report(json.dumps(report).encode(), alpn, peer=True)
    assert isinstance(info, TLSInfo), info
    return info


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(10)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the channel ended after {len(data)} of {size} bytes"
        data += chunk
    return data


def _dns_names(certificate: x509.Certificate | None) -> list[str]:
    assert certificate is not None, "no client certificate"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return names.value.get_values_for_type(x509.DNSName)


# ----------------------------------------------------------------------
# A verified server, and the session.


@pytest.mark.parametrize("maximum", [TLS12, TLS13], ids=["tls12", "tls13"])
def test_a_server_the_trust_store_vouches_for(
    helper: RunningHelper, remote_certificate: tuple[Path, Path], maximum: int
) -> None:
    connection, remote, report = _handshake(helper, remote_certificate, maximum=maximum)
    assert report == {
        "ok": True,
        "version": remote.tls.get_protocol_version_name(),
        "cipher": remote.tls.get_cipher_name(),
        "server_name": REMOTE,
        "alpn": None,
        "peer": {
            "verify": "ok",
            "error": None,
            "dns_names": [REMOTE, f"conference.{REMOTE}"],
            "xmpp_addrs": [REMOTE],
        },
    }
    assert report["version"] == ("TLSv1.3" if maximum == TLS13 else "TLSv1.2")
    assert _read(report).peer_certificate == PeerCertificate(
        trusted=True, dns_names=(REMOTE, f"conference.{REMOTE}"), xmpp_addrs=(REMOTE,)
    )
    assert remote.seen.server_name == REMOTE.encode()
    # Plaintext both ways.
    remote.send(b"<stream:stream from='remote.example'>")
    assert _read_exactly(connection.channel, 37) == b"<stream:stream from='remote.example'>"
    connection.channel.sendall(b"<stream:features/>")
    assert remote.receive_exactly(18) == b"<stream:features/>"
    assert _finish(helper, connection) == WorkerExit.OK


def test_a_megabyte_each_way_arrives_byte_exact(
    helper: RunningHelper, remote_certificate: tuple[Path, Path]
) -> None:
    """The pump is the accept role's (test_worker.py tests it under back
    pressure): here the direction of each stream is what is new."""
    connection, remote, report = _handshake(helper, remote_certificate)
    assert report["ok"] is True
    down, up = os.urandom(1024 * 1024), os.urandom(1024 * 1024)
    remote.send(down)
    assert _read_exactly(connection.channel, len(down)) == down
    connection.channel.sendall(up)
    assert remote.receive_exactly(len(up)) == up
    assert _finish(helper, connection) == WorkerExit.OK


@pytest.mark.parametrize("ending", ["main-process-closes", "close-notify", "fin"])
def test_the_session_ends_as_on_accept(
    helper: RunningHelper, remote_certificate: tuple[Path, Path], ending: str
) -> None:
    """The main process closing the channel sends close_notify; the remote's
    close_notify, or its end of stream, ends the channel after the last byte."""
    connection, remote, report = _handshake(helper, remote_certificate)
    assert report["ok"] is True
    if ending == "main-process-closes":
        connection.channel.sendall(b"</stream:stream>")
        connection.channel.close()
        assert remote.receive_exactly(16) == b"</stream:stream>"
        assert remote.receive() == b"", "no close_notify"
        # The worker waits for the remote's FIN (LINGER_MS) before it leaves.
        connection.client.close()
        assert helper.exit_of(connection.pid) == WorkerExit.OK
        return
    remote.send(b"</stream:stream>")
    if ending == "close-notify":
        with contextlib.suppress(SSL.WantReadError):
            remote.tls.shutdown()
        remote.flush()
    else:
        connection.client.shutdown(socket.SHUT_WR)
    connection.channel.settimeout(10)
    assert read_to_end(connection.channel) == b"</stream:stream>"
    assert _finish(helper, connection) == WorkerExit.OK


# ----------------------------------------------------------------------
# Verification: after the handshake, against the request's store.


def test_another_authority_is_untrusted_and_the_store_is_the_requests(
    helper: RunningHelper, peer_authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    """The handshake still succeeds (the main process refuses the stream)."""
    certificate = peer_authorities[1].issue(dns=[REMOTE]).write(tmp_path, "unknown")
    connection, _, report = _handshake(helper, certificate, peer_trust=1)
    assert report["ok"] is True
    assert report["peer"] == {
        "verify": "untrusted",
        "error": "unable to get local issuer certificate",
        "dns_names": [REMOTE],
        "xmpp_addrs": [],
    }
    assert _read(report).peer_certificate == PeerCertificate(
        trusted=False, problem="unable to get local issuer certificate", dns_names=(REMOTE,)
    )
    assert _finish(helper, connection) == WorkerExit.OK
    connection, _, report = _handshake(helper, certificate, peer_trust=2)
    assert report["peer"]["verify"] == "ok"
    assert _finish(helper, connection) == WorkerExit.OK


@pytest.mark.parametrize(
    ("expired", "intermediate", "error"),
    [(True, False, "certificate has expired"), (False, True, None)],
    ids=["expired", "through-an-intermediate"],
)
def test_the_chain_the_server_sends_is_verified(
    helper: RunningHelper,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
    expired: bool,
    intermediate: bool,
    error: str | None,
) -> None:
    authority = peer_authorities[0]
    if intermediate:
        authority = authority.issue(ca=True, common_name="Remote intermediate").authority()
    leaf = authority.issue(dns=[REMOTE], expired=expired)
    connection, _, report = _handshake(helper, leaf.write(tmp_path, "remote"))
    assert report["ok"] is True
    assert (report["peer"]["verify"], report["peer"]["error"]) == (
        ("ok", None) if error is None else ("untrusted", error)
    )
    assert _finish(helper, connection) == WorkerExit.OK


# ----------------------------------------------------------------------
# What the worker sends: SNI, ALPN, a client certificate.


@pytest.mark.parametrize(
    "peer_name",
    [REMOTE, "XMPP.Remote.Example.", "a", "_xmpp-server._tcp!~", "h" * 63 + "." + "x" * 191],
)
def test_the_server_sees_exactly_the_peer_name(
    helper: RunningHelper, remote_certificate: tuple[Path, Path], peer_name: str
) -> None:
    connection, remote, report = _handshake(helper, remote_certificate, peer_name=peer_name)
    assert remote.seen.server_name == peer_name.encode()
    assert report["server_name"] == peer_name
    assert _finish(helper, connection) == WorkerExit.OK


@pytest.mark.parametrize(
    ("offered", "selected"),
    [
        (("xmpp-server", "xmpp-client"), "xmpp-client"),
        (("xmpp-server",), "xmpp-server"),
        (("xmpp-server", "h2"), None),
        ((), None),
    ],
)
def test_the_alpn_list_offered_and_the_servers_choice(
    helper: RunningHelper,
    remote_certificate: tuple[Path, Path],
    offered: tuple[str, ...],
    selected: str | None,
) -> None:
    choice = (selected or "xmpp-client").encode()
    connection, remote, report = _handshake(
        helper, remote_certificate, alpn=offered, select_alpn=choice
    )
    # No ALPN extension at all when the list is empty.
    assert remote.seen.alpn == ([name.encode() for name in offered] if offered else None)
    assert report["alpn"] == selected
    assert _read(report, offered).alpn == selected
    assert _finish(helper, connection) == WorkerExit.OK


@pytest.mark.parametrize(
    ("hint", "names"),
    [
        (None, ["localhost", "mail.example.test"]),
        ("mail.example.test", ["localhost", "mail.example.test"]),
        ("other.example.test", ["other.example.test", "*.wild.example.test"]),
        ("a.wild.example.test", ["other.example.test", "*.wild.example.test"]),
        ("unknown.example", ["localhost", "mail.example.test"]),
    ],
)
def test_a_tls13_server_that_asks_gets_the_certificate_the_hint_picks(
    helper: RunningHelper,
    remote_certificate: tuple[Path, Path],
    hint: str | None,
    names: list[str],
) -> None:
    connection, remote, report = _handshake(
        helper, remote_certificate, hint=hint, request_certificate=True, maximum=TLS13
    )
    assert report["ok"] is True and report["version"] == "TLSv1.3"
    assert _dns_names(remote.seen.client_certificate) == names
    # Not the hint: the peer name stays the SNI.
    assert remote.seen.server_name == REMOTE.encode()
    assert _finish(helper, connection) == WorkerExit.OK


def _helper(request: pytest.FixtureRequest, key_server: bool) -> RunningHelper:
    """The module's helper with or without the key server."""
    if key_server:
        signing: Signing = request.getfixturevalue("signing")
        return signing.helper
    helper: RunningHelper = request.getfixturevalue("helper")
    return helper


@pytest.mark.parametrize("key_server", [False, True], ids=["key-in-helper", "key-server"])
@pytest.mark.parametrize("hint", [None, "other.example.test"])
def test_a_tls12_server_that_asks_gets_no_certificate_and_the_handshake_goes_on(
    request: pytest.FixtureRequest,
    remote_certificate: tuple[Path, Path],
    key_server: bool,
    hint: str | None,
) -> None:
    """A TLS 1.2 client certificate would need a signature over the raw
    transcript, which the key server refuses: the worker answers with an
    empty Certificate message, and signs nothing (no CertificateVerify),
    with the key server or without."""
    helper = _helper(request, key_server)
    connection, remote, report = _handshake(
        helper, remote_certificate, hint=hint, request_certificate=True, maximum=TLS12
    )
    assert report["ok"] is True and report["version"] == "TLSv1.2"
    assert report["peer"]["verify"] == "ok"
    assert remote.seen.client_certificate is None
    messages = _clear_handshake_messages(remote.seen.received)
    # An empty certificate_list (u24 length 0), and no CertificateVerify.
    assert (CERTIFICATE, b"\x00\x00\x00") in messages
    assert [kind for kind, _ in messages if kind in (CERTIFICATE, CERTIFICATE_VERIFY)] == [
        CERTIFICATE
    ]
    # The session works.
    remote.send(b"<stream:features/>")
    assert _read_exactly(connection.channel, 18) == b"<stream:features/>"
    assert _finish(helper, connection) == WorkerExit.OK


@pytest.mark.parametrize("key_server", [False, True], ids=["key-in-helper", "key-server"])
def test_a_tls12_server_that_requires_a_certificate_ends_the_handshake(
    request: pytest.FixtureRequest, remote_certificate: tuple[Path, Path], key_server: bool
) -> None:
    helper = _helper(request, key_server)
    connection = _connect(helper)
    remote = Remote(connection.client, remote_certificate, require_certificate=True, maximum=TLS12)
    with pytest.raises(SSL.Error, match="peer did not return a certificate"):
        remote.handshake()
    assert connection.report() == {
        "ok": False,
        "reason": "handshake failed: sslv3 alert handshake failure",
    }
    assert _finish(helper, connection) == WorkerExit.HANDSHAKE_FAILED


def test_a_server_that_does_not_ask_gets_no_certificate(
    helper: RunningHelper, remote_certificate: tuple[Path, Path]
) -> None:
    connection, remote, report = _handshake(helper, remote_certificate, hint="other.example.test")
    assert report["ok"] is True
    assert remote.seen.client_certificate is None
    assert _finish(helper, connection) == WorkerExit.OK


def _signed_more_than(signing: Signing, before: int) -> bool:
    """Whether the key server reports more signatures than ``before``
    (it reports at most every keys.server.COUNTS_INTERVAL)."""
    deadline = time.monotonic() + 5
    while signing.signed() <= before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize(
    ("hint", "names"),
    [
        (None, ["localhost", "mail.example.test"]),
        ("other.example.test", ["other.example.test", "*.wild.example.test"]),
    ],
)
def test_the_client_certificates_key_signs_through_the_key_server(
    signing: Signing,
    remote_certificate: tuple[Path, Path],
    hint: str | None,
    names: list[str],
) -> None:
    """The helper holds key references only: the CertificateVerify the
    server checked was the key server's signature, which it makes for a
    worker that connects (the grant says so) over a TLS 1.3 client's
    CertificateVerify input."""
    before = signing.signed()
    connection, remote, report = _handshake(
        signing.helper, remote_certificate, hint=hint, request_certificate=True, maximum=TLS13
    )
    assert report["ok"] is True and report["peer"]["verify"] == "ok"
    assert _dns_names(remote.seen.client_certificate) == names
    assert _finish(signing.helper, connection) == WorkerExit.OK
    assert _signed_more_than(signing, before)


@dataclass
class Granting:
    """A helper with key references whose link's other end is the test's:
    it reads the grants the helper sends for its workers."""

    helper: RunningHelper
    link: socket.socket


@pytest.fixture(scope="module")
def granting(
    cert_dir: Path,
    peer_authorities: tuple[Authority, Authority],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Granting]:
    directory = tmp_path_factory.mktemp("connect-grants")
    stores = trust_stores(directory, peer_authorities)
    with signing_through_test(
        directory, _helper_certificates(cert_dir), tls={"peer_trust": stores}
    ) as (running, link):
        yield Granting(running, link)


@pytest.mark.parametrize(
    ("role", "hint", "indexes"),
    [
        (TLSRole.ACCEPT, None, [0, 1]),
        (TLSRole.ACCEPT, "other.example.test", [1]),
        (TLSRole.CONNECT, None, [0]),
        (TLSRole.CONNECT, "other.example.test", [1]),
        (TLSRole.CONNECT, "unknown.example", [0]),
    ],
    ids=["accept", "accept-other", "connect", "connect-other", "connect-unknown-hint"],
)
def test_the_grant_names_the_workers_role_and_the_certificates_it_may_use(
    granting: Granting, role: TLSRole, hint: str | None, indexes: list[int]
) -> None:
    """keys/keyserver_wire.h: the role, then the certificates. A worker that
    accepts may serve any certificate SNI may switch to from the default; a
    worker that connects has no SNI to switch on: the hint's alone."""
    if role == TLSRole.CONNECT:
        connection = _connect(granting.helper, hint=hint)
    else:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname(), timeout=10)
            server_end, _ = listener.accept()
        connection = spawn_on(granting.helper, client, server_end, server_name_hint=hint)
    granting.link.settimeout(10)
    message, fds, _, _ = socket.recv_fds(granting.link, 1024, 1)
    for fd in fds:
        os.close(fd)
    assert len(fds) == 1
    assert message == encode_grant(indexes, role)
    connection.close()
    assert granting.helper.exit_of(connection.pid) == WorkerExit.CLIENT_GONE


def test_without_a_certificate_request_nothing_is_signed(
    signing: Signing, remote_certificate: tuple[Path, Path]
) -> None:
    before = signing.signed()
    connection, remote, report = _handshake(signing.helper, remote_certificate)
    assert report["ok"] is True and remote.seen.client_certificate is None
    assert _finish(signing.helper, connection) == WorkerExit.OK
    assert not _signed_more_than(signing, before)


# ----------------------------------------------------------------------
# How a handshake fails.


def test_a_server_that_shares_no_cipher_fails_the_handshake(
    helper: RunningHelper, remote_certificate: tuple[Path, Path]
) -> None:
    """The remote's alert ends it: CBC is outside the policy the worker offers."""
    connection = _connect(helper)
    remote = Remote(
        connection.client, remote_certificate, maximum=TLS12, ciphers="ECDHE-ECDSA-AES128-SHA"
    )
    with pytest.raises(SSL.Error, match="no shared cipher"):
        remote.handshake()
    assert connection.report() == {
        "ok": False,
        "reason": "handshake failed: sslv3 alert handshake failure",
    }
    assert _finish(helper, connection) == WorkerExit.HANDSHAKE_FAILED


def _stdlib_client_error(data: bytes) -> str:
    """OpenSSL's reason for ``data`` as a server's answer to a ClientHello,
    as the standard library's client names it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=REMOTE)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return stdlib_reason(client, incoming, data)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>", id="xmpp-failure"),
        pytest.param(b"554 5.7.0 TLS not available\r\n", id="a-line"),
        # A fatal handshake_failure alert: no handshake record comes first.
        pytest.param(b"\x15\x03\x03\x00\x02\x02\x28", id="alert-record"),
    ],
)
def test_what_is_no_server_hello_fails_the_handshake(helper: RunningHelper, answer: bytes) -> None:
    """A server that answers the ClientHello with plaintext or an alert: the
    first-byte check of the accept role does not apply, OpenSSL refuses it."""
    connection = _connect(helper)
    connection.client.settimeout(10)
    assert connection.client.recv(65536)[:1] == b"\x16"  # the ClientHello
    connection.client.sendall(answer)
    reason = _stdlib_client_error(answer)
    assert reason
    assert connection.report() == {"ok": False, "reason": f"handshake failed: {reason}"}
    assert _finish(helper, connection) == WorkerExit.HANDSHAKE_FAILED


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_a_server_leaving_during_the_handshake(helper: RunningHelper, how: str) -> None:
    connection = _connect(helper)
    connection.client.settimeout(10)
    assert connection.client.recv(65536)[:1] == b"\x16"
    if how == "reset":
        connection.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.client.close()
    report = connection.report()
    assert report == {
        "ok": False,
        "reason": "server closed during the handshake"
        if how == "fin"
        else "server socket error during the handshake",
    }
    assert helper.exit_of(connection.pid) == WorkerExit.CLIENT_GONE
    connection.channel.close()


def test_the_handshake_deadline(helper: RunningHelper) -> None:
    """A server that takes the ClientHello and says nothing."""
    connection = _connect(helper, handshake_timeout=1.0)
    start = time.monotonic()
    connection.client.settimeout(10)
    assert connection.client.recv(65536)[:1] == b"\x16"
    assert connection.client.recv(1) == b""  # the worker's exit closes its end
    assert 0.9 < time.monotonic() - start < 2.5
    assert helper.exit_of(connection.pid) == WorkerExit.DEADLINE
    with pytest.raises(EOFError):
        connection.report()
    connection.close()
