"""End to end: XMPP federation through starttls-proxy (issue 16).

A real Prosody and a real ejabberd federate on loopback, each with its s2s
port behind one of the proxy's ``xmpp-server`` listeners (STARTTLS, and
XEP-0368 direct TLS with ALPN ``xmpp-server``); see
``tests/realservers/federation.py`` for the domains and the routing. The
originating server authenticates its stream through the proxy by dialback
(XEP-0220): the receiving server calls it back directly, never through the
proxy. A recording tap between the proxy and each server shows exactly what
the server read, and what it answered. Prosody's streams to some of
ejabberd's domains leave through the proxy's outgoing listener
(``xmpp-server-out``), which does TLS with the remote server and verifies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Iterator

import pytest
import slixmpp
import trustme

from tests.realservers.federation import (
    IMPOSTOR,
    MODES,
    OUTGOING,
    PROSODY_SOURCE,
    Federation,
    Mode,
    Server,
    behind_proxy,
    home,
    listener_name,
    running_federation,
    via_outgoing,
)
from tests.realservers.proxy import StartProxy
from tests.realservers.tap import wait_for
from tests.realservers.xmpp import PROCEED, STARTTLS, XMPPStream, slixmpp_session

#: Markup as text (escaped by the sender, so it stays text), an end of CDATA,
#: non-ASCII and characters the serializer escapes.
BODY = (
    "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/> & <proceed/> ]]> "
    "caf\u00e9 \U0001f600 </stream:stream>"
)
REPLY = "re: <starttls/> \u00fcber \u65e5\u672c \U0001f44d"

#: (originating server, receiving server): each federates to the other.
ROUTES: list[tuple[Server, Server]] = [("prosody", "ejabberd"), ("ejabberd", "prosody")]


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA, module_proxy: StartProxy
) -> Iterator[Federation]:
    with running_federation(
        tmp_path_factory.mktemp("federation"), test_ca, module_proxy
    ) as running:
        yield running


def _other(server: Server) -> Server:
    return "ejabberd" if server == "prosody" else "prosody"


async def _exchange(
    federation: Federation, origin: Server, target: str, body: str = BODY
) -> tuple[str, str]:
    """alice on ``origin``'s home domain sends ``body`` to bob at ``target`` (a
    domain of the other server), who answers REPLY: what bob got, and what alice got."""
    receiver = _other(origin)
    alice_jid = f"alice@{home(origin)}/federation"
    bob_jid = f"bob@{target}/federation"
    loop = asyncio.get_running_loop()
    to_bob: asyncio.Future[str] = loop.create_future()
    to_alice: asyncio.Future[str] = loop.create_future()
    bob = await slixmpp_session(bob_jid, "bobpw", federation.c2s_port(receiver))
    try:
        alice = await slixmpp_session(alice_jid, "alicepw", federation.c2s_port(origin))
    except BaseException:
        await bob.disconnect()
        raise

    def bob_got(message: slixmpp.Message) -> None:
        if message["type"] == "chat" and not to_bob.done():
            to_bob.set_result(str(message["body"]))
            bob.send_message(mto=message["from"], mbody=REPLY, mtype="chat")

    def alice_got(message: slixmpp.Message) -> None:
        if message["type"] == "chat" and not to_alice.done():
            to_alice.set_result(str(message["body"]))

    bob.add_event_handler("message", bob_got)
    alice.add_event_handler("message", alice_got)
    try:
        alice.send_message(mto=slixmpp.JID(f"bob@{target}"), mbody=body, mtype="chat")
        return await asyncio.wait_for(to_bob, 20), await asyncio.wait_for(to_alice, 20)
    finally:
        for client in (alice, bob):
            await client.disconnect()


def _dialback_connection(
    federation: Federation, origin: Server, target: str
) -> tuple[bytes, bytes]:
    """What the receiving server read and answered on the connection over which
    ``origin`` asked, by dialback, to send for its home domain to ``target``."""
    tap = federation.taps[_other(origin)]
    sender, recipient = (re.escape(domain.encode()) for domain in (home(origin), target))
    request = re.compile(
        rb"<db:result(?=[^>]*\sfrom=['\"]%s['\"])(?=[^>]*\sto=['\"]%s['\"])" % (sender, recipient)
    )
    for recording, answer in zip(tap.recordings(), tap.answers(), strict=True):
        if request.search(recording):
            return recording, answer
    raise AssertionError(f"no dialback request from {home(origin)} to {target} reached it")


def _stream_id(header_source: bytes) -> str:
    found = re.search(rb"<stream:stream[^>]*\sid=['\"]([^'\"]+)['\"]", header_source)
    assert found is not None, header_source[:500]
    return found[1].decode()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("origin", "receiver"), ROUTES, ids=["prosody-to-ejabberd", "ejabberd-to-prosody"]
)
def test_message_and_reply_through_the_proxy_with_dialback(
    federation: Federation, origin: Server, receiver: Server, mode: Mode
) -> None:
    target = behind_proxy(receiver, mode)
    to_bob, to_alice = asyncio.run(_exchange(federation, origin, target))
    assert to_bob == BODY
    assert to_alice == REPLY

    # The stream came through the proxy and was authenticated by dialback: the
    # receiving server read the originating server's key from the proxy ...
    recording, answer = _dialback_connection(federation, origin, target)
    # ... under TLS only (the proxy answered the first stream header itself) ...
    assert b"<starttls" not in recording
    # (BODY's markup crossed as text.)
    assert b"&lt;starttls xmlns=&apos;urn:ietf:params:xml:ns:xmpp-tls&apos;/&gt;" in recording
    # ... and verified it with the originating server directly, under the id of
    # the stream it had opened: the id the proxy relayed to the originating
    # server, which keyed with it. Prosody logs the verify element, whether it
    # received it (as the originating server) or sent it (as the receiving one).
    stream_id = _stream_id(answer)
    assert b"<db:result" in answer and b"type='valid'" in answer.replace(b'"', b"'")
    # The verification's answer, with the stream id, whichever order Prosody
    # logged the attributes in.
    verified = re.compile(
        rf"<(db:)?verify(?=[^>]*\sid='{re.escape(stream_id)}')(?=[^>]*\stype='valid')"
    )
    assert verified.search(federation.prosody.log()), f"stream {stream_id} not verified"
    # The receiving server called back directly, not through the proxy.
    assert stream_id.encode() not in federation.taps[origin].everything()
    # Before any of it, the proxy had verified the originating server's own
    # certificate for the domain its stream claimed (the listeners refuse others).
    checked = (
        rf"{re.escape(listener_name(receiver, mode))}: \S+ peer certificate: "
        rf"verified for {re.escape(home(origin))}$"
    )
    assert re.search(checked, federation.proxy.log_path.read_text(), re.M), checked


@pytest.mark.parametrize("mode", MODES)
def test_ejabberd_logs_the_originating_address_from_proxy_v2(
    federation: Federation, mode: Mode
) -> None:
    """ejabberd (``use_proxy_protocol``) names Prosody's address, not the proxy's;
    Prosody has no PROXY support in Debian, so the converse cannot be shown."""
    target = behind_proxy("ejabberd", mode)
    asyncio.run(_exchange(federation, "prosody", target))
    log = federation.ejabberd.log()
    assert f"Accepted proxied connection {PROSODY_SOURCE}:" in log
    accepted = f"Accepted inbound s2s dialback authentication {home('prosody')} -> {target} ("
    line = next((line for line in log.splitlines() if accepted in line), None)
    assert line is not None, log[-3000:]
    assert line.endswith(f"({PROSODY_SOURCE})")


#: A body that Prosody's c2s limit (256 KiB a stanza) lets through from slixmpp,
#: and that Prosody's from= stamp then takes over 256 KiB on s2s.
FULL_SIZE_BODY = "x" * 262_005


def test_a_full_size_stanza_crosses_the_proxy_without_ending_the_link(
    federation: Federation,
) -> None:
    """Regression: the proxy's stanza limit was the c2s one on s2s too, and
    ended the whole federation link with <policy-violation/>."""
    target = behind_proxy("ejabberd", "starttls")
    tap = federation.taps["ejabberd"]
    to_bob, to_alice = asyncio.run(_exchange(federation, "prosody", target, FULL_SIZE_BODY))
    assert to_bob == FULL_SIZE_BODY
    assert to_alice == REPLY
    # The case at hand: what ejabberd read was over the c2s limit once stamped.
    relayed = tap.everything()
    body_at = relayed.find(FULL_SIZE_BODY.encode())
    assert body_at >= 0
    start = relayed.rfind(b"<message", 0, body_at)
    end = relayed.find(b"</message>", body_at) + len(b"</message>")
    assert end - start > 256 * 1024
    assert "element larger than" not in federation.proxy.log()


# --------------------------------------------------------------------------
# A raw server stream against the real servers behind the proxy.


def _s2s_header(to: str, sender: str = "intruder.example") -> bytes:
    return (
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
        b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
        b"from='%s' to='%s' version='1.0'>" % (sender.encode(), to.encode())
    )


def _read_until(stream: XMPPStream, pattern: bytes) -> bytes:
    """Read until ``pattern`` matches what came; return the match."""
    while (found := re.search(pattern, stream.buffer)) is None:
        data = stream.sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before {pattern!r}; got {stream.buffer!r}")
        stream.buffer += data
    return found[0]


def _connect(federation: Federation, name: str) -> XMPPStream:
    return XMPPStream(federation.proxy.connect(name))


def _tls_context(
    federation: Federation, sender: Server | None, alpn: str | None = None
) -> ssl.SSLContext:
    """A connecting server's context, with ``sender``'s own certificate (None:
    none): the listeners refuse a peer that presents none valid for its
    stream's ``from``."""
    context = ssl.create_default_context(cafile=str(federation.ca))
    if sender is not None:
        certificate = federation.certs[sender]
        context.load_cert_chain(certificate.cert, certificate.key)
    if alpn is not None:
        context.set_alpn_protocols([alpn])
    return context


