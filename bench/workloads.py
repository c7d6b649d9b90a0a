"""The four workloads, measured on one target and protocol at a time.

1. **Session rate**: sessions back to back (connect, greeting, EHLO / CAPABILITY /
   CAPA, STARTTLS, a full TLS 1.3 handshake, the same command inside TLS, QUIT /
   LOGOUT) on 1, 16 and 64 concurrent lanes: sessions/s, p50 and p99 latency, the
   greeting's p50 (stunnel's 200 ms wait shows there).
2. **Bulk**: one 100 MB message through SMTP DATA, one 100 MB IMAP FETCH: MB/s
   (10^6 bytes) from the first byte to the final reply, the targets taking turns.
3. **Idle capacity**: N upgraded sessions held open (not logged in), memory measured
   at each step: USS, PSS and page tables per session of the terminator's processes
   and of the backend behind it, the busiest process's own USS/PSS and its share per
   session, descriptors.  Then, all closed, the **opening** the issue times:
   :attr:`Plan.opening_sessions` idle sessions opened :data:`OPENING_LANES` at a time
   (all generator processes together), from the first connect() to the last session
   upgraded, each checked with a NOOP before it is closed.
4. **CPU per session**: user + system seconds of all the target's processes during
   the rate windows, divided by the sessions completed (reaped children included);
   starttls-proxy's split among its processes (:data:`bench.targets.PROXY_ROLES`).

Server CPU is reported as a share of the server CPUs and generator CPU as a share of
the generator CPUs: a row whose server share is well below 100 % while the generator
is near 100 % was limited by the generator (the report marks it ``≥``).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.clients import preflight
from bench.loadgen import (
    BulkJob,
    CloseIdle,
    Endpoint,
    JobResult,
    LoadGenerator,
    OpenIdle,
    RateJob,
    split,
)
from bench.procfs import (
    EMPTY_MEMORY,
    MachineCPU,
    Memory,
    cpu_seconds,
    cpu_seconds_by_role,
    machine_cpu,
    meminfo,
    session_holder_pids,
    total_memory,
    tree,
    tree_cpu_seconds,
    tree_memory,
)
from bench.results import BULK, IDLE, IDLE_CURVE, RATE, ROUND_MB_PER_S, SATURATION, Record
from bench.stats import TIMES, percentile
from bench.targets import PLAINTEXT, PROXY, PROXY_OWN_ONLY, PROXY_ROLES, Run, Target

#: Concurrency of the saturation probe (four times the highest of the rate workload).
SATURATION_LANES = 256
#: Concurrent lanes per generator process while opening idle sessions.
IDLE_LANES = 32
#: Concurrent sessions, all generator processes together, of the timed opening
#: (issue 13: "opening 1,000 idle IMAP sessions 16 at a time").
OPENING_LANES = 16
#: How long to wait for the processes of the sessions just closed to exit (the
#: proxy's workers) before the next measure.
EXIT_WAIT = 60.0
EXIT_STABLE = 3.0
#: Seconds after connect() at which the backends end a session that has not logged in:
#: Dovecot's login processes after 180 s whatever the client sends, Postfix's smtpd
#: after ``smtpd_timeout`` (300 s) of silence.  Held sessions older than this (less a
#: margin) are not checked: their end is the backend's doing, whoever terminates TLS.
PRE_LOGIN_LIMIT = {"imap": 180.0, "pop3": 180.0, "smtp": 300.0}
PRE_LOGIN_MARGIN = 10.0
#: Opening stops this long before the first session reaches the pre-login limit:
#: time to sample the memory of every process while all sessions are still alive.
MEASURING_TIME = 20.0
#: Sessions opened between two looks at the machine's free memory (the first chunk
#: is smaller: it measures what a session costs).
IDLE_CHUNK = 500
FIRST_IDLE_CHUNK = 100
#: Memory the idle workload leaves to the rest of the machine: the larger of these.
MIN_MEMORY_RESERVE = 4 * 1024**3
MEMORY_RESERVE_SHARE = 0.25
#: Maildir file name of the bulk IMAP message (Dovecot reads its size from S=).
BULK_MAILDIR_NAME = "1000000000.M1P1.bench,S={size}:2,S"


@dataclass(frozen=True)
class Plan:
    """How long and how hard each workload runs."""

    quick: bool
    concurrencies: tuple[int, ...]
    rate_duration: float
    warmup: float
    max_sessions_per_point: int
    bulk_size: int
    bulk_repeats: int
    idle_levels: tuple[int, ...]
    settle: float
    #: Sessions of the timed opening (:data:`OPENING_LANES` at a time).
    opening_sessions: int


FULL = Plan(
    quick=False,
    concurrencies=(1, 16, 64),
    rate_duration=5.0,
    warmup=1.0,
    max_sessions_per_point=50_000,
    bulk_size=100_000_000,
    bulk_repeats=5,
    idle_levels=(1000, 2500, 5000, 10_000),
    settle=1.0,
    opening_sessions=1000,
)
QUICK = Plan(
    quick=True,
    concurrencies=(1, 16, 64),
    rate_duration=0.5,
    warmup=0.2,
    max_sessions_per_point=5000,
    bulk_size=10_000_000,
    bulk_repeats=1,
    idle_levels=(100, 300),
    settle=0.3,
    opening_sessions=200,
)


@dataclass
class Bench:
    """What the workloads need: the started targets, the generator, the plan."""

    run: Run
    generator: LoadGenerator
    plan: Plan
    server_cpus: int
    generator_cpus: int
    all_cpus: int
    say: Callable[[str], None]


def _errors_note(errors: Counter[str]) -> str:
    if not errors:
        return ""
    shown = "; ".join(f"{count}{TIMES} {text}" for text, count in errors.most_common(3))
    return f"errors: {shown}"


def _merge(results: Sequence[JobResult]) -> JobResult:
    merged = JobResult(started=min(r.started for r in results), ended=max(r.ended for r in results))
    for result in results:
        merged.cpu += result.cpu
        merged.latencies += result.latencies
        merged.greeting_latencies += result.greeting_latencies
        merged.errors.update(result.errors)
        merged.held += result.held
        merged.transferred += result.transferred
        merged.unchecked += result.unchecked
    return merged


@dataclass(frozen=True)
class CPUUsed:
    """CPU seconds used by a target's terminator and by the backend behind it."""

    terminator: float
    backend: float
    #: The terminator's seconds by role, adding up to ``terminator`` (starttls-proxy
    #: only: :data:`bench.targets.PROXY_ROLES`; empty for the others).
    roles: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: CPUUsed) -> CPUUsed:
        roles = {
            role: self.roles.get(role, 0.0) + other.roles.get(role, 0.0)
            for role in self.roles.keys() | other.roles.keys()
        }
        return CPUUsed(self.terminator + other.terminator, self.backend + other.backend, roles)

    def role_values(self, unit: str, scale: float) -> dict[str, float]:
        """``{"<role>_<unit>": seconds * scale}`` (e.g. ``main_cpu_ms``)."""
        return {f"{role}_{unit}": seconds * scale for role, seconds in self.roles.items()}


