"""The Markdown report (bench.report): its tables, sections, marks and notes,
the results it is rendered from (bench.results) and the before/after
section (bench.history).

Nothing here starts a server or times anything: the suite itself runs outside the tests.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from bench.history import before_after_section
from bench.report import Figure, markdown_table, ratio_table, render
from bench.results import BULK, IDLE, IDLE_CURVE, RATE, SATURATION, Record, Results
from bench.stats import MISSING, TIMES
from bench.targets import BACKEND_TLS, NGINX, PLAINTEXT, PROXY, STUNNEL
from bench.tests.records import cpu_by_role, opening_record, rate_record, results_of


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


def test_render_shows_sections_marks_and_notes() -> None:
    results = results_of(
        rate_record(PROXY, 16, 120.0, 5.0),
        rate_record(NGINX, 16, 1300.0, 40.0, server_busy=0.5, generator_busy=0.97),
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
    results = results_of(
        rate_record(PROXY, 16, 120.0, 5.0, **cpu_by_role(1.9, 0.7, 1.0, 0.2)),
        rate_record(PROXY, 64, 130.0, 9.0, **cpu_by_role(1.6, 0.6, 0.9, 0.1)),
        opening_record(8.25, errors=2, held=998),
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
    results = results_of(
        rate_record(STUNNEL, 1, 4.7, 210.0, greeting_p50_ms=205.0, other_busy=0.3, steal=0.02),
        rate_record(PLAINTEXT, 1, 400.0, 1.5, greeting_p50_ms=0.4, other_busy=0.1),
    )
    text = render(results, "plots")
    assert "**Other load disturbed this run**" in text
    assert "other processes used 20 % of the machine's CPUs on average (at most 30 %)" in text
    assert "stunnel's greeting came after 205 ms (p50, c=1)" in text
    probe = rate_record(NGINX, 256, 1200.0, 90.0, server_busy=0.97)
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
    calm = results_of(rate_record(PROXY, 1, 40.0, 20.0, other_busy=0.02))
    assert "disturbed" not in render(calm, "plots")


def test_results_round_trip_through_json(tmp_path: Path) -> None:
    results = results_of(
        rate_record(PROXY, 16, 120.0, 5.0), Record(BULK, "rsa", "smtp", NGINX, 5, note="n")
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


def test_bulk_table_shows_what_the_backend_spent_beside_the_terminator() -> None:
    """Postfix's CPU for a DATA is most of the server's: the column shows why
    every terminator moves about as fast."""
    values = {"mb_per_s": 187.0, "cpu_s": 0.08, "backend_cpu_s": 0.553, "generator_cpu_s": 0.09}
    results = results_of(
        Record(BULK, "ecdsa", "smtp", PROXY, 100_000_000, values),
        Record(BULK, "ecdsa", "smtp", PLAINTEXT, 100_000_000, values | {"backend_cpu_s": 0.0}),
    )
    text = render(results, "plots")
    assert "| SMTP DATA terminator CPU s | SMTP DATA backend CPU s |" in text
    assert "| starttls-proxy | 187 | 0.0800 | 0.553 | 0.0900 |" in text
    assert f"| plaintext Postfix (floor) | 187 | 0.0800 | {MISSING} | 0.0900 |" in text
