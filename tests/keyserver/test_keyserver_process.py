"""The key server as a real, confined process: what a worker's connection
gets, what it is refused, and what only drops it.

The requests are what the provider's ``signature.c`` sends; the signatures
are checked with the public keys. A connection's grant names its worker's
role: one that accepts may have a TLS server's handshake inputs signed, one
that connects a TLS 1.3 client's CertificateVerify input only.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from starttls_proxy.keys.server import (
    GRANT_HEADER,
    HEADER,
    KEY_ID_SIZE,
    MAX_DATA,
    MAX_REQUEST,
    STATUS_REFUSED,
    STATUS_SIGNED,
    TLS13_CLIENT_CONTEXT,
    TLS13_SERVER_CONTEXT,
    WIRE_VERSION,
    PrivateKey,
    Scheme,
    encode_grant,
    read_private_key,
    signature_request,
    user_id,
)
from starttls_proxy.privileged.helper_start import HelperStartError
from starttls_proxy.privileged.keeper import KeyServerProcess, open_key_files
from starttls_proxy.settings import encode
from starttls_proxy.wire import LoadKeys, Problems, Ready, TLSRole
from tests.keyserver.conftest import Keys, RunningKeyServer, isolation

CONCURRENT_CONNECTIONS = 64


def _key(path: Path) -> PrivateKey:
    return read_private_key(path.read_bytes(), str(path))


def _request(
    key: PrivateKey, data: bytes, scheme: Scheme = Scheme.ECDSA, request_id: int = 7
) -> bytes:
    return signature_request(key.public_key(), data, scheme, request_id)


def tls13_input() -> bytes:
    return TLS13_SERVER_CONTEXT + os.urandom(32)


def tls12_input() -> bytes:
    # Randoms, then named_curve x25519 (29) and a 32-byte share.
    return os.urandom(64) + bytes([3, 0, 29, 32]) + os.urandom(32)


def tls13_client_input() -> bytes:
    return TLS13_CLIENT_CONTEXT + os.urandom(32)


def _ask(connection: socket.socket, request: bytes) -> bytes:
    connection.settimeout(10)
    connection.send(request)
    return connection.recv(4096)


def _verify(key: PrivateKey, scheme: Scheme, data: bytes, signature: bytes) -> None:
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        return
    assert isinstance(public, rsa.RSAPublicKey)
    pad = (
        padding.PKCS1v15()
        if scheme is Scheme.RSA_PKCS1
        else padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    )
    public.verify(signature, data, pad, hashes.SHA256())


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _wait_for_count(key_server: RunningKeyServer, result: str, at_least: int) -> None:
    deadline = time.monotonic() + 10
    while key_server.total(result) < at_least:
        assert time.monotonic() < deadline, key_server.counts
        time.sleep(0.05)


def test_the_key_server_is_confined(key_server: RunningKeyServer, key_server_root: Path) -> None:
    pid = key_server.process.process.pid
    status = _status(pid)
    uid = user_id(isolation(key_server_root))
    assert {int(u) for u in status["Uid"].split()} == {uid}
    assert status["Groups"] == ""
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
    assert os.readlink(f"/proc/{pid}/root") == str(key_server_root / "empty")
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert all(applied for _, applied, _ in key_server.process.layers)


@pytest.mark.parametrize(
    ("role", "index", "scheme", "make_input"),
    [
        (TLSRole.ACCEPT, 0, Scheme.ECDSA, tls13_input),
        (TLSRole.ACCEPT, 0, Scheme.ECDSA, tls12_input),
        (TLSRole.ACCEPT, 1, Scheme.RSA_PSS, tls13_input),
        (TLSRole.ACCEPT, 1, Scheme.RSA_PSS, tls12_input),
        (TLSRole.ACCEPT, 1, Scheme.RSA_PKCS1, tls12_input),
        (TLSRole.CONNECT, 0, Scheme.ECDSA, tls13_client_input),
        (TLSRole.CONNECT, 1, Scheme.RSA_PSS, tls13_client_input),
    ],
)
def test_signs_for_the_connection_s_certificate(
    key_server: RunningKeyServer,
    keys: Keys,
    role: TLSRole,
    index: int,
    scheme: Scheme,
    make_input: object,
) -> None:
    assert callable(make_input)
    key = _key(keys.paths[index])
    data = make_input()
    signed = key_server.total("signed")
    with key_server.connect([index], role) as connection:
        answer = _ask(connection, _request(key, data, scheme, request_id=0xDEADBEEF))
    version, status, _, _, request_id = HEADER.unpack_from(answer)
    assert (version, status, request_id) == (WIRE_VERSION, STATUS_SIGNED, 0xDEADBEEF)
    _verify(key, scheme, data, answer[HEADER.size :])
    _wait_for_count(key_server, "signed", signed + 1)


def test_another_certificate_s_key_is_refused(key_server: RunningKeyServer, keys: Keys) -> None:
    rsa_key = _key(keys.paths[1])
    refused = key_server.total("refused")
    with key_server.connect([0]) as connection:
        answer = _ask(connection, _request(rsa_key, tls13_input(), Scheme.RSA_PSS))
        assert HEADER.unpack_from(answer)[1] == STATUS_REFUSED
        assert connection.recv(4096) == b""  # and the connection is over
    _wait_for_count(key_server, "refused", refused + 1)


def test_one_signature_per_connection(key_server: RunningKeyServer, keys: Keys) -> None:
    key = _key(keys.paths[0])
    with key_server.connect([0, 1]) as connection:
        assert HEADER.unpack_from(_ask(connection, _request(key, tls13_input())))[1] == 0
        second = _ask(connection, _request(key, tls13_input()))
        assert HEADER.unpack_from(second)[1] == STATUS_REFUSED


ACCEPT, CONNECT = TLSRole.ACCEPT, TLSRole.CONNECT
SIGNED, REFUSED = STATUS_SIGNED, STATUS_REFUSED


@pytest.mark.parametrize(
    ("role", "data", "status"),
    [
        # A worker that accepts: a TLS server's inputs.
        (ACCEPT, TLS13_SERVER_CONTEXT + bytes(32), SIGNED),
        (ACCEPT, TLS13_SERVER_CONTEXT + bytes(48), SIGNED),
        (ACCEPT, TLS13_SERVER_CONTEXT + bytes(64), SIGNED),
        (ACCEPT, bytes(64) + bytes([3, 0, 23, 65]) + bytes(65), SIGNED),
        (ACCEPT, b"a certificate to be signed", REFUSED),
        (ACCEPT, TLS13_CLIENT_CONTEXT + bytes(32), REFUSED),
        (ACCEPT, b"-" + TLS13_SERVER_CONTEXT[1:] + bytes(32), REFUSED),
        (ACCEPT, TLS13_SERVER_CONTEXT + bytes(31), REFUSED),
        (ACCEPT, TLS13_SERVER_CONTEXT + bytes(33), REFUSED),
        (ACCEPT, bytes(64) + bytes([3, 0, 29, 33]) + bytes(32), REFUSED),
        (ACCEPT, bytes(64) + bytes([1, 0, 23, 65]) + bytes(65), REFUSED),
        (ACCEPT, bytes(64) + bytes([3, 0, 23, 0]), REFUSED),
        # A worker that connects: a TLS 1.3 client's CertificateVerify only.
        (CONNECT, TLS13_CLIENT_CONTEXT + bytes(32), SIGNED),
        (CONNECT, TLS13_CLIENT_CONTEXT + bytes(48), SIGNED),
        (CONNECT, TLS13_CLIENT_CONTEXT + bytes(64), SIGNED),
        (CONNECT, TLS13_SERVER_CONTEXT + bytes(32), REFUSED),
        (CONNECT, bytes(64) + bytes([3, 0, 23, 65]) + bytes(65), REFUSED),
        (CONNECT, bytes(64) + bytes([3, 0, 29, 32]) + bytes(32), REFUSED),
        (CONNECT, b"a certificate to be signed", REFUSED),
        (CONNECT, b"-" + TLS13_CLIENT_CONTEXT[1:] + bytes(32), REFUSED),
        (CONNECT, TLS13_CLIENT_CONTEXT[:-1] + b"!" + bytes(32), REFUSED),
        (CONNECT, TLS13_CLIENT_CONTEXT + bytes(31), REFUSED),
        (CONNECT, TLS13_CLIENT_CONTEXT + bytes(33), REFUSED),
        (CONNECT, TLS13_CLIENT_CONTEXT, REFUSED),
    ],
    ids=[
        "accept-tls13-sha256",
        "accept-tls13-sha384",
        "accept-tls13-sha512",
        "accept-tls12-p256-share",
        "accept-arbitrary",
        "accept-client-context",
        "accept-not-spaces",
        "accept-short-hash",
        "accept-long-hash",
        "accept-bad-share-length",
        "accept-explicit-curve",
        "accept-no-share",
        "connect-tls13-sha256",
        "connect-tls13-sha384",
        "connect-tls13-sha512",
        "connect-server-context",
        "connect-tls12-p256-share",
        "connect-tls12-x25519-share",
        "connect-arbitrary",
        "connect-not-spaces",
        "connect-no-zero-byte",
        "connect-short-hash",
        "connect-long-hash",
        "connect-no-hash",
    ],
)
def test_only_the_role_s_handshake_signature_inputs_are_signed(
    key_server: RunningKeyServer, keys: Keys, role: TLSRole, data: bytes, status: int
) -> None:
    key = _key(keys.paths[0])
    with key_server.connect([0], role) as connection:
        assert HEADER.unpack_from(_ask(connection, _request(key, data)))[1] == status


@pytest.mark.parametrize(
    ("role", "data"),
    [
        (ACCEPT, TLS13_CLIENT_CONTEXT + bytes(32)),
        (CONNECT, TLS13_SERVER_CONTEXT + bytes(32)),
        (CONNECT, bytes(64) + bytes([3, 0, 29, 32]) + bytes(32)),
    ],
    ids=["accept-client-context", "connect-server-context", "connect-tls12"],
)
def test_the_other_role_s_input_is_refused_counted_and_ends_the_connection(
    key_server: RunningKeyServer, keys: Keys, role: TLSRole, data: bytes
) -> None:
    """A compromised worker gains nothing from the other role: not even with
    both certificates granted, and not on a second try."""
    refused = key_server.total("refused")
    with key_server.connect([0, 1], role) as connection:
        answer = _ask(connection, _request(_key(keys.paths[0]), data, request_id=11))
        assert answer == HEADER.pack(WIRE_VERSION, STATUS_REFUSED, 0, 0, 11)
        assert connection.recv(4096) == b""
    _wait_for_count(key_server, "refused", refused + 1)


@pytest.mark.parametrize(
    ("index", "scheme"),
    [(0, Scheme.RSA_PSS), (0, Scheme.RSA_PKCS1), (1, Scheme.ECDSA)],
    ids=["pss-with-ec", "pkcs1-with-ec", "ecdsa-with-rsa"],
)
def test_a_scheme_that_does_not_fit_the_key_is_refused(
    key_server: RunningKeyServer, keys: Keys, index: int, scheme: Scheme
) -> None:
    key = _key(keys.paths[index])
    with key_server.connect([index]) as connection:
        answer = _ask(connection, _request(key, tls13_input(), scheme))
        assert HEADER.unpack_from(answer)[1] == STATUS_REFUSED


@pytest.mark.parametrize(
    ("role", "make_input"), [(TLSRole.ACCEPT, tls13_input), (TLSRole.CONNECT, tls13_client_input)]
)
def test_rsa_pkcs1_is_refused_for_a_tls13_certificate_verify(
    key_server: RunningKeyServer, keys: Keys, role: TLSRole, make_input: Callable[[], bytes]
) -> None:
    # RFC 8446 section 4.4.3: TLS 1.3 signs with RSASSA-PSS only.
    key = _key(keys.paths[1])
    with key_server.connect([1], role) as connection:
        answer = _ask(connection, _request(key, make_input(), Scheme.RSA_PKCS1))
        assert HEADER.unpack_from(answer)[1] == STATUS_REFUSED


def _signs(key_server: RunningKeyServer, key: PrivateKey) -> bool:
    """Whether a new connection of the link still gets a signature."""
    with key_server.connect([0]) as connection:
        status: int = HEADER.unpack_from(_ask(connection, _request(key, tls13_input())))[1]
        return status == STATUS_SIGNED


#: Requests shaped like the real ones (right version, a real key id) with
#: any codes and data, and plain bytes.
REQUESTS = st.one_of(
    st.binary(max_size=MAX_REQUEST + 16),
    st.builds(
        lambda codes, key, data: HEADER.pack(WIRE_VERSION, *codes, 7) + key + data,
        st.tuples(st.integers(0, 4), st.integers(0, 4), st.sampled_from([0, 0, 1])),
        st.sampled_from([b"", bytes(KEY_ID_SIZE)]),
        st.binary(max_size=MAX_DATA + 2),
    ),
)


@settings(max_examples=150, deadline=None)
@given(request=REQUESTS, role=st.sampled_from(TLSRole))
def test_any_request_is_answered_or_dropped_and_the_server_lives_on(
    key_server: RunningKeyServer, keys: Keys, request: bytes, role: TLSRole
) -> None:
    with key_server.connect([0, 1], role) as connection:
        answer = _ask(connection, request)
    if answer:
        assert answer == HEADER.pack(WIRE_VERSION, STATUS_REFUSED, 0, 0, 7)
    assert _signs(key_server, _key(keys.paths[0]))


def _granted(key_server: RunningKeyServer, message: bytes) -> socket.socket:
    """The worker's end of a connection the test grants with ``message``."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        socket.send_fds(key_server.link.sock, [message], [ours.fileno()])
    theirs.settimeout(10)
    return theirs


