"""The goals of issue 13 and each run's verdict on them (bench.verdicts)."""

from __future__ import annotations

from bench.results import BULK, Record, Results
from bench.stats import MISSING, TIMES
from bench.targets import BACKEND_TLS, NGINX, PROXY, STUNNEL
from bench.tests.records import cpu_by_role, idle_record, opening_record, rate_record, results_of
from bench.verdicts import (
    MET,
    MISSED,
    NOT_MEASURED,
    Verdict,
    all_verdicts,
    bulk_verdict,
    cpu_verdicts,
    idle_verdicts,
    latency_verdict,
    opening_verdict,
)


def test_latency_goal_is_two_ms_above_the_backends_own_starttls() -> None:
    results = results_of(rate_record(PROXY, 1, 40.0, 6.5), rate_record(BACKEND_TLS, 1, 30.0, 4.0))
    latency = latency_verdict(results, "ecdsa", "smtp")
    assert latency.status == MISSED
    assert latency.measured == "+2.50 ms (6.50 vs 4.00 ms)"
    assert latency.margin == "0.50 ms above the limit"
    results = results_of(rate_record(PROXY, 1, 40.0, 5.5), rate_record(BACKEND_TLS, 1, 30.0, 4.0))
    latency = latency_verdict(results, "ecdsa", "smtp")
    assert (latency.status, latency.margin) == (MET, "0.50 ms below the limit")


def _cpu_run(proxy: dict[int, dict[str, float]]) -> Results:
    """Rate records at c=16 and c=64: the proxy's values, stunnel's and nginx's CPU."""
    records = [
        rate_record(target, c, 100.0, 5.0, cpu_ms=ms)
        for target, by_c in ((STUNNEL, {16: 4.1, 64: 2.7}), (NGINX, {16: 0.69, 64: 0.5}))
        for c, ms in by_c.items()
    ]
    records += [rate_record(PROXY, c, 100.0, 5.0, **values) for c, values in proxy.items()]
    return results_of(*records)


def test_cpu_goals_met_side_by_side_with_stunnel_and_nginx() -> None:
    results = _cpu_run({16: cpu_by_role(1.9, 0.7, 1.0, 0.2), 64: cpu_by_role(1.6, 0.6, 0.9, 0.1)})
    total, helper, main = cpu_verdicts(results, "ecdsa", "smtp")
    assert total.goal == "terminator CPU per session at c=16 and c=64 ≤ 2 ms"
    assert total.measured == "1.90 / 1.60 ms; stunnel 4.10 / 2.70, nginx mail 0.690 / 0.500"
    assert (total.status, total.margin) == (MET, "0.10 ms below the limit (c=16)")
    assert helper.goal == "TLS helper and workers' CPU per session at c=16 and c=64 ≤ 1.2 ms"
    assert helper.measured == "1.00 / 0.900 ms; key server 0.200 / 0.100 ms beside"
    assert (helper.status, helper.margin) == (MET, "0.20 ms below the limit (c=16)")
    assert main.goal == "main process CPU per session at c=16 and c=64 ≤ 0.8 ms"
    assert (main.measured, main.status) == ("0.700 / 0.600 ms", MET)
    assert main.margin == "0.10 ms below the limit (c=16)"


def test_cpu_goals_missed_by_the_worst_concurrency() -> None:
    results = _cpu_run({16: cpu_by_role(1.8, 0.7, 1.0, 0.1), 64: cpu_by_role(2.5, 0.9, 1.5, 0.1)})
    total, helper, main = cpu_verdicts(results, "ecdsa", "smtp")
    assert (total.status, total.margin) == (MISSED, "0.50 ms above the limit (c=64)")
    assert (helper.status, helper.margin) == (MISSED, "0.30 ms above the limit (c=64)")
    assert (main.status, main.margin) == (MISSED, "0.10 ms above the limit (c=64)")


def test_cpu_goals_without_the_split_or_a_concurrency() -> None:
    # A run of the Python-worker era: a total, no split; and no c=64 point.
    results = _cpu_run({16: {"cpu_ms": 1.5}})
    total, helper, main = cpu_verdicts(results, "ecdsa", "smtp")
    assert (total.status, total.margin) == (NOT_MEASURED, "no figure at c=64")
    assert total.measured.startswith(f"1.50 / {MISSING} ms; ")
    assert (helper.status, helper.measured) == (NOT_MEASURED, MISSING)
    assert (main.status, main.measured) == (NOT_MEASURED, MISSING)
    # one concurrency above the limit is enough to miss, the other missing or not
    total, _, _ = cpu_verdicts(_cpu_run({64: {"cpu_ms": 3.0}}), "ecdsa", "smtp")
    assert (total.status, total.margin) == (MISSED, "1.00 ms above the limit (c=64)")


