"""End to end: a connecting XMPP server with a real client certificate ->
the real proxy (helper, sandboxed workers, key server) on xmpp-server
listeners -> a backend that records what it gets.

The peer is a raw server-to-server stream over the standard library's
``ssl`` (slixmpp does not speak s2s), presenting certificates made by two
test peer_authorities (``tests.peer_certs``), one of which the listeners trust.
No real XMPP server consumes the PROXY v2 SSL TLVs (Prosody's mod_net_proxy
and ejabberd skip them), so the backend here is a small recording server
that reads the PROXY header and answers the stream as a server would: what
the test checks is what a backend is told, and that a refused peer never
reaches it. The federation with real servers on both sides is
``tests/e2e``'s s2s federation fixture's.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from protocols import proxy_header
from tests.peer_certs import Authority
from tests.pp2 import ssl_tlv
from tests.realservers.metrics import only, scrape, total
from tests.realservers.proxy import ProxyProcess, StartProxy, listener
from tests.realservers.xmpp import PROCEED, STARTTLS, XMPPStream

LOCAL = "example.com"
PEER = "a.example"
DB = "jabber:server:dialback"


def s2s_header(sender: str | None = PEER) -> bytes:
    claimed = f"from='{sender}' " if sender is not None else ""
    return (
        f"<?xml version='1.0'?><stream:stream {claimed}to='{LOCAL}' xmlns='jabber:server' "
        f"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='{DB}' version='1.0'>"
    ).encode()


BACKEND_REPLY = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"id='backend-stream' from='example.com' version='1.0'>"
    b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
)
SASL = b"urn:ietf:params:xml:ns:xmpp-sasl"
#: SASL EXTERNAL for the peer's domain, and the success the backend answers it.
EXTERNAL = b"<auth xmlns='%s' mechanism='EXTERNAL'>YS5leGFtcGxl</auth>" % SASL
SUCCESS = b"<success xmlns='%s'/>" % SASL


@dataclass
class Recorded:
    """One connection the backend got: its PROXY header and the stream after it."""

    header: bytes
    stream: bytes


@dataclass
class RecordingBackend:
    """Reads a PROXY v2 header and a stream header, answers as a server does,
    then records the stream until the proxy closes it, granting SASL."""

    server: socket.socket
    connections: list[Recorded] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.server.getsockname()[1]
        return port

    def serve(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(sock,), daemon=True).start()

    def _one(self, sock: socket.socket) -> None:
        with sock:
            sock.settimeout(10)
            data = b""
            with contextlib.suppress(OSError):
                while len(data) < 16 or len(data) < 16 + struct.unpack_from("!H", data, 14)[0]:
                    data += sock.recv(4096)
                length = 16 + struct.unpack_from("!H", data, 14)[0]
                while b">" not in data[length:]:
                    data += sock.recv(4096)
                recorded = Recorded(data[:length], data[length:])
                self.connections.append(recorded)
                sock.sendall(BACKEND_REPLY)
                while chunk := sock.recv(4096):  # until the peer leaves
                    recorded.stream += chunk
                    if b"<auth " in chunk:
                        sock.sendall(SUCCESS)


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    server = socket.create_server(("127.0.0.1", 0))
    recording = RecordingBackend(server)
    thread = threading.Thread(target=recording.serve, daemon=True)
    thread.start()
    yield recording
    server.close()


@pytest.fixture(scope="module")
def proxy(
    module_proxy: StartProxy,
    backend: RecordingBackend,
    peer_authorities: tuple[Authority, Authority],
    tmp_path_factory: pytest.TempPathFactory,
    metrics_port: int,
) -> ProxyProcess:
    trust = tmp_path_factory.mktemp("peer-trust") / "peers.pem"
    trust.write_bytes(peer_authorities[0].pem())
    trust.parent.chmod(0o755)
    s2s: dict[str, Any] = {
        "protocol": "xmpp-server",
        "hostname": LOCAL,
        "backend": {"identity": "proxy-v2"},
    }
    return module_proxy(
        [
            listener(
                "s2s-refuse",
                backend.port,
                peer_certificates={"trust": str(trust), "on_failure": "refuse"},
                **s2s,
            ),
            listener(
                "s2s-dialback",
                backend.port,
                peer_certificates={"trust": str(trust), "on_failure": "dialback"},
                **s2s,
            ),
            listener(
                "s2s-direct",
                backend.port,
                tls="implicit",
                peer_certificates={"trust": str(trust), "on_failure": "refuse"},
                **s2s,
            ),
        ],
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )


def _context(
    authority: Authority | None, tmp_path: Path, dns: tuple[str, ...] = (PEER,)
) -> ssl.SSLContext:
    """A connecting server's TLS client: its certificate (none without
    ``authority``); the proxy's own is not what these tests look at."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if authority is not None:
        cert, key = authority.issue(dns=dns, xmpp=dns).write(tmp_path, "peer")
        context.load_cert_chain(cert, key)
    return context


