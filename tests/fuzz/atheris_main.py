"""One fuzz target under atheris and libFuzzer, in a process of its own:
``python -m tests.fuzz.atheris_main TARGET [libFuzzer options] [corpus dirs]``.
``python -m tests.fuzz`` runs it for every target and reads its figures."""

from __future__ import annotations

import sys

import atheris
from atheris.import_hook import instrument_imports

# Only the protocol code is instrumented: coverage of the harness, lxml or
# the standard library would only dilute the signal.
with instrument_imports(include=["protocols"]):
    import protocols.proxy_header
    import protocols.registry  # noqa: F401  (every machine and probe)

from tests.fuzz.targets import TARGETS


def main() -> None:
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