class _CPU:
    """CPU seconds of a target's terminator and backend, and of the machine, since construction."""

    def __init__(self, bench: Bench, target: Target, protocol: str) -> None:
        self.terminator = bench.run.terminator_roots(target, protocol)
        self.backend = bench.run.backend_roots_behind(target, protocol)
        self.split = target.name == PROXY
        self.start = self._sample()
        self.machine = machine_cpu()
        self.started = time.monotonic()

    def _sample(self) -> CPUUsed:
        # One snapshot of the terminator's processes: the roles add up to the total.
        stats = tree(self.terminator)
        roles = cpu_seconds_by_role(stats, PROXY_ROLES, PROXY_OWN_ONLY) if self.split else {}
        return CPUUsed(cpu_seconds(stats), tree_cpu_seconds(self.backend), roles)

    def used(self) -> CPUUsed:
        now, start = self._sample(), self.start
        return CPUUsed(
            now.terminator - start.terminator,
            now.backend - start.backend,
            {role: seconds - start.roles.get(role, 0.0) for role, seconds in now.roles.items()},
        )

    def machine_used(self) -> tuple[MachineCPU, float]:
        """Machine CPU seconds used since construction, and the seconds elapsed."""
        return machine_cpu() - self.machine, time.monotonic() - self.started


def check(bench: Bench, target: Target, protocol: str) -> str | None:
    """One fully verified session; ``None`` if it worked, else why not."""
    endpoint = target.endpoints[protocol]
    ca = bench.run.certs.ca if endpoint.starttls else None
    try:
        preflight(endpoint.host, endpoint.port, protocol, ca)
    except Exception as error:  # every failure is a finding to report, not a crash
        return f"not measured (preflight session failed: {type(error).__name__}: {error})"
    return None


