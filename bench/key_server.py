"""What the key server costs: handshake latency and session rate, key server on vs off.

usage (as root, from the repository): .venv/bin/python -m bench.key_server [--samples N]
[--seconds S] [--concurrency C]

Starts the real proxy twice (``isolation.key_server`` true, then false) with
an implicit-TLS SMTP listener in front of a tiny local backend that only
greets, then for an ECDSA P-256 and an RSA-2048 certificate measures

* latency: sequential TLS 1.3 handshakes, connect to handshake done (p50, p90,
  and the median of the on-off differences of neighbouring handshakes),
  back to back and ``PAUSE`` apart;
* rate: sessions per second (connect, handshake, greeting, close) from
  ``--concurrency`` client threads.

The clients run on the same machine, so the figures are comparisons, not
capacities.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trustme

from starttls_proxy.keys.server import (
    TLS13_SERVER_CONTEXT,
    Link,
    Scheme,
    read_private_key,
    signature_request,
)
from starttls_proxy.privileged.keeper import KeyServerProcess, open_key_files
from starttls_proxy.settings import IsolationConfig, checked, encode
from starttls_proxy.wire import TLSRole
from tests.realservers.certs import CertFiles, write_test_certs
from tests.realservers.proxy import ProxyProcess, listener, start_proxy

#: Between two handshakes of the second latency series: time enough for what
#: a session leaves behind (its worker's exit, the key server closing its
#: connection, the next spare's fork) to finish, so that each handshake is
#: measured alone rather than next to the last one's aftermath.
PAUSE = 0.05


def _greeting_backend() -> int:
    """A backend that greets every connection and closes it when the client does."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(sock: socket.socket) -> None:
        with sock:
            sock.sendall(b"220 backend\r\n")
            while sock.recv(4096):
                pass

    def accept() -> None:
        while True:
            connection, _ = server.accept()
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(server.getsockname()[1])


def _session(proxy: ProxyProcess, context: ssl.SSLContext, name: str) -> float:
    """One session; returns the seconds from connect to handshake done."""
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", proxy.ports["implicit"]), timeout=30)
    with context.wrap_socket(sock, server_hostname=name) as tls:
        handshake = time.perf_counter() - started
        tls.recv(4096)
    return handshake


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.9)] * 1000


def _latencies(
    proxies: dict[bool, ProxyProcess], certs: CertFiles, name: str, samples: int, pause: float
) -> tuple[dict[bool, tuple[float, float]], float]:
    """Sequential handshakes, alternating between the proxies (same background
    load), ``pause`` seconds apart: (p50, p90) of each, and the median of the
    differences of neighbouring pairs (drifts in the machine's speed cancel
    out of those)."""
    context = certs.client_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    seen: dict[bool, list[float]] = {on: [] for on in proxies}
    for round_number in range(samples + 20):
        for on, proxy in proxies.items():
            time.sleep(pause)
            handshake = _session(proxy, context, name)
            if round_number >= 20:  # the first ones warm up
                seen[on].append(handshake)
    paired = statistics.median(a - b for a, b in zip(seen[True], seen[False], strict=True))
    return {on: _percentiles(values) for on, values in seen.items()}, paired * 1000


def _rate(proxy: ProxyProcess, certs: CertFiles, name: str, seconds: float, threads: int) -> float:
    context = certs.client_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    deadline = time.monotonic() + seconds
    counts = [0] * threads

    def client(number: int) -> None:
        while time.monotonic() < deadline:
            _session(proxy, context, name)
            counts[number] += 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(client, range(threads)))
    return sum(counts) / seconds


def _round_trips(samples: int) -> dict[str, tuple[float, float]]:
    """One signature request to a real key server, as a worker makes it (p50, p90 in ms)."""
    base = Path(tempfile.mkdtemp(prefix="key-server-rtt-"))
    ca = trustme.CA()
    paths = []
    for name, key_type in (("ec", trustme.KeyType.ECDSA), ("rsa", trustme.KeyType.RSA)):
        path = base / f"{name}.pem"
        ca.issue_cert(f"{name}.test", key_type=key_type).private_key_pem.write_to_path(str(path))
        paths.append(path)
    isolation = {"chroot": str(base / "empty"), "uid_range": [320_000, 1000], "key_server": True}
    process = KeyServerProcess(
        encode(checked(IsolationConfig, isolation, "isolation")), lambda counts: None
    )
    files = open_key_files({"tls": {"certificates": [{"key": str(p)} for p in paths]}})
    _, link_socket = process.load(files)
    link = Link(link_socket)
    results = {}
    schemes = (("ecdsa-p256", Scheme.ECDSA), ("rsa-2048-pss", Scheme.RSA_PSS))
    for index, (label, scheme) in enumerate(schemes):
        key = read_private_key(paths[index].read_bytes(), label)
        times = []
        for _ in range(samples):
            with socket.socket(fileno=link.connection_for([index], TLSRole.ACCEPT)) as connection:
                data = TLS13_SERVER_CONTEXT + os.urandom(32)
                request = signature_request(key.public_key(), data, scheme, 1)
                started = time.perf_counter()
                connection.send(request)
                connection.recv(4096)
                times.append(time.perf_counter() - started)
        results[label] = _percentiles(times)
    process.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="key-server-cost-"))
    ca = trustme.CA()
    ec_certs = write_test_certs(base / "ec", ca, ("localhost",))
    rsa_certs = write_test_certs(base / "rsa", ca, ("rsa.test",), key_type=trustme.KeyType.RSA)
    backend = _greeting_backend()
    proxies = {
        on: start_proxy(
            base / f"proxy-{on}",
            [(ec_certs.cert, ec_certs.key), (rsa_certs.cert, rsa_certs.key)],
            [listener("implicit", backend, tls="implicit", capabilities=["PIPELINING"])],
            isolation={"key_server": on},
            log_level="info",
        )
        for on in (True, False)
    }
    try:
        for pause, how in ((0.0, "back to back"), (PAUSE, f"{PAUSE * 1000:.0f} ms apart")):
            print(f"handshake latency, TLS 1.3, {how} (ms)      key_server on    off")
            for label, certs, name in (
                ("ecdsa-p256", ec_certs, "localhost"),
                ("rsa-2048", rsa_certs, "rsa.test"),
            ):
                seen, paired = _latencies(proxies, certs, name, args.samples, pause)
                for index, percentile in enumerate(("p50", "p90")):
                    on, off = seen[True][index], seen[False][index]
                    print(f"  {label:<10} {percentile}  {on:8.2f} {off:8.2f}  ({on - off:+.2f})")
                print(f"  {label:<10} median of paired differences  {paired:+.2f}")
        print(f"session rate, concurrency {args.concurrency} (sessions/s)   key_server on    off")
        for label, certs, name in (
            ("ecdsa-p256", ec_certs, "localhost"),
            ("rsa-2048", rsa_certs, "rsa.test"),
        ):
            rates = {
                on: _rate(proxy, certs, name, args.seconds, args.concurrency)
                for on, proxy in proxies.items()
            }
            change = rates[True] / rates[False] - 1
            print(f"  {label:<10}  {rates[True]:8.1f} {rates[False]:8.1f}  ({change:+.1%})")
    finally:
        for proxy in proxies.values():
            proxy.stop()
    print("key server round trip, as a worker makes it (ms)      p50      p90")
    for label, (p50, p90) in _round_trips(args.samples).items():
        print(f"  {label:<14}  {p50:8.3f} {p90:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
