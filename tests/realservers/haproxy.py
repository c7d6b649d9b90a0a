"""A real HAProxy (Debian's) on loopback: an L4 balancer in ``mode tcp`` in
front of several proxy instances, as the README's scale-out section has it.

Each frontend round-robins over its servers with ``send-proxy-v2`` (the
instances trust 127.0.0.1, where HAProxy connects from) and health checks
that send the PROXY header too (``check-send-proxy``). A connection refused
by a dead instance is dispatched again to another (``retries``,
``option redispatch``). HAProxy runs in the foreground and logs each
connection and each server state change to its log file.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.realservers.daemons import installed
from tests.realservers.net import free_port, wait_until

#: Health checks, milliseconds apart; two failed ones mark a server down.
CHECK_INTERVAL_MS = 300
CHECKS_TO_FALL = 2

_GLOBAL = """\
global
    log stdout format raw local0
    maxconn 4096

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch
"""

_FRONTEND = """
frontend {name}
    bind 127.0.0.1:{port}
    default_backend {name}

backend {name}
    balance roundrobin
{servers}"""

_SERVER = (
    "    server {server} 127.0.0.1:{port} send-proxy-v2 check check-send-proxy"
    " inter {interval}ms fall {fall} rise 1\n"
)


@dataclass
class HAProxyInstance:
    process: subprocess.Popen[bytes]
    log_path: Path
    #: frontend name -> its port on 127.0.0.1
    ports: dict[str, int]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} in HAProxy's log:\n{self.log()[-2000:]}")
            time.sleep(0.02)


@contextlib.contextmanager
def running_haproxy(
    base: Path, frontends: Mapping[str, Sequence[tuple[str, int]]]
) -> Iterator[HAProxyInstance]:
    """HAProxy with one frontend per entry of ``frontends``: its name and
    its servers as (name, port)."""
    program = installed("haproxy", "HAProxy")
    ports = {name: free_port() for name in frontends}
    config = _GLOBAL + "".join(
        _FRONTEND.format(
            name=name,
            port=ports[name],
            servers="".join(
                _SERVER.format(
                    server=server, port=port, interval=CHECK_INTERVAL_MS, fall=CHECKS_TO_FALL
                )
                for server, port in servers
            ),
        )
        for name, servers in frontends.items()
    )
    base.mkdir(parents=True, exist_ok=True)
    path = base / "haproxy.cfg"
    path.write_text(config)
    checked = subprocess.run(
        [program, "-c", "-f", str(path)], capture_output=True, text=True, check=False
    )
    if checked.returncode != 0:
        raise RuntimeError(f"HAProxy refused {path}:\n{checked.stdout}{checked.stderr}")
    log_path = base / "haproxy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [program, "-db", "-f", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    instance = HAProxyInstance(process, log_path, ports)
    try:
        if not wait_until("127.0.0.1", list(ports.values()), listening=True, timeout=10):
            raise RuntimeError(f"HAProxy did not listen:\n{instance.log()[-2000:]}")
        yield instance
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
