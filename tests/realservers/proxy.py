"""Run the real proxy (``python -m starttls_proxy``) as a subprocess for tests."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.realservers.fs import ensure_traversable, make_dirs
from tests.realservers.net import free_port

READY_LINE = "starttls_proxy.proxy.server: ready"
#: ``start(listeners, certificates=None, **options)``: see ``module_proxy`` in
#: ``tests/e2e/conftest.py``.
StartProxy = Callable[..., "ProxyProcess"]
READY_JSON = '"logger": "starttls_proxy.proxy.server", "message": "ready"'
#: What a Python traceback, and a report of the sanitized TLS helper
#: (scripts/test-sanitized.sh), start with in the proxy's log.
FAILURE_MARKS = ("Traceback", "ERROR: AddressSanitizer", "runtime error:")


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    #: listener name -> port on 127.0.0.1
    ports: dict[str, int]

    def connect(self, listener_name: str, source: str = "127.0.0.1") -> socket.socket:
        """A plain TCP connection to a listener, from a chosen loopback address."""
        return socket.create_connection(
            ("127.0.0.1", self.ports[listener_name]), timeout=20, source_address=(source, 0)
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the proxy log:\n{self.log()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def listener(
    name: str, backend_port: int, protocol: str = "smtp", **options: Any
) -> dict[str, Any]:
    """A listener entry on a free loopback port (``listen`` is filled in by start_proxy)."""
    entry: dict[str, Any] = {
        "name": name,
        "protocol": protocol,
        "hostname": "proxy.test",
        "backend": {"address": f"127.0.0.1:{backend_port}"},
    }
    for key, value in options.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key] = {**entry[key], **value}
        else:
            entry[key] = value
    return entry


def start_proxy(
    base: Path,
    certificates: list[tuple[Path, Path]],
    listeners: list[dict[str, Any]],
    log_format: str = "text",
    log_level: str = "debug",
    launcher: tuple[str, ...] = (),
    **top: Any,
) -> ProxyProcess:
    """Write a config, start the proxy, wait until it logs that it is ready.

    Tests read the debug log; the benchmarks run at ``info``, as users do.
    ``launcher``: a command that runs the proxy's (``systemd-socket-activate
    -l ADDRESS``, which starts it only on the first connection: then this
    returns at once).
    """
    # Like /etc/starttls-proxy in a deployment: the main process, once it has
    # dropped root, must still read the configuration on SIGHUP.
    make_dirs(base)
    ensure_traversable(base)
    ports = {}
    for entry in listeners:
        entry.setdefault("listen", f"127.0.0.1:{free_port()}")
        ports[entry["name"]] = int(entry["listen"].rpartition(":")[2])
    config = {
        "tls": {"certificates": [{"cert": str(c), "key": str(k)} for c, k in certificates]},
        "listeners": listeners,
        **top,
    }
    config_path = base / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    config_path.chmod(0o644)
    log_path = base / "proxy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                *launcher,
                sys.executable,
                "-m",
                "starttls_proxy",
                "--config",
                str(config_path),
                "--log-level",
                log_level,
                "--log-format",
                log_format,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # A process group of its own, as under a supervisor: tests may
            # signal the whole group without reaching pytest.
            start_new_session=True,
        )
    proxy = ProxyProcess(process, config_path, log_path, ports)
    if launcher:
        return proxy
    deadline = time.monotonic() + 30
    ready = READY_LINE if log_format == "text" else READY_JSON
    while ready not in proxy.log():
        if process.poll() is not None or time.monotonic() > deadline:
            proxy.stop()
            raise RuntimeError(f"the proxy did not start:\n{proxy.log()[-3000:]}")
        time.sleep(0.05)
    return proxy


@contextlib.contextmanager
def running_proxy(
    base: Path,
    certificates: list[tuple[Path, Path]],
    listeners: list[dict[str, Any]],
    **options: Any,
) -> Iterator[ProxyProcess]:
    """:func:`start_proxy`, stopped when the block ends: it must then exit with
    status 0 and have logged no traceback."""
    process = start_proxy(base, certificates, listeners, **options)
    try:
        yield process
    finally:
        status = process.stop()
    log = process.log()
    assert status == 0, log[-3000:]
    for failure in FAILURE_MARKS:
        assert failure not in log, log[max(0, log.find(failure) - 1500) :][:4000]
