"""The spawn request's binary layout, and ``wire`` in agreement with ``tls/helper/wire.h``."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from protocols._base import PeerCertificate, TLSInfo
from starttls_proxy import wire
from starttls_proxy.wire import (
    MAX_EARLY_BYTES,
    MAX_REASON,
    MAX_SPAWN_REQUEST,
    SPAWN_HEADER,
    HandshakeFailure,
    SpawnRequest,
    TLSRole,
    encode_alpn,
    read_report,
    usable_hint,
)
from tests import wire_h


def decode(message: bytes) -> SpawnRequest:
    """The inverse of ``SpawnRequest.encode``, read as ``tls/helper/wire.h`` lays
    the request out; ``ValueError`` for anything it would not make. (The
    helper's own parser is C; ``tests/tlshelper/test_spawn_requests.py``
    fuzzes it through the real process.)"""
    if len(message) > MAX_SPAWN_REQUEST:
        raise ValueError("spawn request too long")
    reader = _Reader(message)
    timeout, peer_trust, role = SPAWN_HEADER.unpack(reader.take(SPAWN_HEADER.size))
    if peer_trust > wire.MAX_TRUST_STORES:
        raise ValueError(f"peer trust store {peer_trust}")
    hint = reader.field(1)
    peer_name = reader.field(1)
    alpn = _alpn_names(reader.field(1))
    early = reader.field(2)
    if reader.offset != len(message):
        raise ValueError("bytes after the spawn request")
    if len(early) > MAX_EARLY_BYTES:
        raise ValueError(f"more than {MAX_EARLY_BYTES} early bytes")
    for name in (hint, peer_name):
        if name and usable_hint(name.decode("latin-1")) is None:
            raise ValueError("a host name field holds no host name")
    if role not in set(TLSRole):
        raise ValueError(f"role {role}")
    if role == TLSRole.ACCEPT and peer_name:
        raise ValueError("a peer name on accept")
    if role == TLSRole.CONNECT and not (peer_name and peer_trust and not early):
        raise ValueError("connect without a peer name or a trust store, or with early bytes")
    return SpawnRequest(
        handshake_timeout=timeout / 1000,
        server_name_hint=hint.decode("ascii") if hint else None,
        alpn=alpn,
        early=early,
        peer_trust=peer_trust,
        role=TLSRole(role),
        peer_name=peer_name.decode("ascii") if peer_name else None,
    )


def _alpn_names(wire: bytes) -> tuple[str, ...]:
    reader = _Reader(wire)
    names = []
    while reader.offset < len(wire):
        name = reader.field(1)
        if not name:
            raise ValueError("empty ALPN protocol name")
        names.append(name.decode("ascii"))
    return tuple(names)


class _Reader:
    """Length-prefixed fields out of ``data``; ``ValueError`` where it ends early."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise ValueError("spawn request truncated")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def field(self, length_size: int) -> bytes:
        return self.take(int.from_bytes(self.take(length_size), "big"))


def _raw(
    *, role: int, peer_name: bytes = b"", trust: int = 0, early: bytes = b"", hint: bytes = b""
) -> bytes:
    """A spawn request field by field, whether or not it is well-formed."""
    return b"".join(
        (
            SPAWN_HEADER.pack(10_000, trust, role),
            bytes((len(hint),)),
            hint,
            bytes((len(peer_name),)),
            peer_name,
            b"\x00",
            len(early).to_bytes(2, "big"),
            early,
        )
    )


_ASCII_NAME = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


#: At most 6 * 40 bytes: always fits the list's one-byte length.
_ALPN = st.lists(_ASCII_NAME.filter(lambda name: len(name) < 40), max_size=6).map(tuple)


_HOST_NAME = _ASCII_NAME.filter(lambda name: len(name) <= 255)
# Whole milliseconds: what the wire carries.
_TIMEOUT = st.integers(1, 2**32 - 1).map(lambda ms: ms / 1000)

