"""The pure parts of the benchmark suite: statistics, ratios, goals and the Markdown report.

Nothing here starts a server or times anything: the suite itself runs outside the tests.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from bench.auth_http import answer, parse_head
from bench.clients import DIALOGUES, make_message
from bench.history import before_after_section
from bench.loadgen import split
from bench.procfs import (
    CLOCK_TICKS,
    OTHER_ROLE,
    ProcStat,
    cpu_seconds,
    cpu_seconds_by_role,
    kb_field,
    parse_stat,
)
from bench.report import Figure, markdown_table, ratio_table, render
from bench.results import BULK, IDLE, IDLE_CURVE, RATE, SATURATION, Record, Results
from bench.stats import MISSING, TIMES, format_number, format_ratio, percentile, ratio
from bench.targets import (
    BACKEND_TLS,
    HELPER_ROLE,
    KEEPER_ROLE,
    KEY_SERVER_ROLE,
    MAIN_ROLE,
    NGINX,
    PLAINTEXT,
    PROXY,
    PROXY_OWN_ONLY,
    PROXY_ROLES,
    STUNNEL,
)
from bench.verdicts import (
    MET,
    MISSED,
    NOT_MEASURED,
    all_verdicts,
    bulk_verdict,
    cpu_verdicts,
    idle_verdicts,
    latency_verdict,
    opening_verdict,
)
from bench.workloads import CPUUsed, lanes_and_counts

# -- statistics ---------------------------------------------------------------------------


def test_percentile_interpolates_between_neighbours() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 4.0
    assert percentile(values, 0.5) == 2.5
    # position 0.99 * 3 = 2.97: 3 + 0.97 * (4 - 3)
    assert percentile(values, 0.99) == pytest.approx(3.97)


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([7.5], 0.5) == 7.5
    assert percentile([7.5], 0.99) == 7.5


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_percentile_refuses_fractions_outside_zero_to_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="not within"):
        percentile([1.0, 2.0], fraction)


def test_percentile_refuses_no_values() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_ratio_is_none_without_both_values_or_with_a_zero_reference() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (12345.6, "12346"),
        (1234.0, "1234"),
        (123.4, "123"),
        (12.345, "12.3"),
        (1.2345, "1.23"),
        (0.045678, "0.0457"),
        (-2.5, "-2.50"),
        (0.0, "0"),
        (None, MISSING),
    ],
)
def test_format_number_keeps_three_significant_digits(value: float | None, text: str) -> None:
    assert format_number(value) == text


def test_format_ratio_appends_the_times_sign() -> None:
    assert format_ratio(0.5) == f"0.500{TIMES}"
    assert format_ratio(None) == MISSING


def test_split_shares_out_everything_larger_shares_first() -> None:
    assert split(10, 3) == [4, 3, 3]
    assert split(2, 4) == [1, 1, 0, 0]
    assert sum(split(10_000, 7)) == 10_000
    with pytest.raises(ValueError, match="at least one part"):
        split(5, 0)


# -- clients and auth_http -----------------------------------------------------------------


@pytest.mark.parametrize("size", [200, 1000, 1_000_003])
def test_make_message_has_the_exact_size_and_crlf_lines(size: int) -> None:
    message = make_message(size)
    assert len(message) == size
    assert b"\r\n.\r\n" not in message
    body = message.split(b"\r\n\r\n", 1)[1]
    assert all(len(line) <= 998 for line in body.split(b"\r\n"))


def test_make_message_refuses_a_size_below_its_header() -> None:
    with pytest.raises(ValueError, match="at least"):
        make_message(10)


def test_dialogue_reply_ends() -> None:
    smtp, imap, pop3 = DIALOGUES["smtp"], DIALOGUES["imap"], DIALOGUES["pop3"]
    assert not smtp.capability.last(b"250-PIPELINING\r\n")
    assert smtp.capability.last(b"250 SMTPUTF8\r\n")
    assert not imap.capability.last(b"* CAPABILITY IMAP4rev1\r\n")
    assert imap.capability.last(b"C OK done\r\n")
    assert not pop3.capability.last(b"STLS\r\n")
    assert pop3.capability.last(b".\r\n")
    assert pop3.capability.last(b"-ERR no CAPA here\r\n")


def test_auth_http_sends_each_protocol_to_its_backend() -> None:
    head = (
        b"GET /auth HTTP/1.0\r\nHost: localhost\r\nAuth-Method: plain\r\n"
        b"Auth-User: bob\r\nAuth-Protocol: imap\r\n\r\n"
    )
    fields = parse_head(head)
    assert fields["auth-protocol"] == "imap"
    reply = answer(fields, {"imap": ("127.0.0.1", 10143)})
    assert reply.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Auth-Status: OK\r\n" in reply
    assert b"Auth-Server: 127.0.0.1\r\nAuth-Port: 10143\r\n" in reply
    assert reply.endswith(b"\r\n\r\n")


def test_auth_http_refuses_a_protocol_without_backend() -> None:
    reply = answer({"auth-protocol": "pop3"}, {"imap": ("127.0.0.1", 10143)})
    assert b"Auth-Status: OK" not in reply
    assert b"Auth-Wait: 1\r\n" in reply


# -- tables --------------------------------------------------------------------------------


def test_markdown_table_escapes_pipes() -> None:
    table = markdown_table(["a", "b"], [["x|y", "1"]])
    assert table == "| a | b |\n| --- | --- |\n| x\\|y | 1 |\n"


def test_ratio_table_divides_the_proxy_by_each_peer() -> None:
    figure = Figure(
        "sessions/s, c=16",
        {PROXY: 100.0, STUNNEL: 50.0, NGINX: 400.0, BACKEND_TLS: None, PLAINTEXT: 0.0},
    )
    table = ratio_table([figure], "smtp")
    header, _, row = table.splitlines()
    assert header == (
        "| figure | ÷ stunnel | ÷ nginx mail | ÷ Postfix STARTTLS itself "
        "| ÷ plaintext Postfix (floor) |"
    )
    assert row == f"| sessions/s, c=16 | 2.00{TIMES} | 0.250{TIMES} | {MISSING} | {MISSING} |"


# -- goals ---------------------------------------------------------------------------------


def _rate(target: str, c: int, per_s: float, p50: float, **extra: float) -> Record:
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


def _results(*records: Record) -> Results:
    return Results(
        machine={"CPU": "test"}, settings={"plan": {"quick": True}}, records=list(records)
    )


def test_latency_goal_is_two_ms_above_the_backends_own_starttls() -> None:
    results = _results(_rate(PROXY, 1, 40.0, 6.5), _rate(BACKEND_TLS, 1, 30.0, 4.0))
    latency = latency_verdict(results, "ecdsa", "smtp")
    assert latency.status == MISSED
    assert latency.measured == "+2.50 ms (6.50 vs 4.00 ms)"
    assert latency.margin == "0.50 ms above the limit"
    results = _results(_rate(PROXY, 1, 40.0, 5.5), _rate(BACKEND_TLS, 1, 30.0, 4.0))
    latency = latency_verdict(results, "ecdsa", "smtp")
    assert (latency.status, latency.margin) == (MET, "0.50 ms below the limit")


def _cpu_run(proxy: dict[int, dict[str, float]]) -> Results:
    """Rate records at c=16 and c=64: the proxy's values, stunnel's and nginx's CPU."""
    records = [
        _rate(target, c, 100.0, 5.0, cpu_ms=ms)
        for target, by_c in ((STUNNEL, {16: 4.1, 64: 2.7}), (NGINX, {16: 0.69, 64: 0.5}))
        for c, ms in by_c.items()
    ]
    records += [_rate(PROXY, c, 100.0, 5.0, **values) for c, values in proxy.items()]
    return _results(*records)


