"""What the kernel says about a target's processes: CPU time, memory, descriptors.

A target is a process tree: the PIDs the suite launched (a daemon's master, the
proxy's main process) and every live descendant, found through the parent PIDs in
``/proc/*/stat``.  Processes that exited and were reaped are still counted in CPU
time, through their parent's ``cutime``/``cstime``, which is why :func:`tree_cpu_seconds`
adds the children's fields of every live member.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from dataclasses import astuple, dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Descriptors the suite and the daemons it starts may open: 10,000 idle sessions
#: cost the proxy's main process two each, beyond the usual 20,000-odd hard limit.
WANTED_FD_LIMIT = 131_072


def meminfo(field: str) -> int:
    """A ``kB`` field of ``/proc/meminfo`` (e.g. ``MemAvailable``), in bytes."""
    for line in (PROC / "meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise KeyError(f"no {field} in /proc/meminfo")


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` the suite uses (times in clock ticks)."""

    pid: int
    ppid: int
    state: str
    flags: int
    utime: int
    stime: int
    cutime: int
    cstime: int


def read_stat(pid: int) -> ProcStat | None:
    """Parse ``/proc/PID/stat``; ``None`` when the process is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ")".
    fields = text.rpartition(")")[2].split()
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        state=fields[0],
        flags=int(fields[6]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def all_stats() -> list[ProcStat]:
    """``/proc/PID/stat`` of every process that could be read."""
    stats = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                stats.append(stat)
    return stats


def tree(roots: Iterable[int]) -> list[ProcStat]:
    """The live (non-zombie) processes among ``roots`` and all their descendants."""
    stats = all_stats()
    children: dict[int, list[ProcStat]] = {}
    by_pid = {stat.pid: stat for stat in stats}
    for stat in stats:
        children.setdefault(stat.ppid, []).append(stat)
    found: dict[int, ProcStat] = {}
    pending = [by_pid[pid] for pid in roots if pid in by_pid]
    while pending:
        stat = pending.pop()
        if stat.pid in found:
            continue
        found[stat.pid] = stat
        pending.extend(children.get(stat.pid, []))
    return [stat for stat in found.values() if stat.state != "Z"]


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """User+system CPU seconds of the tree, reaped children included."""
    ticks = sum(s.utime + s.stime + s.cutime + s.cstime for s in tree(roots))
    return ticks / CLOCK_TICKS


#: ``flags`` bit of kernel threads (``PF_KTHREAD`` in linux/sched.h).
PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class MachineCPU:
    """Machine-wide CPU seconds since boot, from ``/proc/stat`` and the kernel threads."""

    #: user + nice + system over all CPUs: every process's time (interrupt handling,
    #: which the kernel may account apart from the processes, left out).
    busy: float
    #: Time the hypervisor gave to other guests while this one wanted to run.
    steal: float
    #: utime + stime of the kernel threads (kworkers tearing down namespaces, ...).
    kernel_threads: float

    def __sub__(self, other: MachineCPU) -> MachineCPU:
        return MachineCPU(
            busy=self.busy - other.busy,
            steal=self.steal - other.steal,
            kernel_threads=self.kernel_threads - other.kernel_threads,
        )


def machine_cpu() -> MachineCPU:
    """A snapshot of :class:`MachineCPU`."""
    busy = steal = 0
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("cpu "):
            user, nice, system, _idle, _iowait, _irq, _softirq, stolen = map(int, line.split()[1:9])
            busy, steal = user + nice + system, stolen
            break
    kernel = sum(s.utime + s.stime for s in all_stats() if s.flags & PF_KTHREAD)
    return MachineCPU(
        busy=busy / CLOCK_TICKS, steal=steal / CLOCK_TICKS, kernel_threads=kernel / CLOCK_TICKS
    )


@dataclass(frozen=True)
class Memory:
    """Memory of a set of processes, in bytes, and their open descriptors."""

    uss: int
    pss: int
    rss: int
    fds: int
    processes: int

    def __sub__(self, other: Memory) -> Memory:
        return Memory(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


EMPTY_MEMORY = Memory(uss=0, pss=0, rss=0, fds=0, processes=0)


def _rollup(pid: int) -> dict[str, int]:
    """The ``kB`` lines of ``/proc/PID/smaps_rollup`` as bytes; empty when gone."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return {}
    values: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        number = rest.split()
        if number and number[0].isdigit():
            values[name] = int(number[0]) * 1024
    return values


def fd_count(pid: int) -> int:
    """Open descriptors of ``pid`` (0 when gone)."""
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:
        return 0


def process_memory(pid: int) -> Memory | None:
    """USS (private clean + dirty), PSS, RSS and descriptors of one process."""
    rollup = _rollup(pid)
    if not rollup:
        return None
    return Memory(
        uss=rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0),
        pss=rollup.get("Pss", 0),
        rss=rollup.get("Rss", 0),
        fds=fd_count(pid),
        processes=1,
    )


def tree_memory(roots: Iterable[int]) -> dict[int, Memory]:
    """:func:`process_memory` of every process of the tree, by PID."""
    memories = {}
    for stat in tree(roots):
        memory = process_memory(stat.pid)
        if memory is not None:
            memories[stat.pid] = memory
    return memories


def total_memory(memories: dict[int, Memory]) -> Memory:
    """The sum over processes."""
    columns = zip(*(astuple(memory) for memory in memories.values()), strict=True)
    return Memory(*(sum(column) for column in columns)) if memories else EMPTY_MEMORY


def session_holder(before: dict[int, Memory], after: dict[int, Memory]) -> Memory:
    """The process that gained the most descriptors between two snapshots, as it is after.

    That is the one holding the sessions' sockets: the proxy's or nginx's event loop,
    stunnel, the busiest Dovecot login process.  :data:`EMPTY_MEMORY` for an empty tree.
    """
    if not after:
        return EMPTY_MEMORY
    pid = max(after, key=lambda p: (after[p].fds - before.get(p, EMPTY_MEMORY).fds, after[p].uss))
    return after[pid]


def pin_tree(roots: Iterable[int], cpus: set[int]) -> None:
    """Restrict every thread of the tree to ``cpus`` (new children inherit it)."""
    for stat in tree(roots):
        try:
            tasks = [int(task) for task in os.listdir(PROC / str(stat.pid) / "task")]
        except OSError:
            continue
        for task in tasks:
            try:
                os.sched_setaffinity(task, cpus)
            except OSError:
                # A thread that ended meanwhile, or one whose affinity is locked.
                continue


def raise_fd_limit(wanted: int = WANTED_FD_LIMIT) -> int:
    """Raise this process's descriptor limit (children inherit it); return the new soft limit.

    Root may raise the hard limit too, up to ``fs.nr_open``; others get their hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int((PROC / "sys" / "fs" / "nr_open").read_text())
    except (OSError, ValueError):
        nr_open = hard
    target = min(wanted, nr_open)
    if target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (OSError, ValueError):
            target = hard
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
