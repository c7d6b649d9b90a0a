"""The peers the proxy is measured against: stunnel4 and nginx's mail proxy.

Both run from a directory of their own on loopback, in the foreground, with the
same certificate as every other target, and are stopped by PID.

* **stunnel** (``protocol = smtp|imap|pop3`` in server mode) connects to the
  plaintext backend before TLS.  For each new client it first waits 200 ms to see
  whether the client speaks first (implicit TLS), so every session's greeting comes
  at least 200 ms late: the suite measures and reports that wait.
* **nginx mail** (``starttls on``) answers the whole pre-TLS dialogue and the
  post-TLS EHLO / CAPABILITY itself and contacts the backend only when it must:
  after RCPT TO for SMTP (``smtp_auth none``), after LOGIN for IMAP and POP3.  It
  cannot work without an ``auth_http`` server (:mod:`bench.auth_http`), which runs
  beside it and counts as part of the target.  ``xclient off``: the backend is a
  plain smtpd that would refuse XCLIENT from anyone not listed.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tests.realservers.certs import CertFiles
from tests.realservers.daemons import (
    HOST,
    Daemon,
    InDirectory,
    distinct_free_ports,
    find_program,
    kill,
    stop_process,
)
from tests.realservers.fs import make_dirs

#: nginx's module directory on Debian (``libnginx-mod-mail``).
NGINX_MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")
#: Pre-authentication timeout given to nginx (its default of 60 s would close the
#: idle sessions of the capacity workload); the other targets allow minutes too.
NGINX_TIMEOUT = "300s"


@dataclass
class ForegroundDaemon(Daemon):
    """A daemon that stays in the foreground and stops on SIGTERM (stunnel, nginx, auth_http)."""

    listen_ports: list[int]
    name: ClassVar[str] = "daemon"

    @property
    def ports(self) -> list[int]:
        return self.listen_ports

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _terminate(self) -> bool:
        process, self._process = self._process, None
        if process is None:
            return False
        stop_process(process)
        # nginx's worker may outlive its master by a moment: its group goes too.
        kill(process.pid, signal.SIGKILL, group=True)
        return True

    def start(self, command: list[str]) -> None:
        error = self._launch(command, self.directory / "foreground.out", self.log)
        if error is not None:
            raise RuntimeError(error)


class Stunnel(ForegroundDaemon):
    name: ClassVar[str] = "stunnel"
    log_path = InDirectory("stunnel.log")


class Nginx(ForegroundDaemon):
    name: ClassVar[str] = "nginx"
    log_path = InDirectory("error.log")


class AuthHTTP(ForegroundDaemon):
    name: ClassVar[str] = "auth_http"
    log_path = InDirectory("auth_http.log")


def _program(name: str) -> str:
    path = find_program(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (scripts/bench.sh installs it)")
    return path


def start_stunnel(
    base: Path, certs: CertFiles, backends: dict[str, int]
) -> tuple[Stunnel, dict[str, int]]:
    """stunnel in server mode, one service per protocol -> backend port; (daemon, ports)."""
    stunnel = _program("stunnel4") if find_program("stunnel4") else _program("stunnel")
    make_dirs(base)
    ports = dict(zip(backends, distinct_free_ports(len(backends), HOST), strict=True))
    sections = "".join(
        f"[{protocol}]\naccept = {HOST}:{ports[protocol]}\nconnect = {HOST}:{backend}\n"
        f"protocol = {protocol}\n"
        for protocol, backend in backends.items()
    )
    config = base / "stunnel.conf"
    daemon = Stunnel(directory=base, host=HOST, listen_ports=list(ports.values()))
    config.write_text(
        f"foreground = yes\npid =\noutput = {daemon.log_path}\n"
        f"cert = {certs.cert}\nkey = {certs.key}\n{sections}"
    )
    daemon.start([stunnel, str(config)])
    return daemon, ports


def start_auth_http(base: Path, backends: dict[str, int]) -> AuthHTTP:
    """The :mod:`bench.auth_http` responder sending each protocol to its backend port."""
    make_dirs(base)
    (port,) = distinct_free_ports(1, HOST)
    daemon = AuthHTTP(directory=base, host=HOST, listen_ports=[port])
    command = [sys.executable, "-m", "bench.auth_http", "--listen", f"{HOST}:{port}"]
    for protocol, backend in backends.items():
        command += ["--backend", f"{protocol}={HOST}:{backend}"]
    daemon.start(command)
    return daemon


_NGINX_SERVER = {
    "smtp": "protocol smtp; smtp_auth none; xclient off;",
    "imap": "protocol imap;",
    "pop3": "protocol pop3;",
}


def start_nginx(
    base: Path, certs: CertFiles, auth_port: int, protocols: list[str], max_sessions: int
) -> tuple[Nginx, dict[str, int]]:
    """nginx mail with ``starttls on``, one server per protocol; (daemon, ports)."""
    nginx = _program("nginx")
    if not NGINX_MAIL_MODULE.exists():
        raise RuntimeError(f"{NGINX_MAIL_MODULE} is missing (Debian package libnginx-mod-mail)")
    make_dirs(base)
    ports = dict(zip(protocols, distinct_free_ports(len(protocols), HOST), strict=True))
    servers = "".join(
        f"  server {{ listen {HOST}:{ports[protocol]} backlog=4096; {_NGINX_SERVER[protocol]} }}\n"
        for protocol in protocols
    )
    daemon = Nginx(directory=base, host=HOST, listen_ports=list(ports.values()))
    log = daemon.log_path
    _, hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    # One worker: every target is pinned to the same server CPUs, where a second
    # worker would only compete with the first.
    config = f"""\
load_module {NGINX_MAIL_MODULE};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {min(4 * max_sessions + 1024, hard_limit)};
pid {base}/nginx.pid;
error_log {log} warn;
events {{ worker_connections {2 * max_sessions + 512}; }}
mail {{
  server_name proxy.test;
  auth_http {HOST}:{auth_port}/auth;
  timeout {NGINX_TIMEOUT};
  ssl_certificate {certs.cert};
  ssl_certificate_key {certs.key};
  # 1.22's default is TLSv1 TLSv1.1 TLSv1.2 (TLSv1.3 joined the default in 1.23.4)
  ssl_protocols TLSv1.2 TLSv1.3;
  starttls on;
{servers}}}
"""
    (base / "nginx.conf").write_text(config)
    command = [nginx, "-p", str(base), "-c", str(base / "nginx.conf"), "-e", str(log)]
    check = subprocess.run(
        [*command, "-t"], capture_output=True, text=True, timeout=30, check=False
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
    with contextlib.suppress(FileNotFoundError):
        (base / "nginx.pid").unlink()
    daemon.start(command)
    return daemon, ports
