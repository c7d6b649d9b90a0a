"""The helper's spare workers, watched on the real TLS helper.

A spare that dies before it is given a connection is reported like a
worker, and no more are forked ahead until a connection comes (a layer that
fails must not turn into a fork loop); that connection is still served and
the spares come back. Without spares each connection forks its own worker.
The helper's children are read from /proc (``stp-spare`` while one waits,
``stp-worker`` once it serves); exits are what the helper reports.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from starttls_proxy.wire import WorkerExit
from tests.isolation.conftest import TEST_UIDS, helper, served
from tests.tlshelper.harness import RunningHelper, signing_through_test

#: Long enough for the helper's loop to fork ahead many times over, if it did.
SETTLE = 0.3


def _named(running: RunningHelper, name: str) -> list[int]:
    found = []
    for pid in running.children():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                found.append(pid)
        except FileNotFoundError:
            pass  # it just ended
    return found


def _eventually(what: Callable[[], list[int]], count: int) -> list[int]:
    deadline = time.monotonic() + 10
    while len(found := what()) != count:
        assert time.monotonic() < deadline, found
        time.sleep(0.01)
    return found


def test_a_spare_that_dies_is_reported_and_stops_the_forking_ahead(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path
) -> None:
    with helper(tmp_path, certificates, spare_workers=2) as running:
        first, second = _eventually(lambda: _named(running, "stp-spare"), 2)
        os.kill(first, signal.SIGKILL)
        assert running.exit_of(first) == -signal.SIGKILL
        assert (first, -signal.SIGKILL) in running.exits  # {"exited": pid, "status": -9}
        time.sleep(SETTLE)
        assert running.children() == [second]  # no replacement forked ahead
        # The next connection goes to the spare left, and is served.
        connection = running.spawn()
        assert connection.pid == second
        served(connection, cert_dir)
        # Then the helper forks ahead again.
        _eventually(lambda: _named(running, "stp-spare"), 2)


def test_without_spares_each_connection_forks_its_own_worker(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path
) -> None:
    with helper(tmp_path, certificates, spare_workers=0) as running:
        time.sleep(SETTLE)
        assert running.children() == []
        workers = []
        for _ in range(3):
            connection = running.spawn()
            assert running.children() == [connection.pid]
            served(connection, cert_dir)
            assert running.exit_of(connection.pid) == WorkerExit.OK
            workers.append(connection.pid)
        assert len(set(workers)) == len(workers)
        time.sleep(SETTLE)
        assert running.children() == []


def test_the_spares_leave_with_the_helper_and_are_reaped_by_it(
    tmp_path: Path, certificates: list[tuple[Path, Path]]
) -> None:
    """Regression: a helper whose main process left (shutdown, or a reload
    retiring it) exited before its spares, which stayed zombies until
    whoever inherited them reaped them."""
    with helper(tmp_path, certificates, spare_workers=2) as running:
        spares = _eventually(lambda: _named(running, "stp-spare"), 2)
        running.control.close()
        assert running.process.wait(10) == 0
    for pid in spares:
        # Reaped by the helper itself: not even a zombie is left.
        assert not Path(f"/proc/{pid}").exists(), pid


def _writable_memory(pid: int) -> bytes:
    """What ``pid`` may write to (data, heap, stack), read from outside."""
    chunks = []
    with (
        open(f"/proc/{pid}/maps") as maps,
        open(f"/proc/{pid}/mem", "rb", buffering=0) as memory,
    ):
        for line in maps:
            where, permissions = line.split()[:2]
            if permissions.startswith("rw"):
                start, end = (int(address, 16) for address in where.split("-"))
                with contextlib.suppress(OSError):
                    chunks.append(os.pread(memory.fileno(), end - start, start))
    return b"".join(chunks)


@pytest.mark.parametrize("key_server", [False, True], ids=["keys-in-helper", "key-server"])
def test_a_spare_forked_later_holds_nothing_of_an_earlier_request(
    tmp_path: Path, certificates: list[tuple[Path, Path]], key_server: bool
) -> None:
    """Regression: the helper kept the last spawn request and assignment
    (SNI, ALPN, a client's first bytes) in static buffers, which every spare
    forked later inherited; with the key server, the server name it matched
    against the certificates (for the grant) also stayed on its stack."""
    marker = f"marker-{secrets.token_hex(8)}"
    with contextlib.ExitStack() as held:
        if key_server:
            running, _ = held.enter_context(
                signing_through_test(tmp_path, certificates, uid_range=TEST_UIDS, spare_workers=1)
            )
        else:
            running = held.enter_context(helper(tmp_path, certificates, spare_workers=1))
        (first,) = _eventually(lambda: _named(running, "stp-spare"), 1)
        connection = running.spawn(
            server_name_hint=f"{marker}.example", alpn=(marker,), early=marker.encode()
        )
        assert connection.pid == first
        (later,) = _eventually(
            lambda: [pid for pid in _named(running, "stp-spare") if pid != first], 1
        )
        memory = _writable_memory(later)
        connection.close()
    assert len(memory) > 1024 * 1024  # the helper's heap and data: it was read
    assert memory.count(marker.encode()) == 0
