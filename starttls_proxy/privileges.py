"""Leaving root for good: the one place the proxy's Python changes its IDs.

Shared by the main process (once its sockets are bound) and the key server
(``sandbox.layers``); the TLS workers do the same in C
(``tls/helper/sandbox.c``).
"""

from __future__ import annotations

import os
import pwd


def become(uid: int, gid: int) -> None:
    """Take ``uid`` and ``gid`` as real, effective and saved IDs, with no
    supplementary groups: nothing of root is left to take back."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def drop_privileges(user: str) -> None:
    """Become ``user`` for good, with its primary group."""
    entry = pwd.getpwnam(user)
    become(entry.pw_uid, entry.pw_gid)
