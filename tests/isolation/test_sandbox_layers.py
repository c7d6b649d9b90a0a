"""Each sandbox layer, entered for real by workers of the real TLS helper.

The C helper (``stp-helper``) is started as the keeper starts it and gets
real loopback connections as the main process hands them over
(``tests.tlshelper.harness``). What the helper finds out about the layers
is its "ready" reply (a throwaway probe worker enters them all, as in
production); what a worker finds inside its sandbox is the self check
every worker runs with ``isolation.self_test`` (``tls/helper/selftest.c``:
its identity, root, limits, and what open/socket/connect/fork/kill/ptrace
return), read from the helper's stderr; how a worker ends is the exit
status the helper reports for it.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import signal
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL

from starttls_proxy.wire import FORBIDDEN_SYSCALL_SNI, Problems, Ready, WorkerExit
from tests.isolation.conftest import (
    TEST_UIDS,
    SelfTestLog,
    handshake,
    helper,
    served,
    worker_uid,
)
from tests.realservers.net import read_to_end
from tests.tlshelper.harness import Connection, RunningHelper

#: The layers in the order a worker enters them (``tls/helper/wire.h``).
LAYERS = (
    "pid_namespace",
    "namespaces",
    "chroot",
    "identity",
    "hardening",
    "memory_limit",
    "seccomp",
)
OFF = "off (isolation.layers)"
NOBODY = 65534
#: A UID no process has: RLIMIT_NPROC counts a user's processes.
LONER = 339_000
MiB = 1024 * 1024


def _applied(running: RunningHelper) -> dict[str, bool]:
    return {name: applied for name, (applied, _) in running.layers.items()}


def _with_spares(running: RunningHelper, count: int = 2) -> list[int]:
    """Wait until the helper has forked ``count`` spares ahead (its idle work)."""
    deadline = time.monotonic() + 10
    while len(children := running.children()) < count:
        assert time.monotonic() < deadline, children
        time.sleep(0.01)
    return children


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for {pid}")


def test_every_layer_applies_as_root(tmp_path: Path, certificates: list[tuple[Path, Path]]) -> None:
    with helper(tmp_path, certificates) as running:
        assert isinstance(running.reply, Ready), running.reply
        assert [(name, applied) for name, applied, _ in running.reply.layers] == [
            (name, True) for name in LAYERS
        ]
    # The keeper made the empty root root-owned and unwritable.
    root = tmp_path / "empty"
    assert (root.stat().st_uid, root.stat().st_mode & 0o777) == (0, 0o555)


def test_every_other_layer_applies_without_the_pid_namespace(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path
) -> None:
    """Regression: with only pid_namespace off, the probe worker once died
    before reporting (dup3 onto the same descriptor) and took every layer."""
    with helper(tmp_path, certificates, layers={"pid_namespace": False}) as running:
        assert _applied(running) == {name: name != "pid_namespace" for name in LAYERS}
        assert running.layers["pid_namespace"] == (False, OFF)
        served(running.spawn(), cert_dir)


def test_worker_identity_root_and_limits(
    tmp_path: Path,
    certificates: list[tuple[Path, Path]],
    cert_dir: Path,
    self_tests: SelfTestLog,
) -> None:
    memory_limit = 32 * MiB
    with helper(tmp_path, certificates, self_test=True, memory_limit=memory_limit) as running:
        connection = running.spawn()
        with handshake(connection, cert_dir):
            report = self_tests.of(connection.pid)
            uid = worker_uid(connection.pid)
            helper_size = _vm_size(running.process.pid)
        connection.close()
    first, count = TEST_UIDS
    assert first <= uid < first + count
    root = (tmp_path / "empty").stat()
    assert {key: report[key] for key in ("pid", "uids", "gids", "groups", "root_entries")} == {
        "pid": 1,  # PID 1 of a namespace of its own
        "uids": [uid] * 3,  # the UID it has seen from outside, real, effective and saved
        "gids": [uid] * 3,
        "groups": [],
        "root_entries": [],  # chrooted into the empty directory
    }
    assert report["root_inode"] == [root.st_dev, root.st_ino]
    assert report["status"]["NSpid"].split() == [str(connection.pid), "1"]
    assert (report["dumpable"], report["no_new_privs"]) == (0, 1)
    limits = report["rlimits"]
    # stdin, stdout, stderr, the client, its channel and the self check's
    # status file: nothing more.
    assert (limits["nofile"], limits["nproc"], limits["core"]) == (6, 0, 0)
    # The address space it inherited from the helper plus memory_limit.
    assert abs(limits["as"] - memory_limit - helper_size) < 2 * MiB, (limits, helper_size)


def test_other_layers_hold_without_seccomp(
    tmp_path: Path,
    certificates: list[tuple[Path, Path]],
    cert_dir: Path,
    self_tests: SelfTestLog,
) -> None:
    """Defence in depth: with the filter off, chroot, rlimits and namespaces still stop."""
    with helper(tmp_path, certificates, self_test=True, layers={"seccomp": False}) as running:
        spares = _with_spares(running)
        connection = running.spawn()
        with handshake(connection, cert_dir):
            report = self_tests.of(connection.pid)
        connection.close()
    assert report["status"]["Seccomp"] == "0"
    assert {key: report[key] for key in ("open", "socket", "fork")} == {
        "open": "EMFILE",  # no descriptor left (and nothing in the empty root)
        "socket": "EMFILE",
        "fork": "EAGAIN",  # RLIMIT_NPROC 0
    }
    # Its only socket is the client's, already connected.
    assert report["connect"] == "EISCONN"
    # The other spare waiting: not even visible from its PID namespace.
    others = {str(pid) for pid in spares if pid != connection.pid}
    assert others and others <= report["kill"].keys()
    assert set(report["kill"].values()) == {"ESRCH"}
    assert set(report["ptrace"].values()) == {"ESRCH"}


def test_seccomp_refuses_and_kills(
    tmp_path: Path,
    certificates: list[tuple[Path, Path]],
    cert_dir: Path,
    self_tests: SelfTestLog,
) -> None:
    with helper(tmp_path, certificates, self_test=True) as running:
        _with_spares(running)
        first = running.spawn()
        with handshake(first, cert_dir):
            second = running.spawn()
            with handshake(second, cert_dir):
                report = self_tests.of(second.pid)
            second.close()
        first.close()

        # A system call outside the allow-list kills the worker.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        doomed = running.spawn()
        with context.wrap_socket(doomed.client, server_hostname=FORBIDDEN_SYSCALL_SNI) as tls:
            assert running.exit_of(doomed.pid) == -signal.SIGSYS
            with pytest.raises(EOFError):  # killed before it could report
                doomed.report()
            assert read_to_end(tls, ends=(ConnectionResetError, ssl.SSLError)) == b""
        doomed.close()
    assert report["status"]["Seccomp"] == "2"
    for action in ("open", "socket", "connect", "fork"):
        assert report[action] == "EPERM", (action, report)
    # The first worker (still serving) and the spares: neither signalled nor traced.
    assert str(first.pid) in report["kill"]
    for attempt in ("kill", "ptrace"):
        assert set(report[attempt].values()) == {"EPERM"}, (attempt, report[attempt])


def test_memory_limit_stops_a_large_allocation(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path
) -> None:
    """Plaintext from the channel is encrypted into a buffer for the client
    (``worker.c``); a client that reads nothing makes that buffer grow. A
    worker may map only ``memory_limit`` beyond what it inherited: under
    128 KiB, 64 KiB to encrypt is already too much and the worker fails,
    its own failure rather than a peer's (counted as a crash); under the
    default limit the same megabyte gets through."""
    plaintext = bytes(range(256)) * 4096  # 1 MiB
    with helper(tmp_path, certificates, memory_limit="128KiB") as running:
        assert running.layers["memory_limit"][0]
        connection = running.spawn()
        with handshake(connection, cert_dir):
            _send_until_refused(connection, plaintext)
            assert running.exit_of(connection.pid) == WorkerExit.INTERNAL_ERROR
        connection.close()
    with helper(tmp_path, certificates) as running:
        connection = running.spawn()
        with handshake(connection, cert_dir) as tls:
            _send_until_refused(connection, plaintext)
            received = b""
            while len(received) < len(plaintext):
                chunk = tls.recv(len(plaintext) - len(received))
                assert chunk, len(received)
                received += chunk
            assert received == plaintext
        connection.close()


def _send_until_refused(connection: Connection, data: bytes) -> None:
    """``data`` down the channel, 64 KiB at a time, while the worker takes it."""
    connection.channel.settimeout(10)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for start in range(0, len(data), 65536):
            connection.channel.sendall(data[start : start + 65536])


def test_deadline_ends_a_pid_namespace_init(
    tmp_path: Path, certificates: list[tuple[Path, Path]]
) -> None:
    """SIGALRM's default action is ignored by a PID namespace's init: the
    deadline must still end a worker whose client never sends a ClientHello."""
    with helper(tmp_path, certificates) as running:
        assert running.layers["pid_namespace"][0]
        started = time.monotonic()
        connection = running.spawn(handshake_timeout=1.0)
        assert running.exit_of(connection.pid) == WorkerExit.DEADLINE
        assert time.monotonic() - started < 3
        connection.channel.settimeout(5)
        assert connection.channel.recv(1) == b""  # no report: it ended at once
        connection.close()


def test_strict_mode_names_a_layer_that_cannot_apply(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path
) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("not empty")
    with helper(tmp_path, certificates, chroot=occupied, mode="strict") as running:
        assert isinstance(running.reply, Problems), running.reply
        (problem,) = running.reply.problems
        assert problem.startswith("isolation.layers.chroot: cannot be applied")
        assert "not empty" in problem
    with helper(tmp_path, certificates, chroot=occupied, mode="best-effort") as running:
        applied, detail = running.layers["chroot"]
        assert not applied and "not empty" in detail
        assert _applied(running) == {name: name != "chroot" for name in LAYERS}
        served(running.spawn(), cert_dir)


@pytest.fixture
def readable_certificates(cert_dir: Path) -> Iterator[list[tuple[Path, Path]]]:
    """The test certificate where an ordinary user can read it (pytest's
    temporary directories are root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="stp-isolation-"))
    try:
        directory.chmod(0o755)
        for name in ("cert.pem", "key.pem"):
            shutil.copy(cert_dir / name, directory / name)
            (directory / name).chmod(0o644)
        yield [(directory / "cert.pem", directory / "key.pem")]
    finally:
        shutil.rmtree(directory)


