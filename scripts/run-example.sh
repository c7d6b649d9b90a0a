#!/usr/bin/env bash
# Install what is needed, then run the proxy in the foreground on config.example.yaml.
# Idempotent; extra arguments go to starttls-proxy (e.g. --log-level debug).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
[ -s example-certs/cert.pem ] || .venv/bin/python scripts/make-example-cert.py example-certs
exec .venv/bin/starttls-proxy --config config.example.yaml "$@"
