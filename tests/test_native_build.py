"""The C parts as ``setup.py`` built them: all hardened alike (its
``C_FLAGS`` and ``LINK_FLAGS``), since each reads bytes from a process that
may be compromised, or from a client. ``scripts/test-sanitized.sh`` swaps in other builds and
does not run this file."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from starttls_proxy.keys import provider
from starttls_proxy.privileged import helper_start


def _extension(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} is not built"
    return Path(spec.origin)


BUILT = {
    "tls-helper": lambda: helper_start.HELPER,
    "provider": lambda: provider.LIBRARY,
    "key-service": lambda: _extension("starttls_proxy.keys._service"),
    "smtp-body-scan": lambda: _extension("protocols._smtp_data"),
}


def _readelf(*arguments: str | Path) -> str:
    return subprocess.run(
        ["readelf", "-W", *arguments], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("part", BUILT)
def test_built_with_the_hardening_flags(part: str) -> None:
    path = BUILT[part]()
    # -Wl,-z,relro,-z,now: relocations resolved at load, then read-only.
    assert "GNU_RELRO" in _readelf("--program-headers", path)
    assert "BIND_NOW" in _readelf("--dynamic", path)
    # -fstack-protector-strong: every part has functions with arrays on the stack.
    assert "__stack_chk_fail" in _readelf("--dyn-syms", path)
