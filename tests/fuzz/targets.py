"""The fuzz targets: every protocol machine, the capability probes and the
PROXY header parser, each a function of one input that raises only when an
invariant breaks, with the seed programs its corpus starts from.

The seeds are the dialogues of ``tests.protocols.dialogues`` played to the
relay, then one deep exchange each: a DATA body, a BDAT chunk, a SASL
exchange, an IMAP literal and IDLE, a POP3 RETR body, XMPP SASL and stream
restarts; and for xmpp-server every outcome of the peer's certificate, on
the stream under TLS and on the one restarted after SASL EXTERNAL; for
xmpp-server-out the remote's STARTTLS, direct TLS, every verdict on its
certificate and every way it can fail before TLS.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Sequence
from typing import Any

from protocols import proxy_header
from protocols._base import (
    BackendIdentity,
    BareLineEndings,
    PeerCertificateFailure,
    SessionSettings,
    TLSMode,
)
from protocols.imap import IMAPCapabilityProbe
from protocols.pop3 import POP3CapabilityProbe
from protocols.smtp import SMTPCapabilityProbe
from protocols.xmpp import XMPPClientMachine, XMPPClientProbe, XMPPServerMachine, XMPPServerProbe
from protocols.xmpp_out import XMPPOutgoingMachine
from tests.fuzz.harness import (
    IDENTITY_BITS,
    LIMITS,
    PEER_CERTIFICATES,
    Flag,
    Machine,
    Op,
    Step,
    check,
    encode,
    held_bytes,
    run_program,
)
from tests.protocols.dialogues import (
    BACKEND_HEADER,
    IMAP,
    POP3,
    SMTP,
    XMPP,
    Dialogue,
    client_header,
)

Target = Callable[[bytes], None]


@dataclasses.dataclass(frozen=True)
class MachineTarget:
    """A protocol machine behind the driver model."""

    dialogue: Dialogue[Any]
    identities: tuple[BackendIdentity, ...]
    #: Exchanges after the relay is reached, each a seed of its own.
    exchanges: tuple[tuple[Step, ...], ...]
    machine: Callable[[SessionSettings, Any], Machine] | None = None
    #: The client's stream header, where it differs from the dialogue's.
    client_opening: bytes | None = None
    backend_greeting: bytes | None = None
    #: What the backend answers the proxy's announcement, per identity.
    announced: dict[BackendIdentity, bytes] = dataclasses.field(default_factory=dict)
    #: Whole programs of their own, beside those made of the dialogue.
    programs: tuple[bytes, ...] = ()

    def make(self, flags: int) -> tuple[Machine, SessionSettings]:
        identity = self.identities[
            (flags // Flag.IDENTITY_SHIFT) % (1 << IDENTITY_BITS) % len(self.identities)
        ]
        variant = bool(flags & Flag.VARIANT)
        overrides: dict[str, object] = {
            **LIMITS,
            "require_tls": bool(flags & Flag.REQUIRE_TLS),
            "tls_mode": TLSMode.IMPLICIT if flags & Flag.IMPLICIT_TLS else TLSMode.STARTTLS,
            "identity": identity,
            "smtp_bare_line_endings": BareLineEndings.ALLOW if variant else BareLineEndings.REJECT,
            "domains": ("example.com",) if variant else (),
            # xmpp-server: the peer's certificate required, or dialback allowed.
            "peer_certificate_failure": (
                PeerCertificateFailure.REFUSE if variant else PeerCertificateFailure.DIALBACK
            ),
        }
        settings = self.dialogue.settings(**overrides)
        build = self.machine or self.dialogue.machine
        return build(settings, self.dialogue.peer), settings

    def __call__(self, program: bytes) -> None:
        run_program(program, self.make)

    def seeds(self) -> list[bytes]:
        d = self.dialogue
        opening = d.client_opening if self.client_opening is None else self.client_opening
        greeting = d.backend_greeting if self.backend_greeting is None else self.backend_greeting
        hello: list[Step] = [(Op.CLIENT, opening)] if opening else []
        pre_tls = [*hello, (Op.CLIENT, d.capability), (Op.CLIENT, d.starttls)]
        relay = [
            *pre_tls,
            (Op.TLS, b""),
            *hello,
            (Op.CONNECTED, b""),
            (Op.BACKEND, greeting),
            (Op.CLIENT, d.relayed),
            (Op.BACKEND, d.relayed_answer),
        ]
        plaintext = [*hello, (Op.CLIENT, d.relayed), (Op.CONNECTED, b""), (Op.BACKEND, greeting)]
        implicit = [*hello, (Op.TLS, b""), (Op.CONNECTED, b""), (Op.BACKEND, greeting)]
        required = int(Flag.REQUIRE_TLS)
        seeds = [
            encode(required, pre_tls),
            encode(required, [*pre_tls, (Op.CLIENT, d.injected)]),
            encode(required, relay),
            encode(0, plaintext),
            encode(Flag.IMPLICIT_TLS | Flag.REQUIRE_TLS, implicit),
            encode(Flag.MISUSE, [*relay, (Op.CONNECTED, b""), (Op.TLS, b"")]),
        ]
        for index, identity in enumerate(self.identities[1:], start=1):
            announced = self.announced.get(identity, b"")
            steps = [*relay[:-2], (Op.BACKEND, announced), *relay[-2:]]
            seeds.append(encode(required | index * Flag.IDENTITY_SHIFT, steps))
        seeds += [encode(required, [*relay, *exchange]) for exchange in self.exchanges]
        return [*seeds, *self.programs]


def _exchange(*pairs: tuple[bytes, bytes]) -> tuple[Step, ...]:
    """Client commands, each with the backend's answer."""
    steps: list[Step] = []
    for command, answer in pairs:
        steps += [(Op.CLIENT, command), (Op.BACKEND, answer)]
    return tuple(steps)


