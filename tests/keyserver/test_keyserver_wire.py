"""The key server's request parsing and its key references, without a process."""

from __future__ import annotations

import base64
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from starttls_proxy.keyserver import (
    HEADER,
    KEY_ID_SIZE,
    MAX_REQUEST,
    TLS13_SERVER_CONTEXT,
    Connection,
    MalformedRequestError,
    RefusedRequestError,
    encode_reference,
    key_id,
    looks_like_handshake,
)

EC_KEY = ec.generate_private_key(ec.SECP256R1())


@given(st.binary(max_size=MAX_REQUEST + 16))
def test_any_bytes_are_answered_or_dropped_never_crash(request: bytes) -> None:
    connection = Connection({key_id(EC_KEY.public_key()): EC_KEY})
    try:
        answer = connection.answer(request)
    except (MalformedRequestError, RefusedRequestError):
        return
    assert answer[:1] == b"\x01" and answer[4:8] == request[4:8]


@given(st.binary(min_size=1, max_size=64))
def test_a_request_for_an_unknown_key_is_refused(data: bytes) -> None:
    connection = Connection({key_id(EC_KEY.public_key()): EC_KEY})
    request = HEADER.pack(1, 1, 1, 0, 1) + bytes(KEY_ID_SIZE) + TLS13_SERVER_CONTEXT + data
    with pytest.raises(RefusedRequestError, match="is not this connection's"):
        connection.answer(request)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (TLS13_SERVER_CONTEXT + bytes(32), True),
        (TLS13_SERVER_CONTEXT + bytes(48), True),
        (TLS13_SERVER_CONTEXT + bytes(33), False),
        (bytes(64) + bytes([3, 0, 23, 65]) + bytes(65), True),
        (bytes(64) + bytes([3, 0, 23, 65]) + bytes(64), False),
        (bytes(64) + bytes([1, 0, 23, 65]) + bytes(65), False),
        (b"", False),
    ],
)
def test_handshake_signature_inputs(data: bytes, expected: bool) -> None:
    assert looks_like_handshake(data) is expected


def _reference_body(pem: bytes) -> bytes:
    lines = pem.decode().splitlines()
    assert lines[0] == "-----BEGIN STARTTLS-PROXY KEY REFERENCE-----"
    assert lines[-1] == "-----END STARTTLS-PROXY KEY REFERENCE-----"
    return base64.b64decode("".join(lines[1:-1]))


def test_an_ec_reference_holds_only_public_facts() -> None:
    body = _reference_body(encode_reference(EC_KEY))
    point = EC_KEY.public_key().public_numbers()
    assert body[:6] == b"STPK\x01\x01"
    assert body[6:22] == key_id(EC_KEY.public_key())
    assert body[22] == 1  # P-256
    assert struct.unpack(">H", body[23:25]) == (65,)
    assert body[25:] == b"\x04" + point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big")


def test_an_rsa_reference_holds_only_public_facts() -> None:
    key = rsa.generate_private_key(65537, 2048)
    body = _reference_body(encode_reference(key))
    numbers = key.public_key().public_numbers()
    assert body[:6] == b"STPK\x01\x02"
    assert struct.unpack(">H", body[22:24]) == (256,)
    assert body[24:280] == numbers.n.to_bytes(256, "big")
    assert body[280:] == b"\x00\x03\x01\x00\x01"
