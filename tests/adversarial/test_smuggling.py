"""SMTP smuggling through the live proxy into the real Postfix 3.7.

The class: Timo Longin (SEC Consult), "SMTP Smuggling - Spoofing E-Mails
Worldwide" (December 2023). Two SMTP servers that disagree on where a DATA
body ends let a sender hide a second envelope (MAIL, RCPT, DATA) inside the
first message: the outbound server relays it as content, the inbound one
runs it as commands. The variants are those of the public scanners (SEC
Consult's smtp-smuggling-tools, Postfix's notes on smtpd_forbid_bare_newline):
bare LF or CR around the dot, a NUL beside it, CR CR LF.

The oracle is Postfix's Maildir: no message there ever carries the smuggled
envelope. The proxy's default (``bare_line_endings: reject``, as Postfix
3.9's ``smtpd_forbid_bare_newline``, but ending the session) answers 521
at the first bare CR or LF and delivers nothing. Postfix 3.7.11 here has
``smtpd_forbid_bare_newline = no``: it takes a bare LF for a line end, so
behind a proxy set to ``allow`` it is Postfix that decides, and the test
records what it decides.
"""

from __future__ import annotations

import itertools
import re
import ssl
import uuid

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_smtp_reply, smtp_upgraded
from tests.realservers.net import read_to_end
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener
from tests.realservers.tap import wait_for

READ_TIMEOUT = 5.0

_sources = (f"127.0.8.{n}" for n in itertools.count(1))

#: End-of-data variants of the public scanners; none is CRLF "." CRLF.
VARIANTS = {
    "lf_dot_lf": b"\n.\n",
    "lf_dot_crlf": b"\n.\r\n",
    "cr_dot_cr": b"\r.\r",
    "crlf_dot_cr": b"\r\n.\r",
    "crlf_nul_dot_crlf": b"\r\n\x00.\r\n",
    "crlf_dot_nul_crlf": b"\r\n.\x00\r\n",
    "crcrlf_dot_crcrlf": b"\r\r\n.\r\r\n",
    "crlf_dot_lf": b"\r\n.\n",
    "lf_dot_cr": b"\n.\r",
    "cr_dot_lf": b"\r.\n",
    "cr_dot_crlf": b"\r.\r\n",
}


@pytest.fixture(scope="module")
def proxy(module_proxy: StartProxy, postfix: PostfixInstance) -> ProxyProcess:
    backend = {"identity": "xclient"}
    allow = {"bare_line_endings": "allow"}
    return module_proxy(
        [
            listener("reject", postfix.plain_port, backend=backend),
            listener("allow", postfix.plain_port, backend=backend, smtp=allow),
        ]
    )


def _session(proxy: ProxyProcess, name: str, certs: CertFiles) -> tuple[ssl.SSLSocket, str]:
    source = next(_sources)
    sock = proxy.connect(name, source)
    sock.settimeout(READ_TIMEOUT)
    return smtp_upgraded(sock, certs), source


def _begin_data(tls: ssl.SSLSocket, sender: str) -> None:
    for command, code in (
        (b"MAIL FROM:<%s>\r\n" % sender.encode(), b"250"),
        (b"RCPT TO:<bob@example.test>\r\n", b"250"),
        (b"DATA\r\n", b"354"),
    ):
        tls.sendall(command)
        reply = read_smtp_reply(tls)
        assert reply.startswith(code), (command, reply)


def _holding(postfix: PostfixInstance, token: bytes) -> list[bytes]:
    return [message for message in postfix.delivered() if token in message]


def _smuggling_body(token: bytes, variant: bytes) -> bytes:
    return (
        b"Subject: legit %s\r\n\r\nfirst message%s" % (token, variant)
        + b"MAIL FROM:<spoof-%s@evil.test>\r\n" % token
        + b"RCPT TO:<bob@example.test>\r\nDATA\r\n"
        + b"From: spoof-%s@evil.test\r\n" % token
        + b"Subject: smuggled %s\r\n\r\nsmuggled\r\n.\r\n" % token
    )


