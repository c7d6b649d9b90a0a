"""The capability probes of SMTP and POP3, which go the same way: wait for the
greeting, ask for the list, read it whole, say goodbye. IMAP's and XMPP's
probes, which go otherwise, are tested beside their machines."""

from __future__ import annotations

import pytest

from protocols._base import CapabilityProbe
from protocols.pop3 import POP3CapabilityProbe
from protocols.smtp import SMTPCapabilityProbe
from tests.protocols.transcript import HOST, check_probe_error


@pytest.mark.parametrize(
    ("probe_type", "greeting", "asks", "listing", "result"),
    [
        (
            SMTPCapabilityProbe,
            (b"220-mx.backend.test ESMTP\r\n220 ", b"Postfix\r\n"),
            b"EHLO proxy.example\r\n",
            (
                b"250-mx.backend.test\r\n250-PIPELINING\r\n250-AUTH PLAIN\r\n",
                b"250 XCLIENT NAME ADDR\r\n",
            ),
            ("PIPELINING", "AUTH PLAIN", "XCLIENT NAME ADDR"),
        ),
        (
            POP3CapabilityProbe,
            (b"+OK Dovecot ", b"ready.\r\n"),
            b"CAPA\r\n",
            (b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nSASL PLAIN\r\n..odd\r\n", b".\r\n"),
            ("CAPA", "TOP", "UIDL", "SASL PLAIN", ".odd"),
        ),
    ],
    ids=["smtp", "pop3"],
)
def test_probe(
    probe_type: type[CapabilityProbe],
    greeting: tuple[bytes, bytes],
    asks: bytes,
    listing: tuple[bytes, bytes],
    result: tuple[str, ...],
) -> None:
    """The greeting and the list each come in two pieces: the probe waits
    for the whole of each."""
    probe = probe_type(HOST)
    assert probe.next_send() is None
    for piece in greeting:
        probe.receive_data(piece)
    assert probe.next_send() == asks
    assert probe.next_send() is None
    probe.receive_data(listing[0])
    assert probe.result is None
    probe.receive_data(listing[1])
    assert probe.result == result
    assert probe.next_send() == b"QUIT\r\n"
    assert probe.next_send() is None
    assert probe.error is None


@pytest.mark.parametrize(
    ("probe_type", "greeting_and_more", "error"),
    [
        (
            SMTPCapabilityProbe,
            b"220 mx ESMTP\r\n250-mx\r\n250 X-INJECTED\r\n",
            "backend spoke out of turn after: 220 mx ESMTP",
        ),
        (
            POP3CapabilityProbe,
            b"+OK ready.\r\n+OK\r\nX-INJECTED\r\n.\r\n",
            "backend spoke out of turn after: +OK ready.",
        ),
    ],
    ids=["smtp", "pop3"],
)
def test_a_list_that_came_before_the_probe_asked_is_not_taken(
    probe_type: type[CapabilityProbe], greeting_and_more: bytes, error: str
) -> None:
    """Response injection against the probe (Poddebniak et al., USENIX
    Security 2021): what came with the greeting, before the probe's question,
    is no answer to it, and never becomes what clients are offered."""
    check_probe_error(probe_type(HOST), [greeting_and_more], error)
