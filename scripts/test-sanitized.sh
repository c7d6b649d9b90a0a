#!/usr/bin/env bash
# The TLS helper built with AddressSanitizer and UndefinedBehaviorSanitizer,
# driven by the protocol end-to-end tests (real Postfix, Dovecot, Prosody,
# ejabberd and real clients). A sanitizer report in the proxy's log fails
# the test that started it (tests/realservers/proxy.py), and a worker that a
# report aborts breaks its session.
#
# The sanitized binary takes the place of the normal one for the run, which
# is put back afterwards. The workers' seccomp filter stays on, so the
# sanitizers' runtime must make do without what it refuses: LeakSanitizer
# stops the world with ptrace (and a worker's memory goes with its exit
# anyway).
# usage: scripts/test-sanitized.sh [pytest arguments]   (after scripts/test.sh set up .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
helper=starttls_proxy/tlshelper/stp-helper
cp -p "$helper" "$helper.normal"
trap 'mv -f "$helper.normal" "$helper"' EXIT
gcc -std=c11 -Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer \
    -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -o "$helper" starttls_proxy/tlshelper/*.c -lssl -lcrypto
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:print_legend=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
.venv/bin/python -m pytest -p no:randomly \
    tests/e2e/test_smtp_postfix.py tests/e2e/test_imap_dovecot.py \
    tests/e2e/test_pop3_dovecot.py tests/e2e/test_xmpp_prosody_ejabberd.py \
    tests/tlshelper "$@"
