"""Identity spoofing: a client that claims another address, through the live
proxy, with the real Postfix and Dovecot as the judges.

The proxy tells its backend who the client is (Postfix XCLIENT, Dovecot's
IMAP ``ID`` x-originating-ip or POP3 ``XCLIENT``, or a PROXY v1/v2 header),
and the backend trusts it because the proxy's address is in its trusted
networks. The same commands from a client would therefore be believed if
they got through: Postfix's XCLIENT_README ("only authorized clients may
use XCLIENT") and the HAProxy PROXY protocol specification, section 2
("the receiver must not accept a header from an untrusted source"), name the
attack; Dovecot's login_trusted_networks documents that an ID from a trusted
address sets the remote IP. Every case sends the claim before TLS and inside
TLS, from its own 127.0.9.x source, and reads the backend's own log: Postfix's
``client=unknown[addr]``, Dovecot's ``rip=addr``.
"""

from __future__ import annotations

import itertools
import re
import socket
import ssl
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_smtp_reply, read_until
from tests.realservers.dovecot import DovecotInstance
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener

READ_TIMEOUT = 5.0

_sources = (f"127.0.9.{n}" for n in itertools.count(1))
#: Each case claims its own address, so that a leak names the case.
_spoofed = (f"6.6.6.{n}" for n in itertools.count(1))

Sock = socket.socket | ssl.SSLSocket


def proxy_v1(claimed: str) -> bytes:
    return b"PROXY TCP4 %s 127.0.0.1 4444 25\r\n" % claimed.encode()


def proxy_v2(claimed: str) -> bytes:
    """A PROXY v2 header (HAProxy proxy-protocol.txt section 2.2), TCP over IPv4."""
    addresses = (
        socket.inet_aton(claimed) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 4444, 25)
    )
    return b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


@dataclass(frozen=True)
class Claim:
    """How a client claims an address in one protocol."""

    #: The bytes that claim ``address``.
    bytes_for: Callable[[str], bytes]
    #: Whether they are a header sent before the greeting (else a command).
    header: bool = False


SMTP_CLAIMS = {
    "xclient": Claim(lambda address: b"XCLIENT ADDR=%s NAME=spoofed.test\r\n" % address.encode()),
    "proxy_v1": Claim(proxy_v1, header=True),
    "proxy_v2": Claim(proxy_v2, header=True),
}
IMAP_CLAIMS = {
    "id": Claim(lambda address: b'i ID ("x-originating-ip" "%s")\r\n' % address.encode()),
    "proxy_v1": Claim(proxy_v1, header=True),
    "proxy_v2": Claim(proxy_v2, header=True),
}
POP3_CLAIMS = {
    "xclient": Claim(lambda address: b"XCLIENT ADDR=%s\r\n" % address.encode()),
    "proxy_v1": Claim(proxy_v1, header=True),
    "proxy_v2": Claim(proxy_v2, header=True),
}
WHEN = ("before_tls", "after_tls")


@pytest.fixture(scope="module")
def proxy(
    module_proxy: StartProxy, postfix: PostfixInstance, dovecot: DovecotInstance
) -> ProxyProcess:
    v2 = {"identity": "proxy-v2"}
    xclient = "pop3-xclient"
    return module_proxy(
        [
            listener("smtp-xclient", postfix.plain_port, backend={"identity": "xclient"}),
            listener("smtp-proxyv2", postfix.proxy_port, backend=v2),
            listener("imap-id", dovecot.imap_port, "imap", backend={"identity": "imap-id"}),
            listener("imap-proxyv2", dovecot.imap_proxy_port, "imap", backend=v2),
            listener("pop3-xclient", dovecot.pop3_port, "pop3", backend={"identity": xclient}),
            listener("pop3-proxyv2", dovecot.pop3_proxy_port, "pop3", backend=v2),
        ]
    )  # fmt: skip


def _connect(
    proxy: ProxyProcess, name: str, claim: Claim, when: str, claimed: str
) -> tuple[socket.socket, str]:
    source = next(_sources)
    sock = proxy.connect(name, source)
    sock.settimeout(READ_TIMEOUT)
    if claim.header and when == "before_tls":
        # Where a balancer's header would be: the very first bytes.
        sock.sendall(claim.bytes_for(claimed))
    return sock, source


def _drain(sock: Sock, sentinel: bytes, done: Callable[[bytes], bool]) -> bytes:
    """Send ``sentinel`` and read until its reply is in: what came before it
    answers the claim, however many lines the claim made."""
    sock.sendall(sentinel)
    said = b""
    while not done(said):
        try:
            chunk = sock.recv(4096)
        except (ssl.SSLError, OSError):
            chunk = b""
        if not chunk:
            # The PROXY v2 signature holds "QUIT\n": ending there is a refusal too.
            sock.close()
            raise SessionEndedError(said)
        said += chunk
    return said


