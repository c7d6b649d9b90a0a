"""Tests of the IMAP machine, its wire syntax and its probe, as transcripts.

Backend responses are those of Dovecot 2.3. ``lines(...)`` turns a run of
response lines into the one ``SendToClient`` per line the machine emits.
"""

from __future__ import annotations

import pytest

from protocols._base import (
    BackendIdentity,
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
from protocols.imap import (
    TRANSITIONS,
    IMAPCapabilityProbe,
    IMAPMachine,
    Input,
    State,
)
from protocols.imap_syntax import Head, ResponseReader
from protocols.registry import PROTOCOLS
from tests.protocols.dialogues import (
    IMAP,
    SHUTDOWN,
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
    check_probe_error,
    drain,
    exchange,
    play,
    run,
)

CAPABILITIES = IMAP.capabilities
PEER = IMAP.peer
settings = IMAP.settings
connecting = IMAP.connecting
relaying = IMAP.relaying


def lines(data: bytes) -> list[SendToClient]:
    return [SendToClient(line) for line in data.splitlines(keepends=True)]


GREETING = IMAP.greeting
OPEN_GREETING = SendToClient(
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+"
    b" AUTH=PLAIN AUTH=LOGIN STARTTLS] proxy.example IMAP4 starttls-proxy ready\r\n"
)
ID_COMMAND = SendToBackend(
    b'stp0 ID ("x-originating-ip" "192.0.2.10" "x-originating-port" "49152"'
    b' "x-connected-ip" "198.51.100.1" "x-connected-port" "143" "x-client-transport" "TLS")\r\n'
)
TIMEOUT_BYE = SendToClient(b"* BYE proxy.example Autologout; idle for too long\r\n")
UNAVAILABLE = IMAP.unavailable
PRIVACY = b"NO [PRIVACYREQUIRED] TLS required: use STARTTLS first\r\n"
BACKEND_GREETING = IMAP.backend_greeting
LOGGED_IN = (
    b"a4 OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT MULTIAPPEND"
    b" CATENATE UIDPLUS ESEARCH BINARY MOVE LITERAL+ NOTIFY SPECIAL-USE COMPRESS=DEFLATE]"
    b" Logged in\r\n"
)
SELECTED = (
    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)]"
    b" Flags permitted.\r\n"
    b"* 1 EXISTS\r\n"
    b"* 0 RECENT\r\n"
    b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n"
    b"* OK [UIDNEXT 2] Predicted next UID\r\n"
    b"a5 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n"
)
#: A message whose text looks like commands and responses.
MESSAGE = (
    b"Subject: hi\r\n\r\n"
    b"a STARTTLS\r\n"
    b"* CAPABILITY IMAP4rev1 STARTTLS COMPRESS=DEFLATE\r\n"
    b"* BYE fake\r\n"
    b"a1 OK [CAPABILITY STARTTLS] fake\r\n"
    b"+ fake\r\n"
    b"{5}\r\n"
)
FETCH_HEAD = b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % len(MESSAGE)
LOGOUT_STEPS: tuple[Event | Command, ...] = (
    Client(b"a9 LOGOUT\r\n"),
    SendToBackend(b"a9 LOGOUT\r\n"),
    Backend(b"* BYE Logging out\r\na9 OK Logout completed (0.001 + 0.000 secs).\r\n"),
    *lines(b"* BYE Logging out\r\na9 OK Logout completed (0.001 + 0.000 secs).\r\n"),
    EOF(Side.BACKEND),
    CloseConnection("backend said BYE", clean=True),
)


def ready(tag: bytes) -> SendToClient:
    return SendToClient(b"%s OK Begin TLS negotiation now\r\n" % tag)


def idling() -> IMAPMachine:
    """A relaying machine in IDLE."""
    machine = relaying()
    run(
        machine,
        *exchange(b"a1 IDLE\r\n", b"+ idling\r\n"),
    )
    return machine


def appending() -> IMAPMachine:
    """A relaying machine that has forwarded the first 20 octets of the
    synchronizing literal of an APPEND."""
    machine = relaying()
    append = b"a7 APPEND INBOX (\\Seen) {%d}\r\n" % len(MESSAGE)
    run(
        machine,
        *exchange(append, b"+ OK\r\n"),
        Client(MESSAGE[:20]),
        SendToBackend(MESSAGE[:20]),
    )
    return machine


def fetching() -> IMAPMachine:
    """A relaying machine that has relayed the first 10 octets of a FETCH
    response's literal."""
    machine = relaying()
    run(
        machine,
        Client(b"a6 FETCH 1 BODY[]\r\n"),
        SendToBackend(b"a6 FETCH 1 BODY[]\r\n"),
        Backend(FETCH_HEAD + MESSAGE[:10]),
        SendToClient(FETCH_HEAD),
        SendToClient(MESSAGE[:10]),
    )
    return machine


def ending(machine: IMAPMachine) -> list[Command]:
    """The last two commands queued, which end a session."""
    return drain(machine)[-2:]


# --------------------------------------------------------------------------
# Whole sessions.


