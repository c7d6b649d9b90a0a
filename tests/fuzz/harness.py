"""What every fuzz target shares: the input format, a model of the driver,
and the invariant checked after every event.

An input is a *program*: one octet of settings flags, then steps. A step is
one octet naming a driver event (any octet is one: it is taken modulo the
number of events), and for data events a two-octet length and that many
octets (fewer if the input ends first). For the end of the handshake, what
the octet holds beyond the event (its quotient by the number of events)
picks the certificate the peer presented among ``PEER_CERTIFICATES``
(modulo their number): the event's own number, as in every program written
before there was a choice, picks the first. For a connected route (an
outgoing stream's), an odd quotient says that TLS starts at once there. Programs are what the seed
corpus holds, written from the real dialogues of ``tests.protocols.dialogues``,
so that mutations start from deep states (relay, DATA, literals, SASL, XMPP
features, peer certificates) instead of having to find their way there.

The driver model delivers an event only where ``starttls_proxy.proxy.session``
could: the handshake's end after a ``StartTLS``, the backend's news after an
``OpenBackend``, backend bytes once it is connected, client bytes while the
machine holds less than ``HOLD_LIMIT`` of them. One settings flag turns the
model off: a driver that misuses the machine must get a defined ending too,
and may get a ``LocalProtocolError`` besides.

The invariant is h11's: every input gives commands or a defined ending
(``CloseConnection``), no exception escapes but a ``LocalProtocolError``
from a driver's misuse, and the bytes a machine holds stay within its
configured limits plus one read. A machine whose backend side goes to TLS
(an outgoing stream) also keeps both sides apart until the handshake: the
remote gets only the proxy's own stream header and ``<starttls/>``, the
local server only a stream error.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from protocols._base import (
    CloseConnection,
    Command,
    LocalProtocolError,
    OpenBackend,
    PeerCertificate,
    PeerChecked,
    ProxyMachine,
    SendToBackend,
    SendToClient,
    SessionSettings,
    Side,
    StartTLS,
    TLSInfo,
    TLSMode,
)


class Op(enum.IntEnum):
    """The driver's events, as a program's step octet names them."""

    CLIENT = 0
    BACKEND = 1
    TLS = 2
    CONNECTED = 3
    FAILED = 4
    CLIENT_EOF = 5
    BACKEND_EOF = 6
    TIMEOUT = 7
    SHUTDOWN = 8


DATA_OPS = (Op.CLIENT, Op.BACKEND)
#: What the peers do; the other events are the driver's.
NETWORK_OPS = (*DATA_OPS, Op.CLIENT_EOF, Op.BACKEND_EOF)
Step = tuple[Op, bytes]


class Flag(enum.IntFlag):
    """The settings octet."""

    REQUIRE_TLS = 1
    IMPLICIT_TLS = 2
    #: Deliver every event, whether a real driver could or not.
    MISUSE = 4
    #: Bits 3..5 pick the backend identity among the protocol's.
    IDENTITY_SHIFT = 8
    #: SMTP: relay bare CR/LF in DATA; XMPP: serve only the dialogue's domain.
    VARIANT = 64


IDENTITY_BITS = 3

#: The driver stops reading the client while the machine holds this many of
#: its bytes (``starttls_proxy.proxy.session.HOLD_LIMIT``, scaled down with the
#: limits below so that fuzz inputs can cross it).
HOLD_LIMIT = 512

#: Small limits, so that short inputs reach them.
LIMITS: dict[str, int] = {
    "max_line_length": 96,
    "max_reply_line_length": 256,
    "max_literal_size": 64,
    "max_stanza_size": 1024,
    "max_xml_depth": 8,
    "max_attribute_size": 128,
}

#: Bytes a machine may hold besides the limits and one read: its own replies
#: waiting for a backend response, tags in flight, state words.
SLACK = 1024


def encode(settings: int, steps: Sequence[Step]) -> bytes:
    """The program that ``decode`` reads back as ``settings`` and ``steps``.
    A TLS step's data is the number of the peer's certificate, one octet
    (none: the first)."""
    out = bytearray([settings])
    for op, data in steps:
        if op in (Op.TLS, Op.CONNECTED) and data:
            out.append(op + len(Op) * data[0])
        else:
            out.append(op)
        if op in DATA_OPS:
            out += len(data).to_bytes(2, "big") + data
    return bytes(out)


def decode(program: bytes) -> tuple[int, list[Step]]:
    if not program:
        return 0, []
    steps: list[Step] = []
    at = 1
    while at < len(program):
        octet = program[at]
        op = Op(octet % len(Op))
        at += 1
        data = b""
        certificate = octet // len(Op) % len(PEER_CERTIFICATES)
        if op is Op.TLS and certificate:
            data = bytes([certificate])
        if op is Op.CONNECTED and octet // len(Op) % 2:
            data = b"\x01"
        if op in DATA_OPS:
            length = int.from_bytes(program[at : at + 2], "big")
            data = program[at + 2 : at + 2 + length]
            at += 2 + length
        steps.append((op, data))
    return program[0], steps


class InvariantBrokenError(AssertionError):
    """A machine broke the fuzzers' invariant (a crash for libFuzzer)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantBrokenError(message)


