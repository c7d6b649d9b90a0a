"""Process and log helpers shared by the real-server fixtures (Postfix, Dovecot, ...)."""

from __future__ import annotations

import abc
import contextlib
import grp
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self, TypeVar, overload

from tests.realservers.fs import ensure_traversable, make_dirs
from tests.realservers.net import free_port, wait_until

#: Where every test daemon listens.
HOST = "127.0.0.1"
#: Accounts on the mail and XMPP servers: name -> password.
USERS: dict[str, str] = {"alice": "alicepw", "bob": "bobpw"}
INSTALL_HINT = "run `sudo scripts/install-system-deps.sh` to install it"

#: Bounded waits (seconds).
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
#: How often a daemon is started on new free ports when one was taken meanwhile.
START_ATTEMPTS = 3

_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_program(name: str) -> str | None:
    """Locate ``name`` on ``$PATH`` or in the sbin directories (root's PATH may lack them)."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{_SBIN_PATH}")


def installed(program: str, package: str) -> str:
    """Where ``program`` is (see :func:`find_program`); :class:`RuntimeError`
    saying that ``package`` is not installed when it is nowhere."""
    path = find_program(program)
    if path is None:
        raise RuntimeError(f"{package} is not installed; {INSTALL_HINT}")
    return path


def tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text`` (for error messages)."""
    return "\n".join(text.splitlines()[-lines:])


def kill(pid: int, sig: signal.Signals, *, group: bool) -> None:
    """Send ``sig`` to process ``pid`` (or to process group ``pid``); ignore it if gone."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to ``process``; if it has not exited after :data:`STOP_TIMEOUT`
    seconds, SIGKILL to its whole process group and wait as long again."""
    kill(process.pid, signal.SIGTERM, group=False)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill(process.pid, signal.SIGKILL, group=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)


def require_root(name: str) -> None:
    """Raise :class:`RuntimeError` unless running as root, which starting ``name`` needs."""
    if os.geteuid() != 0:
        raise RuntimeError(f"starting {name} needs root (its master binds ports and chowns)")


def prepare_base(base: Path, subdirs: Iterable[str]) -> Path:
    """Create ``base`` and ``subdirs`` below it (mode 755); return ``base`` made absolute.

    The ancestors are made traversable: the daemons read their files as unprivileged users.
    """
    base = base.absolute()
    make_dirs(base)
    ensure_traversable(base)
    for sub in subdirs:
        make_dirs(base / sub)
    return base


def nobody_ids() -> tuple[int, int]:
    """uid of ``nobody`` and gid of ``nogroup``, who own the test mailboxes."""
    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid


