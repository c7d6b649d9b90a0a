"""Start every target of one run (one certificate key type) and say where each listens.

The backends come from the test suite's real-server fixtures: Postfix
(``tests/realservers/postfix.py``) for SMTP and Dovecot (``tests/realservers/dovecot.py``)
for IMAP and POP3.  Each offers a plaintext listener (the floor, and what the
terminators connect to) and does STARTTLS itself on another (Postfix ``tls_port``) or
the same one (Dovecot, ``ssl = yes``).  The terminators in front of the plaintext
listeners are starttls-proxy (``tests/realservers/proxy.py``), stunnel and nginx mail
(:mod:`bench.peers`).

Every server process runs on the server CPUs: the suite narrows its own CPU affinity
while it starts them (children inherit it), then pins every thread of their trees.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trustme

from bench.loadgen import Endpoint
from bench.peers import start_auth_http, start_nginx, start_stunnel
from bench.procfs import pin_tree
from protocols.registry import PROTOCOLS
from starttls_proxy import procname
from tests.realservers.certs import CertFiles, write_test_certs
from tests.realservers.daemons import HOST, find_program, run_command, wait_for_text
from tests.realservers.dovecot import DovecotInstance, start_dovecot
from tests.realservers.net import free_port
from tests.realservers.postfix import PostfixInstance, start_postfix
from tests.realservers.proxy import ProxyProcess, listener, start_proxy

PROXY = "starttls-proxy"
STUNNEL = "stunnel"
NGINX = "nginx mail"
BACKEND_TLS = "backend STARTTLS"
PLAINTEXT = "plaintext backend"
#: Report order: the product first, the floor last.
TARGET_NAMES = (PROXY, STUNNEL, NGINX, BACKEND_TLS, PLAINTEXT)
#: Short names for the command line.
TARGET_IDS = {
    "proxy": PROXY,
    "stunnel": STUNNEL,
    "nginx": NGINX,
    "backend-tls": BACKEND_TLS,
    "plaintext": PLAINTEXT,
}
#: starttls-proxy's processes by name, and the role their CPU time is reported under
#: (``<role>_cpu_ms``): the main process, the keeper, the key server, and the TLS
#: helper with its spares and workers (which the helper reaps).
MAIN_ROLE = "main"
KEEPER_ROLE = "keeper"
KEY_SERVER_ROLE = "key_server"
HELPER_ROLE = "helper"
PROXY_ROLES = {
    procname.MAIN: MAIN_ROLE,
    procname.KEEPER: KEEPER_ROLE,
    procname.KEY_SERVER: KEY_SERVER_ROLE,
    procname.HELPER: HELPER_ROLE,
    procname.SPARE: HELPER_ROLE,
    procname.WORKER: HELPER_ROLE,
}
#: Roles that count only their own process: the main process's reaped children (none
#: while it runs normally) and unnamed children go to ``other``.
PROXY_OWN_ONLY = frozenset({MAIN_ROLE})
ALL_PROTOCOLS = ("smtp", "imap", "pop3")
KEY_TYPES = {"ecdsa": trustme.KeyType.ECDSA, "rsa": trustme.KeyType.RSA}
#: What the report says where the proxy has no machine for a protocol yet.
NOT_IMPLEMENTED = "not measured (protocol not implemented)"
#: Worker UIDs of the proxy's instances when several share the ports: a
#: range each (the default range starts at 200,000).
UID_BASE = 300_000
UIDS_EACH = 20_000
BACKENDS = {"smtp": "Postfix", "imap": "Dovecot", "pop3": "Dovecot"}


def target_label(target: str, protocol: str) -> str:
    """The name of a target in tables and plots (the backend targets name the backend)."""
    backend = BACKENDS.get(protocol, "backend")
    if target == BACKEND_TLS:
        return f"{backend} STARTTLS itself"
    if target == PLAINTEXT:
        return f"plaintext {backend} (floor)"
    return target


@dataclass
class Target:
    """One target of a run: where it listens per protocol, and which processes are its own."""

    name: str
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    #: The terminator's own process trees; empty for the backend targets, whose
    #: processes are the backend's.
    roots: list[int] = field(default_factory=list)
    #: protocol -> why it is not measured on this target.
    missing: dict[str, str] = field(default_factory=dict)
    #: Processes that each hold sessions (the proxy's instances sharing its
    #: ports with reuse_port); 1 for every other target.
    instances: int = 1


@dataclass
class Run:
    """Everything started for one key type."""

    key_type: str
    certs: CertFiles
    postfix: PostfixInstance | None
    dovecot: DovecotInstance | None
    targets: dict[str, Target]
    #: protocol -> the backend's process roots.
    backend_roots: dict[str, list[int]]

    def terminator_roots(self, target: Target, protocol: str) -> list[int]:
        """The processes that do the TLS for ``target``: its own, or the backend's."""
        return target.roots or self.backend_roots[protocol]

    def backend_roots_behind(self, target: Target, protocol: str) -> list[int]:
        """The backend's processes when ``target`` is a separate terminator, else none."""
        return self.backend_roots[protocol] if target.roots else []


