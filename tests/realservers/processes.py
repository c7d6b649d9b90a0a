"""The proxy's process tree, seen through /proc (the tests run as root).

main (drops to nobody) -> keeper (root) -> key server, and helper (root) ->
spares and workers (one UID each, PID 1 of their own namespaces). Workers of
a helper that died are adopted by the keeper.

Any of them may end while it is looked at (a worker whose session closes, a
spare of a departed helper): what ended is left out, never an error.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tests.realservers.proxy import ProxyProcess

#: What reading /proc raises once the process has ended.
ENDED = (FileNotFoundError, ProcessLookupError)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(*ENDED):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def namespace(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _runs(pid: int, module: bytes) -> bool:
    with contextlib.suppress(*ENDED):
        return module in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def keeper(proxy: ProxyProcess) -> int:
    (found,) = children(proxy.process.pid)
    return found


def key_servers(proxy: ProxyProcess) -> list[int]:
    return [pid for pid in children(keeper(proxy)) if _runs(pid, b"starttls_proxy.keys.server")]


def key_server(proxy: ProxyProcess) -> int:
    (found,) = key_servers(proxy)
    return found


def helpers(proxy: ProxyProcess) -> list[int]:
    """The live helper (a list: none between a helper's death and the next)."""
    the_keeper = keeper(proxy)

    def in_keepers_pid_namespace(pid: int) -> bool:
        # The keeper's other children that run the helper's executable are
        # workers of a dead helper, each in a PID namespace of its own.
        with contextlib.suppress(*ENDED):
            return namespace(pid, "pid") == namespace(the_keeper, "pid")
        return False

    return [
        pid
        for pid in children(the_keeper)
        if _runs(pid, b"tls/helper/stp-helper") and in_keepers_pid_namespace(pid)
    ]


def helper(proxy: ProxyProcess) -> int:
    (found,) = helpers(proxy)
    return found


def helper_children_named(proxy: ProxyProcess, name: str) -> set[int]:
    """The helper's children whose process name is ``name`` (stp-spare, stp-worker)."""
    found = set()
    for pid in children(helper(proxy)):
        with contextlib.suppress(*ENDED):
            if status(pid)["Name"] == name:
                found.add(pid)
    return found


def worker_uids(proxy: ProxyProcess) -> list[int]:
    """The UID of every live worker and spare, whichever helper forked it
    (the keeper's own children: those of a helper gone)."""
    uids, pending = [], children(keeper(proxy))
    while pending:
        pid = pending.pop()
        with contextlib.suppress(*ENDED):
            found = status(pid)
            if found["Name"] in ("stp-worker", "stp-spare"):
                uids.append(int(found["Uid"].split()[0]))
            pending += children(pid)
    return uids