_REQUESTS = st.builds(
    SpawnRequest,
    handshake_timeout=_TIMEOUT,
    server_name_hint=st.none() | _HOST_NAME,
    alpn=_ALPN,
    early=st.binary(max_size=MAX_EARLY_BYTES),
    peer_trust=st.integers(0, wire.MAX_TRUST_STORES),
) | st.builds(
    SpawnRequest,
    handshake_timeout=_TIMEOUT,
    server_name_hint=st.none() | _HOST_NAME,
    alpn=_ALPN,
    peer_trust=st.integers(1, wire.MAX_TRUST_STORES),
    role=st.just(TLSRole.CONNECT),
    peer_name=_HOST_NAME,
)


def test_a_request_as_wire_h_lays_it_out() -> None:
    request = SpawnRequest(
        handshake_timeout=30.0,
        server_name_hint="xmpp.example",
        alpn=("xmpp-client", "h2"),
        early=b"\x16\x03\x01",
        peer_trust=2,
    )
    assert request.encode() == (
        struct.pack("!I", 30_000)
        + b"\x02\x00"
        + b"\x0cxmpp.example"
        + b"\x00"
        + b"\x0f\x0bxmpp-client\x02h2"
        + b"\x00\x03\x16\x03\x01"
    )
    assert decode(request.encode()) == request


def test_a_connect_request_as_wire_h_lays_it_out() -> None:
    request = SpawnRequest(
        handshake_timeout=30.0,
        server_name_hint="xmpp.example",
        alpn=("xmpp-server",),
        peer_trust=1,
        role=TLSRole.CONNECT,
        peer_name="remote.example",
    )
    assert request.encode() == (
        struct.pack("!I", 30_000)
        + b"\x01\x01"
        + b"\x0cxmpp.example"
        + b"\x0eremote.example"
        + b"\x0c\x0bxmpp-server"
        + b"\x00\x00"
    )
    assert decode(request.encode()) == request


def test_the_smallest_request() -> None:
    encoded = SpawnRequest(handshake_timeout=0.0004).encode()
    assert len(encoded) == wire.SPAWN_FIXED_SIZE
    # A timeout that rounds to nothing still has a deadline.
    assert decode(encoded) == SpawnRequest(handshake_timeout=0.001)


@given(_REQUESTS)
def test_requests_survive_the_wire(request: SpawnRequest) -> None:
    encoded = request.encode()
    assert len(encoded) <= MAX_SPAWN_REQUEST
    assert decode(encoded) == request


@given(st.binary(max_size=600))
@example(b"\x00" * wire.SPAWN_FIXED_SIZE)
@example(b"\x00\x00\x00\x01" + b"\x01\x01" + b"\x00" + b"\x01a" + b"\x00" + b"\x00\x00")
def test_decode_takes_only_what_encode_makes(message: bytes) -> None:
    """Whatever the main process could be made to send: a request, or ValueError."""
    try:
        request = decode(message)
    except ValueError:
        return
    # The one field encode normalises: a zero timeout becomes 1 ms.
    if request.handshake_timeout:
        assert request.encode() == message


