"""A worker's I/O, through the real helper: what the client and the main
process see at either end of one connection.

Each test hands a real worker (``running_helper``, spawned as the main
process spawns it) a loopback TCP connection and a plaintext channel, then
plays the client (the standard library's ``ssl``, over memory BIOs where
the test must decide when bytes reach the socket, or pyOpenSSL where it
must send an arbitrary SNI) and the main process (the channel), and checks
the report frame, the bytes and the exit status the helper reports:

* plaintext both ways, several MiB each, byte for byte, while each reader
  first stops and then reads slowly: the senders stall (back pressure)
  with the worker's memory bounded, and nothing is lost or reordered;
* a client that sends a large message and then waits for the answer gets
  it: records OpenSSL holds while the worker's plaintext buffer is full are
  decrypted once the channel drains (a regression: they stayed inside
  OpenSSL until the client sent again), nor are they lost at the client's
  end of stream;
* the early bytes of a spawn request (a ClientHello the main process read)
  are used before anything on the socket;
* how a handshake ends: plaintext instead of TLS, the client leaving,
  garbage records (the report names OpenSSL's reason), the deadline;
* how a session ends: close_notify from the client ends the channel, the
  main process closing the channel sends the client close_notify;
* SNI bytes of any kind come back intact in the report's JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from starttls_proxy.wire import Ready, WorkerExit
from tests.realservers.net import read_to_end
from tests.tlshelper.harness import (
    Connection,
    RunningHelper,
    resident_bytes,
    running_helper,
    sanitizer_runtime,
    small_buffer_pair,
    spawn_on,
    stdlib_reason,
)

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def helper(cert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHelper]:
    with running_helper(
        tmp_path_factory.mktemp("worker"),
        [
            (cert_dir / "cert.pem", cert_dir / "key.pem"),
            (cert_dir / "other.pem", cert_dir / "other-key.pem"),
        ],
    ) as running:
        assert isinstance(running.reply, Ready), running.reply
        yield running


class BioClient:
    """The standard library's TLS client over memory BIOs: the test decides
    when its bytes reach the socket."""

    def __init__(self, cert_dir: Path, server_name: str = "localhost") -> None:
        context = ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)

    def hello(self) -> bytes:
        """The ClientHello (sent by nobody yet)."""
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def finish_handshake(self, sock: socket.socket) -> None:
        """The rest of the handshake over ``sock``, the hello already sent."""
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                sock.sendall(self.outgoing.read())
                data = sock.recv(65536)
                if not data:
                    raise EOFError("the server closed during the handshake") from None
                self.incoming.write(data)
            else:
                sock.sendall(self.outgoing.read())  # the client's Finished
                return

    def handshake(self, sock: socket.socket) -> None:
        sock.sendall(self.hello())
        self.finish_handshake(sock)

    def receive(self, sock: socket.socket) -> bytes:
        """Plaintext, once a whole record came; b"" at close_notify."""
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    raise EOFError("the server closed without close_notify") from None
                self.incoming.write(data)


def _read_exactly(sock: socket.socket, size: int, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 65536))
        if not chunk:
            raise EOFError(f"{len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def _read_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    return read_to_end(sock)


def _finish(
    helper: RunningHelper, connection: Connection, client: socket.socket | None = None
) -> int:
    """Close the client (``client``: the TLS socket wrapping it) first, then
    the channel (a worker whose channel closes first answers its client with
    close_notify, which may find it gone); the worker's exit status."""
    (client or connection.client).close()
    status = helper.exit_of(connection.pid)
    connection.channel.close()
    return status


# ----------------------------------------------------------------------
# Plaintext both ways.