@pytest.mark.parametrize(
    "message",
    [
        GRANT_HEADER.pack(0, 1) + struct.pack(">H", 2),  # no such certificate
        GRANT_HEADER.pack(0, 2) + struct.pack(">H", 0),  # fewer indexes than counted
        GRANT_HEADER.pack(1, 1) + struct.pack(">HH", 0, 0),  # more
        GRANT_HEADER.pack(0, 1) + b"\x00",  # half an index
        struct.pack(">HH", 1, 0),  # no role (the grant before roles)
        GRANT_HEADER.pack(2, 1) + struct.pack(">H", 0),
        GRANT_HEADER.pack(255, 1) + struct.pack(">H", 0),
        b"\x00",
        b"\x00\x00",
        b'{"certificates": [0]}',
    ],
    ids=[
        "out-of-range",
        "short",
        "long",
        "odd",
        "no-role",
        "role-2",
        "role-255",
        "one-byte",
        "no-count",
        "json",
    ],
)
def test_a_malformed_grant_gets_no_connection(
    key_server: RunningKeyServer, keys: Keys, message: bytes
) -> None:
    with _granted(key_server, message) as worker:
        assert worker.recv(1) == b""  # the key server closed its end unserved
    assert _signs(key_server, _key(keys.paths[0]))


