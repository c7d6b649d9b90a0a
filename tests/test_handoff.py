"""The main process's handle on the TLS helper (``starttls_proxy.proxy.handoff``),
driven through its two sockets with the keeper and the helper played by the
test: when may a connection be handed over, and to which helper."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from starttls_proxy.proxy import metrics
from starttls_proxy.proxy.handoff import (
    CHANNEL_SEND_BUFFER,
    SEND_BUFFER_CEILING,
    HandoffError,
    TLSHelper,
    channel_buffer_shortfall,
)
from starttls_proxy.wire import (
    HelperStarted,
    HelperUnusable,
    KeyServerCounts,
    Message,
    SigningCounts,
    SpawnRequest,
    WorkerExited,
)

REQUEST = SpawnRequest(handshake_timeout=5.0, server_name_hint=None, alpn=(), early=b"")


class Helpers:
    """The keeper's end of the keeper socket, and the helpers' ends of the
    control sockets the keeper has handed over."""

    def __init__(self) -> None:
        self.keeper, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)  # as TLSHelper.start leaves it
        self.process = subprocess.Popen([sys.executable, "-c", "pass"])
        self.handle = TLSHelper(self.process, ours)
        self.controls: list[socket.socket] = []

    def new_helper(self, pid: int) -> socket.socket:
        """The keeper hands over a new helper's control socket; the helper's end."""
        helper_end, main_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socket.send_fds(self.keeper, [HelperStarted(pid, ()).encode()], [main_end.fileno()])
        main_end.close()
        self.controls.append(helper_end)
        return helper_end

    def tell(self, message: Message) -> None:
        self.keeper.send(message.encode())

    def close(self) -> None:
        self.handle.stop()
        for sock in (self.keeper, *self.controls):
            sock.close()


@pytest.fixture
def helpers() -> Iterator[Helpers]:
    made = Helpers()
    yield made
    made.close()


def _spawned_on(control: socket.socket) -> bool:
    """Whether a spawn request came on ``control`` (a closed one says no more)."""
    control.setblocking(False)
    try:
        data, fds, _, _ = socket.recv_fds(control, 1024, 2)
    except BlockingIOError:
        return False
    for fd in fds:
        socket.socket(fileno=fd).close()
    return bool(data)


def test_after_the_key_server_died_connections_wait_for_the_new_helper(
    helpers: Helpers,
) -> None:
    """The old helper's workers cannot sign any more: nothing goes to it
    once the keeper says so, and the next helper takes the connection."""

    async def scenario() -> None:
        old = helpers.new_helper(100)
        helpers.handle.attach(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        helpers.tell(HelperUnusable("the key server died"))
        await asyncio.sleep(0.05)
        client, other = socket.socketpair()
        with client, other:
            spawn = asyncio.create_task(helpers.handle.spawn(client, REQUEST, 5.0))
            await asyncio.sleep(0.2)
            assert not spawn.done()
            new = helpers.new_helper(101)
            channel = await asyncio.wait_for(spawn, 5)
            channel.close()
        assert _spawned_on(new)
        assert not _spawned_on(old)

    asyncio.run(scenario())


def test_a_channel_holds_what_a_worker_and_uvloop_move_at_once(helpers: Helpers) -> None:
    """Both ends of a new channel take the configured send buffer (doubled
    by the kernel), as far as the kernel's ceiling lets them."""
    ceiling = int(SEND_BUFFER_CEILING.read_text())

    async def scenario() -> None:
        control = helpers.new_helper(100)
        helpers.handle.attach(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        client, other = socket.socketpair()
        with client, other:
            channel = await helpers.handle.spawn(client, REQUEST, 5.0)
            _, fds, _, _ = socket.recv_fds(control, 1024, 2)
            worker_end = socket.socket(fileno=fds[1])
            socket.socket(fileno=fds[0]).close()
            with channel, worker_end:
                for end in (channel, worker_end):
                    size = end.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                    assert size == 2 * min(CHANNEL_SEND_BUFFER, ceiling)

    asyncio.run(scenario())


def test_a_kernel_ceiling_below_the_channel_buffer_is_named(tmp_path: Path) -> None:
    ceiling = tmp_path / "wmem_max"
    ceiling.write_text("212992\n")
    shortfall = channel_buffer_shortfall(ceiling)
    assert shortfall is not None
    assert "net.core.wmem_max is 212992" in shortfall
    assert f"sysctl -w net.core.wmem_max={CHANNEL_SEND_BUFFER}" in shortfall
    ceiling.write_text(f"{CHANNEL_SEND_BUFFER}\n")
    assert channel_buffer_shortfall(ceiling) is None
    assert channel_buffer_shortfall(tmp_path / "absent") is None


def test_a_helper_that_never_comes_back_is_a_handoff_error(helpers: Helpers) -> None:
    async def scenario() -> None:
        helpers.new_helper(100)
        helpers.handle.attach(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        helpers.tell(HelperUnusable("the key server died"))
        await asyncio.sleep(0.05)
        client, other = socket.socketpair()
        with client, other, pytest.raises(HandoffError, match="no TLS helper came back"):
            await helpers.handle.spawn(client, REQUEST, 0.2)

    asyncio.run(scenario())


def _requests(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "starttls_proxy_key_server_requests_total", {"result": result}
    )
    return value or 0.0


def test_unusable_messages_are_logged_and_dropped_with_their_descriptors(
    helpers: Helpers, caplog: pytest.LogCaptureFixture
) -> None:
    """The keeper's and the helper's messages are checked (``wire``) before
    anything of them is used: a malformed one is an error in the log, a
    descriptor that came with it is closed, and the next one is served."""

    async def scenario() -> None:
        control = helpers.new_helper(100)
        exits: list[tuple[int, int]] = []
        helpers.handle.on_worker_exit = lambda pid, status: exits.append((pid, status))
        helpers.handle.attach(asyncio.get_running_loop())
        stray, main_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with main_end:
            socket.send_fds(helpers.keeper, [b'{"helper": 101}'], [main_end.fileno()])
        helpers.keeper.send(b'{"exited": "1", "status": 0}')
        control.send(b"not json")
        signed = _requests("signed")
        helpers.tell(KeyServerCounts(SigningCounts(signed=3, refused=1, dropped=0)))
        helpers.tell(WorkerExited(7, 0))
        control.send(WorkerExited(8, -9).encode())
        await asyncio.sleep(0.1)
        assert sorted(exits) == [(7, 0), (8, -9)]
        assert _requests("signed") == signed + 3
        assert helpers.handle.helper_pid == 100
        with stray:
            stray.settimeout(1)
            assert stray.recv(1) == b""  # the main process kept no copy of its peer

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    errors = [record.getMessage() for record in caplog.records]
    assert any("unusable message from the keeper: HelperStarted" in e for e in errors), errors
    assert any("unusable message from the keeper: WorkerExited.exited" in e for e in errors)
    assert any("unusable message from the TLS helper: not JSON" in e for e in errors), errors
