#!/usr/bin/env bash
# Install the Debian packages the test suite needs (real Postfix backend, clients, tools).
#
# Usage: sudo scripts/install-system-deps.sh
#
# Idempotent: when every package is already installed it only runs dpkg-query and exits,
# without touching apt. Nothing is started: /usr/sbin/policy-rc.d (exit 101) keeps the
# postinst scripts from launching daemons, and Postfix is installed with the debconf answer
# "No configuration", so /etc/postfix/main.cf stays absent and no system-wide MTA runs.
# The tests start their own Postfix instance (postfix -c DIR start-fg) on loopback.
#
# To add a package, append it to PACKAGES below.
set -euo pipefail

PACKAGES=(
    postfix              # SMTP backend started by tests/realservers/postfix.py
    swaks                # SMTP client (with --tls)
    libnet-ssleay-perl   # swaks --tls
    libauthen-sasl-perl  # swaks --auth
    curl                 # smtp/imap/pop3 client with --ssl-reqd
    openssl              # openssl s_client -starttls
    iproute2             # ss
    util-linux           # script (gives postfix a tty so errors reach stderr)
    ca-certificates
    libseccomp2          # seccomp filters of the TLS workers (pyseccomp loads it)
    gcc                  # builds the key-reference OpenSSL provider (pip install, setup.py)
    libc6-dev            # C library headers (only recommended by gcc)
    libssl-dev           # OpenSSL 3 headers for that provider (it links libc only)
    prometheus           # promtool check rules (deploy/prometheus/alerts.yml)
    dovecot-core         # IMAP/POP3 backend started by tests/realservers/dovecot.py
    dovecot-imapd
    dovecot-pop3d
    prosody              # XMPP backend (plaintext) started by tests/realservers/prosody.py
    ejabberd             # XMPP backend behind PROXY v2 (tests/realservers/ejabberd.py)
    gnutls-bin           # gnutls-cli --starttls-proto=xmpp
    systemd              # systemd-socket-activate (socket activation test)
    haproxy              # L4 balancer in front of two instances (tests/e2e/test_scale_out.py)
)

# python3-venv only where the interpreter cannot create virtual environments.
if ! python3 -m venv --help >/dev/null 2>&1; then
    PACKAGES+=(python3-venv)
fi

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps.sh: dpkg/apt-get not found; this script supports Debian/Ubuntu only." >&2
    echo "Install these packages by other means: ${PACKAGES[*]}" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-system-deps.sh: all ${#PACKAGES[@]} packages already installed."
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps.sh: missing packages: ${missing[*]}" >&2
    echo "Installing them needs root; run:  sudo scripts/install-system-deps.sh" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# No postinst may start a daemon (postfix would otherwise run with the /etc config).
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi

# Postfix: skip the "General type of mail configuration" question; leave main.cf absent.
debconf-set-selections <<'EOF'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
EOF

echo "install-system-deps.sh: installing: ${missing[*]}"
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"

still_missing=()
for pkg in "${missing[@]}"; do
    is_installed "$pkg" || still_missing+=("$pkg")
done
if [ "${#still_missing[@]}" -ne 0 ]; then
    echo "install-system-deps.sh: still not installed: ${still_missing[*]}" >&2
    exit 1
fi
echo "install-system-deps.sh: done."
