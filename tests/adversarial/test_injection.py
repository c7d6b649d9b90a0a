"""Command and response injection around the TLS upgrade, against the live
proxy in front of the real Postfix, Dovecot (IMAP, POP3) and Prosody.

The class: a man in the middle cannot read a STARTTLS session, but before
the upgrade he can add plaintext of his own. A server that reads that
plaintext after the handshake runs it as if the client had sent it inside
TLS. Wietse Venema found it in Postfix and others (CVE-2011-0411); nginx's
mail proxy had it again (CVE-2014-3556); Poddebniak et al., "Why TLS is better
without STARTTLS" (USENIX Security 2021), tested every way the injected bytes
can arrive, which the cases here follow; Dovecot's submission service had it
as CVE-2021-33515 (its SMTP submission STARTTLS, not IMAP or POP3).

The oracle is a recording tap (``tests/realservers/tap.py``) between the
proxy and each backend: an injected command never appears there, and after
the handshake the client reads the reply to the one command it sends, then
the reply to its goodbye, and nothing else. The tests of the other direction
put a scripted fake backend behind the proxy that says more than it was
asked (the same paper's response injection).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.dovecot import DovecotInstance
from tests.realservers.memorytls import MemoryTLS
from tests.realservers.net import Channel, read_until
from tests.realservers.postfix import PostfixInstance
from tests.realservers.prosody import ProsodyInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener
from tests.realservers.tap import FakeBackend, RecordingTap, Script, read_line

#: Bounds every read, so that a proxy that says nothing fails the test instead of hanging it.
READ_TIMEOUT = 5.0
#: Long enough for a segment sent before it to be read apart from one sent after.
GAP = 0.2
#: What a fake backend adds to its dialogue; it must never reach a client.
INJECTED = b"INJECTED-BY-BACKEND"

_sources = (f"127.0.7.{n}" for n in itertools.count(1))


def read_to_end(channel: Channel) -> bytes:
    return read_until(channel, lambda _: False)


def ends_with_line(pattern: bytes) -> Callable[[bytes], bool]:
    """Done once the data's last complete line matches ``pattern``."""
    compiled = re.compile(pattern)
    return lambda data: (
        data.endswith(b"\n") and bool(compiled.match(data[:-1].rpartition(b"\n")[2] + b"\n"))
    )


@dataclass(frozen=True)
class Dialect:
    """What a protocol's session around the upgrade looks like."""

    listener: str
    #: Before the upgrade: greet, say hello; returns once the client may upgrade.
    opening: Callable[[socket.socket], None]
    upgrade: bytes
    #: Done once the upgrade's reply is in.
    upgrade_done: Callable[[bytes], bool]
    upgrade_accepted: bytes
    #: An injected command that names ``token``, which the backend would echo.
    inject: Callable[[str], bytes]
    #: The one command after TLS, and the pattern its whole reply matches.
    command: bytes
    reply_done: Callable[[bytes], bool]
    reply: bytes
    goodbye: bytes
    farewell: bytes
    #: The upgrade command's keyword, which the backend must never see.
    keyword: bytes


def _smtp_opening(sock: socket.socket) -> None:
    assert read_until(sock, SMTP_DONE).startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    assert read_until(sock, SMTP_DONE).startswith(b"250-")


SMTP_DONE = ends_with_line(rb"\d{3} ")


def _imap_opening(sock: socket.socket) -> None:
    assert read_until(sock, ends_with_line(rb".")).startswith(b"* OK ")


def _pop3_opening(sock: socket.socket) -> None:
    assert read_until(sock, ends_with_line(rb".")).startswith(b"+OK ")


