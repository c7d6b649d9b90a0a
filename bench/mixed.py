"""Real sessions of every protocol through the proxy to real servers, each
checked end to end: what the robustness runs (``bench.faults``,
``bench.soak``) are made of.

The stack: the proxy (SMTP, IMAP, POP3 and XMPP listeners, STARTTLS) in
front of a real Postfix (Maildir delivery, XCLIENT), Dovecot and Prosody.
A session is a whole client dialogue with a payload whose checksum is
known: SMTP sends a message that must arrive in the Maildir exactly once;
IMAP fetches and POP3 retrieves a message put in place beforehand; XMPP
sends a message to its own resource and reads it back.

How a session ends is sorted into:

* ``ok``: the dialogue completed and the payload's checksum matched;
* ``refused``: the server side ended it with the protocol's own error (an
  SMTP 4xx/5xx, IMAP NO/BAD/BYE, POP3 -ERR, an XMPP stream error): what a
  client expects when something behind the server fails;
* ``dropped``: the connection closed or reset without such an error;
* ``hung``: nothing came within ``TIMEOUT``;
* ``corrupt``: the dialogue completed with the wrong bytes (never acceptable).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import imaplib
import os
import poplib
import re
import smtplib
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from bench.workloads import place_imap_message
from tests.realservers.certs import CertFiles, write_test_certs
from tests.realservers.dovecot import DovecotInstance, start_dovecot
from tests.realservers.net import sourced
from tests.realservers.postfix import PostfixInstance, start_postfix
from tests.realservers.prosody import ProsodyInstance, start_prosody
from tests.realservers.proxy import ProxyProcess, listener, start_proxy
from tests.realservers.xmpp import DOMAIN, XMPPStream

PROTOCOLS = ("smtp", "imap", "pop3", "xmpp")
OUTCOMES = ("ok", "refused", "dropped", "hung", "corrupt")
#: Seconds a client waits for any one reply before it calls the session hung.
TIMEOUT = 30.0
#: The message IMAP fetches and POP3 retrieves (CRLF lines, no leading dots).
STORED = b"From: robustness@example.test\r\nSubject: stored\r\n\r\n" + b"".join(
    b"%05d %s\r\n" % (n, base64.b64encode(bytes([n % 256]) * 45)) for n in range(200)
)
STORED_SHA256 = hashlib.sha256(STORED).hexdigest()
_TOKEN = re.compile(rb"X-Robustness-Token: (\S+)\r?\nX-Robustness-Sha256: (\S+)")


@dataclass(frozen=True)
class Outcome:
    protocol: str
    #: Monotonic seconds.
    started: float
    ended: float
    kind: str
    detail: str = ""
    #: SMTP: the token of the message sent (checked at the Maildir later).
    token: str = ""


@dataclass
class Stack:
    certs: CertFiles
    postfix: PostfixInstance
    dovecot: DovecotInstance
    prosody: ProsodyInstance
    proxy: ProxyProcess
    metrics_port: int


@contextlib.contextmanager
def running_stack(
    base: Path, metrics_port: int, listener_options: Mapping[str, Any] | None = None
) -> Iterator[Stack]:
    """Every server and the proxy, on loopback under ``base``, each listener
    with ``listener_options`` (limits, timeouts); stopped after."""
    options = listener_options or {}
    certs = write_test_certs(base / "certs", trustme.CA(), ("localhost",))
    with contextlib.ExitStack() as stack:
        dovecot = stack.enter_context(start_dovecot(base / "dovecot", certs.cert, certs.key))
        postfix = start_postfix(base / "postfix", certs.cert, certs.key)
        stack.callback(postfix.stop)
        prosody = stack.enter_context(start_prosody(base / "prosody"))
        for user in ("alice", "bob"):
            place_imap_message(dovecot.mailbox_path(user), STORED)
        proxy_v2 = {"identity": "proxy-v2"}
        proxy = start_proxy(
            base / "proxy",
            [(certs.cert, certs.key)],
            [
                listener("smtp", postfix.plain_port, backend={"identity": "xclient"}, **options),
                listener("imap", dovecot.imap_proxy_port, "imap", backend=proxy_v2, **options),
                listener("pop3", dovecot.pop3_proxy_port, "pop3", backend=proxy_v2, **options),
                listener(
                    "xmpp",
                    prosody.port,
                    "xmpp-client",
                    hostname=DOMAIN,
                    domains=[DOMAIN],
                    **options,
                ),
            ],
            log_level="info",
            metrics={"listen": f"127.0.0.1:{metrics_port}"},
        )
        stack.callback(proxy.stop)
        yield Stack(certs, postfix, dovecot, prosody, proxy, metrics_port)


# -- the sessions -----------------------------------------------------------------------


def _smtp(stack: Stack, source: str) -> str:
    token = base64.b32encode(os.urandom(10)).decode().lower()
    body = base64.encodebytes(os.urandom(3000)).replace(b"\n", b"\r\n")
    message = (
        b"From: <robustness@client.test>\r\nTo: <bob@example.test>\r\nSubject: %s\r\n"
        b"X-Robustness-Token: %s\r\nX-Robustness-Sha256: %s\r\n\r\n"
        % (token.encode(), token.encode(), hashlib.sha256(body).hexdigest().encode())
    ) + body
    port = stack.proxy.ports["smtp"]
    with smtplib.SMTP("localhost", port, source_address=(source, 0), timeout=TIMEOUT) as client:
        client.starttls(context=stack.certs.client_context())
        # smtplib would answer a 421 to EHLO with HELO on a closed connection
        # and report only that: look at the reply itself.
        code, text = client.ehlo()
        if code != 250:
            raise smtplib.SMTPResponseException(code, text)
        client.sendmail("robustness@client.test", ["bob@example.test"], message)
    return token


def _imap(stack: Stack, source: str) -> str:
    port = stack.proxy.ports["imap"]
    client = sourced(imaplib.IMAP4, source)("localhost", port, timeout=TIMEOUT)
    try:
        client.starttls(stack.certs.client_context())
        client.login("alice", "alicepw")
        client.select("INBOX", readonly=True)
        status, data = client.fetch("1", "(BODY.PEEK[])")
        fetched = data[0][1] if status == "OK" and isinstance(data[0], tuple) else b""
        client.logout()
    finally:
        with contextlib.suppress(OSError):
            client.shutdown()
    _compare(fetched)
    return ""


def _pop3(stack: Stack, source: str) -> str:
    port = stack.proxy.ports["pop3"]
    client = sourced(poplib.POP3, source)("localhost", port, timeout=TIMEOUT)
    try:
        client.stls(stack.certs.client_context())
        client.user("bob")
        client.pass_("bobpw")
        _, lines, _ = client.retr(1)
        client.quit()
    finally:
        client.close()
    _compare(b"".join(line + b"\r\n" for line in lines))
    return ""


def _xmpp(stack: Stack, source: str) -> str:
    sock = socket.create_connection(
        ("127.0.0.1", stack.proxy.ports["xmpp"]), timeout=TIMEOUT, source_address=(source, 0)
    )
    stream = XMPPStream(sock)
    try:
        stream.starttls(stack.certs.client_context())
        jid = stream.login("alice", "alicepw")
        # Available, so that the message to this resource is delivered to it.
        stream.send(b"<presence/>")
        body = base64.b64encode(os.urandom(600))
        digest = hashlib.sha256(body).hexdigest().encode()
        stream.send(
            b"<message to='%s' type='chat' id='%s'><body>%s</body></message>"
            % (jid, digest[:16], body)
        )
        echoed = stream.read_until(b"</message>")
        stream.send(b"</stream:stream>")
    finally:
        stream.close()
    if b"<body>%s</body>" % body not in echoed:
        raise CorruptError(f"XMPP message came back different: {echoed[:200]!r}")
    return ""


SESSIONS: dict[str, Callable[[Stack, str], str]] = {
    "smtp": _smtp,
    "imap": _imap,
    "pop3": _pop3,
    "xmpp": _xmpp,
}


class CorruptError(Exception):
    """The dialogue completed, with the wrong bytes."""


def _compare(received: bytes) -> None:
    if hashlib.sha256(received).hexdigest() != STORED_SHA256:
        raise CorruptError(f"{len(received)} bytes, not the {len(STORED)} stored")


def run_session(stack: Stack, protocol: str, source: str) -> Outcome:
    """One session; how it ended, never an exception."""
    started = time.monotonic()
    token = ""
    try:
        token = SESSIONS[protocol](stack, source)
        kind, detail = "ok", ""
    except CorruptError as error:
        kind, detail = "corrupt", str(error)
    except TimeoutError as error:
        kind, detail = "hung", str(error) or "timed out"
    except (imaplib.IMAP4.error, poplib.error_proto, smtplib.SMTPException, OSError) as error:
        kind, detail = _refused_or_dropped(error)
    return Outcome(protocol, started, time.monotonic(), kind, detail[:300], token)


def _refused_or_dropped(error: Exception) -> tuple[str, str]:
    """A protocol error the server sent is ``refused``; a connection that just
    ended is ``dropped``. XMPP's stream error shows in the bytes read."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, smtplib.SMTPResponseException | smtplib.SMTPRecipientsRefused):
        return "refused", text
    if isinstance(error, poplib.error_proto) and str(error).startswith("b'-ERR"):
        return "refused", text
    if isinstance(error, imaplib.IMAP4.abort):
        # imaplib aborts with a BYE's text, or with the socket's trouble.
        return ("dropped" if "socket error" in str(error) else "refused"), text
    if isinstance(error, imaplib.IMAP4.error):
        return "refused", text
    if "<stream:error>" in str(error):
        return "refused", text
    return "dropped", text


def source_addresses() -> Iterator[str]:
    """Loopback addresses for clients, one after another (a port range each)."""
    while True:
        for third in range(100, 200):
            for fourth in range(1, 255):
                yield f"127.0.{third}.{fourth}"


def delivered_tokens(postfix: PostfixInstance) -> dict[str, int]:
    """How many times each SMTP token arrived in the Maildir, its checksum verified
    (a message whose body does not match counts under ``corrupt:TOKEN``)."""
    counts: dict[str, int] = {}
    for raw in postfix.delivered():
        found = _TOKEN.search(raw)
        if found is None:
            continue
        token, digest = found[1].decode(), found[2].decode()
        # Maildir delivery stores LF line ends; the client hashed CRLF ones.
        body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")[2].replace(b"\n", b"\r\n")
        key = token if hashlib.sha256(body).hexdigest() == digest else f"corrupt:{token}"
        counts[key] = counts.get(key, 0) + 1
    return counts
