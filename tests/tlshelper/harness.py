"""The real TLS helper (``stp-helper``), started as the keeper starts it and
driven as the main process drives it, without the rest of the proxy.

``running_helper`` execs the built helper with a description made by the
keeper's own code; ``RunningHelper.spawn`` hands it a real loopback TCP
connection and a plaintext channel exactly as ``handoff.TLSHelper.spawn``
does, and returns the client's end with the worker's PID (``spawn_on``: a
connection the test made, e.g. one whose other end is a TLS server for a
worker that connects). The helper does
not say which worker took a connection (the main process has no use for
it): the test finds the child holding the channel's end. Root only: the
helper enters namespaces, chroots and other UIDs for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from starttls_proxy.keys import provider
from starttls_proxy.keys.server import encode_reference, read_private_key
from starttls_proxy.privileged import helper_start
from starttls_proxy.privileged.uid_map import UIDMap
from starttls_proxy.settings import IsolationConfig, TLSConfig, checked, encode
from starttls_proxy.wire import HELPER_TO_MAIN, HelperToKeeper, Ready, SpawnRequest, TLSRole
from tests.peer_certs import Authority

#: Far from the proxy's default range and from the other test suites'.
TEST_UIDS = (320_000, 1_000)
REPORT_HEADER = struct.Struct("!I")


@dataclass
class Connection:
    """One connection handed to a worker."""

    #: The test's end of the TCP connection (plain: the test wraps it): the
    #: client's, or the remote server's for a worker that connects.
    client: socket.socket
    #: The main process's end of the worker's plaintext channel.
    channel: socket.socket
    pid: int

    def report(self, timeout: float = 10.0) -> dict[str, Any]:
        """The worker's report frame (then the channel carries plaintext)."""
        self.channel.settimeout(timeout)
        header = _exactly(self.channel, REPORT_HEADER.size)
        (size,) = REPORT_HEADER.unpack(header)
        report: dict[str, Any] = json.loads(_exactly(self.channel, size))
        return report

    def close(self) -> None:
        self.client.close()
        self.channel.close()


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"{len(data)} of {size} bytes")
        data += chunk
    return data


@dataclass
class RunningHelper:
    process: subprocess.Popen[bytes]
    control: socket.socket
    #: The helper's answer: ``Ready``, or ``Problems``.
    reply: HelperToKeeper
    #: (pid, status) of every worker exit the helper reported so far.
    exits: list[tuple[int, int]] = field(default_factory=list)
    #: The workers ``worker_holding`` found so far.
    workers: set[int] = field(default_factory=set)

    @property
    def layers(self) -> dict[str, tuple[bool, str]]:
        assert isinstance(self.reply, Ready), self.reply
        return {name: (applied, detail) for name, applied, detail in self.reply.layers}

    def send_request(self, message: bytes, fds: list[int]) -> None:
        socket.send_fds(self.control, [message], fds)

    def spawn(
        self,
        server_name_hint: str | None = None,
        alpn: tuple[str, ...] = (),
        early: bytes = b"",
        handshake_timeout: float = 10.0,
        peer_trust: int = 0,
        role: TLSRole = TLSRole.ACCEPT,
        peer_name: str | None = None,
    ) -> Connection:
        """A loopback TCP connection whose server end goes to a new worker."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname(), timeout=10)
            accepted, _ = listener.accept()
        return spawn_on(
            self,
            client,
            accepted,
            server_name_hint=server_name_hint,
            alpn=alpn,
            early=early,
            handshake_timeout=handshake_timeout,
            peer_trust=peer_trust,
            role=role,
            peer_name=peer_name,
        )

    def _next_exit(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the helper's next message, kept in
        ``exits``: once ready, it has nothing to tell but worker exits."""
        self.control.settimeout(max(0.01, timeout))
        data = self.control.recv(65536)
        assert data, "the helper closed its control socket"
        exited = HELPER_TO_MAIN.decode(data)
        self.exits.append((exited.pid, exited.status))

    def exit_of(self, pid: int, timeout: float = 10.0) -> int:
        """The exit status the helper reports for worker ``pid``."""
        deadline = time.monotonic() + timeout
        while True:
            for worker, status in self.exits:
                if worker == pid:
                    return status
            self._next_exit(deadline - time.monotonic())

    def worker_holding(self, inode: int, exits_before: int, timeout: float = 10.0) -> int:
        """The worker that was handed the socket ``inode`` (its end of a
        channel) after the helper had reported ``exits_before`` exits: the
        child holding it or, once it has ended, the first worker reported
        ended since that no earlier connection had."""
        held = f"socket:[{inode}]"
        deadline = time.monotonic() + timeout
        while True:
            found = [pid for pid in self.children() if held in _descriptors(pid)]
            found += [pid for pid, _ in self.exits[exits_before:] if pid not in self.workers]
            if found:
                self.workers.add(found[0])
                return found[0]
            assert time.monotonic() < deadline, f"no worker took socket {inode}"
            with contextlib.suppress(TimeoutError):
                self._next_exit(0.01)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()]