@pytest.mark.parametrize("receiver", ["prosody", "ejabberd"])
def test_no_stanza_reaches_the_server_before_tls(federation: Federation, receiver: Server) -> None:
    tap = federation.taps[receiver]
    before = len(tap.recordings())
    target = behind_proxy(receiver, "starttls")
    with contextlib.closing(_connect(federation, listener_name(receiver, "starttls"))) as stream:
        stream.send(_s2s_header(target))
        features = stream.read_until(b"</stream:features>")
        assert b"<required/>" in features
        stream.send(
            b"<db:result from='intruder.example' to='%s'>pre-tls-key-5e1d</db:result>"
            b"<message from='x@intruder.example' to='bob@%s'><body>pre-tls-5e1d</body></message>"
            % (target.encode(), target.encode())
        )
        reply = stream.read_all()
    assert b"<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in reply
    # The proxy never opened the backend: nothing at all reached the server.
    assert len(tap.recordings()) == before
    assert b"5e1d" not in tap.everything()


@pytest.mark.parametrize("receiver", ["prosody", "ejabberd"])
def test_bytes_pipelined_after_starttls_never_reach_the_server(
    federation: Federation, receiver: Server
) -> None:
    tap = federation.taps[receiver]
    before = len(tap.recordings())
    target = behind_proxy(receiver, "starttls")
    sender = home(_other(receiver)).encode()
    smuggled = b"<db:result from='%s' to='%s'>smuggled-key-77c2</db:result>" % (
        sender,
        target.encode(),
    )
    with contextlib.closing(_connect(federation, listener_name(receiver, "starttls"))) as stream:
        stream.send(_s2s_header(target, sender.decode()))
        stream.read_until(b"</stream:features>")
        stream.send(STARTTLS + smuggled)
        stream.read_until(PROCEED)
        stream.wrap(_tls_context(federation, _other(receiver)), target)
        stream.send(_s2s_header(target, sender.decode()))
        features = stream.read_until(b"</stream:features>")
        # The server's own features (it offers STARTTLS to the proxy: gone).
        assert b"urn:xmpp:features:dialback" in features
        assert b"xmpp-tls" not in features
        # An honest (but wrong) key under TLS: the server checks it with the
        # originating server and says it is invalid, so it read everything before.
        stream.send(
            b"<db:result from='%s' to='%s'>honest-key-77c2</db:result>" % (sender, target.encode())
        )
        verdict = _read_until(stream, rb"<(db:)?result[^>]*>")
    assert re.search(rb"type=['\"]invalid['\"]", verdict), verdict
    federation.proxy.wait_for_log(
        f"sent {len(smuggled)} bytes after the TLS upgrade command; discarded"
    )
    assert wait_for(lambda: b"honest-key-77c2" in tap.everything())
    assert len(tap.recordings()) == before + 1
    assert b"smuggled-key-77c2" not in tap.everything()