@pytest.mark.parametrize("descriptors", [2, 3])
def test_a_grant_with_more_than_one_descriptor_gets_no_connection_and_keeps_none(
    key_server: RunningKeyServer, keys: Keys, descriptors: int
) -> None:
    # Two fit the key server's control buffer (rounded up for alignment), the
    # kernel closes a third: each must be closed, or its worker never sees the end.
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(descriptors)]
    grant = GRANT_HEADER.pack(0, 1) + struct.pack(">H", 0)
    socket.send_fds(key_server.link.sock, [grant], [ours.fileno() for ours, _ in pairs])
    for ours, theirs in pairs:
        ours.close()
        with theirs:
            theirs.settimeout(10)
            assert theirs.recv(1) == b""
    assert _signs(key_server, _key(keys.paths[0]))


def _grant_scope(message: bytes, certificates: int) -> tuple[TLSRole, set[int]] | None:
    """What a grant allows (keys/keyserver_wire.h), None if it is malformed."""
    if len(message) < GRANT_HEADER.size:
        return None
    role, count = GRANT_HEADER.unpack_from(message)
    indexes = message[GRANT_HEADER.size :]
    if role not in set(TLSRole) or len(indexes) != 2 * count:
        return None
    allowed = {index for (index,) in struct.iter_unpack(">H", indexes)}
    if any(index >= certificates for index in allowed):
        return None
    return TLSRole(role), allowed


