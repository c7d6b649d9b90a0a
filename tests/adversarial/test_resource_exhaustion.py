"""Clients that try to hold the proxy's slots: slowloris before and inside
TLS, stalled handshakes, one address opening every connection.

Against the real proxy process, with the real Postfix behind it where a
session gets that far. Each attacker runs until the proxy cuts it; the
socket timeouts only keep a broken proxy from hanging the test.

Sources: slowloris (R. Hansen, 2009) keeps a slot by sending a byte now and
then, which defeats any timer that a byte restarts; the defence is a
deadline per command and per phase (Postfix's smtpd_per_record_deadline,
Dovecot's fixed pre-login timeout) and a per-client connection limit
(Postfix's smtpd_client_connection_count_limit).
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_smtp_reply, smtp_upgraded
from tests.realservers.metrics import scrape, total
from tests.realservers.net import free_port
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener

#: Deadlines of the listeners below, in seconds: short, so that the test
#: is quick, and far from each other, so that the right one is seen to cut.
SHORT = 1.5
LONG = 60
#: How long an attacker keeps going before the test calls the proxy broken.
GIVE_UP = 20.0
#: Pause between the attacker's bytes or commands: well inside every deadline.
DRIP = 0.2

TIMEOUT_REPLY = b"421 4.4.2 proxy.test Error: timeout exceeded\r\n"
BUSY_REPLY = b"421 4.7.0 proxy.test Error: too many connections\r\n"


@pytest.fixture(scope="module")
def proxy(module_proxy: StartProxy, postfix: PostfixInstance, metrics_port: int) -> ProxyProcess:
    dead = free_port()
    return module_proxy(
        [
            listener("phase", dead, capabilities=["PIPELINING"], timeouts={"pre_tls": SHORT}),
            listener(
                "command",
                postfix.plain_port,
                require_tls=False,
                backend={"identity": "xclient"},
                timeouts={"pre_tls": LONG, "command": SHORT},
            ),
            listener(
                "per-client",
                dead,
                capabilities=["PIPELINING"],
                limits={
                    "max_connections": 10,
                    "max_connections_per_client": 3,
                    # Loopback is spared by default (a local webmail).
                    "per_client_exceptions": ["127.0.0.46/32"],
                },
            ),
        ],
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )


def _drip_until_closed(sock: socket.socket | ssl.SSLSocket, pieces: list[bytes]) -> bytes:
    """Send ``pieces`` one by one, ``DRIP`` apart, over and over, until the
    proxy closes the connection; return what it said meanwhile."""
    said = b""
    sock.settimeout(DRIP)
    started = time.monotonic()
    index = 0
    while time.monotonic() - started < GIVE_UP:
        try:
            sock.sendall(pieces[index % len(pieces)])
        except OSError:
            break
        index += 1
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except (ssl.SSLError, OSError):
            break
        if not chunk:
            break
        said += chunk
    else:
        pytest.fail(f"still connected after {GIVE_UP} s; the proxy said {said!r}")
    sock.close()
    return said


def _timed_out(metrics_port: int, listener_name: str, deadline: str) -> float:
    samples = scrape(metrics_port)
    return total(
        samples,
        "starttls_proxy_sessions_timed_out_total",
        listener=listener_name,
        deadline=deadline,
    )


def test_slowloris_of_complete_commands_before_tls_is_cut_by_the_phase_deadline(
    proxy: ProxyProcess, metrics_port: int
) -> None:
    sock = proxy.connect("phase", "127.0.0.41")
    assert read_smtp_reply(sock).startswith(b"220 ")
    said = _drip_until_closed(sock, [b"NOOP\r\n"])
    assert said.startswith(b"250 2.0.0 Ok\r\n")
    assert said.endswith(TIMEOUT_REPLY)
    assert "no TLS within 1.5 s" in proxy.wait_for_log("127.0.0.41")
    assert _timed_out(metrics_port, "phase", "pre_tls") == 1


def test_slowloris_one_byte_at_a_time_before_tls_is_cut_by_the_command_deadline(
    proxy: ProxyProcess, metrics_port: int
) -> None:
    sock = proxy.connect("command", "127.0.0.42")
    assert read_smtp_reply(sock).startswith(b"220 ")
    before = _timed_out(metrics_port, "command", "command")
    said = _drip_until_closed(sock, [bytes([octet]) for octet in b"NOOP then more and more"])
    assert said == TIMEOUT_REPLY
    assert "command not complete within 1.5 s" in proxy.wait_for_log("127.0.0.42")
    assert _timed_out(metrics_port, "command", "command") == before + 1


def test_slowloris_inside_tls_is_cut_by_the_command_deadline(
    proxy: ProxyProcess, test_certs: CertFiles
) -> None:
    tls = smtp_upgraded(proxy.connect("command", "127.0.0.43"), test_certs, ehlo=False)
    said = _drip_until_closed(tls, [bytes([octet]) for octet in b"NOOP and so on"])
    assert said == TIMEOUT_REPLY
    assert "command not complete within 1.5 s" in proxy.wait_for_log("127.0.0.43")


def test_slow_but_complete_commands_and_a_slow_message_body_are_served(
    proxy: ProxyProcess, test_certs: CertFiles, postfix: PostfixInstance
) -> None:
    """Only an unfinished command is cut: a client that pauses between
    commands, or sends a message one line at a time over longer than the
    command deadline, is served."""
    tls = smtp_upgraded(proxy.connect("command", "127.0.0.44"), test_certs, ehlo=False)
    token = f"slow-{time.monotonic_ns()}"
    for command in (
        b"NOOP\r\n",
        b"MAIL FROM:<slow@client.test>\r\n",
        b"RCPT TO:<bob@example.test>\r\n",
    ):
        time.sleep(SHORT * 0.6)
        tls.sendall(command)
        assert read_smtp_reply(tls).startswith(b"250")
    tls.sendall(b"DATA\r\n")
    assert read_smtp_reply(tls).startswith(b"354")
    lines = [f"Subject: {token}\r\n".encode(), b"\r\n"] + [b"line %d\r\n" % n for n in range(12)]
    started = time.monotonic()
    for line in lines:
        tls.sendall(line)
        time.sleep(DRIP)
    assert time.monotonic() - started > SHORT
    tls.sendall(b".\r\n")
    assert read_smtp_reply(tls).startswith(b"250")
    tls.sendall(b"QUIT\r\n")
    assert read_smtp_reply(tls).startswith(b"221")
    tls.close()
    postfix.wait_for_log("from=<slow@client.test>")
    started = time.monotonic()
    while not any(token.encode() in message for message in postfix.delivered()):
        assert time.monotonic() - started < GIVE_UP, "the slow message was never delivered"
        time.sleep(DRIP)


def test_one_address_cannot_take_every_connection(proxy: ProxyProcess, metrics_port: int) -> None:
    held = [proxy.connect("per-client", "127.0.0.45") for _ in range(3)]
    for sock in held:
        assert read_smtp_reply(sock).startswith(b"220 ")
    refused = proxy.connect("per-client", "127.0.0.45")
    assert refused.recv(4096) == BUSY_REPLY
    others = [proxy.connect("per-client", "127.0.0.46") for _ in range(4)]
    for other in others:
        assert read_smtp_reply(other).startswith(b"220 ")
    samples = scrape(metrics_port)
    assert total(samples, "starttls_proxy_connections_refused_per_client_total") == 1
    assert total(samples, "starttls_proxy_connections_refused_busy_total") == 0
    # A slot given back is a slot to take again.
    held.pop().close()
    again = _eventually_greeted(proxy, "127.0.0.45")
    for sock in (refused, again, *others, *held):
        sock.close()


def _eventually_greeted(proxy: ProxyProcess, source: str) -> socket.socket:
    """A connection that gets the greeting, once the proxy has seen a slot freed."""
    started = time.monotonic()
    while True:
        sock = proxy.connect("per-client", source)
        reply = read_smtp_reply(sock)
        if reply.startswith(b"220 "):
            return sock
        assert reply == BUSY_REPLY
        sock.close()
        assert time.monotonic() - started < GIVE_UP, "the freed slot was never given back"
        time.sleep(DRIP)
