"""End to end: real clients -> starttls-proxy -> a real Postfix on loopback.

Clients connect from 127.0.0.x addresses other than 127.0.0.1 so that
Postfix's log proves which address it was told about.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_smtp_reply, smtp_starttls
from tests.realservers.net import free_port
from tests.realservers.postfix import PostfixInstance, message_body
from tests.realservers.proxy import ProxyProcess, StartProxy, listener

BODY = (
    "Hello through the proxy.\r\n"
    "STARTTLS\r\n"
    ".a line starting with a dot\r\n"
    "..two dots\r\n"
    "caf\u00e9 8-bit\r\n"
    "RCPT TO:<not-a-command@example.test>\r\n"
).encode()


@pytest.fixture(scope="module")
def proxy(module_proxy: StartProxy, postfix: PostfixInstance) -> ProxyProcess:
    dead_port = free_port()
    return module_proxy(
        [
            listener(
                "xclient", postfix.plain_port, require_tls=False, backend={"identity": "xclient"}
            ),
            listener(
                "proxyv2", postfix.proxy_port, require_tls=True, backend={"identity": "proxy-v2"}
            ),
            listener("proxyv1", postfix.proxy_port, backend={"identity": "proxy-v1"}),
            listener(
                "implicit", postfix.proxy_port, tls="implicit", backend={"identity": "proxy-v2"}
            ),
            listener(
                "dead",
                dead_port,
                capabilities=["PIPELINING", "8BITMIME"],
                timeouts={"backend_connect": 2},
            ),
        ],
    )


def _message(subject: str) -> bytes:
    return (
        f"From: alice@client.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + BODY


def _deliver_with_smtplib(
    proxy: ProxyProcess, listener_name: str, source: str, certs: CertFiles, subject: str
) -> None:
    port = proxy.ports[listener_name]
    with smtplib.SMTP("localhost", port, source_address=(source, 0), timeout=20) as client:
        code, features = client.ehlo("client.test")
        assert code == 250
        assert b"STARTTLS" in features
        assert b"AUTH" not in features
        client.starttls(context=certs.client_context())
        code, features = client.ehlo("client.test")
        assert code == 250
        assert b"STARTTLS" not in features
        assert b"XCLIENT" not in features
        client.sendmail("alice@client.test", ["bob@example.test"], _message(subject))


def _delivered_with_subject(postfix: PostfixInstance, subject: str) -> bytes:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for raw in postfix.delivered():
            if f"Subject: {subject}\n".encode() in raw.replace(b"\r\n", b"\n"):
                return raw
        time.sleep(0.1)
    raise AssertionError(f"no message with subject {subject!r} delivered")


@pytest.mark.parametrize(
    ("name", "source", "logged"),
    [
        # XCLIENT: Postfix logs the connection from the proxy, the message from the client.
        ("xclient", "127.0.0.5", "client=unknown[127.0.0.5]"),
        ("proxyv2", "127.0.0.6", "connect from unknown[127.0.0.6]"),
        ("proxyv1", "127.0.0.8", "connect from unknown[127.0.0.8]"),
    ],
)
def test_smtplib_starttls_delivers_byte_identical_and_names_the_client(
    proxy: ProxyProcess,
    postfix: PostfixInstance,
    test_certs: CertFiles,
    name: str,
    source: str,
    logged: str,
) -> None:
    """Each way of telling Postfix who the client is: the message arrives
    byte for byte, and Postfix logs the client's real address."""
    _deliver_with_smtplib(proxy, name, source, test_certs, f"{name}-smtplib")
    raw = _delivered_with_subject(postfix, f"{name}-smtplib")
    assert message_body(raw) == BODY
    postfix.wait_for_log(logged)