#: The variants without a bare CR or LF: a NUL beside the dot.
NUL_VARIANTS = {"crlf_nul_dot_crlf", "crlf_dot_nul_crlf"}
REFUSED = b"521 5.5.2 proxy.test Error: bare <CR> or <LF> received\r\n"


def _return_path(message: bytes) -> bytes:
    return message.split(b"\n", 1)[0]


def _one_message_from(postfix: PostfixInstance, token: bytes) -> bytes:
    """The one message of the session: the legitimate envelope, the would-be
    smuggled one only as text inside it."""
    [message] = _wait_holding(postfix, token)
    assert _return_path(message) == b"Return-Path: <legit-%s@client.test>" % token, message
    assert b"MAIL FROM:<spoof-%s@evil.test>" % token in message, message
    return message


@pytest.mark.parametrize("variant", VARIANTS)
def test_smuggled_envelope_is_never_delivered(
    proxy: ProxyProcess, postfix: PostfixInstance, test_certs: CertFiles, variant: str
) -> None:
    """SEC Consult, "SMTP Smuggling - Spoofing E-Mails Worldwide" (2023);
    Postfix's smtpd_forbid_bare_newline: with the default ``reject`` the
    first bare CR or LF of the body ends the session with 521, no end of
    data ever reaches Postfix, and neither the first message nor the
    smuggled one is delivered. The NUL variants have no bare line ending:
    the proxy relays them, and Postfix too ends DATA only at CRLF "." CRLF,
    so the smuggled envelope is text of the one message."""
    token = uuid.uuid4().hex.encode()
    tls, source = _session(proxy, "reject", test_certs)
    _begin_data(tls, f"legit-{token.decode()}@client.test")
    tls.sendall(_smuggling_body(token, VARIANTS[variant]))
    if variant in NUL_VARIANTS:
        assert read_smtp_reply(tls).startswith(b"250 ")
        tls.close()
        _one_message_from(postfix, token)
        return
    said = read_to_end(tls, ends=(OSError,))
    tls.close()
    assert said == REFUSED, said
    # Postfix drops the partial message once the proxy hangs up on it.
    lost = re.compile(
        rf"lost connection after DATA \(\d+ bytes\) from unknown\[{re.escape(source)}\]"
    )
    assert wait_for(lambda: lost.search(postfix.log()) is not None, 10)
    assert _holding(postfix, token) == []


