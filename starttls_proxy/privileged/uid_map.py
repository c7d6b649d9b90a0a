"""The keeper's map of ``isolation.uid_range``, shared with every TLS helper
it starts (``tls/helper/wire.h`` section 2a).

A reload starts a new helper while the old one still forks workers for the
sessions the main process sends it until it switches, so what one helper
finds in ``/proc`` at its start misses what the other takes afterwards: two
live workers could get one UID. The helpers take and give back UIDs in this
map (a byte a UID, taken by compare and swap), and the keeper gives back
the UID of a worker it reaps, an orphan of a helper that is gone. One byte
is written whole, so the keeper's store needs no atomic read-modify-write.
"""

from __future__ import annotations

import mmap
import os


class UIDMap:
    """A memfd of ``count`` bytes mapped here, byte ``i`` for UID ``first + i``."""

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self.size = count
        self._fd = os.memfd_create("stp-uid-map", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, count)
            self._map = mmap.mmap(self._fd, count)
        except OSError:
            os.close(self._fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def release(self, uid: int) -> None:
        """A reaped worker's ``uid`` is free again (one outside the range: nothing)."""
        if 0 <= uid - self.first < self.size:
            self._map[uid - self.first] = 0

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
