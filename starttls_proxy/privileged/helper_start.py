"""The keeper's side of starting a TLS helper (C, ``tls/helper/stp-helper``).

What needs Python or a look at this machine is done here, before the
helper starts: the settings (validated by the keeper) and the certificate
chains become its *description* (``tls.description``), the workers'
seccomp filter is compiled (``sandbox.seccomp``) and the empty root
directory prepared. The description goes to the helper in a memfd (chains
can make it larger than a datagram); the helper answers ``wire.Ready``
with the sandbox layers in force, or ``wire.Problems``: what keeps it from
serving.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from starttls_proxy._process import EXIT_TIMEOUT, STARTUP_TIMEOUT, memfd, start_process
from starttls_proxy.keys import provider
from starttls_proxy.privileged.uid_map import UIDMap
from starttls_proxy.sandbox import seccomp
from starttls_proxy.sandbox.layers import prepare_root_directory
from starttls_proxy.settings import ConfigError, IsolationConfig, TLSConfig, decode
from starttls_proxy.tls.description import describe
from starttls_proxy.wire import (
    DESCRIPTION,
    HELPER_TO_KEEPER,
    MAX_MESSAGE,
    HelperToKeeper,
    LayerStatus,
    Message,
    Problems,
    Ready,
    WireError,
)

#: The TLS helper, which ``setup.py`` builds.
HELPER = Path(__file__).parents[1] / "tls" / "helper" / "stp-helper"
HELPER_MISSING = (
    "tls: the TLS helper is not built: reinstall with `pip install -e .` (needs gcc and libssl-dev)"
)


class HelperStartError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems

    @classmethod
    def refusal(cls, reply: Message, otherwise: str) -> HelperStartError:
        """What a ``Problems`` answer says, or ``otherwise``."""
        if isinstance(reply, Problems) and reply.problems:
            return cls(list(reply.problems))
        return cls([otherwise])


def require_helper() -> None:
    """Refuse, naming the fix, when the helper is not built (before
    anything is started for it)."""
    if not os.access(HELPER, os.X_OK):
        raise HelperStartError([HELPER_MISSING])


def launch_helper(
    description: bytes,
    link: socket.socket | None = None,
    env: dict[str, str] | None = None,
    *,
    user: int | None = None,
    uid_map: UIDMap | None = None,
) -> tuple[subprocess.Popen[bytes], socket.socket, HelperToKeeper]:
    """Exec the helper, hand it ``description`` (with the ``uid_map`` it
    was described with, and the key server ``link``), and wait for its
    first answer; return the process, its control socket and that answer
    (``Ready`` or ``Problems``)."""
    with memfd(description) as description_fd:
        process, ours = start_process([str(HELPER)], env, user=user)
        try:
            fds = [description_fd]
            fds += [] if uid_map is None else [uid_map.fileno()]
            fds += [] if link is None else [link.fileno()]
            socket.send_fds(ours, [DESCRIPTION], fds)
        except OSError:
            ours.close()
            process.kill()
            process.wait()
            raise
    ours.settimeout(STARTUP_TIMEOUT)
    try:
        reply = HELPER_TO_KEEPER.decode(ours.recv(MAX_MESSAGE))
    except (OSError, WireError) as error:
        # TimeoutError, or a reset: it died with the description unread.
        ours.close()
        process.kill()
        process.wait()
        reason = "in time" if isinstance(error, TimeoutError) else f"({error})"
        raise HelperStartError([f"the TLS helper did not start {reason}"]) from None
    return process, ours, reply


def probe_layers(settings: dict[str, Any]) -> tuple[LayerStatus, ...]:
    """Each layer as a helper started with ``settings`` finds it
    (``--isolation-report``): it probes them as at every start, answers and
    exits, without loading a certificate."""
    require_helper()
    process, control, reply = launch_helper(describe_helper(settings, None, probe_only=True))
    control.close()
    process.wait(EXIT_TIMEOUT)
    if not isinstance(reply, Ready):
        raise HelperStartError.refusal(reply, "the TLS helper failed to start")
    return reply.layers


def describe_helper(
    settings: dict[str, Any],
    references: list[str] | None,
    *,
    uid_map: UIDMap | None = None,
    probe_only: bool = False,
) -> bytes:
    """What a helper is to know (``tls.description``), with what this
    process prepares for it; ``HelperStartError`` naming every certificate
    file that cannot be served. ``uid_map``: the map it will share (handed
    to ``launch_helper`` too)."""
    tls = decode(TLSConfig, settings["tls"])
    isolation = decode(IsolationConfig, settings["isolation"])
    seccomp_program: bytes | None = None
    seccomp_missing: str | None = None
    if isolation.layers.seccomp:
        try:
            seccomp_program = seccomp.compile_filter(seccomp.WORKER_ALLOWED)
        except (ImportError, RuntimeError, OSError) as error:
            seccomp_missing = f"libseccomp not usable: {error}"
    first, count = isolation.uid_range
    try:
        return describe(
            tls,
            isolation,
            key_references=None if references is None else [r.encode() for r in references],
            provider=provider.LIBRARY if references is not None else None,
            seccomp_program=seccomp_program,
            seccomp_missing=seccomp_missing,
            chroot_missing=_prepare_chroot(isolation),
            # The last UID is the key server's (``keys.server.user_id``).
            uid_range=(first, count - 1 if isolation.key_server else count),
            uid_map_size=None if uid_map is None else uid_map.size,
            probe_only=probe_only,
        )
    except ConfigError as error:
        raise HelperStartError(error.problems) from None


def _prepare_chroot(isolation: IsolationConfig) -> str | None:
    """Why the workers' empty root directory is not usable, or None.

    Only root can make it root-owned and unwritable; without root it is
    left to the helper.
    """
    if not isolation.layers.chroot or os.geteuid() != 0:
        return None
    try:
        prepare_root_directory(isolation.chroot)
    except OSError as error:
        return f"isolation.chroot: {error.strerror or error}"
    return None
