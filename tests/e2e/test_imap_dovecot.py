"""End to end: IMAP clients -> starttls-proxy -> a real Dovecot on loopback.

Dovecot runs with ``disable_plaintext_auth = yes``; clients connect from
127.0.0.x other than 127.0.0.1, so only the proxy's PROXY v2 SSL TLV (or
its trusted ``ID`` from 127.0.0.1) lets them log in.
"""

from __future__ import annotations

import imaplib
import re
import subprocess
import uuid

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.dovecot import DovecotInstance, message_to_bob, pipelined_login
from tests.realservers.net import sourced
from tests.realservers.proxy import ProxyProcess

BODY = (
    b"Hello through the proxy.\r\n"
    b"a1 STARTTLS\r\n"
    b"* CAPABILITY IMAP4rev1 STARTTLS\r\n"
    b".\r\n"
    b"caf\xc3\xa9 8-bit {5}\r\n"
)


@pytest.fixture(scope="module")
def dovecot_protocol() -> str:
    return "imap"


def _append_and_fetch(client: imaplib.IMAP4, token: str) -> bytes:
    sent = message_to_bob(token, BODY)
    status, _ = client.append("INBOX", None, None, sent)
    assert status == "OK"
    client.select("INBOX")
    status, found = client.search(None, "SUBJECT", token)
    assert status == "OK" and found[0], found
    number = found[0].split()[-1]
    status, data = client.fetch(number, "(BODY.PEEK[])")
    assert status == "OK"
    first = data[0]
    assert isinstance(first, tuple)
    return first[1]


def _capabilities(client: imaplib.IMAP4) -> set[str]:
    status, data = client.capability()
    assert status == "OK"
    return set(data[0].decode().split())


@pytest.mark.parametrize(("name", "source"), [("proxyv2", "127.0.0.50"), ("imapid", "127.0.0.51")])
def test_imaplib_starttls_append_fetch_byte_identical(
    dovecot_proxy: ProxyProcess,
    dovecot: DovecotInstance,
    test_certs: CertFiles,
    name: str,
    source: str,
) -> None:
    token = uuid.uuid4().hex
    since = len(dovecot.log())
    client = sourced(imaplib.IMAP4, source)("localhost", dovecot_proxy.ports[name], timeout=20)
    before = _capabilities(client)
    assert {"STARTTLS", "LOGINDISABLED"} <= before
    assert not any(atom.startswith("AUTH=") for atom in before)
    with pytest.raises(imaplib.IMAP4.error):
        client.login("alice", "alicepw")  # refused before STARTTLS
    client.starttls(ssl_context=test_certs.client_context())
    after = _capabilities(client)
    assert not after & {"STARTTLS", "LOGINDISABLED"}
    client.login("alice", "alicepw")
    assert _append_and_fetch(client, token) == message_to_bob(token, BODY)
    client.logout()
    line = dovecot.wait_for_line("Login: user=<alice>", f"rip={source}", since=since)
    assert "secured" in line


def test_implicit_tls(dovecot_proxy: ProxyProcess, test_certs: CertFiles) -> None:
    token = uuid.uuid4().hex
    client = imaplib.IMAP4_SSL(
        "localhost",
        dovecot_proxy.ports["implicit"],
        ssl_context=test_certs.client_context(),
        timeout=20,
    )
    assert "STARTTLS" not in _capabilities(client)
    client.login("bob", "bobpw")
    assert _append_and_fetch(client, token) == message_to_bob(token, BODY)
    client.logout()


def test_curl_imap_ssl_reqd(dovecot_proxy: ProxyProcess, test_certs: CertFiles) -> None:
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", str(test_certs.ca),
         "--interface", "127.0.0.52", "-u", "alice:alicepw",
         f"imap://localhost:{dovecot_proxy.ports['proxyv2']}/", "-X", "LIST \"\" *"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert b"INBOX" in result.stdout


def test_openssl_s_client_starttls_imap(dovecot_proxy: ProxyProcess, test_certs: CertFiles) -> None:
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{dovecot_proxy.ports['proxyv2']}",
         "-starttls", "imap", "-CAfile", str(test_certs.ca), "-verify_return_error",
         "-servername", "localhost", "-crlf", "-quiet"],
        input="c1 CAPABILITY\nc2 LOGOUT\n", capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert "c1 OK" in result.stdout, result.stdout + result.stderr
    capability_lines = re.findall(r"^\* CAPABILITY .*$", result.stdout, re.MULTILINE)
    assert capability_lines
    assert all("STARTTLS" not in line for line in capability_lines)


def test_starttls_pipelined_command_injection(
    dovecot_proxy: ProxyProcess, dovecot: DovecotInstance, test_certs: CertFiles
) -> None:
    upgrade_and_login = b"a STARTTLS\r\nb LOGIN bob bobpw\r\n"
    with pipelined_login(
        dovecot_proxy, dovecot, test_certs, "127.0.0.53", upgrade_and_login, b"a OK"
    ) as tls:
        tls.sendall(b"c SELECT INBOX\r\n")
        # Had the pipelined LOGIN reached Dovecot, SELECT would succeed.
        replies = b""
        while not re.search(rb"^c ", replies, re.MULTILINE):
            chunk = tls.recv(4096)
            assert chunk, replies
            replies += chunk
        assert re.search(rb"^c (NO|BAD) ", replies, re.MULTILINE), replies
        tls.sendall(b"d LOGOUT\r\n")
