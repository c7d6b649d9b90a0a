#!/usr/bin/env bash
# Benchmark starttls-proxy next to stunnel, nginx mail and the backends (issues 7 and 13).
#
# Usage: sudo scripts/bench.sh [--quick] [python -m bench options...]
#   --quick         short windows, ECDSA only, a few hundred idle sessions (under two minutes)
#   --help          all options (protocols, targets, workloads, key types, output path)
#
# Installs what it needs (idempotent): the test suite's Debian packages (Postfix, Dovecot),
# stunnel4 and nginx with its mail module, the project into .venv with its test extras
# (the real-server fixtures use trustme), and matplotlib for the plots. Then runs
# `python -m bench`, which writes docs/benchmarks.md (build/bench/benchmarks.md with --quick),
# its plots and results.json. Needs root: it starts Postfix, Dovecot, stunnel and nginx on
# 127.0.0.1 only. Run it on an otherwise idle machine: the figures are CPU time and rates.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench.sh: must run as root (it installs packages and starts mail servers)" >&2
    exit 1
fi

scripts/install-system-deps.sh

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}
# nginx-light has no mail module in Debian 12; nginx + libnginx-mod-mail does.
missing=()
for pkg in stunnel4 nginx libnginx-mod-mail; do
    is_installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -ne 0 ]; then
    echo "bench.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

scripts/bootstrap.sh --test
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q matplotlib

exec .venv/bin/python -m bench "$@"
