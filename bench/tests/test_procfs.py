"""The CPU split by process and the memory fields read from /proc
(bench.procfs)."""

from __future__ import annotations

import pytest

from bench.procfs import (
    CLOCK_TICKS,
    OTHER_ROLE,
    Memory,
    ProcStat,
    cpu_seconds,
    cpu_seconds_by_role,
    kb_field,
    parse_stat,
    session_holder_pids,
)
from bench.targets import (
    HELPER_ROLE,
    KEEPER_ROLE,
    KEY_SERVER_ROLE,
    MAIN_ROLE,
    PROXY_OWN_ONLY,
    PROXY_ROLES,
)


def _proc(pid: int, ppid: int, comm: str, own: int, reaped: int = 0) -> ProcStat:
    return ProcStat(pid, ppid, "S", 0, own, 0, reaped, 0, comm)


def test_parse_stat_reads_the_name_between_the_outer_parentheses() -> None:
    line = "42 (stp (x) y) S 7 42 42 0 -1 4194560 1 2 3 4 11 12 13 14 20 0 1 0 5 6 7"
    stat = parse_stat(42, line)
    assert (stat.comm, stat.state, stat.ppid) == ("stp (x) y", "S", 7)
    assert (stat.utime, stat.stime, stat.cutime, stat.cstime) == (11, 12, 13, 14)
    assert (stat.own_ticks, stat.reaped_ticks) == (23, 27)


def test_kb_field_of_proc_status() -> None:
    text = "Name:\tstp-worker\nVmRSS:\t    2048 kB\nVmPTE:\t      52 kB\n"
    assert kb_field(text, "VmPTE") == 52 * 1024
    assert kb_field(text, "VmSwap") == 0


def test_cpu_split_of_the_proxys_processes() -> None:
    tick = 1 / CLOCK_TICKS
    stats = [
        # the main process: its own time only; what it reaped goes to "other"
        _proc(10, 1, "starttls-proxy", own=300, reaped=7),
        _proc(11, 10, "stp-keeper", own=2, reaped=1),
        _proc(12, 11, "stp-keyserver", own=40),
        # the helper's reaped workers are the helper's
        _proc(13, 11, "stp-helper", own=5, reaped=900),
        _proc(14, 13, "stp-worker", own=30),
        _proc(15, 13, "stp-spare", own=1),
        # a fork of the helper that has not named itself yet: the helper's
        _proc(16, 13, "stp-helper", own=2),
        # an unnamed child of the main process: not the main process's own time
        _proc(17, 10, "python3", own=4),
    ]
    split = cpu_seconds_by_role(stats, PROXY_ROLES, PROXY_OWN_ONLY)
    assert split == pytest.approx(
        {
            MAIN_ROLE: 300 * tick,
            KEEPER_ROLE: 3 * tick,
            KEY_SERVER_ROLE: 40 * tick,
            HELPER_ROLE: 938 * tick,
            OTHER_ROLE: 11 * tick,
        }
    )
    assert sum(split.values()) == pytest.approx(cpu_seconds(stats))


def test_cpu_split_names_every_role_and_survives_a_parent_loop() -> None:
    # A process whose ancestry leaves the tree or loops counts as "other".
    stats = [_proc(20, 21, "x", own=5), _proc(21, 20, "y", own=6), _proc(22, 99, "z", own=1)]
    split = cpu_seconds_by_role(stats, PROXY_ROLES, PROXY_OWN_ONLY)
    assert set(split) == {MAIN_ROLE, KEEPER_ROLE, KEY_SERVER_ROLE, HELPER_ROLE, OTHER_ROLE}
    assert split[OTHER_ROLE] == pytest.approx(12 / CLOCK_TICKS)
    assert split[MAIN_ROLE] == 0.0


def _memory(fds: int, uss: int = 0) -> Memory:
    return Memory(uss, uss, uss, 0, fds, 1)


def test_the_session_holders_are_the_processes_that_gained_most_descriptors() -> None:
    """One event loop per instance holds the sessions: with two instances,
    both mains, not a worker that was forked meanwhile."""
    before = {1: _memory(20), 2: _memory(20), 3: _memory(5)}
    after = {1: _memory(10_020), 2: _memory(9_990), 3: _memory(5, uss=10**9), 4: _memory(4)}
    assert session_holder_pids(before, after) == [1]
    assert session_holder_pids(before, after, 2) == [1, 2]
    assert session_holder_pids({}, {}) == []
