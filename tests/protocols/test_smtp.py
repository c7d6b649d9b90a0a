"""Tests of the SMTP machine and probe, written as transcripts (see
``tests.protocols.transcript``)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols._base import (
    BackendIdentity,
    BareLineEndings,
    CloseConnection,
    Command,
    OpenBackend,
    Peer,
    SendToBackend,
    SendToClient,
    Side,
    StartTLS,
    TLSMode,
)
from protocols.smtp import (
    SMTPCapabilityProbe,
    SMTPMachine,
    State,
    xtext,
)
from tests.protocols.dialogues import (
    SHUTDOWN,
    SMTP,
    Transcripts,
    split_invariance_tests,
)
from tests.protocols.transcript import (
    EOF,
    HOST,
    TLS,
    Backend,
    Client,
    Connected,
    Event,
    Failed,
    ShuttingDown,
    Timeout,
    backend_bytes,
    check_probe_error,
    drain,
    exchange,
    run,
)

CAPABILITIES = SMTP.capabilities
PEER = SMTP.peer
settings = SMTP.settings
relaying = SMTP.relaying
GREETING = SMTP.greeting
(PRE_TLS_EHLO,) = SMTP.capability_reply
TLS_READY = SMTP.tls_ready
UNAVAILABLE = SMTP.unavailable
TLS_FIRST = SendToClient(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
NOT_IMPLEMENTED = SendToClient(b"502 5.5.1 Error: command not implemented\r\n")
BAD_LINE = SendToClient(b"500 5.5.2 Error: bare <CR> or <LF> received\r\n")
SMUGGLING = SendToClient(b"521 5.5.2 proxy.example Error: bare <CR> or <LF> received\r\n")
BACKEND_GREETING = SMTP.backend_greeting
BACKEND_EHLO = (
    b"250-mx.backend.test\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-STARTTLS\r\n"
    b"250-AUTH PLAIN LOGIN SCRAM-SHA-256-PLUS\r\n"
    b"250-AUTH=SCRAM-SHA-1-PLUS\r\n"
    b"250-XCLIENT NAME ADDR PORT PROTO HELO\r\n"
    b"250-XFORWARD NAME ADDR PROTO HELO\r\n"
    b"250-CHUNKING\r\n"
    b"250 STARTTLS\r\n"
)
RELAYED_EHLO = (
    b"250-mx.backend.test\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250 CHUNKING\r\n"
)
#: STARTTLS, the handshake and the backend connection, up to its greeting.
TO_BACKEND_GREETING = (*SMTP.started_tls(), TLS(), *SMTP.to_backend(), *SMTP.backend_greeted())
QUIT_STEPS: tuple[Event | Command, ...] = (
    *exchange(b"QUIT\r\n", b"221 2.0.0 Bye\r\n"),
    CloseConnection("client quit", clean=True),
)


def in_body(**overrides: object) -> SMTPMachine:
    """A relaying machine whose backend has just answered DATA with 354."""
    machine = relaying(**overrides)
    run(
        machine,
        *exchange(b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    )
    assert machine.state is State.DATA_BODY
    return machine


# --------------------------------------------------------------------------
# Whole sessions.


def test_full_starttls_session() -> None:
    machine = SMTPMachine(settings(), PEER)
    body = b"Subject: hi\r\n\r\nHello.\r\n"
    run(
        machine,
        GREETING,
        Client(b"ehlo client.example\r\n"),
        PRE_TLS_EHLO,
        Client(b"STARTTLS\r\n"),
        TLS_READY,
        StartTLS(b""),
        TLS(),
        OpenBackend(),
        Connected(),
        Backend(BACKEND_GREETING),
        Client(b"EHLO client.example\r\n"),
        SendToBackend(b"EHLO client.example\r\n"),
        Backend(BACKEND_EHLO),
        SendToClient(RELAYED_EHLO),
        *exchange(b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Ok\r\n"),
        *exchange(b"RCPT TO:<b@example.net>\r\n", b"250 2.1.5 Ok\r\n"),
        *exchange(b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        *exchange(body + b".\r\n", b"250 2.0.0 Ok: queued as 4ABC\r\n"),
        *QUIT_STEPS,
    )
    assert machine.state is State.CLOSED
    run(machine, Client(b"NOOP\r\n"), Backend(b"250 late\r\n"), Timeout())


def test_xclient_identity_with_odd_helo_name_and_ipv6() -> None:
    peer = Peer("2001:db8::25", 50000, "2001:db8::1", 25)
    machine = SMTPMachine(settings(identity=BackendIdentity.XCLIENT), peer)
    run(
        machine,
        GREETING,
        Client(b"EHLO h\xe9lo+x=y\r\n"),
        PRE_TLS_EHLO,
        *TO_BACKEND_GREETING,
        SendToBackend(b"EHLO proxy.example\r\n"),
        Backend(
            b"250-mx.backend.test\r\n250-PIPELINING\r\n250 XCLIENT NAME ADDR PORT PROTO HELO\r\n"
        ),
        SendToBackend(
            b"XCLIENT ADDR=IPV6:2001:db8::25 PORT=50000 PROTO=ESMTP HELO=h+E9lo+2Bx+3Dy"
            b" NAME=[UNAVAILABLE]\r\n"
        ),
        Backend(b"220 mx.backend.test ESMTP Postfix\r\n"),
        Client(b"EHLO h\xe9lo+x=y\r\n"),
        SendToBackend(b"EHLO h\xe9lo+x=y\r\n"),
        Backend(BACKEND_EHLO),
        SendToClient(RELAYED_EHLO),
    )


def test_xclient_sends_only_the_attributes_the_backend_lists() -> None:
    machine = SMTPMachine(settings(identity=BackendIdentity.XCLIENT), PEER)
    run(
        machine,
        GREETING,
        Client(b"HELO old.example\r\n"),
        SendToClient(b"250 proxy.example\r\n"),
        *TO_BACKEND_GREETING,
        SendToBackend(b"EHLO proxy.example\r\n"),
        Backend(b"250-mx.backend.test\r\n250 XCLIENT NAME ADDR PROTO HELO\r\n"),
        SendToBackend(
            b"XCLIENT ADDR=192.0.2.10 PROTO=SMTP HELO=old.example NAME=[UNAVAILABLE]\r\n"
        ),
        Backend(b"220 mx.backend.test ESMTP\r\n"),
    )
    assert machine.state is State.RELAY


@pytest.mark.parametrize(
    ("ehlo_reply", "xclient_reply", "reason"),
    [
        (b"250-mx\r\n250 PIPELINING\r\n", None, "backend does not offer XCLIENT to the proxy"),
        (b"550 no\r\n", None, "backend refused the proxy's EHLO: 550 no"),
        (
            b"250-mx\r\n250 XCLIENT ADDR\r\n",
            b"550 5.7.0 Error: insufficient authorization\r\n",
            "backend refused XCLIENT: 550 5.7.0 Error: insufficient authorization",
        ),
    ],
)
def test_xclient_failures_give_421(
    ehlo_reply: bytes, xclient_reply: bytes | None, reason: str
) -> None:
    machine = SMTPMachine(settings(identity=BackendIdentity.XCLIENT), PEER)
    run(machine, GREETING, *TO_BACKEND_GREETING, SendToBackend(b"EHLO proxy.example\r\n"))
    machine.receive_data(Side.BACKEND, ehlo_reply)
    if xclient_reply is not None:
        assert machine.next_command() == SendToBackend(b"XCLIENT ADDR=192.0.2.10\r\n")
        machine.receive_data(Side.BACKEND, xclient_reply)
    assert drain(machine) == [UNAVAILABLE, CloseConnection(reason)]
    assert machine.state is State.ERROR


def test_plaintext_relay_replays_ehlo() -> None:
    machine = SMTPMachine(settings(require_tls=False), PEER)
    run(
        machine,
        GREETING,
        Client(b"EHLO client.example\r\n"),
        PRE_TLS_EHLO,
        Client(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"),
        OpenBackend(),
        Client(b"DATA\r\n"),
        Connected(),
        Backend(BACKEND_GREETING),
        SendToBackend(b"EHLO client.example\r\n"),
        Backend(BACKEND_EHLO),
        SendToBackend(b"MAIL FROM:<a@example.org>\r\n"),
        SendToBackend(b"RCPT TO:<b@example.net>\r\n"),
        SendToBackend(b"DATA\r\n"),
        Backend(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n554 5.5.1 Error: no valid recipients\r\n"),
        SendToClient(b"250 2.1.0 Ok\r\n"),
        SendToClient(b"250 2.1.5 Ok\r\n"),
        SendToClient(b"554 5.5.1 Error: no valid recipients\r\n"),
        Client(b"STARTTLS\r\n"),
        SendToClient(b"454 4.7.0 TLS not available: session already started in plaintext\r\n"),
        Client(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
        TLS_FIRST,
        Client(b"EHLO client.example\r\n"),
        SendToBackend(b"EHLO client.example\r\n"),
        Backend(BACKEND_EHLO),
        # No STARTTLS, and no AUTH at all without TLS.
        SendToClient(
            b"250-mx.backend.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 CHUNKING\r\n"
        ),
        *QUIT_STEPS,
    )


def test_plaintext_relay_with_xclient_announces_then_replays() -> None:
    machine = SMTPMachine(settings(require_tls=False, identity=BackendIdentity.XCLIENT), PEER)
    run(
        machine,
        GREETING,
        Client(b"EHLO client.example\r\n"),
        PRE_TLS_EHLO,
        Client(b"MAIL FROM:<>\r\n"),
        OpenBackend(),
        Connected(),
        Backend(BACKEND_GREETING),
        SendToBackend(b"EHLO proxy.example\r\n"),
        Backend(b"250-mx.backend.test\r\n250 XCLIENT NAME ADDR PORT PROTO HELO\r\n"),
        SendToBackend(
            b"XCLIENT ADDR=192.0.2.10 PORT=49152 PROTO=ESMTP HELO=client.example"
            b" NAME=[UNAVAILABLE]\r\n"
        ),
        Backend(BACKEND_GREETING),
        SendToBackend(b"EHLO client.example\r\n"),
        Backend(BACKEND_EHLO),
        SendToBackend(b"MAIL FROM:<>\r\n"),
    )


@pytest.mark.parametrize(
    ("opening", "replay"),
    [
        ((Client(b"HELO old.example\r\n"), SendToClient(b"250 proxy.example\r\n")), b"HELO"),
        ((), None),
    ],
)
def test_plaintext_relay_replays_helo_only_if_sent(
    opening: tuple[Event | Command, ...], replay: bytes | None
) -> None:
    machine = SMTPMachine(settings(require_tls=False), PEER)
    run(machine, GREETING, *opening, Client(b"VRFY postmaster\r\n"), OpenBackend(), Connected())
    machine.receive_data(Side.BACKEND, BACKEND_GREETING)
    if replay is not None:
        assert machine.next_command() == SendToBackend(b"HELO old.example\r\n")
        assert machine.state is State.REPLAY_HELO
        machine.receive_data(Side.BACKEND, b"250 mx.backend.test\r\n")
    run(
        machine,
        SendToBackend(b"VRFY postmaster\r\n"),
        Backend(b"252 2.0.0 postmaster\r\n"),
        SendToClient(b"252 2.0.0 postmaster\r\n"),
    )


def test_implicit_mode_forwards_the_backend_greeting() -> None:
    machine = SMTPMachine(settings(tls_mode=TLSMode.IMPLICIT), PEER)
    run(
        machine,
        StartTLS(b""),
        TLS(),
        OpenBackend(),
        Client(b"EHLO client.example\r\n"),
        Connected(),
        Backend(BACKEND_GREETING),
        SendToClient(BACKEND_GREETING),
        SendToBackend(b"EHLO client.example\r\n"),
        Backend(BACKEND_EHLO),
        SendToClient(RELAYED_EHLO),
        Client(b"STARTTLS\r\n"),
        SendToClient(b"503 5.5.1 Error: TLS already active\r\n"),
    )


def test_implicit_mode_with_xclient_forwards_the_xclient_greeting() -> None:
    settings_ = settings(tls_mode=TLSMode.IMPLICIT, identity=BackendIdentity.XCLIENT)
    machine = SMTPMachine(settings_, PEER)
    run(
        machine,
        StartTLS(b""),
        TLS(),
        OpenBackend(),
        Connected(),
        Backend(b"220 first greeting\r\n"),
        SendToBackend(b"EHLO proxy.example\r\n"),
        Backend(b"250-mx.backend.test\r\n250 XCLIENT NAME ADDR PORT PROTO HELO\r\n"),
        # No HELO name is known: no HELO= and no PROTO=.
        SendToBackend(b"XCLIENT ADDR=192.0.2.10 PORT=49152 NAME=[UNAVAILABLE]\r\n"),
        Backend(b"220-mx.backend.test ESMTP\r\n220 welcome\r\n"),
        SendToClient(b"220-mx.backend.test ESMTP\r\n220 welcome\r\n"),
    )


def test_pipelined_commands_keep_reply_order_with_local_replies() -> None:
    machine = relaying()
    run(
        machine,
        Client(
            b"MAIL FROM:<a@example.org>\r\nSTARTTLS\r\nRCPT TO:<b@example.net>\r\n"
            b"XCLIENT ADDR=203.0.113.1\r\nNOOP\r\n"
        ),
        SendToBackend(b"MAIL FROM:<a@example.org>\r\n"),
        SendToBackend(b"RCPT TO:<b@example.net>\r\n"),
        SendToBackend(b"NOOP\r\n"),
        Backend(b"250 2.1.0 Ok\r\n"),
        SendToClient(b"250 2.1.0 Ok\r\n"),
        SendToClient(b"503 5.5.1 Error: TLS already active\r\n"),
        Backend(b"250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n"),
        SendToClient(b"250 2.1.5 Ok\r\n"),
        NOT_IMPLEMENTED,
        SendToClient(b"250 2.0.0 Ok\r\n"),
    )


def test_bdat_in_relay() -> None:
    machine = relaying()
    run(
        machine,
        Client(b"BDAT 12\r\nSTARTTLS\r\n\r\n"),
        SendToBackend(b"BDAT 12\r\n"),
        SendToBackend(b"STARTTLS\r\n\r\n"),
        Client(b"BDAT 11 LAST\r\n.\r\n"),
        SendToBackend(b"BDAT 11 LAST\r\n"),
        SendToBackend(b".\r\n"),
        *exchange(b"QUIT\r\n", b"250 2.0.0 Ok: 12 octets\r\n"),
    )
    assert machine.state is State.BDAT_CHUNK
    run(
        machine,
        Client(b"\r\nQUIT\r\n"),
        SendToBackend(b"\r\n"),
        SendToBackend(b"QUIT\r\n"),
        Backend(b"250 2.0.0 Ok: queued\r\n"),
        SendToClient(b"250 2.0.0 Ok: queued\r\n"),
        Backend(b"221 2.0.0 Bye\r\n"),
        SendToClient(b"221 2.0.0 Bye\r\n"),
        CloseConnection("client quit", clean=True),
    )


def test_bdat_refused_without_chunking_and_chunk_dropped() -> None:
    capabilities = tuple(c for c in CAPABILITIES if c != "CHUNKING")
    machine = relaying(capabilities=capabilities)
    run(
        machine,
        Client(b"BDAT 26 LAST\r\nXCLIENT ADDR=203.0.113.1\r\nNOOP\r\n"),
        NOT_IMPLEMENTED,
        SendToBackend(b"NOOP\r\n"),
    )


def test_bdat_with_bad_size_is_refused() -> None:
    machine = relaying()
    for line in (b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 1 FIRST\r\n", b"BDAT 1 LAST more\r\n"):
        run(machine, Client(line), SendToClient(b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"))


def test_data_refused_goes_back_to_commands() -> None:
    machine = relaying()
    run(machine, Client(b"DATA\r\nNOOP\r\n"), SendToBackend(b"DATA\r\n"))
    assert machine.state is State.DATA_PENDING
    assert machine.unprocessed_client_bytes == len(b"NOOP\r\n")
    run(
        machine,
        Backend(b"503 5.5.1 Error: need RCPT command\r\n"),
        SendToClient(b"503 5.5.1 Error: need RCPT command\r\n"),
        SendToBackend(b"NOOP\r\n"),
    )
    assert machine.unprocessed_client_bytes == 0


def test_data_body_streams_byte_identical() -> None:
    machine = in_body()
    body = (
        b"From: a@example.org\r\n\r\n"
        b"STARTTLS\r\n"
        b"..line starting with a dot\r\n"
        b"..\r\n"
        b"\xe9t\xe9 \xff\x00 8-bit, ends with a dot.\r\n"
        b"\r\n"
        b".\r\n"
    )
    forwarded = b""
    for offset in range(0, len(body), 3):
        machine.receive_data(Side.CLIENT, body[offset : offset + 3])
        commands = drain(machine)
        assert all(isinstance(c, SendToBackend) for c in commands)
        forwarded += backend_bytes(commands)
        # Streaming: at most a final CR held, until the next octet judges it.
        if machine.state is State.DATA_BODY:
            assert offset + 3 - len(forwarded) <= 1
    assert forwarded == body
    assert machine.state is State.RELAY


def test_body_that_is_only_the_terminator() -> None:
    machine = in_body()
    run(
        machine,
        Client(b"."),
        SendToBackend(b"."),
        Client(b"\r"),
        Client(b"\nNOOP\r\n"),
        SendToBackend(b"\r\n"),
        SendToBackend(b"NOOP\r\n"),
        Backend(b"554 5.6.0 empty message\r\n250 2.0.0 Ok\r\n"),
        SendToClient(b"554 5.6.0 empty message\r\n"),
        SendToClient(b"250 2.0.0 Ok\r\n"),
    )


def test_ehlo_reply_without_extensions_left() -> None:
    machine = relaying()
    run(
        machine,
        Client(b"EHLO x\r\n"),
        SendToBackend(b"EHLO x\r\n"),
        Backend(b"250-mx.backend.test\r\n250-AUTH SCRAM-SHA-256-PLUS\r\n250 STARTTLS\r\n"),
        SendToClient(b"250 mx.backend.test\r\n"),
        *exchange(b"EHLO\r\n", b"501 5.5.4 Syntax: EHLO hostname\r\n"),
    )


# --------------------------------------------------------------------------
# The pre-TLS phase.


def test_pre_tls_local_commands() -> None:
    machine = SMTPMachine(settings(), PEER)
    run(
        machine,
        GREETING,
        Client(b"EHLO\r\nHELO\r\nHELO a.example\r\n"),
        SendToClient(b"501 5.5.4 Syntax: EHLO hostname\r\n"),
        SendToClient(b"501 5.5.4 Syntax: HELO hostname\r\n"),
        SendToClient(b"250 proxy.example\r\n"),
        Client(b"noop\r\nRSET\r\nHELP me\r\n\r\n   \r\nSTARTTLS now\r\n"),
        SendToClient(b"250 2.0.0 Ok\r\n"),
        SendToClient(b"250 2.0.0 Ok\r\n"),
        SendToClient(b"214 2.0.0 See RFC 5321\r\n"),
        SendToClient(b"500 5.5.2 Error: bad syntax\r\n"),
        SendToClient(b"500 5.5.2 Error: bad syntax\r\n"),
        SendToClient(b"501 5.5.4 Syntax: STARTTLS\r\n"),
        Client(b"bare LF\ncr\r in the middle\r\n"),
        BAD_LINE,
        BAD_LINE,
        Client(b"QUIT\r\nNOOP\r\n"),
        SendToClient(b"221 2.0.0 Bye\r\n"),
        CloseConnection("client quit", clean=True),
    )


def test_require_tls_refuses_mail_rcpt_data_bdat_auth() -> None:
    machine = SMTPMachine(settings(), PEER)
    run(
        machine,
        GREETING,
        Client(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"),
        TLS_FIRST,
        TLS_FIRST,
        TLS_FIRST,
        Client(b"VRFY root\r\nEXPN staff\r\nETRN example.org\r\nFOO\r\n"),
        TLS_FIRST,
        TLS_FIRST,
        TLS_FIRST,
        TLS_FIRST,
        Client(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nBDAT 4 LAST\r\nabcd"),
        TLS_FIRST,
        TLS_FIRST,
        Client(b"BDAT four\r\n"),
        SendToClient(b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"),
    )
    assert machine.state is State.PRE_TLS


def test_auth_never_offered_before_tls() -> None:
    capabilities = (*CAPABILITIES, "AUTH=PLAIN", "auth gssapi")
    machine = SMTPMachine(settings(capabilities=capabilities, require_tls=False), PEER)
    run(machine, GREETING, Client(b"EHLO client.example\r\n"), PRE_TLS_EHLO)
    run(machine, Client(b"AUTH LOGIN\r\n"), TLS_FIRST)


def test_sasl_responses_after_334_are_not_commands() -> None:
    """RFC 4954 section 4: an empty line or base64 that spells a verb is a
    SASL response while the backend is challenging, and goes through."""
    machine = relaying()
    run(
        machine,
        *exchange(b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
        *exchange(b"STARTTLS\r\n", b"334 UGFzc3dvcmQ6\r\n"),
        *exchange(b"\r\n", b"535 5.7.8 Error: authentication failed\r\n"),
        Client(b"STARTTLS\r\n"),
        SendToClient(b"503 5.5.1 Error: TLS already active\r\n"),
    )


def test_client_xclient_refused() -> None:
    machine = SMTPMachine(settings(require_tls=False), PEER)
    run(
        machine,
        GREETING,
        Client(b"XCLIENT ADDR=203.0.113.1\r\nxforward ADDR=203.0.113.1\r\n"),
        NOT_IMPLEMENTED,
        NOT_IMPLEMENTED,
    )
    machine = relaying()
    run(
        machine,
        Client(b"XCLIENT ADDR=203.0.113.1\r\nXFORWARD NAME=spoofed\r\n"),
        NOT_IMPLEMENTED,
        NOT_IMPLEMENTED,
    )


def test_backend_failure_in_plaintext_gives_421() -> None:
    machine = SMTPMachine(settings(require_tls=False), PEER)
    run(machine, GREETING, Client(b"MAIL FROM:<>\r\n"), OpenBackend())
    run(machine, Failed("timed out"), UNAVAILABLE, CloseConnection("timed out"))


# --------------------------------------------------------------------------
# Attacks.


def test_starttls_inside_data_is_not_a_command() -> None:
    machine = in_body()
    run(
        machine,
        Client(b"STARTTLS\r\nXCLIENT ADDR=203.0.113.1\r\n"),
        SendToBackend(b"STARTTLS\r\nXCLIENT ADDR=203.0.113.1\r\n"),
        Client(b"\r\n.\r\n"),
        SendToBackend(b"\r\n.\r\n"),
    )


def test_starttls_inside_bdat_chunk_is_not_a_command() -> None:
    chunk = b"STARTTLS\r\n\r\n.\r\nQUIT\r\n"
    bdat = b"BDAT %d LAST\r\n" % len(chunk)
    machine = relaying()
    run(machine, Client(bdat + chunk), SendToBackend(bdat), SendToBackend(chunk))
    assert machine.state is State.RELAY
    # Refused before TLS: the chunk is consumed, in whatever pieces it comes.
    machine = SMTPMachine(settings(), PEER)
    run(
        machine,
        GREETING,
        Client(bdat + chunk[:5]),
        TLS_FIRST,
        Client(chunk[5:] + b"NOOP\r\n"),
        SendToClient(b"250 2.0.0 Ok\r\n"),
    )
    assert machine.state is State.PRE_TLS


@pytest.mark.parametrize(
    ("payload", "forwarded"),
    [
        (b"text\r\n.\nMAIL FROM:<evil@example.org>\r\n", b"text\r\n."),
        (b"text\n.\nMAIL FROM:<evil@example.org>\r\n", b"text"),
    ],
)
def test_smtp_smuggling_bare_lf_dot_lf(payload: bytes, forwarded: bytes) -> None:
    _assert_smuggling_rejected(payload, forwarded)


def test_smtp_smuggling_bare_cr_dot_cr() -> None:
    _assert_smuggling_rejected(b"text\r.\rMAIL FROM:<evil@example.org>\r\n", b"text")


def test_smtp_smuggling_lf_dot_crlf() -> None:
    _assert_smuggling_rejected(b"text\n.\r\nMAIL FROM:<evil@example.org>\r\n", b"text")


def _assert_smuggling_rejected(payload: bytes, forwarded: bytes) -> None:
    for split in range(len(payload) + 1):
        machine = in_body()
        machine.receive_data(Side.CLIENT, payload[:split])
        machine.receive_data(Side.CLIENT, payload[split:])
        commands = drain(machine)
        assert backend_bytes(commands) == forwarded
        assert commands[-2:] == [SMUGGLING, CloseConnection("bare CR or LF in DATA")]
        assert machine.state is State.CLOSED


def test_smtp_smuggling_allowed_when_configured() -> None:
    machine = in_body(smtp_bare_line_endings=BareLineEndings.ALLOW)
    body = b"text\n.\nMAIL FROM:<evil@example.org>\r\n\r.\rmore\n.\r\n"
    run(
        machine,
        Client(body),
        SendToBackend(body),
        Client(b".\r\n"),
        SendToBackend(b".\r\n"),
    )
    assert machine.state is State.RELAY


def test_bare_line_ending_in_command_never_forwarded() -> None:
    machine = relaying()
    run(
        machine,
        Client(b"RSET\nNOOP\r\n"),
        BAD_LINE,
        SendToBackend(b"NOOP\r\n"),
        Client(b"RSET\r\r\n"),
        Backend(b"250 2.0.0 Ok\r\n"),
        SendToClient(b"250 2.0.0 Ok\r\n"),
        BAD_LINE,
    )


# --------------------------------------------------------------------------
# Endings and misbehaving peers.


def test_timeout_busy_and_eof() -> None:
    assert SMTPMachine.busy_reply("mx.example") == (
        b"421 4.7.0 mx.example Error: too many connections\r\n"
    )
    machine = SMTPMachine(settings(), PEER)
    timeout = SendToClient(b"421 4.4.2 proxy.example Error: timeout exceeded\r\n")
    run(machine, GREETING, Timeout(), timeout, CloseConnection("idle timeout"))
    run(relaying(), EOF(Side.CLIENT), CloseConnection("client closed"))
    run(relaying(), EOF(Side.BACKEND), CloseConnection("backend closed"))
    machine = relaying()
    run(machine, Client(b"NOOP\r\n"), SendToBackend(b"NOOP\r\n"))
    run(machine, EOF(Side.BACKEND), UNAVAILABLE, CloseConnection("backend closed"))


SHUTDOWN_421 = SMTP.shutdown_goodbye


def test_shutdown_goodbye_with_replies_owed() -> None:
    machine = relaying()
    run(
        machine,
        Client(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nSTARTTLS\r\n"),
        SendToBackend(b"MAIL FROM:<a@example.org>\r\n"),
        SendToBackend(b"RCPT TO:<b@example.net>\r\n"),
        ShuttingDown(),
        SHUTDOWN_421,
        SHUTDOWN,
    )
    # DATA sent, 354 not yet come: the client waits for a reply.
    machine = relaying()
    run(
        machine,
        Client(b"DATA\r\n"),
        SendToBackend(b"DATA\r\n"),
        ShuttingDown(),
        SHUTDOWN_421,
        SHUTDOWN,
    )


def test_shutdown_goodbye_not_inside_a_message() -> None:
    machine = in_body()
    run(
        machine,
        Client(b"Subject: x\r\n\r\nhalf a mess"),
        SendToBackend(b"Subject: x\r\n\r\nhalf a mess"),
        ShuttingDown(),
        SHUTDOWN,
    )
    machine = relaying()
    run(
        machine,
        Client(b"BDAT 10 LAST\r\nabc"),
        SendToBackend(b"BDAT 10 LAST\r\n"),
        SendToBackend(b"abc"),
        ShuttingDown(),
        SHUTDOWN,
    )
    # The chunk of a refused BDAT is still coming too.
    machine = relaying(capabilities=("PIPELINING",))
    run(machine, Client(b"BDAT 10\r\nabc"), NOT_IMPLEMENTED, ShuttingDown(), SHUTDOWN)
    # Once the message is through, the goodbye is back.
    machine = in_body()
    run(machine, Client(b"text\r\n.\r\n"), SendToBackend(b"text\r\n.\r\n"))
    run(machine, ShuttingDown(), SHUTDOWN_421, SHUTDOWN)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"hello\r\n", "malformed reply from backend: b'hello\\r\\n'"),
        (b"250-a\r\n251 b\r\n", "malformed reply from backend: b'251 b\\r\\n'"),
        (b"250 ok\n", "malformed reply from backend: b'250 ok\\n'"),
        (b"250 " + b"x" * 9000, "reply line too long from backend"),
        (b"250 ok\r\n250 again\r\n", "unsolicited reply from backend: 250 again"),
    ],
)
def test_misbehaving_backend_gives_421(reply: bytes, reason: str) -> None:
    machine = relaying()
    run(machine, Client(b"NOOP\r\n"), SendToBackend(b"NOOP\r\n"))
    machine.receive_data(Side.BACKEND, reply)
    commands = drain(machine)
    assert commands[-2:] == [UNAVAILABLE, CloseConnection(reason)]
    assert machine.state is State.ERROR


# --------------------------------------------------------------------------
# Split invariance: the same bytes cut anywhere give the same session.

SPLIT_BODY = b"Subject: x\r\n\r\nSTARTTLS\r\n..stuffed\r\n\r\n\xe9\xff\r\n"
TRANSCRIPTS = Transcripts(
    SMTP,
    {
        "starttls": (
            settings(),
            (
                Client(b"EHLO client.example\r\nNOOP\r\n"),
                Client(b"STARTTLS\r\n"),
                TLS(),
                Connected(),
                Backend(BACKEND_GREETING),
                Client(b"EHLO client.example\r\n"),
                Backend(BACKEND_EHLO),
                Client(
                    b"MAIL FROM:<a@example.org>\r\nSTARTTLS\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                ),
                Backend(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n"),
                Client(
                    SPLIT_BODY + b".\r\nMAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.net>\r\n"
                ),
                Backend(b"250-2.0.0 Ok:\r\n250 queued\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"),
                Client(b"BDAT 16\r\nSTARTTLS\r\nQUIT\r\nBDAT 0 LAST\r\nQUIT\r\n"),
                Backend(b"250 2.0.0 16 octets\r\n250 2.0.0 queued\r\n221 2.0.0 Bye\r\n"),
            ),
        ),
        "plaintext": (
            settings(require_tls=False),
            (
                Client(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nSTARTTLS\r\n"),
                Connected(),
                Backend(BACKEND_GREETING),
                Backend(BACKEND_EHLO),
                Backend(b"250 2.1.0 Ok\r\n"),
                Client(b"x" * 3000 + b"\r\nEHLO client.example\r\n"),
                Backend(BACKEND_EHLO),
                Client(b"QUIT\r\n"),
                Backend(b"221 2.0.0 Bye\r\n"),
            ),
        ),
        "pre-tls garbage": (
            settings(max_line_length=100),
            (
                Client(b"\r\nNOOP\r\nBDAT 13 LAST\r\nSTARTTLS\r\nxyzNOOP\nRSET\r\r\n"),
                Client(b"A" * 250 + b"\r\nHELP\r\nAUTH LOGIN\r\nEHLO x\r\nQUIT\r\n"),
            ),
        ),
        "smuggling": (
            settings(identity=BackendIdentity.XCLIENT, tls_mode=TLSMode.IMPLICIT),
            (
                TLS(),
                Connected(),
                Backend(b"220 mx\r\n"),
                Backend(b"250-mx\r\n250 XCLIENT ADDR NAME\r\n"),
                Backend(b"220 mx\r\n"),
                Client(b"DATA\r\n"),
                Backend(b"354 go ahead\r\n"),
                Client(b"text\r\n..\r\n.\r\r\n.\nMAIL FROM:<evil@example.org>\r\n.\r\n"),
            ),
        ),
    },
)


@pytest.mark.parametrize("name", TRANSCRIPTS.sessions)
def test_transcripts_end_as_expected(name: str) -> None:
    to_client, to_backend, others = TRANSCRIPTS.outcome(name)
    assert isinstance(others[-1], CloseConnection)
    assert b"XCLIENT ADDR=203" not in to_backend
    if name == "starttls":
        assert SPLIT_BODY + b".\r\n" in to_backend
        assert b"BDAT 16\r\nSTARTTLS\r\nQUIT\r\nBDAT 0 LAST\r\nQUIT\r\n" in to_backend
        assert to_client.endswith(b"221 2.0.0 Bye\r\n")
    if name == "smuggling":
        assert to_backend.endswith(b"DATA\r\ntext\r\n..\r\n.")


test_split_one_byte_at_a_time, test_split_invariance = split_invariance_tests(TRANSCRIPTS)


# --------------------------------------------------------------------------
# Fuzzing.


def _one_shot_body(stream: bytes, reject: bool) -> tuple[bytes, bool]:
    """What the body scanner must forward and whether it must reject, from
    the whole stream at once (which ends with an end-of-data line)."""
    window = b"\r\n" + stream
    limit = window.find(b"\r\n.\r\n") + 5
    for index in range(limit if reject else 0):
        octet, before, after = window[index], window[index - 1 : index], window[index + 1 :]
        if (octet == ord("\r") and not after.startswith(b"\n")) or (
            octet == ord("\n") and before != b"\r"
        ):
            return window[2:index], True
    return window[2:limit], False


@given(
    st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n"]), max_size=40),
    st.lists(st.integers(0, 60), max_size=6),
    st.booleans(),
)
def test_body_scanner_matches_one_shot_reference(
    pieces: list[bytes], cuts: list[int], reject: bool
) -> None:
    stream = b"".join(pieces) + b"\r\n.\r\n"
    mode = BareLineEndings.REJECT if reject else BareLineEndings.ALLOW
    machine = in_body(smtp_bare_line_endings=mode)
    bounds = [0, *sorted(min(cut, len(stream)) for cut in cuts), len(stream)]
    for start, end in itertools.pairwise(bounds):
        machine.receive_data(Side.CLIENT, stream[start:end])
    commands = drain(machine)
    forwarded, rejected = _one_shot_body(stream, reject)
    if rejected:
        assert backend_bytes(commands) == forwarded
        assert commands[-2:] == [SMUGGLING, CloseConnection("bare CR or LF in DATA")]
    else:
        # What follows the end of data are commands, relayed after the body.
        assert backend_bytes(commands).startswith(forwarded)
        assert SMUGGLING not in commands
        assert machine.state is State.RELAY


# --------------------------------------------------------------------------
# Pieces.


def test_xtext() -> None:
    assert xtext(b"a+b=c d\x7f\xff~!") == b"a+2Bb+3Dc+20d+7F+FF~!"


@pytest.mark.parametrize(
    ("greeting", "ehlo_reply", "error"),
    [
        (b"554 5.3.2 No service\r\n", b"", "backend refused the session: 554 5.3.2 No service"),
        (
            b"220 mx\r\n",
            b"502-5.5.1 No\r\n502 EHLO\r\n",
            "backend refused EHLO: 502-5.5.1 No 502 EHLO",
        ),
        (b"HTTP/1.1 400\r\n", b"", "malformed reply from backend: b'HTTP/1.1 400\\r\\n'"),
    ],
)
def test_probe_errors(greeting: bytes, ehlo_reply: bytes, error: str) -> None:
    check_probe_error(SMTPCapabilityProbe(HOST), [greeting, ehlo_reply], error)
