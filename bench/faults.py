"""``python -m bench.faults``: a mixed load with faults injected into it.

Runs ``--sessions`` sessions (SMTP with DATA, IMAP FETCH, POP3 RETR, XMPP
messages; ``bench.mixed``) through the proxy, ``--concurrency`` at a time,
and while they run kills random TLS workers, the TLS helper and the key
server with SIGKILL, restarts Postfix, fills the disk of Postfix's queue
(a small tmpfs) and stops Dovecot for a while (a backend that answers
slowly). Then it reports, per fault, the sessions that failed against the
sessions it touched (only those may fail, each with its protocol's own
error, never a hang), the time until sessions succeeded again, and after the
run: zombies, descriptors and memory of the proxy's processes. The figures
go to docs/robustness.md (``bench.robustness``). Needs root, like the tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.mixed import (
    PROTOCOLS,
    Outcome,
    Stack,
    delivered_tokens,
    run_session,
    running_stack,
    source_addresses,
)
from bench.procfs import fd_count, status_kb, tree
from bench.robustness import record
from tests.realservers.daemons import kill
from tests.realservers.net import free_port

#: The queue's tmpfs; Postfix refuses mail below 1.5 x message_size_limit free.
QUEUE_TMPFS_MIB = 64
#: How long the slow backend stays stopped, seconds.
STALL_SECONDS = 3.0


@dataclass
class Fault:
    name: str
    #: The protocols whose sessions it can touch.
    protocols: tuple[str, ...]
    inject: Callable[[Stack], None]
    #: Undoes the fault (None: it undoes itself, like a killed process restarted).
    restore: Callable[[Stack], None] | None = None
    injected: float = 0.0
    restored: float = 0.0


@dataclass
class FaultFigures:
    name: str
    touched: int
    failed_touched: int
    failed_untouched: int
    outcomes_touched: dict[str, int] = field(default_factory=dict)
    seconds_to_recover: float | None = None


def _proxy_pids(stack: Stack, name: str) -> list[int]:
    return [p.pid for p in tree([stack.proxy.process.pid]) if p.comm == name]


def _kill_workers(stack: Stack) -> None:
    workers = _proxy_pids(stack, "stp-worker")
    for pid in random.sample(workers, min(3, len(workers))):
        kill(pid, signal.SIGKILL, group=False)


def _kill_named(name: str) -> Callable[[Stack], None]:
    def inject(stack: Stack) -> None:
        for pid in _proxy_pids(stack, name):
            kill(pid, signal.SIGKILL, group=False)

    return inject


def _fill_queue(stack: Stack) -> None:
    filler = stack.postfix.directory / "queue" / "filler"
    subprocess.run(["fallocate", "-l", f"{QUEUE_TMPFS_MIB - 8}M", str(filler)], check=True)


def _empty_queue(stack: Stack) -> None:
    (stack.postfix.directory / "queue" / "filler").unlink()


def _stop(stack: Stack) -> None:
    master = stack.dovecot.master_pid()
    assert master is not None
    kill(os.getpgid(master), signal.SIGSTOP, group=True)


def _continue(stack: Stack) -> None:
    time.sleep(STALL_SECONDS)
    master = stack.dovecot.master_pid()
    assert master is not None
    kill(os.getpgid(master), signal.SIGCONT, group=True)


#: Every session upgrades, so a TLS process's death can touch any of them.
TLS_PROTOCOLS = PROTOCOLS


def faults() -> list[Fault]:
    return [
        Fault("SIGKILL to 3 TLS workers", TLS_PROTOCOLS, _kill_workers),
        Fault("SIGKILL to the TLS helper", TLS_PROTOCOLS, _kill_named("stp-helper")),
        Fault("SIGKILL to the key server", TLS_PROTOCOLS, _kill_named("stp-keyserver")),
        Fault("Postfix restarted", ("smtp",), lambda stack: stack.postfix.restart()),
        Fault("Postfix queue disk full", ("smtp",), _fill_queue, _empty_queue),
        Fault("Dovecot stopped 3 s (slow backend)", ("imap", "pop3"), _stop, _continue),
    ]


def _snapshot(stack: Stack) -> dict[str, object]:
    """Zombies, descriptors and memory of the proxy's processes now."""
    processes = tree([stack.proxy.process.pid], zombies=True)
    main = stack.proxy.process.pid
    return {
        "processes": sum(1 for p in processes if p.state != "Z"),
        "zombies": sum(1 for p in processes if p.state == "Z"),
        # Workers come and go; the long-lived processes must not leak.
        "descriptors": {
            p.comm: fd_count(p.pid) for p in processes if p.comm not in ("stp-worker", "stp-spare")
        },
        "main_rss_kib": status_kb(main, "VmRSS") // 1024,
    }


