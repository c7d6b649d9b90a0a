"""PROXY protocol headers that tell the backend who the client is.

Implements the HAProxy PROXY protocol specification (proxy-protocol.txt):
version 1 (section 2.1, text) and version 2 (section 2.2, binary) with the
TLVs of section 2.2.5 and 2.2.6: PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY (the SNI)
and PP2_TYPE_SSL with its version and cipher sub-TLVs. Dovecot reads
PP2_TYPE_SSL and then treats the session as TLS-secured; Postfix skips TLVs.

In-band identities (SMTP XCLIENT, IMAP ID, POP3 XCLIENT) belong to the
protocol machines, since they are part of each protocol's dialogue.
"""

from __future__ import annotations

import ipaddress
import struct

from protocols._base import BackendIdentity, Peer, TLSInfo

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_VERSION_2 = 0x20
_COMMAND_LOCAL = 0x00
_COMMAND_PROXY = 0x01
_FAMILY_UNSPEC = 0x00
_TCP_OVER_IPV4 = 0x11
_TCP_OVER_IPV6 = 0x21

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01


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


def proxy_v2(peer: Peer, tls: TLSInfo | None) -> bytes:
    """A binary PROXY header; with ``tls``, the SSL and AUTHORITY TLVs."""
    client, local = _addresses(peer)
    family = _TCP_OVER_IPV4 if client.version == 4 else _TCP_OVER_IPV6
    body = client.packed + local.packed + struct.pack("!HH", peer.client_port, peer.local_port)
    if tls is not None:
        if tls.alpn:
            body += _tlv(PP2_TYPE_ALPN, tls.alpn.encode("ascii"))
        if tls.server_name:
            body += _tlv(PP2_TYPE_AUTHORITY, tls.server_name.encode("idna"))
        # client = PP2_CLIENT_SSL only (no client certificate), verify = 0.
        ssl_value = struct.pack("!BI", PP2_CLIENT_SSL, 0)
        ssl_value += _tlv(PP2_SUBTYPE_SSL_VERSION, tls.version.encode("ascii"))
        ssl_value += _tlv(PP2_SUBTYPE_SSL_CIPHER, tls.cipher.encode("ascii"))
        body += _tlv(PP2_TYPE_SSL, ssl_value)
    return _header_v2(_COMMAND_PROXY, family, body)


def proxy_v2_local() -> bytes:
    """A LOCAL header: the proxy's own connection (health checks, probes)."""
    return _header_v2(_COMMAND_LOCAL, _FAMILY_UNSPEC, b"")


def _header_v2(command: int, family: int, body: bytes) -> bytes:
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", _VERSION_2 | command, family, len(body)) + body


def session_header(identity: BackendIdentity, peer: Peer, tls: TLSInfo | None) -> bytes:
    """What to send first on a backend connection carrying a client session."""
    if identity is BackendIdentity.PROXY_V1:
        return proxy_v1(peer)
    if identity is BackendIdentity.PROXY_V2:
        return proxy_v2(peer, tls)
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