class SessionEndedError(Exception):
    """The claim ended the session: what was said before the end."""


def _ended_without_effect(
    ended: SessionEndedError, claimed: str, backend_log: Callable[[], str]
) -> None:
    """A session the claim ended: nothing accepted it, and the backend never heard of it."""
    said = re.sub(rb"^(?:220 |\* OK |\+OK proxy\.test )[^\r\n]*\r\n", b"", ended.args[0])
    assert not re.search(rb"(?m)^(?:250|[a-z] OK|\+OK)", said), said
    assert claimed not in backend_log()


def _tagged(sock: Sock, tag: bytes) -> bytes:
    said = b""
    while not _has_tag(said, tag):
        chunk = sock.recv(4096)
        if not chunk:
            break
        said += chunk
    return said


# -- SMTP -------------------------------------------------------------------------------

SMTP_SENTINEL = b"RSET\r\n"
SMTP_SENTINEL_DONE: Callable[[bytes], bool] = lambda said: said.endswith(b"250 2.0.0 Ok\r\n")  # noqa: E731


def _refused_smtp(sock: Sock, after_greeting: bool = False) -> None:
    """Every reply the claim got is an error."""
    said = _drain(sock, SMTP_SENTINEL, SMTP_SENTINEL_DONE)
    replies = said.split(b"\r\n")[:-2]
    if after_greeting:
        assert replies.pop(0).startswith(b"220 "), said
    assert replies and all(reply[:1] == b"5" for reply in replies), said


@pytest.mark.parametrize("when", WHEN)
@pytest.mark.parametrize("claim", SMTP_CLAIMS)
@pytest.mark.parametrize("name", ["smtp-xclient", "smtp-proxyv2"])
def test_smtp_client_cannot_claim_another_address(
    proxy: ProxyProcess,
    postfix: PostfixInstance,
    test_certs: CertFiles,
    name: str,
    claim: str,
    when: str,
) -> None:
    """Postfix XCLIENT_README (XCLIENT only from authorized clients) and the
    PROXY protocol specification (no header from an untrusted source): the
    client's own XCLIENT or PROXY header, before or inside TLS, is refused by
    the proxy or is at most a bad command to Postfix, and Postfix records
    the client's real address for the message."""
    claimed = next(_spoofed)
    how = SMTP_CLAIMS[claim]
    sock, source = _connect(proxy, name, how, when, claimed)
    try:
        if how.header and when == "before_tls":
            _refused_smtp(sock, after_greeting=True)
        else:
            assert read_smtp_reply(sock).startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        assert read_smtp_reply(sock).startswith(b"250-")
        if not how.header and when == "before_tls":
            sock.sendall(how.bytes_for(claimed))
            _refused_smtp(sock)
        sock.sendall(b"STARTTLS\r\n")
        assert read_smtp_reply(sock).startswith(b"220 ")
        tls = test_certs.client_context().wrap_socket(sock, server_hostname="localhost")
        tls.sendall(b"EHLO client.test\r\n")
        assert read_smtp_reply(tls).startswith(b"250-")
        if when == "after_tls":
            tls.sendall(how.bytes_for(claimed))
            _refused_smtp(tls)
        token = uuid.uuid4().hex
        for command, code in (
            (b"MAIL FROM:<%s@client.test>\r\n" % token.encode(), b"250"),
            (b"RCPT TO:<bob@example.test>\r\n", b"250"),
            (b"DATA\r\n", b"354"),
            (b"Subject: %s\r\n\r\nhello\r\n.\r\n" % token.encode(), b"250"),
            (b"QUIT\r\n", b"221"),
        ):
            tls.sendall(command)
            reply = read_smtp_reply(tls)
            assert reply.startswith(code), (command, reply)
        tls.close()
        log = postfix.wait_for_log(f"from=<{token}@client.test>")
        queue_id = (
            log.split(f"from=<{token}@client.test>")[0].rsplit(": ", 2)[-2].rsplit(" ", 1)[-1]
        )
        assert f"{queue_id}: client=unknown[{source}]" in log, log[-3000:]
        assert claimed not in log and "spoofed.test" not in log
    except SessionEndedError as ended:
        _ended_without_effect(ended, claimed, postfix.log)


# -- Dovecot ----------------------------------------------------------------------------


def _dovecot_login(
    dovecot: DovecotInstance,
    since: int,
    source: str,
    claimed: str,
    service: str,
) -> None:
    line = dovecot.wait_for_line(
        f"{service}-login: Info: Login: user=<alice>", f"rip={source},", since=since
    )
    assert claimed not in line
    assert claimed not in dovecot.log()[since:]


