"""The control messages between the processes (``starttls_proxy.wire``):
each survives its channels, the JSON the C helper writes reads as they
do, and anything else is a ``WireError``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from starttls_proxy import wire
from starttls_proxy.wire import (
    Channel,
    Configuration,
    HelperStarted,
    KeyServerCounts,
    KeyServerStart,
    LayerStatus,
    Message,
    Problems,
    Ready,
    Reload,
    SigningCounts,
    WireError,
    WorkerExit,
    WorkerExited,
    read_report,
)
from tests import wire_h

CHANNELS = {name: channel for name, channel in vars(wire).items() if isinstance(channel, Channel)}
#: (channel name, message class) for every message each channel carries.
CARRIED = [(name, kind) for name, channel in CHANNELS.items() for kind in channel.kinds]

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
_OBJECTS = st.dictionaries(st.text(max_size=12), _JSON, max_size=4)
_LAYERS = st.lists(st.builds(LayerStatus), max_size=8).map(tuple)
_CONFIGURATIONS = st.builds(Configuration, tls=_OBJECTS, isolation=_OBJECTS)
#: Where ``st.builds`` cannot infer a field (a JSON object) or leaves a default alone.
_BUILT: dict[type[Message], st.SearchStrategy[Any]] = {
    Configuration: _CONFIGURATIONS,
    Reload: st.builds(Reload, _CONFIGURATIONS),
    KeyServerStart: st.builds(KeyServerStart, isolation=_OBJECTS),
    KeyServerCounts: st.builds(
        KeyServerCounts, st.builds(SigningCounts, *[st.integers(min_value=0)] * 3)
    ),
    HelperStarted: st.builds(
        HelperStarted, key_server_layers=st.none() | _LAYERS, reloaded=st.booleans()
    ),
}


def messages(kind: type[Message]) -> st.SearchStrategy[Any]:
    return _BUILT[kind] if kind in _BUILT else st.builds(kind)


def test_every_message_travels_on_some_channel() -> None:
    assert set(Message.__subclasses__()) == {kind for _, kind in CARRIED}


@pytest.mark.parametrize(("channel", "kind"), CARRIED, ids=lambda x: getattr(x, "__name__", x))
@given(data=st.data())
def test_messages_survive_their_channels(channel: str, kind: type[Message], data: Any) -> None:
    message = data.draw(messages(kind))
    encoded = message.encode()
    assert len(encoded) <= wire.MAX_MESSAGE
    assert CHANNELS[channel].decode(encoded) == message


@pytest.mark.parametrize("channel", CHANNELS)
@given(data=st.data())
def test_a_message_of_another_channel_is_refused(channel: str, data: Any) -> None:
    """The keeper must not act on, say, a ``Ready`` from the main process."""
    strangers = [kind for _, kind in CARRIED if kind not in CHANNELS[channel].kinds]
    message = data.draw(st.sampled_from(strangers).flatmap(messages))
    with pytest.raises(WireError):
        CHANNELS[channel].decode(message.encode())


# ----------------------------------------------------------------------
# The C helper's JSON (tls/helper/helper.c), as it writes it.


def test_the_helpers_messages_read_as_it_writes_them() -> None:
    assert wire.HELPER_TO_MAIN.decode(b'{"exited": 4321, "status": -9}') == WorkerExited(4321, -9)
    ready = b'{"ready": true, "layers": [["pid_namespace", true, "own"], ["seccomp", false, ""]]}'
    assert wire.HELPER_TO_KEEPER.decode(ready) == Ready(
        (LayerStatus("pid_namespace", True, "own"), LayerStatus("seccomp", False, ""))
    )
    problems = b'{"problems": ["tls.certificates[0].key: no such file", "caf\\u00e9"]}'
    assert wire.HELPER_TO_KEEPER.decode(problems) == Problems(
        ("tls.certificates[0].key: no such file", "caf\u00e9")
    )


@pytest.mark.parametrize(
    "message",
    [WorkerExited(7, 0), Ready((LayerStatus("chroot", True, "x"),)), Problems(("a", "b"))],
    ids=lambda message: type(message).__name__,
)
def test_what_the_helper_writes_is_what_encode_makes(message: Message) -> None:
    """The JSON shapes C writes are the ones Python's messages have."""
    expected = {
        WorkerExited: {"exited": 7, "status": 0},
        Ready: {"ready": True, "layers": [["chroot", True, "x"]]},
        Problems: {"problems": ["a", "b"]},
    }
    assert json.loads(message.encode()) == expected[type(message)]


def test_worker_exit_statuses_agree_with_wire_h() -> None:
    defines = wire_h.defines()
    assert {name: value for name, value in defines.items() if name.startswith("EXIT_")} == {
        f"EXIT_{status.name}": status.value for status in WorkerExit
    }


