"""The proxy on ``config.example.yaml`` with private demo backends behind it.

``scripts/run-example.sh`` runs ``python -m tests.realservers.demo CONFIG [PROXY-ARGS...]``
from the checkout.  Each server the example points at (a Postfix, a Dovecot, a Prosody)
is started here with the test suite's own set-up (``postfix.py``, ``dovecot.py``,
``prosody.py``), on loopback, on the fixed ports below (the example's backend addresses)
and in a temporary directory, unless something already answers on one of its ports.
Then the proxy runs in the foreground; once its listeners listen, the commands to try
are printed.  SIGINT, SIGTERM or SIGHUP
stop the proxy, then the servers, and the temporary directory is removed.

Starting the servers needs root (as in the tests); without it, or without the Debian
packages, this says so and runs the proxy alone, whose listeners then answer that the
service is not available.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from tests.realservers.daemons import HOST, INSTALL_HINT, USERS, Daemon, find_program, kill
from tests.realservers.dovecot import DovecotInstance, start_dovecot
from tests.realservers.net import accepts_connections
from tests.realservers.postfix import PostfixInstance, start_postfix
from tests.realservers.prosody import DOMAIN, ProsodyInstance, start_prosody

# Backends, as in config.example.yaml's backend addresses (tests/test_config.py checks).
# Below the kernel's ephemeral range, so the free ports the tests pick never collide.
#: Plain with XCLIENT from the proxy, PROXY protocol, Postfix's own STARTTLS (unused).
POSTFIX_PORTS = (10024, 10026, 10025)
#: IMAP (IMAP ID from the proxy), IMAP PROXY, POP3 (XCLIENT), POP3 PROXY.
DOVECOT_PORTS = (10143, 10144, 10110, 10111)
PROSODY_PORT = 10222

#: The example's listeners, as in config.example.yaml.
SMTP_PORT = 2525
SUBMISSIONS_PORT = 4465
IMAP_PORT = 1143
POP3_PORT = 1110
XMPP_PORT = 15222
PROXY_PORTS = (SMTP_PORT, SUBMISSIONS_PORT, IMAP_PORT, POP3_PORT, XMPP_PORT)

#: Where the printed commands connect from: the backends log this address, not the
#: proxy's (127.0.0.1), which shows that the proxy told them who the client is.
CLIENT_ADDRESS = "127.0.0.2"
USER = "alice"

#: Bounded waits (seconds): the proxy's listeners after its start, its exit after SIGTERM
#: (longer than config.example.yaml's shutdown.drain_timeout).
PROXY_START_TIMEOUT = 60.0
PROXY_STOP_TIMEOUT = 45.0

#: The last line printed once everything is up (the tests wait for it).
READY_LINE = "Ctrl-C stops the proxy and the demo servers."


@dataclass(frozen=True)
class DemoServer:
    """One backend of the example: what it is called, its ports, how to start it."""

    name: str
    program: str
    ports: tuple[int, ...]
    start: Callable[[Path], Daemon]


def _servers(cert: Path, key: Path) -> list[DemoServer]:
    # The backends' own TLS listeners are never used by the demo; any pair will do.
    return [
        DemoServer(
            "Postfix",
            "postfix",
            POSTFIX_PORTS,
            lambda d: start_postfix(d, cert, key, POSTFIX_PORTS),
        ),
        DemoServer(
            "Dovecot",
            "dovecot",
            DOVECOT_PORTS,
            lambda d: start_dovecot(d, cert, key, DOVECOT_PORTS),
        ),
        DemoServer("Prosody", "prosody", (PROSODY_PORT,), lambda d: start_prosody(d, PROSODY_PORT)),
    ]


def _why_not(server: DemoServer) -> str | None:
    """Why ``server`` is not started here, or ``None`` when it should be."""
    answering = [port for port in server.ports if accepts_connections(HOST, port, 0.5)]
    if answering:
        return f"something already answers on {HOST}:{answering[0]}; the proxy uses it"
    if find_program(server.program) is None:
        return f"{server.name} is not installed ({INSTALL_HINT})"
    if os.geteuid() != 0:
        return f"starting {server.name} needs root (run this script as root, or with sudo)"
    return None


def instructions(
    directory: Path, ca: Path, started: Sequence[Daemon], skipped: dict[str, str]
) -> str:
    """What to try, and where to see the result, with the servers ``started`` here.

    ``ca`` is the proxy's (self-signed) certificate, which curl is told to trust.
    """
    password = USERS[USER]
    lines = ["", "starttls-proxy is running on config.example.yaml."]
    for name, reason in skipped.items():
        lines.append(f"No demo {name}: {reason}.")
    if not started:
        lines += [
            "No demo servers: until servers listen on the backend ports of the example,",
            "clients get the protocol's 'service not available' (SMTP 421, IMAP BYE, ...).",
            "",
            "Ctrl-C stops the proxy.",
            "",
        ]
        return "\n".join(lines)
    names = ", ".join(server.name for server in started)
    lines.append(f"Demo servers on {HOST}: {names} (in {directory}, removed at the end).")
    lines.append(f"Try, from another terminal (user {USER}, password {password}):")
    curl = ["curl", "--ssl-reqd", "--cacert", str(ca), "--interface", CLIENT_ADDRESS]
    curl += ["--user", f"{USER}:{password}"]
    for server in started:
        if isinstance(server, PostfixInstance):
            swaks = ["swaks", "--server", f"{HOST}:{SMTP_PORT}", "--tls"]
            swaks += ["--local-interface", CLIENT_ADDRESS, "--to", f"{USER}@example.test"]
            lines += [
                "",
                "SMTP with STARTTLS; the proxy tells Postfix the client's address by XCLIENT:",
                f"  $ {shlex.join(swaks)}",
                f"  The message is delivered to {server.maildir / 'new'}/",
                f"  (its Received: line names [{CLIENT_ADDRESS}], not the proxy's address).",
            ]
        elif isinstance(server, DovecotInstance):
            grep = ["grep", f"rip={CLIENT_ADDRESS}", str(server.log_path)]
            lines += [
                "",
                "IMAP with STARTTLS (IMAP ID to Dovecot), POP3 with STLS (PROXY v2 to Dovecot):",
                f"  $ {shlex.join([*curl, f'imap://{HOST}:{IMAP_PORT}/'])}",
                f"  $ {shlex.join([*curl, f'pop3://{HOST}:{POP3_PORT}/'])}",
                f"  Dovecot logs each login with the client's address (rip={CLIENT_ADDRESS}):",
                f"  $ {shlex.join(grep)}",
            ]
        elif isinstance(server, ProsodyInstance):
            stream = (
                f'<stream:stream to="{DOMAIN}" xmlns="jabber:client" '
                'xmlns:stream="http://etherx.jabber.org/streams" version="1.0">'
            )
            plain = base64.b64encode(f"\0{USER}\0{password}".encode()).decode()
            auth = (
                f'<auth xmlns="urn:ietf:params:xml:ns:xmpp-sasl" mechanism="PLAIN">{plain}</auth>'
            )
            s_client = ["openssl", "s_client", "-brief", "-starttls", "xmpp"]
            s_client += ["-xmpphost", DOMAIN, "-connect", f"{HOST}:{XMPP_PORT}"]
            # s_client hangs up at the end of its input: the sleep gives Prosody time to answer.
            xmpp = f"(printf %s {shlex.quote(stream + auth)}; sleep 2) | {shlex.join(s_client)}"
            grep = ["grep", "Authenticated as", str(server.log_path)]
            lines += [
                "",
                "XMPP with STARTTLS; Prosody answers the stream and the login (SASL PLAIN):",
                f"  $ {xmpp}",
                "  The reply ends with <success .../>, and Prosody logs it:",
                f"  $ {shlex.join(grep)}",
            ]
    lines += ["", READY_LINE, ""]
    return "\n".join(lines)


class _Stopper:
    """Turns SIGINT, SIGTERM and SIGHUP into one orderly stop (a second one: SIGKILL)."""

    def __init__(self) -> None:
        self.requested = False
        self.proxy: subprocess.Popen[bytes] | None = None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.proxy is not None:
            if self.requested:
                # The proxy runs in a process group of its own (see _start_proxy).
                kill(self.proxy.pid, signal.SIGKILL, group=True)
            else:
                kill(self.proxy.pid, signal.SIGTERM, group=False)
        self.requested = True


def _start_proxy(config: Path, arguments: Sequence[str]) -> subprocess.Popen[bytes]:
    # Its own process group: a Ctrl-C in the terminal reaches only this launcher,
    # which then stops the proxy once, and the servers after it.
    return subprocess.Popen(
        [sys.executable, "-m", "starttls_proxy", "--config", str(config), *arguments],
        stdin=subprocess.DEVNULL,
        process_group=0,
    )


def _listening_ports() -> set[int]:
    """Ports with a listening TCP socket on this machine (IPv4).

    Read from /proc rather than by connecting: a test connection would show up in the
    proxy's log as a session that closed at once, the first thing a new user reads.
    """
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":  # TCP_LISTEN
            ports.add(int(local.rpartition(":")[2], 16))
    return ports


def _wait_for_listeners(proxy: subprocess.Popen[bytes], stopper: _Stopper) -> bool:
    """Whether every listener of the example listens before the proxy or the user gives up."""
    deadline = time.monotonic() + PROXY_START_TIMEOUT
    while proxy.poll() is None and not stopper.requested and time.monotonic() < deadline:
        if _listening_ports().issuperset(PROXY_PORTS):
            return True
        time.sleep(0.1)
    return False


def _wait_for_exit(proxy: subprocess.Popen[bytes], stopper: _Stopper) -> int:
    """The proxy's exit status, once it exits by itself or after a stop was requested
    (SIGKILL to its group if it is still there :data:`PROXY_STOP_TIMEOUT` seconds later)."""
    stop_deadline: float | None = None
    while (status := proxy.poll()) is None:
        if stopper.requested and stop_deadline is None:
            stop_deadline = time.monotonic() + PROXY_STOP_TIMEOUT
        if stop_deadline is not None and time.monotonic() > stop_deadline:
            kill(proxy.pid, signal.SIGKILL, group=True)
            return proxy.wait()
        time.sleep(0.1)
    return status


def run(config: Path, arguments: Sequence[str]) -> int:
    """Start what is missing, run the proxy until a signal; the proxy's exit status."""
    stopper = _Stopper()
    config = config.absolute()
    certificate = config.parent / "example-certs" / "cert.pem"
    key = config.parent / "example-certs" / "key.pem"
    directory = Path(tempfile.mkdtemp(prefix="stp-demo-"))
    started: list[Daemon] = []
    skipped: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        for server in _servers(certificate, key):
            reason = _why_not(server)
            if stopper.requested:
                return 0
            if reason is not None:
                # Now as well as with the commands: a proxy that cannot start
                # (e.g. isolation.mode strict without root) never gets to those.
                print(f"No demo {server.name}: {reason}.", file=sys.stderr, flush=True)
                skipped[server.name] = reason
                continue
            print(f"starting a demo {server.name} on {HOST}...", file=sys.stderr, flush=True)
            try:
                daemon = stack.enter_context(server.start(directory / server.program))
            except (RuntimeError, OSError, ValueError) as error:
                print(error, file=sys.stderr, flush=True)
                skipped[server.name] = "it did not start (why: above, before the proxy's log)"
                continue
            started.append(daemon)
        if stopper.requested:
            return 0
        proxy = _start_proxy(config, arguments)
        stopper.proxy = proxy
        if _wait_for_listeners(proxy, stopper):
            print(instructions(directory, certificate, started, skipped), flush=True)
        status = _wait_for_exit(proxy, stopper)
        if started:
            names = ", ".join(server.name for server in started)
            print(f"stopping the demo {names}...", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(
            "usage: python -m tests.realservers.demo CONFIG [PROXY-ARGUMENTS...]", file=sys.stderr
        )
        return 2
    return run(Path(argv[0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