def test_full_starttls_session() -> None:
    machine = IMAPMachine(settings(), PEER)
    run(
        machine,
        GREETING,
        Client(b"a1 CAPABILITY\r\n"),
        SendToClient(
            b"* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+"
            b" STARTTLS LOGINDISABLED\r\na1 OK CAPABILITY completed\r\n"
        ),
        Client(b"a2 STARTTLS\r\n"),
        SendToClient(b"a2 OK Begin TLS negotiation now\r\n"),
        StartTLS(b""),
        TLS(),
        OpenBackend(),
        Connected(),
        Backend(BACKEND_GREETING),
        Client(b"a3 CAPABILITY\r\n"),
        SendToBackend(b"a3 CAPABILITY\r\n"),
        Backend(
            b"* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS"
            b" AUTH=PLAIN AUTH=SCRAM-SHA-256-PLUS LOGINDISABLED\r\n"
            b"a3 OK Pre-login capabilities listed, post-login capabilities have more.\r\n"
        ),
        SendToClient(
            b"* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN\r\n"
        ),
        SendToClient(
            b"a3 OK Pre-login capabilities listed, post-login capabilities have more.\r\n"
        ),
        Client(b"a4 LOGIN alice secret\r\n"),
        SendToBackend(b"a4 LOGIN alice secret\r\n"),
        Backend(LOGGED_IN),
        SendToClient(LOGGED_IN.replace(b" COMPRESS=DEFLATE", b"")),
        Client(b"a5 SELECT INBOX\r\n"),
        SendToBackend(b"a5 SELECT INBOX\r\n"),
        Backend(SELECTED),
        *lines(SELECTED),
        Client(b"a6 UID FETCH 1 (BODY.PEEK[])\r\n"),
        SendToBackend(b"a6 UID FETCH 1 (BODY.PEEK[])\r\n"),
        Backend(FETCH_HEAD + MESSAGE + b")\r\na6 OK Fetch completed (0.001 + 0.000 secs).\r\n"),
        SendToClient(FETCH_HEAD),
        SendToClient(MESSAGE),
        SendToClient(b")\r\n"),
        SendToClient(b"a6 OK Fetch completed (0.001 + 0.000 secs).\r\n"),
        *LOGOUT_STEPS,
    )
    assert machine.state is State.CLOSED
    run(machine, Client(b"a10 NOOP\r\n"), Backend(b"* 2 EXISTS\r\n"), Timeout())


@pytest.mark.parametrize(
    ("tls_mode", "peer", "transport"),
    [
        (TLSMode.STARTTLS, PEER, b"TLS"),
        (TLSMode.IMPLICIT, Peer("2001:db8::25", 50000, "2001:db8::1", 993), b"TLS"),
    ],
)
def test_imap_id_identity_exact_bytes(tls_mode: TLSMode, peer: Peer, transport: bytes) -> None:
    machine = IMAPMachine(settings(identity=BackendIdentity.IMAP_ID, tls_mode=tls_mode), peer)
    opening: tuple[Event | Command, ...] = (GREETING, Client(b"a1 STARTTLS\r\n"), ready(b"a1"))
    if tls_mode is TLSMode.IMPLICIT:
        opening = ()
    run(machine, *opening, StartTLS(b""), TLS(), OpenBackend(), Connected())
    machine.receive_data(Side.BACKEND, BACKEND_GREETING)
    if tls_mode is TLSMode.IMPLICIT:
        assert machine.next_command() == SendToClient(BACKEND_GREETING.replace(b" STARTTLS", b""))
    run(
        machine,
        SendToBackend(
            b'stp0 ID ("x-originating-ip" "%s" "x-originating-port" "%d"'
            b' "x-connected-ip" "%s" "x-connected-port" "%d" "x-client-transport" "%s")\r\n'
            % (
                peer.client_address.encode(),
                peer.client_port,
                peer.local_address.encode(),
                peer.local_port,
                transport,
            )
        ),
        # Nothing reaches the backend until its ID response is in.
        Client(b"a2 LOGIN alice secret\r\n"),
        Backend(b'* ID ("name" "Dovecot")\r\n'),
        Backend(b"stp0 OK ID completed.\r\n"),
        SendToBackend(b"a2 LOGIN alice secret\r\n"),
    )
    assert machine.state is State.RELAY


def test_imap_id_refusals() -> None:
    # Dovecot answers OK even to an untrusted proxy; a NO is no reason to stop.
    machine = connecting(identity=BackendIdentity.IMAP_ID)
    run(machine, Connected(), Backend(BACKEND_GREETING), ID_COMMAND)
    run(machine, Backend(b"stp0 NO not trusted\r\n"))
    assert machine.state is State.RELAY
    for response, reason in [
        (b"* BYE go away\r\n", "backend refused the proxy's ID: * BYE go away"),
        (b"a1 OK hm\r\n", "unexpected response to the proxy's ID: b'a1 OK hm\\r\\n'"),
    ]:
        machine = connecting(identity=BackendIdentity.IMAP_ID)
        run(machine, Connected(), Backend(BACKEND_GREETING), ID_COMMAND)
        machine.receive_data(Side.BACKEND, response)
        assert drain(machine) == [UNAVAILABLE, CloseConnection(reason)]


