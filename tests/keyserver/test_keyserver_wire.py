"""The key server's key references, without a process (requests: test_keyserver_process)."""

from __future__ import annotations

import base64
import struct

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from starttls_proxy.keyserver import encode_reference, key_id

EC_KEY = ec.generate_private_key(ec.SECP256R1())


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