@pytest.mark.parametrize("receiver", ["prosody", "ejabberd"])
def test_direct_tls_negotiates_alpn_xmpp_server(federation: Federation, receiver: Server) -> None:
    target = behind_proxy(receiver, "direct")
    with contextlib.closing(_connect(federation, listener_name(receiver, "direct"))) as stream:
        stream.wrap(_tls_context(federation, _other(receiver), alpn="xmpp-server"), target)
        assert isinstance(stream.sock, ssl.SSLSocket)
        assert stream.sock.selected_alpn_protocol() == "xmpp-server"
        stream.send(_s2s_header(target, home(_other(receiver))))
        features = stream.read_until(b"</stream:features>")
        # The server's own features, dialback among them, without STARTTLS.
        assert b"urn:xmpp:features:dialback" in features
        assert b"xmpp-tls" not in features
        stream.send(b"</stream:stream>")
        assert stream.read_all().endswith(b"</stream:stream>")


@pytest.mark.parametrize(
    ("presented", "condition"),
    [(None, b"not-authorized"), ("ejabberd", b"invalid-from")],
    ids=["no-certificate", "another-servers-certificate"],
)
def test_a_peer_without_a_certificate_for_its_domain_never_reaches_the_server(
    federation: Federation, presented: Server | None, condition: bytes
) -> None:
    """A stream claiming Prosody's domain into ejabberd, with no certificate
    or with ejabberd's own (valid, but not for that domain): the listeners
    refuse it before the backend is opened, whatever dialback would say."""
    tap = federation.taps["ejabberd"]
    before = len(tap.recordings())
    target = behind_proxy("ejabberd", "starttls")
    sender = home("prosody")
    context = _tls_context(federation, presented)
    with contextlib.closing(_connect(federation, listener_name("ejabberd", "starttls"))) as stream:
        stream.send(_s2s_header(target, sender))
        stream.read_until(b"</stream:features>")
        stream.send(STARTTLS)
        stream.read_until(PROCEED)
        stream.wrap(context, target)
        stream.send(_s2s_header(target, sender))
        reply = stream.read_all()
    assert b"<%s xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" % condition in reply
    assert len(tap.recordings()) == before


