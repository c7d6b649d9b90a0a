"""The helper's spawn-request parser, fuzzed through the real process.

Spawn requests come from the network-facing main process and are parsed by
the helper, which runs as root and forks every worker: a request that is
not exactly what ``tls/helper/wire.h`` section 3 lays out, or that comes
with other than two descriptors, must be refused without a worker, without
keeping the descriptors, and without the helper leaving.

Hypothesis sends the real helper (``running_helper``, holding one trust
store) arbitrary datagrams (the empty one included), requests built field
by field and then cut short or extended, with fields at and past their
limits (the hint's and the peer name's characters, ALPN names that overrun
their list, the early bytes' maximum, trust stores and roles past those
that exist, the fields each role forbids or requires), each with 0 to 3
descriptors. ``_well_formed``, written from wire.h, says which of them
the helper must serve: a worker then holds the descriptors (the test finds
it through /proc). A refused request's descriptors are closed by the helper
(their other ends see the end of stream, which they would not while a
worker held them), and a valid request is served after it: the helper
still serves.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from starttls_proxy.wire import (
    MAX_EARLY_BYTES,
    MAX_SPAWN_REQUEST,
    SpawnRequest,
    TLSRole,
    WorkerExit,
)
from tests.peer_certs import Authority
from tests.tlshelper.harness import RunningHelper, helper_trusting

#: How a worker given a fuzzed (but well-formed) request may end once the
#: test closes its client: never by a signal.
WORKER_ENDS = {
    WorkerExit.CLIENT_GONE,
    WorkerExit.DEADLINE,
    WorkerExit.HANDSHAKE_FAILED,
    WorkerExit.NOT_TLS,
}


#: The trust stores this module's helper holds.
TRUST_STORES = 1


@pytest.fixture(scope="module")
def helper(
    cert_dir: Path,
    peer_authorities: tuple[Authority, Authority],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningHelper]:
    directory = tmp_path_factory.mktemp("spawn-requests")
    certificates = [(cert_dir / "cert.pem", cert_dir / "key.pem")]
    with helper_trusting(directory, certificates, peer_authorities[:TRUST_STORES]) as running:
        yield running


def _host_name(view: memoryview, offset: int) -> tuple[bytes, int] | None:
    """A u8-counted field of printable ASCII without space at ``offset``,
    and the offset after it; None when it overruns or holds anything else."""
    if len(view) < offset + 1:
        return None
    size = view[offset]
    name = bytes(view[offset + 1 : offset + 1 + size])
    if len(name) != size or any(not 0x21 <= c <= 0x7E for c in name):
        return None
    return name, offset + 1 + size


def _well_formed(message: bytes) -> bool:
    """Whether ``message`` is a spawn request by wire.h, to this module's
    helper, which holds TRUST_STORES trust stores:

    u32 timeout (ms) | u8 trust store (0: none; at most TRUST_STORES) |
    u8 role (0 accept, 1 connect) |
    u8 n | n bytes hint (printable ASCII, no space) |
    u8 n | n bytes peer name (the same) |
    u8 n | n bytes ALPN (names of 1 to 255 bytes, each after its u8 length,
    filling the field exactly) | u16 n | n early bytes (at most
    MAX_EARLY_BYTES), and nothing after. On accept no peer name; on connect
    a peer name, a trust store and no early bytes.
    """
    view = memoryview(message)
    if len(message) < 6 or view[4] > TRUST_STORES or view[5] not in (0, 1):
        return False
    trust, role = view[4], view[5]
    hint = _host_name(view, 6)
    if hint is None:
        return False
    peer_name = _host_name(view, hint[1])
    if peer_name is None:
        return False
    offset = peer_name[1]
    if len(message) < offset + 1:
        return False
    alpn_size = view[offset]
    alpn = bytes(view[offset + 1 : offset + 1 + alpn_size])
    offset += 1 + alpn_size
    if len(alpn) != alpn_size:
        return False
    at = 0
    while at < len(alpn):
        if alpn[at] == 0 or at + 1 + alpn[at] > len(alpn):
            return False
        at += 1 + alpn[at]
    if len(message) < offset + 2:
        return False
    early_size = int.from_bytes(view[offset : offset + 2], "big")
    offset += 2
    if early_size > MAX_EARLY_BYTES or len(message) != offset + early_size:
        return False
    if role == TLSRole.ACCEPT:
        return not peer_name[0]
    return bool(peer_name[0]) and trust > 0 and early_size == 0


def _request(
    timeout: int,
    hint: bytes,
    alpn: bytes,
    early: bytes,
    early_size: int,
    trust: int = 0,
    role: int = 0,
    peer_name: bytes = b"",
) -> bytes:
    return b"".join(
        (
            struct.pack("!IBBB", timeout, trust, role, len(hint)),
            hint,
            bytes((len(peer_name),)),
            peer_name,
            bytes((len(alpn),)),
            alpn,
            early_size.to_bytes(2, "big"),
            early,
        )
    )


def _connect(peer_name: bytes = b"remote.example", trust: int = 1, early: bytes = b"") -> bytes:
    """A connect request (well-formed with the defaults)."""
    return _request(10_000, b"", b"", early, len(early), trust, TLSRole.CONNECT, peer_name)


def _valid() -> bytes:
    return SpawnRequest(handshake_timeout=10.0).encode()


_ALPN_NAMES = st.lists(st.binary(min_size=1, max_size=20), max_size=4).map(
    lambda names: b"".join(bytes((len(name),)) + name for name in names)
)
_EARLY = st.one_of(
    st.binary(max_size=40),
    # At the limit and past it (their content is no ClientHello).
    st.integers(MAX_EARLY_BYTES - 1, MAX_EARLY_BYTES + 2).map(bytes),
)


def _host_names(min_size: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.text("abcdefghijklmnopqrstuvwxyz.-*", min_size=min_size, max_size=40).map(str.encode),
        st.binary(min_size=min_size, max_size=255),
        st.just(b"h" * 255),
    )


@st.composite
def _shaped(draw: st.DrawFn) -> bytes:
    """A request built field by field, often valid, then maybe cut or extended."""
    role = draw(st.sampled_from([TLSRole.ACCEPT, TLSRole.ACCEPT, TLSRole.CONNECT, 2, 255]))
    # A connect request takes no early bytes, and most have none.
    early = draw(st.just(b"") | _EARLY if role == TLSRole.CONNECT else _EARLY)
    message = _request(
        draw(st.sampled_from([0, 1, 10_000, 2**32 - 1])),
        draw(_host_names(0)),
        draw(st.one_of(_ALPN_NAMES, st.binary(max_size=255))),
        early,
        draw(st.one_of(st.just(len(early)), st.integers(0, 0xFFFF))),
        # A connect request needs a trust store.
        draw(
            st.sampled_from([1, 1, 1, 0, 2, 255] if role == TLSRole.CONNECT else [0, 0, 0, 1, 255])
        ),
        role,
        # A peer name mostly where one belongs.
        draw(_host_names(1) if role == TLSRole.CONNECT else st.just(b"") | _host_names(0)),
    )
    change = draw(st.sampled_from(["none", "none", "cut", "extend"]))
    if change == "cut":
        return message[: draw(st.integers(0, max(0, len(message) - 1)))]
    if change == "extend":
        return message + draw(st.binary(min_size=1, max_size=8))
    return message


_NAME = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255)
_ALPN = st.lists(st.text("abcdefghijklmnopqrstuvwxyz0-9", min_size=1, max_size=20), max_size=4)
#: What the encoder makes, either role: always served.
_ENCODED = st.one_of(
    st.builds(
        SpawnRequest,
        handshake_timeout=st.sampled_from([0.001, 10.0]),
        server_name_hint=st.none() | _NAME,
        alpn=_ALPN.map(tuple),
        early=st.binary(max_size=40) | st.just(bytes(MAX_EARLY_BYTES)),
        peer_trust=st.integers(0, TRUST_STORES),
    ),
    st.builds(
        SpawnRequest,
        handshake_timeout=st.sampled_from([0.001, 10.0]),
        server_name_hint=st.none() | _NAME,
        alpn=_ALPN.map(tuple),
        peer_trust=st.integers(1, TRUST_STORES),
        role=st.just(TLSRole.CONNECT),
        peer_name=_NAME,
    ),
).map(SpawnRequest.encode)


def _send(
    helper: RunningHelper, message: bytes, descriptors: int
) -> tuple[list[socket.socket], list[int]]:
    """``message`` with ``descriptors`` socket ends; the other ends, and the
    inodes of those sent."""
    pairs = [socket.socketpair() for _ in range(descriptors)]
    with contextlib.ExitStack() as theirs:
        for _, end in pairs:
            theirs.enter_context(end)
        helper.send_request(message, [end.fileno() for _, end in pairs])
        inodes = [os.fstat(end.fileno()).st_ino for _, end in pairs]
    return [ours for ours, _ in pairs], inodes


def _still_serving(helper: RunningHelper) -> None:
    """A valid request gets a worker."""
    connection = helper.spawn()
    connection.client.close()
    assert helper.exit_of(connection.pid) == WorkerExit.CLIENT_GONE
    connection.channel.close()


def _assert_closed_by_the_helper(ends: list[socket.socket]) -> None:
    for end in ends:
        end.settimeout(5)
        assert end.recv(1) == b"", "the helper kept a descriptor of a refused request"


@settings(max_examples=200)
@given(
    message=st.one_of(st.binary(max_size=80), _shaped(), _ENCODED),
    descriptors=st.sampled_from([2, 2, 2, 0, 1, 3]),
)
@example(message=b"", descriptors=0)
@example(message=b"", descriptors=2)
@example(message=_valid(), descriptors=0)
@example(message=_valid(), descriptors=1)
@example(message=_valid(), descriptors=3)
@example(message=_valid() + b"\x00", descriptors=2)
@example(message=_valid()[:-1], descriptors=2)
@example(message=bytes(MAX_SPAWN_REQUEST + 1), descriptors=2)
@example(message=_request(10_000, b"mail example", b"", b"", 0), descriptors=2)
@example(message=_request(10_000, b"", b"\x00", b"", 0), descriptors=2)
@example(message=_request(10_000, b"", b"\x05h2", b"", 0), descriptors=2)
@example(message=_request(10_000, b"", b"", b"", 0, trust=1), descriptors=2)
@example(
    message=_request(10_000, b"", b"", bytes(MAX_EARLY_BYTES + 1), MAX_EARLY_BYTES + 1),
    descriptors=2,
)
@example(message=_request(10_000, b"", b"", b"", 0, trust=2), descriptors=2)
@example(message=_connect(), descriptors=2)
@example(message=_connect(), descriptors=1)
@example(message=_request(10_000, b"", b"", b"", 0, trust=1, role=2), descriptors=2)
@example(message=_request(10_000, b"", b"", b"", 0, role=255, peer_name=b"a"), descriptors=2)
@example(message=_connect(trust=0), descriptors=2)
@example(message=_connect(trust=2), descriptors=2)
@example(message=_connect(early=b"\x16\x03\x01"), descriptors=2)
@example(message=_connect(peer_name=b""), descriptors=2)
@example(message=_connect(peer_name=b"remote example"), descriptors=2)
@example(message=_connect(peer_name="r\u00e9mote.example".encode()), descriptors=2)
@example(message=_connect(peer_name=b"remote.example\x00"), descriptors=2)
@example(message=_connect(peer_name=b"p" * 255), descriptors=2)
@example(message=_request(10_000, b"", b"", b"", 0, peer_name=b"remote.example"), descriptors=2)
@example(message=_connect()[:-1], descriptors=2)
def test_only_well_formed_requests_with_two_descriptors_are_served(
    helper: RunningHelper, message: bytes, descriptors: int
) -> None:
    exits_before = len(helper.exits)
    ends, inodes = _send(helper, message, descriptors)
    try:
        served = _well_formed(message) and descriptors == 2
        role = "connect" if len(message) > 5 and message[5] == TLSRole.CONNECT else "accept"
        event(f"{role} served" if served else "refused")
        if served:
            worker = helper.worker_holding(inodes[1], exits_before)
            client, _channel = ends
            client.close()
            assert helper.exit_of(worker) in WORKER_ENDS
        else:
            _still_serving(helper)
            _assert_closed_by_the_helper(ends)
    finally:
        for end in ends:
            end.close()
    assert helper.process.poll() is None


def test_the_oracle_agrees_with_the_encoder() -> None:
    """``_well_formed`` takes what ``wire.SpawnRequest.encode`` makes."""
    request = SpawnRequest(
        handshake_timeout=1.5,
        server_name_hint="mail.example.test",
        alpn=("xmpp-client", "h2"),
        early=b"\x16\x03\x01",
    )
    assert _well_formed(request.encode())
    assert _well_formed(_valid())
    assert not _well_formed(_valid()[:-1])
    connect = SpawnRequest(
        handshake_timeout=1.5,
        server_name_hint="xmpp.example",
        alpn=("xmpp-server",),
        peer_trust=1,
        role=TLSRole.CONNECT,
        peer_name="remote.example",
    )
    assert _well_formed(connect.encode())
    assert _well_formed(_connect())
    assert not _well_formed(_connect(trust=0))


def test_the_helper_serves_on_after_many_refusals(helper: RunningHelper) -> None:
    """Refusals cost nothing that accumulates: no worker, no descriptor."""

    def descriptors() -> int:
        time.sleep(0.2)  # the spares replaced (each holds a descriptor of the helper's)
        return len(list(Path(f"/proc/{helper.process.pid}/fd").iterdir()))

    _still_serving(helper)
    before, workers = descriptors(), len(helper.children())
    for _ in range(50):
        for end in _send(helper, b"\x00" * 5, 2)[0]:
            end.close()
    _still_serving(helper)
    assert descriptors() == before
    assert len(helper.children()) == workers