class TwoWays:
    """Client and main process sending to each other at once, in one
    thread; each reader reads only when told to (``step(read=...)``)."""

    def __init__(
        self, client: BioClient, sock: socket.socket, channel: socket.socket, size: int
    ) -> None:
        self.client, self.sock, self.channel = client, sock, channel
        self.up = os.urandom(size)  # client -> main process
        self.down = os.urandom(size)  # main process -> client
        self.up_given = 0  # plaintext handed to the client's TLS
        self.ciphertext = bytearray()  # the client's, not yet on the socket
        self.up_on_wire = 0
        self.down_sent = 0
        self.up_received = bytearray()
        self.down_received = bytearray()
        sock.setblocking(False)
        channel.setblocking(False)

    @property
    def progress(self) -> tuple[int, int]:
        """What each sender got rid of so far."""
        return self.up_on_wire, self.down_sent

    @property
    def done(self) -> bool:
        return len(self.up_received) == len(self.up) and len(self.down_received) == len(self.down)

    def step(self, read: int) -> None:
        """One round: send what can be sent; read at most ``read`` bytes a side."""
        if not self.ciphertext and self.up_given < len(self.up):
            chunk = self.up[self.up_given : self.up_given + 16384]
            self.client.tls.write(chunk)
            self.up_given += len(chunk)
            self.ciphertext += self.client.outgoing.read()
        readers = [self.sock, self.channel] if read else []
        writers = [self.sock] if self.ciphertext else []
        if self.down_sent < len(self.down):
            writers.append(self.channel)
        readable, writable, _ = select.select(readers, writers, [], 0.05)
        if self.sock in writable:
            with contextlib.suppress(BlockingIOError):
                sent = self.sock.send(self.ciphertext)
                del self.ciphertext[:sent]
                self.up_on_wire += sent
        if self.channel in writable:
            with contextlib.suppress(BlockingIOError):
                self.down_sent += self.channel.send(
                    self.down[self.down_sent : self.down_sent + 65536]
                )
        if self.channel in readable:
            data = self.channel.recv(read)
            assert data, "the channel ended early"
            self.up_received += data
        if self.sock in readable:
            data = self.sock.recv(read)
            assert data, "the client's connection ended early"
            self.client.incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                while True:
                    self.down_received += self.client.tls.read(65536)


def test_megabytes_both_ways_under_back_pressure_arrive_byte_exact(
    helper: RunningHelper, cert_dir: Path
) -> None:
    """8 MiB each way at once. First neither reader reads: both senders must
    stall (the worker stops reading a side whose data has nowhere to go),
    with little buffered; then both read slowly to the end."""
    sock, accepted = small_buffer_pair()
    connection = spawn_on(helper, sock, accepted)
    client = BioClient(cert_dir)
    client.handshake(sock)
    assert connection.report()["ok"] is True
    rss_before = resident_bytes(connection.pid)
    transfer = TwoWays(client, sock, connection.channel, 8 * MIB)

    # Neither side reads: both senders stall.
    stalled_since, last = time.monotonic(), transfer.progress
    deadline = time.monotonic() + 20
    while time.monotonic() - stalled_since < 0.5:
        assert time.monotonic() < deadline, f"still sending: {transfer.progress}"
        transfer.step(read=0)
        if transfer.progress != last:
            stalled_since, last = time.monotonic(), transfer.progress
    up, down = transfer.progress
    # Kernel buffers and the worker's two (256 KiB each) hold the rest.
    assert up < 2 * MIB and down < 2 * MIB, transfer.progress
    # (AddressSanitizer's quarantine holds freed memory: bounded, but more.)
    memory_bound = 4 * MIB if sanitizer_runtime() is None else 64 * MIB
    assert resident_bytes(connection.pid) - rss_before < memory_bound

    # Slow readers: a little per round, each round a millisecond apart.
    deadline = time.monotonic() + 60
    while not transfer.done:
        assert time.monotonic() < deadline, (len(transfer.up_received), len(transfer.down_received))
        transfer.step(read=16384)
        time.sleep(0.001)
    assert hashlib.sha256(transfer.up_received).digest() == hashlib.sha256(transfer.up).digest()
    assert hashlib.sha256(transfer.down_received).digest() == hashlib.sha256(transfer.down).digest()
    assert resident_bytes(connection.pid) - rss_before < memory_bound
    assert _finish(helper, connection) == WorkerExit.OK


