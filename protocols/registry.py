"""Which machine serves which listener ``protocol``.

``PROTOCOLS`` maps a listener's ``protocol`` to its machine, its capability
probe, and the capabilities to advertise while no probe has succeeded. Kept
out of the package's ``__init__`` so that importing one protocol module (the
TLS helper needs ``_base`` alone) does not import them all, lxml included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocols._base import CapabilityProbe, ProxyMachine
from protocols.imap import IMAPCapabilityProbe, IMAPMachine
from protocols.pop3 import POP3CapabilityProbe, POP3Machine
from protocols.smtp import SMTPCapabilityProbe, SMTPMachine
from protocols.xmpp import (
    XMPPClientMachine,
    XMPPClientProbe,
    XMPPServerMachine,
    XMPPServerProbe,
)


@dataclass(frozen=True)
class ProtocolSpec:
    machine: type[ProxyMachine[Any, Any]]
    probe: type[CapabilityProbe]
    #: A conservative list that every current server supports.
    fallback_capabilities: tuple[str, ...]
    #: The probed capabilities only matter to sessions that may stay in
    #: plaintext (XMPP synthesizes its pre-TLS features): with require_tls
    #: the backend is not probed at all.
    probe_only_for_plaintext: bool = False


PROTOCOLS: dict[str, ProtocolSpec] = {
    "smtp": ProtocolSpec(
        machine=SMTPMachine,
        probe=SMTPCapabilityProbe,
        fallback_capabilities=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"),
    ),
    # LITERAL+ holds whatever the backend offers (the machine sends every
    # literal on as synchronizing) and ID is answered by the proxy.
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
    # The proxy's pre-TLS features need nothing from the backend; its probed
    # features are only shown to plaintext sessions.
    "xmpp-client": ProtocolSpec(
        machine=XMPPClientMachine,
        probe=XMPPClientProbe,
        fallback_capabilities=(),
        probe_only_for_plaintext=True,
    ),
    "xmpp-server": ProtocolSpec(
        machine=XMPPServerMachine,
        probe=XMPPServerProbe,
        fallback_capabilities=(),
        probe_only_for_plaintext=True,
    ),
}
