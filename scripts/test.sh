#!/usr/bin/env bash
# Install everything the tests need (Debian packages, Python tools), then run
# the linters, the type checker and the whole test suite (real Postfix included).
# Needs root for the Debian packages and for running the mail servers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-system-deps.sh
scripts/bootstrap.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
