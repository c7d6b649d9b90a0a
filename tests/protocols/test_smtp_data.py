"""The DATA body scan in C (``protocols/_smtp_data.c``) against the rule it
implements, written here octet by octet: where a chunk of a body stops
being message content. Chunks are also laid against unreadable pages, so
that a read before or after one crashes the test in any build; the run
under AddressSanitizer and UBSan (scripts/test-sanitized.sh) checks the
rest."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from protocols._smtp_data import BARE, END_OF_DATA, NONE, TRAILING_CR, first_stop

CR, LF = 0x0D, 0x0A
#: mprotect(2): no access (the mmap module has PROT_READ and PROT_WRITE only).
PROT_NONE = 0


def rule(chunk: bytes, reject: bool) -> tuple[int, int]:
    """RFC 5321 sections 4.1.1.4 and 2.3.8, one position at a time."""
    for at, octet in enumerate(chunk):
        if octet == CR:
            if chunk[at : at + 5] == b"\r\n.\r\n":
                return END_OF_DATA, at
            if reject and at + 1 == len(chunk):
                return TRAILING_CR, at
            if reject and chunk[at + 1] != LF:
                return BARE, at
        elif octet == LF and reject and (at == 0 or chunk[at - 1] != CR):
            return BARE, at
    return NONE, len(chunk)


#: Message-like octets: lines, dots at line starts, and the line endings
#: and their pieces that make the scan stop.
pieces = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"\r\n.\r\n", b"\r\n.", b"x", b"0123456789abcdef", b" line\r\n"]
)
chunks = st.lists(pieces, max_size=40).map(b"".join)


@given(chunks, st.booleans())
@example(b"", True)
@example(b"\r", True)
@example(b"\n" + b"x" * 40, True)
@example(b"\r\n.\r\n", False)
def test_the_scan_stops_where_the_rule_says(chunk: bytes, reject: bool) -> None:
    assert first_stop(chunk, reject) == rule(chunk, reject)


@pytest.mark.parametrize("length", range(1, 50))
@pytest.mark.parametrize(
    "intruder", [b"\r\n.\r\n", b"\rx", b"x\n", b"\r"], ids=["end", "cr", "lf", "last-cr"]
)
def test_every_position_of_every_block_is_seen(length: int, intruder: bytes) -> None:
    """The 16-octet step and the octet-wise edges meet without a gap: a
    stop is found at each position of chunks up to three blocks long."""
    for at in range(length - len(intruder) + 1):
        chunk = b"a" * at + intruder + b"a" * (length - at - len(intruder))
        expected = rule(chunk, True)
        assert expected[0] != NONE
        assert first_stop(chunk, True) == expected


@contextmanager
def fenced(chunk: bytes, *, at_end: bool) -> Iterator[memoryview]:
    """``chunk`` in its own mapping, right after an unreadable page and,
    with ``at_end``, right before another (else starting a page)."""
    page = mmap.PAGESIZE
    pages = -(-len(chunk) // page) or 1
    region = mmap.mmap(-1, (pages + 2) * page)
    anchor = ctypes.c_char.from_buffer(region)
    base = ctypes.addressof(anchor)
    libc = ctypes.CDLL(None, use_errno=True)
    for guard in (base, base + (pages + 1) * page):
        assert libc.mprotect(ctypes.c_void_p(guard), page, PROT_NONE) == 0
    start = (pages + 1) * page - len(chunk) if at_end else page
    region[start : start + len(chunk)] = chunk
    view = memoryview(region)[start : start + len(chunk)]
    try:
        yield view
    finally:
        view.release()
        del anchor
        region.close()


@given(chunks, st.booleans(), st.booleans())
def test_the_scan_never_reads_outside_the_chunk(chunk: bytes, reject: bool, at_end: bool) -> None:
    with fenced(chunk, at_end=at_end) as view:
        assert first_stop(view, reject) == rule(chunk, reject)


def test_clean_body_is_read_to_its_end() -> None:
    body = b"Subject: x\r\n\r\n" + b"..dot-stuffed line\r\n" * 1000
    assert first_stop(body, True) == (NONE, len(body))


def test_any_bytes_like_chunk() -> None:
    chunk = b"text\r\n.\r\nQUIT\r\n"
    for kind in (bytearray(chunk), memoryview(chunk)):
        assert first_stop(kind, True) == (END_OF_DATA, 4)


def test_misuse_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        first_stop("text", True)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        first_stop(b"text")  # type: ignore[call-arg]
