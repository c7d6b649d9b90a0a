"""Build glue: compile the key-reference OpenSSL provider with the system's C compiler.

The project metadata is in pyproject.toml; this file only adds the
provider (``starttls_proxy/provider/*.c``), a plain shared object that
OpenSSL dlopen()s and Python never imports. It needs a C compiler and
OpenSSL 3 headers (Debian: gcc, libssl-dev) and links the C library only.
The build is optional: without a compiler the package still installs, and
the proxy then refuses ``isolation.key_server: true`` with a message naming
what is missing (``starttls_proxy.provider.missing``).
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = sorted(str(path) for path in Path("starttls_proxy/provider").glob("*.c"))


class BuildProvider(build_ext):
    """Name the object ``keyref.so``: it is an OpenSSL module, not a Python extension."""

    def get_ext_filename(self, fullname: str) -> str:
        return str(Path(*fullname.split("."))) + ".so"


setup(
    ext_modules=[
        Extension(
            "starttls_proxy.provider.keyref",
            sources=SOURCES,
            depends=["starttls_proxy/provider/keyref.h"],
            extra_compile_args=["-std=c11", "-fvisibility=hidden", "-Wall", "-Wextra"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildProvider},
)
