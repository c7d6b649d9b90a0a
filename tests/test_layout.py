"""The package's layout holds what each process may import.

What a process imports is both its attack surface and, for the ones that
fork or live as root, its cost: the main process faces the network and
must never reach the code that holds keys or builds sandboxes; the root
processes must never load a parser of untrusted input; the protocol
machines do no I/O at all. Two kinds of check: every ``import`` statement
written in a package (lazy ones included), and what really ends up in
``sys.modules`` when a process's entry module is imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "starttls_proxy"

#: Packages of the processes that hold keys, build sandboxes or run as root.
PRIVATE = ("tls", "sandbox", "keys", "privileged")
#: Standard modules that do I/O, which no protocol machine may import.
IO_MODULES = {"asyncio", "socket", "selectors", "select", "ssl", "subprocess", "os", "OpenSSL"}
#: Parsers of untrusted input and the event loop's own libraries, which no
#: root process may load (the main process validates; they take canonical JSON).
NOT_AS_ROOT = {"pydantic", "pydantic_core", "yaml", "lxml", "uvloop", "prometheus_client"}


def imports_written_in(directory: Path) -> dict[str, set[str]]:
    """Each module file below ``directory`` and the absolute names it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted(directory.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def modules_loaded_by(*entry_modules: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after importing ``entry_modules``."""
    probe = f"import sys, {', '.join(entry_modules)}; print(*sys.modules)"
    return set(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.split()
    )


def private(name: str) -> bool:
    """Whether the module ``name`` belongs to one of the ``PRIVATE`` packages."""
    return any(f"{name}.".startswith(f"starttls_proxy.{package}.") for package in PRIVATE)


def test_the_main_process_code_names_no_private_package() -> None:
    offending = {
        module: sorted(filter(private, names))
        for module, names in imports_written_in(PACKAGE / "proxy").items()
    }
    assert {module: names for module, names in offending.items() if names} == {}


@pytest.mark.parametrize("package", PRIVATE)
def test_no_private_package_reaches_into_the_main_process(package: str) -> None:
    offending = {
        module: sorted(name for name in names if name.startswith("starttls_proxy.proxy"))
        for module, names in imports_written_in(PACKAGE / package).items()
    }
    assert {module: names for module, names in offending.items() if names} == {}


def test_the_protocol_machines_do_no_io_and_know_no_process() -> None:
    offending = {
        module: sorted(
            name
            for name in names
            if name.split(".")[0] in IO_MODULES or name.startswith("starttls_proxy")
        )
        for module, names in imports_written_in(ROOT / "protocols").items()
    }
    assert {module: names for module, names in offending.items() if names} == {}


def test_the_main_process_loads_no_private_package_and_no_pyopenssl() -> None:
    """Everything the main process imports, the ``--check-backends`` doctor included."""
    entries = [
        f"starttls_proxy.proxy.{path.stem}"
        for path in sorted((PACKAGE / "proxy").glob("*.py"))
        if path.stem != "__init__"
    ]
    loaded = modules_loaded_by("starttls_proxy.cli", *entries)
    assert sorted(filter(private, loaded)) == []
    assert "OpenSSL" not in loaded


@pytest.mark.parametrize(
    "entry", ["starttls_proxy.privileged.keeper", "starttls_proxy.keys.server"]
)
def test_the_root_processes_load_no_parser_of_untrusted_input(entry: str) -> None:
    """The keeper and the key server run as root for the proxy's lifetime:
    no pydantic, YAML, lxml, event loop, metrics, pyOpenSSL (the keeper reads
    the chains with ``cryptography.x509`` alone) or protocol machine."""
    loaded = modules_loaded_by(entry)
    assert sorted(name for name in loaded if name.split(".")[0] in NOT_AS_ROOT | {"OpenSSL"}) == []
    assert sorted(name for name in loaded if name.startswith("protocols.")) in (
        [],
        ["protocols._base"],
    )


def test_the_configuration_reads_protocol_facts_without_importing_machines() -> None:
    """``protocols.facts`` is data: the configuration (and ``--check``) needs
    no protocol machine, nor lxml, to know a protocol's defaults."""
    loaded = modules_loaded_by("starttls_proxy.config")
    assert "lxml" not in loaded
    assert sorted(name for name in loaded if name.startswith("protocols.")) == [
        "protocols._base",
        "protocols.facts",
    ]