#: Around twice the worker's plaintext buffer (256 KiB): where the client's
#: records outgrew what the buffer took while the channel was not read.
MESSAGE_SIZES = range(440_000, 540_000, 20_000)


def _tls_connection(
    helper: RunningHelper, cert_dir: Path, handshake_timeout: float = 10.0
) -> tuple[Connection, ssl.SSLSocket]:
    """A new connection whose client (the standard library's) finished its
    handshake, which the worker reported."""
    connection = helper.spawn(handshake_timeout=handshake_timeout)
    context = ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))
    connection.client.settimeout(10)
    tls = context.wrap_socket(
        connection.client, server_hostname="localhost", suppress_ragged_eofs=False
    )
    assert connection.report()["ok"] is True
    return connection, tls


@contextlib.contextmanager
def _sending(
    tls: ssl.SSLSocket, message: bytes, end: bool = False, wait: float = 10
) -> Iterator[None]:
    """The client sends ``message`` (then ends its side with a FIN if
    ``end``) from a thread, while the block reads the channel."""

    def send() -> None:
        tls.sendall(message)
        if end:
            tls.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        yield
    finally:
        sender.join(wait)


def _answered(helper: RunningHelper, connection: Connection, tls: ssl.SSLSocket) -> int:
    """The main process answers, the client reads it; the worker's exit status."""
    connection.channel.sendall(b"250 ok\r\n")
    assert tls.recv(64) == b"250 ok\r\n"
    return _finish(helper, connection, tls)


def test_records_waiting_in_openssl_are_decrypted_once_the_channel_drains(
    helper: RunningHelper, cert_dir: Path
) -> None:
    """The client sends a large message and waits for the answer; the main
    process reads only after a while (the worker's buffer fills, records
    wait inside OpenSSL), then wants the whole message before answering."""
    for size in MESSAGE_SIZES:
        connection, tls = _tls_connection(helper, cert_dir)
        message = os.urandom(size)
        with _sending(tls, message):
            time.sleep(0.2)
            assert _read_exactly(connection.channel, size, timeout=5) == message, size
        assert _answered(helper, connection, tls) == WorkerExit.OK


def test_a_buffer_the_channel_drains_at_once_does_not_stall_the_client(
    helper: RunningHelper, cert_dir: Path
) -> None:
    """Regression: when the worker's plaintext buffer was full and the
    channel then took all of it in one go, the worker waited for the client
    (which had nothing more to send) instead of decrypting the records still
    waiting in OpenSSL: a bulk upload stalled (the benchmark's SMTP DATA)."""
    size = 16 * MIB
    connection, tls = _tls_connection(helper, cert_dir)
    message = os.urandom(size)
    with _sending(tls, message, wait=20):
        # A fast reader with a large buffer: each send of the worker's is
        # taken whole.
        connection.channel.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MIB)
        assert _read_exactly(connection.channel, size, timeout=20) == message
    assert _answered(helper, connection, tls) == WorkerExit.OK


def test_what_the_client_sent_before_its_end_of_stream_all_reaches_the_channel(
    helper: RunningHelper, cert_dir: Path
) -> None:
    """The same, but the client closes its side (FIN, no close_notify) after
    the message: the channel ends only after the last byte."""
    for size in MESSAGE_SIZES:
        connection, tls = _tls_connection(helper, cert_dir)
        message = os.urandom(size)
        with _sending(tls, message, end=True):
            time.sleep(0.2)
            assert _read_to_eof(connection.channel, timeout=5) == message, size
        status = helper.exit_of(connection.pid)
        tls.close()
        connection.channel.close()
        assert status == WorkerExit.OK


# ----------------------------------------------------------------------
# The handshake.