#: Plain bytes, well-formed grants, and grants shaped like them with any
#: role byte, a count that may be wrong, indexes in and out of range, a
#: stray byte. Never empty: a zero-length datagram reads as the link's end.
GRANTS = st.one_of(
    st.binary(min_size=1, max_size=12),
    st.builds(
        encode_grant, st.lists(st.sampled_from([0, 1]), max_size=3), st.sampled_from(TLSRole)
    ),
    st.builds(
        lambda role, count, indexes, extra: (
            GRANT_HEADER.pack(role, len(indexes) if count is None else count)
            + struct.pack(f">{len(indexes)}H", *indexes)
            + extra
        ),
        st.one_of(st.sampled_from(TLSRole), st.sampled_from([2, 255])),
        st.one_of(st.none(), st.sampled_from([0, 1, 3, 0xFFFF])),
        st.lists(st.one_of(st.sampled_from([0, 1]), st.sampled_from([2, 0xFFFF])), max_size=4),
        st.one_of(st.just(b""), st.just(b"\x00")),
    ),
)
#: What the connection then asks to have signed, with key 0, and the roles
#: whose worker signs that.
INPUTS = {
    "tls13-server": (tls13_input, {ACCEPT}),
    "tls12-server": (tls12_input, {ACCEPT}),
    "tls13-client": (tls13_client_input, {CONNECT}),
}


