"""The driver (``session.Session`` and its endpoints) with fake transports
and a fake helper handle: what it does between a real protocol machine (SMTP
here) and the transports, without a network, a backend or a TLS worker."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from protocols import smtp
from protocols._base import LocalProtocolError, Side
from starttls_proxy.config import ListenerConfig
from starttls_proxy.proxy import endpoints
from starttls_proxy.proxy.endpoints import ChannelEndpoint, Endpoint
from starttls_proxy.proxy.session import HOLD_LIMIT, Deadline, Phase, Session
from starttls_proxy.wire import MAX_REPORT_SIZE, REPORT_HEADER
from tests.driver_fakes import PEER, FakeHelper, FakeListener, FakeTransport, fake_backend

GREETING = b"220 proxy.test ESMTP starttls-proxy\r\n"
REPORT = (
    b'{"ok": true, "version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",'
    b' "server_name": "mail.example.test", "alpn": null}'
)


def listener_config(**changes: Any) -> ListenerConfig:
    fields: dict[str, Any] = {
        "name": "smtp-test",
        "protocol": "smtp",
        "listen": "127.0.0.1:2525",
        "hostname": "proxy.test",
        "backend": {"address": "127.0.0.1:25"},
    }
    return ListenerConfig.model_validate({**fields, **changes})


def open_session(listener: FakeListener, sock: socket.socket | None = None) -> Session:
    """What ``admission.ClientEndpoint`` does with an accepted connection."""
    endpoint = Endpoint(None, Side.CLIENT)
    endpoint.connection_made(FakeTransport(sock))
    session = Session(listener, endpoint, PEER)
    endpoint.session = session
    return session


def client(session: Session) -> tuple[Endpoint, FakeTransport]:
    endpoint = session.client
    assert endpoint is not None
    assert isinstance(endpoint.transport, FakeTransport)
    return endpoint, endpoint.transport


async def until(condition: Callable[[], bool], limit: float = 2.0) -> None:
    """Let the loop run until ``condition`` holds (at most ``limit`` seconds)."""
    async with asyncio.timeout(limit):
        while not condition():
            await asyncio.sleep(0.001)


#: The linger of a closing client side, shortened for the tests.
LINGER = 0.02


def run(
    monkeypatch: pytest.MonkeyPatch,
    test: Callable[[list[FakeTransport]], Awaitable[None]],
    greeting: tuple[bytes, ...] = (b"220 backend ESMTP\r\n",),
) -> None:
    """Run ``test`` in a fresh loop whose backend connections are fakes
    (their transports go to the list ``test`` gets)."""

    async def main() -> None:
        connect, backends = fake_backend(list(greeting))
        monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", connect)
        await test(backends)
        # A closed session's client side lingers for its peer's end: let
        # those waits run out before the loop goes.
        await asyncio.sleep(2 * LINGER)

    monkeypatch.setattr(endpoints, "LINGER_TIMEOUT", LINGER)
    asyncio.run(main())


@pytest.fixture
def helper() -> Iterator[FakeHelper]:
    fake = FakeHelper()
    yield fake
    fake.close_all()


def relaying(session: Session) -> None:
    """Take a plaintext session (``require_tls: false``) to the relay."""
    endpoint, _ = client(session)
    endpoint.data_received(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")


async def relayed() -> tuple[Session, Endpoint]:
    """A new plaintext session taken to the relay, once its backend is
    connected: the session and its backend side."""
    session = open_session(FakeListener(listener_config(require_tls=False)))
    relaying(session)
    await until(lambda: session.backend is not None)
    assert session.backend is not None
    return session, session.backend


# ----------------------------------------------------------------------
# 1. Held backend bytes.


def test_backend_bytes_before_backend_connected_are_held_then_delivered_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen_at_connect: list[bytes | None] = []

    async def test(backends: list[FakeTransport]) -> None:
        session = open_session(FakeListener(listener_config(require_tls=False)))
        real = session.machine.backend_connected

        def backend_connected() -> None:
            assert session.backend is not None
            held = session.backend.held
            seen_at_connect.append(None if held is None else bytes(held))
            real()

        monkeypatch.setattr(session.machine, "backend_connected", backend_connected)
        relaying(session)
        assert session.phase is Phase.PLAINTEXT_RELAY
        await until(lambda: session.backend is not None)
        # The greeting came in two reads before the machine knew of the
        # backend: both were held, in order, none reached the machine early.
        assert seen_at_connect == [b"220 backend ESMTP\r\n"]
        assert session.backend is not None and session.backend.held is None
        # Released after backend_connected: the machine took the greeting
        # (it replays the client's EHLO only after one) and nothing else.
        assert backends[0].written == b"EHLO c.test\r\n"
        assert session.bytes_from_backend == len(b"220 backend ESMTP\r\n")
        # Then the relay goes on: the EHLO reply is swallowed, MAIL goes.
        session.backend.data_received(b"250 backend\r\n")
        assert backends[0].written == b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n"
        session.backend.data_received(b"250 2.1.0 Ok\r\n")
        assert client(session)[1].written.endswith(b"250 2.1.0 Ok\r\n")
        session.close("test over")

    run(monkeypatch, test, greeting=(b"220 back", b"end ESMTP\r\n"))
    assert seen_at_connect == [b"220 backend ESMTP\r\n"]


# ----------------------------------------------------------------------
# 2. The worker's channel before its report.


async def upgraded(listener: FakeListener, sock: socket.socket) -> Session:
    """A session whose client said STARTTLS; its hand-off has begun."""
    session = open_session(listener, sock)
    endpoint, _ = client(session)
    endpoint.data_received(b"EHLO c.test\r\nSTARTTLS\r\n")
    # A ClientHello read before the hand-off travels with the spawn request.
    endpoint.data_received(b"\x16\x03\x01")
    assert session.phase is Phase.HANDSHAKE
    return session


def pending_channel(session: Session) -> ChannelEndpoint | None:
    channel = session._pending_channel
    assert channel is None or isinstance(channel, ChannelEndpoint)
    return channel


async def handed_off(session: Session) -> ChannelEndpoint:
    """The worker's channel of an upgraded ``session``, once it has one."""
    await until(lambda: pending_channel(session) is not None)
    channel = pending_channel(session)
    assert channel is not None
    return channel