@pytest.mark.parametrize("early_size", [1, 5, 100, -1, None], ids=str)
def test_early_bytes_are_used_before_the_socket(
    helper: RunningHelper, cert_dir: Path, early_size: int | None
) -> None:
    """The ClientHello split between the spawn request (its first
    ``early_size`` bytes; None: all of it; -1: all but the last) and the
    socket: only in that order is it a ClientHello."""
    client = BioClient(cert_dir, "other.example.test")
    hello = client.hello()
    cut = len(hello) if early_size is None else early_size % len(hello)
    connection = helper.spawn(early=hello[:cut])
    connection.client.sendall(hello[cut:])
    client.finish_handshake(connection.client)
    report = connection.report()
    assert report["ok"] is True and report["server_name"] == "other.example.test", report
    connection.channel.sendall(b"* OK\r\n")
    assert client.receive(connection.client) == b"* OK\r\n"
    assert _finish(helper, connection) == WorkerExit.OK


def test_plaintext_early_bytes_are_not_taken_for_tls(helper: RunningHelper, cert_dir: Path) -> None:
    """Early bytes come first even when the socket then has a ClientHello."""
    connection = helper.spawn(early=b"EHLO x\r\n")
    connection.client.sendall(BioClient(cert_dir).hello())
    assert connection.report() == {"ok": False, "reason": "plaintext after the TLS upgrade"}
    assert _finish(helper, connection) == WorkerExit.NOT_TLS


def test_plaintext_after_the_upgrade_is_refused(helper: RunningHelper) -> None:
    connection = helper.spawn()
    connection.client.sendall(b"EHLO x\r\n")
    assert connection.report() == {"ok": False, "reason": "plaintext after the TLS upgrade"}
    # Nothing was interpreted, nothing answered.
    assert _read_to_eof(connection.client) == b""
    assert _finish(helper, connection) == WorkerExit.NOT_TLS


