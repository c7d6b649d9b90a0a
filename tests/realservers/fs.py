"""File-system permissions for directories that unprivileged daemons must read.

The real servers drop privileges (Postfix's ``virtual`` delivers as ``nobody``, its
daemons run as ``postfix``; Dovecot and Prosody use their own users), so every directory
on the way to their files must be searchable by "other".  pytest's temporary
directories are created 0700 (``/tmp/pytest-of-root`` and each ``pytest-N`` below it),
which these helpers relax to allow traversal only (``o+x``, no listing).  pytest sets
``/tmp/pytest-of-root`` back to 0700 at the start of the next session.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def ensure_traversable(path: Path) -> None:
    """Make ``path`` and all its ancestors searchable by other users (adds ``o+x``).

    Only directories owned by the current user are changed; a directory owned by
    someone else that lacks ``o+x`` raises :class:`PermissionError` with an explanation,
    since the daemons could not reach their files through it.
    """
    path = path.resolve()
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_mode & stat.S_IXOTH:
            continue
        if st.st_uid != os.geteuid():
            raise PermissionError(
                f"{directory} is not searchable by other users (mode "
                f"{stat.S_IMODE(st.st_mode):o}) and is not ours to change; the test "
                f"daemons, which run as unprivileged users, cannot reach {path}"
            )
        directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def make_dirs(path: Path, mode: int = 0o755) -> None:
    """Create ``path`` and missing parents, each with ``mode`` (not reduced by the umask).

    Also applies ``mode`` to ``path`` itself when it already exists.
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(mode)
    path.chmod(mode)
