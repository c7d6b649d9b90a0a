"""The targets of issue 13, checked against a run's results (pure, unit-tested).

Issue 13 (the TLS helper and its workers in C, no Python per connection) sets
them, measured by this suite side by side with stunnel and nginx mail:

- an idle upgraded session costs the whole proxy at most 320 KiB USS (page tables
  reported beside it), and 10,000 idle sessions are held with no errors;
- the terminator spends at most 2.0 ms of CPU per session at c=16 and c=64, of
  which at most 1.2 ms in the TLS helper and its workers and at most 0.8 ms in the
  main process;
- p50 latency at c=1 at most 2 ms above the backend doing STARTTLS itself;
- bulk relay at least as fast as stunnel's;
- 1,000 idle sessions opened 16 at a time in at most 10 s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from bench.results import BULK, IDLE, RATE, Record, Results
from bench.stats import BUSY, MISSING, TIMES, format_number, percentile, ratio
from bench.targets import (
    BACKEND_TLS,
    HELPER_ROLE,
    KEY_SERVER_ROLE,
    MAIN_ROLE,
    NGINX,
    PROXY,
    STUNNEL,
)

ISSUE = 13
#: Concurrencies of the CPU goals.
CPU_CONCURRENCIES = (16, 64)
#: Concurrency at which added latency is judged: no queueing, only the work itself.
LATENCY_CONCURRENCY = 1
MAX_ADDED_P50_MS = 2.0
#: CPU per session: the terminator's processes, the TLS helper with its workers,
#: the main process alone.
MAX_CPU_MS = 2.0
MAX_HELPER_CPU_MS = 1.2
MAX_MAIN_CPU_MS = 0.8
MIN_BULK_VS_STUNNEL = 1.0
MAX_USS_PER_SESSION = 320 * 1024
IDLE_GOAL_SESSIONS = 10_000
OPENING_GOAL_SESSIONS = 1000
OPENING_GOAL_LANES = 16
MAX_OPENING_SECONDS = 10.0
#: A terminator process that relays holds two descriptors per session (client side and
#: backend side), plus a few of its own.
FDS_PER_SESSION_BOUND = 2.1
USS_GOAL = f"≤ {MAX_USS_PER_SESSION // 1024} KiB USS per idle upgraded session (whole proxy)"
CAPACITY_GOAL = f"{IDLE_GOAL_SESSIONS:,} idle sessions held with no errors"
OPENING_GOAL = (
    f"{OPENING_GOAL_SESSIONS:,} idle sessions opened {OPENING_GOAL_LANES} at a time "
    f"in ≤ {MAX_OPENING_SECONDS:g} s"
)
MET = "met"
MISSED = "missed"
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Verdict:
    goal: str
    key_type: str
    protocol: str
    #: The measured figure in words (with the peers' beside it where the goal names them).
    measured: str
    status: str
    #: How far from the goal: "+40 %", "0.30 ms below the limit", ...
    margin: str


def _not_measured(goal: str, key: str, protocol: str, why: str = "") -> Verdict:
    return Verdict(goal, key, protocol, MISSING, NOT_MEASURED, why)


def _numbers(values: Sequence[float | None]) -> str:
    return " / ".join(format_number(value) for value in values)


def _ceiling_verdict(
    goal: str,
    key: str,
    protocol: str,
    points: Sequence[tuple[str, float | None]],
    limit: float,
    unit: str,
    beside: str = "",
) -> Verdict:
    """Every value of ``points`` (label, value) must be at most ``limit``.

    Missed as soon as one measured value is above the limit; not measured when a value
    is missing and none is above; the margin is that of the worst value.
    """
    values = [value for _, value in points]
    measured_values = [(label, value) for label, value in points if value is not None]
    if not measured_values:
        return _not_measured(goal, key, protocol)
    measured = f"{_numbers(values)} {unit}" + (f"; {beside}" if beside else "")
    label, worst = max(measured_values, key=lambda point: point[1])
    where = f" ({label})" if len(points) > 1 else ""
    if worst > limit:
        margin = f"{worst - limit:.2f} {unit} above the limit{where}"
        return Verdict(goal, key, protocol, measured, MISSED, margin)
    if len(measured_values) < len(points):
        missing = ", ".join(label for label, value in points if value is None)
        return Verdict(goal, key, protocol, measured, NOT_MEASURED, f"no figure at {missing}")
    return Verdict(
        goal, key, protocol, measured, MET, f"{limit - worst:.2f} {unit} below the limit{where}"
    )


def _ratio_verdict(
    goal: str,
    key: str,
    protocol: str,
    ours: float | None,
    theirs: float | None,
    minimum: float,
    unit: str,
) -> Verdict:
    value = ratio(ours, theirs)
    if value is None:
        return _not_measured(goal, key, protocol)
    measured = (
        f"{format_number(value)}{TIMES} ({format_number(ours)} vs {format_number(theirs)} {unit})"
    )
    status = MET if value >= minimum else MISSED
    margin = f"{(value / minimum - 1) * 100:+.0f} % against the goal"
    return Verdict(goal, key, protocol, measured, status, margin)


def _at(values: Sequence[float | None]) -> list[tuple[str, float | None]]:
    return [(f"c={c}", value) for c, value in zip(CPU_CONCURRENCIES, values, strict=True)]


def cpu_verdicts(results: Results, key: str, protocol: str) -> list[Verdict]:
    """The three CPU goals: the terminator's total, the helper's and the main process's share."""
    cs = " and ".join(f"c={c}" for c in CPU_CONCURRENCIES)

    def values(target: str, name: str) -> list[float | None]:
        return [results.value(RATE, key, protocol, target, c, name) for c in CPU_CONCURRENCIES]

    peers = [
        f"{name} {_numbers(values(target, 'cpu_ms'))}"
        for target, name in ((STUNNEL, "stunnel"), (NGINX, "nginx mail"))
        if any(value is not None for value in values(target, "cpu_ms"))
    ]
    key_server = values(PROXY, f"{KEY_SERVER_ROLE}_cpu_ms")
    key_server_beside = (
        f"key server {_numbers(key_server)} ms beside"
        if any(value is not None for value in key_server)
        else ""
    )
    return [
        _ceiling_verdict(
            f"terminator CPU per session at {cs} ≤ {MAX_CPU_MS:g} ms",
            key,
            protocol,
            _at(values(PROXY, "cpu_ms")),
            MAX_CPU_MS,
            "ms",
            ", ".join(peers),
        ),
        _ceiling_verdict(
            f"TLS helper and workers' CPU per session at {cs} ≤ {MAX_HELPER_CPU_MS:g} ms",
            key,
            protocol,
            _at(values(PROXY, f"{HELPER_ROLE}_cpu_ms")),
            MAX_HELPER_CPU_MS,
            "ms",
            key_server_beside,
        ),
        _ceiling_verdict(
            f"main process CPU per session at {cs} ≤ {MAX_MAIN_CPU_MS:g} ms",
            key,
            protocol,
            _at(values(PROXY, f"{MAIN_ROLE}_cpu_ms")),
            MAX_MAIN_CPU_MS,
            "ms",
        ),
    ]


