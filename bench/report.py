"""The Markdown report: machine, method, goals, and every figure as a ratio to each peer.

:func:`render` is pure (results in, Markdown out) and unit-tested; :func:`write_report`
also writes the plots and the raw results next to the Markdown file.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procfs import OTHER_ROLE
from bench.results import BULK, IDLE, RATE, SATURATION, Record, Results
from bench.stats import BUSY, MISSING, format_number, format_ratio, mib, ratio
from bench.targets import (
    BACKEND_TLS,
    HELPER_ROLE,
    KEEPER_ROLE,
    KEY_SERVER_ROLE,
    MAIN_ROLE,
    NGINX,
    PLAINTEXT,
    PROXY,
    STUNNEL,
    TARGET_NAMES,
    target_label,
)
from bench.verdicts import ISSUE, all_verdicts

PEERS = (STUNNEL, NGINX, BACKEND_TLS, PLAINTEXT)
#: starttls-proxy's processes, as the CPU split names them (role -> label).
ROLE_LABELS = {
    MAIN_ROLE: "main process",
    HELPER_ROLE: "TLS helper + workers",
    KEY_SERVER_ROLE: "key server",
    KEEPER_ROLE: "keeper",
    OTHER_ROLE: "other (reaped by the main process)",
}
KEY_LABELS = {"ecdsa": "ECDSA P-256", "rsa": "RSA-2048"}
#: Share of the CPUs taken by others (processes, interrupts, steal) that makes a run suspect.
DISTURBED = 0.10


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)]) + "\n"


@dataclass(frozen=True)
class Figure:
    """One figure measured on every target (``None``: not measured)."""

    label: str
    values: dict[str, float | None]


def ratio_table(figures: Sequence[Figure], protocol: str, subject: str = PROXY) -> str:
    """Each figure of ``subject`` divided by the same figure of each peer."""
    peers = [peer for peer in TARGET_NAMES if peer != subject]
    headers = ["figure", *(f"÷ {target_label(peer, protocol)}" for peer in peers)]
    rows = [
        [figure.label]
        + [format_ratio(ratio(figure.values.get(subject), figure.values.get(p))) for p in peers]
        for figure in figures
    ]
    return markdown_table(headers, rows)


def generator_bound(record: Record) -> bool:
    return (
        record.values.get("generator_busy", 0.0) >= BUSY
        and record.values.get("server_busy", 1.0) < BUSY
    )


def _cell(record: Record | None, name: str, scale: float = 1.0, *, bound: bool = False) -> str:
    if record is None or name not in record.values:
        return MISSING
    text = format_number(record.values[name] * scale)
    return f"≥{text}" if bound and generator_bound(record) else text


def _percent(record: Record | None, name: str) -> str:
    if record is None or name not in record.values:
        return MISSING
    return f"{100 * record.values[name]:.0f} %"


def _figure(
    results: Results,
    workload: str,
    key: str,
    protocol: str,
    param: int | None,
    name: str,
    label: str,
    transform: Callable[[float], float] = float,
) -> Figure:
    values: dict[str, float | None] = {}
    for target in TARGET_NAMES:
        value = results.value(workload, key, protocol, target, param, name)
        values[target] = None if value is None else transform(value)
    return Figure(label, values)


def _not_measured(results: Results, workload: str, key: str, protocol: str) -> str:
    lines = []
    for target in TARGET_NAMES:
        record = results.find(workload, key, protocol, target)
        if record is not None and not record.values and record.note:
            lines.append(f"- {target_label(target, protocol)}: {record.note}\n")
    return "".join(lines)


def _rate_records(results: Results, key: str, protocol: str) -> Iterator[Record]:
    """The measured rate records of a protocol and key, by target, then concurrency."""
    for target in TARGET_NAMES:
        for c in results.params(RATE):
            record = results.find(RATE, key, protocol, target, c)
            if record is not None and record.values:
                yield record


def _rate_section(results: Results, key: str, protocol: str) -> str:
    concurrencies = results.params(RATE)
    rows = []
    for record in _rate_records(results, key, protocol):
        target, c = record.target, record.param
        rows.append(
            [
                target_label(target, protocol),
                str(c),
                _cell(record, "sessions_per_s", bound=True),
                _cell(record, "p50_ms"),
                _cell(record, "p99_ms"),
                _cell(record, "greeting_p50_ms"),
                _cell(record, "errors"),
                _percent(record, "server_busy"),
                _percent(record, "generator_busy"),
            ]
        )
    headers = [
        "target",
        "c",
        "sessions/s",
        "p50 ms",
        "p99 ms",
        "greeting p50 ms",
        "errors",
        "server CPU busy",
        "generator CPU busy",
    ]
    figures = [
        _figure(results, RATE, key, protocol, c, name, f"{label}, c={c}")
        for name, label in (
            ("sessions_per_s", "sessions/s"),
            ("p50_ms", "p50 latency"),
            ("p99_ms", "p99 latency"),
        )
        for c in concurrencies
    ]
    return (
        f"### {protocol.upper()}, {KEY_LABELS.get(key, key)}\n\n"
        + markdown_table(headers, rows)
        + "\n"
        + _not_measured(results, RATE, key, protocol)
        + _stunnel_wait(results, key, protocol)
        + "\nstarttls-proxy as a ratio to each peer"
        + " (sessions/s: higher is better; latency: lower is better):\n\n"
        + ratio_table(figures, protocol)
    )


def _stunnel_wait(results: Results, key: str, protocol: str) -> str:
    """stunnel's greeting delay next to the plaintext backend's, at concurrency 1."""
    low = min(results.params(RATE), default=1)
    stunnel = results.value(RATE, key, protocol, STUNNEL, low, "greeting_p50_ms")
    floor = results.value(RATE, key, protocol, PLAINTEXT, low, "greeting_p50_ms")
    if stunnel is None or floor is None:
        return ""
    return (
        f"\nstunnel's greeting came after {format_number(stunnel)} ms (p50, c={low}), the "
        f"plaintext backend's after {format_number(floor)} ms: stunnel first waits up to "
        "200 ms for a client that speaks first (implicit TLS) before it relays the greeting.\n"
    )


def _cpu_section(results: Results, key: str, protocol: str) -> str:
    concurrencies = results.params(RATE)
    rows = []
    for record in _rate_records(results, key, protocol):
        target, c = record.target, record.param
        total = record.values["cpu_ms"] + record.values["backend_cpu_ms"]
        rows.append(
            [
                target_label(target, protocol),
                str(c),
                _cell(record, "cpu_ms"),
                _cell(record, "backend_cpu_ms"),
                format_number(total),
                _cell(record, "kernel_cpu_ms"),
                _cell(record, "generator_cpu_ms"),
            ]
        )
    headers = [
        "target",
        "c",
        "terminator CPU ms/session",
        "backend behind it",
        "total",
        "kernel threads (machine-wide)",
        "generator CPU ms/session",
    ]
    figures = [
        _figure(results, RATE, key, protocol, c, "cpu_ms", f"terminator CPU/session, c={c}")
        for c in concurrencies
    ]
    return (
        f"### {protocol.upper()}, {KEY_LABELS.get(key, key)}\n\n"
        + markdown_table(headers, rows)
        + "\nstarttls-proxy as a ratio to each peer (lower is better):\n\n"
        + ratio_table(figures, protocol)
        + _cpu_split(results, key, protocol)
    )


def _cpu_split(results: Results, key: str, protocol: str) -> str:
    """starttls-proxy's CPU per session by process, one column per concurrency."""
    records = [
        record
        for c in results.params(RATE)
        if (record := results.find(RATE, key, protocol, PROXY, c)) is not None
        and f"{MAIN_ROLE}_cpu_ms" in record.values
    ]
    if not records:
        return ""
    rows = [
        [label, *(_cell(record, f"{role}_cpu_ms") for record in records)]
        for role, label in ROLE_LABELS.items()
    ]
    rows.append(["total", *(_cell(record, "cpu_ms") for record in records)])
    return "\nstarttls-proxy's CPU ms per session by process:\n\n" + markdown_table(
        ["process", *(f"c={record.param}" for record in records)], rows
    )