def _s2s(
    proxy: ProxyProcess,
    name: str,
    context: ssl.SSLContext,
    header: bytes | None = None,
    source: str = "127.0.0.5",
) -> bytes:
    """STARTTLS (or direct TLS), the restarted stream; what came back after it."""
    stream = XMPPStream(proxy.connect(name, source))
    if name != "s2s-direct":
        stream.send(s2s_header())
        stream.read_until(b"</stream:features>")
        stream.send(STARTTLS)
        stream.read_until(PROCEED)
    stream.wrap(context, LOCAL)
    try:
        stream.send(header or s2s_header())
        return stream.read_until(b"</stream:features>")
    except ConnectionError:
        return stream.buffer  # all the proxy sent before it closed
    finally:
        stream.close()


def _ssl(recorded: Recorded) -> tuple[int, int, dict[int, bytes], str]:
    """The SSL TLV's client flags, verify, sub-TLVs; and the client address."""
    return (*ssl_tlv(recorded.header), socket.inet_ntoa(recorded.header[16:20]))


@pytest.mark.parametrize("name", ["s2s-refuse", "s2s-direct"])
def test_a_verified_peer_reaches_the_backend_which_is_told_its_domain(
    proxy: ProxyProcess,
    backend: RecordingBackend,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
    name: str,
) -> None:
    before = len(backend.connections)
    got = _s2s(proxy, name, _context(peer_authorities[0], tmp_path))
    assert got.endswith(b"<dialback xmlns='urn:xmpp:features:dialback'/></stream:features>")
    recorded = backend.connections[before]
    flags, verify, sub, client = _ssl(recorded)
    assert flags == (
        proxy_header.PP2_CLIENT_SSL
        | proxy_header.PP2_CLIENT_CERT_CONN
        | proxy_header.PP2_CLIENT_CERT_SESS
    )
    assert verify == 0
    assert sub[proxy_header.PP2_SUBTYPE_SSL_CN] == PEER.encode()
    assert client == "127.0.0.5"
    assert recorded.stream.startswith(s2s_header())
    proxy.wait_for_log(f"peer certificate: verified for {PEER}")


