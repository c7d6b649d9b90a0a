"""A real Postfix 3.7 instance on loopback, started and stopped by the tests.

The instance lives entirely in one base directory (``postfix -c BASE/conf``); nothing
under ``/etc/postfix`` is read or written apart from the package's own meta files, no
DNS lookups are made, and everything is logged to ``BASE/maillog`` (no syslog needed).
It follows ``real-servers.md`` section 2, with free ports instead of fixed ones::

    BASE/conf/main.cf, master.cf   configuration
    BASE/queue/                    queue_directory (master.pid in queue/pid/)
    BASE/data/                     data_directory, owned by postfix
    BASE/mail/inbox/{new,cur,tmp}  the one Maildir, owned by nobody:nogroup
    BASE/maillog                   maillog_file (written by postlogd)
    BASE/start-fg.out              output of ``postfix start-fg``

Three smtpd listeners on 127.0.0.1 (see :class:`PostfixInstance`): plain with XCLIENT
allowed from 127.0.0.1, PROXY-protocol (v1 or v2) required, and one offering STARTTLS
itself.  Every recipient ``@example.test`` is delivered by ``virtual(8)`` to the single
Maildir.  Starting needs root (the master binds, chowns and drops privileges).

Delivered files store lines with LF endings: Postfix strips the CRLF of each SMTP line
on receipt and writes a bare LF.  :func:`message_body` turns them back into CRLF.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tests.realservers.daemons import (
    HOST,
    STOP_TIMEOUT,
    Daemon,
    InDirectory,
    find_program,
    installed,
    kill,
    nobody_ids,
    prepare_base,
    require_root,
    run_command,
    start_on_ports,
    tail,
)


@dataclass
class PostfixInstance(Daemon):
    """A running standalone Postfix (see :func:`start_postfix`).

    Listeners, all on ``host`` (127.0.0.1):

    ``plain_port``
        smtpd without TLS and without PROXY protocol; ``smtpd_authorized_xclient_hosts
        = 127.0.0.1``, so a client connecting from 127.0.0.1 (the proxy) may send XCLIENT.
    ``proxy_port``
        smtpd with ``smtpd_upstream_proxy_protocol = haproxy`` (a PROXY v1 or v2 header
        is required before the banner is sent), without TLS.
    ``tls_port``
        smtpd offering STARTTLS itself with the given certificate (for benchmarks).
    """

    plain_port: int
    proxy_port: int
    tls_port: int
    name: ClassVar[str] = "Postfix"

    # -- paths -------------------------------------------------------------------------

    #: The configuration directory passed as ``postfix -c``.
    conf_dir = InDirectory("conf")

    #: The Maildir that receives every message for ``@example.test``.
    maildir = InDirectory("mail", "inbox")

    #: Postfix's log file (``maillog_file``), which :meth:`log` reads.
    log_path = InDirectory("maillog")

    #: Where the output of ``postfix start-fg`` goes.
    start_output_path = InDirectory("start-fg.out")

    #: The master's PID file.
    master_pid_path = InDirectory("queue", "pid", "master.pid")

    @property
    def ports(self) -> list[int]:
        """All listener ports."""
        return [self.plain_port, self.proxy_port, self.tls_port]

    # -- observation -------------------------------------------------------------------

    def master_pid(self) -> int | None:
        """The master's PID from its PID file, or ``None`` if not (yet) written."""
        try:
            text = self.master_pid_path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _ready(self) -> bool:
        """Up once the master has written its PID file, not merely bound the ports."""
        return self.master_pid() is not None

    def delivered(self) -> list[bytes]:
        """Raw bytes of every file in the Maildir's ``new/``, oldest first (by mtime)."""
        new = self.maildir / "new"
        if not new.is_dir():
            return []
        files = [(p.stat().st_mtime_ns, p.name, p) for p in new.iterdir() if p.is_file()]
        return [p.read_bytes() for _, _, p in sorted(files)]

    def wait_for_delivery(self, count: int, timeout: float = 20.0) -> list[bytes]:
        """Poll until at least ``count`` messages are in ``new/``; return all of them.

        Raises :class:`TimeoutError` (with the maillog's tail) after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            messages = self.delivered()
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(messages)} of {count} messages delivered after {timeout} s; "
                    f"maillog tail:\n{tail(self.log())}"
                )
            time.sleep(0.05)

    def clear_mailbox(self) -> None:
        """Delete every delivered message (``new/`` and ``cur/``)."""
        for sub in ("new", "cur"):
            directory = self.maildir / sub
            if directory.is_dir():
                for path in directory.iterdir():
                    path.unlink(missing_ok=True)

    # -- life cycle --------------------------------------------------------------------

    def _terminate(self) -> bool:
        """Stop the master and reap ``start-fg``; return whether there was anything to stop.

        ``postfix -c DIR stop`` first; if the master is still there after
        :data:`STOP_TIMEOUT` seconds, SIGKILL to the master and to the process groups
        of the master and of ``start-fg``.
        """
        process, self._process = self._process, None
        if process is None:
            return False
        master = self.master_pid()
        postfix = find_program("postfix")
        if process.poll() is None and postfix is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    [postfix, "-c", str(self.conf_dir), "stop"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=STOP_TIMEOUT,
                    check=False,
                )
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)
        if master is not None and _is_postfix_master(master):
            kill(master, signal.SIGKILL, group=False)
            kill(master, signal.SIGKILL, group=True)
        if process.poll() is None:
            kill(process.pid, signal.SIGKILL, group=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)
        return True


def _is_postfix_master(pid: int) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return exe.endswith("/master")


# -- configuration ---------------------------------------------------------------------

_MAIN_CF = """\
# Generated by tests/realservers/postfix.py: standalone instance, loopback only.
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = backend.test
mydomain = test
mydestination =
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_banner = $myhostname ESMTP postfix-backend
alias_maps =
alias_database =
relayhost =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtputf8_enable = yes
# never add or rewrite headers (Date:, Message-ID:, unqualified addresses), whatever the
# client address: by default only clients matching $inet_interfaces get that treatment
local_header_rewrite_clients =
# many test connections from 127.0.0.x: no anvil limits
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
# the reload test and the benchmarks hold hundreds of sessions open at once
default_process_limit = 1000
# no DNS at all (the resolver may be off-host or absent)
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
# every recipient @example.test lands in ONE Maildir: {base}/mail/inbox/new/
virtual_mailbox_domains = example.test
virtual_mailbox_base = {base}/mail
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
# no syslog: log to a file (its path must match maillog_file_prefixes)
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
# TLS only on the tls listener, which overrides the level to "may"
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = none
smtpd_tls_loglevel = 1
"""

_MASTER_CF = """\
# service type  private unpriv chroot wakeup maxproc command
{host}:{plain} inet n - n - - smtpd
  -o smtpd_authorized_xclient_hosts=127.0.0.1
{host}:{proxy} inet n - n - - smtpd
  -o smtpd_upstream_proxy_protocol=haproxy
{host}:{tls} inet n - n - - smtpd
  -o smtpd_tls_security_level=may
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _check_config_path(path: Path) -> str:
    text = str(path)
    if re.search(r"[\s,$]", text):
        raise ValueError(f"Postfix cannot take this path in main.cf: {text!r}")
    return text