# --------------------------------------------------------------------------
# Bytes held.

#: What a walk of a machine's objects does not count: what the configuration
#: and the driver own, and code.
_OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    enum.Enum,
    SessionSettings,
    int,
    float,
    bool,
    type(None),
)


def held_bytes(root: object) -> int:
    """Octets of the bytes and strings reachable from ``root``'s attributes:
    what a machine holds. lxml's own buffers are out of sight, the tokens
    and trees it hands out are not."""
    total = 0
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, _OPAQUE):
            continue
        seen.add(id(item))
        if isinstance(item, bytes | bytearray | str):
            total += len(item)
        elif isinstance(item, memoryview):
            total += item.nbytes
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | deque | set | frozenset):
            stack.extend(item)
        elif hasattr(item, "iter") and hasattr(item, "tag"):
            # An lxml element: its serialization is what it holds.
            total += _element_size(item)
        else:
            stack.extend(_attributes(item))
    return total


def _element_size(element: Any) -> int:
    from lxml import etree

    return len(etree.tostring(element))


def _attributes(item: object) -> Iterator[object]:
    yield from getattr(item, "__dict__", {}).values()
    for cls in type(item).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(item, name):
                yield getattr(item, name)


# --------------------------------------------------------------------------
# The driver model.

Machine = ProxyMachine[Any, Any]
#: What the peer presents at the end of the handshake, as a TLS step picks
#: it: xmpp-server machines judge it against the server dialogue's domain,
#: ``remote.example``; the others never look.
PEER_CERTIFICATES: tuple[PeerCertificate | None, ...] = (
    PeerCertificate(trusted=True, dns_names=("remote.example",)),
    None,
    PeerCertificate(
        trusted=False, problem="certificate has expired", dns_names=("remote.example",)
    ),
    PeerCertificate(trusted=True, dns_names=("other.example",)),
)


def tls_info(certificate: int) -> TLSInfo:
    """The handshake's outcome, with the peer's certificate number ``certificate``."""
    return TLSInfo(
        "TLSv1.3",
        "TLS_AES_128_GCM_SHA256",
        peer_certificate=PEER_CERTIFICATES[certificate % len(PEER_CERTIFICATES)],
    )


