"""The TLS worker: one single-use process per connection.

It is forked by the TLS helper (``zygote``) ahead of time, as a spare that
waits (``serve_spare``) for exactly two descriptors: the client's TCP socket
and its end of a plaintext channel to the main process (with
``isolation.key_server``, a third: its own connection to the key server,
which signs for it; the worker holds no private key). Then it arms the
handshake deadline, reseeds OpenSSL's random generator and enters the rest
of the sandbox (``sandbox``) before it reads a byte from the client.
It does the handshake, sends one *report* frame on the channel (a 4-byte
length and a JSON object: the TLS version, cipher and SNI, or the failure),
then pumps decrypted bytes both ways until one side closes, and exits.

TLS runs over memory BIOs (as mitmproxy's TLS layer does), so ``TLSPump``
is a pure object that tests can drive without sockets; ``run`` adds the
poll loop. Buffers are bounded in both directions: a side is only read
while the other side's outgoing buffer has room.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable

from OpenSSL import SSL
from OpenSSL._util import lib as _openssl

from protocols._base import TLSInfo
from starttls_proxy import procname, selftest
from starttls_proxy.sandbox import EXIT_SANDBOX_FAILED, Sandbox, arm_deadline
from starttls_proxy.tls_contexts import CertificateStore
from starttls_proxy.wire import (
    EXIT_CLIENT_GONE,
    EXIT_HANDSHAKE_FAILED,
    EXIT_NOT_TLS,
    EXIT_OK,
    EXIT_SPARE_UNUSED,
    EXIT_TLS_ERROR,
    MAX_ASSIGNMENT,
    Assignment,
    SpawnRequest,
    failure_report,
    handshake_report,
)

#: Each direction buffers at most this much before the worker stops reading
#: the other side (back pressure instead of unbounded memory).
BUFFER_LIMIT = 1024 * 1024
READ_SIZE = 256 * 1024
#: How long a closing worker waits for the client's FIN after its own.
LINGER_TIMEOUT = 2.0
#: First byte of a TLS handshake record (RFC 8446 section 5.1, ContentType 22).
TLS_HANDSHAKE_RECORD = 0x16


class TLSPump:
    """A TLS server connection fed with ciphertext, producing plaintext."""

    def __init__(self, context: SSL.Context, alpn: tuple[str, ...] = ()) -> None:
        self.connection = SSL.Connection(context, None)
        # Read by CertificateStore's ALPN callback.
        self.connection.set_app_data(tuple(name.encode("ascii") for name in alpn))
        self.connection.set_accept_state()
        self.handshake_done = False
        #: The client sent close_notify.
        self.closed_by_client = False

    def receive_ciphertext(self, data: bytes) -> bytes:
        """Feed client bytes; return the plaintext they carried (possibly empty).

        Raises ``SSL.Error`` when the client breaks the protocol.
        """
        if data:
            self.connection.bio_write(data)
        if not self.handshake_done:
            try:
                self.connection.do_handshake()
            except SSL.WantReadError:
                return b""
            self.handshake_done = True
        plaintext: list[bytes] = []
        while True:
            try:
                plaintext.append(self.connection.recv(READ_SIZE))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.closed_by_client = True
                break
        return b"".join(plaintext)

    def send_plaintext(self, data: bytes) -> None:
        self.connection.sendall(data)

    def close(self) -> None:
        """Queue close_notify (RFC 8446 section 6.1)."""
        with contextlib.suppress(SSL.Error):
            self.connection.shutdown()

    def take_ciphertext(self) -> bytes:
        """Everything OpenSSL wants sent to the client right now."""
        # One read usually takes all: a READ_SIZE chunk of plaintext grows
        # by a record header and tag per 16 KiB record. (A one-element join
        # returns that element, uncopied.)
        out: list[bytes] = []
        while True:
            try:
                out.append(self.connection.bio_read(2 * READ_SIZE))
            except SSL.WantReadError:
                return b"".join(out)

    def info(self) -> TLSInfo:
        name = self.connection.get_servername()
        alpn = self.connection.get_alpn_proto_negotiated()
        return TLSInfo(
            version=self.connection.get_protocol_version_name(),
            cipher=self.connection.get_cipher_name() or "",
            server_name=name.decode("ascii", "replace") if name else None,
            alpn=alpn.decode("ascii", "replace") if alpn else None,
        )


class _Side:
    """One socket of the pump with its outgoing buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.outgoing = bytearray()
        self.eof = False
        #: The peer stopped reading: what we would send it is dropped.
        self.write_closed = False

    def queue(self, data: bytes) -> None:
        """Send ``data`` now as far as the socket takes it, keep the rest."""
        if self.write_closed or not data:
            return
        if not self.outgoing:
            # A full socket (BlockingIOError) keeps it all; a broken one is
            # reported by the next flush, where the poll loop handles it.
            with contextlib.suppress(OSError):
                data = data[self.sock.send(data) :]
        self.outgoing += data

    def flush(self) -> None:
        try:
            sent = self.sock.send(self.outgoing)
        except BlockingIOError:
            return
        del self.outgoing[:sent]


