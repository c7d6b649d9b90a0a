#!/usr/bin/env bash
# The C parts built with AddressSanitizer and UndefinedBehaviorSanitizer:
#
# * the TLS helper and the key-reference provider its workers load, driven
#   by the protocol end-to-end tests (real Postfix, Dovecot, Prosody and
#   ejabberd, the last two also federating, and real clients, through the
#   key server) and tests/tlshelper
#   (whose peer fuzz feeds the provider the key server's replies). A sanitizer report in the
#   proxy's log fails the test that started it (tests/realservers/proxy.py),
#   and a worker that a report aborts breaks its session;
# * the key service (a Python extension), driven by the key server's tests
#   (tests/keyserver, Hypothesis included) in a real, confined key server
#   and in pytest itself;
# * the SMTP DATA body scan (a Python extension), driven by its own tests
#   (Hypothesis against the rule it implements), the SMTP machine's, and
#   the smuggling attacks through a real proxy into the real Postfix.
#   A Python extension cannot bring the ASan runtime: it must be loaded
#   before anything else, so it is preloaded into every Python of that
#   run. A report aborts the key server, the proxy or pytest, which fails
#   the run.
#
# The sanitized builds take the place of the normal ones for the run, which
# are put back afterwards. LeakSanitizer stays off: the workers' seccomp
# filter refuses the ptrace it stops the world with (and a worker's memory
# goes with its exit anyway), and Python leaks at exit by design.
# usage: scripts/test-sanitized.sh [pytest arguments]   (after scripts/test.sh set up .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
helper=starttls_proxy/tls/helper/stp-helper
provider=starttls_proxy/keys/provider/keyref.so
suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
keyservice=starttls_proxy/keys/_service$suffix
bodyscan=protocols/_smtp_data$suffix
built=("$helper" "$provider" "$keyservice" "$bodyscan")
for file in "${built[@]}"; do
    cp -p "$file" "$file.normal"
done
trap 'for file in "${built[@]}"; do mv -f "$file.normal" "$file"; done' EXIT
sanitize=(-std=c11 -Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer
    -fsanitize=address,undefined -fno-sanitize-recover=all)
gcc "${sanitize[@]}" -o "$helper" starttls_proxy/tls/helper/*.c -lssl -lcrypto
gcc "${sanitize[@]}" -shared -fPIC -fvisibility=hidden -Istarttls_proxy/keys \
    -o "$provider" starttls_proxy/keys/provider/*.c
# color=never: choosing colours asks isatty, an ioctl that the key server's
# seccomp filter kills it for halfway through its report.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:print_legend=0:color=never
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:color=never
"$python" -m pytest -p no:randomly \
    tests/e2e/test_smtp_postfix.py tests/e2e/test_imap_dovecot.py \
    tests/e2e/test_pop3_dovecot.py tests/e2e/test_xmpp_prosody_ejabberd.py \
    tests/e2e/test_s2s_peer_certificates.py tests/e2e/test_federation.py \
    tests/tlshelper "$@"
# The Python extensions only now: the proxies of the end-to-end tests above
# start key servers and run the body scan too, without the runtime
# preloaded, which could not load them.
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
gcc "${sanitize[@]}" -shared -fPIC -Istarttls_proxy/keys -I"$include" \
    -o "$keyservice" starttls_proxy/keys/service/*.c -lcrypto
gcc "${sanitize[@]}" -shared -fPIC -I"$include" -o "$bodyscan" protocols/_smtp_data.c
# --capture=sys: a report that aborts pytest itself must reach the terminal,
# not a capture file that goes with it.
LD_PRELOAD="$(gcc -print-file-name=libasan.so)" "$python" -m pytest -p no:randomly \
    --capture=sys tests/keyserver tests/protocols/test_smtp_data.py tests/protocols/test_smtp.py \
    tests/adversarial/test_smuggling.py "$@"