def _descriptors(pid: int) -> set[str]:
    """What the descriptors of ``pid`` point to; nothing once it has ended."""
    directory = Path(f"/proc/{pid}/fd")
    targets = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for entry in directory.iterdir():
            with contextlib.suppress(FileNotFoundError):
                targets.add(os.readlink(entry))
    return targets


def settings_for(
    directory: Path, certificates: list[tuple[Path, Path]], **isolation: Any
) -> dict[str, Any]:
    """The keeper's validated settings: the test ranges, a chroot under ``directory``."""
    tls = checked(
        TLSConfig,
        {
            "certificates": [{"cert": c, "key": k} for c, k in certificates],
            **isolation.pop("tls", {}),
        },
        "tls",
    )
    config = checked(
        IsolationConfig,
        {
            "chroot": directory / "empty",
            "uid_range": TEST_UIDS,
            "key_server": False,
            **isolation,
        },
        "isolation",
    )
    return {"tls": encode(tls), "isolation": encode(config)}


def trust_stores(directory: Path, authorities: Sequence[Authority]) -> list[Path]:
    """``tls.peer_trust`` for a helper: a PEM file in ``directory`` per
    authority, the helper's trust stores 1, 2, ... in that order."""
    stores = []
    for index, authority in enumerate(authorities, 1):
        stores.append(directory / f"trust-{index}.pem")
        stores[-1].write_bytes(authority.pem())
    return stores