XMPP_HEADER = (
    b"<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)
XMPP_FEATURES_DONE: Callable[[bytes], bool] = lambda data: data.endswith(b"</stream:features>")  # noqa: E731


def _xmpp_opening(sock: socket.socket) -> None:
    sock.sendall(XMPP_HEADER)
    assert b"<starttls" in read_until(sock, XMPP_FEATURES_DONE)


DIALECTS = {
    "smtp": Dialect(
        listener="smtp",
        opening=_smtp_opening,
        upgrade=b"STARTTLS\r\n",
        upgrade_done=SMTP_DONE,
        upgrade_accepted=b"220 ",
        # Postfix would answer 250 to it, or 503 had it come before EHLO.
        inject=lambda token: b"MAIL FROM:<%s@evil.test>\r\n" % token.encode(),
        command=b"EHLO client.test\r\n",
        reply_done=SMTP_DONE,
        reply=rb"(?:250-[^\r\n]*\r\n)*250 [^\r\n]*\r\n",
        goodbye=b"QUIT\r\n",
        farewell=rb"221 [^\r\n]*\r\n",
        keyword=b"starttls",
    ),
    "imap": Dialect(
        listener="imap",
        opening=_imap_opening,
        upgrade=b"a STARTTLS\r\n",
        upgrade_done=ends_with_line(rb"a "),
        upgrade_accepted=b"a OK ",
        # Its tag carries the token: Dovecot's tagged answer would too.
        inject=lambda token: b"inj%s LOGIN alice alicepw\r\n" % token.encode(),
        command=b"k1 CAPABILITY\r\n",
        reply_done=ends_with_line(rb"k1 "),
        reply=rb"\* CAPABILITY [^\r\n]*\r\nk1 OK [^\r\n]*\r\n",
        goodbye=b"k2 LOGOUT\r\n",
        farewell=rb"\* BYE [^\r\n]*\r\nk2 OK [^\r\n]*\r\n",
        keyword=b"starttls",
    ),
    "pop3": Dialect(
        listener="pop3",
        opening=_pop3_opening,
        upgrade=b"STLS\r\n",
        upgrade_done=ends_with_line(rb"."),
        upgrade_accepted=b"+OK",
        inject=lambda token: b"USER %s\r\n" % token.encode(),
        command=b"CAPA\r\n",
        reply_done=lambda data: data.endswith(b"\r\n.\r\n"),
        # No status line among the capabilities: an injected command's +OK
        # before CAPA's would turn CAPA's own into one.
        reply=rb"\+OK[^\r\n]*\r\n(?:[^+\-.\r\n][^\r\n]*\r\n)*\.\r\n",
        goodbye=b"QUIT\r\n",
        farewell=rb"\+OK[^\r\n]*\r\n",
        keyword=b"stls",
    ),
    "xmpp": Dialect(
        listener="xmpp",
        opening=_xmpp_opening,
        upgrade=b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        upgrade_done=lambda data: data.endswith(b"/>"),
        upgrade_accepted=b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        inject=lambda token: (
            b"<iq type='get' id='%s'><query xmlns='jabber:iq:version'/></iq>" % token.encode()
        ),
        command=XMPP_HEADER,
        reply_done=XMPP_FEATURES_DONE,
        reply=(
            rb"(?:<\?xml[^>]*\?>)?\s*<stream:stream [^>]*>"
            rb"\s*<stream:features>.*</stream:features>"
        ),
        goodbye=b"</stream:stream>",
        farewell=rb"\s*</stream:stream>\s*",
        keyword=b"starttls",
    ),
}


@pytest.fixture(scope="module")
def taps(
    postfix: PostfixInstance, dovecot: DovecotInstance, prosody: ProsodyInstance
) -> Iterator[dict[str, RecordingTap]]:
    backends = {
        "smtp": postfix.plain_port,
        "imap": dovecot.imap_proxy_port,
        "pop3": dovecot.pop3_proxy_port,
        "xmpp": prosody.port,
    }
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(RecordingTap(port)) for name, port in backends.items()}


def _fake_smtp(sock: socket.socket, opening: bytes) -> None:
    sock.sendall(opening)
    while line := read_line(sock):
        verb = line.split()[0].upper() if line.split() else b""
        if verb == b"EHLO":
            sock.sendall(b"250-fake.test\r\n250 X-REAL\r\n")
        elif verb == b"QUIT":
            sock.sendall(b"221 2.0.0 Bye\r\n")
            return
        else:
            sock.sendall(b"250 2.0.0 Ok\r\n")


