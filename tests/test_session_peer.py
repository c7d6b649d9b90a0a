"""The driver on an xmpp-server listener that verifies peers' certificates:
the spawn request names the helper's trust store, the worker's report is
read with its peer part, the machine's verdict is counted, and the backend's
PROXY v2 header says what was verified. A real ``Session``, a real XMPP
server machine, fake transports and a fake helper (``tests.driver_fakes``)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from protocols import proxy_header
from starttls_proxy.config import SYSTEM_TRUST, ListenerConfig
from starttls_proxy.proxy import metrics
from starttls_proxy.proxy.session import Phase, Session
from starttls_proxy.wire import REPORT_HEADER
from tests.driver_fakes import FakeHelper, FakeListener, FakeTransport
from tests.pp2 import ssl_tlv
from tests.test_session import client, open_session, pending_channel, run, until

S2S_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"from='remote.example' to='example.com' version='1.0'>"
)
STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


def s2s_config(on_failure: str) -> ListenerConfig:
    return ListenerConfig.model_validate(
        {
            "name": f"s2s-{on_failure}",
            "protocol": "xmpp-server",
            "listen": "127.0.0.1:5269",
            "hostname": "example.com",
            "backend": {"address": "127.0.0.1:15269", "identity": "proxy-v2"},
            "peer_certificates": {"on_failure": on_failure},
        }
    )


def frame(peer: dict[str, Any]) -> bytes:
    report = {
        "ok": True,
        "version": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "server_name": "example.com",
        "alpn": None,
        "peer": peer,
    }
    payload = json.dumps(report).encode()
    return REPORT_HEADER.pack(len(payload)) + payload


def counted(listener: str, result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "starttls_proxy_s2s_peer_verification_total", {"listener": listener, "result": result}
    )
    return value or 0.0


async def through_tls(helper: FakeHelper, config: ListenerConfig, sock: socket.socket) -> Session:
    """A server stream that said STARTTLS and whose worker is spawned."""
    session = open_session(FakeListener(config, helper), sock)
    endpoint, _ = client(session)
    endpoint.data_received(S2S_HEADER + STARTTLS)
    assert session.phase is Phase.HANDSHAKE
    await until(lambda: pending_channel(session) is not None)
    return session


@pytest.fixture
def helper() -> Any:
    fake = FakeHelper()
    fake.trust_stores = (SYSTEM_TRUST,)
    yield fake
    fake.close_all()


def told_backend(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper, on_failure: str, peer: dict[str, Any]
) -> tuple[bytes, str | None]:
    """A server stream whose worker reports ``peer``: the first bytes its
    backend got, and the domain the session took as verified."""
    told: list[tuple[bytes, str | None]] = []

    async def test(backends: list[FakeTransport]) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            session = await through_tls(helper, s2s_config(on_failure), ours)
            # The listener's trust file is the helper's store 1.
            assert helper.requests[0].peer_trust == 1
            channel = pending_channel(session)
            assert channel is not None
            channel.data_received(frame(peer) + S2S_HEADER)
            await until(lambda: bool(backends) and bool(backends[0].written))
            told.append((backends[0].written, session.verified_peer))
            session.close("test over")

    run(monkeypatch, test, greeting=())
    return told[0]


def test_a_verified_peer_is_counted_and_named_to_the_backend(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    before = counted("s2s-refuse", "verified")
    peer = {"verify": "ok", "error": None, "dns_names": ["remote.example"], "xmpp_addrs": []}
    written, verified = told_backend(monkeypatch, helper, "refuse", peer)
    assert verified == "remote.example"
    flags, verify, sub = ssl_tlv(written)
    assert flags == 0x07 and verify == 0
    assert sub[proxy_header.PP2_SUBTYPE_SSL_CN] == b"remote.example"
    assert written.endswith(S2S_HEADER)
    assert counted("s2s-refuse", "verified") == before + 1


def test_a_peer_without_a_certificate_passes_for_dialback_unverified(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    before = counted("s2s-dialback", "no_certificate")
    none: dict[str, Any] = {"verify": "none", "error": None, "dns_names": [], "xmpp_addrs": []}
    written, verified = told_backend(monkeypatch, helper, "dialback", none)
    assert verified is None
    flags, verify, sub = ssl_tlv(written)
    assert flags == proxy_header.PP2_CLIENT_SSL and verify != 0
    assert proxy_header.PP2_SUBTYPE_SSL_CN not in sub
    assert counted("s2s-dialback", "no_certificate") == before + 1


def test_an_untrusted_peer_is_refused_before_any_backend(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    before = counted("s2s-refuse", "untrusted")

    async def test(backends: list[FakeTransport]) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            session = await through_tls(helper, s2s_config("refuse"), ours)
            channel = pending_channel(session)
            assert channel is not None
            untrusted = {
                "verify": "untrusted",
                "error": "self-signed certificate",
                "dns_names": ["remote.example"],
                "xmpp_addrs": [],
            }
            channel.data_received(frame(untrusted) + S2S_HEADER)
            assert session.closed
            assert session.outcome.startswith("peer certificate: untrusted")
            worker = helper.workers[0]
            worker.setblocking(False)
            got = b""
            async with asyncio.timeout(2):
                while chunk := await loop.sock_recv(worker, 4096):
                    got += chunk
            assert b"<not-authorized " in got
            assert backends == []

    run(monkeypatch, test, greeting=())
    assert counted("s2s-refuse", "untrusted") == before + 1


def test_a_report_without_its_peer_part_closes_the_session(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    """The worker was asked to verify: a report that says nothing of the
    peer is none a sound worker writes."""

    async def test(backends: list[FakeTransport]) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            session = await through_tls(helper, s2s_config("dialback"), ours)
            channel = pending_channel(session)
            assert channel is not None
            payload = json.dumps(
                {"ok": True, "version": "TLSv1.3", "cipher": "X", "server_name": None, "alpn": None}
            ).encode()
            channel.data_received(REPORT_HEADER.pack(len(payload)) + payload)
            assert session.closed
            assert session.outcome.startswith("malformed report from the TLS worker")

    run(monkeypatch, test, greeting=())


def test_a_listener_whose_trust_file_the_helper_lacks_asks_for_no_certificate(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    """The moment of a reload between the new helper and the new listener
    configuration: no store number rather than another listener's."""
    helper.trust_stores = ()

    async def test(backends: list[FakeTransport]) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            session = await through_tls(helper, s2s_config("dialback"), ours)
            assert helper.requests[0].peer_trust == 0
            session.close("test over")

    run(monkeypatch, test, greeting=())
