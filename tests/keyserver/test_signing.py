"""``answer_request`` (``keys/service/signing.c``) alone, built here with
AddressSanitizer and UBSan: every buffer it is handed is allocated to its
exact size, so that reading a request past its end, or writing a refusal's
reason past ``reason_size``, aborts the harness instead of passing unseen.

The real key server hands it a request buffer larger than any request and a
reason buffer larger than any reason, which hides both; its answers are
tested in test_keyserver_process.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from starttls_proxy.keys import server as keyserver
from starttls_proxy.keys.server import HEADER, KEY_ID_SIZE, MAX_REQUEST, WIRE_VERSION, Scheme

KEYSERVICE = Path(keyserver.__file__).with_name("service")
INCLUDE = Path(keyserver.__file__).parent
MALFORMED, REFUSED = 2, 1  # enum outcome in signing.h

HARNESS = r"""
#define _POSIX_C_SOURCE 200809L /* strnlen */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "signing.h"

static int read_exact(void *buffer, size_t size)
{
    return fread(buffer, 1, size, stdin) == size;
}

/* stdin: records of reason size (u16), request size (u16), request.
 * stdout, for each: outcome (u8), reason length (u16), reason. A scope
 * without keys: a well-formed request is refused, naming its key id. */
int main(void)
{
    unsigned char sizes[4];
    struct scope scope = {NULL, NULL, 0, 0};

    while (read_exact(sizes, sizeof(sizes))) {
        size_t reason_size = (size_t)(sizes[0] << 8 | sizes[1]);
        size_t size = (size_t)(sizes[2] << 8 | sizes[3]);
        unsigned char *request = malloc(size), answer[ANSWER_CAPACITY];
        char *reason = malloc(reason_size);
        size_t answer_size = 0, length = 0;
        enum outcome outcome;

        if (request == NULL || reason == NULL || !read_exact(request, size))
            return 1;
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
    return 0;
}
"""


class Harness:
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def answer(self, request: bytes, reason_size: int) -> tuple[int, bytes]:
        """The outcome of ``request`` and the refusal's reason (NUL left out)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(struct.pack(">HH", reason_size, len(request)) + request)
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
    full = f"key {key.hex()} is not this connection's".encode()
    outcome, reason = harness.answer(_request(key, b"data"), reason_size)
    assert (outcome, reason) == (REFUSED, full[: reason_size - 1])


@given(request=st.binary(max_size=MAX_REQUEST + 2), reason_size=st.integers(1, 128))
def test_any_request_stays_within_its_buffers(
    harness: Harness, request: bytes, reason_size: int
) -> None:
    outcome, reason = harness.answer(request, reason_size)
    assert outcome in (REFUSED, MALFORMED)
    assert len(reason) < reason_size
