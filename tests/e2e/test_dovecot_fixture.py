"""The Dovecot backend fixture itself, before any proxy is involved.

Each listener is exercised the way the proxy will use it: plain IMAP and POP3 (byte-exact
mail round trip), PROXY protocol v2 with and without the PP2_TYPE_SSL TLV (which decides
whether Dovecot allows a plaintext login), IMAP ID and POP3 XCLIENT from the trusted
address, and STARTTLS/STLS offered by Dovecot itself.  PROXY headers come from the
product's own builder.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import socket
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path

from protocols._base import Peer, TLSInfo
from protocols.proxy_header import proxy_v2
from tests.realservers.certs import CertFiles
from tests.realservers.daemons import USERS, live_group_members
from tests.realservers.dovecot import DovecotInstance, start_dovecot
from tests.realservers.net import accepts_connections

#: A body with lines a careless proxy might mangle: an IMAP command, a lone dot (POP3
#: end-of-message unless stuffed), a dot-stuffed-looking line and 8-bit text.
BODY = (
    b"first line\r\n"
    b"a1 STARTTLS\r\n"
    b".\r\n"
    b"..x\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln, latin-1 \xe9\xff\r\n"
    b"last line\r\n"
)
TLS_VERSION = "TLSv1.3"
TLS_INFO = TLSInfo(version=TLS_VERSION, cipher="TLS_AES_128_GCM_SHA256")
ID_FIELDS = (
    '("x-originating-ip" "127.0.0.6" "x-originating-port" "4242" "x-connected-ip" '
    '"127.0.0.1" "x-connected-port" "143" "x-client-transport" "TLS")'
)


def _message(token: str) -> bytes:
    return (
        b"From: alice@example.test\r\n"
        b"To: bob@example.test\r\n"
        b"Subject: " + token.encode() + b"\r\n"
        b"Message-ID: <" + token.encode() + b"@client.test>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + BODY
    )


def _connect(port: int, source: str, header: bytes) -> socket.socket:
    """A connection to Dovecot from ``source`` that starts with ``header``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(header)
    return sock


class _IMAP4(imaplib.IMAP4):
    """imaplib from a chosen loopback source address, optionally behind a PROXY header."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", header: bytes = b"") -> None:
        self._source = source
        self._header = header
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return _connect(self.port, self._source, self._header)


class _POP3Lines:
    """POP3 over a raw socket, for commands poplib does not have (XCLIENT) and PROXY."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.greeting = self.file.readline()

    def command(self, line: bytes) -> bytes:
        """Send one single-line-reply command; return the reply line without CRLF."""
        self.sock.sendall(line + b"\r\n")
        reply = self.file.readline()
        assert reply.endswith(b"\r\n"), f"truncated reply to {line!r}: {reply!r}"
        return reply[:-2]

    def capabilities(self) -> tuple[str, ...]:
        """The lines of the CAPA listing."""
        assert self.command(b"CAPA") == b"+OK"
        lines: list[str] = []
        while (line := self.file.readline()) != b".\r\n":
            assert line.endswith(b"\r\n"), f"truncated CAPA listing: {[*lines, line]!r}"
            lines.append(line[:-2].decode("ascii"))
        return tuple(lines)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _peer(client: str, port: int) -> Peer:
    return Peer(
        client_address=client, client_port=40000, local_address="127.0.0.1", local_port=port
    )


def _append(dovecot: DovecotInstance, user: str, message: bytes) -> None:
    with _IMAP4(dovecot.imap_port) as imap:
        imap.login(user, USERS[user])
        typ, data = imap.append("INBOX", "", None, message)
        assert typ == "OK", data


def _fetch_by_subject(imap: imaplib.IMAP4, token: str) -> bytes:
    typ, data = imap.select("INBOX", readonly=True)
    assert typ == "OK", data
    typ, data = imap.uid("SEARCH", "HEADER", "Subject", token)
    assert typ == "OK", data
    assert isinstance(data[0], bytes), data
    uids = data[0].split()
    assert len(uids) == 1, data
    typ, data = imap.uid("FETCH", uids[0].decode(), "(BODY.PEEK[])")
    assert typ == "OK", data
    part = data[0]
    assert isinstance(part, tuple), data
    return part[1]