def _bulk_section(results: Results, key: str) -> str:
    protocols = results.protocols(BULK)
    rows = []
    for target in TARGET_NAMES:
        cells = []
        for protocol in protocols:
            record = results.find(BULK, key, protocol, target)
            cells += [
                _cell(record, "mb_per_s"),
                _cell(record, "cpu_s"),
                # A backend doing the TLS itself is the terminator: no second row.
                MISSING if target in (BACKEND_TLS, PLAINTEXT) else _cell(record, "backend_cpu_s"),
                _cell(record, "generator_cpu_s"),
            ]
        if any(cell != MISSING for cell in cells):
            rows.append(
                [target_label(target, "imap" if "smtp" not in protocols else "smtp"), *cells]
            )
    headers = ["target"]
    for protocol in protocols:
        name = "SMTP DATA" if protocol == "smtp" else "IMAP FETCH"
        headers += [
            f"{name} MB/s",
            f"{name} terminator CPU s",
            f"{name} backend CPU s",
            f"{name} generator CPU s",
        ]
    figures = [
        _figure(results, BULK, key, protocol, None, "mb_per_s", f"{protocol.upper()} MB/s")
        for protocol in protocols
    ]
    missing = "".join(_not_measured(results, BULK, key, protocol) for protocol in protocols)
    return (
        f"### {KEY_LABELS.get(key, key)}\n\n"
        "(The backend rows name the SMTP backend; IMAP figures come from Dovecot. CPU is per\n"
        "transfer. The terminator and the backend share the server CPUs: where the backend's\n"
        "CPU is most of it, as Postfix's is for DATA, the backend sets the pace.)\n\n"
        + markdown_table(headers, rows)
        + "\n"
        + missing
        + "\nstarttls-proxy as a ratio to each peer (higher is better):\n\n"
        + ratio_table(figures, protocols[0] if protocols else "smtp")
    )


