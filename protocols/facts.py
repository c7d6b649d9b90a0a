"""What each listener ``protocol`` is, as data: the one place for the
per-protocol facts that configuration, the driver and the machines use.

Plain data with no machine behind it, so that the configuration can read it
without importing the machines (lxml among them); ``registry`` adds the
machine and the probe that serve each protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols._base import BackendIdentity


@dataclass(frozen=True)
class ProtocolFacts:
    #: Identities the protocol can carry in-band, beyond the PROXY headers
    #: that work for all of them.
    in_band_identities: frozenset[BackendIdentity]
    #: Longest client command line, CRLF included.
    max_line_length: int
    #: A relayed session with no traffic either way, seconds.
    session_idle: float
    #: Advertised while no capability probe has succeeded: a conservative
    #: list that every current server supports.
    fallback_capabilities: tuple[str, ...]
    #: ALPN protocols offered on implicit-TLS listeners (XEP-0368 section 3).
    alpn: tuple[str, ...] = ()
    #: The probed capabilities only matter to sessions that may stay in
    #: plaintext (XMPP synthesizes its pre-TLS features): with require_tls
    #: the backend is not probed at all.
    probe_only_for_plaintext: bool = False
    #: XMPP: largest stanza (top-level element) from the client, octets.
    max_stanza_size: int = 256 * 1024


# A server relays what its c2s limit let through (Prosody's
# c2s_stanza_size_limit, 256 KiB) with its own stamps added (from=): s2s
# needs more room, as both servers give it (Prosody's s2s_stanza_size_limit
# and ejabberd's example s2s max_stanza_size, 512 KiB). One stanza over the
# limit ends the whole s2s stream.
SERVER_TO_SERVER = ProtocolFacts(
    in_band_identities=frozenset(),
    max_line_length=8192,
    session_idle=900.0,
    fallback_capabilities=(),
    alpn=("xmpp-server",),
    probe_only_for_plaintext=True,
    max_stanza_size=512 * 1024,
)

# Line lengths: SMTP, Postfix's line_length_limit; IMAP, RFC 7162 section 4
# asks for at least 8192 and Dovecot allows 64 KiB (imap_max_line_length);
# POP3, RFC 2449 section 4 says 255 but SASL initial responses need more;
# XMPP has no lines (its stanza limits apply). Idle times: SMTP, RFC 5321
# section 4.5.3.2.7 (5 minutes); IMAP, RFC 9051 section 5.4 (autologout no
# less than 30 minutes, IDLE sessions live for hours); POP3, RFC 1939
# section 3 (10 minutes); XMPP, whitespace keepalives every few minutes.
FACTS: dict[str, ProtocolFacts] = {
    "smtp": ProtocolFacts(
        in_band_identities=frozenset({BackendIdentity.XCLIENT}),
        max_line_length=2048,
        session_idle=300.0,
        fallback_capabilities=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"),
    ),
    # LITERAL+ holds whatever the backend offers (the machine sends every
    # literal on as synchronizing) and ID is answered by the proxy.
    "imap": ProtocolFacts(
        in_band_identities=frozenset({BackendIdentity.IMAP_ID}),
        max_line_length=65536,
        session_idle=1800.0,
        fallback_capabilities=("IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"),
    ),
    "pop3": ProtocolFacts(
        in_band_identities=frozenset({BackendIdentity.POP3_XCLIENT}),
        max_line_length=2048,
        session_idle=600.0,
        fallback_capabilities=(
            "TOP",
            "UIDL",
            "USER",
            "PIPELINING",
            "RESP-CODES",
            "AUTH-RESP-CODE",
        ),
    ),
    # The proxy's pre-TLS features need nothing from the backend; its probed
    # features are only shown to plaintext sessions.
    "xmpp-client": ProtocolFacts(
        in_band_identities=frozenset(),
        max_line_length=8192,
        session_idle=900.0,
        fallback_capabilities=(),
        alpn=("xmpp-client",),
        probe_only_for_plaintext=True,
    ),
    "xmpp-server": SERVER_TO_SERVER,
    # The same streams, the other way: ALPN is what the proxy offers on a
    # direct-TLS route. Nothing is probed (there is no backend).
    "xmpp-server-out": SERVER_TO_SERVER,
}