def test_plaintext_relay() -> None:
    machine = IMAPMachine(settings(require_tls=False, identity=BackendIdentity.IMAP_ID), PEER)
    run(
        machine,
        OPEN_GREETING,
        Client(b"a1 ID NIL\r\n"),
        SendToClient(b'* ID ("name" "starttls-proxy")\r\na1 OK ID completed\r\n'),
        Client(b"a2 LOGIN alice secret\r\na3 SELECT INBOX\r\n"),
        OpenBackend(),
        Client(b"a4 NOOP\r\n"),
        Connected(),
        Backend(BACKEND_GREETING),
        SendToBackend(
            b'stp0 ID ("x-originating-ip" "192.0.2.10" "x-originating-port" "49152"'
            b' "x-connected-ip" "198.51.100.1" "x-connected-port" "143"'
            b' "x-client-transport" "insecure")\r\n'
        ),
        Backend(b'* ID ("name" "Dovecot")\r\nstp0 OK ID completed.\r\n'),
        SendToBackend(b"a2 LOGIN alice secret\r\n"),
        SendToBackend(b"a3 SELECT INBOX\r\n"),
        SendToBackend(b"a4 NOOP\r\n"),
        Client(b"a5 STARTTLS\r\n"),
        SendToClient(b"a5 BAD STARTTLS not available: session started in plaintext\r\n"),
        Client(b"a6 CAPABILITY\r\n"),
        SendToBackend(b"a6 CAPABILITY\r\n"),
        # On plaintext, LOGINDISABLED and AUTH= are the backend's to say.
        Backend(
            b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN AUTH=SCRAM-SHA-1-PLUS LOGINDISABLED\r\n"
        ),
        SendToClient(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN LOGINDISABLED\r\n"),
    )


def test_implicit_mode_forwards_the_filtered_greeting() -> None:
    machine = IMAPMachine(settings(tls_mode=TLSMode.IMPLICIT), PEER)
    run(
        machine,
        StartTLS(b""),
        TLS(),
        OpenBackend(),
        Client(b"a1 CAPABILITY\r\n"),
        Connected(),
        Backend(BACKEND_GREETING),
        SendToClient(BACKEND_GREETING.replace(b" STARTTLS", b"")),
        SendToBackend(b"a1 CAPABILITY\r\n"),
        Client(b"a2 STARTTLS\r\n"),
        SendToClient(b"a2 BAD TLS already active\r\n"),
    )


def test_pipelined_commands_with_local_answers() -> None:
    machine = relaying()
    run(
        machine,
        Client(
            b'a1 NOOP\r\na2 STARTTLS\r\na3 ID ("name" "mutt")\r\na4 COMPRESS DEFLATE\r\n'
            b"a5 SELECT INBOX\r\n"
        ),
        SendToBackend(b"a1 NOOP\r\n"),
        SendToClient(b"a2 BAD TLS already active\r\n"),
        SendToClient(b'* ID ("name" "starttls-proxy")\r\na3 OK ID completed\r\n'),
        SendToClient(b"a4 NO [CANNOT] COMPRESS is not available through this proxy\r\n"),
        SendToBackend(b"a5 SELECT INBOX\r\n"),
        Backend(b"a1 OK NOOP completed.\r\n" + SELECTED),
        SendToClient(b"a1 OK NOOP completed.\r\n"),
        *lines(SELECTED),
    )


def test_idle_and_done() -> None:
    machine = idling()
    run(
        machine,
        Backend(b"* 2 EXISTS\r\n"),
        SendToClient(b"* 2 EXISTS\r\n"),
        # Only DONE ends IDLE: forwarded, a command would end it unseen.
        Client(b"a2 COMPRESS DEFLATE\r\n"),
        SendToClient(b"* BAD Expected DONE\r\n"),
        Client(b"done\r\na3 NOOP\r\n"),
        SendToBackend(b"done\r\n"),
        SendToBackend(b"a3 NOOP\r\n"),
        Backend(b"a1 OK Idle completed (0.001 + 1.000 secs).\r\na3 OK NOOP completed.\r\n"),
        *lines(b"a1 OK Idle completed (0.001 + 1.000 secs).\r\na3 OK NOOP completed.\r\n"),
    )
    assert machine.state is State.RELAY


def test_idle_ended_by_the_backend() -> None:
    machine = idling()
    run(
        machine,
        Backend(b"a1 OK Idle completed.\r\n"),
        SendToClient(b"a1 OK Idle completed.\r\n"),
        # The client's DONE crossed the tagged response: a command now.
        Client(b"DONE\r\n"),
        SendToClient(b"DONE BAD Missing or invalid command\r\n"),
    )
    # The tagged response came before any client line: commands again.
    machine = relaying()
    run(
        machine,
        *exchange(b"a1 IDLE\r\n", b"a1 BAD IDLE disabled\r\n"),
        Client(b"a2 NOOP\r\n"),
        SendToBackend(b"a2 NOOP\r\n"),
    )


def test_authenticate_plain_with_sasl_ir() -> None:
    machine = relaying()
    run(
        machine,
        Client(b"a4 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\na5 SELECT INBOX\r\n"),
        SendToBackend(b"a4 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
        Backend(LOGGED_IN),
        SendToClient(LOGGED_IN.replace(b" COMPRESS=DEFLATE", b"")),
        SendToBackend(b"a5 SELECT INBOX\r\n"),
    )


def test_authenticate_with_continuations() -> None:
    machine = relaying()
    run(
        machine,
        *exchange(b"a4 AUTHENTICATE PLAIN\r\n", b"+ \r\n"),
        Client(b"AGFsaWNlAHNlY3JldA==\r\n"),
        SendToBackend(b"AGFsaWNlAHNlY3JldA==\r\n"),
        Backend(LOGGED_IN),
        SendToClient(LOGGED_IN.replace(b" COMPRESS=DEFLATE", b"")),
    )
    # A line that is not base64 cancels the exchange.
    machine = relaying()
    run(
        machine,
        *exchange(b"a4 AUTHENTICATE LOGIN\r\n", b"+ VXNlcm5hbWU6\r\n"),
        *exchange(b"YWxpY2U=\r\n", b"+ UGFzc3dvcmQ6\r\n"),
        Client(b"a5 COMPRESS DEFLATE\r\n"),
        SendToBackend(b"*\r\n"),
        Backend(b"a4 BAD Authentication aborted by client.\r\n"),
        SendToClient(b"a4 BAD Authentication aborted by client.\r\n"),
    )
    assert machine.state is State.RELAY


def test_append_with_synchronizing_literal() -> None:
    machine = appending()
    run(
        machine,
        Client(MESSAGE[20:] + b"\r\na8 NOOP\r\n"),
        SendToBackend(MESSAGE[20:]),
        SendToBackend(b"\r\n"),
        SendToBackend(b"a8 NOOP\r\n"),
        Backend(b"a7 OK [APPENDUID 1700000000 2] Append completed.\r\n"),
        SendToClient(b"a7 OK [APPENDUID 1700000000 2] Append completed.\r\n"),
    )


def test_append_with_non_synchronizing_literals() -> None:
    machine = relaying()
    # MULTIAPPEND: two messages, the second in the line after the first.
    run(
        machine,
        Client(b"a7 APPEND INBOX {3+}\r\nabc {4+}\r\na8 X\r\na9 NOOP\r\n"),
        SendToBackend(b"a7 APPEND INBOX {3}\r\n"),
        # The backend's go-ahead is for the proxy: the client never asked.
        Backend(b"+ OK\r\n"),
        SendToBackend(b"abc"),
        SendToBackend(b" {4}\r\n"),
        Backend(b"+ OK\r\n"),
        SendToBackend(b"a8 X"),
        SendToBackend(b"\r\n"),
        SendToBackend(b"a9 NOOP\r\n"),
        Backend(b"a7 OK Append completed.\r\n"),
        SendToClient(b"a7 OK Append completed.\r\n"),
    )


def test_refused_non_synchronizing_literal_is_dropped() -> None:
    machine = relaying()
    append = b"a7 APPEND nosuch {%d+}\r\n" % len(MESSAGE)
    run(
        machine,
        Client(append + MESSAGE + b" {3+}\r\nabc\r\na8 NOOP\r\n"),
        SendToBackend(append.replace(b"+}", b"}")),
        Backend(b"a7 NO [TRYCREATE] Mailbox doesn't exist: nosuch\r\n"),
        SendToClient(b"a7 NO [TRYCREATE] Mailbox doesn't exist: nosuch\r\n"),
        SendToBackend(b"a8 NOOP\r\n"),
    )
    # Refused with a synchronizing literal: the client sends none.
    run(
        machine,
        *exchange(
            b"a9 APPEND nosuch {5}\r\n", b"a9 NO [TRYCREATE] Mailbox doesn't exist: nosuch\r\n"
        ),
        Client(b"a10 NOOP\r\n"),
        SendToBackend(b"a10 NOOP\r\n"),
    )


def test_local_answers_wait_for_the_end_of_a_relayed_response() -> None:
    machine = fetching()
    run(
        machine,
        Client(b"a7 STARTTLS\r\n"),
        Backend(MESSAGE[10:] + b")\r\n"),
        SendToClient(MESSAGE[10:]),
        SendToClient(b")\r\n"),
        SendToClient(b"a7 BAD TLS already active\r\n"),
    )


def test_long_data_lines_are_streamed() -> None:
    machine = relaying(max_reply_line_length=100)
    search = b"* SEARCH" + b"".join(b" %d" % n for n in range(1, 200)) + b"\r\n"
    to_client, _, _ = play(
        machine, [Client(b"a1 SEARCH ALL\r\n"), Backend(search + b"a1 OK Search completed.\r\n")]
    )
    assert to_client == search + b"a1 OK Search completed.\r\n"
    # A literal announced at the end of a long line is still seen.
    machine = relaying(max_reply_line_length=100)
    head = b"* 1 FETCH (FLAGS (" + b" $label%d" % 1 * 20 + b") BODY[] {%d}\r\n" % len(MESSAGE)
    to_client, _, _ = play(
        machine,
        [Client(b"a1 FETCH 1 (FLAGS BODY[])\r\n"), Backend(head + MESSAGE + b")\r\na1 OK\r\n")],
        [[], list(range(0, len(head) + len(MESSAGE), 7))],
    )
    assert to_client == head + MESSAGE + b")\r\na1 OK\r\n"
    assert machine.state is State.RELAY


def test_status_text_that_ends_like_a_literal() -> None:
    # Status responses end in free text: "{3}" there announces nothing.
    machine = relaying()
    run(
        machine,
        Client(b"a1 NOOP\r\n"),
        SendToBackend(b"a1 NOOP\r\n"),
        Backend(b"* OK [ALERT] Quota at 90% {3}\r\na1 NO Mailbox doesn't exist: {3}\r\n"),
        SendToClient(b"* OK [ALERT] Quota at 90% {3}\r\n"),
        SendToClient(b"a1 NO Mailbox doesn't exist: {3}\r\n"),
    )
    assert machine.state is State.RELAY


def test_reader_sees_a_literal_at_the_end_of_a_streamed_line() -> None:
    stream = b"* 1 FETCH (" + b"X" * 100 + b" BODY[] {3}\r\nabc)\r\na1 OK\r\n"
    for cut in range(len(stream) + 1):
        reader = ResponseReader(line_limit=64, literal_limit=10)
        pieces: list[Head | bytes] = []
        for chunk in (stream[:cut], stream[cut:]):
            reader.feed(chunk)
            while (piece := reader.pop()) is not None:
                pieces.append(piece)
        heads = [piece for piece in pieces if isinstance(piece, Head)]
        assert heads == [Head(stream[:32], whole=False), Head(b"a1 OK\r\n", whole=True)], cut
        assert b"".join(p.data if isinstance(p, Head) else p for p in pieces) == stream
        assert reader.between_responses


# --------------------------------------------------------------------------
# The pre-TLS phase.


def test_pre_tls_local_commands() -> None:
    machine = IMAPMachine(settings(), PEER)
    run(
        machine,
        GREETING,
        Client(b'a1 noop\r\na2 ID ("name" {11}\r\n'),
        SendToClient(b"a1 OK NOOP completed\r\n"),
        SendToClient(b"+ Ready for literal data\r\n"),
        Client(b'a3 STARTTLS "version" {3+}\r\n1.0)\r\n'),
        SendToClient(b'* ID ("name" "starttls-proxy")\r\na2 OK ID completed\r\n'),
        Client(b"\r\n* NOOP\r\nNOOP\r\na4\r\na5 NOOP\nfoo\rbar\r\n"),
        SendToClient(b"* BAD Invalid tag\r\n"),
        SendToClient(b"* BAD Invalid tag\r\n"),
        SendToClient(b"NOOP BAD Missing or invalid command\r\n"),
        SendToClient(b"a4 BAD Missing or invalid command\r\n"),
        SendToClient(b"* BAD Bare CR or LF received\r\n"),
        SendToClient(b"* BAD Bare CR or LF received\r\n"),
        Client(b"a6 STARTTLS now\r\na7 COMPRESS DEFLATE\r\n"),
        SendToClient(b"a6 BAD STARTTLS takes no arguments\r\n"),
        SendToClient(b"a7 NO [CANNOT] COMPRESS is not available through this proxy\r\n"),
        Client(b"a8 LOGOUT\r\na9 NOOP\r\n"),
        SendToClient(
            b"* BYE proxy.example IMAP4 starttls-proxy logging out\r\na8 OK LOGOUT completed\r\n"
        ),
        CloseConnection("client logged out", clean=True),
    )


def test_require_tls_logindisabled_and_login_refused() -> None:
    assert b"LOGINDISABLED" in GREETING.data
    assert b"AUTH=" not in GREETING.data
    machine = IMAPMachine(settings(), PEER)
    run(
        machine,
        GREETING,
        Client(b"a1 LOGIN alice secret\r\na2 AUTHENTICATE PLAIN\r\na3 SELECT INBOX\r\n"),
        SendToClient(b"a1 " + PRIVACY),
        SendToClient(b"a2 " + PRIVACY),
        SendToClient(b"a3 " + PRIVACY),
        Client(b"a4 LOGIN {5+}\r\nalice {9+}\r\na5 NOOP\r\n\r\na6 NOOP\r\n"),
        SendToClient(b"a4 " + PRIVACY),
        SendToClient(b"a6 OK NOOP completed\r\n"),
        # A refused synchronizing literal is not waited for.
        Client(b"a7 LOGIN {5}\r\na8 NOOP\r\n"),
        SendToClient(b"a7 " + PRIVACY),
        SendToClient(b"a8 OK NOOP completed\r\n"),
    )
    assert machine.state is State.PRE_TLS


def test_backend_logindisabled_kept_only_for_plaintext_clients() -> None:
    capabilities = ("IMAP4rev1", "STARTTLS", "LOGINDISABLED", "AUTH=PLAIN")
    machine = IMAPMachine(settings(capabilities=capabilities, require_tls=False), PEER)
    run(
        machine,
        SendToClient(
            b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=PLAIN STARTTLS]"
            b" proxy.example IMAP4 starttls-proxy ready\r\n"
        ),
    )
    machine = IMAPMachine(settings(capabilities=capabilities), PEER)
    run(
        machine,
        SendToClient(
            b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS]"
            b" proxy.example IMAP4 starttls-proxy ready\r\n"
        ),
    )
    machine = relaying()
    run(
        machine,
        Client(b"a2 CAPABILITY\r\n"),
        SendToBackend(b"a2 CAPABILITY\r\n"),
        Backend(b"* CAPABILITY IMAP4rev1 LOGINDISABLED\r\na2 OK done\r\n"),
        SendToClient(b"* CAPABILITY IMAP4rev1\r\n"),
        SendToClient(b"a2 OK done\r\n"),
    )


