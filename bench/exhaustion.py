"""``python -m bench.exhaustion``: what holding the proxy's slots costs an
attacker and the proxy, and what a legitimate client sees meanwhile.

Against the SMTP listener of the ``bench.mixed`` stack (the real Postfix
behind), with short deadlines so that the run is quick (the defaults are
60 s for the pre-TLS phase and a command, 30 s for a handshake; the costs
per connection do not depend on them), four attacks in turn, each from
``--connections`` connections spread over many source addresses:

* a flood past ``max_connections``, each connection silent before TLS;
* slowloris before TLS: one byte a second, never a whole command;
* slowloris inside TLS: the same after the handshake;
* stalled handshakes: STARTTLS, then nothing (each holds a TLS worker).

Per attack: connections refused, the proxy's extra memory per held
connection (USS and PSS of all its processes, page tables beside) and extra
processes, the seconds until the proxy cut the last one; and the session
times of a legitimate client that keeps delivering mail meanwhile (or how
it was refused). Figures go to docs/robustness.md (``bench.robustness``).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.mixed import Stack, run_session, running_stack, source_addresses
from bench.procfs import total_memory, tree_memory
from bench.robustness import record
from tests.realservers.net import free_port

#: The listener's limits and deadlines for the run, seconds.
MAX_CONNECTIONS = 300
DEADLINE = 10
HANDSHAKE_DEADLINE = 10
#: How long the attack connections are given to be cut, after the deadline.
GRACE = 15

Opener = Callable[[Stack, str], socket.socket]


def _connected(stack: Stack, source: str) -> socket.socket:
    sock = stack.proxy.connect("smtp", source)
    if not sock.recv(4096).startswith(b"220 "):  # the busy reply instead of a greeting
        sock.close()
        raise ConnectionRefusedError("refused")
    return sock


def _upgraded(stack: Stack, source: str) -> socket.socket:
    sock = _connected(stack, source)
    sock.sendall(b"STARTTLS\r\n")
    sock.recv(4096)
    tls = stack.certs.client_context().wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"EHLO attacker.test\r\n")
    tls.recv(4096)
    return tls


def _stalled(stack: Stack, source: str) -> socket.socket:
    sock = _connected(stack, source)
    sock.sendall(b"STARTTLS\r\n")
    sock.recv(4096)
    return sock  # and no ClientHello


ATTACKS: dict[str, tuple[Opener, bool]] = {
    "flood past max_connections (silent before TLS)": (_connected, False),
    "slowloris before TLS (a byte a second)": (_connected, True),
    "slowloris inside TLS (a byte a second)": (_upgraded, True),
    "stalled handshakes (STARTTLS, then nothing)": (_stalled, False),
}


def _attack(stack: Stack, name: str, count: int, sources: Iterator[str]) -> dict[str, object]:
    opener, dribble = ATTACKS[name]
    before = total_memory(tree_memory([stack.proxy.process.pid]))
    held, refused = [], 0
    for _ in range(count):
        try:
            held.append(opener(stack, next(sources)))
        except (OSError, ssl.SSLError):
            refused += 1
    started = time.monotonic()
    time.sleep(1)
    during = total_memory(tree_memory([stack.proxy.process.pid]))
    legit: list[float] = []
    refusals: list[str] = []
    stop = threading.Event()

    def legitimate() -> None:
        while not stop.is_set():
            outcome = run_session(stack, "smtp", next(sources))
            if outcome.kind == "ok":
                legit.append(outcome.ended - outcome.started)
            else:
                refusals.append(
                    f"{outcome.kind}: {outcome.detail[:80]}"
                    if outcome.kind != "refused"
                    else outcome.detail[:80]
                )
            time.sleep(0.5)

    client = threading.Thread(target=legitimate)
    client.start()
    open_ = list(held)
    cut_after = None
    while open_ and time.monotonic() - started < DEADLINE + GRACE:
        still = []
        for sock in open_:
            try:
                if dribble:
                    sock.send(b"N")
                sock.setblocking(False)
                try:
                    if sock.recv(4096) == b"":
                        raise ConnectionError
                except (BlockingIOError, ssl.SSLWantReadError):
                    pass
                finally:
                    sock.setblocking(True)
                still.append(sock)
            except (OSError, ssl.SSLError, ConnectionError):
                sock.close()
        open_ = still
        if not open_:
            cut_after = time.monotonic() - started
        time.sleep(1)
    stop.set()
    client.join()
    for sock in open_:
        sock.close()
    extra = during - before
    holding = max(1, len(held))
    return {
        "attack": name,
        "connections": count,
        "held": len(held),
        "refused": refused,
        "uss_kib_per_connection": round(extra.uss / holding / 1024, 1),
        "pss_kib_per_connection": round(extra.pss / holding / 1024, 1),
        "pte_kib_per_connection": round(extra.pte / holding / 1024, 1),
        "extra_processes": extra.processes,
        "all_cut_after_s": None if cut_after is None else round(cut_after, 1),
        "still_open": len(open_),
        "legitimate_sessions": len(legit),
        "legitimate_max_ms": round(max(legit, default=0) * 1000, 1),
        "legitimate_refused": len(refusals),
        "legitimate_refusal": refusals[0] if refusals else "",
    }


def run(connections: int, base: Path) -> dict[str, object]:
    limits = {"max_connections": MAX_CONNECTIONS}
    timeouts = {"pre_tls": DEADLINE, "command": DEADLINE, "handshake": HANDSHAKE_DEADLINE}
    options = {"limits": limits, "timeouts": timeouts}
    with running_stack(base, free_port(), listener_options=options) as stack:
        sources = source_addresses()
        results = [_attack(stack, name, connections, sources) for name in ATTACKS]
    return {
        "max_connections": MAX_CONNECTIONS,
        "deadline_s": DEADLINE,
        "handshake_deadline_s": HANDSHAKE_DEADLINE,
        "attacks": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exhaustion", description=__doc__)
    parser.add_argument("--connections", type=int, default=MAX_CONNECTIONS + 50)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        figures = run(args.connections, Path(directory))
    print(record("exhaustion", figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