def _send_all_blocking(sock: socket.socket, data: bytes) -> None:
    sock.setblocking(True)
    sock.sendall(data)
    sock.setblocking(False)


class _HandshakeError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _handshake(client: socket.socket, pump: TLSPump, early: bytes) -> bytes:
    """Run the handshake; return the plaintext that came with its last flight.

    ``early`` are client bytes the main process read before the handoff.
    Raises ``_HandshakeError``.
    """
    first = True
    while True:
        if early:
            data, early = early, b""
        else:
            select.select([client], [], [])
            try:
                data = client.recv(READ_SIZE)
            except BlockingIOError:
                continue
            except OSError as error:
                raise _HandshakeError(EXIT_CLIENT_GONE, f"client socket error: {error}") from None
        if not data:
            raise _HandshakeError(EXIT_CLIENT_GONE, "client closed during the handshake")
        if first and data[0] != TLS_HANDSHAKE_RECORD:
            # Plaintext after the upgrade reply: a pipelining client or an
            # injection attempt (CVE-2011-0411 class). Never interpret it.
            raise _HandshakeError(
                EXIT_NOT_TLS, f"plaintext after the TLS upgrade ({len(data)} bytes)"
            )
        first = False
        try:
            plaintext = pump.receive_ciphertext(data)
        except SSL.Error as error:
            with contextlib.suppress(OSError):
                _send_all_blocking(client, pump.take_ciphertext())  # the alert
            raise _HandshakeError(EXIT_HANDSHAKE_FAILED, f"handshake failed: {error}") from None
        _send_all_blocking(client, pump.take_ciphertext())
        if pump.handshake_done:
            return plaintext


def run(
    client: socket.socket,
    channel: socket.socket,
    context: SSL.Context,
    request: SpawnRequest,
    self_test: bool = False,
) -> int:
    """Serve one connection; return the process exit status."""
    client.setblocking(False)
    channel.setblocking(False)
    pump = TLSPump(context, request.alpn)
    try:
        first_plaintext = _handshake(client, pump, request.early)
    except _HandshakeError as failure:
        _send_all_blocking(channel, failure_report(failure.reason))
        return failure.status
    signal.alarm(0)  # the handshake deadline no longer applies
    if self_test and pump.info().server_name == selftest.FORBIDDEN_SYSCALL_SNI:
        selftest.forbidden_syscall()
    _send_all_blocking(channel, handshake_report(pump.info()) + first_plaintext)
    return _pump(_Side(client), _Side(channel), pump)


def _pump(client: _Side, channel: _Side, pump: TLSPump) -> int:
    while True:
        if pump.closed_by_client:
            client.eof = True
        if client.eof and not channel.outgoing:
            return EXIT_OK
        if channel.eof and not client.outgoing:
            _linger(client.sock)
            return EXIT_OK
        poller = select.poll()
        for side, other in ((client, channel), (channel, client)):
            mask = 0
            if not side.eof and len(other.outgoing) < BUFFER_LIMIT:
                mask |= select.POLLIN
            if side.outgoing:
                mask |= select.POLLOUT
            # A side with nothing to wait for stays out of the poll set, or
            # its lasting POLLHUP would make the loop spin.
            if mask:
                poller.register(side.sock, mask)
        for fd, events in poller.poll():
            side = client if fd == client.sock.fileno() else channel
            if events & (select.POLLOUT | select.POLLERR | select.POLLHUP) and side.outgoing:
                try:
                    side.flush()
                except OSError:
                    if side is client:
                        return EXIT_CLIENT_GONE
                    # The main process closed the channel; what it sent
                    # before (a final reply) is still to be read and
                    # delivered, so keep going until its EOF.
                    channel.write_closed = True
                    channel.outgoing.clear()
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and not side.eof:
                status = _read(side, client, channel, pump)
                if status is not None:
                    return status


