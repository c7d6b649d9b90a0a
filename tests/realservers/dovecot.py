"""A real Dovecot 2.3 (IMAP + POP3) instance on loopback, started and stopped by the tests.

The instance lives entirely in one base directory (``dovecot -c BASE/dovecot.conf``);
nothing under ``/etc/dovecot`` is read.  It follows ``real-servers.md`` section 3, with
free ports instead of fixed ones::

    BASE/dovecot.conf           configuration
    BASE/users                  passwd-file with alice/alicepw and bob/bobpw (see USERS)
    BASE/run/                   base_dir (master.pid, sockets)
    BASE/state/                 state_dir
    BASE/mail/USER/Maildir/     each user's mailbox, owned by nobody:nogroup
    BASE/dovecot.log            log_path (everything Dovecot logs)
    BASE/dovecot-fg.out         output of ``dovecot -F`` (errors before logging starts)

One instance serves every case (see :class:`DovecotInstance` for the listeners).  Plaintext
LOGIN needs a session Dovecot considers *secured* (``disable_plaintext_auth = yes``), and
Dovecot 2.3 calls a session secured when any of these holds when the connection arrives:
it is TLS (STARTTLS, or a PROXY v2 header with the PP2_TYPE_SSL TLV), the client address
is in ``login_trusted_networks``, or the client address equals the local address.  With a
PROXY header the client address is the header's source.  ``login_trusted_networks`` is
therefore only :data:`TRUSTED_CLIENT` (127.0.0.1, where the proxy connects from): a
``/8`` would also trust the source 127.0.0.5 of a PROXY header and let it log in without
TLS.  Tests that want Dovecot's own TLS enforcement to matter must present a client
address other than 127.0.0.1 (e.g. connect to the proxy from 127.0.0.5).

Dovecot 2.3 ignores the ``x-client-transport`` ID field and the ``CLIENT-TRANSPORT``
XCLIENT attribute: on the plain listeners the session is secured because the
connection comes from a trusted network, whatever the transport claims.

Starting needs root (the master binds, chowns and drops privileges).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tests.realservers.certs import CertFiles
from tests.realservers.daemons import (
    HOST,
    STOP_TIMEOUT,
    USERS,
    Daemon,
    InDirectory,
    installed,
    kill,
    nobody_ids,
    prepare_base,
    require_root,
    run_command,
    start_on_ports,
    wait_for_group_exit,
)
from tests.realservers.dialogue import read_until
from tests.realservers.proxy import ProxyProcess, listener

#: The only client address Dovecot trusts to send ID x-originating-ip / POP3 XCLIENT.
TRUSTED_CLIENT = "127.0.0.1"
#: Mail users (passwd-file, plaintext passwords): name -> password.


def message_to_bob(token: str, body: bytes) -> bytes:
    """A message from alice to bob whose subject is ``token``, to find it by."""
    headers = f"From: alice@client.test\r\nTo: bob@example.test\r\nSubject: {token}\r\n\r\n"
    return headers.encode() + body


@contextlib.contextmanager
def pipelined_login(
    proxy: ProxyProcess,
    dovecot: DovecotInstance,
    certs: CertFiles,
    source: str,
    upgrade_and_login: bytes,
    accepted: bytes,
) -> Iterator[ssl.SSLSocket]:
    """CVE-2011-0411 through the proxy's ``proxyv2`` listener: a client that
    sends bob's login in the segment of its upgrade command. The block gets
    the session once the upgrade (whose reply starts with ``accepted``) is
    done, to show bob is not logged in; after it the proxy has logged the
    discarded bytes and Dovecot no login of bob's."""
    since = len(dovecot.log())
    sock = proxy.connect("proxyv2", source)
    read_until(sock, b"\r\n")
    sock.sendall(upgrade_and_login)
    assert read_until(sock, b"\r\n").startswith(accepted)
    tls = certs.client_context().wrap_socket(sock, server_hostname="localhost")
    yield tls
    tls.close()
    proxy.wait_for_log("bytes after the TLS upgrade command; discarded")
    assert "user=<bob>" not in dovecot.log()[since:]


#: Protocol -> the proxy listener that tells Dovecot who the client is with
#: the protocol's own command (trusted from TRUSTED_CLIENT), and that identity.
NATIVE_IDENTITY = {"imap": ("imapid", "imap-id"), "pop3": ("xclient", "pop3-xclient")}


