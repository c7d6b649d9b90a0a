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
from bench.report import Figure, markdown_table, ratio_table, render
from bench.results import BULK, IDLE, IDLE_CURVE, RATE, SATURATION, Record, Results
from bench.stats import MISSING, TIMES, format_number, format_ratio, percentile, ratio
from bench.targets import BACKEND_TLS, NGINX, PLAINTEXT, PROXY, STUNNEL
from bench.verdicts import MET, MISSED, NOT_MEASURED, bulk_verdict, idle_verdicts, rate_verdicts

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


def test_rate_goals_met_and_missed_with_margins() -> None:
    results = _results(
        _rate(PROXY, 16, 120.0, 5.0),
        _rate(STUNNEL, 16, 100.0, 200.0),
        _rate(NGINX, 16, 300.0, 40.0),
        _rate(PROXY, 1, 40.0, 6.5),
        _rate(BACKEND_TLS, 1, 30.0, 4.0),
    )
    stunnel, nginx, latency = rate_verdicts(results, "ecdsa", "smtp")
    assert (stunnel.status, stunnel.margin) == (MET, "+20 % against the goal")
    assert stunnel.measured == f"1.20{TIMES} (120 vs 100 sessions/s)"
    # 120 / 300 = 0.4 against a goal of 0.5: 20 % short
    assert (nginx.status, nginx.margin) == (MISSED, "-20 % against the goal")
    assert latency.status == MISSED
    assert latency.measured == "+2.50 ms (6.50 vs 4.00 ms)"
    assert latency.margin == "0.50 ms above the limit"


def test_goals_without_figures_are_not_measured() -> None:
    results = _results(_rate(STUNNEL, 16, 100.0, 200.0))
    assert {v.status for v in rate_verdicts(results, "ecdsa", "smtp")} == {NOT_MEASURED}
    assert bulk_verdict(results, "ecdsa", "smtp").status == NOT_MEASURED
    assert {v.status for v in idle_verdicts(results, "ecdsa", "imap")} == {NOT_MEASURED}


def test_bulk_goal_is_seventy_percent_of_stunnel() -> None:
    results = _results(
        Record(BULK, "rsa", "imap", PROXY, 10**8, {"mb_per_s": 70.0}),
        Record(BULK, "rsa", "imap", STUNNEL, 10**8, {"mb_per_s": 100.0}),
    )
    verdict = bulk_verdict(results, "rsa", "imap")
    assert (verdict.status, verdict.margin) == (MET, "+0 % against the goal")


def _idle(held: float, asked: int, uss: float, errors: float = 0.0) -> Record:
    values = {"held": held, "open_errors": errors, "close_errors": 0.0, "uss_per_session": uss}
    return Record(IDLE, "ecdsa", "imap", PROXY, asked, values)


def test_idle_goals() -> None:
    uss, capacity = idle_verdicts(_results(_idle(10_000, 10_000, 512 * 1024)), "ecdsa", "imap")
    assert (uss.status, uss.measured, uss.margin) == (MET, "512 KiB", "512 KiB below the limit")
    assert (capacity.status, capacity.measured) == (MET, "10,000 held, 0 errors")
    short = _idle(9_000, 10_000, 3 * 1024 * 1024, errors=1000)
    short.note = "stopped at 9000 sessions to keep the memory reserve; errors: 1000x refused"
    uss, capacity = idle_verdicts(_results(short), "ecdsa", "imap")
    assert (uss.status, uss.margin) == (MISSED, "2048 KiB above the limit")
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
        "## Goals of issue 7",
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
        f"| USS per idle session | IMAP | ECDSA P-256 | 3.00 MiB | 3.00 MiB | 1.00{TIMES} (same) |"
        in section
    )
    assert "70.0" not in section  # stunnel is not compared
    assert before_after_section(Results({}, {}), after, "- spare workers") == ""
