"""Build glue: compile the C parts with the system's C compiler.

The project metadata is in pyproject.toml; this file only adds

* the TLS helper (``starttls_proxy/tls/helper/*.c``), an executable linked
  with the system's libssl that the keeper execs and every TLS worker is a
  fork of;
* the key-reference OpenSSL provider (``starttls_proxy/keys/provider/*.c``), a
  plain shared object that OpenSSL dlopen()s in the TLS workers and Python
  never imports; it links the C library only;
* the key server's request loop (``starttls_proxy/keys/service/*.c``), a
  Python extension linked with the system's libcrypto;
* the SMTP DATA body scan (``protocols/_smtp_data.c``), a Python extension
  that the main process runs over every message body (``protocols/smtp.py``).

All are built with warnings as errors and the hardening flags: each reads
bytes from a process the design assumes may be compromised or from a
client (the helper a client's, the key service a worker's, the provider
the key server's answers, the body scan a client's), so a memory bug in
any is a security bug.

All need a C compiler and OpenSSL 3 headers (Debian: gcc, libssl-dev).
The TLS helper is required; the key server's parts are optional: without
them the proxy refuses ``isolation.key_server: true`` with a message naming
what is missing (``starttls_proxy.keys.provider.missing``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def sources(directory: str) -> list[str]:
    return sorted(str(path) for path in Path(directory).glob("*.c"))


#: Every C part's (setuptools adds -fPIC to the shared objects').
C_FLAGS = [
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wshadow",
    "-Wconversion",
    "-Wno-sign-conversion",
    "-O2",
    "-fstack-protector-strong",
    "-D_FORTIFY_SOURCE=2",
]
LINK_FLAGS = ["-Wl,-z,relro,-z,now"]
HELPER_FLAGS = [*C_FLAGS, "-fPIE"]
HELPER_LINK_FLAGS = [*LINK_FLAGS, "-pie"]


#: What building needs, for the message when it is missing.
TOOLCHAIN_HINT = (
    "starttls-proxy builds its TLS helper from C: it needs a C compiler and the"
    " OpenSSL 3 headers. Install them (Debian, Ubuntu: apt-get install gcc"
    " libssl-dev; Fedora, RHEL: dnf install gcc openssl-devel; Alpine: apk add"
    " build-base openssl-dev), then install starttls-proxy again."
)


class BuildNative(build_ext):
    """Name the provider ``keyref.so`` (an OpenSSL module, not a Python
    extension) and link the TLS helper as an executable."""

    def build_extensions(self) -> None:
        self._require_toolchain()
        super().build_extensions()

    def _require_toolchain(self) -> None:
        """Fail with what to install, before a compiler's own error can bury it."""
        with tempfile.TemporaryDirectory() as directory:
            probe = Path(directory, "probe.c")
            probe.write_text("#include <openssl/ssl.h>\n#include <openssl/core_dispatch.h>\n")
            try:
                self.compiler.compile([str(probe)], output_dir=directory)
            except Exception as error:  # any failure means the same to the user
                raise SystemExit(f"error: {TOOLCHAIN_HINT}\n({error})") from None

    def get_ext_filename(self, fullname: str) -> str:
        # Called with the full dotted name, and with its last part alone
        # (then joined to the package's directory).
        for name, suffix in ((PROVIDER, ".so"), (HELPER, "")):
            if fullname == name:
                return str(Path(*name.split("."))) + suffix
            if fullname == name.rpartition(".")[2]:
                return fullname + suffix
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if ext.name != HELPER:
            super().build_extension(ext)
            return
        objects = self.compiler.compile(
            ext.sources, output_dir=self.build_temp, extra_postargs=ext.extra_compile_args
        )
        self.compiler.link_executable(
            objects,
            self.get_ext_fullpath(ext.name),
            libraries=ext.libraries,
            extra_postargs=ext.extra_link_args,
        )


PROVIDER = "starttls_proxy.keys.provider.keyref"
HELPER = "starttls_proxy.tls.helper.stp-helper"
#: The key server's wire format, which the provider and the key service share
#: (named apart from ``tls/helper/wire.h``, the helper's own).
KEY_INCLUDE = "starttls_proxy/keys"
KEY_WIRE_H = f"{KEY_INCLUDE}/keyserver_wire.h"


setup(
    ext_modules=[
        Extension(
            HELPER,
            sources=sources("starttls_proxy/tls/helper"),
            depends=[str(p) for p in Path("starttls_proxy/tls/helper").glob("*.h")],
            libraries=["ssl", "crypto"],
            extra_compile_args=HELPER_FLAGS,
            extra_link_args=HELPER_LINK_FLAGS,
        ),
        Extension(
            "protocols._smtp_data",
            sources=["protocols/_smtp_data.c"],
            extra_compile_args=C_FLAGS,
            extra_link_args=LINK_FLAGS,
        ),
        Extension(
            PROVIDER,
            sources=sources("starttls_proxy/keys/provider"),
            depends=["starttls_proxy/keys/provider/keyref.h", KEY_WIRE_H],
            include_dirs=[KEY_INCLUDE],
            extra_compile_args=[*C_FLAGS, "-fvisibility=hidden"],
            extra_link_args=LINK_FLAGS,
            optional=True,
        ),
        Extension(
            "starttls_proxy.keys._service",
            sources=sources("starttls_proxy/keys/service"),
            depends=["starttls_proxy/keys/service/signing.h", KEY_WIRE_H],
            include_dirs=[KEY_INCLUDE],
            libraries=["crypto"],
            extra_compile_args=C_FLAGS,
            extra_link_args=LINK_FLAGS,
            optional=True,
        ),
    ],
    cmdclass={"build_ext": BuildNative},
)