SMTP_TARGET = MachineTarget(
    dialogue=SMTP,
    identities=(BackendIdentity.NONE, BackendIdentity.XCLIENT, BackendIdentity.PROXY_V2),
    announced={
        BackendIdentity.XCLIENT: b"250-mx\r\n250 XCLIENT ADDR PORT PROTO HELO NAME\r\n220 mx\r\n"
    },
    exchanges=(
        _exchange(
            (
                b"EHLO client.example\r\n",
                b"250-mx\r\n250-CHUNKING\r\n250-AUTH PLAIN SCRAM-PLUS\r\n250 STARTTLS\r\n",
            ),
            (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n", b"250 ok\r\n250 ok\r\n"),
            (b"DATA\r\n", b"354 go ahead\r\n"),
            (b"Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n", b"250 queued\r\n221 bye\r\n"),
        ),
        _exchange(
            (b"BDAT 5\r\nab\r\nc", b"250 ok\r\n"),
            (b"BDAT 3 LAST\r\nxyzNOOP\r\n", b"250 ok\r\n250 ok\r\n"),
        ),
        _exchange(
            (b"AUTH PLAIN\r\n", b"334 \r\n"),
            (b"AGFsaWNlAHNlY3JldA==\r\n", b"235 2.7.0 ok\r\n"),
        ),
        _exchange((b"DATA\r\n", b"354 go\r\n"), (b"a\nb\r\n.\r\n", b"250 ok\r\n")),
    ),
)

POP3_TARGET = MachineTarget(
    dialogue=POP3,
    identities=(BackendIdentity.NONE, BackendIdentity.POP3_XCLIENT, BackendIdentity.PROXY_V1),
    announced={BackendIdentity.POP3_XCLIENT: b"+OK\r\n"},
    exchanges=(
        _exchange(
            (b"CAPA\r\n", b"+OK\r\nTOP\r\nSASL PLAIN SCRAM-SHA-1-PLUS\r\nSTLS\r\n.\r\n"),
            (b"USER a\r\nPASS b\r\n", b"+OK\r\n+OK logged in\r\n"),
            (b"RETR 1\r\n", b"+OK 12 octets\r\nline\r\n..dot\r\n.\r\n"),
            (b"LIST\r\nQUIT\r\n", b"+OK\r\n1 12\r\n.\r\n+OK bye\r\n"),
        ),
        _exchange(
            (b"AUTH PLAIN\r\n", b"+ \r\n"),
            (b"AGFsaWNlAHNlY3JldA==\r\n", b"+OK logged in\r\n"),
            (b"AUTH\r\n", b"+OK\r\nPLAIN\r\nSCRAM-SHA-1-PLUS\r\n.\r\n"),
        ),
    ),
)

IMAP_TARGET = MachineTarget(
    dialogue=IMAP,
    identities=(BackendIdentity.NONE, BackendIdentity.IMAP_ID, BackendIdentity.PROXY_V2),
    announced={BackendIdentity.IMAP_ID: b"* ID NIL\r\nstp0 OK done\r\n"},
    exchanges=(
        _exchange(
            (b"a2 LOGIN {5}\r\n", b"+ ok\r\n"),
            (b"alice {6+}\r\nsecret\r\n", b"a2 OK [CAPABILITY IMAP4rev1 STARTTLS] done\r\n"),
            (b"a3 FETCH 1 BODY[]\r\n", b"* 1 FETCH (BODY[] {5}\r\nab\r\nc)\r\na3 OK done\r\n"),
            (b"a4 IDLE\r\n", b"+ idling\r\n* 2 EXISTS\r\n"),
            (b"DONE\r\n", b"a4 OK done\r\n"),
        ),
        _exchange(
            (b"a2 AUTHENTICATE PLAIN\r\n", b"+ \r\n"),
            (b"AGFsaWNlAHNlY3JldA==\r\n", b"a2 OK done\r\n"),
            (
                b"a3 CAPABILITY\r\na4 ID NIL\r\n",
                b"* CAPABILITY IMAP4rev1 AUTH=SCRAM-PLUS\r\na3 OK done\r\n",
            ),
            (b"a5 APPEND INBOX ~{3}\r\n", b"a5 NO refused\r\n"),
            (b"xyz\r\na6 LOGOUT\r\n", b"* BYE\r\na6 OK bye\r\n"),
        ),
    ),
)

_SASL = b"urn:ietf:params:xml:ns:xmpp-sasl"
_XMPP_EXCHANGES = (
    (
        (Op.CLIENT, b"<auth xmlns='%s' mechanism='PLAIN'>AGFsaWNl</auth>" % _SASL),
        (Op.BACKEND, b"<success xmlns='%s'/>" % _SASL),
        (Op.CLIENT, client_header()),
        (
            Op.BACKEND,
            BACKEND_HEADER + b"<stream:features><bind xmlns='urn:ietf:params:xml:"
            b"ns:xmpp-bind'/></stream:features>",
        ),
        (
            Op.CLIENT,
            b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"
            b"</iq><message to='a@b'><body>&lt;x&gt;<![CDATA[<y>]]></body></message>",
        ),
        (Op.BACKEND, b"<iq type='result' id='b'/> "),
        (Op.CLIENT, b"</stream:stream>"),
        (Op.BACKEND, b"</stream:stream>"),
    ),
    (
        (Op.CLIENT, b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"),
        (
            Op.BACKEND,
            b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
        ),
    ),
)

XMPP_CLIENT_TARGET = MachineTarget(
    dialogue=XMPP,
    identities=(BackendIdentity.NONE, BackendIdentity.PROXY_V2),
    exchanges=_XMPP_EXCHANGES,
    machine=XMPPClientMachine,
)

_SERVER_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"from='remote.example' to='example.com' version='1.0'>"
)
_SERVER_BACKEND_HEADER = BACKEND_HEADER.replace(b"jabber:client", b"jabber:server")
_EXTERNAL_FEATURES = (
    b"<stream:features><mechanisms xmlns='%s'><mechanism>EXTERNAL</mechanism>"
    b"</mechanisms><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>" % _SASL
)


def _restart(sender: bytes | None) -> tuple[Step, ...]:
    """SASL EXTERNAL for remote.example, its success, and the stream the
    peer restarts from ``sender`` (None: without ``from``)."""
    claimed = b"" if sender is None else b" from='%s'" % sender
    return (
        (Op.CLIENT, b"<auth xmlns='%s' mechanism='EXTERNAL'>cmVtb3RlLmV4YW1wbGU=</auth>" % _SASL),
        (Op.BACKEND, b"<success xmlns='%s'/>" % _SASL),
        (Op.CLIENT, _SERVER_HEADER.replace(b" from='remote.example'", claimed)),
        (Op.BACKEND, _SERVER_BACKEND_HEADER + b"<stream:features/>"),
        (Op.CLIENT, b"<iq type='get' id='ok' from='remote.example' to='example.com'/>"),
    )


#: The peer's certificates, as ``harness.PEER_CERTIFICATES`` numbers them.
_TRUSTED, _NONE, _EXPIRED, _OTHER_DOMAIN = range(len(PEER_CERTIFICATES))
#: Settings octets: the peer's certificate required, or dialback allowed.
_REFUSE = Flag.REQUIRE_TLS | Flag.VARIANT
_DIALBACK = int(Flag.REQUIRE_TLS)


def _peer(
    flags: int, certificate: int, sender: bytes | None = b"remote.example", *after: Step
) -> bytes:
    """An xmpp-server program: STARTTLS (direct TLS with ``Flag.IMPLICIT_TLS``),
    the peer's ``certificate``, its stream under TLS from ``sender``, then
    ``after`` once the backend answered."""
    claimed = b"" if sender is None else b" from='%s'" % sender
    opening = (
        []
        if flags & Flag.IMPLICIT_TLS
        else [(Op.CLIENT, _SERVER_HEADER), (Op.CLIENT, XMPP.starttls)]
    )
    return encode(
        flags,
        [
            *opening,
            (Op.TLS, bytes([certificate]) if certificate else b""),
            (Op.CLIENT, _SERVER_HEADER.replace(b" from='remote.example'", claimed)),
            (Op.CONNECTED, b""),
            (Op.BACKEND, _SERVER_BACKEND_HEADER + _EXTERNAL_FEATURES),
            *after,
        ],
    )


#: Every outcome of a peer's certificate (protocols/xmpp.py, "Peer certificates").
_PEER_PROGRAMS = (
    # Verified, restarted after SASL from the same domain, then from another,
    # without 'from', from a JID.
    _peer(_REFUSE, _TRUSTED, b"remote.example", *_restart(b"Remote.Example.")),
    _peer(_REFUSE, _TRUSTED, b"remote.example", *_restart(b"evil.example")),
    _peer(_DIALBACK, _TRUSTED, b"remote.example", *_restart(None)),
    _peer(_DIALBACK, _TRUSTED, b"remote.example", *_restart(b"a@remote.example")),
    # Refused on the stream under TLS: no certificate, an untrusted one (by
    # direct TLS), one for another domain, a 'from' it does not name, none,
    # a 'from' that is no domain.
    _peer(_REFUSE, _NONE),
    _peer(_REFUSE | Flag.IMPLICIT_TLS, _EXPIRED),
    _peer(_REFUSE, _OTHER_DOMAIN),
    _peer(_REFUSE, _TRUSTED, b"evil.example"),
    _peer(_REFUSE, _TRUSTED, None),
    _peer(_REFUSE, _TRUSTED, b"a@remote.example"),
    # Unverified under dialback: through, and restarted from any domain.
    _peer(_DIALBACK, _OTHER_DOMAIN, b"remote.example", *_restart(b"evil.example")),
    _peer(_DIALBACK, _EXPIRED, b"remote.example", *_restart(b"remote.example")),
)
XMPP_SERVER_TARGET = MachineTarget(
    dialogue=XMPP,
    identities=(BackendIdentity.NONE, BackendIdentity.PROXY_V2),
    exchanges=(
        (
            (Op.CLIENT, b"<db:result from='remote.example' to='example.com'>abc</db:result>"),
            (Op.BACKEND, b"<db:result type='valid' from='example.com' to='remote.example'/>"),
        ),
    ),
    machine=XMPPServerMachine,
    client_opening=_SERVER_HEADER,
    backend_greeting=_SERVER_BACKEND_HEADER
    + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>",
    programs=_PEER_PROGRAMS,
)


# --------------------------------------------------------------------------
# Outgoing server-to-server streams: the client is the local server, the
# backend the remote one, whose side goes to TLS.

_LOCAL_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"from='local.example' to='remote.example' version='1.0'>"
)
_REMOTE_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"id='r3m0t3' from='remote.example' to='local.example' version='1.0'>"
)
_STARTTLS_FEATURES = (
    b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>"
)
_PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
_DIALBACK_FEATURES = (
    b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
)


