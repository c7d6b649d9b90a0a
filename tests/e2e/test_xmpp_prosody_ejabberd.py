"""End to end: real XMPP clients -> starttls-proxy -> a real Prosody and a real ejabberd.

Prosody runs without TLS (a plaintext backend, no PROXY support); ejabberd
offers STARTTLS itself, which the proxy must hide, and learns the client's
address from a PROXY v2 header. Clients that can bind a source address
connect from 127.0.0.x addresses other than 127.0.0.1, so that ejabberd's log
proves which address it was told about.
"""

from __future__ import annotations

import asyncio
import functools
import re
import select
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import slixmpp

from protocols._base import Peer, TLSInfo
from protocols.proxy_header import proxy_v2
from tests.realservers.certs import CertFiles
from tests.realservers.ejabberd import EjabberdInstance
from tests.realservers.prosody import ProsodyInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener
from tests.realservers.xmpp import DOMAIN, STARTTLS, XMPPStream, start_session, stream_header

#: Markup as text, an end of CDATA, non-ASCII and a character the serializer escapes.
BODY = (
    "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/> & <proceed/> ]]> "
    "caf\u00e9 \U0001f600 </stream:stream>"
)


@pytest.fixture(scope="module")
def proxy(
    module_proxy: StartProxy,
    prosody: ProsodyInstance,
    ejabberd: EjabberdInstance,
    test_certs: CertFiles,
    test_certs_other: CertFiles,
) -> ProxyProcess:
    xmpp: dict[str, Any] = {"protocol": "xmpp-client", "hostname": DOMAIN}
    ejabberd_options = {**xmpp, "backend": {"identity": "proxy-v2"}, "capabilities": []}
    return module_proxy(
        [
            listener("prosody", prosody.port, domains=[DOMAIN], **xmpp),
            listener("prosody-plain", prosody.port, require_tls=False, **xmpp),
            listener("prosody-direct", prosody.port, tls="implicit", **xmpp),
            # ejabberd 23.01 never answers after a PROXY v2 LOCAL header, so the
            # capability probe could only time out; the features it learns only
            # matter to plaintext sessions anyway.
            listener("ejabberd", ejabberd.proxy_port, **ejabberd_options),
            listener("ejabberd-direct", ejabberd.proxy_port, tls="implicit", **ejabberd_options),
        ],
        certificates=[
            (test_certs.cert, test_certs.key),
            (test_certs_other.cert, test_certs_other.key),
        ],
    )


# --------------------------------------------------------------------------
# slixmpp, a real client.


def _bind_connections(source: str) -> None:
    """Make the running loop's outgoing connections start from ``source``
    (slixmpp has no option for it); the loop lives as long as the test."""
    loop = asyncio.get_running_loop()
    loop.create_connection = functools.partial(  # type: ignore[method-assign]
        loop.create_connection, local_addr=(source, 0)
    )


def _slixmpp_client(user: str, certs: CertFiles, *, tls: str) -> slixmpp.ClientXMPP:
    client = slixmpp.ClientXMPP(f"{user}@{DOMAIN}/e2e", f"{user}pw")
    client.enable_direct_tls = tls == "direct"
    client.enable_starttls = tls == "starttls"
    client.enable_plaintext = tls == "plain"
    client.ca_certs = certs.ca
    if tls == "direct":
        client.ssl_context.set_alpn_protocols(["xmpp-client"])
    if tls == "plain":
        client.plugin["feature_mechanisms"].unencrypted_plain = True
    return client


async def _alice_to_bob(
    port: int, certs: CertFiles, *, tls: str = "starttls", source: str | None = None
) -> str:
    """Both log in through ``port``; alice sends ``BODY`` to bob; what bob got."""
    if source is not None:
        _bind_connections(source)
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    bob = _slixmpp_client("bob", certs, tls=tls)
    alice = _slixmpp_client("alice", certs, tls=tls)

    def received(message: slixmpp.Message) -> None:
        if not got.done():
            got.set_result(str(message["body"]))

    bob.add_event_handler("message", received)
    try:
        await start_session(bob, port)
        await start_session(alice, port)
        alice.send_message(mto=slixmpp.JID(f"bob@{DOMAIN}"), mbody=BODY, mtype="chat")
        return await asyncio.wait_for(got, 20)
    finally:
        for client in (alice, bob):
            await client.disconnect()


