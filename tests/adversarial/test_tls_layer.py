"""The TLS layer under attack, against the live proxy's C workers: client
renegotiation, 0-RTT early data, a ClientHello cut into 1-byte records, an
alert flood, and handshakes that stall at each flight.

Sources: RFC 5746 and CVE-2009-3555 (renegotiation; a server that lets a
client renegotiate also hands it a cheap CPU-exhaustion lever, the THC
SSL-DoS tool); RFC 8446 section 8 and appendix E.5 (0-RTT data can be
replayed; a STARTTLS server has no use for it); RFC 8446 section 5.1
(handshake messages may be cut across records, which parsers have got
wrong); CVE-2016-8610 "SSL Death Alert" (an endless stream of warning
alerts kept OpenSSL busy); slow handshakes as in slowloris. In every case the
session ends cleanly or completes, the worker's exit is counted for what it
was, and the proxy serves the next client at once; its teardown fails on
any traceback in its log.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from OpenSSL import SSL

from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_smtp_reply
from tests.realservers.memorytls import MemoryTLS
from tests.realservers.metrics import scrape, total
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener

#: Seconds a worker has for its handshake here (the default is 30).
HANDSHAKE = 1.5
#: How long a test waits for the proxy to end a connection, at most.
WAIT = 15.0

_sources = (f"127.0.8.{n}" for n in range(1, 255))


@pytest.fixture(scope="module")
def proxy(module_proxy: StartProxy, postfix: PostfixInstance, metrics_port: int) -> ProxyProcess:
    return module_proxy(
        [
            listener(
                "smtp",
                postfix.plain_port,
                backend={"identity": "xclient"},
                timeouts={"handshake": HANDSHAKE},
            )
        ],
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )


def _upgrade_asked(proxy: ProxyProcess) -> socket.socket:
    """A connection whose STARTTLS was answered: the next bytes are TLS."""
    sock = proxy.connect("smtp", next(_sources))
    sock.settimeout(WAIT)
    assert read_smtp_reply(sock).startswith(b"220 ")
    sock.sendall(b"STARTTLS\r\n")
    assert read_smtp_reply(sock).startswith(b"220 ")
    return sock


def _ended(sock: socket.socket) -> bool:
    """Whether the proxy ended the connection (EOF or reset) within ``WAIT``."""
    deadline = time.monotonic() + WAIT
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            continue
    return False


def _worker_exits(metrics_port: int, reason: str) -> float:
    return total(scrape(metrics_port), "starttls_proxy_worker_exits_total", reason=reason)


def _still_serves(proxy: ProxyProcess, certs: CertFiles) -> None:
    sock = _upgrade_asked(proxy)
    with certs.client_context().wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(b"EHLO client.test\r\n")
        assert read_smtp_reply(tls).startswith(b"250-")
        tls.sendall(b"QUIT\r\n")
        assert read_smtp_reply(tls).startswith(b"221")


def test_client_renegotiation_is_refused(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    """RFC 5746 / CVE-2009-3555: a TLS 1.2 client that asks to renegotiate
    gets no second handshake; the session ends."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.load_verify_locations(str(test_certs.ca))
    sock = _upgrade_asked(proxy)
    sock.settimeout(None)  # pyOpenSSL wants a blocking socket
    tls = SSL.Connection(context, sock)
    tls.set_tlsext_host_name(b"localhost")
    tls.set_connect_state()
    tls.do_handshake()
    assert tls.get_protocol_version_name() == "TLSv1.2"
    tls.send(b"EHLO client.test\r\n")
    assert tls.recv(4096).startswith(b"250")
    assert tls.renegotiate()
    with pytest.raises((SSL.Error, OSError)):
        tls.do_handshake()
        # A server that ignores the request would answer this command.
        tls.send(b"NOOP\r\n")
        while tls.recv(4096):
            pass
    tls.close()
    _still_serves(proxy, test_certs)