def _run_with_tty(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` under ``script`` so that Postfix prints its errors to the tty.

    Without a tty on stderr Postfix logs errors only to syslog (none here) and a bad
    configuration gives a silent exit status 1.
    """
    script = installed("script", "`script` (util-linux)")
    result = run_command([script, "-qec", shlex.join(command), "/dev/null"])
    result.stdout = result.stdout.replace("\r\n", "\n")
    return result


def start_postfix(
    base: Path, cert: Path, key: Path, ports: Sequence[int] | None = None
) -> PostfixInstance:
    """Configure and start a Postfix instance in ``base``; return once it accepts connections.

    ``ports`` are the plain, PROXY and TLS listeners' (default: free ones).  ``base`` is
    created if needed (mode 755, ancestors made traversable for the ``postfix`` and
    ``nobody`` users); ``cert`` (leaf plus chain) and ``key`` are PEM files readable by
    root.  Raises :class:`RuntimeError` with Postfix's output when the configuration check
    or the start fails, or when not running as root.
    """
    require_root("Postfix")
    postfix = installed("postfix", "Postfix")

    base = prepare_base(base, ("conf", "queue", "data", "mail"))
    uid, gid = nobody_ids()
    os.chown(base / "data", pwd.getpwnam("postfix").pw_uid, -1)
    os.chown(base / "mail", uid, gid)

    conf = base / "conf"
    (conf / "main.cf").write_text(
        _MAIN_CF.format(
            base=_check_config_path(base),
            host=HOST,
            cert=_check_config_path(cert.absolute()),
            key=_check_config_path(key.absolute()),
            uid=uid,
            gid=gid,
        )
    )

    def start(chosen: list[int]) -> tuple[PostfixInstance, str | None]:
        plain, proxy, tls = chosen
        (conf / "master.cf").write_text(
            _MASTER_CF.format(host=HOST, plain=plain, proxy=proxy, tls=tls)
        )
        check = _run_with_tty([postfix, "-c", str(conf), "check"])
        if check.returncode != 0 or "fatal:" in check.stdout:
            raise RuntimeError(
                f"`postfix -c {conf} check` failed (exit {check.returncode}):\n{check.stdout}"
            )
        instance = PostfixInstance(directory=base, plain_port=plain, proxy_port=proxy, tls_port=tls)
        error = instance._launch(
            [postfix, "-c", str(conf), "start-fg"], instance.start_output_path, instance.log
        )
        return instance, error

    return start_on_ports(ports, 3, start)


# -- message helpers -------------------------------------------------------------------


def _split_message(raw: bytes) -> tuple[list[bytes], bytes, bool]:
    """Header lines (with endings), body, and whether the blank line was a bare LF."""
    lines = raw.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            return lines[:index], b"".join(lines[index + 1 :]), line == b"\n"
    return lines, b"", False


def message_body(raw: bytes) -> bytes:
    """Everything after the first blank line of ``raw``, with CRLF line endings.

    ``raw`` is a delivered file (:meth:`PostfixInstance.delivered`).  Postfix stores
    each received line with a bare LF; this puts the CRLF back, which gives exactly the
    body the client sent (after SMTP dot-unstuffing): a bare CR sent inside a line is
    kept by Postfix and survives the round trip.  If the header ended with CRLF instead,
    the body is returned unchanged.
    """
    _, body, lf_storage = _split_message(raw)
    return body.replace(b"\n", b"\r\n") if lf_storage else body


def header_values(raw: bytes, name: str) -> list[str]:
    """All values of header ``name`` (case-insensitive), unfolded, in file order.

    Leading and trailing whitespace is stripped; bytes that are not UTF-8 are kept as
    surrogate escapes.
    """
    header_lines, _, _ = _split_message(raw)
    fields: list[bytes] = []
    for line in header_lines:
        stripped = line.rstrip(b"\r\n")
        if stripped[:1] in (b" ", b"\t") and fields:
            fields[-1] += stripped
        else:
            fields.append(stripped)
    wanted = name.lower().encode("ascii")
    values: list[str] = []
    for entry in fields:
        field_name, colon, value = entry.partition(b":")
        if colon and field_name.strip().lower() == wanted:
            values.append(value.strip().decode("utf-8", errors="surrogateescape"))
    return values


def header(raw: bytes, name: str) -> str | None:
    """The first value of header ``name`` in ``raw`` (see :func:`header_values`), or None."""
    values = header_values(raw, name)
    return values[0] if values else None
