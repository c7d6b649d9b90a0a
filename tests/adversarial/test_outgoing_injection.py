"""Response injection on an outgoing stream (``xmpp-server-out``): the
remote server, or a man in the middle before TLS, adds stanzas after
``<proceed/>``. The local server must never read them as if they came
under TLS (the CVE-2011-0411 class, the other way round; Poddebniak et al.,
"Why TLS is better without STARTTLS", USENIX Security 2021, section 5).

The remote is a scripted fake on loopback that does STARTTLS with a
certificate for its domain from the test CA; the test plays the local
server against the real proxy."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator

import pytest
import trustme

from tests.realservers.certs import CertFiles, write_test_certs
from tests.realservers.net import Channel, read_to_end, read_until
from tests.realservers.proxy import ProxyProcess, StartProxy, listener
from tests.realservers.tap import FakeBackend

REMOTE = "remote.example"
LOCAL_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"from='local.example' to='remote.example' version='1.0'>"
)
REMOTE_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"id='r3m0t3' from='remote.example' to='local.example' version='1.0'>"
)
STARTTLS_FEATURES = (
    b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>"
)
PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
INJECTED = (
    b"<db:result from='remote.example' to='local.example' type='valid'/>"
    b"<message from='admin@remote.example' to='a@local.example'><body>INJECTED</body></message>"
)
HONEST = b"<message from='b@remote.example' to='a@local.example'><body>honest</body></message>"


def _read_until(channel: Channel, end: bytes) -> bytes:
    return read_until(channel, lambda data: end in data)


def _injecting_remote(certs: CertFiles) -> FakeBackend:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)

    def script(sock: socket.socket) -> None:
        _read_until(sock, b'version="1.0">')  # the proxy's own stream header
        sock.sendall(REMOTE_HEADER + STARTTLS_FEATURES)
        _read_until(sock, b"/>")  # <starttls/>
        # The proceed and the injection in one segment, as one write.
        sock.sendall(PROCEED + INJECTED)
        with context.wrap_socket(sock, server_side=True) as tls:
            _read_until(tls, b"version='1.0'>")  # the local server's header
            tls.sendall(REMOTE_HEADER + b"<stream:features/>" + HONEST + b"</stream:stream>")
            with contextlib.suppress(OSError):
                read_to_end(tls)

    return FakeBackend(script)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA) -> Iterator[FakeBackend]:
    certs = write_test_certs(tmp_path_factory.mktemp("remote"), test_ca, (REMOTE,))
    with _injecting_remote(certs) as backend:
        yield backend


@pytest.fixture(scope="module")
def proxy(module_proxy: StartProxy, remote: FakeBackend, test_certs: CertFiles) -> ProxyProcess:
    outgoing = listener(
        "s2s-out",
        0,
        protocol="xmpp-server-out",
        domains=["local.example"],
        peer_certificates={"trust": str(test_certs.ca), "on_failure": "refuse"},
        routes={"static": {REMOTE: [{"address": f"127.0.0.1:{remote.port}"}]}},
    )
    del outgoing["backend"]
    return module_proxy([outgoing])


def test_stanzas_pipelined_after_proceed_never_reach_the_local_server(
    proxy: ProxyProcess, remote: FakeBackend
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.ports["s2s-out"]), timeout=5) as local:
        local.sendall(LOCAL_HEADER)
        answer = _read_until(local, b"</stream:stream>")
    # The remote's stream under TLS came through, and its stanza ...
    assert REMOTE_HEADER in answer and HONEST in answer
    # ... but nothing it said in plaintext after <proceed/>.
    assert b"INJECTED" not in answer and b"type='valid'" not in answer
    proxy.wait_for_log(f"the remote server sent {len(INJECTED)} bytes after <proceed/>; discarded")
    proxy.wait_for_log(f"peer certificate: verified for {REMOTE}")
