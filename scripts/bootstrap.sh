#!/usr/bin/env bash
# Create .venv and install starttls-proxy into it (editable).
# usage: scripts/bootstrap.sh [--test]   (--test adds the test tools)
# Idempotent: does nothing when neither pyproject.toml nor the build of the
# C parts (setup.py, starttls_proxy/tls/helper/*.[ch], starttls_proxy/keys/provider/*.[ch],
# starttls_proxy/keys/service/*.[ch], starttls_proxy/keys/*.h, protocols/*.c)
# changed since the last run and all are built.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python=${PYTHON:-python3}
if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
    else
        echo "error: '$python -m venv' does not work; install python3-venv (sudo apt-get install python3-venv)" >&2
        exit 1
    fi
fi
# The TLS helper and the key-reference provider (C) need a compiler and the OpenSSL 3 headers.
if ! command -v cc >/dev/null || [ ! -f /usr/include/openssl/core_dispatch.h ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev libssl-dev
    else
        echo "error: no C compiler or OpenSSL headers, which the TLS helper needs" \
            "(sudo apt-get install gcc libssl-dev)" >&2
        exit 1
    fi
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed$extras"
wanted="$(cat pyproject.toml setup.py starttls_proxy/tls/helper/*.[ch] starttls_proxy/keys/provider/*.[ch] \
    starttls_proxy/keys/service/*.[ch] starttls_proxy/keys/*.h protocols/*.c | sha256sum | cut -d' ' -f1)"
[ -x starttls_proxy/tls/helper/stp-helper ] && [ -f starttls_proxy/keys/provider/keyref.so ] \
    && compgen -G 'starttls_proxy/keys/_service.*.so' >/dev/null \
    && compgen -G 'protocols/_smtp_data.*.so' >/dev/null \
    || rm -f .venv/.installed .venv/.installed\[test\]
# An install with the test tools is also a plain one (run-example.sh after test.sh).
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] \
    && { [ -n "$extras" ] || [ "$(cat '.venv/.installed[test]' 2>/dev/null)" != "$wanted" ]; }; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".$extras"
    echo "$wanted" > "$stamp"
fi
