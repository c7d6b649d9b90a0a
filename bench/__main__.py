"""``python -m bench``: measure starttls-proxy next to stunnel, nginx mail and the backends.

Starts every target on loopback (needs root, like the real-server tests), runs the
workloads of :mod:`bench.workloads` for each certificate key type, and writes the
report (Markdown, PNG plots, the raw results as JSON).  ``scripts/bench.sh`` installs
what is missing and runs this.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import trustme

from bench.clients import make_message
from bench.loadgen import LoadGenerator
from bench.machine import describe
from bench.procfs import raise_fd_limit
from bench.report import write_report
from bench.results import BULK, IDLE, IDLE_CURVE, RATE, SATURATION, Record, Results
from bench.targets import (
    ALL_PROTOCOLS,
    KEY_TYPES,
    TARGET_IDS,
    Run,
    Settings,
    Target,
    start_run,
)
from bench.workloads import (
    FULL,
    QUICK,
    Bench,
    Plan,
    check,
    measure_bulk,
    measure_idle,
    measure_rate,
    place_imap_message,
    saturation_probe,
)
from protocols.registry import PROTOCOLS

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = (RATE, BULK, IDLE)
BULK_PROTOCOLS = ("smtp", "imap")
#: Preference for the idle workload: IMAP as the issue asks, else what the proxy has.
IDLE_PREFERENCE = ("imap", "pop3", "smtp")


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items

    return parse


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure starttls-proxy next to stunnel, nginx mail and the backends.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs (under two minutes)")
    parser.add_argument(
        "--out",
        type=Path,
        help="report path (default: docs/benchmarks.md, with --quick build/bench/benchmarks.md);"
        " plots and results.json go into a folder of the same name without .md",
    )
    parser.add_argument("--render", type=Path, help="only re-render the report from a results.json")
    parser.add_argument(
        "--update",
        action="store_true",
        help="measure only --workloads and keep the other workloads' figures from the"
        " results.json of the existing report",
    )
    for option, choices in (
        ("--protocols", ALL_PROTOCOLS),
        ("--targets", tuple(TARGET_IDS)),
        ("--workloads", WORKLOADS),
    ):
        parser.add_argument(
            option,
            type=_csv(choices),
            default=list(choices),
            help=f"comma-separated, of {','.join(choices)} (default: all)",
        )
    parser.add_argument(
        "--key-types",
        type=_csv(tuple(KEY_TYPES)),
        help="certificate key types (default: ecdsa,rsa; with --quick: ecdsa)",
    )
    parser.add_argument("--idle-sessions", type=int, help="sessions held by the idle workload")
    parser.add_argument(
        "--generator-processes", type=int, help="load generator processes (default: 2 or more)"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not split the CPUs between servers and generator"
    )
    parser.add_argument(
        "--proxy-instances",
        type=int,
        default=1,
        help="starttls-proxy instances sharing each port (listeners' reuse_port; default 1)",
    )
    return parser.parse_args(argv)


def _split_cpus(pin: bool) -> tuple[frozenset[int], frozenset[int]]:
    """(server CPUs, generator CPUs) out of this process's CPUs; empty = no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return frozenset(), frozenset()
    # A Python client spends two to three times what a C server spends per TLS session:
    # the generator gets the larger share.
    servers = max(1, len(cpus) // 3)
    return frozenset(cpus[:servers]), frozenset(cpus[servers:])


def _idle_protocol(protocols: list[str]) -> str:
    for protocol in IDLE_PREFERENCE:
        if protocol in protocols and protocol in PROTOCOLS:
            return protocol
    return next(p for p in IDLE_PREFERENCE if p in protocols)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _missing(
    workload: str, run: Run, protocol: str, target: str, params: list[int], note: str
) -> list[Record]:
    return [Record(workload, run.key_type, protocol, target, param, note=note) for param in params]


def _measure_run(bench: Bench, args: argparse.Namespace, idle_protocol: str) -> list[Record]:
    run, plan = bench.run, bench.plan
    plans = {
        RATE: (list(args.protocols), list(plan.concurrencies)),
        BULK: ([p for p in BULK_PROTOCOLS if p in args.protocols], [plan.bulk_size]),
        IDLE: ([idle_protocol], [plan.idle_levels[-1]]),
    }
    if BULK in args.workloads and "imap" in args.protocols and run.dovecot is not None:
        place_imap_message(run.dovecot.mailbox_path("bob"), make_message(plan.bulk_size))
    records: list[Record] = []
    failed: dict[tuple[str, str], str] = {}
    for workload in (w for w in WORKLOADS if w in args.workloads):
        protocols, params = plans[workload]
        for protocol in protocols:
            # Bulk transfers take turns between the targets (measure_bulk).
            interleaved: list[Target] = []
            for name in (TARGET_IDS[target_id] for target_id in args.targets):
                target = run.targets[name]
                note = target.missing.get(protocol) or failed.get((name, protocol))
                if note is None and (name, protocol) not in failed:
                    note = check(bench, target, protocol)
                    failed[(name, protocol)] = note or ""
                if note:
                    records += _missing(workload, run, protocol, name, params, note)
                    _say(f"  {workload} {protocol} {name}: {note}")
                elif workload == RATE:
                    records += measure_rate(bench, target, protocol)
                elif workload == BULK:
                    interleaved.append(target)
                else:
                    records += measure_idle(bench, target, protocol)
            if interleaved:
                records += measure_bulk(bench, interleaved, protocol)
        if workload == RATE:
            probe = saturation_probe(bench, records)
            records += [probe] if probe else []
    return records


def _plan(args: argparse.Namespace) -> Plan:
    """The quick or full plan, its idle steps scaled to ``--idle-sessions``."""
    plan = QUICK if args.quick else FULL
    if not args.idle_sessions:
        return plan
    scale = args.idle_sessions / plan.idle_levels[-1]
    steps = {max(1, round(level * scale)) for level in plan.idle_levels}
    return dataclasses.replace(plan, idle_levels=tuple(sorted(steps)))


def _workload(record: Record) -> str:
    """The workload that produced ``record`` (the probe and the curve belong to one)."""
    return {SATURATION: RATE, IDLE_CURVE: IDLE}.get(record.workload, record.workload)


def _kept_records(out: Path, args: argparse.Namespace) -> list[Record]:
    """With ``--update``: the existing report's records of the workloads not run now."""
    path = out.with_suffix("") / "results.json"
    if not path.exists():
        raise SystemExit(f"--update: {path} does not exist")
    previous = Results.load(path)
    return [r for r in previous.records if _workload(r) not in args.workloads]


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    default_out = ROOT / ("build/bench/benchmarks.md" if args.quick else "docs/benchmarks.md")
    out: Path = args.out or default_out
    if args.render:
        write_report(Results.load(args.render), out)
        return 0
    if os.geteuid() != 0:
        _say("python -m bench must run as root (it starts Postfix, Dovecot, nginx, stunnel)")
        return 2
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    plan = _plan(args)
    key_types: list[str] = args.key_types or (["ecdsa"] if args.quick else list(KEY_TYPES))
    fd_limit = raise_fd_limit()
    server_cpus, generator_cpus = _split_cpus(not args.no_pin)
    cpu_count = len(os.sched_getaffinity(0))
    processes = args.generator_processes or max(2, len(generator_cpus))
    idle_protocol = _idle_protocol(args.protocols)
    settings = Settings(
        max_sessions=plan.idle_levels[-1] + 1000,
        message_size=plan.bulk_size,
        smtpd_processes=max(200, plan.idle_levels[-1] + 100) if idle_protocol == "smtp" else 200,
        proxy_instances=args.proxy_instances,
    )
    results = Results(
        machine=describe(ROOT),
        settings={
            "plan": dataclasses.asdict(plan),
            "server CPUs": sorted(server_cpus) or "all",
            "generator CPUs": sorted(generator_cpus) or "all",
            "generator processes": processes,
            "descriptor limit": fd_limit,
            "proxy instances": args.proxy_instances,
            "idle protocol": idle_protocol,
            "proxy protocols": sorted(PROTOCOLS),
        },
    )
    results.settings["started"] = time.strftime("%Y-%m-%d %H:%M %Z")
    kept = _kept_records(out, args) if args.update else []
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="starttls-bench-"))
    base.chmod(0o755)
    try:
        if generator_cpus:
            os.sched_setaffinity(0, generator_cpus)
        ca = trustme.CA()
        with LoadGenerator(processes, generator_cpus) as generator:
            for key_type in key_types:
                _say(f"{key_type}: starting the targets")
                with contextlib.ExitStack() as stack:
                    run = start_run(
                        stack, base, ca, key_type, args.protocols, settings, server_cpus
                    )
                    bench = Bench(
                        run=run,
                        generator=generator,
                        plan=plan,
                        server_cpus=len(server_cpus) or cpu_count,
                        generator_cpus=len(generator_cpus) or cpu_count,
                        all_cpus=os.cpu_count() or cpu_count,
                        say=_say,
                    )
                    results.records += _measure_run(bench, args, idle_protocol)
                    _say(f"{key_type}: stopping the targets")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results.settings["duration (s)"] = round(time.monotonic() - started, 1)
    if kept:
        results.records = kept + results.records
        results.settings["kept from an earlier run"] = sorted({_workload(r) for r in kept})
    write_report(results, out)
    _say(f"wrote {out} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