def _split(total: float, main: float, helper: float, key_server: float) -> dict[str, float]:
    return {
        "cpu_ms": total,
        f"{MAIN_ROLE}_cpu_ms": main,
        f"{HELPER_ROLE}_cpu_ms": helper,
        f"{KEY_SERVER_ROLE}_cpu_ms": key_server,
        f"{KEEPER_ROLE}_cpu_ms": 0.0,
        f"{OTHER_ROLE}_cpu_ms": 0.0,
    }


def test_cpu_goals_met_side_by_side_with_stunnel_and_nginx() -> None:
    results = _cpu_run({16: _split(1.9, 0.7, 1.0, 0.2), 64: _split(1.6, 0.6, 0.9, 0.1)})
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
    results = _cpu_run({16: _split(1.8, 0.7, 1.0, 0.1), 64: _split(2.5, 0.9, 1.5, 0.1)})
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
    results = _results(_rate(STUNNEL, 16, 100.0, 200.0))
    assert {v.status for v in cpu_verdicts(results, "ecdsa", "smtp")} == {NOT_MEASURED}
    assert latency_verdict(results, "ecdsa", "smtp").status == NOT_MEASURED
    assert bulk_verdict(results, "ecdsa", "smtp").status == NOT_MEASURED
    assert {v.status for v in idle_verdicts(results, "ecdsa", "imap")} == {NOT_MEASURED}
    assert opening_verdict(results, "ecdsa", "imap").status == NOT_MEASURED