def latency_verdict(results: Results, key: str, protocol: str) -> Verdict:
    def p50(target: str) -> float | None:
        return results.value(RATE, key, protocol, target, LATENCY_CONCURRENCY, "p50_ms")

    goal = (
        f"p50 latency at c={LATENCY_CONCURRENCY} ≤ {MAX_ADDED_P50_MS:g} ms above "
        "the backend's own STARTTLS"
    )
    ours, theirs = p50(PROXY), p50(BACKEND_TLS)
    if ours is None or theirs is None:
        return _not_measured(goal, key, protocol)
    added = ours - theirs
    measured = f"{added:+.2f} ms ({format_number(ours)} vs {format_number(theirs)} ms)"
    status = MET if added <= MAX_ADDED_P50_MS else MISSED
    side = "below" if status == MET else "above"
    margin = f"{abs(added - MAX_ADDED_P50_MS):.2f} ms {side} the limit"
    return Verdict(goal, key, protocol, measured, status, margin)


def bulk_verdict(results: Results, key: str, protocol: str) -> Verdict:
    """Throughput against stunnel's, with what each terminator and the
    backend spent per transfer: on shared server CPUs, a backend that spends
    most of it sets the pace for every terminator.

    Where both targets ran in the same rounds (:func:`bench.workloads.measure_bulk`),
    the ratio is the median of the rounds' ratios, with their range: a pair of
    transfers a few seconds apart shares the machine's state, the medians of two
    separate series do not."""
    ours, theirs = (results.find(BULK, key, protocol, target) for target in (PROXY, STUNNEL))
    goal = f"bulk throughput ≥ {MIN_BULK_VS_STUNNEL:g}{TIMES} stunnel's"
    verdict = _ratio_verdict(
        goal,
        key,
        protocol,
        ours.get("mb_per_s") if ours else None,
        theirs.get("mb_per_s") if theirs else None,
        MIN_BULK_VS_STUNNEL,
        "MB/s",
    )
    if verdict.status == NOT_MEASURED or ours is None or theirs is None:
        return verdict
    paired = _paired_ratios(ours, theirs)
    if len(paired) > 1:
        middle = percentile(paired, 0.5)
        status = MET if middle >= MIN_BULK_VS_STUNNEL else MISSED
        verdict = dataclasses.replace(
            verdict,
            measured=f"{format_number(middle)}{TIMES} median of {len(paired)} rounds "
            f"({format_number(min(paired))}-{format_number(max(paired))}; medians "
            f"{format_number(ours.get('mb_per_s'))} vs {format_number(theirs.get('mb_per_s'))}"
            " MB/s)",
            status=status,
            margin=f"{(middle / MIN_BULK_VS_STUNNEL - 1) * 100:+.0f} % against the goal",
        )
    spent = [record.get("cpu_s") for record in (ours, theirs)]
    backend = ours.get("backend_cpu_s")
    if None in spent or backend is None:
        return verdict
    terminators = " vs ".join(format_number(value) for value in spent)
    return dataclasses.replace(
        verdict,
        measured=f"{verdict.measured}; CPU s per transfer: terminator {terminators}, "
        f"backend {format_number(backend)}",
    )


