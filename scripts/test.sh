#!/usr/bin/env bash
# Install everything the tests need (Debian packages, Python tools), then run
# the linters, the type checker and the whole test suite (real Postfix included),
# then the protocol end-to-end tests again against a sanitized TLS helper and
# provider, and the key server's tests against a sanitized key service.
# Needs root for the Debian packages and for running the mail servers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-system-deps.sh
scripts/bootstrap.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
# The C parts under AddressSanitizer and UBSan: a step of its own, since it
# swaps their builds for the run.
[ "$#" -gt 0 ] || scripts/test-sanitized.sh
