"""The load generator: persistent worker processes, each with its own uvloop event loop.

One TLS 1.3 client handshake costs a Python client 0.7 to 1 ms of CPU, about as much
as the fastest targets spend per session, so a single generator process would
measure itself.  The workers are spawned once per run, pinned to the generator's CPUs,
and take jobs over a pipe; every job result carries the worker's own CPU time, so the
report can show how busy the generator was.  Idle sessions stay open in their worker
between jobs (the event loop is not running then, and idle sessions need nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import ssl
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import uvloop

from bench.clients import (
    BULK_TIMEOUT,
    DIALOGUES,
    SESSION_ERRORS,
    SESSION_TIMEOUT,
    Session,
    client_context,
    close_session,
    exchange,
    imap_fetch,
    make_message,
    open_session,
    smtp_send,
    timed_session,
)
from tests.realservers.daemons import Stoppable

#: Seconds a worker may take to start, and to finish a job beyond its own bound.
WORKER_START_TIMEOUT = 30.0
JOB_GRACE = 30.0
#: Pause after a failed session, so that a refusing target does not make a lane spin.
ERROR_PAUSE = 0.05
#: A lane opening idle sessions gives up after this many failures in a row (a target
#: out of descriptors or memory would otherwise cost a session timeout per session).
MAX_CONSECUTIVE_FAILURES = 5
#: Beyond this many sessions per lane, a job's time bound stops growing.
MAX_SESSIONS_PER_LANE = 50


@dataclass(frozen=True)
class Endpoint:
    """Where a target listens, and whether its sessions upgrade with STARTTLS."""

    host: str
    port: int
    protocol: str
    starttls: bool


@dataclass(frozen=True)
class RateJob:
    """Sessions back to back on ``lanes`` concurrent lanes for ``duration`` seconds."""

    endpoint: Endpoint
    lanes: int
    duration: float
    max_sessions: int


@dataclass(frozen=True)
class OpenIdle:
    """Open ``count`` more sessions (upgraded, one command done) and keep them."""

    endpoint: Endpoint
    count: int
    lanes: int


@dataclass(frozen=True)
class CloseIdle:
    """Send NOOP on every held session, expect the reply, then QUIT and close.

    Sessions older than ``max_age`` seconds are closed without the check: the backend
    may have ended them on purpose (see ``workloads.PRE_LOGIN_LIMIT``).
    """

    protocol: str
    lanes: int
    max_age: float


@dataclass(frozen=True)
class BulkJob:
    """One bulk transfer: ``smtp`` sends a message of ``size`` bytes, ``imap`` fetches one."""

    endpoint: Endpoint
    size: int


Job = RateJob | OpenIdle | CloseIdle | BulkJob


@dataclass
class JobResult:
    """What one worker did for one job (times from the system-wide monotonic clock)."""

    started: float = 0.0
    ended: float = 0.0
    #: CPU seconds (user + system) the worker spent on the job.
    cpu: float = 0.0
    #: Seconds per completed session (rate), or per transfer (bulk).
    latencies: list[float] = field(default_factory=list)
    greeting_latencies: list[float] = field(default_factory=list)
    #: Error description -> count.
    errors: Counter[str] = field(default_factory=Counter)
    #: Sessions held open after the job (idle jobs).
    held: int = 0
    #: Bytes moved (bulk).
    transferred: int = 0
    #: Held sessions closed without a check because they were too old.
    unchecked: int = 0


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal non-negative shares, larger ones first."""
    if parts <= 0:
        raise ValueError("at least one part")
    share, rest = divmod(total, parts)
    return [share + (1 if index < rest else 0) for index in range(parts)]


def _describe(error: BaseException) -> str:
    text = str(error).strip() or "(no message)"
    return f"{type(error).__name__}: {text[:100]}"