def _paired_ratios(ours: Record, theirs: Record) -> list[float]:
    """Our MB/s over theirs in every round both transfers completed."""
    mine, other = ours.rounds(), theirs.rounds()
    return [mine[round_] / other[round_] for round_ in sorted(mine.keys() & other.keys())]


def _idle_peers(results: Results, key: str, protocol: str, name: str, scale: float) -> str:
    """The peers' figure ``name`` of the idle workload, e.g. "stunnel 90.0, nginx mail 19.0"."""
    shown = []
    for target, label in ((STUNNEL, "stunnel"), (NGINX, "nginx mail")):
        value = results.value(IDLE, key, protocol, target, None, name)
        if value is not None:
            shown.append(f"{label} {format_number(value * scale)}")
    return ", ".join(shown)


def _proxy_idle(results: Results, key: str, protocol: str) -> Record | None:
    record = results.find(IDLE, key, protocol, PROXY)
    return record if record is not None and record.values else None


def idle_verdicts(results: Results, key: str, protocol: str) -> list[Verdict]:
    """Memory per idle session (page tables, the main process's share and the peers
    beside it), and the sessions held."""
    record = _proxy_idle(results, key, protocol)
    if record is None:
        return [
            _not_measured(USS_GOAL, key, protocol),
            _not_measured(CAPACITY_GOAL, key, protocol),
        ]
    return [
        _uss_verdict(results, record, key, protocol),
        _capacity_verdict(results, record, key, protocol),
    ]


def _uss_verdict(results: Results, record: Record, key: str, protocol: str) -> Verdict:
    v = record.values
    uss = v["uss_per_session"]
    details = []
    if "pte_per_session" in v:
        details.append(f"page tables {v['pte_per_session'] / 1024:.0f} KiB beside")
    if "main_uss_per_session" in v:
        details.append(f"main process {v['main_uss_per_session'] / 1024:.0f} KiB of it")
    peers = _idle_peers(results, key, protocol, "uss_per_session", 1 / 1024)
    if peers:
        details.append(f"{peers} KiB")
    measured = f"{uss / 1024:.0f} KiB" + (f" ({'; '.join(details)})" if details else "")
    status = MET if uss <= MAX_USS_PER_SESSION else MISSED
    margin = (
        f"{abs(uss - MAX_USS_PER_SESSION) / 1024:.0f} KiB "
        f"{'below' if status == MET else 'above'} the limit"
    )
    return Verdict(USS_GOAL, key, protocol, measured, status, margin)


