"""Who may open a session on a listener: its open sessions, counted whole
and per client address.

One client address may not take a listener's every slot: past
``max_connections_per_client`` (Postfix's smtpd_client_connection_count_limit)
it gets the protocol's busy reply while other clients are still served
(but for ``per_client_exceptions``), and ``max_connections`` bounds them
all. The counts live with the sessions, so a reload that keeps a listener
keeps counting its sessions.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starttls_proxy.config import Limits
    from starttls_proxy.connection import Session


class Refusal(enum.Enum):
    """Why a connection got the busy reply (a metric label)."""

    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_CLIENT = "max_connections_per_client"


class SessionTable:
    """A listener's open sessions, and how many each client address holds."""

    def __init__(self) -> None:
        self._sessions: set[Session] = set()
        self._per_client: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(self._sessions)

    def refusal(self, client_address: str, limits: Limits) -> Refusal | None:
        """Why a new session from ``client_address`` must be refused, if it must."""
        if len(self._sessions) >= limits.max_connections:
            return Refusal.MAX_CONNECTIONS
        held = self._per_client[client_address]
        if held >= limits.max_connections_per_client and limits.counts_per_client(client_address):
            return Refusal.MAX_CONNECTIONS_PER_CLIENT
        return None

    def add(self, session: Session) -> None:
        self._sessions.add(session)
        self._per_client[session.peer.client_address] += 1

    def discard(self, session: Session) -> None:
        if session not in self._sessions:
            return
        self._sessions.remove(session)
        address = session.peer.client_address
        self._per_client[address] -= 1
        if not self._per_client[address]:
            del self._per_client[address]
