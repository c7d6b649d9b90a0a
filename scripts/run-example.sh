#!/usr/bin/env bash
# Install what is needed, then run the proxy in the foreground on config.example.yaml,
# with private demo backends (Postfix, Dovecot, Prosody on loopback) where nothing
# answers on the example's backend ports; Ctrl-C stops them all. Starting the demo
# backends needs root and the Debian packages of scripts/install-system-deps.sh.
# Idempotent; extra arguments go to starttls-proxy (e.g. --log-level debug).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
[ -s example-certs/cert.pem ] || .venv/bin/python scripts/make-example-cert.py example-certs
exec .venv/bin/python -m tests.realservers.demo config.example.yaml "$@"
