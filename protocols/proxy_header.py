"""PROXY protocol headers (HAProxy's proxy-protocol.txt), both ways: read
from a trusted L4 load balancer in front of the proxy, written to the
backend to tell it who the client is.

Theory of operation
-------------------
*Inbound.* When several proxy instances stand behind an L4 balancer (HAProxy, IPVS, a
cloud NLB), every connection arrives from the balancer's address; the
balancer puts the real client's addresses in a PROXY header before the first
byte of the client's stream (HAProxy's proxy-protocol.txt: version 1, section
2.1, a text line of at most 107 bytes; version 2, section 2.2, a binary block
announced by a 12-byte signature). ``parse`` takes the bytes received so far
and says whether a complete header is there, where it ends and which
addresses it carries. ``LOCAL`` (v2) and ``UNKNOWN`` (v1) headers mean "use
the connection's own addresses" (health checks).

Only connections from ``trusted_proxies`` are parsed at all; the driver never
honours a header from anyone else.

*Outbound.* Version 1 (section 2.1) or version 2 (section 2.2) with the TLVs
of sections 2.2.5 and 2.2.6: PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY (the SNI) and
PP2_TYPE_SSL with its version and cipher sub-TLVs, and for an XMPP peer
whose certificate verified, its domain as PP2_SUBTYPE_SSL_CN. Dovecot reads PP2_TYPE_SSL
and then treats the session as TLS-secured; Postfix skips TLVs. The
in-band identities (SMTP XCLIENT, IMAP ID, POP3 XCLIENT) belong to the
protocol machines, since they are part of each protocol's dialogue.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

from protocols._base import BackendIdentity, Peer, RemoteProtocolError, TLSInfo

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: Section 2.1: "a receiver may reject an incomplete line which does not
#: contain the CRLF sequence in the first 107 characters".
V1_MAX_LENGTH = 107
#: A v2 header is 16 bytes plus its announced length; TLVs make it longer
#: than addresses alone, but nothing legitimate comes near this.
V2_MAX_LENGTH = 16 + 4096

_AF_INET, _AF_INET6 = 0x1, 0x2
_VERSION_2 = 0x20
_FAMILY_UNSPEC = 0x00
_TCP_OVER_IPV4 = 0x11
_TCP_OVER_IPV6 = 0x21

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
#: A v1 port: plain decimal. ``int`` alone would also take "+25", "2_5" and
#: "25\r", none of which a sender writes.
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_COMMAND_LOCAL, _COMMAND_PROXY = 0x0, 0x1


class ProxyHeaderError(RemoteProtocolError):
    """The load balancer's bytes are not a valid PROXY header."""


@dataclass(frozen=True)
class ProxyHeader:
    #: Octets the header took, the client's stream starts after them.
    length: int
    #: (client address, client port, proxy-facing address, port), or None
    #: for LOCAL / UNKNOWN headers.
    addresses: tuple[str, int, str, int] | None


def parse(data: bytes) -> ProxyHeader | None:
    """A complete header at the start of ``data``, or ``None`` for "need more".

    Raises ``ProxyHeaderError`` as soon as the bytes cannot become a header.
    """
    if data[:12] == V2_SIGNATURE[: len(data[:12])]:
        return _parse_v2(data) if len(data) >= 12 else None
    if data[:6] == V1_PREFIX[: len(data[:6])]:
        return _parse_v1(data) if len(data) >= 6 else None
    raise ProxyHeaderError("no PROXY header where one is required")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    fields = data[:end].decode("ascii", "replace").split(" ")
    if fields[1:2] == ["UNKNOWN"]:
        return ProxyHeader(end + 2, None)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line: {data[:end]!r}")
    try:
        source, destination = ipaddress.ip_address(fields[2]), ipaddress.ip_address(fields[3])
    except ValueError:
        raise ProxyHeaderError(f"malformed PROXY v1 line: {data[:end]!r}") from None
    ports = tuple(int(port) if _V1_PORT.fullmatch(port) else -1 for port in fields[4:6])
    version = 4 if fields[1] == "TCP4" else 6
    # Both addresses of the family named; no IPv6 scope ("%eth0"), which
    # ipaddress accepts but the protocol has no room for.
    if (
        {source.version, destination.version} != {version}
        or "%" in fields[2] + fields[3]
        or not all(0 <= port < 65536 for port in ports)
    ):
        raise ProxyHeaderError(f"malformed PROXY v1 line: {data[:end]!r}")
    return ProxyHeader(end + 2, (str(source), ports[0], str(destination), ports[1]))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version_command, family_protocol, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2 or version_command & 0xF not in (_COMMAND_LOCAL, _COMMAND_PROXY):
        raise ProxyHeaderError(f"unsupported PROXY v2 version/command {version_command:#x}")
    if 16 + length > V2_MAX_LENGTH:
        raise ProxyHeaderError(f"PROXY v2 header of {16 + length} bytes is too long")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    family = family_protocol >> 4
    if version_command & 0xF == _COMMAND_LOCAL or family not in (_AF_INET, _AF_INET6):
        return ProxyHeader(total, None)
    size = 4 if family == _AF_INET else 16
    if length < 2 * size + 4:
        raise ProxyHeaderError("PROXY v2 address block too short")
    body = data[16:total]
    make = ipaddress.IPv4Address if family == _AF_INET else ipaddress.IPv6Address
    source, destination = make(body[:size]), make(body[size : 2 * size])
    source_port, destination_port = struct.unpack_from("!HH", body, 2 * size)
    return ProxyHeader(total, (str(source), source_port, str(destination), destination_port))


