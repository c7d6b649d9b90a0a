"""Capability probes against real backends, as the real proxy makes and logs them."""

from __future__ import annotations

import contextlib
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_smtp_reply
from tests.realservers.net import free_port
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import ProxyProcess, listener, running_proxy

FALLBACK = "PIPELINING 8BITMIME ENHANCEDSTATUSCODES"


def test_a_probe_that_times_out_says_so(tmp_path: Path, test_certs: CertFiles) -> None:
    """Regression: the log line read ``failed ()``, a timeout's message being empty."""
    # Connections complete in the kernel's backlog, and nothing ever answers.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        with running_proxy(
            tmp_path,
            [(test_certs.cert, test_certs.key)],
            [listener("silent", port, timeouts={"backend_connect": 0.5})],
        ) as proxy:
            proxy.wait_for_log(
                f"silent: capability probe of 127.0.0.1:{port} failed "
                f"(timed out after 0.5 s); advertising {FALLBACK}"
            )


def _relay(one: socket.socket, other: socket.socket) -> None:
    """Bytes both ways until either side ends (a probe's short dialogue)."""
    with one, other:
        peers = {one: other, other: one}
        while True:
            for sock in select.select(list(peers), [], [])[0]:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)


@contextlib.contextmanager
def _cable(port: int) -> Iterator[tuple[int, Callable[[], None]]]:
    """A port relayed to the backend on ``port``, and what pulls the cable:
    once it returns the port refuses connections, as a backend that is down."""
    pulled = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as entry:

        def serve() -> None:
            while not pulled.is_set():
                if select.select([entry], [], [], 0.05)[0]:
                    client, _ = entry.accept()
                    backend = socket.create_connection(("127.0.0.1", port))
                    threading.Thread(target=_relay, args=(client, backend), daemon=True).start()
            entry.close()

        server = threading.Thread(target=serve)
        server.start()

        def pull() -> None:
            pulled.set()
            server.join()

        try:
            yield entry.getsockname()[1], pull
        finally:
            pull()


def _ehlo_keywords(proxy: ProxyProcess) -> list[str]:
    with proxy.connect("smtp") as sock:
        assert read_smtp_reply(sock).startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        lines = read_smtp_reply(sock).decode().splitlines()
        sock.sendall(b"QUIT\r\n")
    return [line[4:] for line in lines[1:]]


def _reload(proxy: ProxyProcess, port: int) -> None:
    """SIGHUP; returns once the new listener's first probe has failed."""
    mark = len(proxy.log())
    proxy.process.send_signal(signal.SIGHUP)
    failed = f"capability probe of 127.0.0.1:{port} failed"
    deadline = time.monotonic() + 60
    while not re.search(f"reloaded(.|\n)*{failed}", proxy.log()[mark:]):
        assert time.monotonic() < deadline, proxy.log()[mark:]
        time.sleep(0.05)


def test_a_reload_keeps_what_the_probes_learned(
    tmp_path: Path, test_certs: CertFiles, postfix: PostfixInstance
) -> None:
    """Regression: a reload rebuilt the listener with the fallback list, which
    it then advertised for as long as the backend did not answer a probe."""
    with (
        _cable(postfix.plain_port) as (port, pull),
        running_proxy(
            tmp_path, [(test_certs.cert, test_certs.key)], [listener("smtp", port)]
        ) as proxy,
    ):
        probed = _ehlo_keywords(proxy)
        assert "SIZE" in " ".join(probed) and probed != FALLBACK.split(), probed
        pull()
        _reload(proxy, port)
        assert _ehlo_keywords(proxy) == probed

        # Another backend: what the first one offered says nothing about it.
        config = yaml.safe_load(proxy.config_path.read_text())
        dead = free_port()
        config["listeners"][0]["backend"]["address"] = f"127.0.0.1:{dead}"
        proxy.config_path.write_text(yaml.safe_dump(config))
        _reload(proxy, dead)
        assert " ".join(_ehlo_keywords(proxy)).startswith(FALLBACK)