@dataclass
class DovecotInstance(Daemon):
    """A running standalone Dovecot (see :func:`start_dovecot`).

    Listeners, all on ``host`` (127.0.0.1), with ``disable_plaintext_auth = yes``
    everywhere:

    ``imap_port``, ``pop3_port``
        Plain IMAP / POP3 without PROXY protocol.  Dovecot offers STARTTLS / STLS itself
        (``ssl = yes``, for benchmarks).  Clients from :data:`TRUSTED_CLIENT` are in
        ``login_trusted_networks``: their sessions count as secured, and they may
        override the client address with IMAP ``ID ("x-originating-ip" ...)`` or POP3
        ``XCLIENT ADDR=...``.
    ``imap_proxy_port``, ``pop3_proxy_port``
        ``haproxy = yes``: a PROXY v1 or v2 header is required first
        (``haproxy_trusted_networks = 127.0.0.0/8``).  LOGIN / USER+PASS is refused
        (IMAP advertises LOGINDISABLED) unless the header's source is 127.0.0.1 or a v2
        header carries the PP2_TYPE_SSL TLV.
    """

    imap_port: int
    imap_proxy_port: int
    pop3_port: int
    pop3_proxy_port: int
    name: ClassVar[str] = "Dovecot"

    # -- paths -------------------------------------------------------------------------

    #: The configuration file passed as ``dovecot -c``.
    config_path = InDirectory("dovecot.conf")

    #: Dovecot's log file (``log_path``).
    log_path = InDirectory("dovecot.log")

    #: Where the output of ``dovecot -F`` goes.
    start_output_path = InDirectory("dovecot-fg.out")

    @property
    def ports(self) -> list[int]:
        """All listener ports."""
        return [self.imap_port, self.imap_proxy_port, self.pop3_port, self.pop3_proxy_port]

    def proxy_listeners(self, protocol: str) -> list[dict[str, Any]]:
        """The proxy's listeners in front of this Dovecot for ``protocol``
        (``imap`` or ``pop3``): ``proxyv2`` says who the client is in a PROXY v2
        header, the one named in :data:`NATIVE_IDENTITY` in the protocol's own
        command, and ``implicit`` is TLS from the first byte, with PROXY v2."""
        port, proxy_port = self.protocol_ports[protocol]
        native_name, native_identity = NATIVE_IDENTITY[protocol]
        proxy_v2 = {"identity": "proxy-v2"}
        return [
            listener("proxyv2", proxy_port, protocol, backend=proxy_v2),
            listener(native_name, port, protocol, backend={"identity": native_identity}),
            listener("implicit", proxy_port, protocol, tls="implicit", backend=proxy_v2),
        ]

    @property
    def protocol_ports(self) -> dict[str, tuple[int, int]]:
        """Protocol -> its plain port and its PROXY port."""
        return {
            "imap": (self.imap_port, self.imap_proxy_port),
            "pop3": (self.pop3_port, self.pop3_proxy_port),
        }

    def mailbox_path(self, user: str) -> Path:
        """The Maildir of ``user`` (created by Dovecot at the user's first login)."""
        if user not in USERS:
            raise KeyError(f"no such Dovecot test user: {user!r}")
        return self.directory / "mail" / user / "Maildir"

    # -- observation -------------------------------------------------------------------

    def master_pid(self) -> int | None:
        """PID of the master (also its process group id); ``None`` when stopped."""
        return None if self._process is None else self._process.pid

    # -- life cycle --------------------------------------------------------------------

    def _ready(self) -> bool:
        """Whether both plain listeners greet, which Dovecot does once auth is up.

        Stopping a Dovecot whose login processes still wait for the auth and stats
        services takes seconds longer.
        """
        return all(_greets(self.host, port) for port in (self.imap_port, self.pop3_port))

    def _terminate(self) -> bool:
        """Stop the master and its children; return whether there was anything to stop.

        SIGTERM to the master, which stops its children; anything of its process group
        still alive after :data:`STOP_TIMEOUT` seconds gets SIGKILL.
        """
        process, self._process = self._process, None
        if process is None:
            return False
        # The master runs in a session of its own (start_new_session), and its children
        # stay in its process group: the group id stays taken while a member lives, so
        # signalling the group never reaches an unrelated process.
        group = process.pid
        kill(group, signal.SIGTERM, group=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)
        if process.poll() is None or not wait_for_group_exit(group, STOP_TIMEOUT):
            kill(group, signal.SIGKILL, group=True)
            process.wait(STOP_TIMEOUT)
            if not wait_for_group_exit(group, STOP_TIMEOUT):
                raise RuntimeError(f"Dovecot processes of group {group} survive SIGKILL")
        return True