# --------------------------------------------------------------------------
# Outgoing streams: Prosody's way out goes through the proxy.


@pytest.mark.parametrize("mode", MODES)
def test_an_outgoing_stream_leaves_through_the_proxy_under_tls(
    federation: Federation, mode: Mode
) -> None:
    """Prosody opens a plaintext stream to the proxy; the proxy finds the
    remote by SRV (``_xmpp-server`` or ``_xmpps-server``), does TLS with it,
    verifies its certificate for the domain, and relays: dialback works
    across it, both ways the messages arrive exactly."""
    target = via_outgoing(mode)
    to_bob, to_alice = asyncio.run(_exchange(federation, "prosody", target))
    assert to_bob == BODY
    assert to_alice == REPLY
    log = federation.proxy.log_path.read_text()
    how = "STARTTLS" if mode == "starttls" else "direct TLS"
    routed = rf"^.*{OUTGOING}: \S+ to {re.escape(target)} via 127\.0\.0\.1:\d+ \({how}\)$"
    assert re.search(routed, log, re.M), routed
    verified = rf"{OUTGOING}: \S+ peer certificate: verified for {re.escape(target)}$"
    assert re.search(verified, log, re.M), verified
    if mode == "direct":
        # The proxy's listener in front of ejabberd asked the outgoing
        # listener (127.0.0.1, where Prosody is 127.0.0.2) for a certificate,
        # and verified the one it presented for prosody.example.
        presented = (
            rf"{listener_name('ejabberd', 'direct')}: 127\.0\.0\.1:\d+ peer certificate: "
            rf"verified for {re.escape(home('prosody'))}$"
        )
        assert re.search(presented, log, re.M), presented


async def _bounced(federation: Federation, recipient: str) -> slixmpp.Message:
    """What alice on Prosody gets back for a message to ``recipient``."""
    loop = asyncio.get_running_loop()
    bounced: asyncio.Future[slixmpp.Message] = loop.create_future()
    alice = await slixmpp_session(
        f"alice@{home('prosody')}/bounce", "alicepw", federation.c2s_port("prosody")
    )

    def alice_got(message: slixmpp.Message) -> None:
        if not bounced.done():
            bounced.set_result(message)

    alice.add_event_handler("message_error", alice_got)
    try:
        alice.send_message(mto=slixmpp.JID(recipient), mbody=BODY, mtype="chat")
        return await asyncio.wait_for(bounced, 20)
    finally:
        await alice.disconnect()


def test_an_outgoing_stream_to_a_server_without_a_certificate_for_it_is_refused(
    federation: Federation,
) -> None:
    """``impostor.example``'s SRV record leads to a server that completes
    the handshake with a trusted certificate for other names: the proxy
    sends it nothing of the stream, and Prosody bounces the message."""
    bounce = asyncio.run(_bounced(federation, f"bob@{IMPOSTOR}"))
    assert bounce["type"] == "error"
    assert bounce["from"].bare == f"bob@{IMPOSTOR}"
    log = federation.proxy.wait_for_log("remote certificate: name_mismatch")
    # Prosody heard why: the stream error's <text/>.
    assert "remote-connection-failed (remote certificate: name_mismatch" in (
        federation.prosody.log()
    )
    refused = (
        rf"{OUTGOING}: \S+ peer certificate: name_mismatch "
        rf"\(not valid for '{re.escape(IMPOSTOR)}'\)$"
    )
    assert re.search(refused, log, re.M), refused