@pytest.mark.parametrize("sent", ["nothing", "half-a-hello", "hello-then-reset"])
def test_a_client_leaving_during_the_handshake(
    helper: RunningHelper, cert_dir: Path, sent: str
) -> None:
    connection = helper.spawn()
    hello = BioClient(cert_dir).hello()
    if sent == "half-a-hello":
        connection.client.sendall(hello[: len(hello) // 2])
    elif sent == "hello-then-reset":
        connection.client.sendall(hello)
        # Close with a reset rather than a FIN.
        connection.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.client.close()
    report = connection.report()
    assert report["ok"] is False and report["reason"].startswith("client "), report
    if sent != "hello-then-reset":
        assert report["reason"] == "client closed during the handshake"
    assert helper.exit_of(connection.pid) == WorkerExit.CLIENT_GONE
    connection.channel.close()


def _stdlib_server_error(cert_dir: Path, data: bytes) -> str:
    """OpenSSL's reason for ``data`` as the first bytes of a handshake, as
    the standard library's server names it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = context.wrap_bio(incoming, outgoing, server_side=True)
    return stdlib_reason(server, incoming, data)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04junk", id="short-client-hello"),
        pytest.param(b"\x16\x03\x01\x00\x04\x0f\x00\x00\x00", id="certificate-verify-first"),
        pytest.param(b"\x16\x03\x01\xff\xff" + bytes(70_000), id="oversized-record"),
        pytest.param(b"\x16\x09\x09\x00\x05hello", id="unknown-version"),
    ],
)
def test_garbage_records_fail_the_handshake_with_openssls_reason(
    helper: RunningHelper, cert_dir: Path, garbage: bytes
) -> None:
    connection = helper.spawn()
    connection.client.sendall(garbage)
    report = connection.report()
    reason = _stdlib_server_error(cert_dir, garbage)
    assert reason
    assert report == {"ok": False, "reason": f"handshake failed: {reason}"}
    assert _finish(helper, connection) == WorkerExit.HANDSHAKE_FAILED


def _closed_within(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes ``sock`` within ``timeout`` (nothing else may come)."""
    if not select.select([sock], [], [], timeout)[0]:
        return False
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""
    return True


@pytest.mark.parametrize("trickle", [False, True], ids=["silent", "trickling"])
def test_the_handshake_deadline(helper: RunningHelper, cert_dir: Path, trickle: bool) -> None:
    """A client that sends nothing, or its ClientHello a byte every 100 ms
    (which would take half a minute): the worker leaves at the deadline,
    with no report."""
    connection = helper.spawn(handshake_timeout=1.0)
    start = time.monotonic()
    hello = BioClient(cert_dir).hello() if trickle else b""
    for byte in hello:
        connection.client.send(bytes((byte,)))
        if _closed_within(connection.client, 0.1):
            break
    else:
        assert _closed_within(connection.client, 5)
    # The deadline is armed in whole seconds (alarm(2)).
    assert 0.9 < time.monotonic() - start < 2.5
    assert helper.exit_of(connection.pid) == WorkerExit.DEADLINE
    with pytest.raises(EOFError):
        connection.report()
    connection.close()


def test_the_deadline_ends_with_the_handshake(helper: RunningHelper, cert_dir: Path) -> None:
    connection, tls = _tls_connection(helper, cert_dir, handshake_timeout=1.0)
    time.sleep(1.5)
    tls.sendall(b"NOOP\r\n")
    assert _read_exactly(connection.channel, 6) == b"NOOP\r\n"
    assert _answered(helper, connection, tls) == WorkerExit.OK


# ----------------------------------------------------------------------
# The end of a session.


def test_close_notify_from_the_client_ends_the_channel(
    helper: RunningHelper, cert_dir: Path
) -> None:
    connection = helper.spawn()
    client = BioClient(cert_dir)
    client.handshake(connection.client)
    assert connection.report()["ok"] is True
    client.tls.write(b"QUIT\r\n")
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.unwrap()  # close_notify written; the answer is not awaited
    connection.client.sendall(client.outgoing.read())
    # What came before close_notify, then the end.
    assert _read_to_eof(connection.channel) == b"QUIT\r\n"
    assert _finish(helper, connection) == WorkerExit.OK


def test_the_main_process_closing_the_channel_sends_close_notify(
    helper: RunningHelper, cert_dir: Path
) -> None:
    connection, tls = _tls_connection(helper, cert_dir)
    connection.channel.sendall(b"221 bye\r\n")
    connection.channel.close()
    # Ragged EOFs raise here: b"" is close_notify.
    assert read_to_end(tls) == b"221 bye\r\n"
    tls.close()
    assert helper.exit_of(connection.pid) == WorkerExit.OK


# ----------------------------------------------------------------------
# The report.


def _handshake_with_sni(helper: RunningHelper, server_name: bytes) -> dict[str, object]:
    """A pyOpenSSL client (it sends any SNI bytes); the worker's report."""
    connection = helper.spawn()
    connection.client.setblocking(True)
    tls = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), connection.client)
    tls.set_tlsext_host_name(server_name)
    tls.set_connect_state()
    tls.do_handshake()
    raw = _read_exactly(connection.channel, 4)
    frame = _read_exactly(connection.channel, int.from_bytes(raw, "big"))
    assert _finish(helper, connection) == WorkerExit.OK
    report: dict[str, object] = json.loads(frame)
    return report


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(server_name=st.binary(min_size=1, max_size=255).filter(lambda name: b"\x00" not in name))
@example(server_name=b"_xmpp-client._tcp.example.test")
@example(server_name=b"LOCALHOST.")
@example(server_name=b"xn--bcher-kva.example")
@example(server_name=b"a-" * 31 + b"a." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 61)
@example(server_name=b'quote" backslash\\ tab\t del\x7f')
@example(server_name="bücher.example".encode())
@example(server_name=bytes(range(1, 256)))
def test_any_server_name_comes_back_intact_in_the_report(
    helper: RunningHelper, server_name: bytes
) -> None:
    """OpenSSL takes any SNI bytes but NUL; the report's JSON writes each
    byte outside printable ASCII as ``\\u00XX``, so it parses and gives the
    bytes back (as Latin-1 code points)."""
    report = _handshake_with_sni(helper, server_name)
    assert report["ok"] is True
    name = report["server_name"]
    assert isinstance(name, str)
    assert name.encode("latin-1") == server_name
