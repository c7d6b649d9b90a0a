"""Coverage-guided fuzzing of the protocol machines, on demand.

    python -m tests.fuzz --minutes 10            # all targets, time shared
    python -m tests.fuzz --runs 20000 smtp imap  # a fixed number of inputs
    python -m tests.fuzz --write-seeds           # rewrite tests/fuzz/corpus
    python -m tests.fuzz --minutes 10 --report   # and put the figures in docs/robustness.md

Each target runs under atheris (libFuzzer) in a process of its own, from
the committed corpus; new inputs go to a scratch directory (``--keep DIR``
keeps them), never into the committed corpus. Printed per target: inputs
executed, libFuzzer's edge coverage of ``protocols/``, and the line coverage
of ``protocols/`` that replaying the final corpus gives. A crash (an
invariant broken, an exception, a hang past 10 s) leaves libFuzzer's
``crash-``/``timeout-`` file in the scratch directory and makes the exit
status non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
PROTOCOLS = ROOT / "protocols"


def corpus_dir(name: str) -> Path:
    return CORPUS / name


def write_seeds() -> None:
    from tests.fuzz.targets import TARGETS, seeds

    for name in TARGETS:
        directory = corpus_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        for program in seeds(name):
            digest = hashlib.sha1(program).hexdigest()[:16]
            (directory / f"seed-{digest}").write_bytes(program)


def write_dictionary(name: str, path: Path) -> None:
    from tests.fuzz.targets import dictionary

    lines = [
        '"{}"'.format("".join(f"\\x{octet:02x}" for octet in word)) for word in dictionary(name)
    ]
    path.write_text("\n".join(lines) + "\n")


def fuzz(name: str, scratch: Path, *, seconds: int | None, runs: int | None) -> dict[str, str]:
    """Run one target; its figures, or ``crash`` naming the artifact."""
    work = scratch / name
    work.mkdir(parents=True, exist_ok=True)
    words = scratch / f"{name}.dict"
    write_dictionary(name, words)
    options = [
        f"-dict={words}",
        f"-artifact_prefix={work}/",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-max_len=4096",
        "-print_final_stats=1",
    ]
    if seconds is not None:
        options.append(f"-max_total_time={seconds}")
    if runs is not None:
        options.append(f"-runs={runs}")
    command = [sys.executable, "-m", "tests.fuzz.atheris_main", name, *options]
    started = time.monotonic()
    done = subprocess.run(
        [*command, str(work), str(corpus_dir(name))],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )
    figures = {"seconds": f"{time.monotonic() - started:.0f}"}
    executed = re.findall(r"stat::number_of_executed_units: (\d+)", done.stderr)
    figures["executions"] = executed[-1] if executed else "?"
    progress = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", done.stderr)
    if progress:
        figures["edges"], figures["features"], figures["corpus"] = progress[-1]
    if done.returncode != 0:
        artifacts = sorted(str(path) for path in work.glob("*-*") if path.is_file())
        figures["crash"] = " ".join(artifacts) or "(no artifact)"
        figures["log"] = done.stderr[-4000:]
    return figures


def line_coverage(name: str, directories: list[Path]) -> tuple[int, int]:
    """Lines of ``protocols/`` run by replaying every input of
    ``directories``, and lines there are (of the modules the target runs)."""
    from tests.fuzz.targets import TARGETS

    target = TARGETS[name]
    hit: set[tuple[str, int]] = set()
    prefix = str(PROTOCOLS) + os.sep

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        filename = frame.f_code.co_filename
        if not filename.startswith(prefix):
            return None
        if event == "line":
            hit.add((filename, frame.f_lineno))
        return tracer

    sys.settrace(tracer)
    try:
        for directory in directories:
            for path in sorted(directory.iterdir()):
                if path.is_file() and not path.name.startswith(("crash-", "timeout-", "oom-")):
                    target(path.read_bytes())
    finally:
        sys.settrace(None)
    files = {filename for filename, _ in hit}
    total = sum(len(_lines(Path(filename))) for filename in files)
    return len(hit), total


def _lines(path: Path) -> set[int]:
    """The line numbers that carry code in ``path``."""
    lines: set[int] = set()
    stack = [compile(path.read_text(), str(path), "exec")]
    while stack:
        code = stack.pop()
        lines.update(line for _, _, line in code.co_lines() if line is not None)
        stack.extend(const for const in code.co_consts if hasattr(const, "co_lines"))
    return lines


def main() -> int:
    from tests.fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("targets", nargs="*", help=f"some of: {', '.join(TARGETS)}")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="total time, shared by the targets")
    budget.add_argument("--runs", type=int, help="inputs per target")
    parser.add_argument("--keep", type=Path, help="keep the new inputs in this directory")
    parser.add_argument("--write-seeds", action="store_true", help="rewrite the seed corpus")
    parser.add_argument(
        "--report", action="store_true", help="write the figures into docs/robustness.md"
    )
    args = parser.parse_args()
    if args.write_seeds:
        write_seeds()
        return 0
    names = args.targets or list(TARGETS)
    unknown = set(names) - set(TARGETS)
    if unknown:
        parser.error(f"no such target: {', '.join(sorted(unknown))}")
    seconds = None
    if args.runs is None:
        seconds = max(1, int((args.minutes or 1) * 60 / len(names)))
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="fuzz-"))
    failed = False
    rows: list[dict[str, object]] = []
    print(
        f"{'target':<13} {'executions':>10} {'edges':>6} {'features':>8} {'corpus':>6} "
        f"{'lines':>11} {'seconds':>7}"
    )
    for name in names:
        figures = fuzz(name, scratch, seconds=seconds, runs=args.runs)
        hit, total = line_coverage(name, [scratch / name, corpus_dir(name)])
        lines = f"{hit}/{total}"
        print(
            f"{name:<13} {figures['executions']:>10} {figures.get('edges', '?'):>6} "
            f"{figures.get('features', '?'):>8} {figures.get('corpus', '?'):>6} {lines:>11} "
            f"{figures['seconds']:>7}",
            flush=True,
        )
        rows.append(
            {
                "target": name,
                **{key: figures.get(key, "?") for key in ("executions", "edges", "features")},
                "corpus": figures.get("corpus", "?"),
                "lines": lines,
            }
        )
        if "crash" in figures:
            failed = True
            print(f"  CRASH: {figures['crash']}\n{figures['log']}", flush=True)
    print(f"new inputs in {scratch}")
    if args.report:
        _report(rows, args.minutes or 0, crashes=sum(1 for _ in scratch.rglob("crash-*")))
    return 1 if failed else 0


def _report(rows: list[dict[str, object]], minutes: float, crashes: int) -> None:
    from bench.robustness import record

    print(record("fuzz", {"minutes": minutes, "crashes": crashes, "targets": rows}))


if __name__ == "__main__":
    sys.exit(main())