@dataclasses.dataclass(frozen=True)
class OutgoingTarget:
    """``xmpp-server-out``. ``Flag.REQUIRE_TLS`` refuses a remote whose
    certificate does not verify (else dialback), ``Flag.VARIANT`` lets the
    local server send only from ``local.example``."""

    def make(self, flags: int) -> tuple[Machine, SessionSettings]:
        settings = SessionSettings(
            hostname="proxy.example",
            tls_mode=TLSMode.STARTTLS,
            require_tls=True,
            capabilities=(),
            domains=("local.example",) if flags & Flag.VARIANT else (),
            peer_certificate_failure=(
                PeerCertificateFailure.REFUSE
                if flags & Flag.REQUIRE_TLS
                else PeerCertificateFailure.DIALBACK
            ),
            **LIMITS,  # type: ignore[arg-type]
        )
        return XMPPOutgoingMachine(settings, XMPP.peer), settings

    def __call__(self, program: bytes) -> None:
        run_program(program, self.make)

    def seeds(self) -> list[bytes]:
        local: Step = (Op.CLIENT, _LOCAL_HEADER)
        starttls = [
            local,
            (Op.CONNECTED, b""),
            (Op.BACKEND, _REMOTE_HEADER + _STARTTLS_FEATURES),
            (Op.BACKEND, _PROCEED),
        ]
        relay = [
            (Op.BACKEND, _REMOTE_HEADER + _DIALBACK_FEATURES),
            (Op.CLIENT, b"<db:result from='local.example' to='remote.example'>k3y</db:result>"),
            (Op.BACKEND, b"<db:result from='remote.example' to='local.example' type='valid'/>"),
            (Op.CLIENT, b"<message to='a@remote.example'><body>&lt;starttls/&gt;</body></message>"),
            (Op.CLIENT, b"</stream:stream>"),
            (Op.BACKEND, b"</stream:stream>"),
        ]
        direct = [local, (Op.CONNECTED, b"\x01")]
        refuse, both = int(Flag.REQUIRE_TLS), Flag.REQUIRE_TLS | Flag.VARIANT
        return [
            # Verified, by STARTTLS and by direct TLS; pipelined after <proceed/>.
            encode(both, [*starttls, (Op.TLS, b""), *relay]),
            encode(refuse, [*direct, (Op.TLS, b""), *relay]),
            encode(refuse, [*starttls[:-1], (Op.BACKEND, _PROCEED + b"<message/>")]),
            # Every other verdict on the remote's certificate, refused or let through.
            *(
                encode(flags, [*starttls, (Op.TLS, bytes([certificate])), *relay])
                for flags in (refuse, 0)
                for certificate in range(1, len(PEER_CERTIFICATES))
            ),
            # The remote fails before TLS: no STARTTLS, <failure/>, a stream
            # error, the end of its stream; DNS or the connection fails.
            encode(
                refuse,
                [local, (Op.CONNECTED, b""), (Op.BACKEND, _REMOTE_HEADER + _DIALBACK_FEATURES)],
            ),
            encode(
                refuse,
                [
                    *starttls[:-1],
                    (Op.BACKEND, b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"),
                ],
            ),
            encode(
                refuse,
                [
                    local,
                    (Op.CONNECTED, b""),
                    (
                        Op.BACKEND,
                        _REMOTE_HEADER + b"<stream:error><host-unknown "
                        b"xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
                    ),
                ],
            ),
            encode(refuse, [local, (Op.CONNECTED, b""), (Op.BACKEND_EOF, b"")]),
            encode(refuse, [local, (Op.FAILED, b"")]),
            # The local server's header refused: another sender, no 'to'.
            encode(both, [(Op.CLIENT, _LOCAL_HEADER.replace(b"local.", b"intruder."))]),
            encode(refuse, [(Op.CLIENT, _LOCAL_HEADER.replace(b" to='remote.example'", b""))]),
        ]


XMPP_SERVER_OUT_TARGET = OutgoingTarget()


# --------------------------------------------------------------------------
# Capability probes: the first octet picks one, the rest are two-octet
# length-prefixed reads from the backend.

PROBES = (
    SMTPCapabilityProbe,
    POP3CapabilityProbe,
    IMAPCapabilityProbe,
    XMPPClientProbe,
    XMPPServerProbe,
)


def probe_target(program: bytes) -> None:
    if not program:
        return
    probe = PROBES[program[0] % len(PROBES)]("proxy.example")
    at, largest, sent = 1, 0, 0
    baseline = held_bytes(probe)
    while at < len(program):
        length = int.from_bytes(program[at : at + 2], "big")
        data = program[at + 2 : at + 2 + length]
        at += 2 + length
        largest = max(largest, len(data))
        done = probe.result is not None or probe.error is not None
        probe.receive_data(data)
        if done:
            continue
        while (send := probe.next_send()) is not None:
            check(type(send) is bytes and bool(send), f"probe sends {send!r}")
            sent += 1
        check(sent <= 3, f"probe sent {sent} commands")
        check(probe.result is None or probe.error is None, "probe has a result and an error")
        if probe.result is not None:
            check(all(isinstance(item, str) for item in probe.result), "result not strings")
        held = held_bytes(probe)
        limit = baseline + 2 * SessionSettings.max_reply_line_length + largest
        check(held <= limit, f"probe holds {held} bytes, limit {limit}")


def _reads(*chunks: bytes) -> bytes:
    return b"".join(len(chunk).to_bytes(2, "big") + chunk for chunk in chunks)


PROBE_SEEDS = (
    b"\x00" + _reads(b"220 mx ESMTP\r\n", b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n"),
    b"\x01" + _reads(b"+OK ready\r\n", b"+OK\r\nTOP\r\nSASL PLAIN\r\n.\r\n"),
    b"\x02" + _reads(b"* OK ready\r\n", b"* CAPABILITY IMAP4rev1 IDLE\r\np1 OK done\r\n"),
    b"\x02" + _reads(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n"),
    b"\x03"
    + _reads(
        BACKEND_HEADER,
        b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>",
    ),
    b"\x04"
    + _reads(
        BACKEND_HEADER.replace(b"jabber:client", b"jabber:server"),
        b"<stream:error><host-unknown/></stream:error>",
    ),
)


# --------------------------------------------------------------------------
# The PROXY header parser.


def proxy_header_target(data: bytes) -> None:
    """``parse`` gives a header, "need more" or ``ProxyHeaderError``, and
    decides as soon as the bytes allow: a header found stays the same
    whatever follows, "need more" is never said past the longest header, and
    a v1 line accepted is one a sender could have written."""
    outcomes = [_parse(data[:end]) for end in (len(data) // 2, len(data))]
    half, whole = outcomes
    if isinstance(half, proxy_header.ProxyHeader):
        check(whole == half, f"{data!r}: header changed with more bytes: {half} -> {whole}")
    if half is proxy_header.ProxyHeaderError:
        check(whole is half, f"{data!r}: an error became {whole} with more bytes")
    if whole is None:
        check(len(data) < proxy_header.V2_MAX_LENGTH, f"{data!r}: still needs more")
    if isinstance(whole, proxy_header.ProxyHeader):
        check(0 < whole.length <= len(data), f"{data!r}: length {whole.length}")
        if whole.addresses is not None and data.startswith(proxy_header.V1_PREFIX):
            _check_v1(data[: whole.length], whole.addresses)


def _parse(data: bytes) -> proxy_header.ProxyHeader | type[Exception] | None:
    try:
        return proxy_header.parse(data)
    except proxy_header.ProxyHeaderError:
        return proxy_header.ProxyHeaderError


def _check_v1(line: bytes, addresses: tuple[str, int, str, int]) -> None:
    """HAProxy's proxy-protocol.txt section 2.1: both addresses of the family
    named, ports in plain decimal."""
    fields = line[:-2].split(b" ")
    family = fields[1]
    source, source_port, destination, destination_port = addresses
    for address in (source, destination):
        check((":" in address) == (family == b"TCP6"), f"{line!r}: {address} is not {family!r}")
        check("%" not in address, f"{line!r}: a scoped address {address}")
    for text, port in ((fields[4], source_port), (fields[5], destination_port)):
        check(text == str(port).encode(), f"{line!r}: port {text!r} read as {port}")


def _v2(family: int, body: bytes) -> bytes:
    return proxy_header.V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


PROXY_HEADER_SEEDS = (
    b"PROXY TCP4 192.0.2.10 198.51.100.1 49152 25\r\nEHLO x\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 49152 143\r\n",
    b"PROXY UNKNOWN\r\n",
    _v2(0x11, bytes([192, 0, 2, 10, 198, 51, 100, 1]) + struct.pack("!HH", 49152, 25)),
    _v2(0x21, bytes(32) + struct.pack("!HH", 1, 2) + b"\x04\x00\x01x"),
    proxy_header.V2_SIGNATURE + b"\x20\x00\x00\x00",
)


# --------------------------------------------------------------------------

MACHINES: dict[str, MachineTarget] = {
    "smtp": SMTP_TARGET,
    "pop3": POP3_TARGET,
    "imap": IMAP_TARGET,
    "xmpp-client": XMPP_CLIENT_TARGET,
    "xmpp-server": XMPP_SERVER_TARGET,
}
TARGETS: dict[str, Target] = {
    **MACHINES,
    "xmpp-server-out": XMPP_SERVER_OUT_TARGET,
    "probes": probe_target,
    "proxy-header": proxy_header_target,
}


def seeds(name: str) -> Sequence[bytes]:
    if name in MACHINES:
        return MACHINES[name].seeds()
    if name == "xmpp-server-out":
        return XMPP_SERVER_OUT_TARGET.seeds()
    return PROBE_SEEDS if name == "probes" else PROXY_HEADER_SEEDS


#: Words for libFuzzer's dictionary, beside the dialogues' own.
EXTRA_WORDS: dict[str, tuple[bytes, ...]] = {
    "smtp": (
        b"RCPT TO:<>",
        b"AUTH PLAIN",
        b"334 ",
        b"354 ",
        b"250-",
        b"250 ",
        b"XCLIENT",
        b"QUIT",
        b"LAST",
        b"\r",
        b"\n",
        b".",
    ),
    "pop3": (
        b"CAPA",
        b"RETR 1",
        b"LIST",
        b"+ ",
        b"-ERR",
        b"+OK\r\n",
        b"\r\n.\r\n",
        b"SASL",
        b"XCLIENT",
    ),
    "imap": (
        b"* OK ",
        b"+ ",
        b"AUTHENTICATE",
        b"APPEND",
        b"DONE",
        b"ID",
        b"~{1}",
        b"{0}",
        b"[CAPABILITY ",
        b"* BYE",
        b"FETCH",
        b"COMPRESS",
    ),
    "xmpp-client": (
        b"<stream:stream",
        b"</stream:stream>",
        b"xmlns='jabber:client'",
        b"<stream:features>",
        b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
        b"<?xml",
        b"<!--",
        b"<!DOCTYPE",
        b"version='1.0'",
        b"<starttls",
    ),
    "probes": (
        b"\r\n",
        b"220 ",
        b"250-",
        b"+OK",
        b".\r\n",
        b"* OK",
        b"p1 OK",
        b"<stream:",
        b"CAPABILITY",
    ),
    "proxy-header": (
        b"PROXY ",
        b"TCP4 ",
        b"TCP6 ",
        b"UNKNOWN",
        b"\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n",
        b"\x21\x11",
        b"\x21\x21",
        b"::ffff:",
        b"%",
    ),
}
EXTRA_WORDS["xmpp-server"] = (*EXTRA_WORDS["xmpp-client"], b"jabber:server", b"db:result")
EXTRA_WORDS["xmpp-server-out"] = (*EXTRA_WORDS["xmpp-server"], _PROCEED, _STARTTLS_FEATURES)


def dictionary(name: str) -> list[bytes]:
    words = list(EXTRA_WORDS.get(name, ()))
    if name in MACHINES:
        words += MACHINES[name].dialogue.words
    return words