def test_plaintext_relay_starts_only_for_backend_commands() -> None:
    machine = IMAPMachine(settings(require_tls=False), PEER)
    run(
        machine,
        OPEN_GREETING,
        Client(b"a1 CAPABILITY\r\na2 NOOP\r\na3 COMPRESS DEFLATE\r\n"),
        SendToClient(
            b"* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+"
            b" AUTH=PLAIN AUTH=LOGIN STARTTLS\r\na1 OK CAPABILITY completed\r\n"
        ),
        SendToClient(b"a2 OK NOOP completed\r\n"),
        SendToClient(b"a3 NO [CANNOT] COMPRESS is not available through this proxy\r\n"),
        Client(b"a4 AUTHENTICATE PLAIN\r\n"),
        OpenBackend(),
        Failed("connection refused"),
        UNAVAILABLE,
        CloseConnection("connection refused"),
    )


# --------------------------------------------------------------------------
# Attacks.


def test_starttls_in_literal_is_not_a_command() -> None:
    machine = IMAPMachine(settings(), PEER)
    run(
        machine,
        GREETING,
        Client(b"a1 ID ({11}\r\n"),
        SendToClient(b"+ Ready for literal data\r\n"),
        Client(b"a2 STARTTLS)\r\n"),
        SendToClient(b'* ID ("name" "starttls-proxy")\r\na1 OK ID completed\r\n'),
    )
    assert machine.state is State.PRE_TLS
    machine = relaying()
    run(
        machine,
        Client(b"a2 LOGIN {11}\r\n"),
        SendToBackend(b"a2 LOGIN {11}\r\n"),
        Client(b"a3 STARTTLS secret\r\n"),
        Backend(b"+ OK\r\n"),
        SendToClient(b"+ OK\r\n"),
        SendToBackend(b"a3 STARTTLS"),
        SendToBackend(b" secret\r\n"),
    )


