"""``starttls-proxy --config PATH [--check | --check-backends | --isolation-report]``,
``--version``; its exit statuses are ``wire.ProxyExit``."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import pwd
import socket
import sys
from pathlib import Path

import uvloop

from starttls_proxy import logs, procname
from starttls_proxy.config import Config, load_config
from starttls_proxy.proxy.activation import PassedSockets
from starttls_proxy.proxy.handoff import TLSHelper
from starttls_proxy.proxy.server import Server
from starttls_proxy.settings import ConfigError, encode
from starttls_proxy.wire import ProxyExit


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="starttls-proxy",
        description="STARTTLS terminator for SMTP, IMAP, POP3 and XMPP.",
    )
    parser.add_argument(
        "--version",
        action="version",
        # pyproject.toml's, as installed: the one place the version is written.
        version=f"%(prog)s {importlib.metadata.version('starttls-proxy')}",
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration and certificates, then exit (0 = usable)",
    )
    parser.add_argument(
        "--check-backends",
        action="store_true",
        help="meet every listener's backend as a session would, print a table with the "
        "fixes, then exit (0 = every backend is usable as configured)",
    )
    parser.add_argument(
        "--isolation-report",
        action="store_true",
        help="probe every sandbox layer of the TLS workers for real, print a table, then exit "
        "(0 = the configured isolation.mode can start)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="stderr log level (default: info)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="stderr log lines as text or as one JSON object each (default: text)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    # Taken first, whatever the mode: nothing started from here may see them.
    sockets = PassedSockets.take_from_environment()
    try:
        config = load_config(args.config)
        if args.check:
            # Only here does this process read keys: --check exits right after.
            from starttls_proxy.tls.contexts import load_certificates
            from starttls_proxy.tls.description import read_trust_store

            load_certificates(config.tls)
            for path in config.trust_stores:
                read_trust_store(path)
            print(f"{args.config}: OK")
            return ProxyExit.OK
        if args.isolation_report:
            return _isolation_report(config)
        if args.check_backends:
            return _check_backends(config)
        passed = _match_passed_sockets(config, sockets)
        # Before the event loop exists: the keeper is a fresh interpreter
        # and the helper a small C program it execs; the private keys are
        # read by the key server (or, with key_server: false, the helper).
        helper = TLSHelper.start(config.helper_tls, config.isolation)
    except ConfigError as error:
        _print_problems(args.config, error)
        return ProxyExit.CONFIG_ERROR
    procname.name_process(procname.MAIN)
    server = Server(config, helper, args.config, passed)
    try:
        uvloop.run(server.serve())
    except ConfigError as error:
        # What only binding can tell: a port taken, an address not ours.
        _print_problems(args.config, error)
        return ProxyExit.CONFIG_ERROR
    finally:
        helper.stop()
    return server.exit_status


def _print_problems(path: Path, error: ConfigError) -> None:
    for problem in error.problems:
        print(f"{path}: {problem}", file=sys.stderr)


def _match_passed_sockets(config: Config, sockets: PassedSockets) -> dict[str, socket.socket]:
    """The service manager's sockets by listener name; raises ``ConfigError``
    when one matches no listener."""
    passed = {}
    for listener in config.listeners:
        sock = sockets.take(listener.listen)
        if sock is not None:
            passed[listener.name] = sock
    problems = sockets.leftover_problems()
    if problems:
        raise ConfigError(problems)
    return passed


def _check_backends(config: Config) -> int:
    from starttls_proxy.proxy.doctor import examine_all
    from starttls_proxy.proxy.doctor_report import judge, table

    verdicts = [judge(seen) for seen in uvloop.run(examine_all(config))]
    print(table(verdicts))
    usable = all(verdict.usable for verdict in verdicts)
    return ProxyExit.OK if usable else ProxyExit.PROBLEMS_FOUND


def _main_user_row(config: Config) -> tuple[str, bool, str]:
    user = config.isolation.main_user
    if user is None:
        return "main_user", False, "off (isolation.main_user is null)"
    if os.geteuid() != 0:
        return "main_user", False, f"not root: the main process stays uid {os.geteuid()}"
    try:
        pwd.getpwnam(user)
    except KeyError:
        return "main_user", False, f"no such user: {user}"
    return "main_user", True, f"the main process drops root for {user} once bound"


def _key_server_rows(config: Config) -> tuple[list[tuple[str, bool, str]], list[str]]:
    """Whether the keys are in a key server, and its layers (probed: one is started)."""
    from starttls_proxy.keys import provider
    from starttls_proxy.privileged.helper_start import HelperStartError
    from starttls_proxy.privileged.keeper import KeyServerProcess

    if not config.isolation.key_server:
        detail = "off (isolation.key_server: false): the keys are in the TLS helper (weaker)"
        return [("key_server", False, detail)], []
    problem = provider.missing()
    if problem is not None:
        return [("key_server", False, problem)], [f"isolation.key_server: {problem}"]
    try:
        key_server = KeyServerProcess(encode(config.isolation), lambda counts: None)
    except HelperStartError as error:
        return [("key_server", False, "cannot start (see below)")], error.problems
    key_server.stop()
    rows = [("key_server", True, "private keys only in the key server; workers ask it to sign")]
    rows += [(f"key_server.{name}", applied, detail) for name, applied, detail in key_server.layers]
    return rows, []


def _isolation_report(config: Config) -> int:
    """Probe each layer in a throwaway worker (as the helper does at start)."""
    from starttls_proxy.privileged.helper_start import HelperStartError, probe_layers
    from starttls_proxy.sandbox.layers import problems as sandbox_problems

    settings = {"tls": encode(config.tls), "isolation": encode(config.isolation)}
    try:
        statuses = probe_layers(settings)
    except HelperStartError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return ProxyExit.PROBLEMS_FOUND
    key_server_rows, key_server_problems = _key_server_rows(config)
    rows = [
        ("clean_slate", True, "fresh helper process; only the worker's own descriptors"),
        *((s.name, s.applied, s.detail) for s in statuses),
        ("deadline", True, "handshake alarm whose handler is _exit"),
        _main_user_row(config),
        *key_server_rows,
    ]
    width = max(len(name) for name, _, _ in rows)
    print(f"{'layer':<{width}}  applied  detail  (isolation.mode: {config.isolation.mode.value})")
    for name, applied, detail in rows:
        print(f"{name:<{width}}  {'yes' if applied else 'NO':<7}  {detail}")
    problems = sandbox_problems(config.isolation, statuses) + key_server_problems
    for problem in problems:
        print(problem, file=sys.stderr)
    return ProxyExit.PROBLEMS_FOUND if problems else ProxyExit.OK


if __name__ == "__main__":
    sys.exit(main())
