"""Process names, as ``ps -e``, ``top`` and ``/proc/PID/comm`` show them.

Every process of the proxy is a ``python``; named, an operator sees at a glance
which is the main process, the keeper, the key server, the TLS helper, a spare
worker and a worker serving a connection.
"""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15
MAIN = "starttls-proxy"
KEEPER = "stp-keeper"
KEY_SERVER = "stp-keyserver"
HELPER = "stp-helper"
SPARE = "stp-spare"
WORKER = "stp-worker"

_prctl = ctypes.CDLL(None).prctl


def name_process(name: str) -> None:
    """Name the calling process (the kernel keeps 15 bytes)."""
    _prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