def run(sessions: int, concurrency: int, base: Path) -> dict[str, object]:
    queue = base / "postfix" / "queue"
    queue.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={QUEUE_TMPFS_MIB}m,mode=755", "tmpfs", str(queue)],
        check=True,
    )
    try:
        with running_stack(base, free_port()) as stack:
            return _under_faults(stack, sessions, concurrency)
    finally:
        subprocess.run(["umount", "--lazy", str(queue)], check=False)


def _under_faults(stack: Stack, sessions: int, concurrency: int) -> dict[str, object]:
    sources = source_addresses()
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    plan = faults()
    # Warm-up: every protocol once, and the state to compare with afterwards.
    for protocol in PROTOCOLS:
        assert run_session(stack, protocol, next(sources)).kind == "ok"
    before = _snapshot(stack)

    def one(index: int) -> None:
        protocol = PROTOCOLS[index % len(PROTOCOLS)]
        with lock:
            source = next(sources)
        outcome = run_session(stack, protocol, source)
        with lock:
            outcomes.append(outcome)

    def saboteur() -> None:
        for number, fault in enumerate(plan, start=1):
            while len(outcomes) < sessions * number // (len(plan) + 1):
                time.sleep(0.05)
            fault.injected = time.monotonic()
            fault.inject(stack)
            if fault.restore is not None:
                fault.restore(stack)
            fault.restored = time.monotonic()

    started = time.monotonic()
    sabotage = threading.Thread(target=saboteur)
    sabotage.start()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(sessions)))
    sabotage.join()
    elapsed = time.monotonic() - started
    time.sleep(2)  # the last deliveries and exits
    after = _snapshot(stack)
    deliveries = delivered_tokens(stack.postfix)
    return {
        "sessions": sessions,
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        "outcomes": dict(Counter(o.kind for o in outcomes)),
        "faults": [asdict(_figures(fault, outcomes, plan)) for fault in plan],
        "smtp": _smtp_figures(outcomes, deliveries),
        "failures_untouched": [
            asdict(o) for o in outcomes if o.kind != "ok" and not _touched_by_any(o, plan)
        ][:20],
        "before": before,
        "after": after,
    }


def _touches(fault: Fault, outcome: Outcome, recovered: float) -> bool:
    return (
        outcome.protocol in fault.protocols
        and outcome.started <= recovered
        and (outcome.ended >= fault.injected)
    )


def _recovery(fault: Fault, outcomes: list[Outcome]) -> float:
    """When the first session of the fault's protocols that started after it ended ok."""
    later = [
        o.ended
        for o in outcomes
        if o.protocol in fault.protocols and o.started >= fault.restored and o.kind == "ok"
    ]
    return min(later, default=fault.restored)


def _touched_by_any(outcome: Outcome, plan: list[Fault]) -> bool:
    return any(_touches(f, outcome, _recovery(f, [])) for f in plan)


def _figures(fault: Fault, outcomes: list[Outcome], plan: list[Fault]) -> FaultFigures:
    recovered = _recovery(fault, outcomes)
    touched = [o for o in outcomes if _touches(fault, o, recovered)]
    untouched = [o for o in outcomes if not _touched_by_any(o, plan)]
    return FaultFigures(
        name=fault.name,
        touched=len(touched),
        failed_touched=sum(1 for o in touched if o.kind != "ok"),
        failed_untouched=sum(1 for o in untouched if o.kind != "ok"),
        outcomes_touched=dict(Counter(o.kind for o in touched)),
        seconds_to_recover=round(recovered - fault.restored, 2),
    )


def _smtp_figures(outcomes: list[Outcome], deliveries: dict[str, int]) -> dict[str, int]:
    sent = [o for o in outcomes if o.protocol == "smtp"]
    return {
        "accepted": sum(1 for o in sent if o.kind == "ok"),
        "accepted_delivered_once": sum(
            1 for o in sent if o.kind == "ok" and deliveries.get(o.token) == 1
        ),
        "refused_delivered": sum(1 for o in sent if o.kind == "refused" and o.token in deliveries),
        "delivered_twice": sum(1 for count in deliveries.values() if count > 1),
        "corrupt": sum(1 for key in deliveries if key.startswith("corrupt:")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--keep", type=Path, help="run in this directory and keep the logs")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as cleanup:
        base = args.keep or Path(cleanup.enter_context(tempfile.TemporaryDirectory()))
        figures = run(args.sessions, args.concurrency, base)
    print(record("faults", figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
