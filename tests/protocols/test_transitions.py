"""The transitions table of every protocol machine, cell by cell, and the
states it reaches from where sessions start."""

from __future__ import annotations

from enum import Enum
from typing import Any

import pytest

from protocols import imap, pop3, smtp, xmpp, xmpp_out
from protocols._base import ProxyMachine, SharedInputs, SharedStates
from protocols.imap import IMAPMachine
from protocols.pop3 import POP3Machine
from protocols.smtp import SMTPMachine
from protocols.xmpp import XMPPClientMachine
from protocols.xmpp_out import XMPPOutgoingMachine
from tests.protocols.dialogues import SMTP, XMPP
from tests.protocols.transcript import check_transition, reachable

Machine = type[ProxyMachine[Any, Any]]

#: Each protocol's machine, and the states its sessions start in: on a
#: STARTTLS listener, on an implicit-TLS one.
FIRST_STATES: dict[Machine, tuple[Enum, Enum]] = {
    SMTPMachine: (smtp.State.PRE_TLS, smtp.State.TLS_HANDSHAKE),
    POP3Machine: (pop3.State.PRE_TLS, pop3.State.TLS_HANDSHAKE),
    IMAPMachine: (imap.State.PRE_TLS, imap.State.TLS_HANDSHAKE),
    XMPPClientMachine: (xmpp.State.PRE_TLS_HEADER, xmpp.State.TLS_HANDSHAKE),
    # Outgoing streams always start in plaintext (the local server's).
    XMPPOutgoingMachine: (xmpp_out.State.LOCAL_HEADER, xmpp_out.State.LOCAL_HEADER),
}
every_machine = pytest.mark.parametrize(
    "machine", FIRST_STATES, ids=["smtp", "pop3", "imap", "xmpp", "xmpp-out"]
)


@every_machine
def test_transitions_table(machine: Machine) -> None:
    states, inputs = _enums(machine)
    end, by = SharedStates.of(states), SharedInputs.of(inputs)
    endings = {by.close: end.closed, by.violation: end.error}
    for state in states:
        for input_ in inputs:
            check_transition(machine.transitions, state, input_, endings)


@every_machine
def test_every_state_is_reachable_and_every_input_used(machine: Machine) -> None:
    states, inputs = _enums(machine)
    assert reachable(machine.transitions, FIRST_STATES[machine]) == set(states)
    assert {input_ for _, input_ in machine.transitions} == set(inputs)


def _enums(machine: Machine) -> tuple[type[Enum], type[Enum]]:
    """The machine's ``State`` and ``Input`` enums."""
    return machine.states, machine.inputs


class Broken(Enum):
    PRE_TLS = 1
    CLOSED = 2


def test_a_machine_without_a_shared_state_is_refused_when_its_class_is_made() -> None:
    """The shared code reads PRE_TLS, RELAY, CLOSED... from typed fields found
    by name once: a machine whose enum lacks one fails at import, not in the
    middle of a session."""
    lacks = "BACKEND_CONNECTING, BACKEND_GREETING, ERROR, RELAY, TLS_HANDSHAKE"
    with pytest.raises(TypeError, match=rf"^Machine: Broken lacks {lacks}$"):

        class Machine(SMTPMachine):
            states = Broken  # type: ignore[assignment]


def test_a_machine_without_a_shared_input_is_refused_when_its_class_is_made() -> None:
    lacks = "BACKEND_READY, CLOSE, VIOLATION"
    with pytest.raises(TypeError, match=rf"^Machine: Broken lacks {lacks}$"):

        class Machine(XMPPClientMachine):
            inputs = Broken  # type: ignore[assignment]


def test_the_shared_members_are_the_machines_own() -> None:
    machine = SMTP.new()
    assert machine.shared_states.relay is smtp.State.RELAY
    assert machine.shared_states.closed is smtp.State.CLOSED
    assert machine.shared_inputs.backend_ready is smtp.Input.BACKEND_READY
    assert XMPP.new().shared_states.error is xmpp.State.ERROR
