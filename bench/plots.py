"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

# Agg before pyplot is imported: the suite runs without a display.
matplotlib.use("Agg")

import matplotlib.pyplot as plt

from bench.results import IDLE_CURVE, RATE, Results
from bench.stats import mib
from bench.targets import TARGET_NAMES, target_label

KEY_LABELS = {"ecdsa": "ECDSA P-256", "rsa": "RSA-2048"}


def rate_plot(results: Results, protocol: str, path: Path) -> None:
    """Sessions/s against concurrency, one line per target, one panel per key type."""
    keys = results.key_types()
    figure, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        for target in TARGET_NAMES:
            points = [
                (r.param, r.values["sessions_per_s"])
                for r in results.records
                if (r.workload, r.key_type, r.protocol, r.target) == (RATE, key, protocol, target)
                and "sessions_per_s" in r.values
            ]
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                axis.plot(xs, ys, marker="o", label=target_label(target, protocol))
        axis.set_xscale("log", base=2)
        concurrencies = results.params(RATE)
        axis.set_xticks(concurrencies, labels=[str(c) for c in concurrencies])
        axis.set_yscale("log")
        axis.set_xlabel("concurrent sessions")
        axis.set_ylabel("sessions/s")
        axis.set_title(f"{protocol.upper()} STARTTLS sessions, {KEY_LABELS.get(key, key)}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def memory_plot(results: Results, protocol: str, path: Path) -> None:
    """Terminator USS (solid) and terminator + backend USS (dashed) against sessions held."""
    keys = results.key_types()
    figure, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        for target in TARGET_NAMES:
            points = sorted(
                (r.param, r.values)
                for r in results.records
                if (r.workload, r.key_type, r.protocol, r.target)
                == (IDLE_CURVE, key, protocol, target)
            )
            if not points:
                continue
            xs = [held for held, _ in points]
            label = target_label(target, protocol)
            (line,) = axis.plot(xs, [mib(v["uss"]) for _, v in points], marker="o", label=label)
            if any(v["backend_uss"] for _, v in points):
                axis.plot(
                    xs,
                    [mib(v["uss"] + v["backend_uss"]) for _, v in points],
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{label} + backend",
                )
        axis.set_yscale("log")
        axis.set_xlabel("idle upgraded sessions held")
        axis.set_ylabel("USS of all processes (MiB)")
        axis.set_title(f"{protocol.upper()} idle sessions, {KEY_LABELS.get(key, key)}")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