def run_command(
    command: list[str], timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (bounded by ``timeout`` seconds) and capture its text output."""
    return subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )


def read_log(path: Path) -> str:
    """The whole file at ``path``, or ``""`` while it does not exist yet."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


@dataclass(frozen=True)
class ProcessStat:
    """What ``/proc/PID/stat`` says of a process."""

    pid: int
    #: One letter: R running, S sleeping, Z zombie, ...
    state: str
    parent: int
    group: int
    session: int


def process_table() -> list[ProcessStat]:
    """Every process, from ``/proc`` (those that end meanwhile left out)."""
    table: list[ProcessStat] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After "pid (command)": state, ppid, pgrp, session, ...
        state, parent, group, session = stat.rpartition(")")[2].split()[:4]
        table.append(ProcessStat(int(entry.name), state, int(parent), int(group), int(session)))
    return table


def live_group_members(group: int) -> list[int]:
    """PIDs of the processes in process group ``group``, zombies left out.

    When a master exits first, its children's zombies wait for init to reap them, which
    can take seconds; they hold no ports or files any more.
    """
    return [p.pid for p in process_table() if p.group == group and p.state != "Z"]


def wait_for_group_exit(group: int, timeout: float) -> bool:
    """Wait until process group ``group`` has no live member; ``False`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while live_group_members(group):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def distinct_free_ports(count: int, host: str) -> list[int]:
    """``count`` different ports on ``host`` that were free a moment ago (see ``free_port``)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def port_attempts(
    fixed: Sequence[int] | None, count: int, host: str = HOST
) -> Iterator[tuple[list[int], bool]]:
    """The ports to start a daemon on, each try with whether it is the last.

    ``fixed`` ports (``count`` of them) are tried once: whoever chose them wants those or
    nothing.  Otherwise free ports, :data:`START_ATTEMPTS` times, since ``free_port()``
    races with other processes.
    """
    if fixed is not None:
        if len(fixed) != count:
            raise ValueError(f"{count} ports wanted, got {list(fixed)}")
        yield list(fixed), True
        return
    for attempt in range(1, START_ATTEMPTS + 1):
        yield distinct_free_ports(count, host), attempt == START_ATTEMPTS


_D = TypeVar("_D", bound="Daemon")


def start_on_ports(
    fixed: Sequence[int] | None,
    count: int,
    start: Callable[[list[int]], tuple[_D, str | None]],
    host: str = HOST,
) -> _D:
    """The daemon ``start(ports)`` returned, with why it did not start
    (``None``: it did), on the ports of :func:`port_attempts`: again on new
    ones while the reason is a port another process took meanwhile.

    Raises :class:`RuntimeError` with the reason otherwise.
    """
    for ports, last in port_attempts(fixed, count, host):
        daemon, error = start(ports)
        if error is None:
            return daemon
        if last or "already in use" not in error:
            raise RuntimeError(error)
    raise AssertionError("unreachable")


def _poll(
    read: Callable[[], str], pick: Callable[[str], str | None], timeout: float, wanted: str
) -> str:
    """Poll ``read()`` until ``pick`` finds something in its result; return what it found.

    Raises :class:`TimeoutError` saying what was ``wanted``, with the tail of the last
    result, after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        content = read()
        found = pick(content)
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no {wanted} after {timeout} s; tail:\n{tail(content)}")
        time.sleep(0.05)


def wait_for_text(read: Callable[[], str], text: str, timeout: float, what: str) -> str:
    """Poll ``read()`` until its result contains ``text``; return that result.

    ``what`` names the source in the :class:`TimeoutError` (e.g. "the Postfix log").
    """
    return _poll(
        read, lambda content: content if text in content else None, timeout, f"{text!r} in {what}"
    )


def wait_for_line(read: Callable[[], str], parts: Sequence[str], timeout: float, what: str) -> str:
    """Poll ``read()`` until one of its lines contains every string in ``parts``; return it."""

    def pick(content: str) -> str | None:
        lines = content.splitlines()
        return next((line for line in lines if all(part in line for part in parts)), None)

    return _poll(read, pick, timeout, f"line with {list(parts)!r} in {what}")


class Stoppable(abc.ABC):
    """Something a ``with`` block stops when it ends."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class InDirectory:
    """A path below a daemon's ``directory``, read as an attribute of the daemon."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    @overload
    def __get__(self, daemon: None, owner: type[Daemon]) -> Self: ...

    @overload
    def __get__(self, daemon: Daemon, owner: type[Daemon]) -> Path: ...

    def __get__(self, daemon: Daemon | None, owner: type[Daemon]) -> Path | Self:
        return self if daemon is None else daemon.directory.joinpath(*self.parts)


@dataclass(kw_only=True)
class Daemon(Stoppable):
    """Life cycle shared by the real-server instances (the subclasses are dataclasses).

    A subclass provides ``ports`` and ``_terminate()``, which ends the daemon and all
    its processes and returns whether there was anything to end.
    """

    #: What the daemon is called in error messages.
    name: ClassVar[str]
    #: Where the daemon logs.
    log_path: ClassVar[InDirectory]
    #: Where the daemon keeps its configuration, state and logs.
    directory: Path
    host: str = HOST
    #: The launched command, or ``None`` when stopped.
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    #: What ``_launch`` was given, for ``restart``.
    _launched: tuple[list[str], Path, Callable[[], str]] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def ports(self) -> list[int]:
        """All listener ports."""
        raise NotImplementedError

    def _terminate(self) -> bool:
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether the daemon is up once its ports listen (a subclass may check more)."""
        return True

    def log(self) -> str:
        """The whole log so far (empty before the daemon wrote anything).

        A daemon logs slightly after the dialogue that caused a line: use
        :meth:`wait_for_log` or :meth:`wait_for_line` to wait for one.
        """
        return read_log(self.log_path)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Poll until ``text`` occurs in the log; return the log.

        Raises :class:`TimeoutError` (with the log's tail) after ``timeout`` seconds.
        """
        return wait_for_text(self.log, text, timeout, f"the {self.name} log")

    def wait_for_line(self, *parts: str, since: int = 0, timeout: float = 10.0) -> str:
        """Poll until a line of ``log()[since:]`` contains every one of ``parts``; return it.

        Take ``since = len(daemon.log())`` before a dialogue to ignore older lines, e.g.
        ``wait_for_line("imap-login: Info: Login: user=<alice>", "rip=127.0.0.5,", since=mark)``.
        Raises :class:`TimeoutError` (with the log's tail) after ``timeout`` seconds.
        """
        return wait_for_line(lambda: self.log()[since:], parts, timeout, f"the {self.name} log")

    def stop(self) -> None:
        """Stop the daemon and wait until its ports are closed; idempotent, bounded."""
        if self._terminate() and not wait_until(
            self.host, self.ports, listening=False, timeout=STOP_TIMEOUT
        ):
            raise RuntimeError(f"{self.name} in {self.directory} still listens on {self.ports}")

    def restart(self) -> None:
        """Stop the daemon and start it again as it was (the robustness runs'
        "backend down, then back")."""
        if self._launched is None:
            raise RuntimeError(f"{self.name} in {self.directory} was never started")
        self.stop()
        error = self._launch(*self._launched)
        if error is not None:
            raise RuntimeError(error)

    def _launch(self, command: list[str], output_path: Path, log: Callable[[], str]) -> str | None:
        """Run ``command`` until every port listens and :meth:`_ready`; else say why not.

        The command runs in a session of its own (so its process group can be killed)
        with stdout and stderr in ``output_path``.  After :data:`START_TIMEOUT` seconds,
        or when it exits first, it is terminated and an explanation returned, with its
        output and what ``log()`` gained meanwhile.
        """
        self._launched = (command, output_path, log)
        log_start = len(log())
        with output_path.open("wb") as output:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self._process
        deadline = time.monotonic() + START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if wait_until(self.host, self.ports, listening=True, timeout=0) and self._ready():
                return None
            time.sleep(0.05)
        exit_status = process.poll()
        self._terminate()
        reason = (
            f"`{shlex.join(command)}` exited with status {exit_status}"
            if exit_status is not None
            else f"not ready on {self.ports} after {START_TIMEOUT} s"
        )
        return (
            f"{self.name} in {self.directory} did not start: {reason}\n"
            f"--- output ---\n{output_path.read_text(errors='replace')}\n"
            f"--- log tail ---\n{tail(log()[log_start:])}"
        )