# --------------------------------------------------------------------------
# Outbound: the headers the proxy writes.


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def _addresses(peer: Peer) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """Client and local address in one family (IPv4-mapped v6 peers become v4)."""
    client = ipaddress.ip_address(peer.client_address)
    local = ipaddress.ip_address(peer.local_address)
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped
    if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped:
        local = local.ipv4_mapped
    if client.version != local.version:
        client = ipaddress.IPv6Address(f"::ffff:{client}") if client.version == 4 else client
        local = ipaddress.IPv6Address(f"::ffff:{local}") if local.version == 4 else local
    return client, local


def proxy_v1(peer: Peer) -> bytes:
    """``PROXY TCP4|TCP6 src dst sport dport`` (spec section 2.1)."""
    client, local = _addresses(peer)
    family = "TCP4" if client.version == 4 else "TCP6"
    return f"PROXY {family} {client} {local} {peer.client_port} {peer.local_port}\r\n".encode()


def proxy_v2(peer: Peer, tls: TLSInfo | None, verified: str | None = None) -> bytes:
    """A binary PROXY header; with ``tls``, the SSL and AUTHORITY TLVs.

    The SSL TLV's ``client`` has PP2_CLIENT_CERT_CONN and _SESS when the
    client presented a certificate (sessions that ask for one are never
    resumed), and its ``verify`` is 0 only for a certificate that was
    verified for the name ``verified`` (an XMPP peer's domain), which then
    goes in PP2_SUBTYPE_SSL_CN: section 2.2.6, "zero if the client
    presented a certificate and it was successfully verified".
    """
    client, local = _addresses(peer)
    family = _TCP_OVER_IPV4 if client.version == 4 else _TCP_OVER_IPV6
    body = client.packed + local.packed + struct.pack("!HH", peer.client_port, peer.local_port)
    if tls is not None:
        if tls.alpn:
            body += _tlv(PP2_TYPE_ALPN, tls.alpn.encode("ascii"))
        if tls.server_name:
            body += _tlv(PP2_TYPE_AUTHORITY, tls.server_name.encode("idna"))
        flags = PP2_CLIENT_SSL
        if tls.peer_certificate is not None:
            flags |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
        ssl_value = struct.pack("!BI", flags, 0 if verified is not None else 1)
        ssl_value += _tlv(PP2_SUBTYPE_SSL_VERSION, tls.version.encode("ascii"))
        if verified is not None:
            ssl_value += _tlv(PP2_SUBTYPE_SSL_CN, verified.encode())
        ssl_value += _tlv(PP2_SUBTYPE_SSL_CIPHER, tls.cipher.encode("ascii"))
        body += _tlv(PP2_TYPE_SSL, ssl_value)
    return _header_v2(_COMMAND_PROXY, family, body)


def proxy_v2_local() -> bytes:
    """A LOCAL header: the proxy's own connection (health checks, probes)."""
    return _header_v2(_COMMAND_LOCAL, _FAMILY_UNSPEC, b"")


def _header_v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", _VERSION_2 | command, family, len(body)) + body


def session_header(
    identity: BackendIdentity, peer: Peer, tls: TLSInfo | None, verified: str | None = None
) -> bytes:
    """What to send first on a backend connection carrying a client session;
    ``verified``: the name the client's certificate was verified for."""
    if identity is BackendIdentity.PROXY_V1:
        return proxy_v1(peer)
    if identity is BackendIdentity.PROXY_V2:
        return proxy_v2(peer, tls, verified)
    return b""


def probe_header(identity: BackendIdentity, own_connection: Peer) -> bytes:
    """What to send first on the proxy's own probe connections.

    Version 2 has a LOCAL command for this; version 1's ``PROXY UNKNOWN`` is
    refused by Postfix, so a v1 probe names its own connection's addresses.
    """
    if identity is BackendIdentity.PROXY_V1:
        return proxy_v1(own_connection)
    if identity is BackendIdentity.PROXY_V2:
        return proxy_v2_local()
    return b""
