"""Build glue: compile the key server's two C parts with the system's C compiler.

The project metadata is in pyproject.toml; this file only adds

* the key-reference OpenSSL provider (``starttls_proxy/provider/*.c``), a
  plain shared object that OpenSSL dlopen()s in the TLS workers and Python
  never imports; it links the C library only;
* the key server's request loop (``starttls_proxy/keyservice/*.c``), a
  Python extension linked with the system's libcrypto.

Both need a C compiler and OpenSSL 3 headers (Debian: gcc, libssl-dev).
The build is optional: without them the package still installs, and the
proxy then refuses ``isolation.key_server: true`` with a message naming
what is missing (``starttls_proxy.provider.missing``).
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def sources(directory: str) -> list[str]:
    return sorted(str(path) for path in Path(directory).glob("*.c"))


C_FLAGS = ["-std=c11", "-Wall", "-Wextra"]


class BuildProvider(build_ext):
    """Name the provider ``keyref.so``: it is an OpenSSL module, not a Python extension."""

    def get_ext_filename(self, fullname: str) -> str:
        # Called with the full dotted name, and with its last part alone.
        if fullname in (PROVIDER, PROVIDER.rpartition(".")[2]):
            return str(Path(*fullname.split("."))) + ".so"
        return super().get_ext_filename(fullname)


PROVIDER = "starttls_proxy.provider.keyref"


setup(
    ext_modules=[
        Extension(
            PROVIDER,
            sources=sources("starttls_proxy/provider"),
            depends=["starttls_proxy/provider/keyref.h", "starttls_proxy/provider/wire.h"],
            extra_compile_args=[*C_FLAGS, "-fvisibility=hidden"],
            optional=True,
        ),
        Extension(
            "starttls_proxy._keyservice",
            sources=sources("starttls_proxy/keyservice"),
            depends=["starttls_proxy/keyservice/signing.h", "starttls_proxy/provider/wire.h"],
            libraries=["crypto"],
            extra_compile_args=C_FLAGS,
            optional=True,
        ),
    ],
    cmdclass={"build_ext": BuildProvider},
)
