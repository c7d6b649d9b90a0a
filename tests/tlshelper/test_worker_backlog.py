"""What OpenSSL writes on its own while a worker reads, for a network peer
that does not read it: through the real helper.

After a TLS 1.2 handshake, every record holding a renegotiation attempt
(a client's ClientHello on accept, a server's HelloRequest on connect)
makes OpenSSL queue a warning alert (no_renegotiation) for the peer. A
peer that sent such records and read nothing grew the worker's outgoing
buffer without bound, until the worker's memory limit ended it as a crash
(a regression). The worker stops reading that peer instead: its sends
stall (TCP back pressure) with the worker's memory bounded, and once it
reads, the worker reads it again and every record gets its answer.

The test is the peer: pyOpenSSL for the handshake, then its own records
with the session's keys (RFC 5246 section 6.3, AES-128-GCM), since
OpenSSL sends no renegotiation attempt after a refusal.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import select
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from OpenSSL import SSL

from starttls_proxy.wire import TLSRole, WorkerExit
from tests.peer_certs import Authority
from tests.tlshelper.harness import (
    Connection,
    RunningHelper,
    helper_trusting,
    resident_bytes,
    sanitizer_runtime,
    small_buffer_pair,
    spawn_on,
)

MIB = 1024 * 1024
#: The remote server's name in the connect role.
REMOTE = "remote.example"
#: Content types (RFC 5246 section 6.2.1).
ALERT, HANDSHAKE, APPLICATION_DATA = 21, 22, 23
TLS12 = b"\x03\x03"
#: An empty handshake message: a ClientHello's header to a server, a
#: HelloRequest to a client.
RENEGOTIATION = {TLSRole.ACCEPT: b"\x01\x00\x00\x00", TLSRole.CONNECT: b"\x00\x00\x00\x00"}
#: The worker's encrypted alert: header, explicit nonce, level and
#: description, GCM tag.
ALERT_RECORD = 5 + 8 + 2 + 16


@pytest.fixture(scope="module")
def helper(
    cert_dir: Path,
    peer_authorities: tuple[Authority, Authority],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningHelper]:
    directory = tmp_path_factory.mktemp("backlog")
    certificates = [(cert_dir / "cert.pem", cert_dir / "key.pem")]
    with helper_trusting(directory, certificates, peer_authorities) as running:
        yield running


def _p_sha256(secret: bytes, seed: bytes, size: int) -> bytes:
    """The TLS 1.2 PRF's expansion (RFC 5246 section 5)."""
    out, a = b"", seed
    while len(out) < size:
        a = hmac.new(secret, a, hashlib.sha256).digest()
        out += hmac.new(secret, a + seed, hashlib.sha256).digest()
    return out[:size]


class Records:
    """The peer's record layer, continued by hand after its handshake."""

    def __init__(self, tls: SSL.Connection, server: bool) -> None:
        master, server_random, client_random = (
            tls.master_key(),
            tls.server_random(),
            tls.client_random(),
        )
        assert master and server_random and client_random
        block = _p_sha256(master, b"key expansion" + server_random + client_random, 40)
        # The client's key, the server's; the client's implicit nonce, the server's.
        self.aead = AESGCM(block[16:32] if server else block[:16])
        self.salt = block[36:40] if server else block[32:36]
        self.sequence = 1  # 0 was the peer's Finished

    def seal(self, content_type: int, plaintext: bytes) -> bytes:
        explicit = struct.pack("!Q", self.sequence)
        self.sequence += 1
        header = bytes([content_type]) + TLS12
        sealed = self.aead.encrypt(
            self.salt + explicit, plaintext, explicit + header + struct.pack("!H", len(plaintext))
        )
        return header + struct.pack("!H", 8 + len(sealed)) + explicit + sealed