def _linger(sock: socket.socket) -> None:
    """FIN, then read until the client's (see ``Endpoint.close_lingering``)."""
    deadline = time.monotonic() + LINGER_TIMEOUT
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], remaining)[0] or not sock.recv(READ_SIZE):
                return


def _read(side: _Side, client: _Side, channel: _Side, pump: TLSPump) -> int | None:
    try:
        data = side.sock.recv(READ_SIZE)
    except BlockingIOError:
        return None
    except OSError:
        data = b""
    if side is client:
        if not data:
            client.eof = True
            return None
        try:
            channel.queue(pump.receive_ciphertext(data))
        except SSL.Error:
            return EXIT_TLS_ERROR
        client.queue(pump.take_ciphertext())
    elif data:
        pump.send_plaintext(data)
        client.queue(pump.take_ciphertext())
    else:
        channel.eof = True
        pump.close()
        client.queue(pump.take_ciphertext())
    return None


def _reseed_rng() -> None:
    """Mix fresh kernel randomness into OpenSSL's DRBG.

    OpenSSL notices a fork by a change of PID, and every worker is PID 1 of
    its namespace (the LibreSSL-on-Linux trap of the titus author's post):
    never rely on it.
    """
    seed = os.getrandom(48)
    _openssl.RAND_add(seed, len(seed), float(len(seed)))


class _SandboxError(Exception):
    """A layer of the sandbox could not be entered."""


def _entered(layers: Callable[[], list[int]]) -> list[int]:
    """``layers()`` (``Sandbox.enclose`` or ``confine``); its failure as a ``_SandboxError``."""
    try:
        return layers()
    except Exception as error:
        raise _SandboxError(str(error)) from None


def serve_spare(
    assignment_fd: int,
    store: CertificateStore,
    sandbox: Sandbox,
    uid: int | None,
    attach: Callable[[int], None] | None = None,
) -> None:
    """Entry point in the forked child: wait as a spare, then serve one
    connection; never returns.

    A spare enters the outer layers (``Sandbox.enclose``) while there is no
    connection yet, then waits on ``assignment_fd`` for an ``Assignment``
    with the connection's descriptors: the client socket, the plaintext
    channel and, with the key server, its own connection to it, which
    ``attach`` (``provider.Attachment``) makes OpenSSL sign through. It
    confines itself before it reads a byte from the client.
    """
    status = EXIT_SPARE_UNUSED
    try:
        self_test = sandbox.config.self_test
        keep = [assignment_fd, selftest.open_status()] if self_test else [assignment_fd]
        report: dict[str, object] = {}
        checkpoints = selftest.checkpoints(report) if self_test else None
        assignment_fd, *status_fd = _entered(
            lambda: sandbox.enclose(uid, keep, checkpoints=checkpoints)
        )
        with socket.socket(fileno=assignment_fd) as assignment:
            message, received, _, _ = socket.recv_fds(assignment, MAX_ASSIGNMENT, 3)
        if not message:  # the helper is gone, or retired its spares
            return
        status = EXIT_TLS_ERROR
        procname.name_process(procname.WORKER)
        job = Assignment.decode(message)
        # Armed first: a client cannot stretch the handshake by trickling
        # bytes, and nothing it sends can cancel the alarm.
        arm_deadline(job.request.handshake_timeout)
        _reseed_rng()
        fds = _entered(
            lambda: sandbox.confine(
                [*received[:2], *status_fd, *received[2:]], checkpoints=checkpoints
            )
        )
        if attach is not None:
            attach(fds.pop())
        if self_test:
            selftest.after_sandbox(report, fds[2], fds[0], job.siblings)
        client = socket.socket(fileno=fds[0])
        channel = socket.socket(fileno=fds[1])
        context = store.context_for(job.request.server_name_hint)
        status = run(client, channel, context, job.request, self_test)
    except _SandboxError as error:
        print(f"TLS worker: cannot enter its sandbox: {error}", file=sys.stderr, flush=True)
        status = EXIT_SANDBOX_FAILED
    except BaseException:
        # Last words of a crashed worker go to the helper's stderr (the
        # proxy's log); the main process only sees the channel close.
        traceback.print_exc()
    finally:
        os._exit(status)
