"""``answer_request`` (``keys/service/signing.c``) alone, built here with
AddressSanitizer and UBSan: every buffer it is handed is allocated to its
exact size, so that reading a request past its end, or writing a refusal's
reason past ``reason_size``, aborts the harness instead of passing unseen.

The real key server hands it a request buffer larger than any request and a
reason buffer larger than any reason, which hides both; its answers are
tested in test_keyserver_process. The harness's scope holds one P-256 key
(id ``HARNESS_KEY_ID``), so that a request for it reaches the check of its
data against the scope's role, which reads the data within its size only.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from starttls_proxy.keys import server as keyserver
from starttls_proxy.keys.server import (
    HEADER,
    KEY_ID_SIZE,
    MAX_REQUEST,
    TLS13_CLIENT_CONTEXT,
    TLS13_SERVER_CONTEXT,
    WIRE_VERSION,
    Scheme,
)
from starttls_proxy.wire import TLSRole

KEYSERVICE = Path(keyserver.__file__).with_name("service")
INCLUDE = Path(keyserver.__file__).parent
SIGNED, REFUSED, MALFORMED = 0, 1, 2  # enum outcome in signing.h
HARNESS_KEY_ID = b"\xa5" * KEY_ID_SIZE

HARNESS = r"""
#define _POSIX_C_SOURCE 200809L /* strnlen */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/ec.h>

#include "signing.h"

static int read_exact(void *buffer, size_t size)
{
    return fread(buffer, 1, size, stdin) == size;
}

/* stdin: records of role (u8), reason size (u16), request size (u16),
 * request. stdout, for each: outcome (u8), reason length (u16), reason. A
 * scope of one P-256 key, its id 16 bytes 0xa5, for one signature per
 * record: any other key id is refused, naming it. */
