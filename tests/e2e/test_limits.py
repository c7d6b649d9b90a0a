"""Every limit and timeout of a listener, against the real proxy process.

The backend is never reached here (capabilities are configured), so no
mail server is needed; each test waits on a bounded socket timeout.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_smtp_reply, smtp_starttls
from tests.realservers.net import free_port, read_to_end
from tests.realservers.proxy import ProxyProcess, StartProxy, listener, start_proxy


@pytest.fixture(scope="module")
def silent_backend() -> Iterator[socket.socket]:
    """A backend that accepts connections (in the kernel's backlog) and never speaks."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def proxy(
    module_proxy: StartProxy,
    silent_backend: socket.socket,
) -> ProxyProcess:
    unused = free_port()
    return module_proxy(
        [
            listener(
                "tight",
                unused,
                capabilities=["PIPELINING"],
                timeouts={"pre_tls": 1, "handshake": 1},
                limits={"max_connections": 2, "max_line_length": 512},
            ),
            listener(
                "silent",
                silent_backend.getsockname()[1],
                capabilities=["PIPELINING"],
                timeouts={"session_idle": 1},
            ),
        ],
    )


def _connect(proxy: ProxyProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.ports["tight"]), timeout=10)
    return sock


def test_pre_tls_timeout(proxy: ProxyProcess) -> None:
    sock = _connect(proxy)
    greeting_and_goodbye = read_to_end(sock)
    assert greeting_and_goodbye.startswith(b"220 proxy.test")
    assert greeting_and_goodbye.endswith(b"421 4.4.2 proxy.test Error: timeout exceeded\r\n")
    sock.close()


def test_handshake_timeout(proxy: ProxyProcess) -> None:
    sock = _connect(proxy)
    sock.recv(4096)
    sock.sendall(b"STARTTLS\r\n")
    assert sock.recv(4096).startswith(b"220 2.0.0")
    sock.sendall(b"\x16\x03\x01")  # a ClientHello that never completes
    assert read_to_end(sock) == b""
    sock.close()


def test_max_line_length(proxy: ProxyProcess) -> None:
    sock = _connect(proxy)
    sock.recv(4096)
    sock.sendall(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    replies = b""
    while replies.count(b"\r\n") < 2:
        replies += sock.recv(4096)
    assert replies == b"500 5.5.0 Error: line too long\r\n250 2.0.0 Ok\r\n"
    sock.close()


def test_max_connections(proxy: ProxyProcess) -> None:
    first, second = _connect(proxy), _connect(proxy)
    assert first.recv(4096).startswith(b"220 ")
    assert second.recv(4096).startswith(b"220 ")
    third = _connect(proxy)
    assert read_to_end(third) == b"421 4.7.0 proxy.test Error: too many connections\r\n"
    for sock in (first, second, third):
        sock.close()


def test_backend_that_never_greets_times_out_with_421(
    proxy: ProxyProcess, test_certs: CertFiles
) -> None:
    tls = smtp_starttls(proxy.connect("silent"), test_certs)
    tls.sendall(b"EHLO client.test\r\n")
    assert read_smtp_reply(tls) == b"421 4.4.2 proxy.test Error: timeout exceeded\r\n"
    tls.close()


@pytest.mark.parametrize("taken", ["listener", "metrics"])
def test_a_port_already_taken_stops_the_start_with_its_name(
    tmp_path: Path, test_certs: CertFiles, taken: str
) -> None:
    holder = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{holder.getsockname()[1]}"
    entry = listener("smtp", free_port(), capabilities=["PIPELINING"])
    options: dict[str, Any] = {}
    if taken == "listener":
        entry["listen"] = address
    else:
        options["metrics"] = {"listen": address}
    with holder, pytest.raises(RuntimeError) as failed:
        start_proxy(tmp_path, [(test_certs.cert, test_certs.key)], [entry], **options)
    name = "smtp" if taken == "listener" else "metrics"
    assert f"{name}: cannot listen on {address}: Address already in use" in str(failed.value)
    assert "Traceback" not in str(failed.value)
