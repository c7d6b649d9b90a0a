"""The main process's descriptor limit against the sessions its listeners allow.

Each relayed session holds two descriptors in the main process (the
worker's channel, the backend); where the limit cannot hold every session
the listeners allow, the proxy says so at start and on reload, naming the
fix, instead of failing sessions one by one once it is reached. Run in a
child process whose limit ``prlimit`` sets, so the test's own stays.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from starttls_proxy.proxy.server import DESCRIPTOR_RESERVE, DESCRIPTORS_PER_SESSION

CHECK = (
    "import resource, sys\n"
    "from pathlib import Path\n"
    "from starttls_proxy.config import load_config\n"
    "from starttls_proxy.proxy.server import descriptor_room\n"
    "print(descriptor_room(load_config(Path(sys.argv[1]))))\n"
    "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
)


def _config(tmp_path: Path, cert_dir: Path, *max_connections: int) -> Path:
    path = tmp_path / "config.yaml"
    listeners = [
        {
            "name": f"smtp{n}",
            "protocol": "smtp",
            "listen": f"127.0.0.1:{2525 + n}",
            "backend": {"address": "127.0.0.1:25"},
            "limits": {"max_connections": count},
        }
        for n, count in enumerate(max_connections)
    ]
    certificate = {"cert": str(cert_dir / "cert.pem"), "key": str(cert_dir / "key.pem")}
    path.write_text(
        yaml.safe_dump({"tls": {"certificates": [certificate]}, "listeners": listeners})
    )
    return path


def _run(config: Path, soft: int, hard: int) -> list[str]:
    result = subprocess.run(
        ["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-c", CHECK, str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.splitlines()


def test_the_soft_limit_is_raised_and_enough_room_says_nothing(
    tmp_path: Path, cert_dir: Path
) -> None:
    assert _run(_config(tmp_path, cert_dir, 1000, 500), 1024, 4096) == ["None", "4096"]


def test_listeners_that_allow_more_sessions_than_the_limit_holds_are_named(
    tmp_path: Path, cert_dir: Path
) -> None:
    hard = 20_000
    room = (hard - DESCRIPTOR_RESERVE) // DESCRIPTORS_PER_SESSION
    warning, soft = _run(_config(tmp_path, cert_dir, 6000, 5000), 1024, hard)
    assert warning == (
        f"the listeners allow 11000 sessions together, but the descriptor limit ({hard}) "
        f"holds about {room}: raise LimitNOFILE (deploy/systemd's unit sets 65536) "
        "or lower limits.max_connections"
    )
    assert soft == str(hard)
