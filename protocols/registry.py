"""Which machine serves which listener ``protocol``.

``PROTOCOLS`` maps a listener's ``protocol`` to its machine, its capability
probe and its facts (``facts``: limits, defaults, what to advertise while no
probe has succeeded). Kept
out of the package's ``__init__`` so that importing one protocol module (the
TLS helper needs ``_base`` alone) does not import them all, lxml included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocols._base import CapabilityProbe, ProxyMachine
from protocols.facts import FACTS, ProtocolFacts
from protocols.imap import IMAPCapabilityProbe, IMAPMachine
from protocols.pop3 import POP3CapabilityProbe, POP3Machine
from protocols.smtp import SMTPCapabilityProbe, SMTPMachine
from protocols.xmpp import (
    XMPPClientMachine,
    XMPPClientProbe,
    XMPPServerMachine,
    XMPPServerProbe,
)
from protocols.xmpp_out import XMPPOutgoingMachine


@dataclass(frozen=True)
class ProtocolSpec:
    machine: type[ProxyMachine[Any, Any]]
    probe: type[CapabilityProbe]
    facts: ProtocolFacts


_MACHINES: dict[str, tuple[type[ProxyMachine[Any, Any]], type[CapabilityProbe]]] = {
    "smtp": (SMTPMachine, SMTPCapabilityProbe),
    "imap": (IMAPMachine, IMAPCapabilityProbe),
    "pop3": (POP3Machine, POP3CapabilityProbe),
    "xmpp-client": (XMPPClientMachine, XMPPClientProbe),
    "xmpp-server": (XMPPServerMachine, XMPPServerProbe),
    # Never probed: an outgoing listener has no backend to ask.
    "xmpp-server-out": (XMPPOutgoingMachine, XMPPServerProbe),
}
PROTOCOLS: dict[str, ProtocolSpec] = {
    name: ProtocolSpec(machine, probe, FACTS[name]) for name, (machine, probe) in _MACHINES.items()
}