@pytest.mark.parametrize(
    ("authority", "dns", "header", "condition", "result"),
    [
        (1, (PEER,), None, b"not-authorized", "untrusted"),
        (None, (PEER,), None, b"not-authorized", "no_certificate"),
        (0, ("b.example",), None, b"invalid-from", "name_mismatch"),
        (0, (PEER,), s2s_header(sender=None), b"improper-addressing", "name_mismatch"),
    ],
    ids=["untrusted", "no-certificate", "another-domain", "no-from"],
)
def test_refuse_ends_a_peer_that_fails_and_the_backend_never_hears_of_it(
    proxy: ProxyProcess,
    backend: RecordingBackend,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
    metrics_port: int,
    authority: int | None,
    dns: tuple[str, ...],
    header: bytes | None,
    condition: bytes,
    result: str,
) -> None:
    name = "s2s-refuse"
    metric = "starttls_proxy_s2s_peer_verification_total"
    counted = total(scrape(metrics_port), metric, listener=name, result=result)
    before = len(backend.connections)
    issuer = None if authority is None else peer_authorities[authority]
    got = _s2s(proxy, name, _context(issuer, tmp_path, dns), header)
    assert b"<" + condition + b" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in got
    # The peer's administrator reads why (RFC 6120 section 4.9.2).
    assert b"xml:lang='en'>peer certificate: %s (" % result.encode() in got
    assert len(backend.connections) == before
    assert total(scrape(metrics_port), metric, listener=name, result=result) == counted + 1


def test_a_verified_peer_cannot_restart_its_stream_from_another_domain(
    proxy: ProxyProcess,
    backend: RecordingBackend,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
    metrics_port: int,
) -> None:
    """RFC 6120 section 6.4.6: after SASL EXTERNAL the peer restarts its
    stream; the backend, told a.example, never reads one from another
    domain, and the certificate is counted once."""
    metric = "starttls_proxy_s2s_peer_verification_total"
    counted = total(scrape(metrics_port), metric, listener="s2s-refuse", result="verified")
    before = len(backend.connections)
    stream = XMPPStream(proxy.connect("s2s-refuse", "127.0.0.5"))
    stream.send(s2s_header())
    stream.read_until(b"</stream:features>")
    stream.send(STARTTLS)
    stream.read_until(PROCEED)
    stream.wrap(_context(peer_authorities[0], tmp_path), LOCAL)
    try:
        stream.send(s2s_header())
        stream.read_until(b"</stream:features>")
        stream.send(EXTERNAL)
        stream.read_until(SUCCESS)
        stream.send(s2s_header(sender="evil.example"))
        got = stream.read_until(b"</stream:stream>")
    finally:
        stream.close()
    assert b"<invalid-from xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in got
    assert b">restarted stream from 'evil.example', verified 'a.example'</text>" in got
    recorded = backend.connections[before]
    assert EXTERNAL in recorded.stream
    assert b"evil.example" not in recorded.stream
    after = total(scrape(metrics_port), metric, listener="s2s-refuse", result="verified")
    assert after == counted + 1


def test_dialback_lets_a_peer_without_a_certificate_through_unverified(
    proxy: ProxyProcess, backend: RecordingBackend, tmp_path: Path, metrics_port: int
) -> None:
    before = len(backend.connections)
    got = _s2s(proxy, "s2s-dialback", _context(None, tmp_path))
    assert got.endswith(b"</stream:features>")
    flags, verify, sub, _ = _ssl(backend.connections[before])
    assert flags == proxy_header.PP2_CLIENT_SSL
    assert verify != 0
    assert proxy_header.PP2_SUBTYPE_SSL_CN not in sub
    samples = scrape(metrics_port)
    assert (
        only(
            samples,
            "starttls_proxy_s2s_peer_verification_total",
            listener="s2s-dialback",
            result="no_certificate",
        )
        >= 1
    )


def test_dialback_lets_an_untrusted_peer_through_with_its_certificate_unverified(
    proxy: ProxyProcess,
    backend: RecordingBackend,
    peer_authorities: tuple[Authority, Authority],
    tmp_path: Path,
) -> None:
    before = len(backend.connections)
    _s2s(proxy, "s2s-dialback", _context(peer_authorities[1], tmp_path))
    flags, verify, sub, _ = _ssl(backend.connections[before])
    assert flags & proxy_header.PP2_CLIENT_CERT_CONN and verify != 0
    assert proxy_header.PP2_SUBTYPE_SSL_CN not in sub
    proxy.wait_for_log("peer certificate: untrusted (unable to get local issuer certificate)")