@dataclasses.dataclass
class Session:
    """One machine under the driver model, and what it has asked for."""

    machine: Machine
    faithful: bool
    settings: SessionSettings
    handshake_owed: bool = False
    backend_owed: bool = False
    backend_up: bool = False
    tls_done: bool = False
    client_gone: bool = False
    backend_gone: bool = False
    peer_checked: bool = False
    #: The backend asked for is a route (an outgoing stream's remote).
    routed: bool = False
    #: The side the last StartTLS gave a worker.
    tls_side: Side = Side.CLIENT
    closed: bool = False
    largest_read: int = 0
    baseline: int = 0
    #: Every command the machine gave, in order (for the corpus's tests).
    commands: list[Command] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.baseline = held_bytes(self.machine)
        self.drain("the constructor")

    @property
    def limit(self) -> int:
        """The most a machine may hold: what it held at the start, the driver's
        hold limit, the largest configured limit, one read, and ``SLACK``."""
        largest: int = max(
            getattr(self.settings, name) for name in LIMITS if name != "max_xml_depth"
        )
        return self.baseline + HOLD_LIMIT + largest + self.largest_read + SLACK

    def step(self, op: Op, data: bytes) -> None:
        machine = self.machine
        if self.faithful and not self._possible(op):
            return
        try:
            self._deliver(op, data)
        except LocalProtocolError as error:
            # The driver's misuse; never the network's doing.
            check(
                not self.faithful and op not in NETWORK_OPS,
                f"{op.name} raised LocalProtocolError: {error}",
            )
            check(machine.finished, f"{op.name} raised LocalProtocolError but the session goes on")
        self.drain(op.name)
        held = held_bytes(machine)
        check(held <= self.limit, f"holds {held} bytes after {op.name}, limit {self.limit}")

    def _deliver(self, op: Op, data: bytes) -> None:
        machine = self.machine
        if op is Op.CLIENT:
            self.largest_read = max(self.largest_read, len(data))
            machine.receive_data(Side.CLIENT, data)
        elif op is Op.BACKEND:
            self.largest_read = max(self.largest_read, len(data))
            machine.receive_data(Side.BACKEND, data)
        elif op is Op.TLS:
            self.handshake_owed, self.tls_done = False, True
            machine.tls_established(tls_info(data[0] if data else 0))
        elif op is Op.CONNECTED:
            self.backend_owed, self.backend_up = False, True
            if self.routed:
                machine.route_connected(bool(data))
            else:
                machine.backend_connected()
        elif op is Op.FAILED:
            self.backend_owed = False
            machine.backend_failed("connection refused")
        elif op is Op.CLIENT_EOF:
            self.client_gone = True
            machine.receive_eof(Side.CLIENT)
        elif op is Op.BACKEND_EOF:
            self.backend_gone = True
            machine.receive_eof(Side.BACKEND)
        elif op is Op.TIMEOUT:
            machine.timed_out("idle timeout")
        else:
            machine.shutting_down()

    def _possible(self, op: Op) -> bool:
        if self.closed:
            return False
        if op is Op.CLIENT:
            return not self.client_gone and self.machine.unprocessed_client_bytes < HOLD_LIMIT
        if op is Op.BACKEND:
            # A backend with a worker says nothing until its handshake ends.
            with_worker = self.tls_side is Side.BACKEND and self.handshake_owed
            return self.backend_up and not self.backend_gone and not with_worker
        if op is Op.TLS:
            return self.handshake_owed
        if op in (Op.CONNECTED, Op.FAILED):
            return self.backend_owed
        if op is Op.CLIENT_EOF:
            return not self.client_gone
        if op is Op.BACKEND_EOF:
            return self.backend_up and not self.backend_gone
        return True

    def drain(self, after: str) -> None:
        while (command := self.machine.next_command()) is not None:
            self._command(command, after)
        check(
            self.machine.finished == self.closed,
            f"after {after}: finished={self.machine.finished} but closed={self.closed}",
        )

    def _command(self, command: Command, after: str) -> None:
        check(not self.closed, f"{command!r} after CloseConnection ({after})")
        self.commands.append(command)
        if isinstance(command, SendToClient | SendToBackend):
            check(type(command.data) is bytes, f"{command!r}: data is not bytes")
        if isinstance(command, CloseConnection):
            self.closed = True
            check(isinstance(command.reason, str), "reason is not a string")
            return
        if not self.faithful:
            return
        outgoing = self.machine.tls_side is Side.BACKEND
        if isinstance(command, SendToBackend):
            check(self.backend_up, f"bytes for a backend not connected ({after})")
            check(not self.backend_gone, f"bytes for a backend that closed ({after})")
            check(
                not outgoing or self.tls_done or _proxy_own_pre_tls(command.data),
                f"the local stream reached the remote before TLS ({after})",
            )
        elif isinstance(command, SendToClient):
            check(
                not outgoing or self.tls_done or b"<stream:error" in command.data,
                f"the remote's stream reached the local server before TLS ({after})",
            )
        elif isinstance(command, OpenBackend):
            check(not (self.backend_owed or self.backend_up), f"second OpenBackend ({after})")
            self.routed = command.route is not None
            check(
                self.tls_done
                or self.routed
                or not self.settings.require_tls
                or self.settings.tls_mode is TLSMode.IMPLICIT,
                f"OpenBackend before TLS on a listener that requires it ({after})",
            )
            self.backend_owed = True
        elif isinstance(command, PeerChecked):
            check(self.tls_done and not self.peer_checked, f"PeerChecked out of turn ({after})")
            check(
                self.tls_side is Side.BACKEND or not (self.backend_owed or self.backend_up),
                f"PeerChecked after OpenBackend ({after})",
            )
            self.peer_checked = True
        elif isinstance(command, StartTLS):
            check(not (self.handshake_owed or self.tls_done), f"second StartTLS ({after})")
            check(
                command.side is Side.CLIENT or self.backend_up,
                f"StartTLS for a backend not connected ({after})",
            )
            self.handshake_owed, self.tls_side = True, command.side
        else:
            check(isinstance(command, SendToClient), f"unknown command {command!r}")


_STARTTLS_ELEMENT = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


def _proxy_own_pre_tls(data: bytes) -> bool:
    """Whether ``data`` is what an outgoing stream may send the remote before
    TLS: the proxy's own stream header (``_xmlstream.stream_header``: the XML
    declaration, one start tag, attributes in double quotes) or ``<starttls/>``."""
    header = (
        data.startswith(b"<?xml version='1.0'?><stream:stream xmlns=\"jabber:server\" ")
        and data.count(b">") == 2
    )
    return header or data == _STARTTLS_ELEMENT


def run_program(program: bytes, make: Callable[[int], tuple[Machine, SessionSettings]]) -> Session:
    """Play ``program`` against the machine ``make`` builds from its settings
    octet; at its end the client leaves, and the session must be over."""
    flags, steps = decode(program)
    machine, settings = make(flags)
    session = Session(machine, faithful=not flags & Flag.MISUSE, settings=settings)
    for op, data in steps:
        session.step(op, data)
    if not session.client_gone:
        session.step(Op.CLIENT_EOF, b"")
    check(session.closed, "the client left and the session did not end")
    return session
