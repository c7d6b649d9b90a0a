"""The transports' side of a session: each callback of a socket goes to the
``Session`` that owns it (``session.py``).

``Endpoint`` is one socket (the client's before TLS, the backend's);
``ChannelEndpoint`` is a TLS worker's plaintext channel, whose first bytes
are the worker's handshake report (checked by ``wire.read_report`` before
anything of it is used).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from protocols._base import Side
from starttls_proxy.wire import MAX_REPORT_SIZE, REPORT_HEADER, read_report

if TYPE_CHECKING:
    from starttls_proxy.proxy.session import Session

#: How long a closing client connection waits for the client's FIN.
LINGER_TIMEOUT = 2.0


class Endpoint(asyncio.Protocol):
    """Forwards one transport's callbacks to its session."""

    def __init__(self, session: Session | None, side: Side) -> None:
        #: ``None`` only for a client connection refused before its session.
        self.session = session
        self.side = side
        self.transport: asyncio.Transport | None = None
        #: While not ``None``, received bytes are kept here instead of going
        #: to the session: a backend's greeting until the machine knows the
        #: backend is connected; a client's first TLS bytes read between
        #: the upgrade and the handoff (they travel to the worker). Holding
        #: beats pause_reading(), which uvloop ignores inside connection_made.
        self.held: bytearray | None = bytearray() if side is Side.BACKEND else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.held is not None:
            self.held += data
        elif self.session is not None:
            self.session.data_received(self.side, data)

    def close_lingering(self) -> None:
        """Send what is queued and a FIN, then wait a little for the peer's.

        Closing a socket that still has unread input sends a RST, and a RST
        can destroy the final reply before the client reads it.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_TIMEOUT, transport.close)

    def release(self) -> None:
        """Deliver what was held and stop holding."""
        held, self.held = self.held, None
        if held and self.session is not None:
            self.session.data_received(self.side, bytes(held))

    def eof_received(self) -> bool:
        if self.session is not None:
            self.session.connection_lost(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.connection_lost(self)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.set_write_paused(self.side, True)

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.set_write_paused(self.side, False)


class ChannelEndpoint(Endpoint):
    """The worker's plaintext channel: a report frame, then the decrypted
    bytes of ``side`` (the client's, or an outgoing stream's remote server's)."""

    def __init__(
        self, session: Session, side: Side, *, alpn: tuple[str, ...], peer: bool = False
    ) -> None:
        """``alpn``: the protocols the worker could agree on; ``peer``: it
        was asked to verify the peer's certificate."""
        super().__init__(session, side)
        self.held = None
        self._report: bytearray | None = bytearray()
        self._alpn = alpn
        self._peer = peer

    def data_received(self, data: bytes) -> None:
        assert self.session is not None
        if self._report is None:
            self.session.data_received(self.side, data)
            return
        self._report += data
        if len(self._report) < REPORT_HEADER.size:
            return
        (size,) = REPORT_HEADER.unpack_from(self._report)
        if size > MAX_REPORT_SIZE:
            self.session.close("malformed report from the TLS worker")
            return
        end = REPORT_HEADER.size + size
        if len(self._report) < end:
            return
        report, rest = bytes(self._report[REPORT_HEADER.size : end]), bytes(self._report[end:])
        self._report = None
        try:
            outcome = read_report(report, self._alpn, peer=self._peer)
        except ValueError as error:
            self.session.close(f"malformed report from the TLS worker: {error}")
            return
        self.session.tls_report(outcome, self)
        if rest:
            self.session.data_received(self.side, rest)