@dataclass(frozen=True)
class Settings:
    """What the targets must be able to take."""

    #: Largest number of simultaneous sessions (idle workload plus headroom).
    max_sessions: int
    #: Largest message (bulk workload).
    message_size: int
    #: Postfix smtpd processes allowed (one per SMTP session).
    smtpd_processes: int
    #: starttls-proxy instances sharing each listener's port (reuse_port).
    proxy_instances: int = 1


_T = TypeVar("_T")


@contextlib.contextmanager
def _server_cpus(cpus: frozenset[int]) -> Iterator[None]:
    """Run the block with this thread's affinity narrowed to ``cpus`` (for children)."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _tune_postfix(postfix: PostfixInstance, settings: Settings) -> None:
    """Raise the limits a benchmark hits, then reload (``real-servers.md`` and peer notes)."""
    postconf = find_program("postconf")
    binary = find_program("postfix")
    if postconf is None or binary is None:
        raise RuntimeError("postconf/postfix not found")
    values = {
        # MAIL FROM would wait up to 1 s whenever the queue manager lags behind
        "in_flow_delay": "0",
        "message_size_limit": str(2 * settings.message_size),
        "virtual_mailbox_limit": "0",
        "mailbox_size_limit": "0",
        "default_process_limit": str(settings.smtpd_processes),
    }
    conf = str(postfix.conf_dir)
    result = run_command([postconf, "-c", conf, "-e", *(f"{k}={v}" for k, v in values.items())])
    if result.returncode != 0:
        raise RuntimeError(f"postconf failed: {result.stderr}")
    mark = len(postfix.log())
    run_command([binary, "-c", conf, "reload"])
    # The master logs "reload -- version ..." once it has re-read the configuration.
    wait_for_text(lambda: postfix.log()[mark:], "reload", 15, "the Postfix maillog")


def _attempt(
    missing: dict[str, str], protocols: Sequence[str], start: Callable[[], _T]
) -> _T | None:
    """``start()``, or ``None`` with the error noted as the reason for ``protocols``."""
    try:
        return start()
    except (RuntimeError, OSError, TimeoutError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        for protocol in protocols:
            missing[protocol] = f"not measured (did not start: {first_line[:160]})"
        return None


def start_run(
    stack: contextlib.ExitStack,
    base: Path,
    ca: trustme.CA,
    key_type: str,
    protocols: list[str],
    settings: Settings,
    server_cpus: frozenset[int],
) -> Run:
    """Start the backends and every terminator for ``protocols``; ``stack`` stops them."""
    base = base / key_type
    certs = write_test_certs(base / "certs", ca, key_type=KEY_TYPES[key_type])
    down: dict[str, str] = {}
    targets = {name: Target(name) for name in TARGET_NAMES}
    plain_ports: dict[str, int] = {}
    tls_ports: dict[str, int] = {}
    backend_roots: dict[str, list[int]] = {}
    with _server_cpus(server_cpus):
        postfix = None
        if "smtp" in protocols:
            postfix = _attempt(
                down, ["smtp"], lambda: start_postfix(base / "postfix", certs.cert, certs.key)
            )
        if postfix is not None:
            stack.callback(postfix.stop)
            _tune_postfix(postfix, settings)
            plain_ports["smtp"], tls_ports["smtp"] = postfix.plain_port, postfix.tls_port
            backend_roots["smtp"] = [postfix.master_pid() or 0]
        dovecot_protocols: list[str] = [p for p in ("imap", "pop3") if p in protocols]
        dovecot: DovecotInstance | None
        dovecot = None
        if dovecot_protocols:
            dovecot = _attempt(
                down,
                dovecot_protocols,
                lambda: start_dovecot(base / "dovecot", certs.cert, certs.key),
            )
        if dovecot is not None:
            stack.callback(dovecot.stop)
            for protocol in dovecot_protocols:
                port = dovecot.imap_port if protocol == "imap" else dovecot.pop3_port
                plain_ports[protocol] = tls_ports[protocol] = port
                backend_roots[protocol] = [dovecot.master_pid() or 0]
        for name, ports, starttls in (
            (BACKEND_TLS, tls_ports, True),
            (PLAINTEXT, plain_ports, False),
        ):
            targets[name].endpoints = {
                p: Endpoint(HOST, port, p, starttls) for p, port in ports.items()
            }
        _start_terminators(stack, base, certs, targets, plain_ports, settings)
    for target in targets.values():
        for protocol in protocols:
            if protocol not in target.endpoints:
                target.missing.setdefault(protocol, down.get(protocol, "not measured"))
    if server_cpus:
        for roots in [*(t.roots for t in targets.values()), *backend_roots.values()]:
            pin_tree(roots, set(server_cpus))
    return Run(key_type, certs, postfix, dovecot, targets, backend_roots)


def _start_proxies(
    stack: contextlib.ExitStack,
    base: Path,
    certs: CertFiles,
    protocols: list[str],
    plain_ports: dict[str, int],
    settings: Settings,
    missing: dict[str, str],
) -> list[ProxyProcess]:
    """``settings.proxy_instances`` proxies; several share each listener's
    port (reuse_port), each with UIDs of its own."""
    shared = settings.proxy_instances > 1
    listen = {p: f"{HOST}:{free_port()}" for p in protocols}
    limits = {"max_connections": settings.max_sessions}
    proxies = []
    for n in range(settings.proxy_instances):
        entries = [
            listener(p, plain_ports[p], p, limits=limits, listen=listen[p], reuse_port=shared)
            for p in protocols
        ]
        top: dict[str, Any] = {}
        if shared:
            top["isolation"] = {"uid_range": [UID_BASE + n * UIDS_EACH, UIDS_EACH]}
        proxy = _attempt(
            missing,
            protocols,
            functools.partial(
                start_proxy,
                base / f"proxy{n}",
                [(certs.cert, certs.key)],
                entries,
                log_level="info",
                **top,
            ),
        )
        if proxy is None:
            return []
        stack.callback(proxy.stop)
        proxies.append(proxy)
    return proxies


def _start_terminators(
    stack: contextlib.ExitStack,
    base: Path,
    certs: CertFiles,
    targets: dict[str, Target],
    plain_ports: dict[str, int],
    settings: Settings,
) -> None:
    protocols = list(plain_ports)
    if not protocols:
        return
    proxy_target = targets[PROXY]
    implemented = [p for p in protocols if p in PROTOCOLS]
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            proxy_target.missing[protocol] = NOT_IMPLEMENTED
    if implemented:
        proxies = _start_proxies(
            stack, base, certs, implemented, plain_ports, settings, proxy_target.missing
        )
        if proxies:
            proxy_target.roots = [proxy.process.pid for proxy in proxies]
            proxy_target.instances = len(proxies)
            proxy_target.endpoints = {
                p: Endpoint(HOST, proxies[0].ports[p], p, True) for p in implemented
            }
    started = _attempt(
        targets[STUNNEL].missing,
        protocols,
        lambda: start_stunnel(base / "stunnel", certs, plain_ports),
    )
    if started is not None:
        stunnel, ports = started
        stack.callback(stunnel.stop)
        targets[STUNNEL].roots = [stunnel.pid or 0]
        targets[STUNNEL].endpoints = {p: Endpoint(HOST, port, p, True) for p, port in ports.items()}
    auth = _attempt(
        targets[NGINX].missing, protocols, lambda: start_auth_http(base / "auth_http", plain_ports)
    )
    if auth is None:
        return
    stack.callback(auth.stop)
    nginx_started = _attempt(
        targets[NGINX].missing,
        protocols,
        lambda: start_nginx(base / "nginx", certs, auth.ports[0], protocols, settings.max_sessions),
    )
    if nginx_started is not None:
        nginx, ports = nginx_started
        stack.callback(nginx.stop)
        targets[NGINX].roots = [nginx.pid or 0, auth.pid or 0]
        targets[NGINX].endpoints = {p: Endpoint(HOST, port, p, True) for p, port in ports.items()}
