"""PROXY headers both ways: the builder round-trips through the parser, the
parser bounds what it reads, and what the proxy writes is checked field by
field against the specification."""

from __future__ import annotations

import dataclasses
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import proxy_header
from protocols._base import BackendIdentity, Peer, PeerCertificate, TLSInfo
from protocols.proxy_header import ProxyHeader, ProxyHeaderError, parse
from tests.pp2 import ssl_tlv, tlvs

PEER = Peer("203.0.113.7", 40000, "198.51.100.1", 25)
PEER6 = Peer("2001:db8::7", 40000, "2001:db8::1", 587)


@pytest.mark.parametrize("peer", [PEER, PEER6])
def test_v1_and_v2_round_trip(peer: Peer) -> None:
    expected = (peer.client_address, peer.client_port, peer.local_address, peer.local_port)
    for header in (
        proxy_header.proxy_v1(peer),
        proxy_header.proxy_v2(peer, None),
        proxy_header.proxy_v2(peer, TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", "mx.test")),
    ):
        parsed = parse(header + b"EHLO client\r\n")
        assert parsed == ProxyHeader(len(header), expected)


def test_local_and_unknown_keep_the_connection_addresses() -> None:
    local = proxy_header.proxy_v2_local()
    assert parse(local) == ProxyHeader(len(local), None)
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(15, None)


@given(st.integers(min_value=0, max_value=60))
def test_any_prefix_asks_for_more(cut: int) -> None:
    header = proxy_header.proxy_v2(PEER, None)
    if cut < len(header):
        assert parse(header[:cut]) is None
    assert parse(proxy_header.proxy_v1(PEER)[: min(cut, 40)]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client\r\n",
        b"PROXY TCP4 1.2.3.4\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        # Found by the fuzzer (tests/fuzz): int() read "143\r" as 143.
        b"PROXY TCP6 2001:db8::1 2001:db8::2 49152 143\r\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        # The destination of another family than the one named.
        b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY " + b"x" * 200,
        proxy_header.V2_SIGNATURE + b"\x31\x11\x00\x0c",
        proxy_header.V2_SIGNATURE + b"\x21\x11\xff\xff",
        proxy_header.V2_SIGNATURE + b"\x21\x11\x00\x02\x00\x00",
    ],
)
def test_garbage_is_an_error(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


@given(st.binary(max_size=300))
def test_fuzz_parses_within_bounds_or_says_why(data: bytes) -> None:
    try:
        parsed = parse(data)
    except ProxyHeaderError as error:
        assert str(error)
    else:
        assert parsed is None or 0 < parsed.length <= len(data)


# --------------------------------------------------------------------------
# The headers the proxy writes, field by field against the specification.

PEER_V4 = Peer("127.0.0.9", 40000, "127.0.0.1", 2525)
PEER_V6 = Peer("2001:db8::9", 40000, "2001:db8::1", 25)
TLS = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", "mail.example.test")


def test_proxy_v1_ipv4_and_ipv6() -> None:
    assert proxy_header.proxy_v1(PEER_V4) == b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 2525\r\n"
    assert proxy_header.proxy_v1(PEER_V6) == b"PROXY TCP6 2001:db8::9 2001:db8::1 40000 25\r\n"


def test_proxy_v1_unmaps_ipv4_mapped_addresses() -> None:
    mapped = Peer("::ffff:127.0.0.9", 1, "::ffff:127.0.0.1", 2)
    assert proxy_header.proxy_v1(mapped) == b"PROXY TCP4 127.0.0.9 127.0.0.1 1 2\r\n"


def test_proxy_v2_without_tls_has_addresses_only() -> None:
    header = proxy_header.proxy_v2(PEER_V4, None)
    assert header[:12] == proxy_header.V2_SIGNATURE
    assert header[12] == 0x21  # version 2, PROXY
    assert header[13] == 0x11  # TCP over IPv4
    (length,) = struct.unpack_from("!H", header, 14)
    body = header[16:]
    assert length == len(body) == 12
    assert body[:4] == socket.inet_aton("127.0.0.9")
    assert body[4:8] == socket.inet_aton("127.0.0.1")
    assert struct.unpack("!HH", body[8:12]) == (40000, 2525)


def test_proxy_v2_carries_ssl_and_authority_tlvs() -> None:
    header = proxy_header.proxy_v2(PEER_V4, TLS)
    found = tlvs(header[16 + 12 :])
    assert found[proxy_header.PP2_TYPE_AUTHORITY] == b"mail.example.test"
    ssl = found[proxy_header.PP2_TYPE_SSL]
    client, verify = struct.unpack_from("!BI", ssl)
    assert client == proxy_header.PP2_CLIENT_SSL
    # Section 2.2.6: zero only for a certificate that was presented and verified.
    assert verify != 0
    sub = tlvs(ssl[5:])
    assert sub[proxy_header.PP2_SUBTYPE_SSL_VERSION] == b"TLSv1.3"
    assert sub[proxy_header.PP2_SUBTYPE_SSL_CIPHER] == b"TLS_AES_256_GCM_SHA384"
    assert proxy_header.PP2_SUBTYPE_SSL_CN not in sub


def test_a_verified_peer_certificate_is_the_cn_with_verify_zero() -> None:
    peer = dataclasses.replace(TLS, peer_certificate=PeerCertificate(trusted=True))
    client, verify, sub = ssl_tlv(proxy_header.proxy_v2(PEER_V4, peer, "a.example"))
    assert client == (
        proxy_header.PP2_CLIENT_SSL
        | proxy_header.PP2_CLIENT_CERT_CONN
        | proxy_header.PP2_CLIENT_CERT_SESS
    )
    assert verify == 0
    assert sub[proxy_header.PP2_SUBTYPE_SSL_CN] == b"a.example"
    assert proxy_header.session_header(
        BackendIdentity.PROXY_V2, PEER_V4, peer, "a.example"
    ) == proxy_header.proxy_v2(PEER_V4, peer, "a.example")


def test_a_certificate_that_did_not_verify_is_presented_but_not_verified() -> None:
    peer = dataclasses.replace(
        TLS, peer_certificate=PeerCertificate(trusted=False, problem="certificate has expired")
    )
    client, verify, sub = ssl_tlv(proxy_header.proxy_v2(PEER_V4, peer))
    assert client & proxy_header.PP2_CLIENT_CERT_CONN
    assert verify != 0
    assert proxy_header.PP2_SUBTYPE_SSL_CN not in sub


def test_proxy_v2_ipv6() -> None:
    header = proxy_header.proxy_v2(PEER_V6, None)
    assert header[13] == 0x21
    assert header[16:32] == socket.inet_pton(socket.AF_INET6, "2001:db8::9")


def test_probe_headers_are_local() -> None:
    own = Peer("127.0.0.1", 50000, "127.0.0.1", 25)
    assert proxy_header.probe_header(BackendIdentity.PROXY_V1, own) == (
        b"PROXY TCP4 127.0.0.1 127.0.0.1 50000 25\r\n"
    )
    local = proxy_header.probe_header(BackendIdentity.PROXY_V2, own)
    assert local == proxy_header.V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert proxy_header.probe_header(BackendIdentity.XCLIENT, own) == b""
    assert proxy_header.session_header(BackendIdentity.NONE, PEER_V4, TLS) == b""
