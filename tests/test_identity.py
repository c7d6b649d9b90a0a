"""PROXY headers, checked field by field against the specification."""

from __future__ import annotations

import socket
import struct

from protocols._base import BackendIdentity, Peer, TLSInfo
from starttls_proxy import identity

PEER_V4 = Peer("127.0.0.9", 40000, "127.0.0.1", 2525)
PEER_V6 = Peer("2001:db8::9", 40000, "2001:db8::1", 25)
TLS = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", "mail.example.test")


def _tlvs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while data:
        kind, length = struct.unpack_from("!BH", data)
        found[kind] = data[3 : 3 + length]
        data = data[3 + length :]
    return found


def test_proxy_v1_ipv4_and_ipv6() -> None:
    assert identity.proxy_v1(PEER_V4) == b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 2525\r\n"
    assert identity.proxy_v1(PEER_V6) == b"PROXY TCP6 2001:db8::9 2001:db8::1 40000 25\r\n"


def test_proxy_v1_unmaps_ipv4_mapped_addresses() -> None:
    mapped = Peer("::ffff:127.0.0.9", 1, "::ffff:127.0.0.1", 2)
    assert identity.proxy_v1(mapped) == b"PROXY TCP4 127.0.0.9 127.0.0.1 1 2\r\n"


def test_proxy_v2_without_tls_has_addresses_only() -> None:
    header = identity.proxy_v2(PEER_V4, None)
    assert header[:12] == identity.PROXY_V2_SIGNATURE
    assert header[12] == 0x21  # version 2, PROXY
    assert header[13] == 0x11  # TCP over IPv4
    (length,) = struct.unpack_from("!H", header, 14)
    body = header[16:]
    assert length == len(body) == 12
    assert body[:4] == socket.inet_aton("127.0.0.9")
    assert body[4:8] == socket.inet_aton("127.0.0.1")
    assert struct.unpack("!HH", body[8:12]) == (40000, 2525)


def test_proxy_v2_carries_ssl_and_authority_tlvs() -> None:
    header = identity.proxy_v2(PEER_V4, TLS)
    tlvs = _tlvs(header[16 + 12 :])
    assert tlvs[identity.PP2_TYPE_AUTHORITY] == b"mail.example.test"
    ssl = tlvs[identity.PP2_TYPE_SSL]
    client, verify = struct.unpack_from("!BI", ssl)
    assert client == identity.PP2_CLIENT_SSL
    assert verify == 0
    sub = _tlvs(ssl[5:])
    assert sub[identity.PP2_SUBTYPE_SSL_VERSION] == b"TLSv1.3"
    assert sub[identity.PP2_SUBTYPE_SSL_CIPHER] == b"TLS_AES_256_GCM_SHA384"


def test_proxy_v2_ipv6() -> None:
    header = identity.proxy_v2(PEER_V6, None)
    assert header[13] == 0x21
    assert header[16:32] == socket.inet_pton(socket.AF_INET6, "2001:db8::9")


def test_probe_headers_are_local() -> None:
    own = Peer("127.0.0.1", 50000, "127.0.0.1", 25)
    assert identity.probe_header(BackendIdentity.PROXY_V1, own) == (
        b"PROXY TCP4 127.0.0.1 127.0.0.1 50000 25\r\n"
    )
    local = identity.probe_header(BackendIdentity.PROXY_V2, own)
    assert local == identity.PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert identity.probe_header(BackendIdentity.XCLIENT, own) == b""
    assert identity.session_header(BackendIdentity.NONE, PEER_V4, TLS) == b""