def _fake_imap(sock: socket.socket, opening: bytes) -> None:
    sock.sendall(opening)
    while line := read_line(sock):
        tag, _, rest = line.partition(b" ")
        if rest.upper().startswith(b"CAPABILITY"):
            sock.sendall(b"* CAPABILITY IMAP4rev1\r\n%s OK done\r\n" % tag)
        elif rest.upper().startswith(b"LOGOUT"):
            sock.sendall(b"* BYE bye\r\n%s OK done\r\n" % tag)
            return
        else:
            sock.sendall(b"%s OK done\r\n" % tag)


def _fake_pop3(sock: socket.socket, opening: bytes) -> None:
    sock.sendall(opening)
    while line := read_line(sock):
        if line.upper().startswith(b"CAPA"):
            sock.sendall(b"+OK\r\nTOP\r\nUIDL\r\n.\r\n")
        elif line.upper().startswith(b"QUIT"):
            sock.sendall(b"+OK bye\r\n")
            return
        else:
            sock.sendall(b"+OK\r\n")


def _late(script: Callable[[socket.socket, bytes], None], opening: bytes) -> Script:
    """``script`` with its opening held back a little: by then the client's
    first command after TLS waits at the proxy, which is when an extra reply
    in the opening could be taken for that command's."""

    def late(sock: socket.socket) -> None:
        time.sleep(GAP)
        script(sock, opening)

    return late


#: Fake backends that say more than their greeting before being asked anything.
CHATTY = {
    "smtp": _late(_fake_smtp, b"220 fake.test ESMTP\r\n250 2.0.0 " + INJECTED + b"\r\n"),
    # A tagged completion for the tag the client is about to use.
    "imap": _late(_fake_imap, b"* OK fake ready\r\nk1 OK " + INJECTED + b"\r\n"),
    "pop3": _late(_fake_pop3, b"+OK fake ready\r\n+OK " + INJECTED + b"\r\n"),
}
#: A backend whose EHLO reply comes with the greeting, before the probe's EHLO.
PROBED = (_fake_smtp, b"220 fake.test ESMTP\r\n250-fake.test\r\n250 X-" + INJECTED + b"\r\n")


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeBackend]]:
    scripts = {**CHATTY, "smtp-probed": lambda sock: PROBED[0](sock, PROBED[1])}
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(FakeBackend(script)) for name, script in scripts.items()}


@pytest.fixture(scope="module")
def proxy(
    module_proxy: StartProxy, taps: dict[str, RecordingTap], fakes: dict[str, FakeBackend]
) -> ProxyProcess:
    proxy_v2 = {"identity": "proxy-v2"}
    fixed = {"smtp": ["8BITMIME"], "imap": ["IMAP4rev1"], "pop3": ["TOP", "UIDL"]}
    return module_proxy(
        [
            listener("smtp", taps["smtp"].port, backend={"identity": "xclient"}),
            listener("imap", taps["imap"].port, "imap", backend=proxy_v2),
            listener("pop3", taps["pop3"].port, "pop3", backend=proxy_v2),
            listener(
                "xmpp", taps["xmpp"].port, "xmpp-client", hostname="localhost",
                domains=["localhost"],
            ),
            *(
                listener(f"{name}-chatty", fakes[name].port, name, capabilities=capabilities)
                for name, capabilities in fixed.items()
            ),
            listener("smtp-probed", fakes["smtp-probed"].port),
        ]
    )  # fmt: skip


# -- client -> backend ------------------------------------------------------------------


def _connect(proxy: ProxyProcess, dialect: Dialect) -> tuple[socket.socket, str]:
    source = next(_sources)
    sock = proxy.connect(dialect.listener, source)
    sock.settimeout(READ_TIMEOUT)
    # Each send its own segment: the cases differ in how the bytes are cut.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dialect.opening(sock)
    return sock, source


