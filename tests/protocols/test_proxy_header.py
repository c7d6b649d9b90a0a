"""Inbound PROXY headers: the product's own builder round-trips through the parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols._base import Peer, TLSInfo
from protocols.proxy_header import ProxyHeader, ProxyHeaderError, parse
from starttls_proxy import identity

PEER = Peer("203.0.113.7", 40000, "198.51.100.1", 25)
PEER6 = Peer("2001:db8::7", 40000, "2001:db8::1", 587)


@pytest.mark.parametrize("peer", [PEER, PEER6])
def test_v1_and_v2_round_trip(peer: Peer) -> None:
    expected = (peer.client_address, peer.client_port, peer.local_address, peer.local_port)
    for header in (
        identity.proxy_v1(peer),
        identity.proxy_v2(peer, None),
        identity.proxy_v2(peer, TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", "mx.test")),
    ):
        parsed = parse(header + b"EHLO client\r\n")
        assert parsed == ProxyHeader(len(header), expected)


def test_local_and_unknown_keep_the_connection_addresses() -> None:
    local = identity.proxy_v2_local()
    assert parse(local) == ProxyHeader(len(local), None)
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(15, None)


@given(st.integers(min_value=0, max_value=60))
def test_any_prefix_asks_for_more(cut: int) -> None:
    header = identity.proxy_v2(PEER, None)
    if cut < len(header):
        assert parse(header[:cut]) is None
    assert parse(identity.proxy_v1(PEER)[: min(cut, 40)]) is None


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
        identity.PROXY_V2_SIGNATURE + b"\x31\x11\x00\x0c",
        identity.PROXY_V2_SIGNATURE + b"\x21\x11\xff\xff",
        identity.PROXY_V2_SIGNATURE + b"\x21\x11\x00\x02\x00\x00",
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
