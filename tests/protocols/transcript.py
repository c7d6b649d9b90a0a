"""Transcripts: protocol machine tests that read top to bottom.

``run(machine, ...)`` takes events (what happens on the wire) and the exact
commands expected after each, in order, so every test reads top to bottom
like a conversation. ``play`` feeds events with their bytes cut at given
offsets and returns what came out, for the tests where only the bytes matter
and not how they were cut into commands (split invariance above all).
``bytewise`` and ``drawn_cuts`` give the cuts, ``feed`` and
``check_pre_tls_bytes`` serve the fuzz tests, ``check_probe_error`` the
probes' failures, and ``check_transition`` and
``reachable`` test a machine's transitions table.

The dialogues of the four protocols are in ``dialogues``.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hypothesis import strategies as st

from protocols._base import (
    CapabilityProbe,
    CloseConnection,
    Command,
    InputT,
    LocalProtocolError,
    OpenBackend,
    PeerCertificate,
    ProxyMachine,
    SendToBackend,
    SendToClient,
    SessionSettings,
    Side,
    StartTLS,
    StateT,
    TLSInfo,
    TLSMode,
    transition,
)

HOST = "proxy.example"


def make_settings(capabilities: tuple[str, ...], /, **overrides: object) -> SessionSettings:
    """Settings of a STARTTLS listener named ``HOST`` that requires TLS, with
    ``capabilities`` unless ``overrides`` has others."""
    base = SessionSettings(
        hostname=HOST, tls_mode=TLSMode.STARTTLS, require_tls=True, capabilities=capabilities
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


class Event(abc.ABC):
    """Something the driver reports to the machine."""

    @abc.abstractmethod
    def apply(self, machine: ProxyMachine[Any, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Client(Event):
    data: bytes

    def apply(self, machine: ProxyMachine[Any, Any]) -> None:
        machine.receive_data(Side.CLIENT, self.data)


@dataclasses.dataclass(frozen=True)
class Backend(Event):
    data: bytes

    def apply(self, machine: ProxyMachine[Any, Any]) -> None:
        machine.receive_data(Side.BACKEND, self.data)


@dataclasses.dataclass(frozen=True)
class TLS(Event):
    #: The client's certificate, as the worker found it (xmpp-server peers).
    peer_certificate: PeerCertificate | None = None

    def apply(self, machine: ProxyMachine[Any, Any]) -> None:
        machine.tls_established(
            TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", peer_certificate=self.peer_certificate)
        )


@dataclasses.dataclass(frozen=True)
class Connected(Event):
    def apply(self, machine: ProxyMachine[Any, Any]) -> None:
        machine.backend_connected()


@dataclasses.dataclass(frozen=True)
class Failed(Event):
    reason: str

    def apply(self, machine: ProxyMachine[Any, Any]) -> None:
        machine.backend_failed(self.reason)


@dataclasses.dataclass(frozen=True)
class EOF(Event):
    side: Side

    def apply(self, machine: ProxyMachine[Any, Any]) -> None:
        machine.receive_eof(self.side)


@dataclasses.dataclass(frozen=True)
class Timeout(Event):
    reason: str = "idle timeout"

    def apply(self, machine: ProxyMachine[Any, Any]) -> None:
        machine.timed_out(self.reason)


@dataclasses.dataclass(frozen=True)
class ShuttingDown(Event):
    def apply(self, machine: ProxyMachine[Any, Any]) -> None:
        machine.shutting_down()


def drain(machine: ProxyMachine[Any, Any]) -> list[Command]:
    commands = []
    while (command := machine.next_command()) is not None:
        commands.append(command)
    return commands


def run(machine: ProxyMachine[Any, Any], *steps: Event | Command) -> None:
    """Apply events; each command step must be the next command queued."""
    for index, step in enumerate(steps):
        if isinstance(step, Event):
            assert drain(machine) == [], f"unexpected commands before step {index}: {step}"
            step.apply(machine)
        else:
            assert machine.next_command() == step, f"step {index}"
    assert drain(machine) == [], "unexpected commands at the end"


def exchange(command: bytes, reply: bytes) -> tuple[Event | Command, ...]:
    """Transcript steps: the client's ``command`` relayed to the backend, and
    the backend's ``reply`` relayed back, both unchanged."""
    return (Client(command), SendToBackend(command), Backend(reply), SendToClient(reply))