def _greets(host: str, port: int) -> bool:
    """Whether a connection to ``host:port`` gets a positive IMAP or POP3 greeting."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            return sock.recv(4).startswith((b"* OK", b"+OK"))
    except OSError:
        return False


# -- configuration ---------------------------------------------------------------------

_DOVECOT_CONF = """\
# Generated by tests/realservers/dovecot.py: standalone instance, loopback only.
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = imap pop3
listen = {host}
default_internal_user = dovecot
default_login_user = dovenull
verbose_proctitle = no
auth_verbose = yes
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_dh = </usr/share/dovecot/dh.pem
# LOGIN/PLAIN only on secured sessions: TLS (also the PROXY v2 SSL TLV), a trusted
# client address, or client address == local address
disable_plaintext_auth = yes
auth_mechanisms = plain login
# a /8 would trust the proxied source of every PROXY header on loopback too
login_trusted_networks = {trusted}
haproxy_trusted_networks = 127.0.0.0/8
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {base}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {base}/users
}}
mail_location = maildir:~/Maildir
"""

#: Appended once for "imap" and once for "pop3".
_PROTOCOL_CONF = """\
# many test sessions of one user from one address (the default is 10)
protocol {protocol} {{
  mail_max_userip_connections = 1000
}}
# one long-lived login process serves many connections (the default forks per connection)
service {protocol}-login {{
  service_count = 0
  process_min_avail = 2
  inet_listener {protocol} {{
    address = {host}
    port = {port}
  }}
  inet_listener {protocol}s {{
    port = 0
  }}
  inet_listener {protocol}_haproxy {{
    address = {host}
    port = {proxy_port}
    haproxy = yes
  }}
}}
"""


def _check_config_path(path: Path) -> str:
    text = str(path)
    if re.search(r"[\s:#{}<$\"']", text):
        raise ValueError(f"Dovecot cannot take this path in its configuration: {text!r}")
    return text


def _write_users(base: Path, uid: int, gid: int) -> None:
    lines = [
        f"{name}:{{PLAIN}}{password}:{uid}:{gid}::{base}/mail/{name}::\n"
        for name, password in USERS.items()
    ]
    users = base / "users"
    users.write_text("".join(lines))
    users.chmod(0o644)


def start_dovecot(
    base: Path,
    cert: Path,
    key: Path,
    ports: Sequence[int] | None = None,
    *,
    host: str = HOST,
    trusted: str = TRUSTED_CLIENT,
) -> DovecotInstance:
    """Configure and start a Dovecot instance in ``base``; return once it accepts connections.

    ``ports`` are the IMAP, IMAP PROXY, POP3 and POP3 PROXY listeners' (default: free
    ones). ``host``: the address every listener binds; ``trusted``: its
    ``login_trusted_networks`` (a Dovecot on 127.0.0.2 that does not trust
    127.0.0.1 shows what an untrusted proxy gets: its connections then come
    from an address other than the local one).

    ``base`` is created if needed (mode 755, ancestors made traversable for Dovecot's
    unprivileged users); ``cert`` (leaf plus chain) and ``key`` are PEM files readable
    by root.  Raises :class:`RuntimeError` with Dovecot's output when the configuration
    check or the start fails, or when not running as root.
    """
    require_root("Dovecot")
    dovecot = installed("dovecot", "Dovecot")
    doveconf = installed("doveconf", "Dovecot")

    base = prepare_base(base, ("run", "state", "mail"))
    uid, gid = nobody_ids()
    os.chown(base / "mail", uid, gid)
    _write_users(base, uid, gid)

    def start(chosen: list[int]) -> tuple[DovecotInstance, str | None]:
        imap, imap_proxy, pop3, pop3_proxy = chosen
        instance = DovecotInstance(
            directory=base,
            host=host,
            imap_port=imap,
            imap_proxy_port=imap_proxy,
            pop3_port=pop3,
            pop3_proxy_port=pop3_proxy,
        )
        instance.config_path.write_text(
            _DOVECOT_CONF.format(
                base=_check_config_path(base),
                host=host,
                cert=_check_config_path(cert.absolute()),
                key=_check_config_path(key.absolute()),
                trusted=trusted,
            )
            + _PROTOCOL_CONF.format(protocol="imap", host=host, port=imap, proxy_port=imap_proxy)
            + _PROTOCOL_CONF.format(protocol="pop3", host=host, port=pop3, proxy_port=pop3_proxy)
        )
        check = run_command([doveconf, "-c", str(instance.config_path), "-n"])
        if check.returncode != 0:
            raise RuntimeError(
                f"`doveconf -c {instance.config_path} -n` failed (exit {check.returncode}):\n"
                f"{check.stderr}"
            )
        error = instance._launch(
            [dovecot, "-F", "-c", str(instance.config_path)],
            instance.start_output_path,
            instance.log,
        )
        return instance, error

    return start_on_ports(ports, 4, start, host)
