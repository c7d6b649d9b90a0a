"""Received bytes that a machine has not consumed yet.

Most of what crosses the main process after the upgrade is opaque bulk: a
message in an IMAP literal, a BDAT chunk, a POP3 RETR body. ``ByteQueue``
keeps received data in the chunks it arrived in, so such data leaves in
those same chunks, uncopied; only lines are cut out (and copied), and only
a line that straddles two chunks makes them one. A bytearray copied every
chunk in and every piece out: 4 copies of each byte of a FETCH, plus the
allocator's page faults for them, cost the main process more than the TLS
worker's encryption.
"""

from __future__ import annotations

from collections import deque


class ByteQueue:
    """A FIFO of bytes over the chunks fed to it."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        #: How much of the first chunk was taken already.
        self._start = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def feed(self, data: bytes) -> None:
        if data:
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._size += len(data)

    def find(self, sub: bytes, end: int | None = None) -> int:
        """Where ``sub`` (one byte) first occurs within the first ``end``
        bytes (all if ``None``), or -1."""
        if not self._chunks:
            return -1
        first, start = self._chunks[0], self._start
        stop = len(first) if end is None else min(len(first), start + end)
        found = first.find(sub, start, stop)
        if found >= 0:
            return found - start
        if len(self._chunks) == 1 or stop < len(first):
            return -1
        self._join()
        return self.find(sub, end)

    def peek(self, count: int) -> bytes:
        """The first ``count`` bytes (fewer if fewer are there), left in place."""
        self._gather(count)
        return self._chunks[0][self._start : self._start + count] if self._chunks else b""

    def take(self, count: int) -> bytes:
        """The first ``count`` bytes (fewer if fewer are there)."""
        self._gather(count)
        return self.take_up_to(count)

    def take_up_to(self, count: int) -> bytes:
        """At most ``count`` bytes, at least one if any are there, never
        more than the rest of the first chunk: a whole chunk is handed on
        as it came."""
        if not self._chunks:
            return b""
        first, start = self._chunks[0], self._start
        end = start + count
        if end >= len(first):
            self._chunks.popleft()
            self._start = 0
            piece = first[start:] if start else first
        else:
            self._start = end
            piece = first[start:end]
        self._size -= len(piece)
        return piece

    def take_all(self) -> bytes:
        self._join()
        return self.take_up_to(self._size)

    def clear(self) -> None:
        self._chunks.clear()
        self._start = self._size = 0

    def _gather(self, count: int) -> None:
        """Make the first ``count`` bytes one piece of the first chunk."""
        if len(self._chunks) > 1 and self._start + count > len(self._chunks[0]):
            self._join()

    def _join(self) -> None:
        if len(self._chunks) > 1 or self._start:
            first = memoryview(self._chunks[0])[self._start :]
            joined = b"".join([first, *list(self._chunks)[1:]])
            self._chunks = deque([joined])
            self._start = 0


class LineBuffer:
    """Accumulates bytes and hands out complete CRLF-terminated lines.

    ``pop_line`` returns ``None`` until a full line is there. A line longer
    than ``limit`` is reported once as ``LineTooLong`` and its remainder, up
    to the next LF, is swallowed so that the stream stays in sync.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queue = ByteQueue()
        self._discarding = False

    def __len__(self) -> int:
        return len(self._queue)

    def feed(self, data: bytes) -> None:
        self._queue.feed(data)

    def pop_line(self) -> bytes | LineTooLong | None:
        """Next line including its terminator, ``LineTooLong``, or ``None``."""
        if self._discarding:
            newline = self._queue.find(b"\n")
            if newline < 0:
                self._queue.clear()
                return None
            self._queue.take(newline + 1)
            self._discarding = False
        newline = self._queue.find(b"\n", self.limit)
        if newline < 0:
            if len(self._queue) >= self.limit:
                self._discarding = True
                return LINE_TOO_LONG
            return None
        return self._queue.take(newline + 1)

    def holds_partial_line(self) -> bool:
        """Bytes are waiting and none of them ends a line."""
        return len(self._queue) > 0 and self._queue.find(b"\n") < 0

    def pop_bytes(self, count: int) -> bytes:
        """Take up to ``count`` raw bytes (a literal, a BDAT chunk), as
        ``ByteQueue.take_up_to``: call again until it returns nothing."""
        return self._queue.take_up_to(count)

    def pop_all(self) -> bytes:
        return self._queue.take_all()


class LineTooLong:
    """Sentinel for a line that exceeded the buffer's limit."""

    def __repr__(self) -> str:
        return "LINE_TOO_LONG"


LINE_TOO_LONG = LineTooLong()
