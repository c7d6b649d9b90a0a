"""What the workers read from other processes, fuzzed through the real helper.

A worker reads two things that do not come from its client: its
*assignment* from the helper (the spawn request as the helper checked it,
then the PIDs of its siblings: ``tls/helper/wire.h`` section 4) and the key
server's *replies* to its signature requests (``keys/keyserver_wire.h``, read by
the provider's ``signature.c``). Either peer may be compromised or broken;
a worker must then fail its connection with a defined exit status, never
crash, never sign with garbage. ``scripts/test-sanitized.sh`` runs these
tests against the helper and the provider built with AddressSanitizer and
UBSan.

* Replies: the test is the key server. The helper gets key references and
  a link whose other end the test holds; for each example a real client
  handshakes, the worker asks the test to sign, and the test answers with
  Hypothesis's bytes (arbitrary, or shaped like a reply with a wrong
  version, status, request id or signature, or the real signature).
* Assignments: a small ``LD_PRELOAD`` library, built here, replaces the
  payload of every message the helper sends with descriptors attached (an
  assignment) by the bytes the test wrote to a file.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from starttls_proxy.keys.server import HEADER, KEY_ID_SIZE, read_private_key
from starttls_proxy.wire import Ready, WorkerExit
from tests.tlshelper.harness import (
    RunningHelper,
    running_helper,
    sanitizer_runtime,
    signing_through_test,
)

#: A signature request: header, key id, then what to sign.
REQUEST_DATA_OFFSET = HEADER.size + KEY_ID_SIZE
#: How a worker may end when a peer sent it nonsense: never by a signal.
DEFINED_FAILURES = {WorkerExit.HANDSHAKE_FAILED, WorkerExit.CLIENT_GONE, WorkerExit.TLS_ERROR}


# ----------------------------------------------------------------------
# Key server replies.


@pytest.fixture(scope="module")
def signing_helper(
    cert_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningHelper, socket.socket]]:
    """A helper signing through the test (the link's other end)."""
    directory = tmp_path_factory.mktemp("signing")
    certificates = [(cert_dir / "cert.pem", cert_dir / "key.pem")]
    with signing_through_test(directory, certificates) as signing:
        yield signing


def _client_handshake(sock: socket.socket, cert_dir: Path) -> str:
    context = ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            return str(tls.version())
    except (ssl.SSLError, OSError):
        return "failed"


def _true_signature(cert_dir: Path, request: bytes) -> bytes:
    key = read_private_key((cert_dir / "key.pem").read_bytes(), "key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.sign(request[REQUEST_DATA_OFFSET:], ec.ECDSA(hashes.SHA256()))


_SHAPED = st.fixed_dictionaries(
    {
        "version": st.sampled_from([1, 0, 2, 255]),
        "status": st.sampled_from([0, 1, 2, 255]),
        "same_id": st.booleans(),
        "signature": st.one_of(st.just(b"TRUE"), st.binary(max_size=1100)),
    }
)


def _reply(shape: dict[str, object] | bytes, request: bytes, cert_dir: Path) -> bytes:
    if isinstance(shape, bytes):
        return shape
    _, _, _, _, request_id = HEADER.unpack_from(request)
    signature = shape["signature"]
    assert isinstance(signature, bytes)
    if signature == b"TRUE":
        signature = _true_signature(cert_dir, request)
    version, status = shape["version"], shape["status"]
    assert isinstance(version, int) and isinstance(status, int)
    answer_id = request_id if shape["same_id"] else request_id ^ 0x5A5A
    return HEADER.pack(version, status, 0, 0, answer_id) + signature


@settings(max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.one_of(st.binary(max_size=1100), _SHAPED))
def test_key_server_replies_never_break_a_worker(
    signing_helper: tuple[RunningHelper, socket.socket],
    cert_dir: Path,
    shape: dict[str, object] | bytes,
) -> None:
    helper, link = signing_helper
    connection = helper.spawn()
    message, fds, _, _ = socket.recv_fds(link, 1024, 1)
    # A worker that accepts, one certificate: index 0.
    assert len(fds) == 1 and message == b"\x00\x00\x01\x00\x00"
    with (
        socket.socket(fileno=fds[0]) as worker,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        outcome = pool.submit(_client_handshake, connection.client, cert_dir)
        worker.settimeout(10)
        request = worker.recv(4096)
        reply = _reply(shape, request, cert_dir)
        if reply:
            worker.send(reply)
        version = outcome.result(timeout=20)
    # The client leaves first: a worker whose channel closes first answers
    # its client with close_notify, which may find it gone.
    connection.client.close()
    status = helper.exit_of(connection.pid)
    connection.channel.close()
    valid = isinstance(shape, dict) and (
        (shape["version"], shape["status"], shape["same_id"], shape["signature"])
        == (1, 0, True, b"TRUE")
    )
    if valid:
        assert (version, status) == ("TLSv1.3", WorkerExit.OK)
    else:
        assert version == "failed"
        assert status in DEFINED_FAILURES, status


# ----------------------------------------------------------------------
# Assignments.

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

/* Every message sent with two or more descriptors (an assignment) leaves
 * with the payload in $STP_FUZZ_ASSIGNMENT instead; the helper is told
 * that what it meant to send went. */
ssize_t sendmsg(int fd, const struct msghdr *message, int flags)
{
    static ssize_t (*real)(int, const struct msghdr *, int);
    static char payload[65536];
    if (real == NULL)
        *(void **)&real = dlsym(RTLD_NEXT, "sendmsg");
    struct cmsghdr *c = message->msg_controllen ? CMSG_FIRSTHDR(message) : NULL;
    size_t fds = c != NULL && c->cmsg_type == SCM_RIGHTS
                     ? (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) : 0;
    const char *path = getenv("STP_FUZZ_ASSIGNMENT");
    if (fds < 2 || path == NULL)
        return real(fd, message, flags);
    int in = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t size = in < 0 ? 0 : read(in, payload, sizeof payload);
    if (in >= 0)
        close(in);
    struct iovec vector = {payload, size > 0 ? (size_t)size : 0};
    struct msghdr replaced = *message;
    replaced.msg_iov = &vector;
    replaced.msg_iovlen = 1;
    ssize_t sent = real(fd, &replaced, flags);
    size_t meant = 0;
    for (size_t i = 0; i < message->msg_iovlen; i++)
        meant += message->msg_iov[i].iov_len;
    return sent < 0 ? sent : (ssize_t)meant;
}
"""


@pytest.fixture(scope="module")
def fuzzed_helper(
    cert_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningHelper, Path]]:
    directory = tmp_path_factory.mktemp("assignments")
    source, shim = directory / "shim.c", directory / "shim.so"
    source.write_text(SHIM)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-Wall", "-Werror", "-o", shim, source, "-ldl"], check=True
    )
    payload = directory / "assignment"
    payload.write_bytes(b"")
    # A sanitized helper needs the sanitizer's runtime loaded first.
    preload = [lib for lib in (sanitizer_runtime(), str(shim)) if lib]
    env = {**os.environ, "LD_PRELOAD": ":".join(preload), "STP_FUZZ_ASSIGNMENT": str(payload)}
    with running_helper(
        directory, [(cert_dir / "cert.pem", cert_dir / "key.pem")], env=env
    ) as helper:
        assert isinstance(helper.reply, Ready), helper.reply
        yield helper, payload


def _spawn_request(early: bytes) -> bytes:
    """An accept request: no trust store, hint, peer name or ALPN."""
    return struct.pack("!IBBBBBH", 10_000, 0, 0, 0, 0, 0, len(early)) + early


_ASSIGNMENTS = st.one_of(
    st.binary(max_size=300),
    # A well-formed request, then a sibling list of any (mis)count.
    st.builds(
        lambda early, count, tail: _spawn_request(early) + struct.pack("!H", count) + tail,
        st.binary(max_size=64),
        st.integers(0, 0xFFFF),
        st.binary(max_size=64),
    ),
    # A request (either role) whose lengths overrun it.
    st.builds(
        lambda role, hint, name, alpn, early, cut: (
            struct.pack("!IBBB", 10_000, 1, role, hint)
            + b"h" * hint
            + bytes([name])
            + b"p" * name
            + bytes([alpn])
            + early
        )[:cut],
        st.integers(0, 2),
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=64),
        st.integers(0, 900),
    ),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(assignment=_ASSIGNMENTS)
def test_malformed_assignments_end_the_worker_cleanly(
    fuzzed_helper: tuple[RunningHelper, Path], assignment: bytes
) -> None:
    helper, payload = fuzzed_helper
    payload.write_bytes(assignment)
    connection = helper.spawn()
    # A worker that took the assignment for a good one waits for its client.
    connection.client.close()
    status = helper.exit_of(connection.pid)
    connection.channel.close()
    # A well-formed one may carry early bytes that are no ClientHello; a
    # malformed one can only come from a broken helper: the worker's own
    # side, counted as a crash.
    assert status in {
        *DEFINED_FAILURES,
        WorkerExit.SPARE_UNUSED,
        WorkerExit.NOT_TLS,
        WorkerExit.INTERNAL_ERROR,
    }, status
    assert helper.process.poll() is None


def _request(role: int, trust: int = 0, peer_name: bytes = b"", early: bytes = b"") -> bytes:
    """A spawn request (wire.h section 3) without hint or ALPN."""
    return b"".join(
        (
            struct.pack("!IBBBB", 10_000, trust, role, 0, len(peer_name)),
            peer_name,
            b"\x00",
            struct.pack("!H", len(early)),
            early,
        )
    )


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        pytest.param(_request(0), WorkerExit.CLIENT_GONE, id="accept"),
        pytest.param(_request(2), WorkerExit.INTERNAL_ERROR, id="no-such-role"),
        pytest.param(
            _request(0, peer_name=b"b.example"), WorkerExit.INTERNAL_ERROR, id="accept-peer-name"
        ),
        pytest.param(
            _request(1, peer_name=b"b.example"), WorkerExit.INTERNAL_ERROR, id="connect-no-trust"
        ),
        pytest.param(_request(1, 1), WorkerExit.INTERNAL_ERROR, id="connect-no-peer-name"),
        pytest.param(
            _request(1, 1, b"b.example", b"\x16"), WorkerExit.INTERNAL_ERROR, id="connect-early"
        ),
        pytest.param(_request(1, 1, b"b example"), WorkerExit.INTERNAL_ERROR, id="connect-space"),
        # This helper holds no trust store.
        pytest.param(
            _request(1, 1, b"b.example"), WorkerExit.INTERNAL_ERROR, id="connect-no-store"
        ),
    ],
)
def test_a_worker_checks_the_role_of_its_assignment_itself(
    fuzzed_helper: tuple[RunningHelper, Path], request_: bytes, status: WorkerExit
) -> None:
    """What the helper would have refused, a worker refuses too: only a
    request it accepts gets as far as waiting for its client."""
    helper, payload = fuzzed_helper
    payload.write_bytes(request_ + b"\x00\x00")  # no siblings
    connection = helper.spawn()
    if status == WorkerExit.INTERNAL_ERROR:
        assert helper.exit_of(connection.pid) == status
        connection.close()
        return
    # A worker that took it waits for its client's ClientHello.
    with pytest.raises(TimeoutError):
        helper.exit_of(connection.pid, timeout=0.5)
    connection.client.close()
    assert helper.exit_of(connection.pid) == status
    connection.channel.close()
