"""Sans-I/O protocol machines, one module per protocol (no socket or asyncio imports).

``PROTOCOLS`` maps a listener's ``protocol`` to its machine, its capability
probe, and the capabilities to advertise while no probe has succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols._base import CapabilityProbe, ProxyMachine
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
}

__all__ = ["PROTOCOLS", "ProtocolSpec"]