# ----------------------------------------------------------------------
# What no sound peer sends.


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe{",
        b"1" * 5000,
        b"[1]",
        b"{}",
        b'{"problems": [], "fatal": "x", "ready": true, "isolation": {}, "load": []}',
        b" " * (wire.MAX_MESSAGE + 1),
    ],
    ids=["empty", "not UTF-8", "huge integer", "array", "no tag", "many tags", "too large"],
)
@pytest.mark.parametrize("channel", CHANNELS)
def test_what_is_not_one_message_is_a_wire_error(channel: str, payload: bytes) -> None:
    with pytest.raises(WireError):
        CHANNELS[channel].decode(payload)


@pytest.mark.parametrize(("channel", "kind"), CARRIED, ids=lambda x: getattr(x, "__name__", x))
@given(data=st.data())
def test_a_value_of_no_fields_type_is_named(channel: str, kind: type[Message], data: Any) -> None:
    """No field of any message is a number with a fraction: each refuses one."""
    fields = json.loads(data.draw(messages(kind)).encode())
    key = data.draw(st.sampled_from(sorted(fields)))
    fields[key] = 1.5
    with pytest.raises(WireError, match=f"{kind.__name__}(.{key}: float|: {key!r} is not true)"):
        CHANNELS[channel].decode(json.dumps(fields).encode())


@pytest.mark.parametrize(
    ("channel", "fields", "why"),
    [
        ("KEEPER_TO_MAIN", {"exited": 1}, r"WorkerExited: keys \['exited'\], not"),
        ("HELPER_TO_MAIN", {"exited": 1, "status": 0, "pid": 1}, "keys"),
        ("HELPER_TO_MAIN", {"exited": True, "status": 0}, "WorkerExited.exited: bool, not int"),
        ("HELPER_TO_KEEPER", {"ready": 1, "layers": []}, "'ready' is not true"),
        ("HELPER_TO_KEEPER", {"problems": ["a", 2]}, r"Problems.problems\[1\]: int, not str"),
        ("KEEPER_TO_MAIN", {"counts": {"signed": 1, "refused": -2, "dropped": 0}}, "negative"),
        (
            "KEEPER_TO_MAIN",
            {"helper": 1, "layers": [["a", 1]], "key_server_layers": None, "reloaded": False},
            r"HelperStarted.layers\[0\]: 2 items, not 3",
        ),
        ("MAIN_TO_KEEPER", {"reload": {"tls": {}}}, r"Reload.reload: keys \['tls'\]"),
    ],
)
def test_a_malformed_field_is_named(channel: str, fields: dict[str, Any], why: str) -> None:
    with pytest.raises(WireError, match=why):
        CHANNELS[channel].decode(json.dumps(fields).encode())


def test_an_error_names_a_few_keys_not_all() -> None:
    """What a peer sent goes into a log line: a message of thousands of keys
    makes a short one."""
    payload = json.dumps({f"key{i:05}" + "x" * 100: 0 for i in range(500)}).encode()
    for decode in (wire.KEEPER_TO_MAIN.decode, wire.HELPER_TO_MAIN.decode):
        with pytest.raises(WireError, match="and 494 more") as refused:
            decode(payload[:-1] + b', "exited": 1, "status": 2}')
        assert len(str(refused.value)) < 600


@pytest.mark.parametrize("depth", [1_000, 30_000])
def test_deep_nesting_is_a_wire_error_not_a_recursion_error(depth: int) -> None:
    """Regression: the worker's report was parsed with ``json.loads`` alone,
    and a report nested deeper than Python recurses raised RecursionError,
    which nothing on the main process's side expected."""
    payload = b"[" * depth + b"]" * depth
    with pytest.raises(WireError, match="not JSON"):
        read_report(payload, ())
    for channel in CHANNELS.values():
        with pytest.raises(WireError, match="not JSON"):
            channel.decode(b'{"problems": ' + payload + b"}")


@pytest.mark.parametrize("channel", CHANNELS)
@given(payload=st.binary(max_size=200))
def test_any_bytes_are_a_message_or_a_wire_error(channel: str, payload: bytes) -> None:
    try:
        message = CHANNELS[channel].decode(payload)
    except WireError:
        return
    assert isinstance(message, CHANNELS[channel].kinds)


@pytest.mark.parametrize(("channel", "kind"), CARRIED, ids=lambda x: getattr(x, "__name__", x))
@given(data=st.data())
def test_a_damaged_message_is_a_message_or_a_wire_error(
    channel: str, kind: type[Message], data: Any
) -> None:
    """A sound message with one key dropped, added or given any JSON value."""
    fields = json.loads(data.draw(messages(kind)).encode())
    key = data.draw(st.sampled_from([*fields, "other"]))
    if key in fields and data.draw(st.booleans()):
        del fields[key]
    else:
        fields[key] = data.draw(_JSON)
    try:
        message = CHANNELS[channel].decode(json.dumps(fields).encode())
    except WireError:
        return
    assert isinstance(message, CHANNELS[channel].kinds)