def _idle_section(results: Results, key: str, protocol: str) -> str:
    rows = []
    for target in TARGET_NAMES:
        record = results.find(IDLE, key, protocol, target)
        if record is None or not record.values:
            continue
        v = record.values
        rows.append(
            [
                target_label(target, protocol),
                f"{int(v['held']):,}",
                " / ".join(
                    str(int(v.get(k, 0))) for k in ("open_errors", "close_errors", "unchecked")
                ),
                format_number(v["uss_per_session"] / 1024),
                format_number(v["pss_per_session"] / 1024),
                _cell(record, "pte_per_session", 1 / 1024),
                _cell(record, "main_uss_per_session", 1 / 1024),
                format_number(v["backend_uss_per_session"] / 1024),
                format_number(mib(v["main_uss"])),
                format_number(mib(v["main_pss"])),
                f"{int(v['fds']):,}",
                f"{int(v['processes']):,}",
                format_number(v["opened_per_s"]),
                format_number(v["open_cpu_ms"]),
                _opening_cell(record),
            ]
        )
    headers = [
        "target",
        "sessions held",
        "errors open / check / unchecked",
        "USS KiB/session",
        "PSS KiB/session",
        "page tables KiB/session",
        "main process USS KiB/session",
        "backend USS KiB/session",
        "main process USS MiB",
        "main process PSS MiB",
        "descriptors",
        "processes",
        "opened/s",
        "CPU ms/session opened",
        "timed opening",
    ]

    def per_session_total(target: str) -> float | None:
        record = results.find(IDLE, key, protocol, target)
        if record is None or not record.values:
            return None
        return record.values["uss_per_session"] + record.values["backend_uss_per_session"]

    figures = [
        _figure(results, IDLE, key, protocol, None, "uss_per_session", "USS/session"),
        _figure(results, IDLE, key, protocol, None, "pss_per_session", "PSS/session"),
        Figure("USS/session incl. backend", {t: per_session_total(t) for t in TARGET_NAMES}),
        _figure(results, IDLE, key, protocol, None, "pte_per_session", "page tables/session"),
        _figure(results, IDLE, key, protocol, None, "main_uss", "main process USS"),
        _figure(results, IDLE, key, protocol, None, "fds", "descriptors"),
        _figure(results, IDLE, key, protocol, None, "opening_seconds", "opening time"),
    ]
    return (
        f"### {protocol.upper()}, {KEY_LABELS.get(key, key)}\n\n"
        + markdown_table(headers, rows)
        + "\n"
        + _not_measured(results, IDLE, key, protocol)
        + "\nstarttls-proxy as a ratio to each peer (lower is better):\n\n"
        + ratio_table(figures, protocol)
    )