def _rate_jobs(bench: Bench, endpoint: Endpoint, lanes: int, duration: float) -> list[RateJob]:
    shares = [s for s in split(lanes, min(lanes, bench.generator.size)) if s]
    budgets = split(bench.plan.max_sessions_per_point, len(shares))
    return [RateJob(endpoint, s, duration, b) for s, b in zip(shares, budgets, strict=True)]


def measure_rate(bench: Bench, target: Target, protocol: str) -> list[Record]:
    return [
        measure_rate_point(bench, target, protocol, lanes) for lanes in bench.plan.concurrencies
    ]


def measure_rate_point(
    bench: Bench, target: Target, protocol: str, lanes: int, workload: str = RATE
) -> Record:
    """Sessions back to back on ``lanes`` lanes (after a warm-up), see the module docstring."""
    endpoint = target.endpoints[protocol]
    bench.generator.run(_rate_jobs(bench, endpoint, lanes, bench.plan.warmup))
    cpu = _CPU(bench, target, protocol)
    result = _merge(
        bench.generator.run(_rate_jobs(bench, endpoint, lanes, bench.plan.rate_duration))
    )
    used = cpu.used()
    terminator_cpu, backend_cpu = used.terminator, used.backend
    machine, elapsed = cpu.machine_used()
    window = result.ended - result.started
    accounted = terminator_cpu + backend_cpu + result.cpu + machine.kernel_threads
    sessions = len(result.latencies)
    record = Record(workload, bench.run.key_type, protocol, target.name, lanes)
    record.note = _errors_note(result.errors)
    if sessions:
        record.values = {
            "sessions": sessions,
            "errors": sum(result.errors.values()),
            "sessions_per_s": sessions / window,
            "p50_ms": 1000 * percentile(result.latencies, 0.5),
            "p99_ms": 1000 * percentile(result.latencies, 0.99),
            "greeting_p50_ms": 1000 * percentile(result.greeting_latencies, 0.5),
            "cpu_ms": 1000 * terminator_cpu / sessions,
            "backend_cpu_ms": 1000 * backend_cpu / sessions,
            "generator_cpu_ms": 1000 * result.cpu / sessions,
            "server_busy": (terminator_cpu + backend_cpu) / window / bench.server_cpus,
            "generator_busy": result.cpu / window / bench.generator_cpus,
            # kernel threads that exit meanwhile take their time with them
            "kernel_cpu_ms": 1000 * max(0.0, machine.kernel_threads) / sessions,
            "other_busy": max(0.0, machine.busy - accounted) / elapsed / bench.all_cpus,
            "steal": machine.steal / elapsed / bench.all_cpus,
            **used.role_values("cpu_ms", 1000 / sessions),
        }
    bench.say(
        f"  {workload} {protocol} {target.name} c={lanes}: {sessions} sessions, "
        f"{record.get('sessions_per_s') or 0:.0f}/s {record.note}"
    )
    return record


def saturation_probe(bench: Bench, rates: Sequence[Record]) -> Record | None:
    """Run the fastest TLS target at :data:`SATURATION_LANES` lanes: can the generator fill it?

    The fastest is the target (the plaintext floor aside) with the highest rate measured
    for this key type; ``None`` when there is none.
    """
    candidates = [
        r
        for r in rates
        if r.key_type == bench.run.key_type
        and r.target != PLAINTEXT
        and "sessions_per_s" in r.values
    ]
    if not candidates:
        return None
    fastest = max(candidates, key=lambda r: r.values["sessions_per_s"])
    target = bench.run.targets[fastest.target]
    return measure_rate_point(bench, target, fastest.protocol, SATURATION_LANES, SATURATION)


def place_imap_message(mailbox: Path, message: bytes) -> None:
    """Put ``message`` into the Maildir ``mailbox`` (``HOME/Maildir``) as its only message.

    Everything created gets the owner of the mail root above ``HOME`` (the mail user).
    """
    home = mailbox.parent
    owner = home.parent.stat()
    for directory in (home, mailbox, *(mailbox / sub for sub in ("cur", "new", "tmp"))):
        directory.mkdir(exist_ok=True)
        os.chown(directory, owner.st_uid, owner.st_gid)
    for old in (mailbox / "cur").iterdir():
        old.unlink()
    path = mailbox / "cur" / BULK_MAILDIR_NAME.format(size=len(message))
    path.write_bytes(message)
    os.chown(path, owner.st_uid, owner.st_gid)