def _capacity_verdict(results: Results, record: Record, key: str, protocol: str) -> Verdict:
    held = int(record.values["held"])
    errors = int(record.values["open_errors"] + record.values["close_errors"])
    measured = f"{held:,} held, {errors} errors"
    if (instances := int(record.values.get("instances", 1))) > 1:
        measured += f", by {instances} instances sharing the port (reuse_port)"
    if record.param < IDLE_GOAL_SESSIONS:
        why = f"this run asked for {record.param:,} sessions only"
        return Verdict(CAPACITY_GOAL, key, protocol, measured, NOT_MEASURED, why)
    if held >= IDLE_GOAL_SESSIONS and errors == 0:
        return Verdict(CAPACITY_GOAL, key, protocol, measured, MET, "")
    reasons = [f"{IDLE_GOAL_SESSIONS - held:,} short, {errors} errors"]
    reasons += [part for part in record.note.split("; ") if part.startswith("stopped")]
    limit = results.settings.get("descriptor limit")
    if isinstance(limit, int) and limit < FDS_PER_SESSION_BOUND * IDLE_GOAL_SESSIONS:
        reasons.append(f"descriptor limit per process here: {limit:,}")
    return Verdict(CAPACITY_GOAL, key, protocol, measured, MISSED, "; ".join(reasons))


def opening_verdict(results: Results, key: str, protocol: str) -> Verdict:
    """The timed opening of idle sessions (the idle workload's ``opening_*`` values)."""
    record = _proxy_idle(results, key, protocol)
    if record is None:
        return _not_measured(OPENING_GOAL, key, protocol)
    v = record.values
    if "opening_seconds" not in v:
        notes = [part for part in record.note.split("; ") if part.startswith("opening")]
        return _not_measured(OPENING_GOAL, key, protocol, "; ".join(notes))
    seconds, asked = v["opening_seconds"], int(v["opening_sessions"])
    lanes = int(v["opening_lanes"])
    opened, errors = int(v["opening_held"]), int(v["opening_errors"])
    measured = f"{format_number(seconds)} s, {opened:,} of {asked:,} opened, {errors} errors"
    peers = _idle_peers(results, key, protocol, "opening_seconds", 1.0)
    if peers:
        measured += f"; {peers} s"
    if asked < OPENING_GOAL_SESSIONS or lanes != OPENING_GOAL_LANES:
        why = f"this run opened {asked:,} sessions {lanes} at a time"
        return Verdict(OPENING_GOAL, key, protocol, measured, NOT_MEASURED, why)
    if opened < asked or errors:
        why = f"{asked - opened:,} short, {errors} errors"
        return Verdict(OPENING_GOAL, key, protocol, measured, MISSED, why)
    status = MET if seconds <= MAX_OPENING_SECONDS else MISSED
    side = "below" if status == MET else "above"
    margin = f"{abs(seconds - MAX_OPENING_SECONDS):.1f} s {side} the limit"
    generator = v.get("opening_generator_busy", 0.0)
    if generator >= BUSY:
        margin += f"; the generator was {100 * generator:.0f} % busy: the figure is an upper bound"
    return Verdict(OPENING_GOAL, key, protocol, measured, status, margin)


def all_verdicts(results: Results) -> list[Verdict]:
    """Every goal, in the issue's order: memory, CPU, latency, bulk, opening."""
    verdicts: list[Verdict] = []
    rate_protocols = results.protocols(RATE)
    for key in results.key_types():
        for protocol in results.protocols(IDLE):
            verdicts += idle_verdicts(results, key, protocol)
        cpu = [cpu_verdicts(results, key, protocol) for protocol in rate_protocols]
        for goal in range(3):  # terminator, helper, main: each goal's protocols together
            verdicts += [of_protocol[goal] for of_protocol in cpu]
        verdicts += [latency_verdict(results, key, protocol) for protocol in rate_protocols]
        verdicts += [bulk_verdict(results, key, protocol) for protocol in results.protocols(BULK)]
        verdicts += [
            opening_verdict(results, key, protocol) for protocol in results.protocols(IDLE)
        ]
    return verdicts
