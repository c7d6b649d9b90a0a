"""PROXY v2 TLVs (HAProxy's proxy-protocol.txt, sections 2.2.5 and 2.2.6)
read back, for the tests that look at what a backend is told."""

from __future__ import annotations

import struct

from protocols import proxy_header


def tlvs(data: bytes) -> dict[int, bytes]:
    """Type -> value of the TLVs that fill ``data``."""
    found: dict[int, bytes] = {}
    while data:
        kind, length = struct.unpack_from("!BH", data)
        found[kind] = data[3 : 3 + length]
        data = data[3 + length :]
    return found


def ssl_tlv(header: bytes) -> tuple[int, int, dict[int, bytes]]:
    """The ``client`` flags, ``verify`` and sub-TLVs of a TCP over IPv4
    header's PP2_TYPE_SSL."""
    (length,) = struct.unpack_from("!H", header, 14)
    ssl = tlvs(header[16 + 12 : 16 + length])[proxy_header.PP2_TYPE_SSL]
    flags, verify = struct.unpack_from("!BI", ssl)
    return flags, verify, tlvs(ssl[5:])
