"""Sans-I/O protocol machines, one module per protocol (no socket or asyncio imports).

``PROTOCOLS`` maps a listener's ``protocol`` to its machine, its capability
probe, and the capabilities to advertise while no probe has succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols._base import CapabilityProbe, ProxyMachine
from protocols.imap import IMAPCapabilityProbe, IMAPMachine
from protocols.pop3 import POP3CapabilityProbe, POP3Machine
from protocols.smtp import SMTPCapabilityProbe, SMTPMachine


@dataclass(frozen=True)
class ProtocolSpec:
    machine: type[ProxyMachine]
    probe: type[CapabilityProbe]
    #: A conservative list that every current server supports.
    fallback_capabilities: tuple[str, ...]


PROTOCOLS: dict[str, ProtocolSpec] = {
    "smtp": ProtocolSpec(
        machine=SMTPMachine,
        probe=SMTPCapabilityProbe,
        fallback_capabilities=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"),
    ),
    "imap": ProtocolSpec(
        machine=IMAPMachine,
        probe=IMAPCapabilityProbe,
        fallback_capabilities=("IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"),
    ),
    "pop3": ProtocolSpec(
        machine=POP3Machine,
        probe=POP3CapabilityProbe,
        fallback_capabilities=(
            "TOP",
            "UIDL",
            "USER",
            "PIPELINING",
            "RESP-CODES",
            "AUTH-RESP-CODE",
        ),
    ),
}

__all__ = ["PROTOCOLS", "ProtocolSpec"]
