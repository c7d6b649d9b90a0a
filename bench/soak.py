"""``python -m bench.soak``: many checked sessions of every protocol, and
the proxy's memory over them.

``--sessions`` sessions per protocol (``bench.mixed``: SMTP messages
checked in the Maildir, IMAP and POP3 bodies and XMPP messages compared),
``--concurrency`` at a time. Every second the resident memory of the
proxy's long-lived processes (main, keeper, TLS helper, key server) is
sampled; the report gives p50/p99 session times per protocol and each
process's memory slope over the second half of the run (a leak shows as a
slope that does not flatten), with a plot. Figures go to
docs/robustness.md (``bench.robustness``). Needs root, like the tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.mixed import (
    PROTOCOLS,
    Outcome,
    delivered_tokens,
    run_session,
    running_stack,
    source_addresses,
)
from bench.procfs import status_kb, tree
from bench.robustness import DOCS, record
from tests.realservers.net import free_port

#: The processes that live as long as the proxy (workers come and go).
LONG_LIVED = ("starttls-proxy", "stp-keeper", "stp-helper", "stp-keyserver")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0


def run(per_protocol: int, concurrency: int, base: Path) -> dict[str, object]:
    with running_stack(base, free_port()) as stack:
        sources = source_addresses()
        lock = threading.Lock()
        outcomes: list[Outcome] = []
        samples: list[tuple[int, dict[str, int]]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(1.0):
                main = stack.proxy.process.pid
                processes = tree([main])
                keepers = {p.pid for p in processes if p.ppid == main}
                # Main, the keeper and the keeper's children: a worker is
                # the helper's child, and called stp-helper until it renames.
                rss = {
                    p.comm: status_kb(p.pid, "VmRSS") // 1024
                    for p in processes
                    if p.pid == main or p.ppid == main or p.ppid in keepers
                }
                samples.append((len(outcomes), {name: rss.get(name, 0) for name in LONG_LIVED}))

        def one(index: int) -> None:
            with lock:
                source = next(sources)
            outcome = run_session(stack, PROTOCOLS[index % len(PROTOCOLS)], source)
            with lock:
                outcomes.append(outcome)

        sampler = threading.Thread(target=sample)
        started = time.monotonic()
        sampler.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(per_protocol * len(PROTOCOLS))))
        finally:
            done.set()
            sampler.join()
        elapsed = time.monotonic() - started
        time.sleep(2)  # the last deliveries
        deliveries = delivered_tokens(stack.postfix)
    smtp = [o for o in outcomes if o.protocol == "smtp"]
    second_half = samples[len(samples) // 2 :]
    return {
        "sessions_per_protocol": per_protocol,
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        "protocols": {
            protocol: {
                "sessions": len(mine := [o for o in outcomes if o.protocol == protocol]),
                "outcomes": dict(Counter(o.kind for o in mine)),
                "p50_ms": round(_percentile([o.ended - o.started for o in mine], 0.5) * 1000, 1),
                "p99_ms": round(_percentile([o.ended - o.started for o in mine], 0.99) * 1000, 1),
            }
            for protocol in PROTOCOLS
        },
        "smtp": {
            "accepted": sum(1 for o in smtp if o.kind == "ok"),
            "accepted_delivered_once": sum(
                1 for o in smtp if o.kind == "ok" and deliveries.get(o.token) == 1
            ),
            "delivered_twice": sum(1 for count in deliveries.values() if count > 1),
            "corrupt": sum(1 for key in deliveries if key.startswith("corrupt:")),
        },
        "memory": {
            name: {
                "first_kib": samples[0][1][name] if samples else 0,
                "last_kib": samples[-1][1][name] if samples else 0,
                "slope_kib_per_1000_sessions": round(
                    1000 * _slope([(done_, rss[name]) for done_, rss in second_half]), 1
                ),
            }
            for name in LONG_LIVED
        },
        "samples": samples,
    }


def _plot(figures: dict[str, object], path: Path) -> None:
    """RSS of each long-lived process over the sessions done, if matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return
    samples = figures["samples"]
    assert isinstance(samples, list)
    figure, axes = pyplot.subplots(figsize=(8, 4))
    for name in LONG_LIVED:
        axes.plot(
            [done for done, _ in samples], [rss[name] / 1024 for _, rss in samples], label=name
        )
    axes.set_xlabel("sessions done")
    axes.set_ylabel("RSS, MiB")
    axes.set_title("starttls-proxy's long-lived processes over the soak")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--sessions", type=int, default=10_000, help="per protocol")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        figures = run(args.sessions, args.concurrency, Path(directory))
    _plot(figures, DOCS / "soak-rss.png")
    print(record("soak", figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
