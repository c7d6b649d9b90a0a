"""A description of the machine and the software versions, for the report's header."""

from __future__ import annotations

import os
import platform
import re
import ssl
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from tests.realservers.daemons import find_program


def _first_match(path: str, pattern: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError:
        return "unknown"
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def _output(args: list[str]) -> str | None:
    """stdout and stderr of a program given by name, ``None`` if it cannot be run."""
    program = find_program(args[0])
    if program is None:
        return None
    try:
        result = subprocess.run(
            [program, *args[1:]], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout + result.stderr


def _command(args: list[str], pattern: str) -> str:
    """The first match of ``pattern`` in a command's output."""
    output = _output(args)
    if output is None:
        return "not installed or failed"
    match = re.search(pattern, output, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(root: Path) -> str:
    head = _output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    if not head or head.startswith("fatal"):
        return "unknown"
    return f"{head.strip()}{' + uncommitted changes' if dirty and dirty.strip() else ''}"


def describe(root: Path) -> dict[str, str]:
    """Hardware, kernel and versions of everything measured."""
    memory_kib = _first_match("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    memory = f"{int(memory_kib) / 1024 / 1024:.1f} GiB" if memory_kib.isdigit() else "unknown"
    load = os.getloadavg()
    return {
        "CPU": _first_match("/proc/cpuinfo", r"^model name\s*:\s*(.+)$"),
        "CPUs (nproc)": str(os.cpu_count()),
        "memory": memory,
        "kernel": platform.release(),
        "OS": _first_match("/etc/os-release", r'^PRETTY_NAME="?([^"\n]+)'),
        "load average at start": " ".join(f"{value:.2f}" for value in load),
        "starttls-proxy": _git(root),
        "Python": sys.version.split()[0],
        "OpenSSL (Python)": ssl.OPENSSL_VERSION,
        "pyOpenSSL": _package("pyOpenSSL"),
        "cryptography": _package("cryptography"),
        "uvloop": _package("uvloop"),
        "stunnel": _command(["stunnel4", "-version"], r"^(stunnel \S+)"),
        "nginx": _command(["nginx", "-v"], r"nginx version: (\S+)"),
        "Postfix": _command(["postconf", "-d", "mail_version"], r"mail_version = (\S+)"),
        "Dovecot": _command(["dovecot", "--version"], r"^(\S+)"),
        "OpenSSL (system)": _command(["openssl", "version"], r"^(OpenSSL \S+)"),
    }
