"""The goals of issue 7, checked against a run's results (pure, unit-tested)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.results import BULK, IDLE, RATE, Results
from bench.stats import MISSING, TIMES, format_number, ratio
from bench.targets import BACKEND_TLS, NGINX, PROXY, STUNNEL

#: Concurrency of the rate goals.
GOAL_CONCURRENCY = 16
#: Concurrency at which added latency is judged: no queueing, only the work itself.
LATENCY_CONCURRENCY = 1
MAX_ADDED_P50_MS = 2.0
MIN_RATE_VS_STUNNEL = 1.0
MIN_RATE_VS_NGINX = 0.5
MIN_BULK_VS_STUNNEL = 0.7
MAX_USS_PER_SESSION = 1024 * 1024
IDLE_GOAL_SESSIONS = 10_000
#: A terminator process that relays holds two descriptors per session (client side and
#: backend side), plus a few of its own.
FDS_PER_SESSION_BOUND = 2.1
MET = "met"
MISSED = "missed"
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Verdict:
    goal: str
    key_type: str
    protocol: str
    #: The measured figure in words (e.g. a ratio with both values and their unit).
    measured: str
    status: str
    #: How far from the goal: "+40 %", "by 1.1 ms", ...
    margin: str


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
        return Verdict(goal, key, protocol, MISSING, NOT_MEASURED, "")
    measured = (
        f"{format_number(value)}{TIMES} ({format_number(ours)} vs {format_number(theirs)} {unit})"
    )
    status = MET if value >= minimum else MISSED
    margin = f"{(value / minimum - 1) * 100:+.0f} % against the goal"
    return Verdict(goal, key, protocol, measured, status, margin)


def rate_verdicts(results: Results, key: str, protocol: str) -> list[Verdict]:
    def rate(target: str) -> float | None:
        return results.value(RATE, key, protocol, target, GOAL_CONCURRENCY, "sessions_per_s")

    def p50(target: str) -> float | None:
        return results.value(RATE, key, protocol, target, LATENCY_CONCURRENCY, "p50_ms")

    verdicts = [
        _ratio_verdict(
            f"session rate at c={GOAL_CONCURRENCY} ≥ stunnel's",
            key,
            protocol,
            rate(PROXY),
            rate(STUNNEL),
            MIN_RATE_VS_STUNNEL,
            "sessions/s",
        ),
        _ratio_verdict(
            f"session rate at c={GOAL_CONCURRENCY} ≥ 0.5{TIMES} nginx mail's",
            key,
            protocol,
            rate(PROXY),
            rate(NGINX),
            MIN_RATE_VS_NGINX,
            "sessions/s",
        ),
    ]
    goal = (
        f"p50 latency at c={LATENCY_CONCURRENCY} ≤ {MAX_ADDED_P50_MS:g} ms above "
        "the backend's own STARTTLS"
    )
    ours, theirs = p50(PROXY), p50(BACKEND_TLS)
    if ours is None or theirs is None:
        verdicts.append(Verdict(goal, key, protocol, MISSING, NOT_MEASURED, ""))
    else:
        added = ours - theirs
        measured = f"{added:+.2f} ms ({format_number(ours)} vs {format_number(theirs)} ms)"
        status = MET if added <= MAX_ADDED_P50_MS else MISSED
        side = "below" if status == MET else "above"
        margin = f"{abs(added - MAX_ADDED_P50_MS):.2f} ms {side} the limit"
        verdicts.append(Verdict(goal, key, protocol, measured, status, margin))
    return verdicts


def bulk_verdict(results: Results, key: str, protocol: str) -> Verdict:
    def speed(target: str) -> float | None:
        return results.value(BULK, key, protocol, target, None, "mb_per_s")

    return _ratio_verdict(
        f"bulk throughput ≥ 0.7{TIMES} stunnel's",
        key,
        protocol,
        speed(PROXY),
        speed(STUNNEL),
        MIN_BULK_VS_STUNNEL,
        "MB/s",
    )


def idle_verdicts(results: Results, key: str, protocol: str) -> list[Verdict]:
    record = results.find(IDLE, key, protocol, PROXY)
    uss_goal = "≤ 1 MiB USS per idle upgraded session"
    capacity_goal = f"{IDLE_GOAL_SESSIONS:,} idle sessions held with no errors"
    if record is None or not record.values:
        return [
            Verdict(uss_goal, key, protocol, MISSING, NOT_MEASURED, ""),
            Verdict(capacity_goal, key, protocol, MISSING, NOT_MEASURED, ""),
        ]
    uss = record.values["uss_per_session"]
    uss_status = MET if uss <= MAX_USS_PER_SESSION else MISSED
    uss_verdict = Verdict(
        uss_goal,
        key,
        protocol,
        f"{uss / 1024:.0f} KiB",
        uss_status,
        f"{abs(uss - MAX_USS_PER_SESSION) / 1024:.0f} KiB "
        f"{'below' if uss_status == MET else 'above'} the limit",
    )
    held = int(record.values["held"])
    errors = int(record.values["open_errors"] + record.values["close_errors"])
    measured = f"{held:,} held, {errors} errors"
    if record.param < IDLE_GOAL_SESSIONS:
        status, margin = NOT_MEASURED, f"this run asked for {record.param:,} sessions only"
    elif held >= IDLE_GOAL_SESSIONS and errors == 0:
        status, margin = MET, ""
    else:
        status = MISSED
        reasons = [f"{IDLE_GOAL_SESSIONS - held:,} short, {errors} errors"]
        reasons += [part for part in record.note.split("; ") if part.startswith("stopped")]
        limit = results.settings.get("descriptor limit")
        if isinstance(limit, int) and limit < FDS_PER_SESSION_BOUND * IDLE_GOAL_SESSIONS:
            reasons.append(f"descriptor limit per process here: {limit:,}")
        margin = "; ".join(reasons)
    return [uss_verdict, Verdict(capacity_goal, key, protocol, measured, status, margin)]


def all_verdicts(results: Results) -> list[Verdict]:
    verdicts: list[Verdict] = []
    for key in results.key_types():
        for protocol in results.protocols(RATE):
            verdicts += rate_verdicts(results, key, protocol)
        for protocol in results.protocols(BULK):
            verdicts.append(bulk_verdict(results, key, protocol))
        for protocol in results.protocols(IDLE):
            verdicts += idle_verdicts(results, key, protocol)
    return verdicts