def _opening_cell(record: Record) -> str:
    """The timed opening: "1,000 of 1,000 in 8.20 s (16 at a time)", errors, a bound."""
    v = record.values
    if "opening_seconds" not in v:
        return MISSING
    text = (
        f"{int(v['opening_held']):,} of {int(v['opening_sessions']):,} in "
        f"{format_number(v['opening_seconds'])} s ({int(v['opening_lanes'])} at a time)"
    )
    if v["opening_errors"]:
        text += f", {int(v['opening_errors'])} errors"
    if v.get("opening_generator_busy", 0.0) >= BUSY:
        text += ", generator-bound (an upper bound)"
    return text


def _generator_section(results: Results) -> str:
    rates = [r for r in results.records if r.workload == RATE and "sessions_per_s" in r.values]
    if not rates:
        return "No session-rate figures.\n"
    fastest = max(rates, key=lambda r: r.values["sessions_per_s"])
    v = fastest.values
    verdict = _limit(fastest)
    bound = [r for r in rates if generator_bound(r)]
    average = sum(r.values["generator_cpu_ms"] for r in rates) / len(rates)
    return (
        f"The fastest point was {target_label(fastest.target, fastest.protocol)} "
        f"({fastest.protocol.upper()}, {KEY_LABELS.get(fastest.key_type, fastest.key_type)}, "
        f"c={fastest.param}): {format_number(v['sessions_per_s'])} sessions/s with the server CPUs "
        f"{100 * v['server_busy']:.0f} % busy and the generator CPUs "
        f"{100 * v['generator_busy']:.0f} % busy, so {verdict}.  The generator spent "
        f"{format_number(average)} ms of CPU per session "
        f"on average.  {len(bound)} of {len(rates)} rate points were generator-bound "
        f"(marked ≥ in the tables).\n\n" + _saturation(results) + _disturbance(rates)
    )


def _limit(record: Record) -> str:
    """What limited a rate point, judged from how busy both sides' CPUs were."""
    if record.values["server_busy"] >= BUSY:
        return "the target's CPUs were full: the generator saturates it"
    if generator_bound(record):
        return "the generator was the limit: that figure is a lower bound (≥)"
    return (
        "neither side's CPUs were full: latency (Nagle and delayed ACKs, timers) or other "
        "load on the machine was the limit"
    )


def _saturation(results: Results) -> str:
    """What the saturation probe found, one sentence per key type."""
    lines = []
    for probe in (r for r in results.records if r.workload == SATURATION and r.values):
        v = probe.values
        verdict = _limit(probe)
        lines.append(
            f"Saturation probe ({KEY_LABELS.get(probe.key_type, probe.key_type)}): "
            f"{target_label(probe.target, probe.protocol)} ({probe.protocol.upper()}) at "
            f"c={probe.param}: {format_number(v['sessions_per_s'])} sessions/s, p50 "
            f"{format_number(v['p50_ms'])} ms, server CPUs {100 * v['server_busy']:.0f} % busy, "
            f"generator CPUs {100 * v['generator_busy']:.0f} % busy: {verdict}.\n\n"
        )
    return "".join(lines)


def _disturbance(rates: Sequence[Record]) -> str:
    """How much CPU others took during the rate windows (other processes, interrupts, steal)."""
    other = [r.values.get("other_busy", 0.0) for r in rates]
    steal = [r.values.get("steal", 0.0) for r in rates]
    text = (
        f"During the rate windows, other processes used "
        f"{100 * sum(other) / len(other):.0f} % of the machine's CPUs on average "
        f"(at most {100 * max(other):.0f} %), and the hypervisor stole "
        f"{100 * sum(steal) / len(steal):.0f} % (at most {100 * max(steal):.0f} %)."
    )
    if disturbed(rates):
        text += (
            "  **The machine was not idle: rates are lower and latencies higher than on an "
            "idle machine; CPU per session is less affected.**"
        )
    return text + "\n"


