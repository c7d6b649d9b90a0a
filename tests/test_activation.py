"""Matching the sockets a service manager passes to the listeners
(``activation``; the real thing runs in tests/e2e/test_socket_activation.py)."""

from __future__ import annotations

import os
import socket

from starttls_proxy.config import SocketAddress
from starttls_proxy.proxy.activation import FIRST_FD, PassedSockets
from tests.realservers.net import free_port


def test_sockets_are_matched_by_address_whatever_its_spelling() -> None:
    with socket.create_server(("127.0.0.1", 0)) as first:
        second_port = free_port()
        passed = PassedSockets([first])
        port = first.getsockname()[1]
        assert passed.take(SocketAddress(host="127.0.0.2", port=port)) is None
        assert passed.take(SocketAddress(host="127.0.0.1", port=second_port)) is None
        assert passed.take(SocketAddress(host="::ffff:127.0.0.1", port=port)) is first
        assert passed.leftover_problems() == []


def test_a_socket_no_listener_takes_is_named() -> None:
    with socket.create_server(("127.0.0.1", 0)) as stray:
        port = stray.getsockname()[1]
        assert PassedSockets([stray]).leftover_problems() == [
            f"the service manager passed a socket on 127.0.0.1:{port} that matches no "
            "listener's listen address"
        ]


def test_variables_for_another_process_are_dropped_and_ignored() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "PATH": "/bin"}
    assert PassedSockets.take_from_environment(environ).sockets == []
    assert environ == {"PATH": "/bin"}


def test_a_passed_descriptor_that_is_no_socket_is_named() -> None:
    read_end, write_end = os.pipe()
    try:
        # Passed "as systemd would": LISTEN_PID is this process.
        target = FIRST_FD + 200
        os.dup2(read_end, target)
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        passed = PassedSockets.take_from_environment(environ, first_fd=target)
        assert passed.sockets == []
        assert passed.leftover_problems() == [
            f"the service manager passed descriptor {target}: Socket operation on non-socket"
        ]
    finally:
        os.close(target)
        os.close(read_end)
        os.close(write_end)
