"""The README's first command, as a new user runs it: ``scripts/run-example.sh`` starts
demo backends behind the proxy, and the commands it prints work as it says.

The script takes the example's fixed ports (tests/realservers/demo.py), which no other
test uses: the rest of the suite takes free ports of the kernel's ephemeral range.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from tests.realservers import demo
from tests.realservers.daemons import (
    HOST,
    INSTALL_HINT,
    ProcessStat,
    find_program,
    kill,
    process_table,
    run_command,
    wait_for_line,
)
from tests.realservers.net import accepts_connections
from tests.realservers.proxy import FAILURE_MARKS

ROOT = Path(__file__).resolve().parents[2]
METRICS_PORT = 9425
EVERY_PORT = (
    *demo.PROXY_PORTS,
    METRICS_PORT,
    *demo.POSTFIX_PORTS,
    *demo.DOVECOT_PORTS,
    demo.PROSODY_PORT,
)

#: Bounded waits (seconds). The start includes bootstrap.sh (a no-op once installed).
START_TIMEOUT = 180.0
COMMAND_TIMEOUT = 30.0
STOP_TIMEOUT = 90.0
GONE_TIMEOUT = 10.0


class _Lines:
    """The lines a process writes to ``stream``, collected by a thread as they come."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[str] = []
        self._stream = stream
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def close(self) -> None:
        """Once the stream's writers are gone: the thread has seen the end."""
        self._thread.join(GONE_TIMEOUT)
        assert not self._thread.is_alive(), "something still holds the script's stdout"
        self._stream.close()

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, wanted: str, process: subprocess.Popen[bytes], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while wanted not in self.lines:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {wanted!r} from the script; it printed:\n{self.text()}")
            time.sleep(0.1)
        return self.text()


def _descendants(root: int) -> list[ProcessStat]:
    table = process_table()
    found = [p for p in table if p.pid == root]
    known = {root}
    added = True
    while added:
        added = False
        for entry in table:
            if entry.parent in known and entry.pid not in known:
                known.add(entry.pid)
                found.append(entry)
                added = True
    return found


def _run(command: str) -> str:
    """Run a printed command as a user would paste it; its output (stdout and stderr)."""
    result = run_command(["bash", "-c", command], COMMAND_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command}\nexit {result.returncode}:\n{output}"
    return output


def _check_printed_commands(output: str) -> None:
    commands = [
        line.removeprefix("  $ ") for line in output.splitlines() if line.startswith("  $ ")
    ]
    swaks, imap, pop3, dovecot_log, xmpp, prosody_log = commands

    maildir_line = re.search(r"The message is delivered to (\S+)/$", output, re.MULTILINE)
    assert maildir_line is not None, output
    maildir = Path(maildir_line.group(1))
    assert "250 2.0.0 Ok: queued" in _run(swaks)
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while not (delivered := list(maildir.glob("*"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(delivered) == 1, f"nothing delivered to {maildir}"
    message = delivered[0].read_text(errors="replace")
    assert re.search(rf"^Received: from \S+ \(unknown \[{demo.CLIENT_ADDRESS}\]\)", message, re.M)

    assert '* LIST (\\HasNoChildren) "." INBOX' in _run(imap)
    _run(pop3)
    # Dovecot's log process writes the lines slightly after the logins.
    for login in ("imap-login: Info: Login: user=<alice>", "pop3-login: Info: Login: user=<alice>"):
        line = wait_for_line(lambda: _run(dovecot_log), [login], COMMAND_TIMEOUT, "the grep")
        assert f"rip={demo.CLIENT_ADDRESS}, lip=127.0.0.1" in line
        assert ", secured," in line

    assert "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>" in _run(xmpp)
    assert "Authenticated as alice@localhost" in _run(prosody_log)


@pytest.mark.timeout(START_TIMEOUT + 6 * COMMAND_TIMEOUT + STOP_TIMEOUT)
def test_run_example_starts_demo_backends_and_its_commands_work(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if os.geteuid() != 0:
        pytest.fail("the script starts the demo servers only as root", pytrace=False)
    for program in ("postfix", "dovecot", "prosody", "swaks", "curl", "openssl"):
        if find_program(program) is None:
            pytest.fail(f"{program} is not installed: {INSTALL_HINT}", pytrace=False)
    busy = [port for port in EVERY_PORT if accepts_connections(HOST, port, 0.5)]
    assert not busy, f"the example's ports must be free for this test: {busy} answer"

    # Short: Dovecot's unix sockets are in there, and their paths have a limit (108).
    demo_base = tmp_path_factory.mktemp("d")
    errors = tmp_path / "stderr.txt"
    with errors.open("wb") as error_file:
        script = subprocess.Popen(
            [str(ROOT / "scripts" / "run-example.sh")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=error_file,
            # Where the demo keeps its files, so that a failure leaves nothing elsewhere.
            env={**os.environ, "TMPDIR": str(demo_base)},
            cwd=tmp_path,
            start_new_session=True,
        )
    assert script.stdout is not None
    stdout = _Lines(script.stdout)
    try:
        output = stdout.wait_for(demo.READY_LINE, script, START_TIMEOUT)
        # Postfix's master starts a session of its own: follow every session met.
        sessions = {entry.session for entry in _descendants(script.pid)}
        assert len(sessions) >= 4, sessions  # the script's, and each server's
        _check_printed_commands(output)
    finally:
        kill(script.pid, signal.SIGTERM, group=False)
        try:
            status = script.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill(script.pid, signal.SIGKILL, group=True)
            status = script.wait(STOP_TIMEOUT)
        stdout.close()
    log = errors.read_text(errors="replace")
    assert status == 0, log[-3000:]
    for failure in FAILURE_MARKS:
        assert failure not in log, log[max(0, log.find(failure) - 1500) :][:4000]

    deadline = time.monotonic() + GONE_TIMEOUT
    while left := [p for p in process_table() if p.session in sessions and p.state != "Z"]:
        assert time.monotonic() < deadline, f"left running: {left}"
        time.sleep(0.1)
    assert not [port for port in EVERY_PORT if accepts_connections(HOST, port, 0.5)]
    assert list(demo_base.iterdir()) == [], "the demo's directory was not removed"