def test_bulk_goal_is_stunnels_throughput() -> None:
    def bulk(proxy: float) -> Results:
        return _results(
            Record(BULK, "rsa", "imap", PROXY, 10**8, {"mb_per_s": proxy}),
            Record(BULK, "rsa", "imap", STUNNEL, 10**8, {"mb_per_s": 100.0}),
        )

    verdict = bulk_verdict(bulk(100.0), "rsa", "imap")
    assert verdict.goal == f"bulk throughput ≥ 1{TIMES} stunnel's"
    assert (verdict.status, verdict.margin) == (MET, "+0 % against the goal")
    verdict = bulk_verdict(bulk(70.0), "rsa", "imap")
    assert (verdict.status, verdict.margin) == (MISSED, "-30 % against the goal")
    assert verdict.measured == f"0.700{TIMES} (70.0 vs 100 MB/s)"


def _idle(
    held: float, asked: int, uss: float, errors: float = 0.0, target: str = PROXY, **extra: float
) -> Record:
    values = {"held": held, "open_errors": errors, "close_errors": 0.0, "uss_per_session": uss}
    return Record(IDLE, "ecdsa", "imap", target, asked, values | extra)


def test_idle_goals() -> None:
    met = _idle(10_000, 10_000, 262 * 1024, pte_per_session=52 * 1024)
    met.values["main_uss_per_session"] = 30 * 1024
    uss, capacity = idle_verdicts(
        _results(
            met,
            _idle(9_765, 10_000, 90 * 1024, target=STUNNEL),
            _idle(10_000, 10_000, 19 * 1024, target=NGINX),
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
    short = _idle(9_000, 10_000, 3 * 1024 * 1024, errors=1000)
    short.note = "stopped at 9000 sessions to keep the memory reserve; errors: 1000x refused"
    uss, capacity = idle_verdicts(_results(short), "ecdsa", "imap")
    assert (uss.status, uss.measured) == (MISSED, "3072 KiB")
    assert uss.margin == "2752 KiB above the limit"
    assert capacity.status == MISSED
    assert capacity.margin == (
        "1,000 short, 1000 errors; stopped at 9000 sessions to keep the memory reserve"
    )
    limited = _results(short)
    limited.settings["descriptor limit"] = 20_000
    _, capacity = idle_verdicts(limited, "ecdsa", "imap")
    assert capacity.margin.endswith("; descriptor limit per process here: 20,000")
    _, capacity = idle_verdicts(_results(_idle(300, 300, 1024)), "ecdsa", "imap")
    assert capacity.status == NOT_MEASURED
    assert capacity.margin == "this run asked for 300 sessions only"


def _opened(
    seconds: float,
    sessions: int = 1000,
    held: int = 1000,
    errors: int = 0,
    generator_busy: float = 0.3,
    target: str = PROXY,
) -> Record:
    return _idle(
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


def test_opening_goal_met_side_by_side_with_stunnel_and_nginx() -> None:
    results = _results(_opened(8.25), _opened(30.8, target=STUNNEL), _opened(5.0, target=NGINX))
    verdict = opening_verdict(results, "ecdsa", "imap")
    assert verdict.goal == "1,000 idle sessions opened 16 at a time in ≤ 10 s"
    assert verdict.measured == (
        "8.25 s, 1,000 of 1,000 opened, 0 errors; stunnel 30.8, nginx mail 5.00 s"
    )
    assert (verdict.status, verdict.margin) == (MET, "1.8 s below the limit")


def test_opening_goal_missed_slow_with_errors_or_generator_bound() -> None:
    verdict = opening_verdict(_results(_opened(48.6)), "ecdsa", "imap")
    assert (verdict.status, verdict.margin) == (MISSED, "38.6 s above the limit")
    verdict = opening_verdict(_results(_opened(6.0, held=990, errors=10)), "ecdsa", "imap")
    assert (verdict.status, verdict.margin) == (MISSED, "10 short, 10 errors")
    verdict = opening_verdict(_results(_opened(12.0, generator_busy=0.95)), "ecdsa", "imap")
    assert verdict.status == MISSED
    assert verdict.margin == (
        "2.0 s above the limit; the generator was 95 % busy: the figure is an upper bound"
    )


def test_opening_goal_not_measured_on_a_short_run_or_without_the_opening() -> None:
    verdict = opening_verdict(_results(_opened(1.5, sessions=200, held=200)), "ecdsa", "imap")
    assert (verdict.status, verdict.margin) == (
        NOT_MEASURED,
        "this run opened 200 sessions 16 at a time",
    )
    assert verdict.measured == "1.50 s, 200 of 200 opened, 0 errors"
    skipped = _idle(5000, 10_000, 3 * 2**20)
    skipped.note = (
        "stopped at 5000 sessions to keep the memory reserve; "
        "opening of 1,000 not measured: it would eat into the memory reserve"
    )
    verdict = opening_verdict(_results(skipped), "ecdsa", "imap")
    assert (verdict.status, verdict.measured) == (NOT_MEASURED, MISSING)
    assert verdict.margin == "opening of 1,000 not measured: it would eat into the memory reserve"


def test_all_verdicts_follow_the_issues_order() -> None:
    results = _results(
        *(_rate(PROXY, c, 100.0, 5.0) for c in (1, 16, 64)),
        _opened(8.0),
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


# -- the CPU split by process ---------------------------------------------------------------


def _proc(pid: int, ppid: int, comm: str, own: int, reaped: int = 0) -> ProcStat:
    return ProcStat(pid, ppid, "S", 0, own, 0, reaped, 0, comm)


def test_parse_stat_reads_the_name_between_the_outer_parentheses() -> None:
    line = "42 (stp (x) y) S 7 42 42 0 -1 4194560 1 2 3 4 11 12 13 14 20 0 1 0 5 6 7"
    stat = parse_stat(42, line)
    assert (stat.comm, stat.state, stat.ppid) == ("stp (x) y", "S", 7)
    assert (stat.utime, stat.stime, stat.cutime, stat.cstime) == (11, 12, 13, 14)
    assert (stat.own_ticks, stat.reaped_ticks) == (23, 27)


def test_kb_field_of_proc_status() -> None:
    text = "Name:\tstp-worker\nVmRSS:\t    2048 kB\nVmPTE:\t      52 kB\n"
    assert kb_field(text, "VmPTE") == 52 * 1024
    assert kb_field(text, "VmSwap") == 0


def test_cpu_split_of_the_proxys_processes() -> None:
    tick = 1 / CLOCK_TICKS
    stats = [
        # the main process: its own time only; what it reaped goes to "other"
        _proc(10, 1, "starttls-proxy", own=300, reaped=7),
        _proc(11, 10, "stp-keeper", own=2, reaped=1),
        _proc(12, 11, "stp-keyserver", own=40),
        # the helper's reaped workers are the helper's
        _proc(13, 11, "stp-helper", own=5, reaped=900),
        _proc(14, 13, "stp-worker", own=30),
        _proc(15, 13, "stp-spare", own=1),
        # a fork of the helper that has not named itself yet: the helper's
        _proc(16, 13, "stp-helper", own=2),
        # an unnamed child of the main process: not the main process's own time
        _proc(17, 10, "python3", own=4),
    ]
    split = cpu_seconds_by_role(stats, PROXY_ROLES, PROXY_OWN_ONLY)
    assert split == pytest.approx(
        {
            MAIN_ROLE: 300 * tick,
            KEEPER_ROLE: 3 * tick,
            KEY_SERVER_ROLE: 40 * tick,
            HELPER_ROLE: 938 * tick,
            OTHER_ROLE: 11 * tick,
        }
    )
    assert sum(split.values()) == pytest.approx(cpu_seconds(stats))


def test_cpu_split_names_every_role_and_survives_a_parent_loop() -> None:
    # A process whose ancestry leaves the tree or loops counts as "other".
    stats = [_proc(20, 21, "x", own=5), _proc(21, 20, "y", own=6), _proc(22, 99, "z", own=1)]
    split = cpu_seconds_by_role(stats, PROXY_ROLES, PROXY_OWN_ONLY)
    assert set(split) == {MAIN_ROLE, KEEPER_ROLE, KEY_SERVER_ROLE, HELPER_ROLE, OTHER_ROLE}
    assert split[OTHER_ROLE] == pytest.approx(12 / CLOCK_TICKS)
    assert split[MAIN_ROLE] == 0.0


def test_cpu_used_names_the_values_by_role() -> None:
    used = CPUUsed(2.0, 0.5, {MAIN_ROLE: 0.5, HELPER_ROLE: 1.5})
    assert used.role_values("cpu_ms", 1000 / 1000) == {"main_cpu_ms": 0.5, "helper_cpu_ms": 1.5}
    assert CPUUsed(1.0, 0.0).role_values("cpu_ms", 1.0) == {}


@pytest.mark.parametrize(
    ("workers", "jobs"),
    [
        (1, [(16, 1000)]),
        (2, [(8, 500), (8, 500)]),
        (3, [(6, 376), (5, 312), (5, 312)]),
        (32, [(1, 63)] * 8 + [(1, 62)] * 8),
    ],
)
def test_the_timed_opening_keeps_sixteen_lanes_over_the_generator(
    workers: int, jobs: list[tuple[int, int]]
) -> None:
    assert lanes_and_counts(1000, 16, workers) == jobs


# -- the report ----------------------------------------------------------------------------


def test_render_shows_sections_marks_and_notes() -> None:
    results = _results(
        _rate(PROXY, 16, 120.0, 5.0),
        _rate(NGINX, 16, 1300.0, 40.0, server_busy=0.5, generator_busy=0.97),
        Record(RATE, "ecdsa", "smtp", STUNNEL, 16, note="not measured (did not start: x)"),
        Record(IDLE_CURVE, "ecdsa", "imap", PROXY, 0, {"uss": 1.0, "backend_uss": 0.0}),
    )
    text = render(results, "plots", now=datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.UTC))
    assert text.startswith("# Benchmarks: starttls-proxy next to stunnel")
    assert "on 2026-01-02 03:04 UTC" in text
    assert "**Quick run**" in text
    for heading in (
        "## Goals of issue 13",
        "## 1. STARTTLS session rate",
        "## 2. Bulk",
        "## 3. Idle capacity",
        "## 4. CPU per session",
        "## The load generator",
    ):
        assert heading in text
    # the generator was the limit of nginx's row: its rate is a lower bound
    assert "| nginx mail | 16 | ≥1300 |" in text
    assert "- stunnel: not measured (did not start: x)" in text
    assert "![smtp rate](plots/rate-smtp.png)" in text
    assert "1 of 2 rate points were generator-bound" in text


def test_render_splits_the_proxys_cpu_and_shows_the_idle_figures() -> None:
    results = _results(
        _rate(PROXY, 16, 120.0, 5.0, **_split(1.9, 0.7, 1.0, 0.2)),
        _rate(PROXY, 64, 130.0, 9.0, **_split(1.6, 0.6, 0.9, 0.1)),
        _opened(8.25, errors=2, held=998),
    )
    idle = results.records[-1]
    idle.values |= {
        "pss_per_session": 210 * 1024,
        "pte_per_session": 52 * 1024,
        "main_uss_per_session": 30 * 1024,
        "backend_uss_per_session": 15 * 1024,
        "main_uss": 40 * 2**20,
        "main_pss": 42 * 2**20,
        "fds": 20_000,
        "processes": 10_006,
        "opened_per_s": 600.0,
        "open_cpu_ms": 1.5,
    }
    text = render(results, "plots")
    assert "starttls-proxy's CPU ms per session by process:" in text
    assert "| process | c=16 | c=64 |" in text
    assert "| main process | 0.700 | 0.600 |" in text
    assert "| TLS helper + workers | 1.00 | 0.900 |" in text
    assert "| key server | 0.200 | 0.100 |" in text
    assert "| total | 1.90 | 1.60 |" in text
    assert (
        "| starttls-proxy | 10,000 | 0 / 0 / 0 | 200 | 210 | 52.0 | 30.0 | 15.0 | 40.0 | 42.0 "
        "| 20,000 | 10,006 | 600 | 1.50 | 998 of 1,000 in 8.25 s (16 at a time), 2 errors |"
    ) in text
    assert "| page tables/session |" in text
    assert "| opening time |" in text


def test_render_flags_a_disturbed_run_and_stunnels_wait() -> None:
    results = _results(
        _rate(STUNNEL, 1, 4.7, 210.0, greeting_p50_ms=205.0, other_busy=0.3, steal=0.02),
        _rate(PLAINTEXT, 1, 400.0, 1.5, greeting_p50_ms=0.4, other_busy=0.1),
    )
    text = render(results, "plots")
    assert "**Other load disturbed this run**" in text
    assert "other processes used 20 % of the machine's CPUs on average (at most 30 %)" in text
    assert "stunnel's greeting came after 205 ms (p50, c=1)" in text
    probe = _rate(NGINX, 256, 1200.0, 90.0, server_busy=0.97)
    probe.workload = SATURATION
    results.records.append(probe)
    assert (
        "Saturation probe (ECDSA P-256): nginx mail (SMTP) at c=256: 1200 sessions/s, p50 "
        "90.0 ms, server CPUs 97 % busy, generator CPUs 40 % busy: the target's CPUs were "
        "full: the generator saturates it." in render(results, "plots")
    )
    assert (
        "c=1): 400 sessions/s with the server CPUs 95 % busy and the generator CPUs 40 % "
        "busy, so the target's CPUs were full" in render(results, "plots")
    )
    calm = _results(_rate(PROXY, 1, 40.0, 20.0, other_busy=0.02))
    assert "disturbed" not in render(calm, "plots")


def test_results_round_trip_through_json(tmp_path: Path) -> None:
    results = _results(
        _rate(PROXY, 16, 120.0, 5.0), Record(BULK, "rsa", "smtp", NGINX, 5, note="n")
    )
    results.save(tmp_path / "results.json")
    loaded = Results.load(tmp_path / "results.json")
    assert loaded == results
    assert loaded.value(RATE, "ecdsa", "smtp", PROXY, 16, "sessions_per_s") == 120.0
    assert loaded.params(RATE) == [16]


def _proxy_run(started: str, rate: float, uss: float) -> Results:
    return Results(
        machine={},
        settings={"started": started},
        records=[
            Record(RATE, "ecdsa", "smtp", PROXY, 16, {"sessions_per_s": rate}),
            Record(IDLE, "ecdsa", "imap", PROXY, 10_000, {"uss_per_session": uss}),
            Record(RATE, "ecdsa", "smtp", STUNNEL, 16, {"sessions_per_s": 70.0}),
        ],
    )


def test_before_and_after_compares_only_the_proxys_shared_figures() -> None:
    before = _proxy_run("2026-11-26 18:16 UTC", 50.0, 3 * 2**20)
    after = _proxy_run("2026-11-27 01:00 UTC", 75.0, 3 * 2**20)
    section = before_after_section(before, after, "- spare workers\n")
    assert "the run of 2026-11-26 18:16 UTC" in section
    assert "Changed since:\n\n- spare workers\n\n|" in section
    assert (
        f"| sessions/s, c=16 | SMTP | ECDSA P-256 | 50.0 | 75.0 | 1.50{TIMES} (better) |" in section
    )
    assert (
        f"| USS per idle session | IMAP | ECDSA P-256 | 3072 KiB | 3072 KiB | 1.00{TIMES} (same) |"
        in section
    )
    assert "70.0" not in section  # stunnel is not compared
    assert before_after_section(Results({}, {}), after, "- spare workers") == ""
