"""The OpenSSL provider that keeps private keys out of the TLS workers.

The private keys live in the key server (``keys.server``) alone. What the TLS
helper loads instead of each key is a *key reference* (a PEM block of our
own, written by ``keys.server.encode_reference``) carrying only public facts.
The provider in this directory (C, ``keyref.so``, built by ``pip install``
through ``setup.py``) decodes it, lets OpenSSL compare it with the
certificate (the mismatch failsafe still works), and turns every signature
into a round trip to the key server over a socket that the worker was
handed (``Attachment``).

The provider is loaded through ``OPENSSL_CONF``, which the keeper sets for
the TLS helper only (``write_openssl_config``): no other process of the
proxy ever maps it. This module imports no cryptography (the keeper uses it).
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

#: The shared object ``setup.py`` builds next to this file.
LIBRARY = Path(__file__).with_name("keyref.so")
#: The name of the provider in the OpenSSL configuration.
PROVIDER_NAME = "starttls_keyref"


def missing() -> str | None:
    """Why the key server cannot be used here (its C parts are not built), or None."""
    if not LIBRARY.is_file():
        return (
            f"the key-reference provider {LIBRARY} is not built: reinstall with "
            "`pip install -e .` (needs gcc and libssl-dev)"
        )
    if importlib.util.find_spec("starttls_proxy.keys._service") is None:
        return (
            "the key server's request loop (starttls_proxy.keys._service) is not built: "
            "reinstall with `pip install -e .` (needs gcc and libssl-dev)"
        )
    return None


def write_openssl_config(directory: Path) -> Path:
    """An OpenSSL configuration that loads the provider next to the default one.

    ``default_properties`` keeps every fetch that asks for no provider on
    the default one (the provider's key manager makes no keys).
    """
    path = directory / "openssl.cnf"
    path.write_text(
        "openssl_conf = starttls_proxy_init\n"
        "[starttls_proxy_init]\n"
        "providers = starttls_proxy_providers\n"
        "alg_section = starttls_proxy_algorithms\n"
        "[starttls_proxy_providers]\n"
        "default = starttls_proxy_default\n"
        f"{PROVIDER_NAME} = starttls_proxy_keyref\n"
        "[starttls_proxy_default]\n"
        "activate = 1\n"
        "[starttls_proxy_keyref]\n"
        f"module = {LIBRARY}\n"
        "activate = 1\n"
        "[starttls_proxy_algorithms]\n"
        "default_properties = ?provider=default\n"
    )
    return path


class Attachment:
    """The provider's ``starttls_keyref_attach``, looked up before any fork
    (a worker cannot open the library once sandboxed)."""

    def __init__(self) -> None:
        self._attach = ctypes.CDLL(str(LIBRARY)).starttls_keyref_attach
        self._attach.argtypes = (ctypes.c_int,)

    def __call__(self, fd: int) -> None:
        """Sign through ``fd`` from now on, in this process only."""
        self._attach(fd)
