"""A real ejabberd 23.01 (XMPP) instance on loopback, started and stopped by the tests.

It follows ``real-servers.md`` section 5, with free ports instead of fixed ones::

    BASE/ejabberd.yml        configuration
    BASE/ejabberdctl.cfg     node name and loopback-only Erlang distribution
    BASE/spool/              Mnesia database (alice/alicepw, bob/bobpw on ``localhost``)
    BASE/logs/ejabberd.log   ejabberd's log (info level)
    BASE/ejabberd-fg.out     output of ``ejabberdctl foreground``
    BASE/epmd.out            output of the Erlang port mapper started for it

Two c2s listeners on 127.0.0.1, both offering STARTTLS themselves (so that the
proxy has something to strip): ``port`` plain, ``proxy_port`` requiring a PROXY
v1 or v2 header (``use_proxy_protocol: true``). The Erlang port mapper is
started first, in the foreground on 127.0.0.1 (``ejabberdctl`` would start one
on every interface), and stopped with ejabberd. Starting needs root
(``ejabberdctl`` re-runs itself as the ``ejabberd`` user). One instance at a
time with the port mapper: its node name is fixed. With ``epmd=False`` an
instance runs next to it, its Erlang distribution on a port of its own.

For the federation tests (``s2s``) it serves several domains and gets two
s2s listeners: ``s2s_port`` for servers that connect directly (STARTTLS
offered, ``s2s_use_starttls: optional``) and ``s2s_proxy_port``, which
requires a PROXY header (behind starttls-proxy's ``xmpp-server`` listener).
It finds other servers through the SRV records (``_xmpps-server._tcp``, then
``_xmpp-server._tcp``) of a :class:`~tests.realservers.dns.StaticDNS`, its
only name server (``BASE/inetrc``, read by the Erlang VM). p1_xmpp 1.6.1
resolves SRV targets with the C library's ``getaddrinfo()``, outside that
configuration: the targets must be addresses. Dialback (``mod_s2s_dialback``)
authenticates servers whose certificate it does not see or cannot verify:
ejabberd does not trust the test CA (its certificate manager cannot load
trustme's CA certificate, valid for centuries; see ``write_test_certs``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tests.realservers.daemons import (
    COMMAND_TIMEOUT,
    HOST,
    STOP_TIMEOUT,
    USERS,
    Daemon,
    InDirectory,
    distinct_free_ports,
    find_program,
    installed,
    kill,
    live_group_members,
    prepare_base,
    require_root,
    run_command,
    wait_for_group_exit,
)
from tests.realservers.net import wait_until

DOMAIN = "localhost"
EPMD_PORT = 4369


@dataclass(frozen=True)
class EjabberdS2S:
    """Federation: whom ejabberd asks where other servers are."""

    #: Port of the :class:`~tests.realservers.dns.StaticDNS` on 127.0.0.1.
    nameserver: int


@dataclass
class EjabberdInstance(Daemon):
    """A running ejabberd (see :func:`start_ejabberd`)."""

    port: int
    proxy_port: int
    #: The s2s listeners (federation only): direct, and behind a PROXY header.
    s2s_port: int | None = None
    s2s_proxy_port: int | None = None
    #: The Erlang distribution's port, when it runs without the port mapper.
    distribution_port: int | None = None
    name: ClassVar[str] = "ejabberd"
    _epmd: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    log_path = InDirectory("logs", "ejabberd.log")

    @property
    def ports(self) -> list[int]:
        s2s = [port for port in (self.s2s_port, self.s2s_proxy_port) if port is not None]
        return [self.port, self.proxy_port, *s2s]

    def command(self, *arguments: str) -> list[str]:
        """An ``ejabberdctl`` command line for this instance."""
        ejabberdctl = find_program("ejabberdctl")
        assert ejabberdctl is not None
        directory = self.directory
        return [
            ejabberdctl,
            "--config",
            str(directory / "ejabberd.yml"),
            "--ctl-config",
            str(directory / "ejabberdctl.cfg"),
            "--spool",
            str(directory / "spool"),
            "--logs",
            str(directory / "logs"),
            # Where ejabberdctl finds the Erlang resolver's configuration (inetrc).
            "--config-dir",
            str(directory),
            *arguments,
        ]

    def ctl(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """Run ``ejabberdctl`` on this instance."""
        return run_command(self.command(*arguments))

    def _ready(self) -> bool:
        return self.ctl("status").returncode == 0

    def _kill_leftover_vm(self) -> None:
        mark = f'"{self.directory / "spool"}"'.encode()
        deadline = time.monotonic() + STOP_TIMEOUT
        while leftovers := [pid for pid, line in _command_lines() if mark in line]:
            for pid in leftovers:
                kill(pid, signal.SIGKILL, group=False)
            if time.monotonic() > deadline:
                raise RuntimeError(f"ejabberd in {self.directory} survives SIGKILL: {leftovers}")
            time.sleep(0.05)

    def _terminate(self) -> bool:
        process, self._process = self._process, None
        epmd, self._epmd = self._epmd, None
        if process is not None:
            group = process.pid
            if process.poll() is None:
                self.ctl("stop")
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT)
            if live_group_members(group) and not wait_for_group_exit(group, STOP_TIMEOUT):
                kill(group, signal.SIGKILL, group=True)
                wait_for_group_exit(group, STOP_TIMEOUT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT)
            # su gives the Erlang VM a session of its own (util-linux su -c
            # calls setsid), out of reach of the group: when "stop" could not
            # reach the node, find the VM by its Mnesia directory.
            self._kill_leftover_vm()
        if epmd is not None:
            kill(epmd.pid, signal.SIGTERM, group=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                epmd.wait(STOP_TIMEOUT)
        return process is not None


_CTL_CONFIG = """\
ERLANG_NODE={node}
INET_DIST_INTERFACE=127.0.0.1
ERL_EPMD_ADDRESS=127.0.0.1
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"
"""
#: Without the port mapper: ejabberdctl passes ``-erl_epmd_port PORT -start_epmd false``.
_CTL_DISTRIBUTION = "ERL_DIST_PORT={port}\n"

#: The Erlang resolver as Debian's /etc/ejabberd/inetrc sets it (``--config-dir``
#: makes ejabberdctl read BASE/inetrc instead) ...
_INETRC = """\
{lookup,["file","native"]}.
{host,{127,0,0,1}, ["localhost","hostalias"]}.
{file, resolv, "/etc/resolv.conf"}.
"""
#: ... or only the test's name server and localhost, which ejabberdctl's node
#: needs to reach ejabberd's ("resolv_conf" first: it resets the name servers).
_INETRC_STATIC_DNS = """\
{{resolv_conf, ""}}.
{{hosts_file, ""}}.
{{host, {{127,0,0,1}}, ["localhost"]}}.
{{nameserver, {{127,0,0,1}}, {port}}}.
{{lookup, [file, dns]}}.
"""

_CONFIG = """\
# Generated by tests/realservers/ejabberd.py: standalone instance, loopback only.
hosts:
{hosts}
loglevel: info
certfiles:
  - {base}/cert.pem
  - {base}/key.pem