@pytest.mark.parametrize(
    "request_",
    [
        SpawnRequest(30.0, "a.example", ("imap",), b"\x16\x03"),
        SpawnRequest(30.0, "a.example", ("x",), peer_trust=1, role=TLSRole.CONNECT, peer_name="b"),
    ],
)
def test_every_truncation_is_refused(request_: SpawnRequest) -> None:
    encoded = request_.encode()
    for end in range(len(encoded)):
        with pytest.raises(ValueError):
            decode(encoded[:end])


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (SpawnRequest(1.0).encode() + b"x", "bytes after"),
        (b"\x00" * 6 + b"\x01\xff" + b"\x00\x00\x00\x00", "non-ASCII hint"),
        (b"\x00" * 6 + b"\x00\x00" + b"\x02\x00\x00" + b"\x00\x00", "empty ALPN name"),
        (b"\x00" * 6 + b"\x00\x00" + b"\x02\x05a" + b"\x00\x00", "ALPN overruns its list"),
        (b"\x00" * 4 + b"\x11\x00" + b"\x00\x00\x00\x00\x00", "no such trust store"),
        (
            b"\x00" * 6
            + b"\x00\x00\x00"
            + struct.pack("!H", MAX_EARLY_BYTES + 1)
            + b"\x16" * (MAX_EARLY_BYTES + 1),
            "more early bytes than allowed",
        ),
        (b"\x00" * (MAX_SPAWN_REQUEST + 1), "longer than any request"),
        (_raw(role=2), "no such role"),
        (_raw(role=1, peer_name=b"", trust=1), "connect without a peer name"),
        (_raw(role=1, peer_name=b"b.example", trust=0), "connect without a trust store"),
        (_raw(role=1, peer_name=b"b.example", trust=1, early=b"\x16"), "connect, early bytes"),
        (_raw(role=0, peer_name=b"b.example"), "accept with a peer name"),
        (_raw(role=1, peer_name=b"b example", trust=1), "a space in the peer name"),
        (_raw(role=1, peer_name="b\u00e9.example".encode(), trust=1), "non-ASCII peer name"),
        (_raw(role=1, peer_name=b"b.example\x00", trust=1), "NUL in the peer name"),
    ],
)
def test_malformed_requests_are_refused(message: bytes, why: str) -> None:
    with pytest.raises(ValueError):
        decode(message)


@pytest.mark.parametrize(
    "request_",
    [
        SpawnRequest(1.0, server_name_hint="x" * 256),
        SpawnRequest(1.0, server_name_hint="münchen.example"),
        SpawnRequest(1.0, alpn=("x" * 200, "y" * 100)),
        SpawnRequest(1.0, alpn=("",)),
        SpawnRequest(1.0, alpn=("ünicode",)),
        SpawnRequest(1.0, early=b"\x16" * (MAX_EARLY_BYTES + 1)),
        SpawnRequest(0.0),
        SpawnRequest(5e6),
        SpawnRequest(float("nan")),
        SpawnRequest(1.0, peer_trust=wire.MAX_TRUST_STORES + 1),
        SpawnRequest(1.0, peer_trust=-1),
        SpawnRequest(1.0, peer_trust=1, role=TLSRole.CONNECT),
        SpawnRequest(1.0, peer_trust=1, role=TLSRole.CONNECT, peer_name=""),
        SpawnRequest(1.0, role=TLSRole.CONNECT, peer_name="b.example"),
        SpawnRequest(1.0, early=b"\x16", peer_trust=1, role=TLSRole.CONNECT, peer_name="b.example"),
        SpawnRequest(1.0, peer_name="b.example"),
        SpawnRequest(1.0, peer_name=""),
        SpawnRequest(1.0, peer_trust=1, role=TLSRole.CONNECT, peer_name="b example"),
        SpawnRequest(1.0, peer_trust=1, role=TLSRole.CONNECT, peer_name="b\u00e9.example"),
        SpawnRequest(1.0, peer_trust=1, role=TLSRole.CONNECT, peer_name="b.example\n"),
        SpawnRequest(1.0, peer_trust=1, role=TLSRole.CONNECT, peer_name="x" * 256),
        SpawnRequest(1.0, role=2, peer_name="b.example", peer_trust=1),  # type: ignore[arg-type]
    ],
)
def test_encode_refuses_what_does_not_fit(request_: SpawnRequest) -> None:
    with pytest.raises(ValueError):
        request_.encode()


def test_the_longest_fields_fit() -> None:
    request = SpawnRequest(
        wire.MAX_HANDSHAKE_TIMEOUT,
        server_name_hint="h" * 255,
        alpn=("a" * 254,),
        early=b"\x16" * MAX_EARLY_BYTES,
    )
    # An accept request has no peer name: the largest of the layout is
    # larger than any request.
    assert len(request.encode()) == MAX_SPAWN_REQUEST - wire.MAX_SHORT_FIELD
    assert decode(request.encode()) == request
    connect = SpawnRequest(
        wire.MAX_HANDSHAKE_TIMEOUT,
        server_name_hint="h" * 255,
        alpn=("a" * 254,),
        peer_trust=wire.MAX_TRUST_STORES,
        role=TLSRole.CONNECT,
        peer_name="p" * 255,
    )
    assert len(connect.encode()) == MAX_SPAWN_REQUEST - MAX_EARLY_BYTES
    assert decode(connect.encode()) == connect