def test_starttls_in_append_body_passes_untouched() -> None:
    body = b"a1 STARTTLS\r\na2 COMPRESS DEFLATE\r\n"
    machine = relaying()
    to_client, to_backend, _ = play(
        machine,
        [
            Client(b"a3 APPEND INBOX {%d}\r\n" % len(body)),
            Backend(b"+ OK\r\n"),
            Client(body + b"\r\n"),
            Backend(b"a3 OK Append completed.\r\n"),
        ],
    )
    assert to_backend == b"a3 APPEND INBOX {%d}\r\n" % len(body) + body + b"\r\n"
    assert to_client == b"+ OK\r\na3 OK Append completed.\r\n"


def test_capability_text_in_fetch_literal_is_not_filtered() -> None:
    machine = relaying()
    response = FETCH_HEAD + MESSAGE + b")\r\na6 OK Fetch completed.\r\n"
    to_client, _, _ = play(
        machine,
        [Client(b"a6 FETCH 1 BODY[]\r\n"), Backend(response)],
        [[], list(range(0, len(response), 5))],
    )
    assert to_client == response
    # Nor is a "* BYE" in the message taken for the backend's.
    run(machine, EOF(Side.BACKEND), UNAVAILABLE, CloseConnection("backend closed"))


def test_oversize_literal_refused() -> None:
    too_big = b"BAD [TOOBIG] Literal too large\r\n"
    machine = relaying(max_literal_size=100)
    run(
        machine,
        Client(b"a1 APPEND INBOX {101}\r\n"),
        SendToClient(b"a1 " + too_big),
        Client(b"a2 APPEND INBOX {101+}\r\n" + b"a3 LOGOUT\r\n" * 9 + b"xx\r\na4 NOOP\r\n"),
        SendToClient(b"a2 " + too_big),
        SendToBackend(b"a4 NOOP\r\n"),
        Client(b"a5 APPEND INBOX {100+}\r\n" + b"x" * 100 + b"\r\n"),
        SendToBackend(b"a5 APPEND INBOX {100}\r\n"),
    )
    # The backend already has the start of this one: nothing can undo it.
    machine = relaying(max_literal_size=100)
    run(
        machine,
        *exchange(b"a1 APPEND INBOX {3}\r\n", b"+ OK\r\n"),
        Client(b"abc {101}\r\n"),
        SendToBackend(b"abc"),
        SendToClient(b"* BYE [TOOBIG] Literal too large\r\n"),
        CloseConnection("literal too large"),
    )
    # Too large from the backend: it is misbehaving.
    machine = relaying(max_literal_size=100)
    run(machine, Client(b"a1 FETCH 1 BODY[]\r\n"), SendToBackend(b"a1 FETCH 1 BODY[]\r\n"))
    machine.receive_data(Side.BACKEND, b"* 1 FETCH (BODY[] {101}\r\n")
    assert ending(machine) == [UNAVAILABLE, CloseConnection("literal of 101 octets from backend")]


