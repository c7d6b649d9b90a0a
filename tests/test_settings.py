"""The TLS and isolation settings: validated once at the keeper, rebuilt without pydantic."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from starttls_proxy.privileged.helper_start import HELPER, HelperStartError
from starttls_proxy.privileged.keeper import checked_configuration
from starttls_proxy.settings import (
    ConfigError,
    IsolationConfig,
    IsolationMode,
    TLSConfig,
    checked,
    decode,
    encode,
)

UNUSUAL_ISOLATION = {
    "mode": "best-effort",
    "uid_range": [300_000, 500],
    "chroot": "/srv/empty",
    "memory_limit": "32MiB",
    "spare_workers": 0,
    "main_user": None,
    "max_helper_restarts": 2,
    "restart_window": 1.5,
    "layers": {"seccomp": False, "namespaces": False},
    "key_server": False,
    "self_test": True,
}
TLS = {
    "certificates": [
        {"cert": "/etc/a/cert.pem", "key": "/etc/a/key.pem"},
        {"cert": "/etc/b/cert.pem", "key": "/etc/b/key.pem"},
    ],
    "min_version": "1.3",
}


@pytest.mark.parametrize("isolation", [{}, UNUSUAL_ISOLATION])
def test_decode_rebuilds_what_was_checked_and_encoded(isolation: dict[str, object]) -> None:
    expected = checked(IsolationConfig, isolation, "isolation")
    # Through JSON, as between the keeper and the helper.
    rebuilt = decode(IsolationConfig, json.loads(json.dumps(encode(expected))))
    assert rebuilt == expected
    tls = checked(TLSConfig, TLS, "tls")
    assert decode(TLSConfig, json.loads(json.dumps(encode(tls)))) == tls


def test_the_unusual_values_arrive_typed() -> None:
    isolation = decode(IsolationConfig, encode(checked(IsolationConfig, UNUSUAL_ISOLATION, "x")))
    assert isolation.mode is IsolationMode.BEST_EFFORT
    assert isolation.uid_range == (300_000, 500)
    assert isolation.chroot == Path("/srv/empty")
    assert isolation.memory_limit == 32 * 2**20
    assert isolation.main_user is None
    assert not isolation.layers.seccomp and isolation.layers.chroot


@pytest.mark.parametrize(
    ("isolation", "problem"),
    [
        (
            {"uid_range": [0, 10]},
            "isolation.uid_range.0: Input should be greater than or equal to 1",
        ),
        (
            {"spare_workers": 257},
            "isolation.spare_workers: Input should be less than or equal to 256",
        ),
        ({"layers": {"seccom": False}}, "isolation.layers.seccom: Unexpected keyword argument"),
        ({"uid_range": [2**32 - 10, 100]}, "uid_range goes beyond the largest UID"),
    ],
)
def test_checked_names_each_problem(isolation: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        checked(IsolationConfig, isolation, "isolation")
    assert any(problem in line for line in refused.value.problems), refused.value.problems


def test_the_keeper_refuses_what_the_main_process_should_never_send() -> None:
    """The main process runs unprivileged; the root processes trust the keeper."""
    message = json.dumps({"tls": TLS, "isolation": {"uid_range": [0, 10]}}).encode()
    with pytest.raises(HelperStartError) as refused:
        checked_configuration(message)
    assert refused.value.problems == [
        "isolation.uid_range.0: Input should be greater than or equal to 1"
    ]
    for garbage in (b"not json", b"[1]", json.dumps({"tls": TLS}).encode()):
        with pytest.raises(HelperStartError, match="unusable configuration message"):
            checked_configuration(garbage)


def test_the_tls_helper_is_a_c_executable_without_python() -> None:
    """Every worker is a fork of the helper: what it holds, each worker copies
    and tears down. The helper is C (``tls/helper/``) and must stay so: an ELF
    executable that loads no Python interpreter (nor pydantic, YAML, lxml or
    the protocol machines with it)."""
    assert HELPER.read_bytes()[:4] == b"\x7fELF"
    libraries = subprocess.run(
        ["ldd", str(HELPER)], capture_output=True, text=True, check=True
    ).stdout
    assert "libssl" in libraries and "libc.so" in libraries, libraries
    assert "python" not in libraries.lower(), libraries
