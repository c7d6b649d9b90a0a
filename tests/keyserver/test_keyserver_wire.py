"""The key server's key references, without a process (requests: test_keyserver_process),
and ``keys.server``'s copies of the C side's values in agreement with its headers."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from starttls_proxy.keys import server as keyserver
from starttls_proxy.keys.server import Digest, Scheme, encode_reference, key_id
from tests import wire_h

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


def test_the_connection_and_link_values_agree_with_keyserver_wire_h() -> None:
    header = wire_h.KEYSERVER_WIRE_H
    defines = wire_h.defines(header)
    assert defines["WIRE_VERSION"] == keyserver.WIRE_VERSION
    assert defines["HEADER_SIZE"] == keyserver.HEADER.size
    assert defines["KEY_ID_SIZE"] == keyserver.KEY_ID_SIZE
    assert defines["MAX_DATA_SIZE"] == keyserver.MAX_DATA
    assert defines["REQUEST_HEADER_SIZE"] + defines["MAX_DATA_SIZE"] == keyserver.MAX_REQUEST
    assert defines["MAX_CERTIFICATES"] == keyserver.MAX_CERTIFICATES
    assert {f"SCHEME_{s.name}": int(s) for s in Scheme} == wire_h.enum("scheme", header)
    assert {f"DIGEST_{d.name}": int(d) for d in Digest} == wire_h.enum("digest", header)
    assert wire_h.enum("status", header) == {
        "STATUS_SIGNED": keyserver.STATUS_SIGNED,
        "STATUS_REFUSED": keyserver.STATUS_REFUSED,
    }


def test_the_key_reference_values_agree_with_keyref_h() -> None:
    header = wire_h.KEYREF_H
    strings = wire_h.strings(header)
    assert strings["KEYREF_PEM_LABEL"] == keyserver.REFERENCE_LABEL
    assert strings["KEYREF_MAGIC"].encode() == keyserver.REFERENCE_MAGIC
    assert wire_h.defines(header)["KEYREF_VERSION"] == keyserver.REFERENCE_VERSION
    assert wire_h.enum("key_kind", header) == {
        "KIND_EC": keyserver.KIND_EC,
        "KIND_RSA": keyserver.KIND_RSA,
    }
    names = {"secp256r1": "CURVE_P256", "secp384r1": "CURVE_P384", "secp521r1": "CURVE_P521"}
    curves = {names[name]: code for name, code in keyserver.CURVES.items()}
    assert curves == wire_h.enum("curve", header)


def test_the_tls13_context_agrees_with_signing_c() -> None:
    signing_c = Path(keyserver.__file__).with_name("service") / "signing.c"
    context = wire_h.strings(signing_c)["TLS13_CONTEXT"]
    assert b" " * 64 + context.encode() + b"\0" == keyserver.TLS13_SERVER_CONTEXT
