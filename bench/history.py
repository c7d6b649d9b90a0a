"""Before and after: the proxy's own figures next to those of an earlier run.

The earlier run is ``before.json`` beside ``results.json`` (the run of the commit
before an optimisation, kept by hand: for issue 13, the last run with the Python
worker), and ``before.md`` says what changed since (kept with it, so the report
never names changes that its baseline does not precede); the report shows each
figure of starttls-proxy in both runs and their ratio.  Only the proxy is compared:
the peers did not change between the runs.  A figure the earlier run did not
measure (the CPU split, page tables, the timed opening) has no row.
"""

from __future__ import annotations

from collections.abc import Iterator

from bench.report import KEY_LABELS, markdown_table
from bench.results import BULK, IDLE, RATE, Results
from bench.stats import format_number, format_ratio, ratio
from bench.targets import PROXY

#: (label, workload, param or None for any, value name, scale, unit, higher is better)
FIGURES = (
    ("sessions/s, c=1", RATE, 1, "sessions_per_s", 1.0, "", True),
    ("sessions/s, c=16", RATE, 16, "sessions_per_s", 1.0, "", True),
    ("sessions/s, c=64", RATE, 64, "sessions_per_s", 1.0, "", True),
    ("p50 latency, c=1", RATE, 1, "p50_ms", 1.0, " ms", False),
    ("CPU per session, c=16", RATE, 16, "cpu_ms", 1.0, " ms", False),
    ("CPU per session, c=64", RATE, 64, "cpu_ms", 1.0, " ms", False),
    ("main process CPU per session, c=16", RATE, 16, "main_cpu_ms", 1.0, " ms", False),
    ("TLS helper + workers CPU per session, c=16", RATE, 16, "helper_cpu_ms", 1.0, " ms", False),
    ("bulk throughput", BULK, None, "mb_per_s", 1.0, " MB/s", True),
    ("USS per idle session", IDLE, None, "uss_per_session", 1 / 2**10, " KiB", False),
    ("page tables per idle session", IDLE, None, "pte_per_session", 1 / 2**10, " KiB", False),
    ("idle sessions held", IDLE, None, "held", 1.0, "", True),
    ("idle sessions opened/s", IDLE, None, "opened_per_s", 1.0, "", True),
    ("timed opening of idle sessions", IDLE, None, "opening_seconds", 1.0, " s", False),
)


#: Changes smaller than this are noise, not progress: on the 2-vCPU machine
#: of docs/benchmarks.md the same commit measures up to 15 % apart from one
#: run to the next (rates, CPU per session).
SAME = 0.15


def _verdict(change: float | None, higher_better: bool) -> str:
    if change is None or abs(change - 1) < SAME:
        return "same"
    return "better" if (change > 1) == higher_better else "worse"


def _rows(before: Results, after: Results) -> Iterator[list[str]]:
    for key in after.key_types():
        for label, workload, param, name, scale, unit, higher_better in FIGURES:
            for protocol in after.protocols(workload):
                old = before.value(workload, key, protocol, PROXY, param, name)
                new = after.value(workload, key, protocol, PROXY, param, name)
                if old is None or new is None:
                    continue
                change = ratio(new, old)
                yield [
                    label,
                    protocol.upper(),
                    KEY_LABELS.get(key, key),
                    format_number(old * scale) + unit,
                    format_number(new * scale) + unit,
                    f"{format_ratio(change)} ({_verdict(change, higher_better)})",
                ]


def before_after_section(before: Results, after: Results, changes: str) -> str:
    """The report section; empty when the runs share no figure.

    ``changes``: Markdown, what changed between the runs.
    """
    rows = list(_rows(before, after))
    if not rows:
        return ""
    started = before.settings.get("started", "an earlier run")
    return (
        "## Before and after the optimisations\n\n"
        f"starttls-proxy in this run next to the run of {started} (`before.json`); "
        f"ratios within {SAME * 100:.0f} % of 1 are marked *same* (runs of one commit differ "
        f"that much here). Changed since:\n\n{changes.strip()}\n\n"
        + markdown_table(["figure", "protocol", "key", "before", "after", "after / before"], rows)
        + "\n"
    )
