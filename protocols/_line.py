"""Machines for the protocols of command lines: SMTP, POP3, IMAP.

``LineMachine`` holds what their sessions share around each protocol's own
dialogue; ``PipelinedMachine`` adds the reply order of the protocols whose
replies carry no tag. Each protocol module keeps its states, its transitions
table and its logic. ``LineProbe`` is the capability probe's line reader.
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

from protocols._base import (
    CapabilityProbe,
    InputT,
    OpenBackend,
    Peer,
    ProxyMachine,
    RemoteProtocolError,
    SessionSettings,
    SharedInputs,
    SharedStates,
    Side,
    StartTLS,
    StateT,
    TLSInfo,
    TLSMode,
    event,
)
from protocols._buffers import LineBuffer, LineTooLong


@dataclass(frozen=True)
class LineStates(SharedStates[StateT]):
    """The states of the steps ``LineMachine`` takes for every protocol."""

    #: The proxy answers the client itself; no backend yet.
    pre_tls: StateT
    #: ``OpenBackend`` queued, waiting for ``backend_connected``.
    backend_connecting: StateT
    #: Waiting for the backend's greeting.
    backend_greeting: StateT
    #: Client commands go to the backend, replies come back.
    relay: StateT


@dataclass(frozen=True)
class LineInputs(SharedInputs[InputT]):
    """The inputs of the steps ``LineMachine`` takes for every protocol."""

    #: The client issued an acceptable upgrade command.
    client_starttls: InputT
    #: Without ``require_tls``, a command needs the backend.
    plaintext_relay: InputT
    #: The TLS worker finished the handshake.
    tls_established: InputT
    #: The driver connected the backend.
    backend_connected: InputT
    #: The backend is ready for the client's commands.
    backend_ready: InputT


def opening_transitions(
    states: type[StateT], inputs: type[InputT]
) -> dict[tuple[StateT, InputT], StateT]:
    """The table entries for the steps ``LineMachine`` takes up to the
    backend's greeting: from PRE_TLS the upgrade or a plaintext relay, the
    backend opened once the handshake is done, then connected."""
    at, by = LineStates.of(states), LineInputs.of(inputs)
    return {
        (at.pre_tls, by.client_starttls): at.tls_handshake,
        (at.pre_tls, by.plaintext_relay): at.backend_connecting,
        (at.tls_handshake, by.tls_established): at.backend_connecting,
        (at.backend_connecting, by.backend_connected): at.backend_greeting,
    }


def clean_line(line: bytes) -> bool:
    """A line is cut at its first LF, so the only CR allowed is the last but
    one octet; anything else is a line end the backend may not see as we do."""
    return line.endswith(b"\r\n") and b"\r" not in line[:-2]


class LineMachine(ProxyMachine[StateT, InputT]):
    """A session of a protocol of CRLF-terminated command lines, around the
    protocol's own dialogue.

    It opens with the proxy's greeting on a STARTTLS listener, with the
    handshake on an implicit-TLS one. A TLS ClientHello as the client's first
    bytes gets ``early_tls_reply`` and the client's bytes during the handshake
    are dropped (``ProxyMachine.receive_data``); once the handshake ends, the
    backend is opened. In every other state ``_steps`` says how the client's
    bytes are read, and they wait in ``_client`` where it says nothing.

    A subclass sets ``states``, ``inputs``, ``transitions`` and its replies,
    and says what the backend's bytes and end mean. Its enums have the
    members of ``LineStates`` and ``LineInputs`` (checked when the subclass
    is made); its table starts from ``opening_transitions`` and
    ``ending_transitions``.
    """

    state_members = LineStates
    input_members = LineInputs
    shared_states: LineStates[StateT]
    shared_inputs: LineInputs[InputT]

    # The protocol's replies, ``%s`` standing for the proxy's hostname.
    #: The backend failed or misbehaved: the session cannot go on.
    unavailable_reply: ClassVar[bytes]
    #: The driver's idle timer fired.
    timeout_reply: ClassVar[bytes]
    #: The listener is at its connection limit.
    busy_reply_template: ClassVar[bytes]
    #: The proxy is stopping (``shutting_down``).
    shutdown_reply: ClassVar[bytes]
    #: The answer to a TLS ClientHello, without a hostname.
    early_tls_reply: ClassVar[bytes]
    #: The upgrade command's name, for logs.
    upgrade_command: ClassVar[str]

    def __init__(self, settings: SessionSettings, peer: Peer, *, greeting: bytes) -> None:
        super().__init__(settings, peer)
        self._host = settings.hostname.encode()
        self._unavailable = self.unavailable_reply % self._host
        self._client = LineBuffer(settings.max_line_length)
        self._tls = False
        #: While the backend's bytes of one read are interpreted, the
        #: client's wait (see ``_from_backend``); whether some are waiting.
        self._reading_backend = False
        self._client_waits = False
        #: How the client's bytes are read in each state.
        self._steps: Mapping[StateT, Callable[[], bool]] = {}
        if settings.tls_mode is TLSMode.STARTTLS:
            self.state = self.shared_states.pre_tls
            self._send_client(greeting)
        else:
            self.state = self.shared_states.tls_handshake
            self._outbox.push(StartTLS(b""))

    # ------------------------------------------------------------------
    # Inputs.

    def _from_backend(self, data: bytes) -> None:
        # A command goes to the backend only once everything the backend had
        # said by then is read: a reply that came before its command answers
        # nothing (response injection), and must not be taken for the answer
        # to a command relayed in the middle of this read.
        self._reading_backend = True
        try:
            self._backend_data(data)
        finally:
            self._reading_backend = False
        if self._client_waits and not self.finished:
            self._client_waits = False
            self._pump_client()

    def _from_client(self, data: bytes) -> None:
        self._client.feed(data)
        self._pump_client()

    def _refuse_early_tls(self) -> None:
        self._end(f"TLS ClientHello before {self.upgrade_command}", reply=self.early_tls_reply)

    @event
    def receive_eof(self, side: Side) -> None:
        if side is Side.CLIENT:
            self._end("client closed")
        else:
            self._backend_closed()

    @event
    def tls_established(self, info: TLSInfo) -> None:
        self._go(self.shared_inputs.tls_established)
        self._tls = True
        self._outbox.push(OpenBackend())

    @event
    def backend_connected(self) -> None:
        self._go(self.shared_inputs.backend_connected)

    @event
    def backend_failed(self, reason: str) -> None:
        self._end(reason, reply=self._unavailable)

    @event
    def timed_out(self, reason: str) -> None:
        self._end(reason, reply=self.timeout_reply % self._host)

    @event
    def shutting_down(self) -> None:
        # A goodbye inside a message or a literal would become part of it,
        # so there the connection just closes: a message on its way to the
        # backend is then never accepted (its end never came) and the client
        # sends it again later; one on its way to the client is fetched again.
        # Backend replies still owed do not hold the goodbye back: the session
        # is over anyway.
        reply = None if self._mid_transfer else self.shutdown_reply % self._host
        self._end("proxy shutting down", reply=reply)

    @property
    def client_mid_command(self) -> bool:
        return not self._mid_transfer and self._client.holds_partial_line()

    @property
    def unprocessed_client_bytes(self) -> int:
        return len(self._client)

    @classmethod
    def busy_reply(cls, hostname: str) -> bytes:
        return cls.busy_reply_template % hostname.encode()

    # ------------------------------------------------------------------
    # What ``event`` needs besides ``finished``.

    def violated(self, reason: str) -> None:
        self._end(reason, reply=self._unavailable, violation=True)

    # ------------------------------------------------------------------
    # What each protocol says.

    @abc.abstractmethod
    def _backend_data(self, data: bytes) -> None:
        """Bytes from the backend."""

    @abc.abstractmethod
    def _backend_closed(self) -> None:
        """The backend closed its side: end the session in the protocol's way."""

    @abc.abstractmethod
    def _answer(self, reply: bytes) -> None:
        """Send a reply of the proxy's own where it cannot cut into the
        backend's."""

    @property
    @abc.abstractmethod
    def _mid_transfer(self) -> bool:
        """A message or a literal is crossing the proxy."""

    # ------------------------------------------------------------------
    # Shared steps.

    def _pump_client(self) -> None:
        """Interpret held client bytes for as long as the state allows."""
        if self._reading_backend:
            self._client_waits = True
            return
        while (step := self._steps.get(self.state)) is not None and step():
            pass

    def _upgrade(self, reply: bytes) -> None:
        """Accept the upgrade command; what the client sent after it goes to
        the driver uninterpreted."""
        self._answer(reply)
        self._outbox.push(StartTLS(self._client.pop_all()))
        self._go(self.shared_inputs.client_starttls)

    def _start_plaintext_relay(self, line: bytes) -> None:
        """Open the backend for a command the proxy cannot answer; it and
        everything after it wait until the backend is ready to take them."""
        self._client.feed(line + self._client.pop_all())
        self._outbox.push(OpenBackend())
        self._go(self.shared_inputs.plaintext_relay)

    def _ready(self) -> None:
        """The backend takes the client's commands from now on."""
        self._go(self.shared_inputs.backend_ready)
        self._pump_client()