def backend_bytes(commands: Sequence[Command]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, SendToBackend))


def client_bytes(commands: Sequence[Command]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, SendToClient))


def feed(machine: ProxyMachine[Any, Any], side: Side, chunks: Iterable[bytes]) -> None:
    """Feed ``chunks`` from ``side``, draining what they make the machine do."""
    for chunk in chunks:
        machine.receive_data(side, chunk)
        drain(machine)


def check_pre_tls_bytes(
    machine: ProxyMachine[Any, Any], chunks: Iterable[bytes], *, require_tls: bool
) -> None:
    """Feed client ``chunks`` to a machine before TLS: whatever they hold, it
    sends the backend nothing, and with ``require_tls`` opens none."""
    for chunk in chunks:
        machine.receive_data(Side.CLIENT, chunk)
        for command in drain(machine):
            assert isinstance(command, SendToClient | StartTLS | OpenBackend | CloseConnection)
            assert not (require_tls and isinstance(command, OpenBackend))


def check_probe_error(probe: CapabilityProbe, received: Iterable[bytes], error: str) -> None:
    """Feed ``received`` to ``probe``: it reports ``error`` and no result."""
    for data in received:
        probe.receive_data(data)
    assert probe.error == error
    assert probe.result is None


def length(event: Event) -> int:
    """How many octets a data event carries (where it can be cut)."""
    return len(event.data) if isinstance(event, Client | Backend) else 0


def play(
    machine: ProxyMachine[Any, Any],
    events: Sequence[Event],
    cuts: Sequence[Sequence[int]] | None = None,
) -> tuple[bytes, bytes, list[Command]]:
    """Feed ``events``, each data event cut at its ``cuts``: the bytes sent to
    the client, to the backend, and the other commands."""
    commands: list[Command] = []
    for event, offsets in zip(events, cuts or [[] for _ in events], strict=True):
        if isinstance(event, Client | Backend):
            bounds = [0, *sorted(offsets), len(event.data)]
            for start, end in itertools.pairwise(bounds):
                type(event)(event.data[start:end]).apply(machine)
                commands += drain(machine)
        else:
            event.apply(machine)
            commands += drain(machine)
    others: list[Command] = [c for c in commands if not isinstance(c, SendToClient | SendToBackend)]
    return client_bytes(commands), backend_bytes(commands), others


def bytewise(events: Sequence[Event]) -> list[list[int]]:
    """Cuts that feed every data event one octet at a time."""
    return [list(range(1, length(event))) for event in events]


def drawn_cuts(data: st.DataObject, events: Sequence[Event]) -> list[list[int]]:
    """Cuts drawn by hypothesis: up to six anywhere in each data event."""
    return [
        data.draw(st.lists(st.integers(0, length(event)), max_size=6), label=repr(event)[:40])
        for event in events
    ]


def check_transition(
    table: Mapping[tuple[StateT, InputT], StateT],
    state: StateT,
    input_: InputT,
    endings: Mapping[InputT, StateT],
) -> StateT | None:
    """Check one cell of ``table``; ``endings`` maps each input that ends a
    session (close, violation) to its final state, which it must reach from
    every other state and the other inputs never reach. The target state, or
    ``None`` for a missing entry."""
    try:
        target = transition(table, state, input_)
    except LocalProtocolError:
        assert (state, input_) not in table
        assert state in endings.values() or input_ not in endings
        return None
    assert isinstance(target, type(state))
    assert state not in endings.values()
    if input_ in endings:
        assert target is endings[input_]
    else:
        assert target not in endings.values()
    return target


def reachable(
    table: Mapping[tuple[StateT, InputT], StateT], start: Iterable[StateT]
) -> set[StateT]:
    """Every state ``table`` leads to from the states in ``start``."""
    reached = set(start)
    while more := {target for (source, _), target in table.items() if source in reached} - reached:
        reached |= more
    return reached