async def assert_closed(worker: socket.socket) -> None:
    """The worker's end of a channel reads the end the session sent."""
    worker.setblocking(False)
    async with asyncio.timeout(2):
        assert await asyncio.get_running_loop().sock_recv(worker, 100) == b""


def test_the_channel_is_not_the_client_until_its_report_and_closes_with_the_session(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    async def test(backends: list[FakeTransport]) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            session = await upgraded(FakeListener(listener_config(), helper), ours)
            assert session.client is None  # nobody's during the hand-off
            await handed_off(session)
            assert session.client is None
            assert session.phase is Phase.HANDSHAKE
            [request] = helper.requests
            assert request.early == b"\x16\x03\x01"
            assert request.handshake_timeout == 30.0
            session.close("test over")
            await assert_closed(helper.workers[0])
            assert backends == []

    run(monkeypatch, test)


def test_a_session_closed_during_the_spawn_closes_the_channel_it_gets(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    async def test(backends: list[FakeTransport]) -> None:
        helper.gate = asyncio.Event()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            session = await upgraded(FakeListener(listener_config(), helper), ours)
            await until(lambda: helper.clients_seen == 1)
            session.close("client gone")
            helper.gate.set()
            await until(lambda: len(helper.workers) == 1)
            await assert_closed(helper.workers[0])
            assert pending_channel(session) is None

    run(monkeypatch, test)


# ----------------------------------------------------------------------
# 3. Back-pressure.


def test_client_reading_pauses_at_the_hold_limit_and_resumes_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test(backends: list[FakeTransport]) -> None:
        session, backend = await relayed()
        endpoint, transport = client(session)
        backend.data_received(b"250 backend\r\n")
        backend.data_received(b"250 2.1.0 Ok\r\n")
        endpoint.data_received(b"RCPT TO:<x@y.test>\r\n")
        backend.data_received(b"250 2.1.5 Ok\r\n")
        # The body waits for the backend's 354: below the limit, reading goes on.
        endpoint.data_received(b"DATA\r\n" + b"x" * (HOLD_LIMIT // 2))
        assert transport.reading
        endpoint.data_received(b"x" * (HOLD_LIMIT // 2))
        assert session.machine.unprocessed_client_bytes >= HOLD_LIMIT
        assert not transport.reading
        assert transport.events[-1] == ("pause_reading",)
        backend.data_received(b"354 go ahead\r\n")
        assert session.machine.unprocessed_client_bytes == 0
        assert transport.reading
        assert backends[0].written.endswith(b"x" * HOLD_LIMIT)
        session.close("test over")

    run(monkeypatch, test)


def test_client_reading_pauses_while_the_backend_cannot_take_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test(backends: list[FakeTransport]) -> None:
        session, backend = await relayed()
        _, transport = client(session)
        backend.pause_writing()
        assert not transport.reading
        assert backends[0].reading  # only the other side stops
        backend.resume_writing()
        assert transport.reading
        # And the other way round.
        client(session)[0].pause_writing()
        assert not backends[0].reading and transport.reading
        client(session)[0].resume_writing()
        assert backends[0].reading
        pauses = [event for event in transport.events if event[0] != "write"]
        assert pauses == [("pause_reading",), ("resume_reading",)]
        session.close("test over")

    run(monkeypatch, test)


# ----------------------------------------------------------------------
# 4. The worker's report.

FRAME = REPORT_HEADER.pack(len(REPORT)) + REPORT


def test_a_report_split_across_reads_is_one_report_then_client_bytes_in_order(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    async def test(backends: list[FakeTransport]) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            session = await upgraded(FakeListener(listener_config(), helper), ours)
            channel = await handed_off(session)
            before_tls = session.bytes_from_client
            reports: list[object] = []
            real = session.tls_report

            def tls_report(outcome: Any, endpoint: ChannelEndpoint) -> None:
                reports.append(outcome)
                real(outcome, endpoint)

            monkeypatch.setattr(session, "tls_report", tls_report)
            # The header itself split, then the JSON, then its last byte
            # with the client's first command behind it in the same read.
            for piece in (FRAME[:2], FRAME[2:9], FRAME[9:-1]):
                channel.data_received(piece)
                assert reports == [] and session.phase is Phase.HANDSHAKE
            channel.data_received(FRAME[-1:] + b"EHLO c.test\r\nNOOP\r\n")
            assert len(reports) == 1
            assert session.client is channel and session.phase is Phase.TLS
            assert session.tls is not None and session.tls.version == "TLSv1.3"
            assert session.bytes_from_client - before_tls == len(b"EHLO c.test\r\nNOOP\r\n")
            await until(lambda: bool(backends) and bool(backends[0].written))
            # The machine got them, in order, and relays them so.
            assert backends[0].written == b"EHLO c.test\r\nNOOP\r\n"
            backend = session.backend
            assert backend is not None
            backend.data_received(b"250 backend.test\r\n250 2.0.0 Ok\r\n")
            worker = helper.workers[0]
            worker.setblocking(False)
            replies = b""
            async with asyncio.timeout(2):
                while not replies.endswith(b"250 2.0.0 Ok\r\n"):
                    replies += await loop.sock_recv(worker, 4096)
            # The report never reaches the client; the replies do, in order.
            assert replies.startswith(b"250")
            session.close("test over")

    run(monkeypatch, test)


def test_the_end_of_a_tls_session_lingers_on_the_worker_channel(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    """Once the report makes the channel the client side, closing the session
    sends the worker an end and waits for its own, as for any client, so the
    worker can still flush the last reply and its close_notify."""

    async def test(backends: list[FakeTransport]) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            session = await upgraded(FakeListener(listener_config(), helper), ours)
            channel = await handed_off(session)
            assert channel.transport is not None
            channel.data_received(FRAME)
            assert session.client is channel
            session.close("client quit", clean=True)
            assert not channel.transport.is_closing()

    run(monkeypatch, test)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (
            REPORT_HEADER.pack(MAX_REPORT_SIZE + 1),
            "malformed report from the TLS worker",
        ),
        (
            REPORT_HEADER.pack(5) + b"nope!",
            "malformed report from the TLS worker: not JSON",
        ),
        (
            REPORT_HEADER.pack(len(REPORT.replace(b"TLSv1.3", b"SSLv3")))
            + REPORT.replace(b"TLSv1.3", b"SSLv3"),
            "malformed report from the TLS worker: version 'SSLv3'",
        ),
    ],
    ids=["oversized", "not-json", "bad-version"],
)
def test_an_oversized_or_malformed_report_closes_the_session(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper, frame: bytes, reason: str
) -> None:
    async def test(backends: list[FakeTransport]) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            session = await upgraded(FakeListener(listener_config(), helper), ours)
            channel = await handed_off(session)
            channel.data_received(frame + b"EHLO c.test\r\n")
            assert session.closed
            assert session.outcome.startswith(reason)
            assert session.tls is None and session.client is None
            assert session.bytes_from_client == len(b"EHLO c.test\r\nSTARTTLS\r\n")
            await assert_closed(helper.workers[0])
            assert backends == []

    run(monkeypatch, test)


# ----------------------------------------------------------------------
# 5. Deadlines.

TIMEOUT_REPLY = b"421 4.4.2 proxy.test Error: timeout exceeded\r\n"


def test_a_partial_command_is_cut_at_the_command_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = listener_config(timeouts={"command": 0.05, "pre_tls": 60})

    async def test(backends: list[FakeTransport]) -> None:
        loop = asyncio.get_running_loop()
        session = open_session(FakeListener(config))
        endpoint, transport = client(session)
        endpoint.data_received(b"EHLO c.test\r\n")
        started = loop.time()
        endpoint.data_received(b"MAIL FR")
        await until(lambda: session.closed)
        assert loop.time() - started >= 0.05
        assert session.outcome == Deadline.COMMAND.reason(config)
        assert transport.written.endswith(TIMEOUT_REPLY)

    run(monkeypatch, test)


def test_the_pre_tls_phase_is_cut_at_its_timeout_however_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = listener_config(timeouts={"command": 60, "pre_tls": 0.05})

    async def test(backends: list[FakeTransport]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        session = open_session(FakeListener(config))
        endpoint, transport = client(session)
        while not session.closed:  # whole commands, one after the other
            endpoint.data_received(b"NOOP\r\n")
            await asyncio.sleep(0.01)
        assert loop.time() - started >= 0.05
        assert session.outcome == Deadline.PRE_TLS.reason(config)
        assert transport.written.endswith(TIMEOUT_REPLY)
        assert transport.written.count(b"250 2.0.0 Ok\r\n") >= 1

    run(monkeypatch, test)


# ----------------------------------------------------------------------
# 6. Reload.


def test_sessions_of_a_reloaded_listener_go_on_with_their_configuration(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    async def test(backends: list[FakeTransport]) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            old = FakeListener(listener_config(), helper)
            before = open_session(old, ours)
            # What server._apply does: a new runtime, the same session table.
            new_config = listener_config(hostname="new.test", timeouts={"handshake": 5})
            new = FakeListener(new_config, helper, sessions=old.sessions)
            after = open_session(new)
            assert len(new.sessions) == 2
            assert client(after)[1].written.startswith(b"220 new.test ")
            endpoint, transport = client(before)
            endpoint.data_received(b"EHLO c.test\r\n")
            assert b"250-proxy.test\r\n" in transport.written
            endpoint.data_received(b"STARTTLS\r\n")
            channel = await handed_off(before)
            assert helper.requests[0].handshake_timeout == 30.0
            channel.data_received(FRAME)
            assert before.phase is Phase.TLS
            before.close("test over")
            assert list(new.sessions) == [after]
            after.close("test over")
            assert len(old.sessions) == 0

    run(monkeypatch, test)


def test_a_failure_report_or_a_worker_gone_without_one_closes_the_session(
    monkeypatch: pytest.MonkeyPatch, helper: FakeHelper
) -> None:
    failure = b'{"ok": false, "reason": "no shared cipher"}'

    async def test(backends: list[FakeTransport]) -> None:
        sockets = [*socket.socketpair(), *socket.socketpair()]
        try:
            reported = await upgraded(FakeListener(listener_config(), helper), sockets[0])
            channel = await handed_off(reported)
            gone = await upgraded(FakeListener(listener_config(), helper), sockets[2])
            await handed_off(gone)
            channel.data_received(REPORT_HEADER.pack(len(failure)) + failure)
            assert reported.outcome == "TLS handshake failed: no shared cipher"
            helper.workers[1].close()  # the worker of ``gone`` ends, reporting nothing
            await until(lambda: gone.closed)
            assert gone.outcome == "the TLS worker ended without a handshake report"
        finally:
            for sock in sockets:
                sock.close()

    run(monkeypatch, test)


# ----------------------------------------------------------------------
# 6. Errors.

UNAVAILABLE = b"421 4.3.0 proxy.test Service not available\r\n"


def test_a_local_protocol_error_is_logged_as_an_internal_error_and_ends_the_session(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A machine that refuses an input of the driver's (here its table lacks
    the step a connected backend takes) is the proxy's bug: an error with
    its traceback in the log, the protocol's last words to the client."""

    async def test(backends: list[FakeTransport]) -> None:
        session = open_session(FakeListener(listener_config(require_tls=False)))
        step = (smtp.State.BACKEND_CONNECTING, smtp.Input.BACKEND_CONNECTED)
        table = {key: to for key, to in smtp.TRANSITIONS.items() if key != step}
        monkeypatch.setattr(session.machine, "transitions", table)
        relaying(session)
        await until(lambda: session.closed)
        message = "BACKEND_CONNECTED is not allowed in state BACKEND_CONNECTING"
        assert session.outcome == f"internal error: {message}"
        assert client(session)[1].written.endswith(UNAVAILABLE)
        assert backends[0].closing

    with caplog.at_level(logging.ERROR, logger="starttls_proxy.session"):
        run(monkeypatch, test)
    (record,) = caplog.records
    assert "internal error in the protocol machine" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is LocalProtocolError


def test_a_remote_protocol_error_ends_the_session_without_an_error_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(backends: list[FakeTransport]) -> None:
        session = open_session(FakeListener(listener_config(require_tls=False)))
        relaying(session)
        await until(lambda: session.backend is not None)
        assert session.backend is not None
        session.backend.data_received(b"hello?\r\n")
        assert session.closed
        assert session.outcome == "malformed reply from backend: b'hello?\\r\\n'"
        assert client(session)[1].written.endswith(UNAVAILABLE)

    with caplog.at_level(logging.ERROR, logger="starttls_proxy.session"):
        run(monkeypatch, test)
    assert caplog.records == []
