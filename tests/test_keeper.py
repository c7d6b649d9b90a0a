"""The keeper, as a unit (the e2e tests drive it through the real proxy)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from starttls_proxy.privileged import helper_start
from starttls_proxy.privileged.helper_start import HELPER_MISSING, HelperStartError, describe_helper
from starttls_proxy.privileged.keeper import Keeper, _reap, checked_configuration
from starttls_proxy.tls.description import Tag, records
from starttls_proxy.wire import KEEPER_TO_MAIN, MAX_MESSAGE, Configuration, Reload, ReloadFailed

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
        assert keeper.on_child_exit(pid=123_456, code=0, uid=0)


def _settings(cert_dir: Path, tmp_path: Path, **isolation: object) -> dict[str, Any]:
    return checked_configuration(
        json.dumps(
            {
                "tls": {
                    "certificates": [
                        {"cert": str(cert_dir / "cert.pem"), "key": str(cert_dir / "key.pem")},
                        {"cert": str(tmp_path / "gone.pem"), "key": str(cert_dir / "key.pem")},
                    ]
                },
                "isolation": {"chroot": str(tmp_path / "empty"), **isolation},
            }
        ).encode()
    )


def test_the_helper_is_described_with_what_the_keeper_prepared(
    cert_dir: Path, tmp_path: Path
) -> None:
    settings = _settings(cert_dir, tmp_path, uid_range=[300_000, 10])
    del settings["tls"]["certificates"][1]
    found = dict(records(describe_helper(settings, ["reference"])))
    # The last UID of the range is the key server's.
    assert found[Tag.UID_RANGE] == struct.pack("!II", 300_000, 9)
    assert found[Tag.KEY] == b"reference"
    assert Tag.SECCOMP in found or Tag.SECCOMP_MISSING in found
    if os.geteuid() == 0:
        assert Tag.CHROOT_MISSING not in found
        assert (tmp_path / "empty").stat().st_mode & 0o777 == 0o555


def test_certificate_problems_stop_the_helper_before_it_starts(
    cert_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(HelperStartError) as refused:
        describe_helper(_settings(cert_dir, tmp_path, key_server=False), None)
    assert refused.value.problems == [
        f"tls.certificates[1].cert: file not found: {tmp_path / 'gone.pem'}"
    ]


def test_a_helper_that_is_not_built_is_named(
    cert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helper_start, "HELPER", tmp_path / "stp-helper")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    configuration = json.dumps({"tls": TLS, "isolation": {"key_server": False}}).encode()
    with ours, theirs, pytest.raises(HelperStartError) as refused:
        Keeper(ours, configuration).start_helper()
    assert refused.value.problems == [HELPER_MISSING]


def test_the_keeper_answers_an_unusable_reload_and_ignores_garbage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What the main process sends is checked at the boundary: garbage is
    refused without a traceback, a reload the settings do not allow is
    answered ``ReloadFailed`` naming the problem."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        keeper = Keeper(ours, Configuration(TLS, {}).encode())
        keeper.on_request(b"[1]")
        keeper.on_request(Configuration(TLS, {}).encode())
        keeper.on_request(Reload(Configuration(TLS, {"uid_range": [0, 10]})).encode())
        assert KEEPER_TO_MAIN.decode(theirs.recv(MAX_MESSAGE)) == ReloadFailed(
            ("isolation.uid_range.0: Input should be greater than or equal to 1",)
        )
    err = capsys.readouterr().err
    assert "keeper: unusable message from the main process: not a JSON object" in err
    assert "keeper: unexpected Configuration message" in err


@pytest.mark.parametrize(
    ("setting", "value"), [("uid_range", [300_000, 1000]), ("key_server", False)]
)
def test_a_reload_keeps_the_uids_in_service(setting: str, value: object) -> None:
    """Workers of the helper in service hold UIDs of its range, which the
    UID map shared by every helper covers, and the key server's is the
    range's last, which helpers hand out only without one: a new range, or
    the key server turned on or off, waits for a restart."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        keeper = Keeper(ours, Configuration(TLS, {}).encode())
        keeper.on_request(Reload(Configuration(TLS, {setting: value})).encode())
        assert KEEPER_TO_MAIN.decode(theirs.recv(MAX_MESSAGE)) == ReloadFailed(
            (f"isolation.{setting} changes only at a restart",)
        )
        keeper.close()


def test_an_orphan_worker_reaped_by_the_keeper_frees_its_uid() -> None:
    """A worker whose helper is gone becomes the keeper's child: the keeper
    gives its UID back in the map the helpers share; a retired helper's own
    exit gives nothing back."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        keeper = Keeper(ours, Configuration(TLS, {"uid_range": [300_000, 100]}).encode())
        for offset in (5, 6):
            os.pwrite(keeper.uid_map.fileno(), b"\x01", offset)
        keeper.retired.add(4242)
        assert keeper.on_child_exit(pid=4242, code=0, uid=300_006)
        assert keeper.on_child_exit(pid=123_456, code=-9, uid=300_005)
        assert os.pread(keeper.uid_map.fileno(), 2, 5) == b"\x00\x01"
        keeper.close()


def test_reaping_names_how_each_child_ended_and_the_uid_it_ran_as() -> None:
    """Checked in a process of its own, which nothing of pytest's is a child of."""
    results, reported = os.pipe()
    tester = os.fork()
    if tester == 0:  # pragma: no cover (the tester)
        try:
            for uid, killed in ((300_010, False), (300_011, True)):
                child = os.fork()
                if child == 0:
                    os.setresuid(uid, uid, uid)
                    if killed:
                        os.kill(os.getpid(), signal.SIGKILL)
                    os._exit(3)
                os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped
            os.write(reported, json.dumps(sorted(exit[1:] for exit in _reap())).encode())
        finally:
            os._exit(0)
    os.close(reported)
    os.waitpid(tester, 0)
    with os.fdopen(results, "rb") as answer:
        assert json.loads(answer.read()) == [[-signal.SIGKILL, 300_011], [3, 300_010]]
