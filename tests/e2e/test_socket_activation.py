"""systemd socket activation: the proxy serves the listening sockets the
service manager passes (``systemd-socket-activate``, which binds them, starts
the proxy on the first connection and hands them over like systemd does)."""

from __future__ import annotations

import smtplib
import socket
import time
from pathlib import Path

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.daemons import find_program
from tests.realservers.net import free_port
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import ProxyProcess, listener, start_proxy

ACTIVATE = "systemd-socket-activate"


@pytest.fixture(autouse=True)
def _activate_installed() -> None:
    if find_program(ACTIVATE) is None:
        pytest.fail(f"{ACTIVATE} is not installed (Debian: systemd)", pytrace=False)


def _activated(
    tmp_path: Path, test_certs: CertFiles, postfix: PostfixInstance, *addresses: str
) -> tuple[ProxyProcess, int]:
    """The proxy under systemd-socket-activate with an SMTP listener on the
    first of ``addresses`` (all of them are passed); its port."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    launcher = [ACTIVATE, "-l", listen]
    for address in addresses:
        launcher += ["-l", address]
    proxy = start_proxy(
        tmp_path,
        [(test_certs.cert, test_certs.key)],
        [listener("smtp", postfix.plain_port, listen=listen)],
        launcher=tuple(launcher),
    )
    deadline = time.monotonic() + 10
    while "Listening on" not in proxy.log():  # the activator has bound the port
        assert time.monotonic() < deadline and proxy.process.poll() is None, proxy.log()
        time.sleep(0.05)
    return proxy, port


def test_the_first_connection_starts_the_proxy_on_the_passed_socket(
    tmp_path: Path, test_certs: CertFiles, postfix: PostfixInstance
) -> None:
    proxy, port = _activated(tmp_path, test_certs, postfix)
    try:
        # Waits in the passed socket's backlog until the proxy has started.
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.ehlo("client.test")
            assert client.has_extn("starttls")
            client.starttls(context=test_certs.client_context())
            assert client.ehlo("client.test")[0] == 250
        assert "smtp: serving the socket the service manager passed" in proxy.log()
    finally:
        assert proxy.stop() == 0, proxy.log()[-3000:]
    assert "Traceback" not in proxy.log()


def test_a_passed_socket_no_listener_claims_stops_the_start(
    tmp_path: Path, test_certs: CertFiles, postfix: PostfixInstance
) -> None:
    stray = f"127.0.0.1:{free_port()}"
    proxy, port = _activated(tmp_path, test_certs, postfix, stray)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            assert proxy.process.wait(60) == 2
    finally:
        proxy.stop()
    assert (
        f"the service manager passed a socket on {stray} that matches no listener's listen "
        "address" in proxy.log()
    )
