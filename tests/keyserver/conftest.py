"""A real key server process (as the keeper starts it), its keys, and a helper's link.

The key server confines itself for real (namespaces, chroot, another UID,
seccomp): root only. A missing privilege is a failure, not a skip.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from starttls_proxy.keys.server import Link
from starttls_proxy.privileged.keeper import KeyServerProcess, open_key_files
from starttls_proxy.settings import IsolationConfig, checked, encode
from starttls_proxy.wire import KeyServerCounts, TLSRole

#: Far from the proxy's default range (and from tests/isolation's workers).
TEST_UIDS = (310_000, 1_000)


@dataclass(frozen=True)
class Keys:
    """Key files of an ECDSA P-256 and an RSA-2048 certificate, in that order."""

    paths: tuple[Path, Path]


@dataclass
class RunningKeyServer:
    process: KeyServerProcess
    #: The helper's end of a link to the keys of ``Keys``.
    link: Link
    references: list[str]
    counts: list[KeyServerCounts] = field(default_factory=list)

    def total(self, result: str) -> int:
        """How many requests ended with ``result`` so far, as reported."""
        self.process.read_counts()
        return sum(getattr(message.counts, result) for message in self.counts)

    def connect(self, certificates: list[int], role: TLSRole = TLSRole.ACCEPT) -> socket.socket:
        """A connection of a worker of ``role``, good for ``certificates``."""
        return socket.socket(fileno=self.link.connection_for(certificates, role))


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the key server tests confine a real key server: run as root", pytrace=False)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    ca = trustme.CA()
    directory = tmp_path_factory.mktemp("keyserver-keys")
    paths = []
    for name, key_type in (("ec", trustme.KeyType.ECDSA), ("rsa", trustme.KeyType.RSA)):
        leaf = ca.issue_cert(f"{name}.example.test", key_type=key_type)
        path = directory / f"{name}.pem"
        leaf.private_key_pem.write_to_path(str(path))
        paths.append(path)
    return Keys((paths[0], paths[1]))


def isolation(directory: Path) -> IsolationConfig:
    return checked(
        IsolationConfig,
        {"chroot": directory / "empty", "uid_range": TEST_UIDS, "key_server": True},
        "isolation",
    )


@pytest.fixture(scope="module")
def key_server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the module's key server has its chroot (``empty`` below)."""
    return tmp_path_factory.mktemp("keyserver")


@pytest.fixture(scope="module")
def key_server(key_server_root: Path, keys: Keys) -> Iterator[RunningKeyServer]:
    counts: list[KeyServerCounts] = []
    process = KeyServerProcess(encode(isolation(key_server_root)), counts.append)
    files = open_key_files({"tls": {"certificates": [{"key": str(p)} for p in keys.paths]}})
    try:
        references, link = process.load(files)
    finally:
        for fd in files:
            os.close(fd)
    yield RunningKeyServer(process, Link(link), references, counts)
    link.close()
    process.stop()