def test_goals_without_figures_are_not_measured() -> None:
    results = results_of(rate_record(STUNNEL, 16, 100.0, 200.0))
    assert {v.status for v in cpu_verdicts(results, "ecdsa", "smtp")} == {NOT_MEASURED}
    assert latency_verdict(results, "ecdsa", "smtp").status == NOT_MEASURED
    assert bulk_verdict(results, "ecdsa", "smtp").status == NOT_MEASURED
    assert {v.status for v in idle_verdicts(results, "ecdsa", "imap")} == {NOT_MEASURED}
    assert opening_verdict(results, "ecdsa", "imap").status == NOT_MEASURED


def test_bulk_goal_is_stunnels_throughput() -> None:
    def bulk(proxy: float) -> Results:
        return results_of(
            Record(BULK, "rsa", "imap", PROXY, 10**8, {"mb_per_s": proxy}),
            Record(BULK, "rsa", "imap", STUNNEL, 10**8, {"mb_per_s": 100.0}),
        )

    verdict = bulk_verdict(bulk(100.0), "rsa", "imap")
    assert verdict.goal == f"bulk throughput ≥ 1{TIMES} stunnel's"
    assert (verdict.status, verdict.margin) == (MET, "+0 % against the goal")
    verdict = bulk_verdict(bulk(70.0), "rsa", "imap")
    assert (verdict.status, verdict.margin) == (MISSED, "-30 % against the goal")
    assert verdict.measured == f"0.700{TIMES} (70.0 vs 100 MB/s)"


def test_bulk_goal_names_what_the_terminators_and_the_backend_spent() -> None:
    verdict = bulk_verdict(
        results_of(
            Record(BULK, "ecdsa", "smtp", PROXY, 10**8, {"mb_per_s": 187.0, "cpu_s": 0.08}),
            Record(BULK, "ecdsa", "smtp", STUNNEL, 10**8, {"mb_per_s": 189.0, "cpu_s": 0.08}),
        ),
        "ecdsa",
        "smtp",
    )
    assert verdict.measured == f"0.989{TIMES} (187 vs 189 MB/s)"
    proxy = {"mb_per_s": 187.0, "cpu_s": 0.08, "backend_cpu_s": 0.553}
    verdict = bulk_verdict(
        results_of(
            Record(BULK, "ecdsa", "smtp", PROXY, 10**8, proxy),
            Record(BULK, "ecdsa", "smtp", STUNNEL, 10**8, {"mb_per_s": 189.0, "cpu_s": 0.083}),
        ),
        "ecdsa",
        "smtp",
    )
    assert verdict.measured == (
        f"0.989{TIMES} (187 vs 189 MB/s); CPU s per transfer: terminator 0.0800 vs 0.0830, "
        "backend 0.553"
    )


def test_idle_goals() -> None:
    met = idle_record(10_000, 10_000, 262 * 1024, pte_per_session=52 * 1024)
    met.values["main_uss_per_session"] = 30 * 1024
    uss, capacity = idle_verdicts(
        results_of(
            met,
            idle_record(9_765, 10_000, 90 * 1024, target=STUNNEL),
            idle_record(10_000, 10_000, 19 * 1024, target=NGINX),
        ),
        "ecdsa",
        "imap",
    )
    assert uss.goal == "≤ 320 KiB USS per idle upgraded session (whole proxy)"
    assert uss.measured == (
        "262 KiB (page tables 52 KiB beside; main process 30 KiB of it; "
        "stunnel 90.0, nginx mail 19.0 KiB)"
    )
    assert (uss.status, uss.margin) == (MET, "58 KiB below the limit")
    assert (capacity.status, capacity.measured) == (MET, "10,000 held, 0 errors")
    _, capacity = idle_verdicts(
        results_of(idle_record(10_000, 10_000, 262 * 1024, instances=2)), "ecdsa", "imap"
    )
    assert capacity.measured == (
        "10,000 held, 0 errors, by 2 instances sharing the port (reuse_port)"
    )
    short = idle_record(9_000, 10_000, 3 * 1024 * 1024, errors=1000)
    short.note = "stopped at 9000 sessions to keep the memory reserve; errors: 1000x refused"
    uss, capacity = idle_verdicts(results_of(short), "ecdsa", "imap")
    assert (uss.status, uss.measured) == (MISSED, "3072 KiB")
    assert uss.margin == "2752 KiB above the limit"
    assert capacity.status == MISSED
    assert capacity.margin == (
        "1,000 short, 1000 errors; stopped at 9000 sessions to keep the memory reserve"
    )
    limited = results_of(short)
    limited.settings["descriptor limit"] = 20_000
    _, capacity = idle_verdicts(limited, "ecdsa", "imap")
    assert capacity.margin.endswith("; descriptor limit per process here: 20,000")
    _, capacity = idle_verdicts(results_of(idle_record(300, 300, 1024)), "ecdsa", "imap")
    assert capacity.status == NOT_MEASURED
    assert capacity.margin == "this run asked for 300 sessions only"


