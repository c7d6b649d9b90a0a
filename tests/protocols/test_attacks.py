"""Attacks, limits and failures that every protocol must withstand the same
way, as transcripts over the dialogues of ``tests.protocols.transcript``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols._base import (
    CloseConnection,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SendToBackend,
    Side,
    StartTLS,
    TLSMode,
)
from protocols._xmlstream import XMLStreamError
from protocols.proxy_header import ProxyHeaderError
from tests.protocols.dialogues import (
    DIALOGUES,
    IMAP,
    LINE_DIALOGUES,
    SHUTDOWN,
    SMTP,
    Dialogue,
    LineDialogue,
)
from tests.protocols.transcript import (
    EOF,
    TLS,
    Backend,
    Client,
    Connected,
    Failed,
    ShuttingDown,
    backend_bytes,
    check_pre_tls_bytes,
    client_bytes,
    drain,
    exchange,
    feed,
    run,
)

every_protocol = pytest.mark.parametrize("dialogue", DIALOGUES, ids=lambda d: d.name)
line_protocols = pytest.mark.parametrize("dialogue", LINE_DIALOGUES, ids=lambda d: d.name)

CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def _check_only_commands_after_tls_relayed(dialogue: Dialogue[Any], machine: Any) -> None:
    """The handshake ends, the backend greets: the first command relayed is
    one the client sent over TLS."""
    run(
        machine,
        TLS(),
        *dialogue.to_backend(),
        *dialogue.backend_greeted(),
        Client(dialogue.relayed),
        SendToBackend(dialogue.relayed),
    )


@every_protocol
def test_starttls_pipelined_command_injection(dialogue: Dialogue[Any]) -> None:
    """Commands behind STARTTLS in the same packet, or sent before the
    handshake is done, are plaintext an attacker could have injected: they
    are dropped, never run after the handshake."""
    machine = dialogue.new()
    run(
        machine,
        *dialogue.opening(),
        Client(dialogue.capability),
        *dialogue.capability_reply,
        *dialogue.started_tls(pipelined=dialogue.injected),
        Client(dialogue.injected),
    )
    assert machine.unprocessed_client_bytes == 0
    _check_only_commands_after_tls_relayed(dialogue, machine)


@every_protocol
def test_starttls_injection_across_packets_before_tls(dialogue: Dialogue[Any]) -> None:
    """Not even a ClientHello's first octet counts before the handshake's end."""
    machine = dialogue.new()
    run(
        machine,
        *dialogue.opening(),
        *dialogue.started_tls(),
        Client(CLIENT_HELLO_START),
        Client(dialogue.injected),
    )
    assert machine.unprocessed_client_bytes == 0
    _check_only_commands_after_tls_relayed(dialogue, machine)


@every_protocol
def test_tls_client_hello_as_the_first_bytes_is_refused(dialogue: Dialogue[Any]) -> None:
    """An implicit-TLS client on a STARTTLS port, for every protocol the same
    rule (``ProxyMachine.receive_data``), in each protocol's words."""
    for first_reads in [CLIENT_HELLO_START], [b"", CLIENT_HELLO_START[:1]]:
        machine = dialogue.new()
        drain(machine)  # the proxy's greeting, if it speaks first
        for data in first_reads[:-1]:
            run(machine, Client(data))
        run(machine, Client(first_reads[-1]), *dialogue.client_hello_refused)
        assert machine.state.name == "CLOSED"


@every_protocol
def test_a_handshake_octet_after_the_first_bytes_is_no_client_hello(
    dialogue: Dialogue[Any],
) -> None:
    after_first_bytes = dialogue.new()
    run(
        after_first_bytes,
        *dialogue.opening(),
        Client(dialogue.capability),
        *dialogue.capability_reply,
    )
    # Over TLS from the first byte, no byte is a plaintext ClientHello.
    implicit = dialogue.new(tls_mode=TLSMode.IMPLICIT)
    run(implicit, StartTLS(b""), TLS(), *dialogue.to_backend())
    for machine in after_first_bytes, implicit:
        machine.receive_data(Side.CLIENT, CLIENT_HELLO_START)
        assert not any(
            isinstance(command, CloseConnection) and command.reason.startswith("TLS ClientHello")
            for command in drain(machine)
        )


@line_protocols
def test_a_line_that_starts_with_the_handshake_octet_is_a_command(
    dialogue: LineDialogue[Any],
) -> None:
    machine = dialogue.new()
    run(machine, *dialogue.opening(), Client(dialogue.local), dialogue.local_reply)
    run(machine, Client(b"\x16\r\n"), dialogue.handshake_octet_line_reply)
    assert machine.state.name == "PRE_TLS"