@settings(max_examples=200, deadline=None)
@given(message=GRANTS, kind=st.sampled_from(sorted(INPUTS)))
def test_any_grant_gets_exactly_its_scope_or_no_connection(
    key_server: RunningKeyServer, keys: Keys, message: bytes, kind: str
) -> None:
    """Through the real process: a well-formed grant's connection signs for
    its certificates and its role only; any other closes it unserved; the
    link and the server live on."""
    scope = _grant_scope(message, len(keys.paths))
    make_input, roles = INPUTS[kind]
    with _granted(key_server, message) as worker:
        try:
            answer = _ask(worker, _request(_key(keys.paths[0]), make_input()))
        except (BrokenPipeError, ConnectionResetError):  # closed before the request
            answer = b""
    if scope is None:
        assert answer == b""
    else:
        role, allowed = scope
        status = STATUS_SIGNED if 0 in allowed and role in roles else STATUS_REFUSED
        assert HEADER.unpack_from(answer)[1] == status
    assert _signs(key_server, _key(keys.paths[0]))


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00",
        b"GET / HTTP/1.1\r\n\r\n",
        bytes(2000),
        HEADER.pack(2, 1, 1, 0, 1) + bytes(16) + b"data",
        HEADER.pack(1, 9, 1, 0, 1) + bytes(16) + b"data",
        HEADER.pack(1, 1, 9, 0, 1) + bytes(16) + b"data",
        HEADER.pack(1, 1, 1, 0, 1) + bytes(16),
    ],
    ids=["one-byte", "http", "oversized", "version", "scheme", "digest", "no-data"],
)
def test_garbage_drops_only_its_connection(
    key_server: RunningKeyServer, keys: Keys, garbage: bytes
) -> None:
    key = _key(keys.paths[0])
    dropped = key_server.total("dropped")
    with key_server.connect([0]) as bystander, key_server.connect([0]) as victim:
        assert _ask(victim, garbage) == b""
        answer = _ask(bystander, _request(key, tls13_input()))
        assert HEADER.unpack_from(answer)[1] == STATUS_SIGNED
    _wait_for_count(key_server, "dropped", dropped + 1)
    assert key_server.process.process.poll() is None