def test_opening_goal_met_side_by_side_with_stunnel_and_nginx() -> None:
    results = results_of(
        opening_record(8.25),
        opening_record(30.8, target=STUNNEL),
        opening_record(5.0, target=NGINX),
    )
    verdict = opening_verdict(results, "ecdsa", "imap")
    assert verdict.goal == "1,000 idle sessions opened 16 at a time in ≤ 10 s"
    assert verdict.measured == (
        "8.25 s, 1,000 of 1,000 opened, 0 errors; stunnel 30.8, nginx mail 5.00 s"
    )
    assert (verdict.status, verdict.margin) == (MET, "1.8 s below the limit")


def test_opening_goal_missed_slow_with_errors_or_generator_bound() -> None:
    verdict = opening_verdict(results_of(opening_record(48.6)), "ecdsa", "imap")
    assert (verdict.status, verdict.margin) == (MISSED, "38.6 s above the limit")
    verdict = opening_verdict(results_of(opening_record(6.0, held=990, errors=10)), "ecdsa", "imap")
    assert (verdict.status, verdict.margin) == (MISSED, "10 short, 10 errors")
    verdict = opening_verdict(
        results_of(opening_record(12.0, generator_busy=0.95)), "ecdsa", "imap"
    )
    assert verdict.status == MISSED
    assert verdict.margin == (
        "2.0 s above the limit; the generator was 95 % busy: the figure is an upper bound"
    )


def test_opening_goal_not_measured_on_a_short_run_or_without_the_opening() -> None:
    verdict = opening_verdict(
        results_of(opening_record(1.5, sessions=200, held=200)), "ecdsa", "imap"
    )
    assert (verdict.status, verdict.margin) == (
        NOT_MEASURED,
        "this run opened 200 sessions 16 at a time",
    )
    assert verdict.measured == "1.50 s, 200 of 200 opened, 0 errors"
    skipped = idle_record(5000, 10_000, 3 * 2**20)
    skipped.note = (
        "stopped at 5000 sessions to keep the memory reserve; "
        "opening of 1,000 not measured: it would eat into the memory reserve"
    )
    verdict = opening_verdict(results_of(skipped), "ecdsa", "imap")
    assert (verdict.status, verdict.measured) == (NOT_MEASURED, MISSING)
    assert verdict.margin == "opening of 1,000 not measured: it would eat into the memory reserve"


def test_all_verdicts_follow_the_issues_order() -> None:
    results = results_of(
        *(rate_record(PROXY, c, 100.0, 5.0) for c in (1, 16, 64)),
        opening_record(8.0),
        Record(BULK, "ecdsa", "smtp", PROXY, 10**8, {"mb_per_s": 70.0}),
    )
    goals = [v.goal.split(" ", 2)[:2] for v in all_verdicts(results)]
    assert [" ".join(goal) for goal in goals] == [
        "≤ 320",
        "10,000 idle",
        "terminator CPU",
        "TLS helper",
        "main process",
        "p50 latency",
        "bulk throughput",
        "1,000 idle",
    ]


def test_bulk_goal_compares_round_by_round_when_the_targets_took_turns() -> None:
    # Round 3's drift slowed both; the medians of the two series (190 vs 189) hide
    # that the proxy was behind in three rounds of five.
    ours = {"mb_per_s": 190.0} | {
        f"mb_per_s_{i}": v for i, v in enumerate((190, 186, 150, 192, 195), 1)
    }
    theirs = {"mb_per_s": 189.0} | {
        f"mb_per_s_{i}": v for i, v in enumerate((200, 189, 140, 196, 180), 1)
    }
    verdict = _bulk_verdict_of("smtp", ours, theirs)
    assert verdict.measured == (
        f"0.984{TIMES} median of 5 rounds (0.950-1.08; medians 190 vs 189 MB/s)"
    )
    assert (verdict.status, verdict.margin) == (MISSED, "-2 % against the goal")


def test_bulk_goal_pairs_only_the_rounds_both_targets_completed() -> None:
    ours = {"mb_per_s": 100.0, "mb_per_s_1": 100.0, "mb_per_s_3": 110.0}
    theirs = {"mb_per_s": 100.0, "mb_per_s_1": 100.0, "mb_per_s_2": 90.0, "mb_per_s_3": 100.0}
    verdict = _bulk_verdict_of("imap", ours, theirs)
    assert verdict.measured.startswith(f"1.05{TIMES} median of 2 rounds (1.00-1.10;")
    assert verdict.status == MET


def _bulk_verdict_of(protocol: str, ours: dict[str, float], theirs: dict[str, float]) -> Verdict:
    """The bulk verdict of the proxy's figures ``ours`` against stunnel's ``theirs`` (ECDSA)."""
    records = (
        Record(BULK, "ecdsa", protocol, target, 10**8, values)
        for target, values in ((PROXY, ours), (STUNNEL, theirs))
    )
    return bulk_verdict(results_of(*records), "ecdsa", protocol)