def _after_tls(tls: Channel, dialect: Dialect) -> None:
    """The one command and the goodbye: each read must be exactly its reply."""
    tls.sendall(dialect.command)
    reply = read_until(tls, dialect.reply_done)
    assert re.fullmatch(dialect.reply, reply, re.DOTALL), reply
    tls.sendall(dialect.goodbye)
    farewell = read_to_end(tls)
    assert re.fullmatch(dialect.farewell, farewell), farewell


def _served(tls: MemoryTLS, dialect: Dialect, before_hello: bytes, after_hello: bytes) -> bool:
    """Whether the session got through TLS, and then it was clean; False
    when the TLS worker refused it.

    Under TLS 1.3 the client finishes its handshake before the server has
    read its Finished, so bytes sent after the ClientHello end the session
    only at the first read: that read tells.
    """
    try:
        tls.handshake(before_hello, after_hello)
        tls.sendall(dialect.command)
        reply = read_until(tls, dialect.reply_done)
    except (ssl.SSLError, OSError):
        return False
    if not reply:
        return False
    assert re.fullmatch(dialect.reply, reply, re.DOTALL), reply
    tls.sendall(dialect.goodbye)
    farewell = read_to_end(tls)
    assert re.fullmatch(dialect.farewell, farewell), farewell
    return True


def _wait_closed(proxy: ProxyProcess, source: str) -> str:
    """The proxy's line about the session's end (by then it sent all it would)."""
    pattern = re.compile(rf"{re.escape(source)}:\d+ closed after [^\n]*")
    deadline = time.monotonic() + READ_TIMEOUT
    while (found := pattern.search(proxy.log())) is None:
        assert time.monotonic() < deadline, f"no end of the session from {source}"
        time.sleep(0.05)
    return found[0]


def _assert_never_reached(tap: RecordingTap, *texts: bytes) -> None:
    seen = tap.everything().lower()
    for text in texts:
        assert text.lower() not in seen, f"{text!r} reached the backend: {seen!r}"


#: How the injected bytes travel, as (name, whether the handshake must succeed):
#: None where it may go either way (see the test).
WAYS = {
    "same_segment_as_upgrade": True,
    "own_segment_before_upgrade_reply": None,
    "after_upgrade_reply_before_client_hello": False,
    "same_segment_before_client_hello": False,
    "same_segment_after_client_hello": False,
    "second_pipelined_upgrade": True,
}


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("protocol", DIALECTS)
def test_command_injection_after_starttls(
    proxy: ProxyProcess,
    taps: dict[str, RecordingTap],
    test_certs: CertFiles,
    protocol: str,
    way: str,
) -> None:
    """CVE-2011-0411 and its kin (nginx CVE-2014-3556; Dovecot submission's
    CVE-2021-33515): plaintext a man in the middle adds around the upgrade
    must not run inside TLS. The ways are those of Poddebniak et al., "Why TLS
    is better without STARTTLS" (USENIX Security 2021), section on command
    injection: in the upgrade's segment, in a segment of its own before the
    upgrade reply is read, after that reply but before the ClientHello, in
    the ClientHello's segment (before or after it), and as a second upgrade
    pipelined after the first.

    Bytes the proxy read with the upgrade command are discarded, and the
    handshake goes on; bytes it reads later belong to the TLS stream, where
    they are not a TLS record and end the handshake. A segment sent right
    after the upgrade command may land on either side of that line, so
    there either outcome is right. Either way the backend never sees them.
    """
    dialect = DIALECTS[protocol]
    tap = taps[protocol]
    token = f"tok{uuid.uuid4().hex}"
    injected = dialect.inject(token)
    sock, source = _connect(proxy, dialect)
    tls = MemoryTLS(sock, test_certs)
    before_hello = after_hello = b""
    if way == "same_segment_as_upgrade":
        sock.sendall(dialect.upgrade + injected)
    elif way == "second_pipelined_upgrade":
        sock.sendall(dialect.upgrade + dialect.upgrade + injected)
    else:
        sock.sendall(dialect.upgrade)
    if way == "own_segment_before_upgrade_reply":
        sock.sendall(injected)
    upgrade_reply = read_until(sock, dialect.upgrade_done)
    assert upgrade_reply.startswith(dialect.upgrade_accepted), upgrade_reply
    if way == "after_upgrade_reply_before_client_hello":
        sock.sendall(injected)
        time.sleep(GAP)
    elif way == "same_segment_before_client_hello":
        before_hello = injected
    elif way == "same_segment_after_client_hello":
        after_hello = injected
    served = _served(tls, dialect, before_hello, after_hello)
    expected = WAYS[way]
    if expected is not None:
        assert served is expected
    if served:
        # Not vacuous: the tap did see what the client sent inside TLS.
        assert dialect.command.strip() in tap.everything()
    sock.close()
    ending = _wait_closed(proxy, source)
    if not served:
        assert "TLS handshake failed" in ending, ending
    _assert_never_reached(tap, token.encode(), dialect.keyword)


