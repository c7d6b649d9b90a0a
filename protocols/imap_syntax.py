"""IMAP wire syntax for the machine in ``protocols.imap`` and its probe.

Literals (RFC 9051 section 4.3, RFC 7888), tags and atoms (section 9), the
backend's responses cut into heads and streamed rest (section 7), and the
capability lists the proxy rewrites (sections 7.2.2 and 7.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from protocols._base import RemoteProtocolError
from protocols._buffers import ByteQueue

#: A literal announced at the end of a line (``~{n}`` of RFC 3516 included).
#: More digits than any size limit needs make no literal at all.
_LITERAL: Final = re.compile(rb"\{(\d{1,20})(\+?)\}\r\n\Z")
#: A tag is ASTRING-CHARs but "+"; the proxy refuses "]" too.
TAG: Final = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5e-\x7a\x7c-\x7e]+")
ATOM: Final = re.compile(rb"[\x21\x23\x24\x26\x27\x2b-\x5b\x5e-\x7a\x7c-\x7e]+")
#: RFC 4959 section 3, RFC 9051 section 6.2.2: base64, or "*" to cancel.
SASL_RESPONSE: Final = re.compile(rb"(?:[A-Za-z0-9+/]*={0,2}|\*)\r\n")
#: An untagged CAPABILITY response or a ``[CAPABILITY ...]`` response code.
_CAPABILITY_LIST: Final = re.compile(
    rb"(\* CAPABILITY|[^ ]+ [A-Z]+ \[CAPABILITY)((?: [^\]\r\n]*)?)(.*)", re.IGNORECASE | re.DOTALL
)
_UNTAGGED: Final = re.compile(rb"\* ([^ \r\n]*)")
#: Untagged responses that end in text, never in a literal (section 7.1).
_NO_LITERALS: Final = frozenset({b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH", b"CAPABILITY"})
#: Octets of a line kept back while it is streamed: enough for a literal's
#: ``{`` + 20 digits + ``+}`` + CRLF, whichever piece the CRLF comes in.
_TAIL: Final = 32


@dataclass(frozen=True)
class Literal:
    """A literal announced at the end of a line."""

    size: int
    #: ``{n+}``: the octets follow without waiting for a ``+`` (RFC 7888).
    nonsync: bool


def literal_at_end(line: bytes) -> Literal | None:
    match = _LITERAL.search(line)
    return None if match is None else Literal(int(match[1]), bool(match[2]))


def tag_of(line: bytes) -> bytes:
    return line.partition(b" ")[0]


def untagged(line: bytes) -> bytes | None:
    """The word after ``* `` in capitals (a status, a number...), or ``None``."""
    match = _UNTAGGED.match(line)
    return None if match is None else match[1].upper()


def visible_capabilities(atoms: Iterable[bytes], *, tls: bool, auth: bool) -> list[bytes]:
    """The capabilities a client may see: none the proxy terminates or cannot
    carry, AUTH= only when ``auth``, LOGINDISABLED only on plaintext."""
    kept = []
    for atom in atoms:
        name = atom.upper()
        if name == b"STARTTLS" or name.startswith(b"COMPRESS="):
            continue
        if name.startswith(b"AUTH=") and (not auth or name.endswith(b"-PLUS")):
            continue
        if name != b"LOGINDISABLED" or not tls:
            kept.append(atom)
    return kept


def capability_atoms(line: bytes) -> list[bytes] | None:
    """The atoms of the capability list in ``line``, or ``None``."""
    match = _CAPABILITY_LIST.match(line)
    return None if match is None else match[2].split()


def with_visible_capabilities(line: bytes, *, tls: bool) -> bytes | None:
    """``line`` with its capability list filtered, or ``None`` if it has none."""
    match = _CAPABILITY_LIST.match(line)
    if match is None:
        return None
    kept = visible_capabilities(match[2].split(), tls=tls, auth=True)
    return match[1] + b"".join(b" " + atom for atom in kept) + match[3]


@dataclass(frozen=True)
class Head:
    """The first line of a response: whole, or its first octets when it is
    too long to hold (the rest then comes as plain bytes)."""

    data: bytes
    whole: bool


class ResponseReader:
    """Cuts the backend's stream into responses.

    ``pop`` returns a ``Head`` for each response, then as ``bytes`` the rest
    of it: the end of a long first line, literals and the lines after them,
    streamed as they come. Only untagged data responses (FETCH, LIST, ID...)
    may hold literals. A literal larger than ``literal_limit`` raises
    ``RemoteProtocolError``.
    """

    def __init__(self, line_limit: int, literal_limit: int) -> None:
        self._limit = max(line_limit, 2 * _TAIL)
        self._literal_limit = literal_limit
        self._queue = ByteQueue()
        #: A head was returned and its response has not ended yet.
        self._inside = False
        self._data_response = False
        #: Octets of the current literal still to come.
        self._literal = 0

    @property
    def between_responses(self) -> bool:
        return not self._inside

    def feed(self, data: bytes) -> None:
        self._queue.feed(data)

    def pop(self) -> Head | bytes | None:
        if self._literal:
            piece = self._queue.take_up_to(self._literal)
            self._literal -= len(piece)
            return piece or None
        if not self._inside:
            newline = self._queue.find(b"\n", self._limit)
            if newline < 0 and len(self._queue) < self._limit:
                return None
            self._inside = True
            word = untagged(self._queue.peek(newline + 1 if newline >= 0 else self._limit))
            self._data_response = word is not None and word not in _NO_LITERALS
            if newline < 0:
                return Head(self._queue.take(self._limit - _TAIL), whole=False)
            line = self._queue.take(newline + 1)
            self._line_end(line)
            return Head(line, whole=True)
        newline = self._queue.find(b"\n")
        if newline >= 0:
            piece = self._queue.take(newline + 1)
            self._line_end(piece)
            return piece
        if len(self._queue) > _TAIL:
            return self._queue.take(len(self._queue) - _TAIL)
        return None

    def _line_end(self, line: bytes) -> None:
        literal = literal_at_end(line) if self._data_response else None
        if literal is None:
            self._inside = False
        elif literal.size > self._literal_limit:
            raise RemoteProtocolError(f"literal of {literal.size} octets from backend")
        else:
            self._literal = literal.size
