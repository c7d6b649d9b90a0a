"""The load generator's dialogues and messages (bench.clients) and the
auth_http responder nginx mail asks for each session's backend."""

from __future__ import annotations

import pytest

from bench.auth_http import answer, parse_head
from bench.clients import DIALOGUES, make_message


@pytest.mark.parametrize("size", [200, 1000, 1_000_003])
def test_make_message_has_the_exact_size_and_crlf_lines(size: int) -> None:
    message = make_message(size)
    assert len(message) == size
    assert b"\r\n.\r\n" not in message
    body = message.split(b"\r\n\r\n", 1)[1]
    assert all(len(line) <= 998 for line in body.split(b"\r\n"))


def test_make_message_refuses_a_size_below_its_header() -> None:
    with pytest.raises(ValueError, match="at least"):
        make_message(10)


def test_dialogue_reply_ends() -> None:
    smtp, imap, pop3 = DIALOGUES["smtp"], DIALOGUES["imap"], DIALOGUES["pop3"]
    assert not smtp.capability.last(b"250-PIPELINING\r\n")
    assert smtp.capability.last(b"250 SMTPUTF8\r\n")
    assert not imap.capability.last(b"* CAPABILITY IMAP4rev1\r\n")
    assert imap.capability.last(b"C OK done\r\n")
    assert not pop3.capability.last(b"STLS\r\n")
    assert pop3.capability.last(b".\r\n")
    assert pop3.capability.last(b"-ERR no CAPA here\r\n")


def test_auth_http_sends_each_protocol_to_its_backend() -> None:
    head = (
        b"GET /auth HTTP/1.0\r\nHost: localhost\r\nAuth-Method: plain\r\n"
        b"Auth-User: bob\r\nAuth-Protocol: imap\r\n\r\n"
    )
    fields = parse_head(head)
    assert fields["auth-protocol"] == "imap"
    reply = answer(fields, {"imap": ("127.0.0.1", 10143)})
    assert reply.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Auth-Status: OK\r\n" in reply
    assert b"Auth-Server: 127.0.0.1\r\nAuth-Port: 10143\r\n" in reply
    assert reply.endswith(b"\r\n\r\n")


def test_auth_http_refuses_a_protocol_without_backend() -> None:
    reply = answer({"auth-protocol": "pop3"}, {"imap": ("127.0.0.1", 10143)})
    assert b"Auth-Status: OK" not in reply
    assert b"Auth-Wait: 1\r\n" in reply
