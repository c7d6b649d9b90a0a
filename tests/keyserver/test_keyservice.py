"""The key server's request loop (``keys._service``, C) in this process: its
Python-facing API, counts and misuse. What it answers workers is tested
against the real confined process (test_keyserver_process)."""

from __future__ import annotations

import os
import socket

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from starttls_proxy.keys._service import Service
from starttls_proxy.keys.server import (
    HEADER,
    STATUS_SIGNED,
    TLS13_SERVER_CONTEXT,
    WIRE_VERSION,
    Link,
    Scheme,
    key_id,
    signature_request,
)
from starttls_proxy.wire import TLSRole

KEY = ec.generate_private_key(ec.SECP256R1())
DER = KEY.private_bytes(
    serialization.Encoding.DER,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
)


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def test_serves_a_link_signs_and_counts() -> None:
    control, keeper = _pair()
    link_theirs, link_ours = _pair()
    with control, keeper, link_ours:
        service = Service(control.fileno())
        service.add_link(link_theirs.detach(), [(key_id(KEY.public_key()), DER)])
        data = TLS13_SERVER_CONTEXT + os.urandom(32)
        with socket.socket(fileno=Link(link_ours).connection_for([0], TLSRole.ACCEPT)) as worker:
            worker.send(signature_request(KEY.public_key(), data, Scheme.ECDSA, 9))
            # Serves the link message, then the request; returns once the
            # count has waited the interval.
            assert service.serve(0.01) is False
            assert service.take_counts() == (1, 0, 0)
            answer = worker.recv(4096)
        assert HEADER.unpack_from(answer) == (WIRE_VERSION, STATUS_SIGNED, 0, 0, 9)
        KEY.public_key().verify(answer[HEADER.size :], data, ec.ECDSA(hashes.SHA256()))
        keeper.send(b"{}")
        assert service.serve(0.01) is True  # the keeper's message is for keyserver.py


def test_a_key_libcrypto_cannot_read_is_refused_and_the_link_stays_the_caller_s() -> None:
    control, keeper = _pair()
    link, other = _pair()
    with control, keeper, link, other:
        service = Service(control.fileno())
        with pytest.raises(ValueError, match="key 0"):
            service.add_link(link.fileno(), [(key_id(KEY.public_key()), b"not DER")])
        with pytest.raises(ValueError, match="key 0"):
            service.add_link(link.fileno(), [(b"short id", DER)])
        other.send(b"still open")
        assert link.recv(64) == b"still open"


def test_a_service_that_was_not_initialised_says_so() -> None:
    service = Service.__new__(Service)
    with pytest.raises(RuntimeError, match="__init__"):
        service.serve(0.01)
    with pytest.raises(RuntimeError, match="__init__"):
        service.add_link(0, [])