listen:
  -
    port: {port}
    ip: "{host}"
    module: ejabberd_c2s
    starttls: true
    starttls_required: false
    backlog: 1024
  -
    port: {proxy_port}
    ip: "{host}"
    module: ejabberd_c2s
    starttls: true
    starttls_required: false
    use_proxy_protocol: true
    backlog: 1024
{s2s_listeners}auth_method: internal
auth_password_format: plain
{s2s}acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
modules:
  mod_roster: {{}}
  mod_disco: {{}}
  mod_ping: {{}}
{s2s_modules}"""

_NO_S2S = "s2s_access: none\n"

_S2S_LISTENERS = """\
  -
    port: {s2s_port}
    ip: "{host}"
    module: ejabberd_s2s_in
  -
    port: {s2s_proxy_port}
    ip: "{host}"
    module: ejabberd_s2s_in
    use_proxy_protocol: true
"""

_S2S = """\
s2s_access: all
s2s_use_starttls: optional
outgoing_s2s_families:
  - ipv4
s2s_dns_timeout: 5
s2s_dns_retries: 1
"""

_S2S_MODULES = "  mod_s2s_dialback: {}\n"


def _command_lines() -> list[tuple[int, bytes]]:
    """Every live process's PID and command line (NULs between the arguments)."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                lines.append((int(entry.name), (entry / "cmdline").read_bytes()))
    return lines