def test_best_effort_as_an_ordinary_user(
    tmp_path: Path,
    readable_certificates: list[tuple[Path, Path]],
    cert_dir: Path,
    self_tests: SelfTestLog,
) -> None:
    """Without root: a user namespace still gives namespaces, chroot (into a
    deleted directory), hardening, the memory limit and seccomp."""
    with helper(
        tmp_path, readable_certificates, user=NOBODY, mode="best-effort", self_test=True
    ) as running:
        applied = {name for name, is_applied in _applied(running).items() if is_applied}
        assert applied == {"namespaces", "chroot", "hardening", "memory_limit", "seccomp"}
        assert running.layers["identity"] == (False, "needs root")
        assert running.layers["pid_namespace"] == (False, "needs root")
        connection = running.spawn()
        with handshake(connection, cert_dir):
            report = self_tests.of(connection.pid)
            assert worker_uid(connection.pid) == NOBODY
        connection.close()
    assert report["root_entries"] == []
    assert (report["status"]["Seccomp"], report["status"]["NoNewPrivs"]) == ("2", "1")
    assert report["socket"] == report["open"] == "EPERM"


@contextlib.contextmanager
def _one_process_a_user() -> Iterator[None]:
    """RLIMIT_NPROC 1 for what this (root, exempt) process starts meanwhile:
    a helper started as LONER is its one process and can fork nothing."""
    limit = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (1, limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, limit)