def test_implicit_tls_listener(
    proxy: ProxyProcess, postfix: PostfixInstance, test_certs: CertFiles
) -> None:
    with smtplib.SMTP_SSL(
        "localhost",
        proxy.ports["implicit"],
        source_address=("127.0.0.9", 0),
        context=test_certs.client_context(),
        timeout=20,
    ) as client:
        code, features = client.ehlo("client.test")
        assert code == 250
        assert b"STARTTLS" not in features
        client.sendmail("alice@client.test", ["bob@example.test"], _message("implicit"))
    raw = _delivered_with_subject(postfix, "implicit")
    assert message_body(raw) == BODY
    postfix.wait_for_log("connect from unknown[127.0.0.9]")


def _message_file(tmp_path: Path, subject: str) -> Path:
    path = tmp_path / "message.eml"
    path.write_bytes(_message(subject))
    return path


def test_swaks_tls(
    proxy: ProxyProcess, postfix: PostfixInstance, test_certs: CertFiles, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(proxy.ports["xclient"]),
            "--tls",
            "--local-interface",
            "127.0.0.10",
            "--from",
            "alice@client.test",
            "--to",
            "bob@example.test",
            "--helo",
            "client.test",
            "--data",
            f"@{_message_file(tmp_path, 'swaks')}",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout
    raw = _delivered_with_subject(postfix, "swaks")
    # swaks ends the DATA it reads from a file with one more CRLF of its own.
    assert message_body(raw) == BODY + b"\r\n"
    postfix.wait_for_log("client=unknown[127.0.0.10]")


def test_curl_ssl_reqd(
    proxy: ProxyProcess, postfix: PostfixInstance, test_certs: CertFiles, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--ssl-reqd",
            "--cacert",
            str(test_certs.ca),
            "--interface",
            "127.0.0.11",
            "--url",
            f"smtp://localhost:{proxy.ports['proxyv2']}",
            "--mail-from",
            "alice@client.test",
            "--mail-rcpt",
            "bob@example.test",
            "--upload-file",
            str(_message_file(tmp_path, "curl")),
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    raw = _delivered_with_subject(postfix, "curl")
    assert message_body(raw) == BODY
    postfix.wait_for_log("connect from unknown[127.0.0.11]")


def test_openssl_s_client_starttls(
    proxy: ProxyProcess, postfix: PostfixInstance, test_certs: CertFiles
) -> None:
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{proxy.ports['proxyv2']}",
            "-starttls",
            "smtp",
            "-servername",
            "mail.example.test",
            "-CAfile",
            str(test_certs.ca),
            "-verify_return_error",
            "-crlf",
            "-quiet",
        ],
        input="EHLO client.test\nQUIT\n",
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    assert "250" in result.stdout, result.stdout + result.stderr
    assert "221" in result.stdout
    post_tls = result.stdout
    assert "STARTTLS" not in post_tls
    assert "backend.test" in post_tls  # the EHLO reply came from Postfix


def test_starttls_pipelined_command_injection(
    proxy: ProxyProcess, postfix: PostfixInstance, test_certs: CertFiles
) -> None:
    """CVE-2011-0411: MAIL FROM pipelined after STARTTLS must never count."""
    sock = proxy.connect("proxyv2", "127.0.0.12")
    assert read_smtp_reply(sock).startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    replies = read_smtp_reply(sock)
    while not replies.endswith(b"Ready to start TLS\r\n"):
        replies += read_smtp_reply(sock)
    tls = test_certs.client_context().wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"EHLO client.test\r\n")
    assert read_smtp_reply(tls).startswith(b"250-")
    # Had the injected MAIL FROM reached Postfix, RCPT would be accepted.
    tls.sendall(b"RCPT TO:<bob@example.test>\r\n")
    assert read_smtp_reply(tls).startswith(b"503")
    tls.sendall(b"QUIT\r\n")
    assert read_smtp_reply(tls).startswith(b"221")
    tls.close()
    assert "injected@evil.test" not in postfix.log()
    proxy.wait_for_log("bytes after the TLS upgrade command; discarded")