# -- IMAP syntax ------------------------------------------------------------------------


def _has_line(prefix: bytes) -> Callable[[bytes], bool]:
    """Done once a complete line starts with ``prefix``."""
    return lambda data: any(line.startswith(prefix) for line in data.split(b"\r\n")[:-1])


@pytest.mark.parametrize(
    "upgrade",
    [b"a starttls\r\n", b"A.1 StartTLS\r\n", b"a STARTTLS \r\n"],
    ids=["lower_case", "odd_tag_mixed_case", "trailing_space"],
)
def test_imap_starttls_spelled_oddly_still_discards_what_follows(
    proxy: ProxyProcess, taps: dict[str, RecordingTap], test_certs: CertFiles, upgrade: bytes
) -> None:
    """CVE-2011-0411 in IMAP, with the spellings the USENIX Security 2021
    STARTTLS study's tester varies (case, tag characters): whatever form of
    STARTTLS the proxy accepts, the bytes behind it are discarded, and one
    it does not accept is refused before any upgrade."""
    dialect = DIALECTS["imap"]
    token = f"tok{uuid.uuid4().hex}"
    sock, source = _connect(proxy, dialect)
    sock.sendall(upgrade + dialect.inject(token))
    tag = upgrade.split()[0]
    reply = read_until(sock, _has_line(tag + b" "))
    if reply.startswith(tag + b" OK"):
        tls = MemoryTLS(sock, test_certs)
        tls.handshake()
        _after_tls(tls, dialect)
    else:
        # Refused: the injected line is then an ordinary pre-TLS command,
        # which the proxy refuses without TLS.
        assert reply.startswith(tag + b" BAD"), reply
        injected_tag = b"inj" + token.encode()
        reply += read_until(sock, _has_line(injected_tag))
        assert injected_tag + b" NO [PRIVACYREQUIRED]" in reply, reply
    sock.close()
    _wait_closed(proxy, source)
    _assert_never_reached(taps["imap"], token.encode(), b"starttls")


#: The line before the hidden bytes, the proxy's answer to it, and whether
#: the hidden bytes are read as commands (their STARTTLS then upgrades).
ODD_LINES = {
    "leading_spaces": (b"  a STARTTLS\r\n", b"* BAD Invalid tag\r\n", True),
    # The proxy sends no "+" for a refused command: the octets a client
    # sends anyway are commands to it, as to the IMAP server it stands for.
    "literal": (b"a STARTTLS {%d}\r\n", b"a BAD STARTTLS takes no arguments\r\n", True),
    "non_synchronizing_literal": (
        b"a STARTTLS {%d+}\r\n",
        b"a BAD STARTTLS takes no arguments\r\n",
        False,
    ),
    "literal_of_another_command": (b"a NOOP {%d+}\r\n", b"a OK NOOP completed\r\n", False),
}