def disturbed(rates: Sequence[Record]) -> bool:
    """Whether others took more than :data:`DISTURBED` of the CPUs on average."""
    if not rates:
        return False
    others = [r.values.get("other_busy", 0.0) + r.values.get("steal", 0.0) for r in rates]
    return sum(others) / len(others) > DISTURBED


def render(results: Results, plots: str, *, now: datetime.datetime | None = None) -> str:
    """The whole report; ``plots`` is the folder of the PNGs relative to the report."""
    when = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    quick = results.settings.get("plan", {}).get("quick", False)
    parts = [
        "# Benchmarks: starttls-proxy next to stunnel, nginx mail and the backends\n\n",
        f"Generated by `scripts/bench.sh` (`python -m bench{' --quick' if quick else ''}`) "
        f"on {when}. Do not edit: rerun.",
        " **Quick run**: short windows and few idle sessions; the full run gives the real figures."
        if quick
        else "",
        " **Other load disturbed this run** (see the last section)."
        if disturbed([r for r in results.records if r.workload == RATE and r.values])
        else "",
        f"\n\n## Goals of issue {ISSUE}\n\n",
        markdown_table(
            ["goal", "protocol", "key", "measured", "verdict", "margin"],
            [
                [
                    v.goal,
                    v.protocol.upper(),
                    KEY_LABELS.get(v.key_type, v.key_type),
                    v.measured,
                    v.status,
                    v.margin,
                ]
                for v in all_verdicts(results)
            ],
        ),
        "\n## Machine and software\n\n",
        markdown_table(["", ""], [[k, str(v)] for k, v in results.machine.items()]),
        "\n## Settings of this run\n\n",
        markdown_table(["", ""], [[k, str(v)] for k, v in results.settings.items()]),
        "\n",
        METHOD,
        "\n## 1. STARTTLS session rate\n\n",
    ]
    keys = results.key_types()
    for protocol in results.protocols(RATE):
        parts += [_rate_section(results, key, protocol) + "\n" for key in keys]
        parts.append(f"![{protocol} rate]({plots}/rate-{protocol}.png)\n\n")
    parts.append("## 2. Bulk throughput\n\n")
    parts += [_bulk_section(results, key) + "\n" for key in keys]
    parts.append("## 3. Idle capacity\n\n")
    for protocol in results.protocols(IDLE):
        parts += [_idle_section(results, key, protocol) + "\n" for key in keys]
        parts.append(f"![{protocol} memory]({plots}/memory-{protocol}.png)\n\n")
    parts.append("## 4. CPU per session\n\n")
    for protocol in results.protocols(RATE):
        parts += [_cpu_section(results, key, protocol) + "\n" for key in keys]
    parts += ["## The load generator\n\n", _generator_section(results)]
    return "".join(parts)