def test_slixmpp_starttls_prosody(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    assert asyncio.run(_alice_to_bob(proxy.ports["prosody"], test_certs)) == BODY
    proxy.wait_for_log("tls=TLSv1.3")


def test_slixmpp_plaintext_prosody(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    port = proxy.ports["prosody-plain"]
    assert asyncio.run(_alice_to_bob(port, test_certs, tls="plain")) == BODY


def test_slixmpp_direct_tls_prosody(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    port = proxy.ports["prosody-direct"]
    assert asyncio.run(_alice_to_bob(port, test_certs, tls="direct")) == BODY


def test_slixmpp_starttls_ejabberd_proxy_v2(
    proxy: ProxyProcess, ejabberd: EjabberdInstance, test_certs: CertFiles
) -> None:
    mark = len(ejabberd.log())
    port = proxy.ports["ejabberd"]
    assert asyncio.run(_alice_to_bob(port, test_certs, source="127.0.0.21")) == BODY
    ejabberd.wait_for_line("Accepted proxied connection 127.0.0.21:", since=mark)
    ejabberd.wait_for_line("authentication for alice@localhost", "from 127.0.0.21", since=mark)


def test_slixmpp_direct_tls_ejabberd_proxy_v2(
    proxy: ProxyProcess, ejabberd: EjabberdInstance, test_certs: CertFiles
) -> None:
    mark = len(ejabberd.log())
    port = proxy.ports["ejabberd-direct"]
    received = asyncio.run(_alice_to_bob(port, test_certs, tls="direct", source="127.0.0.22"))
    assert received == BODY
    ejabberd.wait_for_line("authentication for bob@localhost", "from 127.0.0.22", since=mark)


# --------------------------------------------------------------------------
# A raw client, to look at the bytes.


def _context(
    certs: CertFiles, *, alpn: str | None = None, check_hostname: bool = True
) -> ssl.SSLContext:
    context = certs.client_context()
    context.check_hostname = check_hostname
    if alpn is not None:
        context.set_alpn_protocols([alpn])
    return context


class RawClient(XMPPStream):
    """An XMPP client connected to one of the proxy's listeners."""

    def __init__(self, proxy: ProxyProcess, listener_name: str, source: str) -> None:
        super().__init__(proxy.connect(listener_name, source))

    def starttls(self, context: ssl.SSLContext, server_name: str | None = DOMAIN) -> bytes:
        features = super().starttls(context, server_name)
        assert b"<required/>" in features
        return features


def test_backend_starttls_is_stripped_and_client_address_is_real(
    proxy: ProxyProcess, ejabberd: EjabberdInstance, test_certs: CertFiles
) -> None:
    # ejabberd offers STARTTLS to the proxy after the PROXY header the proxy sends ...
    peer = Peer("127.0.0.23", 40000, "127.0.0.1", proxy.ports["ejabberd"])
    tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", DOMAIN)
    with socket.create_connection((ejabberd.host, ejabberd.proxy_port), timeout=20) as direct:
        direct.sendall(proxy_v2(peer, tls) + stream_header())
        offered = b""
        while b"</stream:features>" not in offered:
            offered += direct.recv(65536)
    assert b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" in offered
    # ... and the client must not see it.
    mark = len(ejabberd.log())
    client = RawClient(proxy, "ejabberd", "127.0.0.23")
    client.starttls(test_certs.client_context())
    assert client.login("alice", "alicepw").startswith(b"alice@localhost/")
    client.send(b"</stream:stream>")
    assert client.read_all().endswith(b"</stream:stream>")
    client.close()
    ejabberd.wait_for_line(
        "PLAIN authentication for alice@localhost", "from 127.0.0.23", since=mark
    )


def test_direct_tls_negotiates_alpn(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    client = RawClient(proxy, "prosody-direct", "127.0.0.24")
    client.wrap(_context(test_certs, alpn="xmpp-client"), DOMAIN)
    assert isinstance(client.sock, ssl.SSLSocket)
    assert client.sock.selected_alpn_protocol() == "xmpp-client"
    assert client.login("bob", "bobpw").startswith(b"bob@localhost/")
    client.close()


def test_stream_to_domain_chooses_the_certificate_without_sni(
    proxy: ProxyProcess, test_certs_other: CertFiles
) -> None:
    client = RawClient(proxy, "ejabberd", "127.0.0.25")
    client.send(stream_header("other.example.test"))
    client.read_until(b"</stream:features>")
    client.send(STARTTLS)
    client.read_until(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    client.wrap(_context(test_certs_other, check_hostname=False), None)
    assert isinstance(client.sock, ssl.SSLSocket)
    certificate = client.sock.getpeercert()
    assert certificate is not None
    assert ("DNS", "other.example.test") in certificate["subjectAltName"]
    client.close()


def test_unknown_domain_is_refused(proxy: ProxyProcess) -> None:
    client = RawClient(proxy, "prosody", "127.0.0.26")
    client.send(stream_header("elsewhere.example"))
    reply = client.read_all()
    assert b"<host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in reply
    assert reply.endswith(b"</stream:stream>")
    client.close()


def _run_client(command: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_openssl_s_client_starttls_xmpp(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    result = _run_client(
        [
            "openssl",
            "s_client",
            "-starttls",
            "xmpp",
            "-xmpphost",
            DOMAIN,
            "-connect",
            f"127.0.0.1:{proxy.ports['prosody']}",
            "-servername",
            DOMAIN,
            "-CAfile",
            str(test_certs.ca),
            "-verify_return_error",
            "-brief",
        ]
    )
    assert "CONNECTION ESTABLISHED" in result.stderr
    assert "Verification: OK" in result.stderr


def test_gnutls_cli_starttls_xmpp(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    result = _run_client(
        [
            "gnutls-cli",
            "--starttls-proto=xmpp",
            f"--x509cafile={test_certs.ca}",
            "-p",
            str(proxy.ports["ejabberd"]),
            DOMAIN,
        ]
    )
    assert "Handshake was completed" in result.stdout


# --------------------------------------------------------------------------
# Attacks against the running proxy.


def _refusal(proxy: ProxyProcess, attack: bytes, source: str) -> bytes:
    client = RawClient(proxy, "prosody", source)
    client.send(attack)
    reply = client.read_all()
    client.close()
    return reply


@pytest.mark.parametrize(
    ("attack", "condition"),
    [
        (
            b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
            b"<!ENTITY lol2 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>]>"
            + stream_header(),
            b"restricted-xml",
        ),
        (
            b"<!DOCTYPE x [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>" + stream_header(),
            b"restricted-xml",
        ),
        (stream_header() + b"<iq>" + b"<a>" * 10_000, b"policy-violation"),
        (stream_header() + b"<message><body>\xc3\x28</body></message>", b"not-well-formed"),
    ],
    ids=["billion-laughs", "external-entity", "deep-nesting", "invalid-utf8"],
)
def test_attacks_get_their_stream_error(
    proxy: ProxyProcess, attack: bytes, condition: bytes
) -> None:
    reply = _refusal(proxy, attack, "127.0.0.27")
    assert b"<%s xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" % condition in reply
    assert reply.endswith(b"</stream:stream>")


def test_tls_client_hello_before_starttls(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    client = RawClient(proxy, "prosody", "127.0.0.28")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        client.wrap(test_certs.client_context(), DOMAIN)
    client.close()
    proxy.wait_for_log("TLS ClientHello before STARTTLS (not-well-formed)")


def test_iq_pipelined_after_starttls_never_reaches_the_backend(
    proxy: ProxyProcess, prosody: ProsodyInstance, test_certs: CertFiles
) -> None:
    client = RawClient(proxy, "prosody", "127.0.0.29")
    client.send(stream_header())
    client.read_until(b"</stream:features>")
    smuggled = b"<iq type='get' id='smuggled-7f3a'><query xmlns='jabber:iq:roster'/></iq>"
    client.send(STARTTLS + smuggled)
    client.read_until(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    client.wrap(test_certs.client_context(), DOMAIN)
    client.login("alice", "alicepw")
    client.send(b"<iq type='get' id='honest-7f3a'><query xmlns='jabber:iq:roster'/></iq>")
    client.read_until(b"</iq>")
    client.close()
    proxy.wait_for_log(f"sent {len(smuggled)} bytes after the TLS upgrade command; discarded")
    log = prosody.wait_for_log("honest-7f3a")
    assert "smuggled-7f3a" not in log


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert found is not None
    return int(found[1])


def _ten_megabyte_attribute(proxy: ProxyProcess) -> tuple[int, bytes]:
    """Send up to 10 MB of one attribute value until the proxy answers: how
    much was sent, and the answer."""
    client = RawClient(proxy, "prosody", "127.0.0.30")
    client.send(stream_header())
    client.read_until(b"</stream:features>")
    client.send(b"<message to='")
    chunk, sent = b"A" * 65536, 0
    try:
        while sent < 10 * 1024 * 1024 and not select.select([client.sock], [], [], 0)[0]:
            client.sock.sendall(chunk)
            sent += len(chunk)
        return sent, client.read_all()
    finally:
        client.close()


def _attack_until(
    proxy: ProxyProcess, stop: threading.Event, replies: list[tuple[int, bytes]]
) -> None:
    while not stop.is_set():
        replies.append(_ten_megabyte_attribute(proxy))


def test_ten_megabyte_attributes_while_others_log_in(
    proxy: ProxyProcess, test_certs: CertFiles
) -> None:
    before = _rss_kib(proxy.process.pid)
    stop = threading.Event()
    replies: list[tuple[int, bytes]] = []
    attacker = threading.Thread(target=_attack_until, args=(proxy, stop, replies))
    attacker.start()
    try:
        assert asyncio.run(_alice_to_bob(proxy.ports["prosody"], test_certs)) == BODY
    finally:
        stop.set()
        attacker.join(30)
    assert not attacker.is_alive()
    assert replies
    for sent, reply in replies:
        assert b"<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in reply
        # Refused after about max_attribute_size (64 KiB), plus what was in flight.
        assert sent < 4 * 1024 * 1024
    proxy.wait_for_log("attribute value longer than 65536 bytes (policy-violation)")
    assert _rss_kib(proxy.process.pid) - before < 20 * 1024
