"""Process names, as ``ps -e``, ``top`` and ``/proc/PID/comm`` show them.

Every process of the proxy is a ``python``; named, an operator sees at a glance
which is the main process, the keeper, the key server, the TLS helper, a spare
worker and a worker serving a connection.

The processes the main process ends (the keeper, the key server, the TLS
helper) are named by ``name_subordinate``, which also keeps them alive through
a stop signal sent to the whole process group: the main process drains its
sessions first and then closes their sockets, and they leave after it.
"""

from __future__ import annotations

import ctypes
import signal

PR_SET_NAME = 15
MAIN = "starttls-proxy"
KEEPER = "stp-keeper"
KEY_SERVER = "stp-keyserver"
HELPER = "stp-helper"
SPARE = "stp-spare"
WORKER = "stp-worker"

#: What a terminal (Ctrl-C) or a supervisor that stops a whole process group
#: (timeout(1), ``kill -- -PGID``, systemd's default KillMode=control-group)
#: sends to every process of the proxy at once.
GROUP_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_prctl = ctypes.CDLL(None).prctl


def name_process(name: str) -> None:
    """Name the calling process (the kernel keeps 15 bytes)."""
    _prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def name_subordinate(name: str) -> None:
    """Name a process that the main process ends, and ignore ``GROUP_STOP_SIGNALS``
    in it (a helper killed mid-drain would cut the sessions the drain waits for)."""
    for signum in GROUP_STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    name_process(name)