def test_starttls_injection_across_packets_before_client_hello(
    proxy: ProxyProcess, postfix: PostfixInstance
) -> None:
    sock = proxy.connect("proxyv2", "127.0.0.13")
    assert read_smtp_reply(sock).startswith(b"220 ")
    sock.sendall(b"STARTTLS\r\n")
    assert read_smtp_reply(sock).startswith(b"220 2.0.0")
    sock.sendall(b"MAIL FROM:<across@evil.test>\r\n")
    sock.settimeout(10)
    assert sock.recv(4096) == b""  # closed, no reply
    sock.close()
    proxy.wait_for_log("plaintext after the TLS upgrade")
    assert "across@evil.test" not in postfix.log()


def test_require_tls_refuses_plaintext_mail(proxy: ProxyProcess) -> None:
    sock = proxy.connect("proxyv2", "127.0.0.14")
    assert read_smtp_reply(sock).startswith(b"220 proxy.test")
    sock.sendall(b"EHLO client.test\r\n")
    assert b"STARTTLS" in read_smtp_reply(sock)
    sock.sendall(b"MAIL FROM:<alice@client.test>\r\n")
    assert read_smtp_reply(sock) == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    sock.sendall(b"QUIT\r\n")
    assert read_smtp_reply(sock).startswith(b"221")
    sock.close()


def test_plaintext_relay_without_require_tls(proxy: ProxyProcess, postfix: PostfixInstance) -> None:
    with smtplib.SMTP(
        "127.0.0.1", proxy.ports["xclient"], source_address=("127.0.0.15", 0), timeout=20
    ) as client:
        client.ehlo("client.test")
        client.sendmail("alice@client.test", ["bob@example.test"], _message("plaintext"))
    raw = _delivered_with_subject(postfix, "plaintext")
    assert message_body(raw) == BODY
    postfix.wait_for_log("client=unknown[127.0.0.15]")


def test_stopped_backend_gives_421(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    tls = smtp_starttls(proxy.connect("dead", "127.0.0.16"), test_certs, ehlo=True)
    tls.sendall(b"EHLO client.test\r\n")
    assert read_smtp_reply(tls).startswith(b"421 4.3.0")
    assert tls.recv(4096) == b""
    tls.close()


def test_tls_client_hello_before_starttls(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    sock = proxy.connect("proxyv2", "127.0.0.17")
    assert read_smtp_reply(sock).startswith(b"220 ")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        test_certs.client_context().wrap_socket(sock, server_hostname="localhost")
    sock.close()


def test_client_disconnects_mid_handshake(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    sock = proxy.connect("proxyv2", "127.0.0.18")
    assert read_smtp_reply(sock).startswith(b"220 ")
    sock.sendall(b"STARTTLS\r\n")
    assert read_smtp_reply(sock).startswith(b"220 ")
    sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's first bytes
    sock.close()
    proxy.wait_for_log("client closed during the handshake")
    # The proxy is unaffected.
    again = proxy.connect("proxyv2", "127.0.0.18")
    assert read_smtp_reply(again).startswith(b"220 ")
    again.close()


def test_credentials_never_logged(proxy: ProxyProcess, test_certs: CertFiles) -> None:
    """AUTH before TLS (refused) and after it (relayed): the proxy's debug
    log holds neither the password nor its base64 form."""
    secret = base64.b64encode(b"\0alice\0s3cret-Pa55")
    sock = proxy.connect("xclient", "127.0.0.19")
    assert read_smtp_reply(sock).startswith(b"220 ")
    sock.sendall(b"AUTH PLAIN " + secret + b"\r\n")
    assert read_smtp_reply(sock).startswith(b"530 ")
    sock.sendall(b"STARTTLS\r\n")
    assert read_smtp_reply(sock).startswith(b"220 ")
    tls = test_certs.client_context().wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"EHLO client.test\r\n")
    assert read_smtp_reply(tls).startswith(b"250-")
    tls.sendall(b"AUTH PLAIN " + secret + b"\r\n")
    assert read_smtp_reply(tls)[:1] in (b"5", b"2")
    tls.sendall(b"QUIT\r\n")
    assert read_smtp_reply(tls).startswith(b"221")
    tls.close()
    log = proxy.wait_for_log("127.0.0.19")
    assert "DEBUG" in log  # the proxy runs at its most verbose level
    assert "s3cret" not in log
    assert secret.decode() not in log
