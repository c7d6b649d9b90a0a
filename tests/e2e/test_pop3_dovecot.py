"""End to end: POP3 clients -> starttls-proxy -> a real Dovecot on loopback.

Dovecot runs with ``disable_plaintext_auth = yes``; clients connect from
127.0.0.x other than 127.0.0.1, so only the proxy's PROXY v2 SSL TLV (or
its trusted XCLIENT) lets them log in.
"""

from __future__ import annotations

import imaplib
import poplib
import subprocess
import uuid

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_until
from tests.realservers.dovecot import DovecotInstance, message_to_bob, pipelined_login
from tests.realservers.net import sourced
from tests.realservers.proxy import ProxyProcess

BODY = (
    b"Hello through the proxy.\r\nSTLS\r\na1 STARTTLS\r\n.\r\n..two dots\r\ncaf\xc3\xa9 8-bit\r\n"
)


@pytest.fixture(scope="module")
def dovecot_protocol() -> str:
    return "pop3"


def _store_for_bob(dovecot: DovecotInstance, token: str) -> bytes:
    """Put a message into bob's INBOX straight through Dovecot (trusted 127.0.0.1)."""
    message = message_to_bob(token, BODY)
    with imaplib.IMAP4("127.0.0.1", dovecot.imap_port) as imap:
        imap.login("bob", "bobpw")
        imap.append("INBOX", None, None, message)
    return message


def _retrieve(client: poplib.POP3, token: str) -> bytes:
    client.user("bob")
    client.pass_("bobpw")
    _, listing, _ = client.list()
    for entry in listing:
        number = int(entry.split()[0])
        _, lines, _ = client.retr(number)
        raw = b"\r\n".join(lines) + b"\r\n"
        if f"Subject: {token}".encode() in raw:
            return raw
    raise AssertionError(f"message {token} not found")


@pytest.mark.parametrize(("name", "source"), [("proxyv2", "127.0.0.40"), ("xclient", "127.0.0.41")])
def test_poplib_stls_retr_byte_identical(
    dovecot_proxy: ProxyProcess,
    dovecot: DovecotInstance,
    test_certs: CertFiles,
    name: str,
    source: str,
) -> None:
    token = uuid.uuid4().hex
    sent = _store_for_bob(dovecot, token)
    since = len(dovecot.log())
    client = sourced(poplib.POP3, source)("localhost", dovecot_proxy.ports[name], timeout=20)
    assert client.getwelcome().startswith(b"+OK proxy.test")  # the proxy's own greeting
    with pytest.raises(poplib.error_proto, match="TLS"):
        client.user("bob")  # no login before STLS
    client.stls(context=test_certs.client_context())
    assert "STLS" not in client.capa()
    assert _retrieve(client, token) == sent
    client.quit()
    line = dovecot.wait_for_line("Login: user=<bob>", f"rip={source}", since=since)
    assert "secured" in line


def test_implicit_tls(
    dovecot_proxy: ProxyProcess, dovecot: DovecotInstance, test_certs: CertFiles
) -> None:
    token = uuid.uuid4().hex
    sent = _store_for_bob(dovecot, token)
    client = poplib.POP3_SSL(
        "localhost",
        dovecot_proxy.ports["implicit"],
        context=test_certs.client_context(),
        timeout=20,
    )
    assert _retrieve(client, token) == sent
    client.quit()


def test_curl_pop3_ssl_reqd(
    dovecot_proxy: ProxyProcess, dovecot: DovecotInstance, test_certs: CertFiles
) -> None:
    token = uuid.uuid4().hex
    _store_for_bob(dovecot, token)
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", str(test_certs.ca),
         "--interface", "127.0.0.42", "-u", "bob:bobpw",
         f"pop3://localhost:{dovecot_proxy.ports['proxyv2']}/"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the message list


def test_openssl_s_client_starttls_pop3(dovecot_proxy: ProxyProcess, test_certs: CertFiles) -> None:
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{dovecot_proxy.ports['proxyv2']}",
         "-starttls", "pop3", "-CAfile", str(test_certs.ca), "-verify_return_error",
         "-servername", "localhost", "-crlf", "-quiet"],
        input="CAPA\nQUIT\n", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert "+OK" in result.stdout, result.stdout + result.stderr
    assert "STLS" not in result.stdout


def test_stls_pipelined_command_injection(
    dovecot_proxy: ProxyProcess, dovecot: DovecotInstance, test_certs: CertFiles
) -> None:
    upgrade_and_login = b"STLS\r\nUSER bob\r\nPASS bobpw\r\n"
    with pipelined_login(
        dovecot_proxy, dovecot, test_certs, "127.0.0.43", upgrade_and_login, b"+OK"
    ) as tls:
        tls.sendall(b"STAT\r\n")
        # Had the pipelined USER/PASS reached Dovecot, STAT would succeed.
        assert read_until(tls, b"\r\n").startswith(b"-ERR")
        tls.sendall(b"QUIT\r\n")
        read_until(tls, b"\r\n")
