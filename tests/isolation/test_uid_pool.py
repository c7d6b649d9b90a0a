"""The real helper's per-worker UIDs: never two live workers with one UID.

A three-UID ``uid_range`` of its own (no spares, no key server) makes every
assertion decisive: each worker's UID is read from /proc/PID/status once
its handshake is done (it is in its sandbox then). Held connections keep
workers alive; a worker is done with its UID once the helper reports its
exit. A request the helper cannot give a UID to gets no worker: the client
and the channel are closed, without a report.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from starttls_proxy.privileged.uid_map import UIDMap
from starttls_proxy.wire import Problems, SpawnRequest
from tests.isolation.conftest import TEST_UIDS, handshake, helper, worker_uid
from tests.isolation.test_spares import _eventually, _named
from tests.tlshelper.harness import Connection, RunningHelper

#: Just past the other isolation tests' range: no worker of theirs holds one.
FIRST = TEST_UIDS[0] + TEST_UIDS[1]
COUNT = 3
POOL = {FIRST + index for index in range(COUNT)}


@contextlib.contextmanager
def _live(running: RunningHelper, cert_dir: Path) -> Iterator[tuple[Connection, int]]:
    """A worker kept alive by its TLS session, and its UID."""
    connection = running.spawn()
    with handshake(connection, cert_dir):
        yield connection, worker_uid(connection.pid)
    connection.close()
    running.exit_of(connection.pid)


def _refused(running: RunningHelper) -> None:
    """A connection the helper cannot give a worker to: both ends closed, no report."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        accepted, _ = listener.accept()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with client, ours:
        with accepted, theirs:
            # Longer than the wait below: a worker that took it would hold it.
            request = SpawnRequest(handshake_timeout=60.0)
            running.send_request(request.encode(), [accepted.fileno(), theirs.fileno()])
        ours.settimeout(10)
        assert ours.recv(1) == b""
        assert client.recv(1) == b""