def test_concurrent_connections_never_cross_replies(
    key_server: RunningKeyServer, keys: Keys
) -> None:
    key = _key(keys.paths[0])
    connections = [key_server.connect([0]) for _ in range(CONCURRENT_CONNECTIONS)]
    inputs = [tls13_input() for _ in connections]
    for number, (connection, data) in enumerate(zip(connections, inputs, strict=True)):
        connection.send(_request(key, data, request_id=number))
    for number, (connection, data) in enumerate(zip(connections, inputs, strict=True)):
        connection.settimeout(10)
        answer = connection.recv(4096)
        assert HEADER.unpack_from(answer)[4] == number
        _verify(key, Scheme.ECDSA, data, answer[HEADER.size :])
        connection.close()


def test_unusable_key_files_are_named(tmp_path: Path, keys: Keys) -> None:
    not_a_key = tmp_path / "cert.pem"
    not_a_key.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(HelperStartError) as missing:
        open_key_files({"tls": {"certificates": [{"key": str(tmp_path / "absent.pem")}]}})
    assert missing.value.problems == [
        f"tls.certificates[0].key: file not found: {tmp_path / 'absent.pem'}"
    ]
    process = KeyServerProcess(encode(isolation(tmp_path)), lambda counts: None)
    files = open_key_files({"tls": {"certificates": [{"key": str(not_a_key)}]}})
    try:
        with pytest.raises(HelperStartError) as unusable:
            process.load(files)
    finally:
        for fd in files:
            os.close(fd)
        process.stop()
    assert unusable.value.problems[0].startswith(
        "tls.certificates[0].key: not a usable PEM private key"
    )


def test_an_unusable_keeper_message_is_refused_and_the_server_lives_on(
    tmp_path: Path, keys: Keys
) -> None:
    """Regression: a keeper message that was not JSON ended the key server
    with a traceback, and a load request without descriptors went unanswered
    (the keeper waited out its timeout)."""
    process = KeyServerProcess(encode(isolation(tmp_path)), lambda counts: None)
    try:
        process.control.send(b"not json")
        process.control.send(b'{"load": "not a list"}')
        process.control.send(Ready(()).encode())
        process.control.send(LoadKeys(("tls.certificates[0].key",)).encode())
        assert process.receive() == Problems(("a load request without a link",))
        files = open_key_files({"tls": {"certificates": [{"key": str(keys.paths[0])}]}})
        try:
            references, link = process.load(files)
        finally:
            for fd in files:
                os.close(fd)
        link.close()
        assert len(references) == 1
    finally:
        process.stop()


def test_a_connection_dropped_while_its_granter_still_holds_it_is_forgotten(
    key_server: RunningKeyServer, keys: Keys
) -> None:
    """The TLS helper closes its copy of the key server's end of a worker's
    connection only after ``grant`` sent it (helper.c), so under load the
    key server may drop the connection (its worker already gone; a request
    refused or malformed) while that copy is still open. Closing a
    descriptor does not take its socket out of an epoll set while another
    descriptor, in any process, still holds the socket: unless the key
    service removes it itself, epoll goes on reporting the freed connection
    (readable at end of file) and the key server works on freed memory. It
    died of it (a double free; glibc's message, written with writev, was
    what the seccomp filter killed it for)."""
    key = _key(keys.paths[0])
    cases = ((None, ""), (b"\x00", "dropped"), (_request(key, b"not a handshake"), "refused"))
    for garbage, result in cases:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs:
            grant = encode_grant([0], TLSRole.ACCEPT)
            socket.send_fds(key_server.link.sock, [grant], [ours.fileno()])
            if garbage is not None:
                before = key_server.total(result)
                theirs.send(garbage)
                _wait_for_count(key_server, result, before + 1)
            theirs.close()  # the worker's end: readable at end of file now
            # Long enough for the key server to drop the connection and
            # wait again, with our copy still open.
            time.sleep(0.3)
            assert key_server.process.process.poll() is None
            assert _signs(key_server, key)
        assert _signs(key_server, key)
    assert key_server.process.process.poll() is None