@dataclass(frozen=True)
class _Login:
    """How one login attempt went."""

    greeting: bytes
    #: IMAP capabilities before login, or POP3 CAPA lines.
    capabilities: tuple[str, ...]
    accepted: bool
    #: What Dovecot logged about it ("Login: ..." or "Login failed: ...").
    log_line: str


def _outcome_line(
    dovecot: DovecotInstance, since: int, protocol: str, accepted: bool, rip: str
) -> str:
    """The log line about the login; waiting for it proves Dovecot logged ``rip``."""
    outcome = "Login" if accepted else "Login failed: Plaintext authentication disabled"
    return dovecot.wait_for_line(
        f"{protocol}-login: Info: {outcome}: user=<", f" rip={rip}, lip=127.0.0.1,", since=since
    )


def _imap_login(
    dovecot: DovecotInstance,
    port: int,
    *,
    rip: str,
    source: str = "127.0.0.1",
    header: bytes = b"",
    send_id: bool = False,
) -> _Login:
    """LOGIN as alice (after ``ID ID_FIELDS`` if ``send_id``); Dovecot must log ``rip``."""
    start = len(dovecot.log())
    with _IMAP4(port, source=source, header=header) as imap:
        capabilities = tuple(imap.capabilities)
        if send_id:
            typ, data = imap.xatom("ID", ID_FIELDS)
            assert typ == "OK", data
        try:
            imap.login("alice", "alicepw")
        except imaplib.IMAP4.error as error:
            assert "[PRIVACYREQUIRED]" in str(error)
            accepted = False
        else:
            accepted = True
    return _Login(
        imap.welcome, capabilities, accepted, _outcome_line(dovecot, start, "imap", accepted, rip)
    )


def _pop3_login(
    dovecot: DovecotInstance, port: int, *, rip: str, header: bytes = b"", xclient: bytes = b""
) -> _Login:
    """USER and PASS as bob (after the ``xclient`` line, if any); Dovecot must log ``rip``."""
    start = len(dovecot.log())
    pop = _POP3Lines(_connect(port, "127.0.0.1", header))
    try:
        if xclient:
            assert pop.command(xclient) == b"+OK Updated"
        capabilities = pop.capabilities()
        reply = pop.command(b"USER bob")
        if reply.startswith(b"+OK"):
            assert pop.command(b"PASS bobpw") == b"+OK Logged in."
        else:
            assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed"), reply
        assert pop.command(b"QUIT").startswith(b"+OK")
    finally:
        pop.close()
    accepted = reply.startswith(b"+OK")
    return _Login(
        pop.greeting, capabilities, accepted, _outcome_line(dovecot, start, "pop3", accepted, rip)
    )


def test_imap_append_and_fetch_byte_identical(dovecot: DovecotInstance) -> None:
    token = f"imap-{uuid.uuid4().hex}"
    message = _message(token)
    _append(dovecot, "alice", message)

    with _IMAP4(dovecot.imap_port) as imap:
        imap.login("alice", "alicepw")
        assert _fetch_by_subject(imap, token) == message

    # Dovecot stores the message with bare LF line ends in the user's Maildir.
    stored = [
        path.read_bytes()
        for path in dovecot.mailbox_path("alice").glob("*/*")
        if token.encode() in path.read_bytes()
    ]
    assert [raw.replace(b"\n", b"\r\n") for raw in stored] == [message]


def test_pop3_retr_byte_identical(dovecot: DovecotInstance) -> None:
    token = f"pop3-{uuid.uuid4().hex}"
    message = _message(token)
    _append(dovecot, "bob", message)

    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        pop.user("bob")
        pop.pass_("bobpw")
        retrieved = []
        for entry in pop.list()[1]:
            number, _ = entry.split()
            _, lines, _ = pop.retr(int(number))
            retrieved.append(b"".join(line + b"\r\n" for line in lines))
        assert [raw for raw in retrieved if token.encode() in raw] == [message]
    finally:
        pop.quit()


def test_imap_proxy_v2_without_ssl_tlv_refuses_login(dovecot: DovecotInstance) -> None:
    header = proxy_v2(_peer("127.0.0.5", dovecot.imap_proxy_port), None)
    login = _imap_login(dovecot, dovecot.imap_proxy_port, rip="127.0.0.5", header=header)
    assert "LOGINDISABLED" in login.capabilities
    assert not login.accepted
    assert "secured" not in login.log_line


