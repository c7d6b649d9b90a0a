"""The keeper, as a unit (the e2e tests drive it through the real proxy)."""

from __future__ import annotations

import json
import socket

from starttls_proxy.keeper import Keeper

TLS = {"certificates": [{"cert": "/etc/a/cert.pem", "key": "/etc/a/key.pem"}]}


def test_the_keeper_outlives_a_main_process_that_has_left() -> None:
    """Regression: the key server's counts, or a worker's exit, reaching the
    keeper just after the main process closed its socket made the keeper
    die with a BrokenPipeError traceback during a clean shutdown."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.close()
    configuration = json.dumps({"tls": TLS, "isolation": {}}).encode()
    with ours:
        keeper = Keeper(ours, configuration)
        assert keeper.on_child_exit(pid=123_456, code=0)