@dataclass
class _Transfers:
    """One target's bulk transfers: seconds per round (``None`` where it failed)."""

    target: Target
    seconds: list[float | None] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu: CPUUsed = field(default_factory=lambda: CPUUsed(0.0, 0.0))
    generator_cpu: float = 0.0


def measure_bulk(bench: Bench, targets: Sequence[Target], protocol: str) -> list[Record]:
    """:attr:`Plan.bulk_repeats` rounds of one transfer per target, the targets'
    order turned by one each round, after one untimed transfer.

    Over a run the backend, the page cache and the machine's neighbours drift by
    more than the terminators differ, and a delivery written back to disk slows
    the transfer after it. Interleaving spreads both over every target; the
    figures of each round (``mb_per_s_<round>``) let a verdict compare two targets
    round by round (:func:`bench.verdicts.bulk_verdict`).
    """
    transfers = [_Transfers(target) for target in targets]
    # Untimed: the first transfer of a run reads the IMAP message from disk and
    # starts Postfix's delivery agents, whichever target makes it.
    _transfer(bench, _Transfers(targets[0]), protocol)
    for round_ in range(bench.plan.bulk_repeats):
        turned = transfers[round_ % len(transfers) :] + transfers[: round_ % len(transfers)]
        for measured in turned:
            measured.seconds.append(_transfer(bench, measured, protocol))
    return [_bulk_record(bench, measured, protocol) for measured in transfers]


def _transfer(bench: Bench, measured: _Transfers, protocol: str) -> float | None:
    """One transfer, its CPU (the SMTP delivery included) added to ``measured``."""
    cpu = _CPU(bench, measured.target, protocol)
    (result,) = bench.generator.run(
        [BulkJob(measured.target.endpoints[protocol], bench.plan.bulk_size)]
    )
    measured.errors.update(result.errors)
    measured.generator_cpu += result.cpu
    seconds = result.latencies[0] if result.latencies else None
    if seconds is not None and result.transferred != bench.plan.bulk_size:
        measured.errors[f"moved {result.transferred} bytes, not {bench.plan.bulk_size}"] += 1
        seconds = None
    if protocol == "smtp" and bench.run.postfix is not None and seconds is not None:
        bench.run.postfix.wait_for_delivery(1, timeout=120)
        bench.run.postfix.clear_mailbox()
    measured.cpu += cpu.used()
    return seconds


def _bulk_record(bench: Bench, measured: _Transfers, protocol: str) -> Record:
    size = bench.plan.bulk_size
    record = Record(BULK, bench.run.key_type, protocol, measured.target.name, size)
    record.note = _errors_note(measured.errors)
    done = [seconds for seconds in measured.seconds if seconds is not None]
    if done:
        middle = percentile(done, 0.5)
        per_transfer = 1 / len(done)
        record.values = {
            "mb_per_s": size / middle / 1e6,
            "seconds": middle,
            "cpu_s": measured.cpu.terminator * per_transfer,
            "backend_cpu_s": measured.cpu.backend * per_transfer,
            "generator_cpu_s": measured.generator_cpu * per_transfer,
            **measured.cpu.role_values("cpu_s", per_transfer),
            **{
                f"{ROUND_MB_PER_S}{round_}": size / seconds / 1e6
                for round_, seconds in enumerate(measured.seconds, 1)
                if seconds is not None
            },
        }
    bench.say(
        f"  bulk {protocol} {measured.target.name}: "
        f"{record.get('mb_per_s') or 0:.0f} MB/s {record.note}"
    )
    return record


def _memory(
    bench: Bench, target: Target, protocol: str
) -> tuple[dict[int, Memory], dict[int, Memory]]:
    return (
        tree_memory(bench.run.terminator_roots(target, protocol)),
        tree_memory(bench.run.backend_roots_behind(target, protocol)),
    )


def _curve(
    bench: Bench, target: Target, protocol: str, held: int
) -> tuple[Record, dict[int, Memory], dict[int, Memory]]:
    terminator, backend = _memory(bench, target, protocol)
    total = total_memory(terminator)
    values: dict[str, float] = {
        "uss": total.uss,
        "pss": total.pss,
        "pte": total.pte,
        "backend_uss": total_memory(backend).uss,
        "fds": total.fds,
        "processes": total.processes,
    }
    record = Record(IDLE_CURVE, bench.run.key_type, protocol, target.name, held, values)
    return record, terminator, backend