def test_each_live_worker_has_its_own_uid_and_reuse_comes_late(
    tmp_path: Path,
    certificates: list[tuple[Path, Path]],
    cert_dir: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    with helper(tmp_path, certificates, uid_range=(FIRST, COUNT), spare_workers=0) as running:
        with contextlib.ExitStack() as held:
            uids = [held.enter_context(_live(running, cert_dir))[1] for _ in range(COUNT)]
            assert set(uids) == POOL
            # Every UID is in use: no shared one for a fourth connection.
            live = sorted(running.children())
            _refused(running)
            assert sorted(running.children()) == live
            assert "no free UID in isolation.uid_range" in capfd.readouterr().err
        # One worker at a time, each gone before the next starts: a UID
        # freed is not the next one handed out (round robin through the range).
        sequential = []
        for _ in range(COUNT):
            connection = running.spawn()
            with handshake(connection, cert_dir):
                sequential.append(worker_uid(connection.pid))
            connection.close()
            running.exit_of(connection.pid)
        assert set(sequential) == POOL


@contextlib.contextmanager
def _older_processes(uid: int, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` processes from before the helper, each holding ``uid``;
    those still running end on exit."""
    processes = [
        subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[])
        for _ in range(count)
    ]
    try:
        yield processes
    finally:
        for process in processes:
            _end(process)


def _end(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


def test_a_uid_held_by_an_older_process_stays_taken(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path
) -> None:
    """Workers of a helper that died keep their UIDs until they are gone;
    any process with a UID of the range at the helper's start counts."""
    occupied = FIRST + 1
    with (
        _older_processes(occupied, 1) as (older,),
        helper(tmp_path, certificates, uid_range=(FIRST, COUNT), spare_workers=0) as running,
        contextlib.ExitStack() as held,
    ):
        uids = [held.enter_context(_live(running, cert_dir))[1] for _ in range(COUNT - 1)]
        assert set(uids) == POOL - {occupied}
        _refused(running)
        _end(older)
        # Gone: its UID is free again.
        _, uid = held.enter_context(_live(running, cert_dir))
        assert uid == occupied


def test_a_uid_held_by_two_older_processes_stays_taken_while_one_is_left(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path
) -> None:
    """Regression: the helper looked only at the first older process found
    with a UID; once that one had ended, the UID counted as free although
    another still held it."""
    occupied = FIRST + 1
    with (
        _older_processes(occupied, 2) as (first, second),
        helper(tmp_path, certificates, uid_range=(FIRST, 2), spare_workers=0) as running,
        contextlib.ExitStack() as held,
    ):
        _, uid = held.enter_context(_live(running, cert_dir))
        assert uid == FIRST
        _end(first)
        _refused(running)
        _end(second)
        _, uid = held.enter_context(_live(running, cert_dir))
        assert uid == occupied


@pytest.mark.parametrize("mode", ["strict", "best-effort"])
def test_a_range_held_in_full_at_start_is_refused_never_served_as_root(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path, mode: str
) -> None:
    """Regression: with every UID of the range held (an earlier helper's
    workers at a restart or reload) the probe had no UID, the identity layer
    was reported as not working here, and in best-effort mode every worker
    of the new helper then ran as root. A full range is a shortage of
    capacity: the new helper refuses to start and says so."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    last = FIRST + COUNT - 1
    with (
        helper(tmp_path / "old", certificates, uid_range=(FIRST, COUNT), spare_workers=0) as old,
        contextlib.ExitStack() as held,
    ):
        for _ in range(COUNT):
            held.enter_context(_live(old, cert_dir))
        with helper(
            tmp_path / "new", certificates, uid_range=(FIRST, COUNT), spare_workers=0, mode=mode
        ) as new:
            assert new.reply == Problems(
                (
                    f"isolation.uid_range: all {COUNT} UIDs for workers ({FIRST}-{last}) are"
                    " held by running processes (workers of an earlier helper still serving?);"
                    " start again once some have ended, or widen the range",
                )
            )
            assert new.process.wait(10) == 1
    # Once they have ended, the same range serves with the identity layer on.
    with helper(
        tmp_path / "new", certificates, uid_range=(FIRST, COUNT), spare_workers=0, mode=mode
    ) as new:
        assert new.layers["identity"][0]
        with _live(new, cert_dir) as (_, uid):
            assert uid in POOL


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_range_held_in_full_neither_spins_nor_floods_the_log(
    tmp_path: Path,
    certificates: list[tuple[Path, Path]],
    cert_dir: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Regression: with every UID held by live workers, the helper retried
    forking a spare at once, forever: a whole core, and millions of "no
    free UID" lines. It now waits longer after each failure and logs it at
    most once a minute; connections meanwhile are refused, and the spares
    come back once UIDs are free."""
    with helper(tmp_path, certificates, uid_range=(FIRST, COUNT), spare_workers=2) as running:
        _eventually(lambda: _named(running, "stp-spare"), 2)
        with contextlib.ExitStack() as held:
            for _ in range(COUNT):
                held.enter_context(_live(running, cert_dir))
            _refused(running)
            pid = running.process.pid
            before = _cpu_seconds(pid)
            time.sleep(1)
            # Busy, it used the whole second; a few retries take milliseconds.
            assert _cpu_seconds(pid) - before < 0.25
            assert _named(running, "stp-spare") == []
            err = capfd.readouterr().err
            assert err.count("no free UID in isolation.uid_range") == 1, err
        _eventually(lambda: _named(running, "stp-spare"), 2)


def test_two_helpers_sharing_the_keepers_map_never_give_one_uid_twice(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path
) -> None:
    """Regression: a reload starts a new helper while the old one still forks
    workers for the sessions sent to it; each saw the other's UIDs only as
    /proc showed them at its start, and the new one handed out a UID that the
    old one had taken since (found in review)."""
    first, count = FIRST + 10, 4  # a range of this test's own
    uid_map = UIDMap(first, count)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with contextlib.ExitStack() as held:
        held.callback(uid_map.close)
        old, new = (
            helper(
                tmp_path / name,
                certificates,
                uid_range=(first, count),
                spare_workers=0,
                uid_map=uid_map,
            )
            for name in ("old", "new")
        )
        replaced = held.enter_context(old)
        uids = [held.enter_context(_live(replaced, cert_dir))[1] for _ in range(2)]
        successor = held.enter_context(new)
        uids.append(held.enter_context(_live(replaced, cert_dir))[1])
        uids.append(held.enter_context(_live(successor, cert_dir))[1])
        assert sorted(uids) == list(range(first, first + count))
        # The range is full, whichever helper is asked.
        _refused(successor)
        _refused(replaced)


def test_a_retired_helper_gives_its_spares_uids_back_to_the_shared_map(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path
) -> None:
    """Regression: a helper retired by a reload reaped its spares without
    giving their UIDs back, so each reload left the next helpers fewer."""
    first, count = FIRST + 20, 4  # a range of this test's own
    uid_map = UIDMap(first, count)
    try:
        with helper(
            tmp_path, certificates, uid_range=(first, count), spare_workers=2, uid_map=uid_map
        ) as running:
            _eventually(lambda: _named(running, "stp-spare"), 2)
            with _live(running, cert_dir):
                pass  # a worker that comes and goes, besides
        # The helper has left: its control socket closed, it retired its spares.
        assert os.pread(uid_map.fileno(), count, 0) == bytes(count)
    finally:
        uid_map.close()