#: The variants at which Postfix 3.7.11 (smtpd_forbid_bare_newline = no)
#: ends DATA: a bare LF on either side of the dot, and CR CR LF (it strips
#: the CRs before the LF).
POSTFIX_37_ENDS_DATA = {"lf_dot_lf", "lf_dot_crlf", "crlf_dot_lf", "crcrlf_dot_crcrlf"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_with_bare_line_endings_allowed_the_backend_decides(
    proxy: ProxyProcess, postfix: PostfixInstance, test_certs: CertFiles, variant: str
) -> None:
    """SEC Consult, "SMTP Smuggling" (2023), with the proxy's defence off
    (``bare_line_endings: allow``): the proxy ends DATA only at CRLF "."
    CRLF and relays the rest untouched, so what happens is Postfix's
    doing. This records Postfix 3.7.11's: at the variants of
    ``POSTFIX_37_ENDS_DATA`` it runs the smuggled envelope and delivers the
    spoofed message. The proxy notices only afterwards, when replies come
    that nothing it sent asked for, and ends the session with 421: too
    late, the whole body was in Postfix's buffer. Hence ``reject`` is the
    default, and ``allow`` is only for a backend that ends DATA at CRLF "."
    CRLF alone (Postfix 3.9, or smtpd_forbid_bare_newline = normalize)."""
    token = uuid.uuid4().hex.encode()
    tls, _ = _session(proxy, "allow", test_certs)
    _begin_data(tls, f"legit-{token.decode()}@client.test")
    tls.sendall(_smuggling_body(token, VARIANTS[variant]))
    said = read_to_end(tls, ends=(OSError,))
    tls.close()
    if variant not in POSTFIX_37_ENDS_DATA:
        assert re.fullmatch(rb"250 [^\r\n]*\r\n", said), said
        _one_message_from(postfix, token)
        return
    assert re.fullmatch(rb"250 [^\r\n]*\r\n421 4.3.0 [^\r\n]*\r\n", said), said
    assert wait_for(lambda: len(_holding(postfix, token)) == 2, 20)
    return_paths = sorted(_return_path(message) for message in _holding(postfix, token))
    assert return_paths == [
        b"Return-Path: <legit-%s@client.test>" % token,
        b"Return-Path: <spoof-%s@evil.test>" % token,
    ]


def _wait_holding(postfix: PostfixInstance, token: bytes) -> list[bytes]:
    assert wait_for(lambda: bool(_holding(postfix, token)), 20), postfix.log()[-2000:]
    return _holding(postfix, token)


SMUGGLED_COMMANDS = (
    b"STARTTLS\r\n"
    b"XCLIENT ADDR=6.6.6.6 NAME=spoofed.test\r\n"
    b"AUTH PLAIN AGFsaWNlAGFsaWNlcHc=\r\n"
    b"MAIL FROM:<spoof@evil.test>\r\n"
)


def _sent_as_content(postfix: PostfixInstance, token: bytes, source: str) -> None:
    [message] = _wait_holding(postfix, token)
    assert SMUGGLED_COMMANDS.replace(b"\r\n", b"\n") in message, message
    log = postfix.wait_for_log(f"client=unknown[{source}]")
    assert "6.6.6.6" not in log and "spoofed.test" not in log


def test_commands_inside_data_are_message_text(
    proxy: ProxyProcess, postfix: PostfixInstance, test_certs: CertFiles
) -> None:
    """SEC Consult, "SMTP Smuggling" (2023), and CVE-2011-0411's premise
    that only the command stream runs: STARTTLS, XCLIENT and AUTH lines in
    a DATA body reach Postfix as lines of the message, and Postfix's log
    shows the client's own address, never the XCLIENT one."""
    token = uuid.uuid4().hex.encode()
    tls, source = _session(proxy, "reject", test_certs)
    _begin_data(tls, f"legit-{token.decode()}@client.test")
    tls.sendall(b"Subject: %s\r\n\r\n" % token + SMUGGLED_COMMANDS + b".\r\n")
    assert read_smtp_reply(tls).startswith(b"250 "), token
    tls.sendall(b"QUIT\r\n")
    assert read_smtp_reply(tls).startswith(b"221 ")
    tls.close()
    _sent_as_content(postfix, token, source)


def test_commands_inside_a_bdat_chunk_are_message_text(
    proxy: ProxyProcess, postfix: PostfixInstance, test_certs: CertFiles
) -> None:
    """SEC Consult, "SMTP Smuggling" (2023), through CHUNKING (RFC 3030): a
    BDAT chunk is its announced octets whatever they hold, even a CRLF "."
    CRLF followed by commands, and Postfix stores them as message text."""
    token = uuid.uuid4().hex.encode()
    tls, source = _session(proxy, "reject", test_certs)
    for command in (
        b"MAIL FROM:<legit-%s@client.test>\r\n" % token,
        b"RCPT TO:<bob@example.test>\r\n",
    ):
        tls.sendall(command)
        assert read_smtp_reply(tls).startswith(b"250"), command
    chunk = b"Subject: %s\r\n\r\nfirst\r\n.\r\n" % token + SMUGGLED_COMMANDS
    tls.sendall(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert read_smtp_reply(tls).startswith(b"250 "), token
    tls.sendall(b"QUIT\r\n")
    assert read_smtp_reply(tls).startswith(b"221 ")
    tls.close()
    _sent_as_content(postfix, token, source)


def test_proxy_still_serves_after_the_smuggling_attempts(
    proxy: ProxyProcess, test_certs: CertFiles
) -> None:
    """The sessions above ended by the proxy leave it serving."""
    tls, _ = _session(proxy, "reject", test_certs)
    tls.sendall(b"QUIT\r\n")
    assert read_smtp_reply(tls).startswith(b"221 ")
    tls.close()
