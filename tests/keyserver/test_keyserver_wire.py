"""The key server's key references, without a process (requests: test_keyserver_process),
and ``keys.server``'s copies of the C side's values in agreement with its headers."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from starttls_proxy.keys import server as keyserver
from starttls_proxy.keys.server import Digest, Scheme, encode_grant, encode_reference, key_id
from starttls_proxy.wire import TLSRole
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
    assert defines["GRANT_HEADER_SIZE"] == keyserver.GRANT_HEADER.size
    # The TLS helper writes its enum tls_role into the grant as it is.
    roles = {f"GRANT_{role.name}": role.value for role in TLSRole}
    assert wire_h.enum("grant_role", header) == roles
    assert {f"ROLE_{role.name}": role.value for role in TLSRole} == wire_h.enum("tls_role")
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


def test_a_grant_is_the_role_the_count_and_the_indexes() -> None:
    assert encode_grant([0, 1], TLSRole.ACCEPT) == bytes([0, 0, 2, 0, 0, 0, 1])
    assert encode_grant([258], TLSRole.CONNECT) == bytes([1, 0, 1, 1, 2])
    assert encode_grant([], TLSRole.CONNECT) == bytes([1, 0, 0])


def test_the_tls13_contexts_agree_with_signing_c() -> None:
    signing_c = Path(keyserver.__file__).with_name("service") / "signing.c"
    contexts = wire_h.strings(signing_c)
    for side, expected in (
        ("SERVER", keyserver.TLS13_SERVER_CONTEXT),
        ("CLIENT", keyserver.TLS13_CLIENT_CONTEXT),
    ):
        assert b" " * 64 + contexts[f"TLS13_{side}_CONTEXT"].encode() + b"\0" == expected
    # RFC 8446 section 4.4.3.
    assert keyserver.TLS13_CLIENT_CONTEXT[64:] == b"TLS 1.3, client CertificateVerify\0"
