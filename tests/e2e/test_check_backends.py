"""``starttls-proxy --check-backends`` against the real Postfix, Dovecot,
Prosody and ejabberd of the test suite, each in a right and a wrong
configuration: the exact finding and the fix it prints."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from starttls_proxy.proxy.doctor_report import OWN_STARTTLS
from tests.realservers.certs import CertFiles
from tests.realservers.dovecot import DovecotInstance, start_dovecot
from tests.realservers.ejabberd import EjabberdInstance
from tests.realservers.postfix import PostfixInstance
from tests.realservers.prosody import DOMAIN, ProsodyInstance
from tests.realservers.proxy import listener

#: Where the Dovecot that does not trust the proxy listens: connections from
#: 127.0.0.1 to it are neither trusted nor local-to-local, so not secured.
UNTRUSTING_HOST = "127.0.0.2"
PROXY_REQUIRED = (
    "if this port expects a PROXY header (Postfix smtpd_upstream_proxy_protocol, Dovecot "
    "haproxy = yes, ejabberd use_proxy_protocol), set backend.identity: proxy-v2 or use a "
    "port without it"
)
XMPP_PROXY_UNEXPECTED = (
    "ejabberd: use_proxy_protocol: true on this listener; Prosody reads no PROXY header "
    "(short of the community module mod_net_proxy): backend.identity: none"
)


def check_backends(
    directory: Path, certs: CertFiles, *listeners: dict[str, Any]
) -> tuple[int, str]:
    """Run ``--check-backends`` on a configuration of ``listeners``."""
    for number, entry in enumerate(listeners):
        entry.setdefault("listen", f"127.0.0.1:{40000 + number}")
        entry.setdefault("timeouts", {"backend_connect": 5})
    config = {
        "tls": {"certificates": [{"cert": str(certs.cert), "key": str(certs.key)}]},
        "listeners": list(listeners),
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "starttls_proxy", "--config", str(path), "--check-backends"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


def rows(output: str, name: str) -> list[tuple[str, str]]:
    """The (check, result) rows of listener ``name``."""
    found = []
    for line in output.splitlines()[1:]:
        listener_name, _, rest = line.partition("  ")
        if listener_name.strip() == name:
            check, _, result = rest.strip().partition("  ")
            found.append((check.strip(), result.strip()))
    return found


@pytest.fixture(scope="module")
def untrusting_dovecot(
    tmp_path_factory: pytest.TempPathFactory, test_certs: CertFiles
) -> Iterator[DovecotInstance]:
    """A Dovecot on 127.0.0.2 whose login_trusted_networks leaves the proxy out."""
    with start_dovecot(
        tmp_path_factory.mktemp("dovecot-untrusting"),
        test_certs.cert,
        test_certs.key,
        host=UNTRUSTING_HOST,
        trusted="192.0.2.0/24",
    ) as instance:
        yield instance


def test_postfix_right(tmp_path: Path, test_certs: CertFiles, postfix: PostfixInstance) -> None:
    status, out = check_backends(
        tmp_path,
        test_certs,
        listener("xclient", postfix.plain_port, backend={"identity": "xclient"}),
        listener("proxyv2", postfix.proxy_port, backend={"identity": "proxy-v2"}),
    )
    assert status == 0, out
    assert ("identity", "accepted: XCLIENT ADDR=192.0.2.10 answered 220") in rows(out, "xclient")
    assert ("identity", "accepted: greeted after the proxy-v2 header") in rows(out, "proxyv2")
    for name in ("xclient", "proxyv2"):
        assert ("verdict", "usable") in rows(out, name)
        assert ("login", "no AUTH offered") in rows(out, name)


def test_postfix_wrong(tmp_path: Path, test_certs: CertFiles, postfix: PostfixInstance) -> None:
    status, out = check_backends(
        tmp_path,
        test_certs,
        listener("xclient", postfix.tls_port, backend={"identity": "xclient"}),
        listener("proxyv2", postfix.plain_port, backend={"identity": "proxy-v2"}),
        listener("none", postfix.proxy_port),
    )
    assert status == 1, out
    # Its tls port: no XCLIENT for the proxy, and a STARTTLS of its own.
    assert rows(out, "xclient")[-4:] == [
        ("PROBLEM", "backend does not offer XCLIENT to the proxy"),
        ("fix", "Postfix: add 127.0.0.1 to smtpd_authorized_xclient_hosts (main.cf, or -o on "
         "this smtpd service in master.cf)"),
        ("note", OWN_STARTTLS),
        ("verdict", "NOT USABLE"),
    ]  # fmt: skip
    # How far its session got depends on whether Postfix's answer to the
    # header came in the read of its greeting; the finding does not.
    proxyv2 = rows(out, "proxyv2")
    assert ("PROBLEM", "the backend greets before any PROXY header (220 backend.test ESMTP "
            "postfix-backend): it does not expect one and would read the header as a "
            "command") in proxyv2, out  # fmt: skip
    assert ("fix", "Postfix: -o smtpd_upstream_proxy_protocol=haproxy on this smtpd service in "
            "master.cf (or backend.identity: xclient)") in proxyv2, out  # fmt: skip
    assert proxyv2[-1] == ("verdict", "NOT USABLE"), out
    assert rows(out, "none")[-3:] == [
        ("PROBLEM", "no greeting: no answer from the backend within 5 s"),
        ("fix", PROXY_REQUIRED),
        ("verdict", "NOT USABLE"),
    ]


def test_dovecot_right(tmp_path: Path, test_certs: CertFiles, dovecot: DovecotInstance) -> None:
    status, out = check_backends(
        tmp_path,
        test_certs,
        listener("imapid", dovecot.imap_port, "imap", backend={"identity": "imap-id"}),
        listener("proxyv2", dovecot.imap_proxy_port, "imap", backend={"identity": "proxy-v2"}),
        listener("pop3", dovecot.pop3_port, "pop3", backend={"identity": "pop3-xclient"}),
    )
    assert status == 0, out
    assert ("login", "SASL-IR AUTH=PLAIN AUTH=LOGIN") in rows(out, "imapid")
    assert ("login", "SASL-IR AUTH=PLAIN AUTH=LOGIN") in rows(out, "proxyv2")
    assert ("identity", "accepted: XCLIENT ADDR=192.0.2.10 answered +OK") in rows(out, "pop3")
    assert ("login", "AUTH-RESP-CODE SASL PLAIN LOGIN") in rows(out, "pop3")
    # Dovecot offers STARTTLS itself on these ports (ssl = yes): a note, not a problem.
    assert ("note", OWN_STARTTLS) in rows(out, "imapid")


def test_dovecot_wrong(
    tmp_path: Path,
    test_certs: CertFiles,
    dovecot: DovecotInstance,
    untrusting_dovecot: DovecotInstance,
) -> None:
    untrusting = {"address": f"{UNTRUSTING_HOST}:{untrusting_dovecot.imap_port}"}
    status, out = check_backends(
        tmp_path,
        test_certs,
        listener("proxyv2", dovecot.imap_port, "imap", backend={"identity": "proxy-v2"}),
        listener("proxyv1", dovecot.imap_proxy_port, "imap", backend={"identity": "proxy-v1"}),
        listener("imapid", 0, "imap", backend={"identity": "imap-id", **untrusting}),
        listener(
            "pop3",
            0,
            "pop3",
            backend={
                "identity": "pop3-xclient",
                "address": f"{UNTRUSTING_HOST}:{untrusting_dovecot.pop3_port}",
            },
        ),
    )
    assert status == 1, out
    # As for Postfix: the notes after the finding depend on the reads' timing.
    proxyv2 = rows(out, "proxyv2")
    problem = proxyv2.index(
        ("PROBLEM", "the backend greets before any PROXY header (* OK [CAPABILITY IMAP4rev1 "
         "SASL-IR LOGIN-REFERRALS ID ENA...): it does not expect one and would "
         "read the header as a command")
    )  # fmt: skip
    assert proxyv2[problem + 1] == (
        "fix",
        "Dovecot: haproxy = yes in this inet_listener, and haproxy_trusted_networks = 127.0.0.1",
    ), out
    assert proxyv2[-1] == ("verdict", "NOT USABLE"), out
    login_disabled = (
        "PROBLEM",
        "the backend advertises LOGINDISABLED to the proxy's sessions: the users' LOGIN will fail",
    )
    assert rows(out, "proxyv1")[-5:-2] == [
        ("login", "refused (LOGINDISABLED)"),
        login_disabled,
        ("fix", "PROXY v1 cannot tell Dovecot that the client used TLS: backend.identity: "
         "proxy-v2 (its SSL TLV does)"),
    ]  # fmt: skip
    assert rows(out, "imapid")[-5:-2] == [
        ("login", "refused (LOGINDISABLED)"),
        login_disabled,
        ("fix", "Dovecot: login_trusted_networks = 127.0.0.1 (the proxy's connections then "
         "count as secured)"),
    ]  # fmt: skip
    assert rows(out, "pop3")[-4:-1] == [
        ("PROBLEM", "backend does not offer XCLIENT to the proxy: add the proxy's address to "
         "Dovecot's login_trusted_networks"),
        ("fix", "Dovecot: add 127.0.0.1 to login_trusted_networks"),
        ("note", OWN_STARTTLS),
    ]  # fmt: skip


def test_prosody(tmp_path: Path, test_certs: CertFiles, prosody: ProsodyInstance) -> None:
    xmpp: dict[str, Any] = {"protocol": "xmpp-client", "domains": [DOMAIN], "hostname": DOMAIN}
    status, out = check_backends(
        tmp_path,
        test_certs,
        listener("none", prosody.port, **xmpp),
        listener("proxyv2", prosody.port, backend={"identity": "proxy-v2"}, **xmpp),
    )
    assert status == 1, out
    (login,) = [result for check, result in rows(out, "none") if check == "login"]
    # Prosody lists its mechanisms in no fixed order.
    assert sorted(login.split()) == [
        "PLAIN",
        "SASL",
        "SASL",
        "SASL",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
    ]
    assert ("verdict", "usable") in rows(out, "none")
    assert rows(out, "proxyv2")[-3:] == [
        ("PROBLEM", "no session: backend stream error: not-well-formed"),
        ("fix", XMPP_PROXY_UNEXPECTED),
        ("verdict", "NOT USABLE"),
    ]


def test_ejabberd(tmp_path: Path, test_certs: CertFiles, ejabberd: EjabberdInstance) -> None:
    xmpp: dict[str, Any] = {"protocol": "xmpp-client", "domains": [DOMAIN], "hostname": DOMAIN}
    status, out = check_backends(
        tmp_path,
        test_certs,
        listener("proxyv2", ejabberd.proxy_port, backend={"identity": "proxy-v2"}, **xmpp),
        listener("plain", ejabberd.port, backend={"identity": "proxy-v2"}, **xmpp),
        listener("none", ejabberd.proxy_port, **xmpp),
    )
    assert status == 1, out
    right = rows(out, "proxyv2")
    assert ("identity", "accepted: greeted after the proxy-v2 header") in right
    assert ("note", OWN_STARTTLS) in right
    assert right[-1] == ("verdict", "usable")
    assert rows(out, "plain")[-3:] == [
        ("PROBLEM", "no session: backend stream error: not-well-formed"),
        ("fix", XMPP_PROXY_UNEXPECTED),
        ("verdict", "NOT USABLE"),
    ]
    assert rows(out, "none")[-3:] == [
        ("PROBLEM", "no greeting: backend closed (internal-server-error)"),
        ("fix", PROXY_REQUIRED),
        ("verdict", "NOT USABLE"),
    ]