def _fits(per_session: float, more: int) -> bool:
    """Whether ``more`` sessions of ``per_session`` bytes leave the reserve to the machine."""
    reserve = max(MIN_MEMORY_RESERVE, MEMORY_RESERVE_SHARE * meminfo("MemTotal"))
    return meminfo("MemAvailable") - per_session * more > reserve


def _memory_left(start_available: int, held: int, more: int) -> bool:
    """Whether ``more`` sessions fit while leaving the reserve to the rest of the machine.

    Each session is assumed to cost what the sessions held so far cost on average (the
    drop of MemAvailable since the workload began); the first chunk is small.
    """
    per_session = max(0, start_available - meminfo("MemAvailable")) / held if held else 0
    return _fits(per_session, more)


def _wait_for_exits(roots: list[int], processes: int) -> None:
    """Wait until the tree has no more than ``processes`` again, or stopped shrinking.

    The proxy's workers exit after their sessions close; the next measure must not
    count their exits (CPU) or their memory.  Gives up after :data:`EXIT_WAIT`, or
    when the count has not changed for :data:`EXIT_STABLE` seconds (a spare more or
    less than before).
    """
    deadline = time.monotonic() + EXIT_WAIT
    count, changed = len(tree(roots)), time.monotonic()
    while count > processes and time.monotonic() - changed < EXIT_STABLE:
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
        now = len(tree(roots))
        if now != count:
            count, changed = now, time.monotonic()