def _check_config_path(path: Path) -> str:
    text = str(path)
    if re.search(r"[\s\"'#:{}]", text):
        raise ValueError(f"ejabberd cannot take this path in its configuration: {text!r}")
    return text


def _check_domain(domain: str) -> str:
    if not re.fullmatch(r"[a-z0-9.-]+", domain):
        raise ValueError(f"not a test domain for ejabberd's configuration: {domain!r}")
    return domain


def _start_epmd(base: Path) -> subprocess.Popen[bytes]:
    epmd = installed("epmd", "epmd (erlang-base)")
    if wait_until(HOST, [EPMD_PORT], listening=True, timeout=0):
        raise RuntimeError(f"an Erlang port mapper already listens on {HOST}:{EPMD_PORT}")
    with (base / "epmd.out").open("wb") as output:
        process = subprocess.Popen(
            [epmd, "-address", HOST],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if not wait_until(HOST, [EPMD_PORT], listening=True, timeout=COMMAND_TIMEOUT):
        kill(process.pid, signal.SIGKILL, group=False)
        raise RuntimeError("epmd did not start")
    return process


def start_ejabberd(
    base: Path,
    cert: Path,
    key: Path,
    *,
    domains: Sequence[str] = (DOMAIN,),
    s2s: EjabberdS2S | None = None,
    epmd: bool = True,
) -> EjabberdInstance:
    """Configure and start ejabberd in ``base``, register the accounts; return when ready.

    ``domains``: the hosts served, each with the accounts; ``cert`` must name them all.
    ``s2s``: federation (see the module docstring); without it s2s is refused.
    ``epmd=False``: the Erlang distribution on a free port instead of through the
    port mapper, so that this instance can run next to another one.
    """
    require_root("ejabberd")
    installed("ejabberdctl", "ejabberd")
    if not domains:
        raise ValueError("ejabberd needs a domain to serve")
    base = prepare_base(base, ("spool", "logs"))
    user = pwd.getpwnam("ejabberd")
    (base / "cert.pem").write_bytes(cert.read_bytes())
    (base / "key.pem").write_bytes(key.read_bytes())
    (base / "key.pem").chmod(0o640)
    port, proxy_port, s2s_port, s2s_proxy_port, distribution_port = distinct_free_ports(5, HOST)
    node = "ejabberd@localhost" if epmd else f"ejabberd{distribution_port}@localhost"
    control = _CTL_CONFIG.format(node=node)
    if not epmd:
        control += _CTL_DISTRIBUTION.format(port=distribution_port)
    (base / "ejabberdctl.cfg").write_text(control)
    inetrc = _INETRC if s2s is None else _INETRC_STATIC_DNS.format(port=s2s.nameserver)
    (base / "inetrc").write_text(inetrc)
    (base / "ejabberd.yml").write_text(
        _CONFIG.format(
            base=_check_config_path(base),
            hosts="".join(f"  - {_check_domain(domain)}\n" for domain in domains),
            host=HOST,
            port=port,
            proxy_port=proxy_port,
            s2s_listeners=""
            if s2s is None
            else _S2S_LISTENERS.format(host=HOST, s2s_port=s2s_port, s2s_proxy_port=s2s_proxy_port),
            s2s=_NO_S2S if s2s is None else _S2S,
            s2s_modules="" if s2s is None else _S2S_MODULES,
        )
    )
    for path in [base, *base.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    instance = EjabberdInstance(
        directory=base,
        port=port,
        proxy_port=proxy_port,
        s2s_port=None if s2s is None else s2s_port,
        s2s_proxy_port=None if s2s is None else s2s_proxy_port,
        distribution_port=None if epmd else distribution_port,
    )
    if epmd:
        instance._epmd = _start_epmd(base)
    error = instance._launch(instance.command("foreground"), base / "ejabberd-fg.out", instance.log)
    if error is not None:
        instance.stop()
        raise RuntimeError(error)
    for domain in domains:
        for name, password in USERS.items():
            registered = instance.ctl("register", name, domain, password)
            if registered.returncode != 0:
                instance.stop()
                raise RuntimeError(f"ejabberdctl register {name} failed:\n{registered.stdout}")
    return instance