def _session(
    helper: RunningHelper, certificate: tuple[Path, Path], role: TLSRole
) -> tuple[Connection, Records]:
    """A TLS 1.2 session with a worker in ``role``; the test is its peer,
    presenting ``certificate`` as the server in the connect role."""
    ours, theirs = small_buffer_pair()
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
    if role is TLSRole.CONNECT:
        context.use_certificate_chain_file(str(certificate[0]))
        context.use_privatekey_file(str(certificate[1]))
        connection = spawn_on(helper, ours, theirs, role=role, peer_name=REMOTE, peer_trust=1)
    else:
        connection = spawn_on(helper, ours, theirs)
    # pyOpenSSL takes a socket with a timeout for a non-blocking one; the
    # worker's handshake deadline bounds the wait.
    ours.setblocking(True)
    tls = SSL.Connection(context, ours)
    if role is TLSRole.CONNECT:
        tls.set_accept_state()
    else:
        tls.set_connect_state()
    tls.do_handshake()
    assert connection.report()["ok"] is True
    return connection, Records(tls, server=role is TLSRole.CONNECT)


def _bounded(pid: int, rss_before: int) -> bool:
    """Whether the worker's memory grew by little. AddressSanitizer's
    quarantine keeps up to 256 MiB freed, and every record here frees a read
    buffer (SSL_MODE_RELEASE_BUFFERS): there, the stall is the check."""
    return sanitizer_runtime() is not None or resident_bytes(pid) - rss_before < 4 * MIB


@pytest.mark.parametrize("role", [TLSRole.ACCEPT, TLSRole.CONNECT], ids=["accept", "connect"])
def test_a_client_that_never_reads_cannot_grow_a_worker_with_alerts(
    helper: RunningHelper,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
    role: TLSRole,
) -> None:
    """The peer ("client" to the pump, a remote server on connect) sends
    renegotiation attempts and reads nothing: its sends stall with the
    worker's memory bounded. Then it reads: every attempt gets its alert,
    and what it sends after them reaches the channel."""
    certificate = peer_authorities[0].issue(dns=[REMOTE]).write(tmp_path, "remote")
    connection, records = _session(helper, certificate, role)
    peer, channel = connection.client, connection.channel
    peer.setblocking(False)
    channel.setblocking(False)
    rss_before = resident_bytes(connection.pid)
    unsent, on_wire, attempts = bytearray(), 0, 0

    def send() -> None:
        nonlocal on_wire
        with contextlib.suppress(BlockingIOError):
            sent = peer.send(unsent)
            del unsent[:sent]
            on_wire += sent

    stalled_since = time.monotonic()
    deadline = stalled_since + 5
    while time.monotonic() - stalled_since < 0.5:
        assert time.monotonic() < deadline, (
            f"the worker still reads: {on_wire} bytes taken, RSS {resident_bytes(connection.pid)}"
        )
        if not unsent:
            unsent += b"".join(records.seal(HANDSHAKE, RENEGOTIATION[role]) for _ in range(1000))
            attempts += 1000
        before = on_wire
        select.select([], [peer], [], 0.05)
        send()
        if on_wire != before:
            stalled_since = time.monotonic()
    # The worker's two buffers (256 KiB each) and the kernel's hold the rest.
    assert on_wire < 2 * MIB
    assert _bounded(connection.pid, rss_before)

    unsent += records.seal(APPLICATION_DATA, b"PING\r\n")
    alerts, upstream = bytearray(), b""
    deadline = time.monotonic() + 5
    while len(alerts) < attempts * ALERT_RECORD or upstream != b"PING\r\n":
        assert time.monotonic() < deadline, (len(alerts), attempts * ALERT_RECORD, upstream)
        readable, _, _ = select.select([peer, channel], [peer] if unsent else [], [], 0.05)
        send()
        if peer in readable:
            data = peer.recv(65536)
            assert data, "the worker closed the connection"
            alerts += data
        if channel in readable:
            upstream += channel.recv(64)
    header = bytes([ALERT]) + TLS12 + struct.pack("!H", ALERT_RECORD - 5)
    assert len(alerts) == attempts * ALERT_RECORD
    assert all(
        alerts[at : at + len(header)] == header for at in range(0, len(alerts), ALERT_RECORD)
    )
    assert _bounded(connection.pid, rss_before)

    peer.close()
    status = helper.exit_of(connection.pid)
    channel.close()
    assert status == WorkerExit.OK
