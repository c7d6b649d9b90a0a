"""The transitions table of every protocol machine, cell by cell, and the
states it reaches from where sessions start."""

from __future__ import annotations

from enum import Enum
from typing import Any

import pytest

from protocols._base import ProxyMachine
from protocols.imap import IMAPMachine
from protocols.pop3 import POP3Machine
from protocols.smtp import SMTPMachine
from protocols.xmpp import XMPPClientMachine
from tests.protocols.transcript import check_transition, reachable

Machine = type[ProxyMachine[Any, Any]]

#: Each protocol's machine, and the state its sessions start in on a STARTTLS
#: listener; on an implicit-TLS listener they start in TLS_HANDSHAKE.
FIRST_STATES: dict[Machine, str] = {
    SMTPMachine: "PRE_TLS",
    POP3Machine: "PRE_TLS",
    IMAPMachine: "PRE_TLS",
    XMPPClientMachine: "PRE_TLS_HEADER",
}
every_machine = pytest.mark.parametrize(
    "machine", FIRST_STATES, ids=["smtp", "pop3", "imap", "xmpp"]
)


@every_machine
def test_transitions_table(machine: Machine) -> None:
    states, inputs = _enums(machine)
    endings = {inputs["CLOSE"]: states["CLOSED"], inputs["VIOLATION"]: states["ERROR"]}
    for state in states:
        for input_ in inputs:
            check_transition(machine.transitions, state, input_, endings)


@every_machine
def test_every_state_is_reachable_and_every_input_used(machine: Machine) -> None:
    states, inputs = _enums(machine)
    starts = [states[FIRST_STATES[machine]], states["TLS_HANDSHAKE"]]
    assert reachable(machine.transitions, starts) == set(states)
    assert {input_ for _, input_ in machine.transitions} == set(inputs)


def _enums(machine: Machine) -> tuple[type[Enum], type[Enum]]:
    """The machine's ``State`` and ``Input`` enums."""
    return machine.states, machine.inputs


def test_a_machine_without_a_shared_state_is_refused_when_its_class_is_made() -> None:
    """The shared code finds PRE_TLS, RELAY, CLOSED... by name: a machine
    whose enum lacks one fails at import, not in the middle of a session."""

    class Broken(Enum):
        PRE_TLS = 1
        CLOSED = 2

    with pytest.raises(TypeError, match="lacks BACKEND_CONNECTING, BACKEND_GREETING, ERROR"):

        class Machine(SMTPMachine):
            states = Broken  # type: ignore[assignment]