@line_protocols
def test_overlong_command_line(dialogue: LineDialogue[Any]) -> None:
    """A line over the limit is refused, and what follows its end is read
    as commands again, before TLS and in the relay."""
    machine = dialogue.new(max_line_length=64)
    overlong = dialogue.local.removesuffix(b"\r\n") + b" " + b"x" * 100
    run(machine, *dialogue.opening(), Client(overlong), dialogue.line_too_long)
    run(machine, Client(b"x" * 100 + b"\r\n" + dialogue.local), dialogue.local_reply)
    machine = dialogue.relaying(max_line_length=64)
    overlong = dialogue.relayed.removesuffix(b"\r\n") + b" " + b"a" * 100 + b"\r\n"
    run(
        machine,
        Client(overlong + dialogue.starttls + dialogue.relayed),
        dialogue.line_too_long,
        dialogue.tls_active,
        SendToBackend(dialogue.relayed),
    )


@line_protocols
def test_second_starttls_refused(dialogue: LineDialogue[Any]) -> None:
    machine = dialogue.relaying()
    run(
        machine,
        Client(dialogue.starttls),
        dialogue.tls_active,
        Client(dialogue.starttls.lower() + dialogue.relayed),
        dialogue.tls_active,
        SendToBackend(dialogue.relayed),
    )
    assert machine.state.name == "RELAY"


@line_protocols
def test_shutdown_goodbye_before_tls_and_in_relay(dialogue: LineDialogue[Any]) -> None:
    goodbye = (dialogue.shutdown_goodbye, SHUTDOWN)
    run(dialogue.new(), *dialogue.opening(), ShuttingDown(), *goodbye)
    machine = dialogue.relaying()
    run(machine, ShuttingDown(), *goodbye)
    assert machine.state.name == "CLOSED"
    # Once closed, the machine ignores the proxy's end and the backend.
    run(machine, ShuttingDown(), Backend(dialogue.backend_greeting))


@line_protocols
def test_backend_unreachable(dialogue: LineDialogue[Any]) -> None:
    machine = dialogue.connecting()
    reason = "connection refused"
    run(machine, Failed(reason), dialogue.unavailable, CloseConnection(reason))
    assert machine.state.name == "CLOSED"


@line_protocols
def test_backend_refusing_the_session(dialogue: LineDialogue[Any]) -> None:
    machine = dialogue.connecting()
    reason = f"backend refused the session: {dialogue.refusal.decode().rstrip()}"
    run(
        machine,
        Connected(),
        Backend(dialogue.refusal),
        dialogue.unavailable,
        CloseConnection(reason),
    )
    assert machine.state.name == "ERROR"