def test_alpn_wire_format() -> None:
    assert encode_alpn(()) == b""
    assert encode_alpn(("xmpp-server",)) == b"\x0bxmpp-server"


@pytest.mark.parametrize(
    ("hint", "usable"),
    [
        (None, None),
        ("xmpp.example", "xmpp.example"),
        ("münchen.example", None),
        ("a\x00b", None),
        ("x" * 255, "x" * 255),
        ("x" * 256, None),
    ],
)
def test_only_hints_a_certificate_could_match_are_passed_on(
    hint: str | None, usable: str | None
) -> None:
    assert usable_hint(hint) == usable


def test_wire_agrees_with_wire_h() -> None:
    """(The worker exit statuses: ``test_wire_messages``.)"""
    defines = wire_h.defines()
    for name in (
        "MAX_EARLY_BYTES",
        "SPAWN_FIXED_SIZE",
        "MAX_SPAWN_REQUEST",
        "MAX_REPORT_SIZE",
        "MAX_TRUST_STORES",
        "MAX_PEER_DNS_NAMES",
        "MAX_PEER_XMPP_ADDRS",
        "MAX_PEER_NAME",
    ):
        assert getattr(wire, name) == defines[name], name
    assert wire_h.enum("tls_role") == {f"ROLE_{role.name}": role.value for role in TLSRole}


# ----------------------------------------------------------------------
# The worker's report, as the main process reads it.

_GOOD = {
    "ok": True,
    "version": "TLSv1.3",
    "cipher": "TLS_AES_256_GCM_SHA384",
    "server_name": "mail.example.test",
    "alpn": "xmpp-client",
}


def _report(**changes: object) -> bytes:
    return json.dumps({**_GOOD, **changes}).encode()


def test_a_sound_report_is_read_as_it_was_written() -> None:
    assert read_report(_report(), ("xmpp-client",)) == TLSInfo(
        "TLSv1.3", "TLS_AES_256_GCM_SHA384", "mail.example.test", "xmpp-client"
    )
    failure = json.dumps({"ok": False, "reason": "handshake failed: no shared cipher"})
    assert read_report(failure.encode(), ()) == HandshakeFailure(
        "handshake failed: no shared cipher"
    )


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"ok": 1}', "neither"),
        (b'{"ok": false}', "neither"),
        (_report(version="SSLv3"), "version"),
        (_report(version="TLSv1.3\\nlabel"), "version"),
        (_report(cipher='AES", evil="x'), "cipher"),
        (_report(cipher="A" * 65), "cipher"),
        (_report(alpn="h2"), "ALPN"),
    ],
)
def test_a_compromised_workers_report_goes_no_further(payload: bytes, why: str) -> None:
    """Regression: the report's version and cipher became metric labels and
    log fields unchecked, so a subverted worker could grow the main
    process's label sets without bound (or break its log lines)."""
    with pytest.raises(ValueError, match=why):
        read_report(payload, ("xmpp-client",))


@pytest.mark.parametrize("name", ["a b.test", "x" * 256, "new\nline", "", 7])
def test_an_unusable_server_name_is_dropped_not_passed_on(name: object) -> None:
    outcome = read_report(_report(server_name=name), ("xmpp-client",))
    assert isinstance(outcome, TLSInfo) and outcome.server_name is None


def test_a_failure_reason_is_one_printable_line() -> None:
    payload = json.dumps({"ok": False, "reason": "bad\r\nInjected: yes" + "x" * 500}).encode()
    outcome = read_report(payload, ())
    assert isinstance(outcome, HandshakeFailure)
    assert outcome.reason.isprintable() and len(outcome.reason) == MAX_REASON


@given(st.binary(max_size=300))
def test_any_bytes_are_a_report_or_a_value_error(payload: bytes) -> None:
    with contextlib.suppress(ValueError):
        read_report(payload, ("xmpp-client",))


