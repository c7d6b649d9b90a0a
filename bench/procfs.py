"""What the kernel says about a target's processes: CPU time, memory, descriptors.

A target is a process tree: the PIDs the suite launched (a daemon's master, the
proxy's main process) and every live descendant, found through the parent PIDs in
``/proc/*/stat``.  Processes that exited and were reaped are still counted in CPU
time, through their parent's ``cutime``/``cstime``, which is why :func:`tree_cpu_seconds`
adds the children's fields of every live member.  :func:`cpu_seconds_by_role` splits the
same total among a target's processes by their names (``/proc/PID/comm``).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Collection, Iterable, Mapping, Sequence
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
    #: The process's name (``/proc/PID/comm``: 15 bytes at most).
    comm: str = ""

    @property
    def own_ticks(self) -> int:
        """User + system time of the process itself."""
        return self.utime + self.stime

    @property
    def reaped_ticks(self) -> int:
        """User + system time of the children it waited for (``cutime`` + ``cstime``)."""
        return self.cutime + self.cstime


def parse_stat(pid: int, text: str) -> ProcStat:
    """The fields of a ``/proc/PID/stat`` line."""
    # The command name may contain spaces and parentheses: split after the last ")".
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        state=fields[0],
        flags=int(fields[6]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
        comm=head.partition("(")[2],
    )


def read_stat(pid: int) -> ProcStat | None:
    """Parse ``/proc/PID/stat``; ``None`` when the process is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return parse_stat(pid, text)


def all_stats() -> list[ProcStat]:
    """``/proc/PID/stat`` of every process that could be read."""
    stats = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                stats.append(stat)
    return stats


def tree(roots: Iterable[int], *, zombies: bool = False) -> list[ProcStat]:
    """The live processes among ``roots`` and all their descendants (and, with
    ``zombies``, those that ended and were not reaped)."""
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
    return [stat for stat in found.values() if zombies or stat.state != "Z"]


def cpu_seconds(stats: Iterable[ProcStat]) -> float:
    """User+system CPU seconds of these processes, the children they reaped included."""
    return sum(s.own_ticks + s.reaped_ticks for s in stats) / CLOCK_TICKS


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """User+system CPU seconds of the tree, reaped children included."""
    return cpu_seconds(tree(roots))


#: The role of the processes :func:`cpu_seconds_by_role` cannot attribute.
OTHER_ROLE = "other"


def cpu_seconds_by_role(
    stats: Sequence[ProcStat],
    roles: Mapping[str, str],
    own_only: Collection[str] = (),
    other: str = OTHER_ROLE,
) -> dict[str, float]:
    """User+system CPU seconds of a process tree (:func:`tree`), split by role.

    ``roles`` maps process names (``comm``) to roles.  A process whose name is not
    there takes the role of its nearest named ancestor among ``stats`` (a fork that
    has not named itself yet), else ``other``.  A process counts its own time and
    that of the children it reaped under its role (a helper's workers, reaped by the
    helper, count as the helper's), except for the roles in ``own_only``: such a
    process counts only its own time, its reaped children's goes to ``other``, and
    so do its unnamed descendants.  Every role of ``roles`` and ``other`` is in the
    result, so that the values add up to :func:`cpu_seconds` of ``stats``.
    """
    by_pid = {stat.pid: stat for stat in stats}
    seconds = dict.fromkeys([*roles.values(), other], 0.0)

    def role_of(stat: ProcStat) -> str:
        seen: set[int] = set()
        ancestor: ProcStat | None = stat
        while ancestor is not None and ancestor.pid not in seen:
            if ancestor.comm in roles:
                role = roles[ancestor.comm]
                return role if ancestor is stat or role not in own_only else other
            seen.add(ancestor.pid)
            ancestor = by_pid.get(ancestor.ppid)
        return other

    for stat in stats:
        role = role_of(stat)
        seconds[role] += stat.own_ticks / CLOCK_TICKS
        reaped_role = other if role in own_only else role
        seconds[reaped_role] += stat.reaped_ticks / CLOCK_TICKS
    return seconds


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
    #: Page tables (``VmPTE`` of ``/proc/PID/status``): kernel memory, not in the above.
    pte: int
    fds: int
    processes: int

    def __sub__(self, other: Memory) -> Memory:
        return Memory(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


EMPTY_MEMORY = Memory(uss=0, pss=0, rss=0, pte=0, fds=0, processes=0)


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


def kb_field(text: str, field: str) -> int:
    """A ``kB`` field of a ``/proc`` status text (``VmPTE:     52 kB``) in bytes; 0 if absent."""
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            number = rest.split()
            return int(number[0]) * 1024 if number and number[0].isdigit() else 0
    return 0


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (e.g. ``VmPTE``) in bytes; 0 when gone or absent."""
    try:
        return kb_field((PROC / str(pid) / "status").read_text(), field)
    except OSError:
        return 0


def fd_count(pid: int) -> int:
    """Open descriptors of ``pid`` (0 when gone)."""
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:
        return 0


def process_memory(pid: int) -> Memory | None:
    """USS (private clean + dirty), PSS, RSS, page tables and descriptors of one process."""
    rollup = _rollup(pid)
    if not rollup:
        return None
    return Memory(
        uss=rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0),
        pss=rollup.get("Pss", 0),
        rss=rollup.get("Rss", 0),
        pte=status_kb(pid, "VmPTE"),
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


def session_holder_pids(
    before: dict[int, Memory], after: dict[int, Memory], count: int = 1
) -> list[int]:
    """The ``count`` processes that gained the most descriptors between two snapshots.

    Those hold the sessions' sockets: the proxy's event loop (one per instance),
    nginx's, stunnel, the busiest Dovecot login process.  Empty for an empty tree.
    """

    def gained(pid: int) -> tuple[int, int]:
        return after[pid].fds - before.get(pid, EMPTY_MEMORY).fds, after[pid].uss

    return sorted(after, key=gained, reverse=True)[:count]


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