def _refused_imap(sock: Sock, after_greeting: bool = False) -> None:
    """Nothing the claim got is an OK (an ID's own answer aside, which
    Dovecot gives whatever it makes of the ID)."""
    said = _drain(sock, b"n NOOP\r\n", lambda said: _has_tag(said, b"n"))
    before = said.split(b"\r\nn ")[0].split(b"\r\n")
    if after_greeting:
        assert before.pop(0).startswith(b"* OK "), said
    assert not [line for line in before if b" OK " in line and not line.startswith(b"i OK")], said


def _has_tag(said: bytes, tag: bytes) -> bool:
    return any(line.startswith(tag + b" ") for line in said.split(b"\r\n")[:-1])


def _refused_pop3(sock: Sock, after_greeting: bool = False) -> None:
    """The claim got only -ERR: the one +OK is CAPA's."""
    said = _drain(sock, b"CAPA\r\n", lambda said: said.endswith(b"\r\n.\r\n"))
    if after_greeting:
        greeting, _, said = said.partition(b"\r\n")
        assert greeting.startswith(b"+OK"), greeting
    before = said[: said.rindex(b"+OK")]
    assert before and all(line.startswith(b"-ERR") for line in before.split(b"\r\n")[:-1]), said


class Refused(Protocol):
    def __call__(self, sock: Sock, after_greeting: bool = False) -> None: ...


@dataclass(frozen=True)
class DovecotDialogue:
    """What tells IMAP from POP3 in a session that claims an address."""

    service: str
    listeners: tuple[str, ...]
    claims: dict[str, Claim]
    greeting: bytes
    refused: Refused
    #: Commands, each with how its reply's last line starts: the upgrade,
    #: then (inside TLS) alice's login and the goodbye.
    starttls: tuple[bytes, bytes]
    login: tuple[tuple[bytes, bytes], ...]

    def command(self, sock: Sock, command: bytes, expected: bytes) -> None:
        """Send ``command`` and read its reply: up to its tagged line in IMAP,
        one line in POP3."""
        sock.sendall(command)
        tag = command.split()[0]
        said = _tagged(sock, tag) if self.service == "imap" else read_until(sock, b"\r\n")
        assert said.split(b"\r\n")[-2].startswith(expected), said


DOVECOT = (
    DovecotDialogue(
        "imap", ("imap-id", "imap-proxyv2"), IMAP_CLAIMS, b"* OK ", _refused_imap,
        (b"s STARTTLS\r\n", b"s OK"),
        ((b"l LOGIN alice alicepw\r\n", b"l OK"), (b"o LOGOUT\r\n", b"o OK")),
    ),
    DovecotDialogue(
        "pop3", ("pop3-xclient", "pop3-proxyv2"), POP3_CLAIMS, b"+OK", _refused_pop3,
        (b"STLS\r\n", b"+OK"),
        ((b"USER alice\r\n", b"+OK"), (b"PASS alicepw\r\n", b"+OK"), (b"QUIT\r\n", b"+OK")),
    ),
)  # fmt: skip


@pytest.mark.parametrize("when", WHEN)
@pytest.mark.parametrize(
    ("dialogue", "name", "claim"),
    [
        pytest.param(dialogue, name, claim, id=f"{name}-{claim}")
        for dialogue in DOVECOT
        for name in dialogue.listeners
        for claim in dialogue.claims
    ],
)
def test_dovecot_client_cannot_claim_another_address(
    proxy: ProxyProcess,
    dovecot: DovecotInstance,
    test_certs: CertFiles,
    dialogue: DovecotDialogue,
    name: str,
    claim: str,
    when: str,
) -> None:
    """Dovecot's login_trusted_networks (an IMAP ID x-originating-ip or a
    POP3 XCLIENT from a trusted address sets the remote IP; the proxy's
    address is trusted) and the PROXY protocol specification: the client's
    own ID, XCLIENT or PROXY header, before or inside TLS, never changes the
    ``rip=`` Dovecot logs."""
    claimed = next(_spoofed)
    how = dialogue.claims[claim]
    since = len(dovecot.log())
    sock, source = _connect(proxy, name, how, when, claimed)
    try:
        if how.header and when == "before_tls":
            dialogue.refused(sock, after_greeting=True)
        else:
            assert read_until(sock, b"\r\n").startswith(dialogue.greeting)
        if not how.header and when == "before_tls":
            sock.sendall(how.bytes_for(claimed))
            dialogue.refused(sock)
        dialogue.command(sock, *dialogue.starttls)
        tls = test_certs.client_context().wrap_socket(sock, server_hostname="localhost")
        if when == "after_tls":
            tls.sendall(how.bytes_for(claimed))
            dialogue.refused(tls)
        for command, expected in dialogue.login:
            dialogue.command(tls, command, expected)
        tls.close()
        _dovecot_login(dovecot, since, source, claimed, dialogue.service)
    except SessionEndedError as ended:
        _ended_without_effect(ended, claimed, lambda: dovecot.log()[since:])
