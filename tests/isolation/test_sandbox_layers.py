"""Each sandbox layer, entered for real by forked children of the test process.

The children are forked by ``Sandbox.fork`` and enter ``Sandbox.enter``
exactly as TLS workers do; what they find is sent back as JSON on a pipe
(the only descriptor they keep).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from starttls_proxy.sandbox import (
    EXIT_DEADLINE,
    PR_SET_DUMPABLE,
    Layer,
    Sandbox,
    arm_deadline,
    prctl,
)
from starttls_proxy.settings import IsolationConfig, TLSConfig, checked
from starttls_proxy.tls_contexts import load_certificates
from starttls_proxy.worker import TLSPump
from tests.isolation.conftest import TEST_UIDS, make_sandbox

Report = dict[str, object]


def _in_worker(
    sandbox: Sandbox,
    body: Callable[[], Report],
    prelude: Callable[[], None] = lambda: None,
) -> tuple[Report | None, int]:
    """Run ``prelude``, enter the sandbox, run ``body``; return its report and
    the child's wait status."""
    read_end, write_end = os.pipe()
    pid = sandbox.fork()
    if pid == 0:
        try:
            prelude()
            (out,) = sandbox.enter(TEST_UIDS[0], [write_end])
            os.write(out, json.dumps(body()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, status = os.waitpid(pid, 0)
    return (json.loads(data) if data else None), status


def _errno_of(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as error:
        return errno.errorcode[error.errno or 0]
    return "succeeded"


def _fork_and_leave() -> None:
    if os.fork() == 0:
        os._exit(0)


def test_every_layer_applies_as_root(tmp_path: Path) -> None:
    config = checked(
        IsolationConfig, {"chroot": tmp_path / "empty", "uid_range": TEST_UIDS}, "isolation"
    )
    sandbox, statuses = Sandbox.prepare(config, TEST_UIDS[0])
    assert [(s.name, s.applied) for s in statuses] == [(layer.value, True) for layer in Layer]
    assert sandbox.problems(statuses) == []
    root = tmp_path / "empty"
    assert (root.stat().st_uid, root.stat().st_mode & 0o777) == (0, 0o555)


def test_every_other_layer_applies_without_the_pid_namespace(tmp_path: Path) -> None:
    """Regression: with only pid_namespace off, the probe worker once died
    before reporting (dup3 onto the same descriptor) and took every layer."""
    config = checked(
        IsolationConfig,
        {"chroot": tmp_path / "empty", "uid_range": TEST_UIDS, "layers": {"pid_namespace": False}},
        "isolation",
    )
    _, statuses = Sandbox.prepare(config, TEST_UIDS[0])
    assert [(s.name, s.applied) for s in statuses] == [
        (layer.value, layer is not Layer.PID_NAMESPACE) for layer in Layer
    ]


def test_worker_identity_root_and_limits(tmp_path: Path) -> None:
    def look() -> Report:
        return {
            "pid": os.getpid(),
            "uids": os.getresuid(),
            "groups": os.getgroups(),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
        }

    report, status = _in_worker(make_sandbox(tmp_path, layers={"seccomp": False}), look)
    assert status == 0
    assert report == {
        "pid": 1,
        "uids": [TEST_UIDS[0]] * 3,
        "groups": [],
        "nofile": [4, 4],  # stdin, stdout, stderr and the pipe: nothing more
        "nproc": [0, 0],
    }


def test_other_layers_hold_without_seccomp(tmp_path: Path) -> None:
    """Defence in depth: with the filter off, chroot, rlimits and namespaces still stop."""
    sandbox = make_sandbox(tmp_path, layers={"seccomp": False})
    report, status = _in_worker(
        sandbox,
        lambda: {
            "open": _errno_of(lambda: os.open("/etc/passwd", os.O_RDONLY)),
            "socket": _errno_of(socket.socket),
            "fork": _errno_of(_fork_and_leave),
            "root": _errno_of(lambda: os.listdir("/")),
            "kill_init": _errno_of(lambda: os.kill(-1, 0)),
        },
    )
    assert status == 0
    assert report == {
        "open": "EMFILE",  # no descriptor left (and nothing in the empty root)
        "socket": "EMFILE",
        "fork": "EAGAIN",
        "root": "EMFILE",
        "kill_init": "ESRCH",  # alone in its PID namespace
    }


def test_seccomp_refuses_and_kills(tmp_path: Path) -> None:
    sandbox = make_sandbox(tmp_path)
    report, status = _in_worker(
        sandbox,
        lambda: {
            "socket": _errno_of(socket.socket),
            "fork": _errno_of(_fork_and_leave),
            "kill": _errno_of(lambda: os.kill(1, signal.SIGKILL)),
        },
    )
    assert (report, status) == ({"socket": "EPERM", "fork": "EPERM", "kill": "EPERM"}, 0)
    report, status = _in_worker(sandbox, lambda: {"uname": list(os.uname())})
    assert report is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_memory_limit_stops_a_large_allocation(tmp_path: Path) -> None:
    sandbox = make_sandbox(tmp_path, memory_limit="16MiB")

    def allocate() -> Report:
        try:
            blob = bytearray(64 * 1024 * 1024)
        except MemoryError:
            return {"allocated": False}
        return {"allocated": len(blob) > 0}

    assert _in_worker(sandbox, allocate) == ({"allocated": False}, 0)


def test_deadline_ends_a_pid_namespace_init(tmp_path: Path) -> None:
    """SIGALRM's default action is ignored by a PID namespace's init: the
    deadline must still end the worker."""
    sandbox = make_sandbox(tmp_path)

    def wait_past_deadline() -> Report:
        select.select([], [], [], 5)
        return {"survived": True}

    started = time.monotonic()
    report, status = _in_worker(sandbox, wait_past_deadline, prelude=lambda: arm_deadline(1))
    assert report is None
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_DEADLINE
    assert time.monotonic() - started < 3


def test_strict_mode_names_a_layer_that_cannot_apply(tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("not empty")
    for mode, expected_problems in (("strict", 1), ("best-effort", 0)):
        config = checked(
            IsolationConfig, {"chroot": occupied, "uid_range": TEST_UIDS, "mode": mode}, "isolation"
        )
        sandbox, statuses = Sandbox.prepare(config, TEST_UIDS[0])
        chroot = next(s for s in statuses if s.name == "chroot")
        assert not chroot.applied
        assert "not empty" in chroot.detail
        assert Layer.CHROOT not in sandbox.layers
        problems = sandbox.problems(statuses)
        assert len(problems) == expected_problems
        if problems:
            assert problems[0].startswith("isolation.layers.chroot: cannot be applied")


def test_best_effort_as_an_ordinary_user(tmp_path: Path) -> None:
    """Without root: a user namespace still gives namespaces, chroot, hardening, seccomp."""
    import pyseccomp  # type: ignore[import-untyped]  # noqa: F401  (imported while root can)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            # As any process an ordinary user starts (a UID change clears it).
            prctl(PR_SET_DUMPABLE, 1)
            config = IsolationConfig(mode="best-effort")  # type: ignore[arg-type]
            _, statuses = Sandbox.prepare(config, TEST_UIDS[0])
            answer = {s.name: [s.applied, s.detail] for s in statuses}
            os.write(write_end, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        statuses = json.loads(reader.read())
    os.waitpid(pid, 0)
    applied = {name for name, (ok, _) in statuses.items() if ok}
    assert applied == {"namespaces", "chroot", "hardening", "memory_limit", "seccomp"}
    assert statuses["identity"] == [False, "needs root"]
    assert statuses["pid_namespace"] == [False, "needs root"]


def test_openssl_reseeds_in_every_pid1_worker(cert_dir: Path, tmp_path: Path) -> None:
    """All workers are PID 1: their ServerHello randoms must still all differ.

    The parent does a handshake first, so its DRBG is seeded before the
    forks (the state every worker inherits).
    """
    store = load_certificates(
        checked(
            TLSConfig,
            {"certificates": [{"cert": cert_dir / "cert.pem", "key": cert_dir / "key.pem"}]},
            "tls",
        )
    )
    sandbox = make_sandbox(tmp_path, layers={"seccomp": False})

    # Made before the fork: the CA file is out of reach in the chroot.
    client_context = ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))

    def handshake() -> Report:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        pump = TLSPump(store.default)
        while not pump.handshake_done:
            with contextlib.suppress(ssl.SSLWantReadError):
                client.do_handshake()
            pump.receive_ciphertext(outgoing.read())
            incoming.write(pump.take_ciphertext())
        random = pump.connection.server_random()
        assert random is not None
        return {"random": random.hex()}

    randoms = [handshake()["random"]]
    for _ in range(20):
        report, status = _in_worker(sandbox, handshake)
        assert status == 0 and report is not None
        randoms.append(report["random"])
    assert len(set(randoms)) == len(randoms)


@pytest.mark.parametrize("layer", ["namespaces", "identity", "hardening"])
def test_each_layer_can_be_switched_off(tmp_path: Path, layer: str) -> None:
    sandbox = make_sandbox(tmp_path, layers={layer: False})
    assert Layer(layer) not in sandbox.layers
    assert len(sandbox.layers) == len(Layer) - 1
