"""SIGTERM: stop accepting, let sessions finish, then a protocol goodbye; no process left."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.daemons import process_table
from tests.realservers.dialogue import read_smtp_reply, read_until, smtp_greeted, smtp_upgraded
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import listener, start_proxy

SOURCE = "127.0.0.70"
GOODBYE = b"421 4.3.2 proxy.test Service shutting down\r\n"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for process in process_table():
        children.setdefault(process.parent, []).append(process.pid)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("to_the_group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_drains_then_says_goodbye(
    tmp_path: Path, postfix: PostfixInstance, test_certs: CertFiles, to_the_group: bool
) -> None:
    """SIGTERM to the main process (systemd with KillMode=mixed) or to every
    process of the proxy at once (timeout(1), ``kill -- -PGID``, systemd's
    default KillMode): the same drain, the same goodbyes, the same exit."""
    proxy = start_proxy(
        tmp_path,
        [(test_certs.cert, test_certs.key)],
        [listener("smtp", postfix.proxy_port, require_tls=False, backend={"identity": "proxy-v2"})],
        shutdown={"drain_timeout": 3},
    )
    try:
        plaintext = smtp_greeted(proxy.connect("smtp", SOURCE))
        upgraded = smtp_upgraded(proxy.connect("smtp", SOURCE), test_certs)
        polite = smtp_upgraded(proxy.connect("smtp", SOURCE), test_certs)
        processes = _descendants(proxy.process.pid)
        assert len(processes) >= 4  # keeper, helper, two workers

        if to_the_group:
            os.killpg(proxy.process.pid, signal.SIGTERM)
        else:
            proxy.process.send_signal(signal.SIGTERM)
        proxy.wait_for_log("shutting down: waiting up to 3s")
        with pytest.raises(OSError):
            proxy.connect("smtp")  # no longer accepting
        # A session may finish on its own during the drain.
        polite.sendall(b"NOOP\r\n")
        assert read_smtp_reply(polite).startswith(b"250")
        polite.sendall(b"QUIT\r\n")
        assert read_smtp_reply(polite).startswith(b"221")
        polite.close()
        # The others are told, in their protocol, once the drain is over.
        assert read_until(plaintext, GOODBYE).endswith(GOODBYE)
        assert read_until(upgraded, GOODBYE).endswith(GOODBYE)
        plaintext.close()
        upgraded.close()
        assert proxy.process.wait(20) == 0
    finally:
        proxy.stop()
    log = proxy.log()
    assert "Traceback" not in log
    assert not [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line]
    # Workers finish their closing handshake with the client, then exit.
    deadline = time.monotonic() + 10
    while [pid for pid in processes if _alive(pid)]:
        assert time.monotonic() < deadline, [pid for pid in processes if _alive(pid)]
        time.sleep(0.1)