@contextlib.contextmanager
def running_helper(
    directory: Path,
    certificates: list[tuple[Path, Path]],
    *,
    user: int | None = None,
    key_references: list[str] | None = None,
    link: socket.socket | None = None,
    env: dict[str, str] | None = None,
    uid_map: UIDMap | None = None,
    **isolation: Any,
) -> Iterator[RunningHelper]:
    """The helper serving ``certificates``; it leaves when its socket closes.

    ``user``: run it as this UID instead of root (the best-effort mode).
    ``key_references`` and ``link``: sign through a key server (or what the
    test puts at the other end of ``link``); ``env`` then needs the
    provider's ``OPENSSL_CONF``. ``uid_map``: share the keeper's map of the
    range (as every helper of a keeper does).
    """
    settings = settings_for(directory, certificates, **isolation)
    process, control, reply = helper_start.launch_helper(
        helper_start.describe_helper(settings, key_references, uid_map=uid_map),
        link,
        env,
        user=user,
        uid_map=uid_map,
    )
    helper = RunningHelper(process, control, reply)
    try:
        yield helper
    finally:
        control.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def spawn_on(
    helper: RunningHelper,
    client: socket.socket,
    server_end: socket.socket,
    *,
    server_name_hint: str | None = None,
    alpn: tuple[str, ...] = (),
    early: bytes = b"",
    handshake_timeout: float = 10.0,
    peer_trust: int = 0,
    role: TLSRole = TLSRole.ACCEPT,
    peer_name: str | None = None,
) -> Connection:
    """``RunningHelper.spawn`` for a connection the test made itself (small
    socket buffers, say): ``server_end`` goes to a new worker (and is closed
    here), ``client`` stays the test's."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    request = SpawnRequest(
        handshake_timeout=handshake_timeout,
        server_name_hint=server_name_hint,
        alpn=alpn,
        early=early,
        peer_trust=peer_trust,
        role=role,
        peer_name=peer_name,
    )
    exits_before = len(helper.exits)
    with server_end, theirs:
        helper.send_request(request.encode(), [server_end.fileno(), theirs.fileno()])
        inode = os.fstat(theirs.fileno()).st_ino
    return Connection(client, ours, helper.worker_holding(inode, exits_before))


def stdlib_reason(tls: ssl.SSLObject, incoming: ssl.MemoryBIO, data: bytes) -> str:
    """OpenSSL's reason for ``data`` arriving at ``tls`` mid-handshake, as the
    standard library (the system OpenSSL, as the helper's) names it:
    "[SSL: CODE] reason (_ssl.c:N)" gives "reason"."""
    incoming.write(data)
    with pytest.raises(ssl.SSLError) as caught:
        tls.do_handshake()
    return str(caught.value).partition("] ")[2].rpartition(" (")[0]


def sanitizer_runtime() -> str | None:
    """The AddressSanitizer runtime the helper links (``scripts/test-sanitized.sh``
    builds it so), or None for the normal build."""
    linked = subprocess.run(
        ["ldd", str(helper_start.HELPER)], capture_output=True, text=True, check=True
    ).stdout
    for line in linked.splitlines():
        name, _, where = line.strip().partition(" => ")
        if name.startswith("libasan.so"):
            return where.split(" (")[0]
    return None


@contextlib.contextmanager
def helper_trusting(
    directory: Path, certificates: list[tuple[Path, Path]], authorities: Sequence[Authority]
) -> Iterator[RunningHelper]:
    """A started helper holding a peer trust store for each of ``authorities``."""
    stores = trust_stores(directory, authorities)
    with running_helper(directory, certificates, tls={"peer_trust": stores}) as running:
        assert isinstance(running.reply, Ready), running.reply
        yield running


#: Socket buffers small enough that a sender stalls soon once its peer
#: stops reading, and that what the kernel holds is little next to what is sent.
SMALL_BUFFER = 64 * 1024


def small_buffer_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback connection with SMALL_BUFFER at both ends: the test's end
    (10 s timeout) and the one to hand to a worker."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        # Set before listen(): the accepted socket inherits them.
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            listener.setsockopt(socket.SOL_SOCKET, option, SMALL_BUFFER)
        ours = socket.socket()
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            ours.setsockopt(socket.SOL_SOCKET, option, SMALL_BUFFER)
        ours.settimeout(10)
        ours.connect(listener.getsockname())
        theirs, _ = listener.accept()
    return ours, theirs


def resident_bytes(pid: int) -> int:
    """``pid``'s resident memory (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@contextlib.contextmanager
def signing_through_test(
    directory: Path, certificates: list[tuple[Path, Path]], **isolation: Any
) -> Iterator[tuple[RunningHelper, socket.socket]]:
    """A started helper whose certificates' keys are key server references:
    the test holds the link's other end (grants arrive there, and any
    signing request is the test's to answer)."""
    references = [
        encode_reference(read_private_key(key.read_bytes(), "key")).decode()
        for _, key in certificates
    ]
    env = {**os.environ, "OPENSSL_CONF": str(provider.write_openssl_config(directory))}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with (
        ours,
        theirs,
        running_helper(
            directory, certificates, key_references=references, link=theirs, env=env, **isolation
        ) as helper,
    ):
        theirs.close()  # the helper has its own
        assert isinstance(helper.reply, Ready), helper.reply
        yield helper, ours
