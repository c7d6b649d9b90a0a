"""Tests of the POP3 machine and probe, mostly written as transcripts (see
``tests.protocols.transcript``)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
from protocols.pop3 import (
    POP3CapabilityProbe,
    POP3Machine,
    State,
)
from protocols.registry import PROTOCOLS
from tests.protocols.dialogues import (
    POP3,
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

CAPABILITIES = POP3.capabilities
PEER = POP3.peer
settings = POP3.settings
relaying = POP3.relaying
GREETING = POP3.greeting
TLS_READY = POP3.tls_ready
UNAVAILABLE = POP3.unavailable
AUTH_NEEDS_TLS = SendToClient(b"-ERR [AUTH] Authentication requires TLS: use STLS first\r\n")
TLS_FIRST = POP3.handshake_octet_line_reply
TLS_ACTIVE = POP3.tls_active
NOT_PERMITTED = SendToClient(b"-ERR command not permitted\r\n")
BAD_LINE = SendToClient(b"-ERR bare CR or LF received\r\n")
(PRE_TLS_CAPA,) = POP3.capability_reply
# As Dovecot 2.3 sends them to a peer in its login_trusted_networks.
DOVECOT_GREETING = b"+OK [XCLIENT] Dovecot (Debian) ready.\r\n"
BACKEND_GREETING = POP3.backend_greeting
BACKEND_CAPA = (
    b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
    b"STLS\r\nUSER\r\nSASL PLAIN LOGIN SCRAM-SHA-256-PLUS\r\n.\r\n"
)
RELAYED_CAPA = (
    b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
    b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n"
)
#: A message as RETR sends it: dot-stuffed, with lines that look like
#: commands and status lines, and a dot at the end of a line.
MESSAGE = (
    b"Subject: one\r\n\r\nhello.\r\n"
    b"..dotted line\r\n...two\r\n..\r\n"
    b"STLS\r\n+OK fake\r\n-ERR fake\r\n+ ZmFrZQ==\r\nCAPA\r\n\r\n"
    b"\xe9t\xe9 \xff\x00 8-bit\r\n.\r\n"
)
QUIT_STEPS: tuple[Event | Command, ...] = (
    *exchange(b"QUIT\r\n", b"+OK Logging out.\r\n"),
    CloseConnection("client quit", clean=True),
)
AUTH_PLAIN = b"AGFsaWNlAGFsaWNlcHc="


def logged_in() -> POP3Machine:
    machine = relaying()
    run(
        machine,
        Client(b"USER alice\r\nPASS alicepw\r\n"),
        SendToBackend(b"USER alice\r\n"),
        SendToBackend(b"PASS alicepw\r\n"),
        Backend(b"+OK\r\n+OK Logged in.\r\n"),
        SendToClient(b"+OK\r\n"),
        SendToClient(b"+OK Logged in.\r\n"),
    )
    return machine


# --------------------------------------------------------------------------
# Whole sessions.


def test_full_stls_session() -> None:
    machine = POP3Machine(settings(), PEER)
    run(
        machine,
        GREETING,
        Client(b"capa\r\n"),
        PRE_TLS_CAPA,
        Client(b"STLS\r\n"),
        TLS_READY,
        StartTLS(b""),
        TLS(),
        OpenBackend(),
        Connected(),
        Backend(BACKEND_GREETING),
        Client(b"CAPA\r\n"),
        SendToBackend(b"CAPA\r\n"),
        Backend(BACKEND_CAPA),
        SendToClient(RELAYED_CAPA),
        *exchange(b"USER alice\r\n", b"+OK\r\n"),
        *exchange(b"PASS alicepw\r\n", b"+OK Logged in.\r\n"),
        *exchange(b"STAT\r\n", b"+OK 1 165\r\n"),
        *exchange(b"RETR 1\r\n", b"+OK 165 octets\r\n"),
        Backend(MESSAGE),
        SendToClient(MESSAGE),
        *exchange(b"DELE 1\r\n", b"+OK Marked to be deleted.\r\n"),
        *QUIT_STEPS,
    )
    assert machine.state is State.CLOSED
    run(machine, Client(b"NOOP\r\n"), Backend(b"+OK late\r\n"), Timeout(), EOF(Side.BACKEND))


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        (PEER, b"192.0.2.10 PORT=49152"),
        (Peer("2001:db8::25", 50000, "::1", 110), b"2001:db8::25 PORT=50000"),
    ],
)
def test_xclient_identity_exact_bytes(peer: Peer, address: bytes) -> None:
    machine = POP3Machine(settings(identity=BackendIdentity.POP3_XCLIENT), peer)
    run(
        machine,
        GREETING,
        Client(b"STLS\r\n"),
        TLS_READY,
        StartTLS(b""),
        TLS(),
        OpenBackend(),
        Client(b"USER alice\r\n"),
        Connected(),
        Backend(DOVECOT_GREETING),
        SendToBackend(b"XCLIENT ADDR=%s CLIENT-TRANSPORT=TLS\r\n" % address),
        Client(b"PASS alicepw\r\n"),
    )
    assert machine.state is State.XCLIENT_REPLY
    assert machine.unprocessed_client_bytes == len(b"USER alice\r\nPASS alicepw\r\n")
    run(
        machine,
        Backend(b"+OK Updated\r\n"),
        SendToBackend(b"USER alice\r\n"),
        SendToBackend(b"PASS alicepw\r\n"),
        Backend(b"+OK\r\n+OK Logged in.\r\n"),
        SendToClient(b"+OK\r\n"),
        SendToClient(b"+OK Logged in.\r\n"),
    )


@pytest.mark.parametrize(
    ("greeting", "xclient_reply", "reason"),
    [
        (
            b"+OK Dovecot ready.\r\n",
            None,
            "backend does not offer XCLIENT to the proxy: add the proxy's address"
            " to Dovecot's login_trusted_networks",
        ),
        (
            DOVECOT_GREETING,
            b"-ERR Invalid parameters\r\n",
            "backend refused XCLIENT: -ERR Invalid parameters",
        ),
        (
            b"-ERR [SYS/TEMP] go away\r\n",
            None,
            "backend refused the session: -ERR [SYS/TEMP] go away",
        ),
    ],
)
def test_xclient_failures_give_err(
    greeting: bytes, xclient_reply: bytes | None, reason: str
) -> None:
    machine = POP3Machine(settings(identity=BackendIdentity.POP3_XCLIENT), PEER)
    run(machine, GREETING, Client(b"STLS\r\n"), TLS_READY, StartTLS(b""), TLS(), OpenBackend())
    run(machine, Connected())
    machine.receive_data(Side.BACKEND, greeting)
    if xclient_reply is not None:
        assert machine.next_command() == SendToBackend(
            b"XCLIENT ADDR=192.0.2.10 PORT=49152 CLIENT-TRANSPORT=TLS\r\n"
        )
        machine.receive_data(Side.BACKEND, xclient_reply)
    assert drain(machine) == [UNAVAILABLE, CloseConnection(reason)]
    assert machine.state is State.ERROR


def test_plaintext_relay() -> None:
    machine = POP3Machine(settings(require_tls=False), PEER)
    run(
        machine,
        GREETING,
        Client(b"CAPA\r\n"),
        # Logins are offered, but no channel binding and no second STLS.
        SendToClient(
            b"+OK Capability list follows\r\n"
            b"CAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
            b"USER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n.\r\n"
        ),
        Client(b"NOOP\r\nUSER alice\r\nPASS alicepw\r\n"),
        SendToClient(b"+OK\r\n"),
        OpenBackend(),
        Client(b"STAT\r\n"),
        Connected(),
        Backend(BACKEND_GREETING),
        SendToBackend(b"USER alice\r\n"),
        SendToBackend(b"PASS alicepw\r\n"),
        SendToBackend(b"STAT\r\n"),
        Backend(b"+OK\r\n+OK Logged in.\r\n+OK 0 0\r\n"),
        SendToClient(b"+OK\r\n"),
        SendToClient(b"+OK Logged in.\r\n"),
        SendToClient(b"+OK 0 0\r\n"),
        Client(b"STLS\r\n"),
        SendToClient(b"-ERR TLS not available: session already started in plaintext\r\n"),
        Client(b"CAPA\r\n"),
        SendToBackend(b"CAPA\r\n"),
        Backend(BACKEND_CAPA),
        SendToClient(RELAYED_CAPA),
        *QUIT_STEPS,
    )


def test_plaintext_relay_with_xclient_says_insecure() -> None:
    machine = POP3Machine(settings(require_tls=False, identity=BackendIdentity.POP3_XCLIENT), PEER)
    run(
        machine,
        GREETING,
        Client(b"AUTH PLAIN\r\n"),
        OpenBackend(),
        Connected(),
        Backend(DOVECOT_GREETING),
        SendToBackend(b"XCLIENT ADDR=192.0.2.10 PORT=49152 CLIENT-TRANSPORT=insecure\r\n"),
        Backend(b"+OK Updated\r\n"),
        SendToBackend(b"AUTH PLAIN\r\n"),
    )
    assert machine.state is State.AUTH_PENDING


def test_implicit_mode_forwards_the_backend_greeting() -> None:
    machine = POP3Machine(settings(tls_mode=TLSMode.IMPLICIT), PEER)
    run(
        machine,
        StartTLS(b""),
        TLS(),
        OpenBackend(),
        Client(b"CAPA\r\n"),
        Connected(),
        Backend(b"+OK Dovecot ready. <1896.697170952@dbc.mtview.ca.us>\r\n"),
        SendToClient(b"+OK Dovecot ready. <1896.697170952@dbc.mtview.ca.us>\r\n"),
        SendToBackend(b"CAPA\r\n"),
        Backend(BACKEND_CAPA),
        SendToClient(RELAYED_CAPA),
        Client(b"STLS\r\n"),
        TLS_ACTIVE,
    )


def test_implicit_mode_with_xclient_greets_after_the_identity() -> None:
    settings_ = settings(tls_mode=TLSMode.IMPLICIT, identity=BackendIdentity.POP3_XCLIENT)
    machine = POP3Machine(settings_, PEER)
    run(
        machine,
        StartTLS(b""),
        TLS(),
        OpenBackend(),
        Connected(),
        Backend(DOVECOT_GREETING),
        SendToBackend(b"XCLIENT ADDR=192.0.2.10 PORT=49152 CLIENT-TRANSPORT=TLS\r\n"),
        Backend(b"+OK Updated\r\n"),
        # Only the proxy may use XCLIENT: the client is not told about it.
        SendToClient(b"+OK Dovecot (Debian) ready.\r\n"),
    )


def test_pipelined_retr_top_list_with_dot_stuffed_bodies() -> None:
    machine = logged_in()
    commands = b"LIST\r\nTOP 1 0\r\nRETR 1\r\nUIDL\r\nLIST 1\r\nUIDL 1\r\nRETR 9\r\nSTAT\r\n"
    responses = (
        b"+OK 2 messages:\r\n1 165\r\n2 24\r\n.\r\n"
        b"+OK\r\nSubject: one\r\n\r\n.\r\n"
        b"+OK 165 octets\r\n"
        + MESSAGE
        + b"+OK\r\n1 000000016b085f7c\r\n2 000000026b085f7c\r\n.\r\n"
        b"+OK 1 165\r\n"
        b"+OK 1 000000016b085f7c\r\n"
        b"-ERR There's no message 9.\r\n"
        b"+OK 2 189\r\n"
    )
    to_client, to_backend, others = play(machine, [Client(commands), Backend(responses)])
    assert (to_client, to_backend, others) == (responses, commands, [])
    assert machine.state is State.RELAY


def test_bodies_stream_without_being_held() -> None:
    machine = logged_in()
    run(machine, Client(b"RETR 1\r\n"), SendToBackend(b"RETR 1\r\n"))
    stream = b"+OK 165 octets\r\n" + MESSAGE + b"+OK 1 165\r\n"
    run(machine, Client(b"LIST 1\r\n"), SendToBackend(b"LIST 1\r\n"))
    forwarded = b""
    for offset in range(0, len(stream), 7):
        machine.receive_data(Side.BACKEND, stream[offset : offset + 7])
        commands = drain(machine)
        assert all(isinstance(c, SendToClient) for c in commands)
        forwarded += b"".join(c.data for c in commands if isinstance(c, SendToClient))
        # Status lines wait for their CRLF; body octets go at once.
        if len(b"+OK 165 octets\r\n") <= offset + 7 <= len(stream) - len(b"+OK 1 165\r\n"):
            assert forwarded == stream[: offset + 7]
    assert forwarded == stream


def test_auth_plain_with_continuation() -> None:
    machine = relaying()
    run(
        machine,
        Client(b"AUTH PLAIN\r\n"),
        SendToBackend(b"AUTH PLAIN\r\n"),
        # The response waits for the backend's continuation.
        Client(AUTH_PLAIN + b"\r\nSTAT\r\n"),
        Backend(b"+ \r\n"),
        SendToClient(b"+ \r\n"),
        SendToBackend(AUTH_PLAIN + b"\r\n"),
        Backend(b"+OK Logged in.\r\n"),
        SendToClient(b"+OK Logged in.\r\n"),
        SendToBackend(b"STAT\r\n"),
        Backend(b"+OK 1 165\r\n"),
        SendToClient(b"+OK 1 165\r\n"),
    )
    assert machine.state is State.RELAY


def test_auth_exchanges_with_initial_response_cancel_and_listing() -> None:
    machine = relaying()
    run(
        machine,
        *exchange(b"AUTH LOGIN\r\n", b"+ VXNlcm5hbWU6\r\n"),
        # "STLS" here is the SASL response to the challenge, not a command.
        *exchange(b"STLS\r\n", b"+ UGFzc3dvcmQ6\r\n"),
        *exchange(b"*\r\n", b"-ERR Authentication aborted by client.\r\n"),
        *exchange(b"AUTH PLAIN " + AUTH_PLAIN + b"\r\n", b"-ERR [AUTH] Authentication failed.\r\n"),
        Client(b"AUTH\r\n"),
        SendToBackend(b"AUTH\r\n"),
        Backend(b"+OK\r\nPLAIN\r\nSCRAM-SHA-1-PLUS\r\nLOGIN\r\n.\r\n"),
        SendToClient(b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"),
    )
    assert machine.state is State.RELAY


def test_overlong_sasl_response_cancels_the_exchange() -> None:
    machine = relaying(max_line_length=64)
    run(
        machine,
        *exchange(b"AUTH PLAIN\r\n", b"+ \r\n"),
        Client(b"A" * 100 + b"\r\nSTAT\r\n"),
        SendToBackend(b"*\r\n"),
        Backend(b"-ERR Authentication aborted by client.\r\n"),
        SendToClient(b"-ERR Authentication aborted by client.\r\n"),
        SendToBackend(b"STAT\r\n"),
    )


def test_pipelined_local_answers_keep_their_place() -> None:
    machine = logged_in()
    run(
        machine,
        Client(b"RETR 1\r\nSTLS\r\nSTAT\r\nXCLIENT ADDR=203.0.113.1\r\nNOOP\r\n"),
        SendToBackend(b"RETR 1\r\n"),
        SendToBackend(b"STAT\r\n"),
        SendToBackend(b"NOOP\r\n"),
        Backend(b"+OK 165 octets\r\n" + MESSAGE[:20]),
        SendToClient(b"+OK 165 octets\r\n"),
        SendToClient(MESSAGE[:20]),
        Backend(MESSAGE[20:] + b"+OK 1 165\r\n"),
        SendToClient(MESSAGE[20:]),
        TLS_ACTIVE,
        SendToClient(b"+OK 1 165\r\n"),
        NOT_PERMITTED,
        Backend(b"+OK\r\n"),
        SendToClient(b"+OK\r\n"),
    )


# --------------------------------------------------------------------------
# The pre-TLS phase.


def test_pre_tls_local_commands() -> None:
    machine = POP3Machine(settings(), PEER)
    run(
        machine,
        GREETING,
        Client(
            b"noop\r\n\r\n STAT\r\nSTLS now\r\nXCLIENT ADDR=203.0.113.1\r\nxoip 203.0.113.1\r\n"
        ),
        SendToClient(b"+OK\r\n"),
        SendToClient(b"-ERR bad syntax\r\n"),
        SendToClient(b"-ERR bad syntax\r\n"),
        SendToClient(b"-ERR Syntax: STLS\r\n"),
        NOT_PERMITTED,
        NOT_PERMITTED,
        Client(b"bare LF\ncr\r in the middle\r\n"),
        BAD_LINE,
        BAD_LINE,
        Client(b"QUIT\r\nNOOP\r\n"),
        SendToClient(b"+OK proxy.example closing connection\r\n"),
        CloseConnection("client quit", clean=True),
    )


def test_require_tls_refuses_user_pass_apop_auth() -> None:
    machine = POP3Machine(settings(), PEER)
    run(
        machine,
        GREETING,
        Client(b"USER alice\r\nPASS alicepw\r\nAPOP alice c4c9334bac560ecc979e58001b3e22fb\r\n"),
        AUTH_NEEDS_TLS,
        AUTH_NEEDS_TLS,
        AUTH_NEEDS_TLS,
        Client(b"AUTH PLAIN\r\n" + AUTH_PLAIN + b"\r\nauth\r\n"),
        AUTH_NEEDS_TLS,
        TLS_FIRST,
        AUTH_NEEDS_TLS,
        Client(b"STAT\r\nRETR 1\r\nLIST\r\nFOO\r\n"),
        TLS_FIRST,
        TLS_FIRST,
        TLS_FIRST,
        TLS_FIRST,
    )
    assert machine.state is State.PRE_TLS


def test_backend_failure_in_plaintext_gives_err() -> None:
    machine = POP3Machine(settings(require_tls=False), PEER)
    run(machine, GREETING, Client(b"USER alice\r\n"), OpenBackend())
    run(machine, Failed("timed out"), UNAVAILABLE, CloseConnection("timed out"))


# --------------------------------------------------------------------------
# Attacks.


def test_stls_inside_retr_body_is_not_a_command() -> None:
    machine = logged_in()
    body = b"STLS\r\n+ \r\nUSER mallory\r\n.\r\n"
    to_client, to_backend, others = play(
        machine, [Client(b"RETR 1\r\nNOOP\r\n"), Backend(b"+OK\r\n" + body + b"+OK\r\n")]
    )
    assert (to_client, to_backend, others) == (
        b"+OK\r\n" + body + b"+OK\r\n",
        b"RETR 1\r\nNOOP\r\n",
        [],
    )
    assert machine.state is State.RELAY


def test_stls_inside_top_body_is_not_a_command() -> None:
    headers = b"Subject: STLS\r\nSTLS\r\n.STLS\r\n..\r\n\r\n"
    stream = b"+OK\r\n" + headers + b".\r\n+OK 2 189\r\n"
    for cut in range(len(stream) + 1):
        machine = logged_in()
        to_client, to_backend, others = play(
            machine, [Client(b"TOP 1 0\r\nSTAT\r\n"), Backend(stream[:cut]), Backend(stream[cut:])]
        )
        assert (to_client, to_backend, others) == (stream, b"TOP 1 0\r\nSTAT\r\n", [])


def test_stls_in_multiline_capa_is_not_a_command() -> None:
    machine = relaying()
    run(
        machine,
        Client(b"CAPA\r\nSTLS\r\n"),
        SendToBackend(b"CAPA\r\n"),
        Backend(b"+OK\r\nSTLS\r\nSASL SCRAM-SHA-256-PLUS\r\nTOP\r\n"),
        Backend(b".\r\n"),
        # STLS is gone from the list, and the client's STLS is answered after it.
        SendToClient(b"+OK\r\nTOP\r\n.\r\n"),
        TLS_ACTIVE,
    )
    assert machine.state is State.RELAY


def test_dot_stuffed_body_passes_byte_identical() -> None:
    body = b"..\r\n...\r\n..x\r\n.\r.\n\r\n..\r\n.\r\n"
    stream = b"+OK 26 octets\r\n" + body
    for cut in range(len(stream) + 1):
        machine = logged_in()
        to_client, to_backend, _ = play(
            machine, [Client(b"RETR 2\r\n"), Backend(stream[:cut]), Backend(stream[cut:])]
        )
        assert to_client == stream
        assert to_backend == b"RETR 2\r\n"
        assert machine.state is State.RELAY


def test_plus_mechanisms_stripped_after_tls() -> None:
    machine = relaying()
    run(
        machine,
        Client(b"CAPA\r\n"),
        SendToBackend(b"CAPA\r\n"),
        Backend(
            b"+OK List follows\r\nSASL SCRAM-SHA-256-PLUS scram-sha-1-plus\r\n"
            b"IMPLEMENTATION Dovecot\r\n..odd\r\n.\r\n"
        ),
        # Nothing is left of SASL: the line goes; dot-stuffing survives.
        SendToClient(b"+OK List follows\r\nIMPLEMENTATION Dovecot\r\n..odd\r\n.\r\n"),
        *exchange(b"CAPA\r\n", b"-ERR no CAPA here\r\n"),
    )


# --------------------------------------------------------------------------
# Endings and misbehaving peers.


def test_timeout_busy_and_eof() -> None:
    assert POP3Machine.busy_reply("mx.example") == (
        b"-ERR [SYS/TEMP] mx.example too many connections\r\n"
    )
    timeout = SendToClient(b"-ERR proxy.example autologout: idle for too long\r\n")
    run(
        POP3Machine(settings(), PEER), GREETING, Timeout(), timeout, CloseConnection("idle timeout")
    )
    run(relaying(), EOF(Side.CLIENT), CloseConnection("client closed"))
    run(relaying(), EOF(Side.BACKEND), CloseConnection("backend closed"))
    run(
        relaying(),
        *exchange(b"RETR 1\r\n", b"+OK\r\n"),
        EOF(Side.BACKEND),
        UNAVAILABLE,
        CloseConnection("backend closed"),
    )


SHUTDOWN_ERR = POP3.shutdown_goodbye


def test_shutdown_goodbye_before_tls_and_with_responses_owed() -> None:
    run(POP3Machine(settings(), PEER), GREETING, ShuttingDown(), SHUTDOWN_ERR, SHUTDOWN)
    machine = logged_in()
    run(
        machine,
        Client(b"STAT\r\nLIST 1\r\nSTLS\r\n"),
        SendToBackend(b"STAT\r\n"),
        SendToBackend(b"LIST 1\r\n"),
        ShuttingDown(),
        SHUTDOWN_ERR,
        SHUTDOWN,
    )
    assert machine.state is State.CLOSED
    run(machine, ShuttingDown(), Backend(b"+OK 1 165\r\n"))


def test_shutdown_goodbye_not_inside_a_multiline_response() -> None:
    machine = logged_in()
    run(
        machine,
        Client(b"RETR 1\r\n"),
        SendToBackend(b"RETR 1\r\n"),
        Backend(b"+OK 165 octets\r\n" + MESSAGE[:30]),
        SendToClient(b"+OK 165 octets\r\n"),
        SendToClient(MESSAGE[:30]),
        ShuttingDown(),
        SHUTDOWN,
    )
    # A list to filter is held whole: the client has none of it yet.
    machine = relaying()
    run(
        machine,
        Client(b"CAPA\r\n"),
        SendToBackend(b"CAPA\r\n"),
        Backend(b"+OK\r\nTOP\r\n"),
        ShuttingDown(),
        SHUTDOWN_ERR,
        SHUTDOWN,
    )


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (b"hello\r\n", "malformed response from backend: b'hello\\r\\n'"),
        (b"+OK ok\n", "malformed response from backend: b'+OK ok\\n'"),
        (b"+OKAY\r\n", "malformed response from backend: b'+OKAY\\r\\n'"),
        (b"+OK " + b"x" * 9000, "response line too long from backend"),
        (b"+OK\r\n-ERR again\r\n", "unsolicited response from backend: -ERR again"),
        (b"+ challenge\r\n", "unexpected continuation from backend: + challenge"),
    ],
)
def test_misbehaving_backend_gives_err(response: bytes, reason: str) -> None:
    machine = relaying()
    run(machine, Client(b"NOOP\r\n"), SendToBackend(b"NOOP\r\n"))
    machine.receive_data(Side.BACKEND, response)
    assert drain(machine)[-2:] == [UNAVAILABLE, CloseConnection(reason)]
    assert machine.state is State.ERROR


def test_malformed_capa_list_gives_err() -> None:
    machine = relaying()
    run(machine, Client(b"CAPA\r\n"), SendToBackend(b"CAPA\r\n"))
    machine.receive_data(Side.BACKEND, b"+OK\r\nTOP\nUIDL\r\n")
    reason = "malformed list line from backend: b'TOP\\n'"
    assert drain(machine) == [UNAVAILABLE, CloseConnection(reason)]


def test_backend_answering_while_client_owes_a_sasl_response() -> None:
    machine = relaying()
    run(
        machine,
        *exchange(b"AUTH PLAIN\r\n", b"+ \r\n"),
        Backend(b"-ERR timeout\r\n"),
        SendToClient(b"-ERR timeout\r\n"),
        UNAVAILABLE,
        CloseConnection("backend ended the SASL exchange before the response"),
    )


# --------------------------------------------------------------------------
# Split invariance: the same bytes cut anywhere give the same session.

TRANSCRIPTS = Transcripts(
    POP3,
    {
        "stls": (
            settings(identity=BackendIdentity.POP3_XCLIENT),
            (
                Client(b"CAPA\r\nNOOP\r\n"),
                Client(b"STLS\r\n"),
                Client(b"USER evil\r\n"),
                TLS(),
                Connected(),
                Backend(DOVECOT_GREETING),
                Backend(b"+OK Updated\r\n"),
                Client(
                    b"CAPA\r\nUSER alice\r\nPASS alicepw\r\nSTLS\r\nLIST\r\nRETR 1\r\nTOP 1 0\r\n"
                ),
                Backend(
                    BACKEND_CAPA + b"+OK\r\n+OK Logged in.\r\n+OK 1 messages\r\n1 165\r\n.\r\n"
                ),
                Backend(b"+OK 165 octets\r\n" + MESSAGE + b"+OK\r\nSubject: one\r\n\r\n.\r\n"),
                Client(b"AUTH\r\nUIDL\r\nQUIT\r\n"),
                Backend(b"+OK\r\nPLAIN\r\nX-PLUS\r\n.\r\n+OK\r\n1 a\r\n.\r\n+OK Logging out.\r\n"),
            ),
        ),
        "plaintext auth": (
            settings(require_tls=False, max_line_length=100),
            (
                Client(b"CAPA\r\nAUTH PLAIN\r\n" + AUTH_PLAIN + b"\r\nSTAT\r\n"),
                Connected(),
                Backend(BACKEND_GREETING),
                Backend(b"+ \r\n"),
                Backend(b"+OK Logged in.\r\n"),
                Backend(b"+OK 0 0\r\n"),
                Client(b"AUTH LOGIN\r\n" + b"x" * 300 + b"\r\nRETR 1\r\n"),
                Backend(b"+ VXNlcm5hbWU6\r\n"),
                # Each reply once its command is sent: RETR waits for the end
                # of the SASL exchange.
                Backend(b"-ERR aborted\r\n"),
                Backend(b"+OK\r\n" + MESSAGE),
                Client(b"QUIT\r\n"),
                Backend(b"+OK Logging out.\r\n"),
            ),
        ),
        "pre-tls garbage": (
            settings(max_line_length=100),
            (
                Client(
                    b"\r\nNOOP\r\nUSER x\r\nSTLS 1\r\nxyzNOOP\nRSET\r\r\nXCLIENT ADDR=1.2.3.4\r\n"
                ),
                Client(b"A" * 250 + b"\r\nCAPA\r\nAUTH\r\nQUIT\r\n"),
            ),
        ),
        "implicit": (
            settings(tls_mode=TLSMode.IMPLICIT),
            (
                TLS(),
                Client(b"CAPA\r\nTOP 1 0\r\n"),
                Connected(),
                Backend(BACKEND_GREETING),
                Backend(BACKEND_CAPA),
                Backend(b"+OK\r\n..\r\n\r\n.\r\n"),
                EOF(Side.BACKEND),
            ),
        ),
    },
)


def test_transcripts_end_as_expected() -> None:
    expected_ends = {
        "stls": CloseConnection("client quit", clean=True),
        "plaintext auth": CloseConnection("client quit", clean=True),
        "pre-tls garbage": CloseConnection("client quit", clean=True),
        "implicit": CloseConnection("backend closed"),
    }
    for name in TRANSCRIPTS.sessions:
        to_client, to_backend, others = TRANSCRIPTS.outcome(name)
        assert others[-1] == expected_ends[name]
        assert b"evil" not in to_backend
        assert b"PLUS" not in to_client
        if name == "stls":
            assert to_backend.startswith(b"XCLIENT ADDR=192.0.2.10 PORT=49152 CLIENT-TRANSPORT=TLS")
            assert MESSAGE in to_client
            assert to_client.endswith(b"+OK\r\n1 a\r\n.\r\n+OK Logging out.\r\n")
        if name == "plaintext auth":
            assert b"*\r\nRETR 1\r\n" in to_backend


test_split_one_byte_at_a_time, test_split_invariance = split_invariance_tests(TRANSCRIPTS)


# --------------------------------------------------------------------------
# Fuzzing.


@given(
    st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n"]), max_size=40),
    st.lists(st.integers(0, 60), max_size=6),
)
def test_body_end_matches_one_shot_reference(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces) + b"\r\n.\r\n+OK 1 2\r\n"
    # The status line's CRLF counts: the body may end with its first line.
    end = (b"\r\n" + stream).find(b"\r\n.\r\n") + len(b".\r\n")
    machine = logged_in()
    run(
        machine,
        Client(b"RETR 1\r\nSTAT\r\n"),
        SendToBackend(b"RETR 1\r\n"),
        SendToBackend(b"STAT\r\n"),
        Backend(b"+OK\r\n"),
        SendToClient(b"+OK\r\n"),
    )
    bounds = [0, *sorted(min(cut, len(stream)) for cut in cuts), len(stream)]
    to_client, _, others = play(
        machine, [Backend(stream[a:b]) for a, b in itertools.pairwise(bounds)]
    )
    if stream[end:] == b"+OK 1 2\r\n":
        assert to_client == stream
        assert others == []
    else:
        # The body ended early: what follows was not a well-formed response.
        assert to_client.startswith(stream[:end])
        assert machine.state is State.ERROR


# --------------------------------------------------------------------------
# The probe and the registry.


@pytest.mark.parametrize(
    ("greeting", "capa_reply", "error"),
    [
        (b"-ERR [SYS/TEMP] busy\r\n", b"", "backend refused the session: -ERR [SYS/TEMP] busy"),
        (b"+OK\r\n", b"-ERR Unknown command.\r\n", "backend refused CAPA: -ERR Unknown command."),
        (b"* OK IMAP4rev1\r\n", b"", "malformed response from backend: b'* OK IMAP4rev1\\r\\n'"),
        (b"+OK\r\n", b"+OK\r\n" + b"x" * 9000, "response line too long from backend"),
    ],
)
def test_probe_errors(greeting: bytes, capa_reply: bytes, error: str) -> None:
    check_probe_error(POP3CapabilityProbe(HOST), [greeting, capa_reply], error)


def test_registered() -> None:
    spec = PROTOCOLS["pop3"]
    assert (spec.machine, spec.probe) == (POP3Machine, POP3CapabilityProbe)
    assert "STLS" not in spec.facts.fallback_capabilities
