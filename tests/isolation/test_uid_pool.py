"""The helper's per-worker UIDs: never two live workers with one UID."""

from __future__ import annotations

import os

from starttls_proxy.zygote import UidPool

FIRST = 400_000


def test_each_live_worker_has_its_own_uid_and_reuse_comes_late() -> None:
    pool = UidPool(FIRST, 3)
    taken = [pool.take() for _ in range(3)]
    assert taken == [FIRST, FIRST + 1, FIRST + 2]
    assert pool.take() is None  # all live: nobody gets a shared one
    for pid, uid in enumerate(taken, start=100):
        assert uid is not None
        pool.bind(uid, pid)
    pool.release(101)
    assert pool.take() == FIRST + 1
    pool.release(100)
    pool.release(102)
    # Round robin: the most recently freed UID is not the next one handed out.
    assert pool.take() == FIRST + 2


def test_a_uid_held_by_an_older_process_stays_taken() -> None:
    """Workers of a helper that died keep their UIDs until they are gone."""
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_end)
        os.setresuid(FIRST + 1, FIRST + 1, FIRST + 1)
        os.write(ready_write, b"!")
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    os.close(ready_write)
    assert os.read(ready_read, 1) == b"!"
    os.close(ready_read)
    try:
        pool = UidPool(FIRST, 2)
        assert pool.take() == FIRST
        assert pool.take() is None
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)
    assert pool.take() == FIRST + 1