def test_a_peer_s_errors_and_the_proxy_s_are_apart() -> None:
    """What the parsers raise on a peer's bytes is a remote error, which a
    machine turns into its ending; only a local one reaches the driver."""
    for remote in XMLStreamError, ProxyHeaderError:
        assert issubclass(remote, RemoteProtocolError)
    for kind in RemoteProtocolError, LocalProtocolError:
        assert issubclass(kind, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


@line_protocols
def test_driver_misuse_is_a_local_error(dialogue: LineDialogue[Any]) -> None:
    """A backend connection the machine never asked for is the proxy's bug,
    not a peer's: the session ends as after a violation, then the driver
    gets a ``LocalProtocolError`` to log."""
    machine = dialogue.new()
    run(machine, *dialogue.opening())
    message = "BACKEND_CONNECTED is not allowed in state PRE_TLS"
    with pytest.raises(LocalProtocolError, match=f"^{message}$"):
        machine.backend_connected()
    assert drain(machine) == [dialogue.unavailable, CloseConnection(f"internal error: {message}")]
    assert machine.state.name == "ERROR"
    # Once failed, the machine ignores all that comes, more misuse too.
    run(machine, TLS(), Connected(), Client(dialogue.local), EOF(Side.CLIENT), Failed("x"))


@line_protocols
def test_a_step_missing_from_the_table_is_a_local_error(dialogue: LineDialogue[Any]) -> None:
    """The machine's own code taking a step its table lacks is a bug too,
    even when client bytes led there."""
    machine = dialogue.new()
    table = machine.shared_states.pre_tls, machine.shared_inputs.client_starttls
    machine.transitions = {key: to for key, to in machine.transitions.items() if key != table}
    run(machine, *dialogue.opening())
    message = "CLIENT_STARTTLS is not allowed in state PRE_TLS"
    with pytest.raises(LocalProtocolError, match=f"^{message}$"):
        machine.receive_data(Side.CLIENT, dialogue.starttls)
    commands = drain(machine)
    assert commands[-2:] == [dialogue.unavailable, CloseConnection(f"internal error: {message}")]
    assert machine.state.name == "ERROR"


@line_protocols
def test_a_backend_speaking_out_of_turn_is_a_remote_error(dialogue: LineDialogue[Any]) -> None:
    """Bytes from a backend that is not there yet: the peer's fault, which
    ends the session and never raises."""
    machine = dialogue.new()
    reason = f"backend {dialogue.answer} in state PRE_TLS"
    run(
        machine,
        *dialogue.opening(),
        Backend(dialogue.backend_greeting),
        dialogue.unavailable,
        CloseConnection(reason),
    )
    assert machine.state.name == "ERROR"


def _fuzz_chunks(dialogue: Dialogue[Any]) -> st.SearchStrategy[list[bytes]]:
    """Up to eight chunks of random octets or runs of the protocol's words."""
    words = st.lists(st.sampled_from(dialogue.words)).map(b"".join)
    return st.lists(st.binary(max_size=300) | words, max_size=8)


@every_protocol
@given(data=st.data(), require_tls=st.booleans())
def test_fuzz_pre_tls_client_bytes(
    dialogue: Dialogue[Any], data: st.DataObject, require_tls: bool
) -> None:
    machine = dialogue.new(require_tls=require_tls, max_line_length=128)
    chunks = data.draw(_fuzz_chunks(dialogue))
    opening = [dialogue.client_opening] if dialogue.client_opening else []
    check_pre_tls_bytes(machine, [*opening, *chunks], require_tls=require_tls)
    assert machine.state.name != "ERROR"


@every_protocol
@given(data=st.data(), side=st.sampled_from(Side))
def test_fuzz_relay_bytes(dialogue: Dialogue[Any], data: st.DataObject, side: Side) -> None:
    machine = dialogue.relaying(max_line_length=128, max_literal_size=50)
    feed(machine, side, data.draw(_fuzz_chunks(dialogue)))
    if side is Side.CLIENT:
        assert machine.state.name != "ERROR"


# --------------------------------------------------------------------------
# What the driver's per-command deadline sees (slowloris).


@every_protocol
def test_a_command_under_way_is_seen_until_its_last_byte(dialogue: Dialogue[Any]) -> None:
    for machine, command in (
        (_opened(dialogue), dialogue.capability),
        (dialogue.relaying(), dialogue.relayed),
    ):
        assert not machine.client_mid_command
        for octet in command[:-1]:
            machine.receive_data(Side.CLIENT, bytes([octet]))
            assert machine.client_mid_command
        machine.receive_data(Side.CLIENT, command[-1:])
        assert not machine.client_mid_command


def _opened(dialogue: Dialogue[Any]) -> Any:
    machine = dialogue.new()
    run(machine, *dialogue.opening())
    return machine


def test_a_message_body_under_way_is_not_a_command() -> None:
    machine = SMTP.relaying()
    run(machine, *exchange(b"DATA\r\n", b"354 go ahead\r\n"))
    machine.receive_data(Side.CLIENT, b"a line of the body, and half of the next")
    assert not machine.client_mid_command


def test_a_literal_under_way_is_not_a_command() -> None:
    machine = IMAP.relaying()
    run(machine, *exchange(b"a1 APPEND INBOX {100}\r\n", b"+ go ahead\r\n"))
    machine.receive_data(Side.CLIENT, b"x" * 50)
    assert not machine.client_mid_command


# --------------------------------------------------------------------------
# Response injection: the backend speaking before it was asked.


@line_protocols
def test_backend_reply_before_its_command_is_a_violation(dialogue: LineDialogue[Any]) -> None:
    """Response injection (Poddebniak et al., USENIX Security 2021), the
    backend's way: a reply that came in the same read as the greeting, before
    the client's waiting command was relayed, answers nothing. Taken for that
    command's answer it would shift every reply after it; the session ends."""
    machine = dialogue.connecting()
    run(machine, Client(dialogue.relayed), Connected())
    machine.receive_data(Side.BACKEND, dialogue.backend_greeting + dialogue.relayed_answer)
    commands = drain(machine)
    assert dialogue.relayed_answer not in client_bytes(commands)
    assert isinstance(commands[-1], CloseConnection)
    assert not commands[-1].clean


@line_protocols
def test_backend_reply_after_its_command_is_relayed(dialogue: LineDialogue[Any]) -> None:
    """The same reply a read later, once the command is on its way, is its answer."""
    machine = dialogue.connecting()
    run(machine, Client(dialogue.relayed), Connected())
    machine.receive_data(Side.BACKEND, dialogue.backend_greeting)
    assert dialogue.relayed in backend_bytes(drain(machine))
    machine.receive_data(Side.BACKEND, dialogue.relayed_answer)
    assert client_bytes(drain(machine)) == dialogue.relayed_answer