@pytest.mark.parametrize("namespaces", [True, False])
def test_a_fork_that_fails_while_probing_stops_the_start_and_drops_no_layer(
    tmp_path: Path, readable_certificates: list[tuple[Path, Path]], namespaces: bool
) -> None:
    """Regression: a probe worker that could not be forked (EAGAIN here)
    was taken for a PID namespace refused: that layer was dropped with
    "unshare(pid)", and when the second probe failed too, every other layer
    was reported applied without a test. Making the shared namespaces
    (their child comes first) dropped that layer the same way. Out of
    processes, the helper cannot start."""
    with (
        _one_process_a_user(),
        helper(
            tmp_path,
            readable_certificates,
            user=LONER,
            mode="best-effort",
            layers={"namespaces": namespaces},
        ) as running,
    ):
        assert running.reply == Problems(
            (
                "the workers' sandbox cannot be probed (fork: Resource temporarily"
                " unavailable); start again",
            )
        )
        assert running.process.wait(10) == 1


def _server_random(connection: Connection, cert_dir: Path) -> bytes:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.load_verify_locations(str(cert_dir / "ca.pem"))
    context.set_verify(SSL.VERIFY_PEER)
    connection.client.settimeout(None)  # pyOpenSSL wants a blocking socket
    tls = SSL.Connection(context, connection.client)
    tls.set_tlsext_host_name(b"localhost")
    tls.set_connect_state()
    tls.do_handshake()
    random = tls.server_random()
    assert random is not None
    assert connection.report()["ok"]
    tls.shutdown()
    return random


def test_openssl_reseeds_in_every_pid1_worker(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path
) -> None:
    """All workers are PID 1 (OpenSSL's fork detection sees no new PID) and
    forks of one helper whose generator was seeded by its warm-up handshake:
    their ServerHello randoms must still all differ."""
    randoms = []
    with helper(tmp_path, certificates) as running:
        assert running.layers["pid_namespace"][0]
        for _ in range(20):
            connection = running.spawn()
            randoms.append(_server_random(connection, cert_dir))
            connection.close()
    assert len(set(randoms)) == len(randoms)


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_can_be_switched_off(
    tmp_path: Path, certificates: list[tuple[Path, Path]], cert_dir: Path, layer: str
) -> None:
    with helper(tmp_path, certificates, layers={layer: False}) as running:
        assert running.layers[layer] == (False, OFF)
        assert _applied(running) == {name: name != layer for name in LAYERS}
        served(running.spawn(), cert_dir)
