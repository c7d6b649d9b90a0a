"""The sandbox tests enter namespaces, chroots and other UIDs for real: root only.

A missing privilege is a failure, not a skip (CI runs as root).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from starttls_proxy.sandbox import Sandbox
from starttls_proxy.settings import IsolationConfig, checked

#: Far from the proxy's default range, so a running proxy is never disturbed.
TEST_UIDS = (300_000, 1_000)


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the sandbox tests must run as root", pytrace=False)


def make_sandbox(directory: Path, **changes: object) -> Sandbox:
    """A prepared sandbox with an empty chroot under ``directory``."""
    config = checked(
        IsolationConfig,
        {"chroot": directory / "empty", "uid_range": TEST_UIDS, **changes},
        "isolation",
    )
    sandbox, statuses = Sandbox.prepare(config, TEST_UIDS[0] + TEST_UIDS[1] - 1)
    assert not sandbox.problems(statuses), statuses
    return sandbox