int main(void)
{
    unsigned char sizes[5];
    bool allowed = true;
    struct key key = {.pkey = EVP_EC_gen("P-256")};
    struct scope scope = {.keys = &key, .allowed = &allowed, .count = 1};

    if (key.pkey == NULL)
        return 1;
    memset(key.id, 0xa5, KEY_ID_SIZE);
    while (read_exact(sizes, sizeof(sizes))) {
        size_t reason_size = (size_t)(sizes[1] << 8 | sizes[2]);
        size_t size = (size_t)(sizes[3] << 8 | sizes[4]);
        unsigned char *request = malloc(size), answer[ANSWER_CAPACITY];
        char *reason = malloc(reason_size);
        size_t answer_size = 0, length = 0;
        enum outcome outcome;

        if (request == NULL || reason == NULL || !read_exact(request, size))
            return 1;
        scope.role = sizes[0] == GRANT_CONNECT ? GRANT_CONNECT : GRANT_ACCEPT;
        scope.signatures = 0;
        outcome = answer_request(&scope, request, size, answer, &answer_size, reason,
                                 reason_size);
        if (outcome == REFUSED)
            length = strnlen(reason, reason_size);
        printf("%c%c%c", outcome, (int)(length >> 8), (int)(length & 0xff));
        fwrite(reason, 1, length, stdout);
        fflush(stdout);
        free(request);
        free(reason);
    }
    key_clear(&key);
    return 0;
}
"""


class Harness:
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def answer(
        self, request: bytes, reason_size: int, role: TLSRole = TLSRole.ACCEPT
    ) -> tuple[int, bytes]:
        """The outcome of ``request`` from a connection of ``role`` and the
        refusal's reason (NUL left out)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        record = struct.pack(">BHH", role, reason_size, len(request)) + request
        self.process.stdin.write(record)
        self.process.stdin.flush()
        head = self.process.stdout.read(3)
        assert len(head) == 3, "the harness died: see its sanitizer report above"
        outcome, length = struct.unpack(">BH", head)
        return outcome, self.process.stdout.read(length)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    directory = tmp_path_factory.mktemp("signing")
    source, binary = directory / "harness.c", directory / "harness"
    source.write_text(HARNESS)
    # gcc and the harness without the sanitizer runtime scripts/test-sanitized.sh
    # preloads for the key service. No leak check: this is about bounds, and
    # LeakSanitizer needs ptrace, which a container may not allow.
    env = {
        **{key: value for key, value in os.environ.items() if key != "LD_PRELOAD"},
        "ASAN_OPTIONS": "detect_leaks=0",
    }
    flags = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-fno-omit-frame-pointer"]
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    include = [f"-I{KEYSERVICE}", f"-I{INCLUDE}"]
    sources = [source, KEYSERVICE / "signing.c"]
    subprocess.run(
        ["gcc", *flags, *sanitize, *include, "-o", binary, *sources, "-lcrypto"],
        check=True,
        env=env,
    )
    with subprocess.Popen(
        [binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    ) as process:
        yield Harness(process)
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(timeout=10) == 0


def _request(key: bytes, data: bytes) -> bytes:
    return HEADER.pack(WIRE_VERSION, Scheme.ECDSA, 1, 0, 7) + key + data


def _signed_by(role: TLSRole, data: bytes) -> bool:
    """keyserver_wire.h's rule: what a TLS endpoint of ``role`` signs."""

    def tls13(context: bytes) -> bool:
        return data.startswith(context) and len(data) - len(context) in (32, 48, 64)

    if role == TLSRole.CONNECT:
        return tls13(TLS13_CLIENT_CONTEXT)
    # Randoms, named_curve (3), a group, the point's size, the point.
    tls12 = len(data) > 68 and data[64] == 3 and data[67] == len(data) - 68
    return tls13(TLS13_SERVER_CONTEXT) or tls12


@pytest.mark.parametrize("size", range(len(_request(bytes(KEY_ID_SIZE), b"")) + 1))
def test_a_request_without_data_is_malformed_and_read_only_within_its_size(
    harness: Harness, size: int
) -> None:
    request = _request(bytes(KEY_ID_SIZE), b"")[:size]
    assert harness.answer(request, 128) == (MALFORMED, b"")


@given(
    key=st.binary(min_size=KEY_ID_SIZE, max_size=KEY_ID_SIZE),
    reason_size=st.integers(1, 80),
)
def test_a_refusal_s_reason_is_cut_to_its_buffer(
    harness: Harness, key: bytes, reason_size: int
) -> None:
    assume(key != HARNESS_KEY_ID)
    full = f"key {key.hex()} is not this connection's".encode()
    outcome, reason = harness.answer(_request(key, b"data"), reason_size)
    assert (outcome, reason) == (REFUSED, full[: reason_size - 1])


@given(request=st.binary(max_size=MAX_REQUEST + 2), reason_size=st.integers(1, 128))
def test_any_request_stays_within_its_buffers(
    harness: Harness, request: bytes, reason_size: int
) -> None:
    outcome, reason = harness.answer(request, reason_size)
    assert outcome in (SIGNED, REFUSED, MALFORMED)
    assert len(reason) < reason_size


def _mutated(data: bytes, at: int, byte: int) -> bytes:
    if not data:
        return data
    at %= len(data)
    return data[:at] + bytes([byte]) + data[at + 1 :]


#: Data of and near each role's shapes: both TLS 1.3 prefixes (whole, cut
#: short or with one byte changed) with hashes of the right sizes and of any
#: size near them, TLS 1.2 ServerKeyExchange inputs with right and wrong
#: sizes, and bytes.
_PREFIX = st.sampled_from([TLS13_SERVER_CONTEXT, TLS13_CLIENT_CONTEXT])
_TLS13 = st.builds(
    lambda prefix, cut, hash_size, mutate, at, byte: (
        (_mutated(prefix[:cut], at, byte) if mutate else prefix[:cut]) + bytes(hash_size)
    ),
    _PREFIX,
    st.one_of(st.just(len(TLS13_SERVER_CONTEXT)), st.integers(0, len(TLS13_SERVER_CONTEXT))),
    st.one_of(st.sampled_from([32, 48, 64]), st.integers(0, 70)),
    st.sampled_from([False, False, True]),
    st.integers(0, 200),
    st.integers(0, 255),
)
_TLS12 = st.builds(
    lambda curve, share, stated, randoms: (
        randoms + bytes([curve, 0, 29, len(share) if stated is None else stated]) + share
    ),
    st.sampled_from([3, 3, 1]),
    st.binary(max_size=70),
    st.one_of(st.none(), st.integers(0, 255)),
    st.one_of(st.just(bytes(64)), st.binary(min_size=60, max_size=66)),
)
_TLS13_EXACT = st.builds(
    lambda prefix, size, seed: prefix + bytes([seed]) * size,
    _PREFIX,
    st.sampled_from([32, 48, 64]),
    st.integers(0, 255),
)
_ANY = st.binary(min_size=1, max_size=200)
#: Not empty: a request without data is malformed.
INPUT_SHAPES = st.one_of(_TLS13_EXACT, _TLS13, _TLS12, _ANY).filter(bool)


@settings(max_examples=500)
@given(role=st.sampled_from(TLSRole), data=INPUT_SHAPES, reason_size=st.integers(1, 64))
def test_the_role_s_shape_check_reads_the_data_only_and_keeps_its_rule(
    harness: Harness, role: TLSRole, data: bytes, reason_size: int
) -> None:
    """Each request is allocated to its exact size: a shape check that read
    past the data would abort the harness."""
    outcome, reason = harness.answer(_request(HARNESS_KEY_ID, data), reason_size, role)
    if _signed_by(role, data):
        assert (outcome, reason) == (SIGNED, b"")
        return
    signer = "1.3 client" if role == TLSRole.CONNECT else "server"
    full = f"not what a TLS {signer} signs in a handshake".encode()
    assert (outcome, reason) == (REFUSED, full[: reason_size - 1])


@pytest.mark.parametrize("role", list(TLSRole))
@pytest.mark.parametrize(
    "data",
    [
        TLS13_SERVER_CONTEXT + bytes(32),
        TLS13_CLIENT_CONTEXT + bytes(48),
        bytes(64) + bytes([3, 0, 23, 65]) + bytes(65),
    ],
    ids=["tls13-server", "tls13-client", "tls12-server"],
)
def test_each_input_is_signed_for_its_role_alone(
    harness: Harness, role: TLSRole, data: bytes
) -> None:
    outcome, _ = harness.answer(_request(HARNESS_KEY_ID, data), 128, role)
    assert (outcome == SIGNED) == _signed_by(role, data)
    client = data.startswith(TLS13_CLIENT_CONTEXT)
    assert (outcome == SIGNED) == (client == (role == TLSRole.CONNECT))
