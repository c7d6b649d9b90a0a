"""The helper's spawn-request parser, fuzzed through the real process.

Spawn requests come from the network-facing main process and are parsed by
the helper, which runs as root and forks every worker: a request that is
not exactly what ``tls/helper/wire.h`` section 3 lays out, or that comes
with other than two descriptors, must be refused without a worker, without
keeping the descriptors, and without the helper leaving.

Hypothesis sends the real helper (``running_helper``) arbitrary datagrams
(the empty one included), requests built field by field and then cut short
or extended, with fields at and past their limits (the hint's characters,
ALPN names that overrun their list, the early bytes' maximum), each with 0
to 3 descriptors. ``_well_formed``, written from wire.h, says which of them
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

from starttls_proxy.wire import MAX_EARLY_BYTES, MAX_SPAWN_REQUEST, Ready, SpawnRequest, WorkerExit
from tests.tlshelper.harness import RunningHelper, running_helper

#: How a worker given a fuzzed (but well-formed) request may end once the
#: test closes its client: never by a signal.
WORKER_ENDS = {
    WorkerExit.CLIENT_GONE,
    WorkerExit.DEADLINE,
    WorkerExit.HANDSHAKE_FAILED,
    WorkerExit.NOT_TLS,
}


@pytest.fixture(scope="module")
def helper(cert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHelper]:
    with running_helper(
        tmp_path_factory.mktemp("spawn-requests"), [(cert_dir / "cert.pem", cert_dir / "key.pem")]
    ) as running:
        assert isinstance(running.reply, Ready), running.reply
        yield running


def _well_formed(message: bytes) -> bool:
    """Whether ``message`` is a spawn request by wire.h, to this module's
    helper, which holds no trust store:

    u32 timeout (ms) | u8 trust store (0: none) |
    u8 n | n bytes hint (printable ASCII, no space) |
    u8 n | n bytes ALPN (names of 1 to 255 bytes, each after its u8 length,
    filling the field exactly) | u16 n | n early bytes (at most
    MAX_EARLY_BYTES), and nothing after.
    """
    view = memoryview(message)
    offset = 5
    if len(message) < offset + 1 or view[4] != 0:
        return False
    hint_size = view[offset]
    hint = bytes(view[offset + 1 : offset + 1 + hint_size])
    offset += 1 + hint_size
    if len(hint) != hint_size or any(not 0x21 <= c <= 0x7E for c in hint):
        return False
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
    return early_size <= MAX_EARLY_BYTES and len(message) == offset + early_size


def _request(
    timeout: int, hint: bytes, alpn: bytes, early: bytes, early_size: int, trust: int = 0
) -> bytes:
    return b"".join(
        (
            struct.pack("!IBB", timeout, trust, len(hint)),
            hint,
            bytes((len(alpn),)),
            alpn,
            early_size.to_bytes(2, "big"),
            early,
        )
    )


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


@st.composite
def _shaped(draw: st.DrawFn) -> bytes:
    """A request built field by field, often valid, then maybe cut or extended."""
    early = draw(_EARLY)
    message = _request(
        draw(st.sampled_from([0, 1, 10_000, 2**32 - 1])),
        draw(
            st.one_of(
                st.text("abcdefghijklmnopqrstuvwxyz.-*", max_size=40).map(str.encode),
                st.binary(max_size=255),
                st.just(b"h" * 255),
            )
        ),
        draw(st.one_of(_ALPN_NAMES, st.binary(max_size=255))),
        early,
        draw(st.one_of(st.just(len(early)), st.integers(0, 0xFFFF))),
        draw(st.sampled_from([0, 0, 0, 1, 255])),
    )
    change = draw(st.sampled_from(["none", "cut", "extend"]))
    if change == "cut":
        return message[: draw(st.integers(0, max(0, len(message) - 1)))]
    if change == "extend":
        return message + draw(st.binary(min_size=1, max_size=8))
    return message


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
    message=st.one_of(st.binary(max_size=80), _shaped()),
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
def test_only_well_formed_requests_with_two_descriptors_are_served(
    helper: RunningHelper, message: bytes, descriptors: int
) -> None:
    exits_before = len(helper.exits)
    ends, inodes = _send(helper, message, descriptors)
    try:
        served = _well_formed(message) and descriptors == 2
        event("served" if served else "refused")
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