METHOD = """\
## How it was measured

- Every target runs on loopback with the same certificate (one run per key type), and
  the client forces TLS 1.3 and makes a full handshake every session (no resumption).
  Targets: **starttls-proxy** and **stunnel** (`protocol = smtp|imap|pop3`, server mode)
  and **nginx mail** (`starttls on`, `smtp_auth none`, `xclient off`, a local `auth_http`
  responder counted as part of it) in front of the plaintext backend; the backend doing
  **STARTTLS itself** (Postfix `smtpd_tls_security_level = may`, Dovecot `ssl = yes`);
  the **plaintext backend** as the floor (no TLS at all).
- The CPUs are split: servers (all targets and backends) on the first third (at least
  one CPU), the load generator on the others (pinned; `--no-pin` turns that off): a
  Python client spends more per TLS session than a C server.  The generator is several
  processes, each an asyncio (uvloop) client; it checks the certificate only in one
  preflight session per target, not under load.  Its own CPU use is in every table; a
  *saturation probe* runs the fastest TLS target at c=256 to see whether the generator
  can fill the server CPUs.
- **Session** (workload 1): connect, greeting, EHLO / CAPABILITY / CAPA, STARTTLS, TLS
  1.3 handshake, the same command inside TLS, QUIT / LOGOUT.  Latency runs from
  connect() to the QUIT reply.  nginx answers all of it itself (it calls auth_http and
  the backend only at RCPT TO or LOGIN); stunnel waits 200 ms for a client that speaks
  first before it relays the greeting (the *greeting p50* column shows it).
- **Bulk** (workload 2): one 100 MB message sent through SMTP DATA (timed from its
  first byte to the `250`, Postfix delivering it before the next transfer), one 100 MB
  message fetched over IMAP (from `FETCH` to its tagged `OK`).  After one untimed
  transfer (the first reads the message from disk), five rounds (quick: one) of one
  transfer per target, the order turned by one each round; the table shows each
  target's median, and the verdict compares starttls-proxy with stunnel round by round
  (the median of the rounds' ratios, and their range).  CPU is per transfer (for SMTP
  including the delivery).
- **CPU** (workload 4): user + system time from `/proc/PID/stat` of every process of the
  target (children reaped meanwhile included), over the measuring window, divided by
  the sessions completed.  *Terminator* = the target's own processes (for the backends
  doing TLS themselves, the backend's); *backend behind it* = the plaintext backend's.
  starttls-proxy's is split by process name (`/proc/PID/comm`): the *main process*
  (`starttls-proxy`, its own time only), the *TLS helper + workers* (`stp-helper`, its
  `stp-spare` and `stp-worker` children, and the workers it reaped), the *key server*
  (`stp-keyserver`) and the *keeper* (`stp-keeper`); *other* is what the main process
  reaped (nothing while it runs normally).  Values `main_cpu_ms`, `helper_cpu_ms`,
  `key_server_cpu_ms`, `keeper_cpu_ms`, `other_cpu_ms` in `results.json`; they add up
  to `cpu_ms`.
- **Memory** (workload 3): `/proc/PID/smaps_rollup` of every process of the target; USS
  = private clean + private dirty; *page tables* = `VmPTE` of `/proc/PID/status`
  (kernel memory, in neither).  Per session = (memory with N sessions held - memory
  before) ÷ N, summed over the target's processes.  *Main process* = the target's
  process holding the most descriptors (the proxy's or nginx's event loop, stunnel,
  the busiest Dovecot login process); its *USS KiB/session* is its part of the whole.
  Idle sessions are upgraded but not logged in; they are checked with a NOOP (POP3:
  CAPA) each before they are closed, except those older than 170 s (SMTP: 290 s):
  Dovecot ends sessions that have not logged in 180 s after they connected, Postfix
  after 300 s of silence, whoever terminates TLS in front of it (*unchecked*).  Sessions
  are opened in chunks (32 at a time per generator process) while at least a quarter of
  the memory (4 GiB or more) stays free, and for 150 s at most (IMAP, POP3; SMTP:
  270 s): a session the backend has ended looks held to the client but no longer costs
  memory, so every session measured must still be alive.
- **Timed opening** (workload 3, after its sessions are closed and the processes of
  the closed sessions have exited): 1,000 idle sessions (quick run: 200) opened 16 at a
  time, all generator processes together, from the first connect() to the last session
  upgraded (greeting, CAPABILITY, STARTTLS, handshake, CAPABILITY); each is then checked
  with a NOOP and closed.  Skipped if that many sessions, at the memory the held
  sessions cost, would eat into the reserve.
- **Ratios**: each figure of starttls-proxy divided by the same figure of each peer in
  the same run.  `≥` marks rates where the generator, not the target, was the limit.
"""


def write_report(results: Results, out: Path) -> None:
    """Write ``out`` (Markdown), and the PNGs and ``results.json`` into ``out`` minus ``.md``."""
    from bench.history import before_after_section
    from bench.plots import memory_plot, rate_plot

    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    results.save(folder / "results.json")
    for protocol in results.protocols(RATE):
        rate_plot(results, protocol, folder / f"rate-{protocol}.png")
    for protocol in results.protocols(IDLE):
        memory_plot(results, protocol, folder / f"memory-{protocol}.png")
    report = render(results, folder.name)
    before, changes = folder / "before.json", folder / "before.md"
    if before.exists() and changes.exists():
        report += "\n" + before_after_section(Results.load(before), results, changes.read_text())
    out.write_text(report)