class _Worker:
    """The state of one worker process: its loop, TLS context and held sessions."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.context = client_context(None)
        self.held: list[Session] = []
        self.messages: dict[int, bytes] = {}

    def _context_for(self, endpoint: Endpoint) -> ssl.SSLContext | None:
        return self.context if endpoint.starttls else None

    async def _lanes(self, lanes: int, lane: Callable[[], Awaitable[None]]) -> None:
        await asyncio.gather(*(lane() for _ in range(lanes)))

    async def rate(self, job: RateJob, result: JobResult) -> None:
        endpoint = job.endpoint
        context = self._context_for(endpoint)
        deadline = time.monotonic() + job.duration
        budget = [job.max_sessions]

        async def lane() -> None:
            while time.monotonic() < deadline and budget[0] > 0:
                budget[0] -= 1
                try:
                    latency, greeting = await asyncio.wait_for(
                        timed_session(endpoint.host, endpoint.port, endpoint.protocol, context),
                        SESSION_TIMEOUT,
                    )
                except SESSION_ERRORS as e:
                    result.errors[_describe(e)] += 1
                    await asyncio.sleep(ERROR_PAUSE)
                    continue
                result.latencies.append(latency)
                result.greeting_latencies.append(greeting)

        await self._lanes(job.lanes, lane)

    async def open_idle(self, job: OpenIdle, result: JobResult) -> None:
        endpoint = job.endpoint
        context = self._context_for(endpoint)
        remaining = [job.count]

        async def lane() -> None:
            failures = 0
            while remaining[0] > 0 and failures < MAX_CONSECUTIVE_FAILURES:
                remaining[0] -= 1
                try:
                    session = await asyncio.wait_for(
                        open_session(endpoint.host, endpoint.port, endpoint.protocol, context),
                        SESSION_TIMEOUT,
                    )
                except SESSION_ERRORS as e:
                    result.errors[_describe(e)] += 1
                    failures += 1
                    await asyncio.sleep(ERROR_PAUSE)
                    continue
                failures = 0
                self.held.append(session)
                result.greeting_latencies.append(session.greeting_latency)

        await self._lanes(job.lanes, lane)

    async def close_idle(self, job: CloseIdle, result: JobResult) -> None:
        # Oldest first, and judged at the moment of the check: checking thousands of
        # sessions takes a while, and a session may pass max_age meanwhile.
        sessions, self.held = deque(self.held), []
        dialogue = DIALOGUES[job.protocol]

        async def lane() -> None:
            while sessions:
                session = sessions.popleft()
                if time.monotonic() - session.started > job.max_age:
                    result.unchecked += 1
                    session.writer.transport.abort()
                    continue
                try:
                    await asyncio.wait_for(
                        exchange(session.reader, session.writer, dialogue.noop), SESSION_TIMEOUT
                    )
                    await asyncio.wait_for(close_session(session, job.protocol), SESSION_TIMEOUT)
                except SESSION_ERRORS as e:
                    result.errors[_describe(e)] += 1
                    session.writer.transport.abort()

        await self._lanes(job.lanes, lane)

    def bulk(self, job: BulkJob, result: JobResult) -> None:
        endpoint = job.endpoint
        context = self._context_for(endpoint)
        try:
            if endpoint.protocol == "smtp":
                if job.size not in self.messages:
                    self.messages = {job.size: make_message(job.size)}
                seconds = smtp_send(endpoint.host, endpoint.port, context, self.messages[job.size])
                result.transferred = job.size
            else:
                seconds, result.transferred = imap_fetch(endpoint.host, endpoint.port, context)
        except SESSION_ERRORS as e:
            result.errors[_describe(e)] += 1
            return
        result.latencies.append(seconds)

    def run(self, job: Job) -> JobResult:
        result = JobResult(started=time.monotonic())
        cpu = time.process_time()
        if isinstance(job, RateJob):
            self.loop.run_until_complete(self.rate(job, result))
        elif isinstance(job, OpenIdle):
            self.loop.run_until_complete(self.open_idle(job, result))
        elif isinstance(job, CloseIdle):
            self.loop.run_until_complete(self.close_idle(job, result))
        else:
            self.bulk(job, result)
        result.ended = time.monotonic()
        result.cpu = time.process_time() - cpu
        result.held = len(self.held)
        return result


def _worker_main(conn: Connection, cpus: frozenset[int]) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    worker = _Worker()
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            break
        conn.send(worker.run(job))


def job_bound(job: Job) -> float:
    """How long a worker may take for ``job`` before the generator gives up on it."""
    if isinstance(job, RateJob):
        return job.duration + SESSION_TIMEOUT + JOB_GRACE
    if isinstance(job, BulkJob):
        return BULK_TIMEOUT + JOB_GRACE
    # Lanes work through their shares one session at a time.  The bound only matters
    # when a target hangs: then every session of a lane may take SESSION_TIMEOUT
    # (IDLE_CHUNK keeps the shares small), a failing lane stops after a few.
    count = job.count if isinstance(job, OpenIdle) else 20_000
    sessions_per_lane = min(count / max(1, job.lanes), MAX_SESSIONS_PER_LANE)
    return SESSION_TIMEOUT * (sessions_per_lane + MAX_CONSECUTIVE_FAILURES) + JOB_GRACE


class LoadGenerator(Stoppable):
    """``processes`` worker processes pinned to ``cpus`` (all CPUs when empty)."""

    def __init__(self, processes: int, cpus: frozenset[int]) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.cpus = cpus
        self.workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        try:
            for _ in range(processes):
                ours, theirs = spawn.Pipe()
                process = spawn.Process(target=_worker_main, args=(theirs, cpus), daemon=True)
                process.start()
                theirs.close()
                self.workers.append((process, ours))
            for _, conn in self.workers:
                if not conn.poll(WORKER_START_TIMEOUT) or conn.recv() != "ready":
                    raise RuntimeError("a load generator process did not start")
        except BaseException:
            self.stop()
            raise

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self.workers if process.pid is not None]

    def run(self, jobs: Sequence[Job | None]) -> list[JobResult]:
        """Give job ``i`` to worker ``i`` (``None``: worker ``i`` sits out); wait for all."""
        if len(jobs) > self.size:
            raise ValueError(f"{len(jobs)} jobs for {self.size} workers")
        busy = [(conn, job) for (_, conn), job in zip(self.workers, jobs, strict=False) if job]
        for conn, job in busy:
            conn.send(job)
        results = []
        for conn, job in busy:
            if not conn.poll(job_bound(job)):
                raise TimeoutError(f"a load generator process did not finish {job!r}")
            results.append(conn.recv())
        return results

    def stop(self) -> None:
        for _, conn in self.workers:
            with contextlib.suppress(OSError):
                conn.send(None)
        for process, conn in self.workers:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            conn.close()
        self.workers = []