@dataclass
class Owed:
    """A backend reply the client is owed: the answer to ``verb``, then the
    proxy's own answers to the commands the client pipelined after it."""

    verb: bytes
    then: list[bytes] = field(default_factory=list, kw_only=True)


OwedT = TypeVar("OwedT", bound=Owed)


class PipelinedMachine(LineMachine[StateT, InputT], Generic[StateT, InputT, OwedT]):
    """A line machine whose replies carry no tag (SMTP, POP3): each answers
    the oldest command still unanswered (RFC 2920 section 3, RFC 2449
    section 6.6), so the proxy's own answers wait behind the backend replies
    owed before them.

    A subclass reads each command line in ``_command``.
    """

    #: The answer to a command line longer than ``max_line_length``.
    line_too_long_reply: ClassVar[bytes]

    def __init__(self, settings: SessionSettings, peer: Peer, *, greeting: bytes) -> None:
        super().__init__(settings, peer, greeting=greeting)
        #: Backend replies the client is owed, oldest first; the first may be
        #: under way.
        self._owed: deque[OwedT] = deque()

    @abc.abstractmethod
    def _command(self, line: bytes) -> None:
        """One command line from the client, CRLF included."""

    def _command_step(self) -> bool:
        line = self._client.pop_line()
        if line is None:
            return False
        if isinstance(line, LineTooLong):
            self._answer(self.line_too_long_reply)
        else:
            self._command(line)
        return True

    def _answer(self, reply: bytes) -> None:
        if self._owed:
            self._owed[-1].then.append(reply)
        else:
            self._send_client(reply)

    def _settle(self) -> OwedT | None:
        """The client has the whole reply at the head of the queue: end the
        session after QUIT, else send the answers held behind it. The reply's
        ``Owed``, or ``None`` once the session has ended."""
        owed = self._owed.popleft()
        if owed.verb == b"QUIT":
            self._end("client quit", clean=True)
            return None
        for answer in owed.then:
            self._send_client(answer)
        return owed

    def _backend_closed(self) -> None:
        if self.state is self.shared_states.relay and not self._owed:
            self._end("backend closed")
        else:
            self._end("backend closed", reply=self._unavailable)


class LineProbe(CapabilityProbe):
    """A probe whose backend answers in lines, each read by ``_line``, which
    raises ``RemoteProtocolError`` or sets ``error`` when the dialogue fails."""

    def __init__(self, hostname: str) -> None:
        super().__init__(hostname)
        self._lines = LineBuffer(SessionSettings.max_reply_line_length)

    def receive_data(self, data: bytes) -> None:
        self._lines.feed(data)
        try:
            while self.result is None and self.error is None:
                line = self._lines.pop_line()
                if line is None:
                    return
                if isinstance(line, LineTooLong):
                    raise RemoteProtocolError("response line too long from backend")
                self._line(line)
        except RemoteProtocolError as violation:
            self.error = str(violation)

    @abc.abstractmethod
    def _line(self, line: bytes) -> None:
        """One line from the backend, CRLF included."""