def test_early_data_is_not_accepted(
    proxy: ProxyProcess, test_certs: CertFiles, tmp_path: Path
) -> None:
    """RFC 8446 section 8: 0-RTT data may be replayed; the proxy's sessions
    never take it (a resumed client's early data is refused or not offered)."""
    session, early = tmp_path / "session.pem", tmp_path / "early.txt"
    early.write_bytes(b"EHLO early.test\r\n")
    port = proxy.ports["smtp"]
    client = f"openssl s_client -starttls smtp -connect 127.0.0.1:{port} -tls1_3"
    client += f" -CAfile {test_certs.ca} -servername localhost"

    def run(options: str) -> str:
        # The pause lets the session ticket arrive before QUIT ends it.
        script = f"(sleep 1; printf 'QUIT\\r\\n') | {client} {options}"
        done = subprocess.run(["sh", "-c", script], capture_output=True, timeout=WAIT, check=False)
        return done.stdout.decode(errors="replace")

    first = run(f"-sess_out {session}")
    assert session.exists(), first[-2000:]
    output = run(f"-sess_in {session} -early_data {early}")
    assert "Early data was accepted" not in output, output[-2000:]
    _still_serves(proxy, test_certs)


def _records(content_type: int, payload: bytes, size: int) -> bytes:
    """``payload`` cut into TLS records of ``size`` octets."""
    return b"".join(
        struct.pack("!BHH", content_type, 0x0303, len(piece)) + piece
        for piece in (payload[i : i + size] for i in range(0, len(payload), size))
    )


def test_a_client_hello_in_one_byte_records_completes(
    proxy: ProxyProcess, test_certs: CertFiles
) -> None:
    """RFC 8446 section 5.1: a handshake message may be cut across records;
    cut into records of one octet each, the ClientHello still works."""
    sock = _upgrade_asked(proxy)
    client = MemoryTLS(sock, test_certs)
    hello = client.client_hello()
    content_type, _, length = struct.unpack_from("!BHH", hello)
    assert content_type == 22 and len(hello) == 5 + length
    sock.sendall(_records(22, hello[5:], 1))
    client.handshake()
    client.sendall(b"EHLO client.test\r\n")
    assert client.recv(4096).startswith(b"250")
    sock.close()


@pytest.mark.parametrize(
    ("when", "exit_reason"),
    [("before the ClientHello", "not_tls"), ("after the ClientHello", "handshake_failed")],
)
def test_an_alert_flood_ends_the_handshake(
    proxy: ProxyProcess, test_certs: CertFiles, metrics_port: int, when: str, exit_reason: str
) -> None:
    """CVE-2016-8610 ("SSL Death Alert"): warning alerts without end end the
    worker's handshake, not its patience. Before any ClientHello the bytes
    are not TLS to it at all."""
    before = _worker_exits(metrics_port, exit_reason)
    sock = _upgrade_asked(proxy)
    if when == "after the ClientHello":
        sock.sendall(MemoryTLS(sock, test_certs).client_hello())
    warning_user_canceled = struct.pack("!BB", 1, 90)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        # Cut off while still sending is the point.
        sock.sendall(_records(21, warning_user_canceled * 10_000, 2))
    assert _ended(sock)
    sock.close()
    deadline = time.monotonic() + WAIT
    while _worker_exits(metrics_port, exit_reason) == before:
        assert time.monotonic() < deadline, f"no {exit_reason} exit counted for the flood"
        time.sleep(0.1)
    _still_serves(proxy, test_certs)


@pytest.mark.parametrize(
    "stall", ["before the ClientHello", "after the ClientHello", "after the server's flight"]
)
def test_a_stalled_handshake_is_cut_by_its_deadline(
    proxy: ProxyProcess, test_certs: CertFiles, metrics_port: int, stall: str
) -> None:
    """Slowloris in the handshake: wherever the client stops, the worker's
    deadline (``timeouts.handshake``) ends it, counted as a timeout."""
    before = _worker_exits(metrics_port, "timeout")
    sock = _upgrade_asked(proxy)
    client = MemoryTLS(sock, test_certs)
    if stall != "before the ClientHello":
        sock.sendall(client.client_hello())
    if stall == "after the server's flight":
        assert sock.recv(65536)  # ServerHello and the rest of the server's first flight
    assert _ended(sock)
    sock.close()
    deadline = time.monotonic() + WAIT
    while _worker_exits(metrics_port, "timeout") == before:
        assert time.monotonic() < deadline, "the stalled worker's exit was not counted"
        time.sleep(0.1)
    _still_serves(proxy, test_certs)
