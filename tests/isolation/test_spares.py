"""The helper's spare workers: a spare that dies before it is given a
connection is reported, and no more are forked ahead until one is needed;
the replacement of a spare handed out waits until its handshake is under
way, unless none is left."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, cast

from starttls_proxy.sandbox import EXIT_SANDBOX_FAILED, Layer, Sandbox
from starttls_proxy.tls_contexts import CertificateStore
from starttls_proxy.zygote import TOP_UP_DELAY, Helper, Spare, UidPool


@dataclass
class _Settings:
    spare_workers: int = 2
    self_test: bool = False


@dataclass
class _BrokenSandbox:
    """Forks children that fail at once, as a spare whose layer cannot be entered."""

    config: _Settings = field(default_factory=_Settings)
    layers: frozenset[Layer] = frozenset()

    def fork(self) -> int:
        pid = os.fork()
        if pid == 0:
            os._exit(EXIT_SANDBOX_FAILED)
        return pid


def _helper() -> tuple[Helper, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    store = cast(CertificateStore, None)  # never reached: the children exit first
    sandbox = cast(Sandbox, _BrokenSandbox())
    return Helper(ours, store, sandbox, UidPool(410_000, 4)), theirs


def _reap_all(helper: Helper) -> None:
    deadline = time.monotonic() + 10
    while helper.workers:
        assert time.monotonic() < deadline
        helper.reap()
        time.sleep(0.01)


def test_a_spare_that_fails_is_reported_and_stops_the_forking_ahead() -> None:
    helper, main = _helper()
    helper.top_up()
    (spare,) = helper.spares
    _reap_all(helper)
    message: dict[str, Any] = json.loads(main.recv(4096))
    assert message == {"exited": spare.pid, "status": EXIT_SANDBOX_FAILED}
    assert not helper.spares and helper.spares_failing
    helper.top_up()
    assert not helper.spares and not helper.workers  # no fork loop
    helper.control.close()
    main.close()


def test_the_replacement_of_a_spare_waits_unless_none_is_left() -> None:
    helper, main = _helper()
    with main, helper.control:
        assert helper.top_up_timeout() == 0.0  # no spare at all: fork now
        helper.spares.extend(Spare(pid, helper.control) for pid in (1, 2))
        assert helper.top_up_timeout() is None  # all there: nothing to wait for
        helper.spares.pop()
        helper.handed_out()
        due = helper.top_up_at
        timeout = helper.top_up_timeout()
        assert timeout is not None and 0.0 < timeout <= TOP_UP_DELAY
        helper.handed_out()
        assert helper.top_up_at == due  # a second assignment does not push it
        helper.top_up_at = time.monotonic() - 1
        assert helper.top_up_timeout() == 0.0
        helper.spares.clear()