def test_imap_proxy_v2_with_ssl_tlv_allows_login(dovecot: DovecotInstance) -> None:
    header = proxy_v2(_peer("127.0.0.5", dovecot.imap_proxy_port), TLS_INFO)
    login = _imap_login(dovecot, dovecot.imap_proxy_port, rip="127.0.0.5", header=header)
    assert "LOGINDISABLED" not in login.capabilities
    # Dovecot keeps advertising STARTTLS: a terminator in front must strip it.
    assert "STARTTLS" in login.capabilities
    assert login.accepted
    assert "method=PLAIN, rip=127.0.0.5, lip=127.0.0.1, mpid=" in login.log_line
    assert ", secured, session=<" in login.log_line


def test_pop3_proxy_v2_ssl_tlv_decides_login(dovecot: DovecotInstance) -> None:
    port = dovecot.pop3_proxy_port
    header = proxy_v2(_peer("127.0.0.8", port), None)
    refused = _pop3_login(dovecot, port, rip="127.0.0.8", header=header)
    # Without a secured session Dovecot hides USER and the SASL mechanisms.
    assert "USER" not in refused.capabilities
    assert not refused.accepted

    header = proxy_v2(_peer("127.0.0.8", port), TLS_INFO)
    accepted = _pop3_login(dovecot, port, rip="127.0.0.8", header=header)
    assert "USER" in accepted.capabilities
    assert "STLS" in accepted.capabilities
    assert accepted.accepted
    assert ", secured, " in accepted.log_line


def test_imap_id_from_trusted_client_sets_client_address(dovecot: DovecotInstance) -> None:
    login = _imap_login(dovecot, dovecot.imap_port, rip="127.0.0.6", send_id=True)
    assert login.accepted
    # Secured because 127.0.0.1 is a trusted network, not because of x-client-transport,
    # which Dovecot 2.3 does not know.
    assert ", secured, " in login.log_line


def test_imap_id_from_untrusted_client_is_ignored(dovecot: DovecotInstance) -> None:
    # Dovecot keeps the connection's own address: rip=127.0.0.9, not x-originating-ip.
    login = _imap_login(
        dovecot, dovecot.imap_port, rip="127.0.0.9", source="127.0.0.9", send_id=True
    )
    assert "LOGINDISABLED" in login.capabilities
    assert not login.accepted


def test_pop3_xclient_from_trusted_client_sets_client_address(dovecot: DovecotInstance) -> None:
    xclient = b"XCLIENT ADDR=127.0.0.7 PORT=4242 CLIENT-TRANSPORT=TLS"
    login = _pop3_login(dovecot, dovecot.pop3_port, rip="127.0.0.7", xclient=xclient)
    assert login.greeting.startswith(b"+OK [XCLIENT]")
    assert login.accepted
    assert ", secured, " in login.log_line


def test_plain_listeners_offer_starttls(dovecot: DovecotInstance, test_certs: CertFiles) -> None:
    start = len(dovecot.log())
    context = test_certs.client_context()
    with _IMAP4(dovecot.imap_port) as imap:
        typ, _ = imap.starttls(context)
        assert typ == "OK"
        assert isinstance(imap.sock, ssl.SSLSocket)
        assert imap.login("alice", "alicepw")[0] == "OK"
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        pop.stls(context)
        pop.user("bob")
        assert pop.pass_("bobpw").startswith(b"+OK")
    finally:
        pop.quit()
    for protocol, user in (("imap", "alice"), ("pop3", "bob")):
        line = dovecot.wait_for_line(
            f"{protocol}-login: Info: Login: user=<{user}>", " rip=127.0.0.1,", since=start
        )
        assert ", TLS, session=<" in line


def test_stop_ends_every_process(tmp_path: Path, test_certs: CertFiles) -> None:
    with start_dovecot(tmp_path / "dovecot", test_certs.cert, test_certs.key) as instance:
        group = instance.master_pid()
        assert group is not None
        assert os.getpgid(group) == group
        # The master and its children (log, config, anvil, auth, login processes ...).
        assert len(live_group_members(group)) > 3
        ports = instance.ports
        instance.wait_for_log("starting up for imap, pop3")
    assert instance.master_pid() is None
    assert live_group_members(group) == []
    assert not any(accepts_connections(instance.host, port, 0.5) for port in ports)
    instance.stop()