@pytest.mark.parametrize("case", ODD_LINES)
def test_imap_starttls_that_is_no_upgrade_upgrades_nothing(
    proxy: ProxyProcess, taps: dict[str, RecordingTap], test_certs: CertFiles, case: str
) -> None:
    """USENIX Security 2021 ("Why TLS is better without STARTTLS"), IMAP
    command injection with odd syntax: a STARTTLS behind leading spaces, one
    that announces a literal holding the injected bytes, and a STARTTLS that
    is the literal of another command are no upgrade. Where the bytes behind
    them are read as commands, their own STARTTLS is the upgrade and what
    follows it is discarded; a literal's octets are never a command. Either
    way the injected command never reaches the backend."""
    line, answer, hidden_upgrades = ODD_LINES[case]
    dialect = DIALECTS["imap"]
    token = f"tok{uuid.uuid4().hex}"
    hidden = b"b STARTTLS\r\n" + dialect.inject(token)
    sock, source = _connect(proxy, dialect)
    if b"%d" in line:
        # After a literal its command goes on: the CRLF ends it.
        sock.sendall(line % len(hidden) + hidden + b"\r\n")
    else:
        sock.sendall(line + hidden)
    said = read_until(sock, _has_line(b"b " if hidden_upgrades else answer[:2]))
    assert said.startswith(answer), said
    if not hidden_upgrades:
        sock.sendall(dialect.upgrade)
        said += read_until(sock, _has_line(b"a OK Begin"))
    upgraded = said.split(b"\r\n")[-2]
    assert upgraded.startswith(b"b OK Begin TLS" if hidden_upgrades else b"a OK Begin TLS"), said
    tls = MemoryTLS(sock, test_certs)
    tls.handshake()
    _after_tls(tls, dialect)
    sock.close()
    _wait_closed(proxy, source)
    _assert_never_reached(taps["imap"], token.encode(), b"starttls")


# -- backend -> client ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", CHATTY)
def test_backend_reply_pipelined_after_its_greeting_never_reaches_the_client(
    proxy: ProxyProcess, test_certs: CertFiles, protocol: str
) -> None:
    """Response injection (Poddebniak et al., "Why TLS is better without
    STARTTLS", USENIX Security 2021), from the backend's side of the proxy: a
    reply that arrives with the backend's greeting, before the proxy sent
    any command, answers nothing. Taken for the answer to the client's first
    command it would put words in the backend's mouth and shift every reply
    after it by one; the session ends instead (421, BYE, -ERR), and the
    extra reply never reaches the client."""
    dialect = DIALECTS[protocol]
    sock = proxy.connect(f"{protocol}-chatty", next(_sources))
    sock.settimeout(READ_TIMEOUT)
    dialect.opening(sock)
    sock.sendall(dialect.upgrade)
    assert read_until(sock, dialect.upgrade_done).startswith(dialect.upgrade_accepted)
    tls = MemoryTLS(sock, test_certs)
    tls.handshake()
    tls.sendall(dialect.command)
    said = read_to_end(tls)
    sock.close()
    assert INJECTED not in said, said
    unavailable = {
        "smtp": rb"421 [^\r\n]*\r\n",
        "imap": rb"\* BYE \[UNAVAILABLE\][^\r\n]*\r\n",
        "pop3": rb"-ERR [^\r\n]*\r\n",
    }[protocol]
    assert re.fullmatch(unavailable, said), said


def test_probe_reply_pipelined_with_the_greeting_is_not_advertised(
    proxy: ProxyProcess, fakes: dict[str, FakeBackend]
) -> None:
    """Response injection against the capability probe (the same USENIX
    Security 2021 class): an EHLO reply that came with the backend's
    greeting, before the probe's EHLO, is not the backend's answer to it, and
    what it lists is not advertised to clients before TLS."""
    assert fakes["smtp-probed"].connections >= 1
    sock = proxy.connect("smtp-probed", next(_sources))
    sock.settimeout(READ_TIMEOUT)
    assert read_until(sock, SMTP_DONE).startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    reply = read_until(sock, SMTP_DONE)
    sock.close()
    assert reply.startswith(b"250-"), reply
    assert INJECTED not in reply, reply