def test_overlong_line_after_a_literal_ends_the_session() -> None:
    # The line goes on after the literal, in a command already relayed.
    machine = relaying(max_line_length=64)
    run(
        machine,
        *exchange(b"a3 APPEND INBOX {1}\r\n", b"+ OK\r\n"),
        Client(b"x" + b"y" * 100),
        SendToBackend(b"x"),
        SendToClient(b"* BYE [TOOBIG] Line too long\r\n"),
        CloseConnection("unusable line in a relayed command"),
    )


def test_compress_refused_and_not_advertised() -> None:
    assert b"COMPRESS" not in GREETING.data + OPEN_GREETING.data
    machine = relaying()
    run(
        machine,
        Client(b"a4 LOGIN alice secret\r\n"),
        SendToBackend(b"a4 LOGIN alice secret\r\n"),
        Backend(LOGGED_IN),
        SendToClient(LOGGED_IN.replace(b" COMPRESS=DEFLATE", b"")),
        Client(b"a5 COMPRESS DEFLATE\r\n"),
        SendToClient(b"a5 NO [CANNOT] COMPRESS is not available through this proxy\r\n"),
    )


def test_duplicate_tag_refused() -> None:
    # With two "a" in flight, "a OK" would not say which one ended, and the
    # "+" of one could be taken for the other's.
    machine = relaying()
    run(
        machine,
        Client(b"a NOOP\r\na IDLE\r\nb APPEND x {5}\r\nc NOOP\r\n"),
        SendToBackend(b"a NOOP\r\n"),
        SendToClient(b"a BAD Tag already in use\r\n"),
        SendToBackend(b"b APPEND x {5}\r\n"),
        Backend(b"a OK NOOP completed.\r\n"),
        SendToClient(b"a OK NOOP completed.\r\n"),
    )
    assert machine.state is State.CONTINUATION


@pytest.mark.parametrize(
    ("greeting", "reason"),
    [
        (b"* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n", "* PREAUTH [CAPABILITY IMAP4rev1] hi"),
        (b"+OK POP3 ready\r\n", "+OK POP3 ready"),
    ],
)
def test_backend_refusing_the_session_gives_bye(greeting: bytes, reason: str) -> None:
    machine = connecting()
    run(machine, Connected())
    machine.receive_data(Side.BACKEND, greeting)
    assert drain(machine) == [
        UNAVAILABLE,
        CloseConnection(f"backend refused the session: {reason}"),
    ]
    assert machine.state is State.ERROR


