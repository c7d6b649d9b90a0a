"""Result records for the verdict and report tests: rates, idle runs,
timed openings and the proxy's CPU by process, with only what a test sets
differing from an ordinary run."""

from __future__ import annotations

from bench.procfs import OTHER_ROLE
from bench.results import IDLE, RATE, Record, Results
from bench.targets import HELPER_ROLE, KEEPER_ROLE, KEY_SERVER_ROLE, MAIN_ROLE, PROXY


def rate_record(target: str, c: int, per_s: float, p50: float, **extra: float) -> Record:
    values = {
        "sessions": 100.0,
        "errors": 0.0,
        "sessions_per_s": per_s,
        "p50_ms": p50,
        "p99_ms": 2 * p50,
        "greeting_p50_ms": 1.0,
        "cpu_ms": 2.0,
        "backend_cpu_ms": 1.0,
        "generator_cpu_ms": 0.9,
        "server_busy": 0.95,
        "generator_busy": 0.4,
    }
    return Record(RATE, "ecdsa", "smtp", target, c, values | extra)


def results_of(*records: Record) -> Results:
    return Results(
        machine={"CPU": "test"}, settings={"plan": {"quick": True}}, records=list(records)
    )


def cpu_by_role(total: float, main: float, helper: float, key_server: float) -> dict[str, float]:
    return {
        "cpu_ms": total,
        f"{MAIN_ROLE}_cpu_ms": main,
        f"{HELPER_ROLE}_cpu_ms": helper,
        f"{KEY_SERVER_ROLE}_cpu_ms": key_server,
        f"{KEEPER_ROLE}_cpu_ms": 0.0,
        f"{OTHER_ROLE}_cpu_ms": 0.0,
    }


def idle_record(
    held: float, asked: int, uss: float, errors: float = 0.0, target: str = PROXY, **extra: float
) -> Record:
    values = {"held": held, "open_errors": errors, "close_errors": 0.0, "uss_per_session": uss}
    return Record(IDLE, "ecdsa", "imap", target, asked, values | extra)


def opening_record(
    seconds: float,
    sessions: int = 1000,
    held: int = 1000,
    errors: int = 0,
    generator_busy: float = 0.3,
    target: str = PROXY,
) -> Record:
    return idle_record(
        10_000,
        10_000,
        200 * 1024,
        target=target,
        opening_sessions=sessions,
        opening_lanes=16,
        opening_held=held,
        opening_errors=errors,
        opening_seconds=seconds,
        opening_generator_busy=generator_busy,
    )
