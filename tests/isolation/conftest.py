"""The sandbox tests drive the real TLS helper (``stp-helper``), root only.

Each test starts the C helper as the keeper does (``tests.tlshelper.harness``)
and hands it real loopback connections as the main process does; the
workers enter namespaces, chroots and other UIDs for real. What a worker
finds inside its sandbox comes from the helper's own self check
(``isolation.self_test``): one ``starttls_proxy.selftest {json}`` line per
worker on the helper's stderr, which the helper inherits from the test
process (pytest's ``capfd`` captures it at the descriptor level).

A missing privilege is a failure, not a skip (CI runs as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from starttls_proxy.wire import SELF_TEST_LOG_PREFIX
from tests.tlshelper.harness import Connection, RunningHelper, running_helper

#: Far from the proxy's default range and from the other suites' (the
#: helper tests use 320_000), so that a helper of another test run at the
#: same time never hands out one of these UIDs.
TEST_UIDS = (330_000, 1_000)


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the sandbox tests must run as root", pytrace=False)


@pytest.fixture
def certificates(cert_dir: Path) -> list[tuple[Path, Path]]:
    return [(cert_dir / "cert.pem", cert_dir / "key.pem")]


@contextlib.contextmanager
def helper(
    directory: Path, certificates: list[tuple[Path, Path]], **isolation: Any
) -> Iterator[RunningHelper]:
    """The real helper with the isolation tests' UID range (unless given)."""
    isolation.setdefault("uid_range", TEST_UIDS)
    with running_helper(directory, certificates, **isolation) as running:
        yield running


def client_context(cert_dir: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))


def handshake(connection: Connection, cert_dir: Path) -> ssl.SSLSocket:
    """The client's TLS handshake with the worker; the worker's report must say ok."""
    tls = client_context(cert_dir).wrap_socket(connection.client, server_hostname="localhost")
    report = connection.report()
    assert report["ok"], report
    return tls


def served(connection: Connection, cert_dir: Path) -> None:
    """A whole session: handshake, a line each way, both ends closed."""
    with handshake(connection, cert_dir) as tls:
        tls.sendall(b"ping\r\n")
        assert _exactly(connection, 6) == b"ping\r\n"
        connection.channel.sendall(b"pong\r\n")
        assert tls.recv(6) == b"pong\r\n"
    connection.channel.close()


def _exactly(connection: Connection, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.channel.recv(size - len(data))
        assert chunk, data
        data += chunk
    return data


def worker_uid(pid: int) -> int:
    """The real UID of a live worker, seen from outside."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


class SelfTestLog:
    """The self-test lines the workers wrote on the (captured) stderr."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.reports: dict[int, dict[str, Any]] = {}

    def of(self, pid: int, timeout: float = 10.0) -> dict[str, Any]:
        """The report of the worker whose PID (outside its namespace) is ``pid``."""
        deadline = time.monotonic() + timeout
        while pid not in self.reports:
            assert time.monotonic() < deadline, f"no self-test line from worker {pid}"
            for line in self.capfd.readouterr().err.splitlines():
                if line.startswith(SELF_TEST_LOG_PREFIX):
                    report = json.loads(line.removeprefix(SELF_TEST_LOG_PREFIX))
                    self.reports[int(report["status"]["NSpid"].split()[0])] = report
            time.sleep(0.02)
        return self.reports[pid]


@pytest.fixture
def self_tests(capfd: pytest.CaptureFixture[str]) -> SelfTestLog:
    return SelfTestLog(capfd)