def test_literal_announced_but_never_sent() -> None:
    machine = relaying()
    run(
        machine,
        *exchange(b"a1 APPEND INBOX {1000000}\r\n", b"+ OK\r\n"),
        Client(b"x" * 10),
        SendToBackend(b"x" * 10),
    )
    assert machine.unprocessed_client_bytes == 0
    run(machine, Timeout(), TIMEOUT_BYE, CloseConnection("idle timeout"))
    # Announced, never answered by the backend: the client's bytes wait.
    machine = relaying()
    run(machine, Client(b"a1 APPEND INBOX {5}\r\n"), SendToBackend(b"a1 APPEND INBOX {5}\r\n"))
    run(machine, Client(b"a2 NOOP\r\n"))
    assert machine.unprocessed_client_bytes == len(b"a2 NOOP\r\n")
    run(machine, Timeout(), TIMEOUT_BYE, CloseConnection("idle timeout"))


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (b"+ go ahead\r\n", "unexpected continuation from backend: b'+ go ahead\\r\\n'"),
        (b"zz OK\r\n", "unexpected response from backend: b'zz OK\\r\\n'"),
        (b"\r\n", "unexpected response from backend: b'\\r\\n'"),
        (
            b"* CAPABILITY " + b"X" * 9000 + b"\r\n",
            "capability list too long from backend",
        ),
    ],
)
def test_misbehaving_backend_gives_bye(response: bytes, reason: str) -> None:
    machine = relaying()
    run(machine, Client(b"a1 NOOP\r\n"), SendToBackend(b"a1 NOOP\r\n"))
    machine.receive_data(Side.BACKEND, response)
    assert ending(machine) == [UNAVAILABLE, CloseConnection(reason)]
    assert machine.state is State.ERROR


def test_timeout_busy_and_eof() -> None:
    assert IMAPMachine.busy_reply("imap.example") == (
        b"* BYE [UNAVAILABLE] imap.example too many connections\r\n"
    )
    machine = IMAPMachine(settings(), PEER)
    run(machine, GREETING, Timeout(), TIMEOUT_BYE, CloseConnection("idle timeout"))
    run(relaying(), EOF(Side.CLIENT), CloseConnection("client closed"))
    run(relaying(), EOF(Side.BACKEND), UNAVAILABLE, CloseConnection("backend closed"))
    machine = relaying()
    run(
        machine,
        Backend(b"* BYE Server shutting down.\r\n"),
        SendToClient(b"* BYE Server shutting down.\r\n"),
        EOF(Side.BACKEND),
        CloseConnection("backend said BYE", clean=True),
    )


SHUTDOWN_BYE = IMAP.shutdown_goodbye


def test_shutdown_goodbye_while_idling() -> None:
    machine = idling()
    run(machine, ShuttingDown(), SHUTDOWN_BYE, SHUTDOWN)
    assert machine.state is State.CLOSED
    run(machine, ShuttingDown(), Backend(b"* 2 EXISTS\r\n"))


def test_shutdown_goodbye_with_responses_owed() -> None:
    machine = relaying()
    run(
        machine,
        Client(b"a1 NOOP\r\na2 SELECT INBOX\r\n"),
        SendToBackend(b"a1 NOOP\r\n"),
        SendToBackend(b"a2 SELECT INBOX\r\n"),
        Backend(b"a1 OK NOOP completed.\r\n"),
        SendToClient(b"a1 OK NOOP completed.\r\n"),
        ShuttingDown(),
        SHUTDOWN_BYE,
        SHUTDOWN,
    )


def test_shutdown_goodbye_not_inside_a_literal() -> None:
    run(appending(), ShuttingDown(), SHUTDOWN)
    # A non-synchronizing literal is on its way before the backend's "+".
    machine = relaying()
    run(
        machine,
        Client(b"a7 APPEND INBOX {3+}\r\nab"),
        SendToBackend(b"a7 APPEND INBOX {3}\r\n"),
        ShuttingDown(),
        SHUTDOWN,
    )
    # A response half relayed to the client.
    run(fetching(), ShuttingDown(), SHUTDOWN)
    # Between responses the goodbye is back.
    machine = fetching()
    run(
        machine,
        Backend(MESSAGE[10:] + b")\r\n"),
        SendToClient(MESSAGE[10:]),
        SendToClient(b")\r\n"),
        ShuttingDown(),
        SHUTDOWN_BYE,
        SHUTDOWN,
    )


# --------------------------------------------------------------------------
# The transitions table.


def test_a_completed_command_always_returns_to_the_relay() -> None:
    completed = {target for (_, input_), target in TRANSITIONS.items() if input_ is Input.COMPLETED}
    assert completed == {State.RELAY}


# --------------------------------------------------------------------------
# Split invariance: the same bytes cut anywhere give the same session.