def lanes_and_counts(sessions: int, lanes: int, workers: int) -> list[tuple[int, int]]:
    """(lanes, sessions) per generator process: ``lanes`` in all, the sessions in proportion.

    Every process then works through its share at the same pace: all ``lanes`` stay
    busy until near the end.
    """
    shares = [share for share in split(lanes, min(lanes, workers)) if share]
    counts = [sessions * share // lanes for share in shares]
    for index in range(sessions - sum(counts)):  # fewer than len(shares)
        counts[index] += 1
    return list(zip(shares, counts, strict=True))


def measure_opening(
    bench: Bench, target: Target, protocol: str, per_session: float
) -> tuple[dict[str, float], str]:
    """Open :attr:`Plan.opening_sessions` idle sessions :data:`OPENING_LANES` at a time.

    Returns the ``opening_*`` values and a note (why it was not measured, or its
    errors).  ``per_session``: bytes of memory a session was seen to cost (the
    opening is skipped if that many sessions would eat into the memory reserve).
    Every session is checked (NOOP) and closed afterwards.
    """
    count = bench.plan.opening_sessions
    if not _fits(per_session, count):
        return {}, f"opening of {count:,} not measured: it would eat into the memory reserve"
    endpoint = target.endpoints[protocol]
    roots = bench.run.terminator_roots(target, protocol)
    processes = len(tree(roots))
    cpu = _CPU(bench, target, protocol)
    jobs = [
        OpenIdle(endpoint, sessions, lanes)
        for lanes, sessions in lanes_and_counts(count, OPENING_LANES, bench.generator.size)
    ]
    step = _merge(bench.generator.run(jobs))
    used = cpu.used()
    seconds = step.ended - step.started
    opened = len(step.greeting_latencies)
    max_age = PRE_LOGIN_LIMIT[protocol] - PRE_LOGIN_MARGIN
    workers = bench.generator.size
    closing = _merge(bench.generator.run([CloseIdle(protocol, IDLE_LANES, max_age)] * workers))
    _wait_for_exits(roots, processes)
    errors = step.errors + closing.errors
    values = {
        "opening_sessions": count,
        "opening_lanes": OPENING_LANES,
        "opening_held": opened,
        "opening_errors": sum(errors.values()),
        "opening_unchecked": closing.unchecked,
        "opening_seconds": seconds,
        "opening_cpu_ms": 1000 * used.terminator / opened if opened else 0.0,
        "opening_generator_busy": step.cpu / seconds / bench.generator_cpus if seconds else 0.0,
    }
    note = _errors_note(errors)
    bench.say(
        f"  opening {protocol} {target.name}: {opened} of {count} opened "
        f"{OPENING_LANES} at a time in {seconds:.1f} s {note}"
    )
    return values, f"opening: {note}" if note else ""


def measure_idle(bench: Bench, target: Target, protocol: str) -> list[Record]:
    """Open sessions step by step up to the last level, measure memory at each, then close.

    Sessions are opened in chunks, and no chunk is opened that would leave the machine
    less than the memory reserve (the proxy's workers cost megabytes each).
    """
    endpoint = target.endpoints[protocol]
    workers = bench.generator.size
    time.sleep(bench.plan.settle)
    point, base_terminator, base_backend = _curve(bench, target, protocol, 0)
    curve = [point]
    terminator, backend = base_terminator, base_backend
    errors: Counter[str] = Counter()
    held = 0
    opening = 0.0
    stopped = ""
    start_available = meminfo("MemAvailable")
    cpu = _CPU(bench, target, protocol)
    max_age = PRE_LOGIN_LIMIT[protocol] - PRE_LOGIN_MARGIN
    # A session the backend has dropped still looks held to the client, but its
    # memory is gone: every session measured must be younger than the limit.
    opening_deadline = time.monotonic() + max_age - MEASURING_TIME
    for level in bench.plan.idle_levels:
        while held < level and not stopped:
            chunk = min(IDLE_CHUNK if held else FIRST_IDLE_CHUNK, level - held)
            if not _memory_left(start_available, held, chunk):
                stopped = f"stopped at {held} sessions to keep the memory reserve"
                break
            if time.monotonic() > opening_deadline:
                stopped = (
                    f"stopped at {held} sessions: the first would soon reach the backend's "
                    f"{PRE_LOGIN_LIMIT[protocol]:.0f} s pre-login limit"
                )
                break
            counts = split(chunk, workers)
            jobs = [OpenIdle(endpoint, count, IDLE_LANES) if count else None for count in counts]
            step = _merge(bench.generator.run(jobs))
            errors.update(step.errors)
            opening += step.ended - step.started
            held += len(step.greeting_latencies)
            if step.errors and not step.greeting_latencies:
                stopped = f"stopped at {held} sessions: no new session succeeded"
        time.sleep(bench.plan.settle)
        point, terminator, backend = _curve(bench, target, protocol, held)
        curve.append(point)
        bench.say(f"  idle {protocol} {target.name}: {held} held {_errors_note(errors)} {stopped}")
        if stopped:
            break
    open_cpu = cpu.used()
    # What the machine gave up for the sessions held (kernel memory included): the
    # estimate the timed opening below is allowed against.
    cost = max(0, start_available - meminfo("MemAvailable")) / held if held else 0.0
    closing = _merge(bench.generator.run([CloseIdle(protocol, IDLE_LANES, max_age)] * workers))
    record = Record(IDLE, bench.run.key_type, protocol, target.name, bench.plan.idle_levels[-1])
    notes = [stopped, _errors_note(errors + closing.errors)]
    if held:
        extra = total_memory(terminator) - total_memory(base_terminator)
        extra_backend = total_memory(backend) - total_memory(base_backend)
        mains = session_holder_pids(base_terminator, terminator, target.instances)
        main_uss = sum(terminator[pid].uss for pid in mains)
        main_pss = sum(terminator[pid].pss for pid in mains)
        main_before = sum(base_terminator.get(pid, EMPTY_MEMORY).uss for pid in mains)
        record.values = {
            "held": held,
            "open_errors": sum(errors.values()),
            "close_errors": sum(closing.errors.values()),
            "unchecked": closing.unchecked,
            "uss_per_session": extra.uss / held,
            "pss_per_session": extra.pss / held,
            "pte_per_session": extra.pte / held,
            "main_uss_per_session": (main_uss - main_before) / held,
            "backend_uss_per_session": extra_backend.uss / held,
            "backend_pss_per_session": extra_backend.pss / held,
            "main_uss": main_uss,
            "main_pss": main_pss,
            "instances": target.instances,
            "fds": total_memory(terminator).fds,
            "processes": len(terminator),
            "opened_per_s": held / opening if opening else 0.0,
            "open_cpu_ms": 1000 * open_cpu.terminator / held,
            "open_backend_cpu_ms": 1000 * open_cpu.backend / held,
        }
        _wait_for_exits(bench.run.terminator_roots(target, protocol), len(base_terminator))
        time.sleep(bench.plan.settle)
        opening_values, opening_note = measure_opening(bench, target, protocol, cost)
        record.values |= opening_values
        notes.append(opening_note)
    record.note = "; ".join(n for n in notes if n)
    time.sleep(bench.plan.settle)
    return [*curve, record]