# ----------------------------------------------------------------------
# The peer certificate part of a report (xmpp-server listeners).

_PEER = {"verify": "ok", "error": None, "dns_names": ["a.example"], "xmpp_addrs": []}


def _peer_report(**changes: object) -> bytes:
    return _report(peer={**_PEER, **changes})


def test_a_peer_certificate_is_read_as_the_worker_wrote_it() -> None:
    # An xmppAddr's UTF-8 bytes, each escaped by the worker as a code point below 256.
    munich = "m\u00fcnchen.example".encode().decode("latin-1")
    outcome = read_report(
        _peer_report(dns_names=["A.Example", "*.b.example"], xmpp_addrs=[munich]),
        ("xmpp-client",),
        peer=True,
    )
    assert isinstance(outcome, TLSInfo)
    assert outcome.peer_certificate == PeerCertificate(
        trusted=True,
        dns_names=("a.example", "*.b.example"),
        xmpp_addrs=("m\u00fcnchen.example",),
    )
    untrusted = read_report(
        _peer_report(verify="untrusted", error="certificate has expired"),
        ("xmpp-client",),
        peer=True,
    )
    assert isinstance(untrusted, TLSInfo) and untrusted.peer_certificate == PeerCertificate(
        trusted=False, problem="certificate has expired", dns_names=("a.example",)
    )
    none = read_report(_peer_report(verify="none", dns_names=[]), ("xmpp-client",), peer=True)
    assert isinstance(none, TLSInfo) and none.peer_certificate is None


@pytest.mark.parametrize(
    ("payload", "peer", "why"),
    [
        (_report(), True, "peer certificate's report"),
        (_peer_report(), False, "peer certificate's report"),
        (_report(peer="ok"), True, "peer"),
        (_peer_report(verify="maybe"), True, "peer"),
        (_peer_report(error="a reason"), True, "without a failure"),
        (_peer_report(verify="untrusted"), True, "verification error"),
        (_peer_report(verify="untrusted", error="x" * 201), True, "verification error"),
        (_peer_report(verify="untrusted", error="a\nb"), True, "verification error"),
        (_peer_report(verify="none"), True, "not sent"),
        (_peer_report(dns_names="a.example"), True, "not lists"),
        (_peer_report(dns_names=["a.example"] * 101), True, "more peer names"),
        (_peer_report(xmpp_addrs=["a.example"] * 11), True, "more peer names"),
        (_peer_report(dns_names=["a b.example"]), True, "dNSName"),
        (_peer_report(dns_names=["x" * 256]), True, "dNSName"),
        (_peer_report(dns_names=[7]), True, "dNSName"),
        (_peer_report(xmpp_addrs=["\u0100.example"]), True, "not UTF-8"),
        (_peer_report(xmpp_addrs=["\xff.example"]), True, "not UTF-8"),
        (_peer_report(xmpp_addrs=["bell\x07"]), True, "xmppAddr"),
        (_peer_report(xmpp_addrs=["\xc2\x85"]), True, "xmppAddr"),
        (_peer_report(xmpp_addrs=[""]), True, "xmppAddr"),
        (_peer_report(xmpp_addrs=["y" * 256]), True, "xmppAddr"),
        (_peer_report(xmpp_addrs=[None]), True, "xmppAddr"),
    ],
)
def test_a_compromised_workers_peer_certificate_goes_no_further(
    payload: bytes, peer: bool, why: str
) -> None:
    """The names become a PROXY TLV and a log line, the result a metric
    label: only what a sound worker writes (``tls/helper/peer.c``)."""
    with pytest.raises(ValueError, match=why):
        read_report(payload, ("xmpp-client",), peer=peer)


@given(st.binary(max_size=300))
def test_any_bytes_are_a_report_or_a_value_error_with_a_peer(payload: bytes) -> None:
    with contextlib.suppress(ValueError):
        read_report(_report(peer=payload.decode("latin-1")), ("xmpp-client",), peer=True)
        read_report(payload, ("xmpp-client",), peer=True)