TRANSCRIPTS = Transcripts(
    IMAP,
    {
        "starttls": (
            settings(identity=BackendIdentity.IMAP_ID),
            (
                Client(b'a1 CAPABILITY\r\na2 ID ("name" {4}\r\n'),
                Client(b"mutt)\r\na3 STARTTLS\r\n"),
                TLS(),
                Connected(),
                Backend(BACKEND_GREETING + b'* ID ("name" {7}\r\nDovecot)\r\nstp0 OK ID done\r\n'),
                Client(b"a4 LOGIN {5+}\r\nalice secret\r\na5 SELECT INBOX\r\n"),
                # The backend answers what it was sent: the literal comes first.
                Backend(b"+ OK\r\n"),
                Backend(LOGGED_IN + SELECTED),
                Client(b"a6 APPEND INBOX {%d}\r\n" % len(MESSAGE)),
                Backend(b"+ OK\r\n"),
                Client(MESSAGE + b"\r\na7 STARTTLS\r\na8 IDLE\r\n"),
                Backend(b"a6 OK appended\r\n+ idling\r\n* 2 EXISTS\r\n"),
                Client(b"DONE\r\na9 UID FETCH 2 BODY[]\r\n"),
                Backend(b"a8 OK done\r\n" + FETCH_HEAD + MESSAGE + b")\r\na9 OK fetched\r\n"),
                Client(b"a10 LOGOUT\r\n"),
                Backend(b"* BYE bye\r\na10 OK bye\r\n"),
                EOF(Side.BACKEND),
            ),
        ),
        "plaintext": (
            settings(require_tls=False, max_line_length=100),
            (
                Client(b"a1 LOGIN alice secret\r\na2 STARTTLS\r\n"),
                Connected(),
                Backend(BACKEND_GREETING),
                Backend(LOGGED_IN.replace(b"a4", b"a1")),
                Client(b"a3 AUTHENTICATE PLAIN\r\n" + b"x" * 300 + b"\r\na4 NOOP\r\n"),
                Backend(b"+ \r\n"),
                Backend(b"a3 NO no\r\n"),
                Client(b"a5 APPEND x {7+}\r\na9 XY\r\n"),
                Backend(b"a4 OK\r\na5 NO [TRYCREATE] no\r\n"),
            ),
        ),
        "pre-tls garbage": (
            settings(max_line_length=100),
            (
                Client(b"\r\n* NOOP\r\na1 NOOP\r\na2 LOGIN {3+}\r\nabc\r\na3 STARTTLS x\r\n"),
                Client(b"A" * 250 + b"\r\na4 ID ({2}\r\nab)\r\na5 LOGIN x\rcr\r\na6 LOGOUT\r\n"),
            ),
        ),
        "implicit": (
            settings(tls_mode=TLSMode.IMPLICIT, max_reply_line_length=160),
            (
                TLS(),
                Client(b"a1 SEARCH ALL\r\n"),
                Connected(),
                Backend(BACKEND_GREETING),
                Backend(
                    b"* SEARCH" + b" 1234" * 40 + b"\r\n* 1 FETCH (" + b"X" * 200 + b" {3}\r\n"
                ),
                Backend(b"abc)\r\na1 OK\r\n"),
            ),
        ),
    },
)


@pytest.mark.parametrize("name", TRANSCRIPTS.sessions)
def test_transcripts_end_as_expected(name: str) -> None:
    to_client, to_backend, others = TRANSCRIPTS.outcome(name)
    assert b"a7 STARTTLS" not in to_backend
    if name == "starttls":
        assert b"a4 LOGIN {5}\r\nalice secret\r\n" in to_backend
        assert MESSAGE + b"\r\n" in to_backend
        fetched = FETCH_HEAD + MESSAGE + b")\r\na9 OK fetched\r\n* BYE bye\r\na10 OK bye\r\n"
        assert to_client.endswith(fetched)
        assert others[-1] == CloseConnection("backend said BYE", clean=True)
    if name == "plaintext":
        assert to_backend.endswith(b"a3 AUTHENTICATE PLAIN\r\n*\r\na4 NOOP\r\na5 APPEND x {7}\r\n")
        assert b"a9 XY" not in to_backend
    if name == "pre-tls garbage":
        assert others == [CloseConnection("client logged out", clean=True)]
    if name == "implicit":
        assert to_client.endswith(b"abc)\r\na1 OK\r\n")


test_split_one_byte_at_a_time, test_split_invariance = split_invariance_tests(TRANSCRIPTS)


# --------------------------------------------------------------------------
# The probe and the registry.


def test_registered_with_a_working_fallback() -> None:
    spec = PROTOCOLS["imap"]
    assert (spec.machine, spec.probe) == (IMAPMachine, IMAPCapabilityProbe)
    machine = spec.machine(settings(capabilities=spec.facts.fallback_capabilities), PEER)
    run(
        machine,
        SendToClient(
            b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE STARTTLS LOGINDISABLED]"
            b" proxy.example IMAP4 starttls-proxy ready\r\n"
        ),
    )


def test_probe_reads_the_greeting_capabilities() -> None:
    probe = IMAPCapabilityProbe(HOST)
    assert probe.next_send() is None
    probe.receive_data(BACKEND_GREETING[:30])
    probe.receive_data(BACKEND_GREETING[30:])
    assert probe.result == IMAP.capabilities
    assert probe.next_send() == b"p2 LOGOUT\r\n"
    assert probe.next_send() is None
    assert probe.error is None


def test_probe_asks_capability() -> None:
    probe = IMAPCapabilityProbe(HOST)
    probe.receive_data(b"* OK Dovecot ready.\r\n")
    assert probe.next_send() == b"p1 CAPABILITY\r\n"
    probe.receive_data(b"* CAPABILITY IMAP4rev1 STARTTLS\r\n* OK still there\r\n")
    assert probe.result is None
    probe.receive_data(b"p1 OK Capability completed.\r\n")
    assert probe.result == ("IMAP4rev1", "STARTTLS")
    assert probe.next_send() == b"p2 LOGOUT\r\n"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"* BYE Too many\r\n", "backend refused the session: * BYE Too many"),
        (b"220 smtp ready\r\n", "backend refused the session: 220 smtp ready"),
        (b"* OK hi\r\np1 BAD what\r\n", "backend refused CAPABILITY: p1 BAD what"),
        (b"* OK hi\r\np1 OK but no list\r\n", "backend refused CAPABILITY: p1 OK but no list"),
        (b"* OK " + b"x" * 9000, "response line too long from backend"),
    ],
)
def test_probe_errors(data: bytes, error: str) -> None:
    check_probe_error(IMAPCapabilityProbe(HOST), [data], error)
