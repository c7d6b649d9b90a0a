"""The capability probes of SMTP and POP3, which go the same way: wait for the
greeting, ask for the list, read it whole, say goodbye. IMAP's and XMPP's
probes, which go otherwise, are tested beside their machines."""

from __future__ import annotations

import pytest

from protocols._base import CapabilityProbe
from protocols.pop3 import POP3CapabilityProbe
from protocols.smtp import SMTPCapabilityProbe
from tests.protocols.transcript import HOST


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
