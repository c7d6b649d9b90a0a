"""A recording tap: a TCP forwarder between the proxy and a backend that keeps
every byte the proxy sent, per connection, and a scripted fake backend.

The tap is the oracle of the injection tests: what it recorded is exactly
what the backend read, so a command that never appears there never ran.
It records before it forwards, so once a client holds the backend's reply
to a command, the recording holds that command and all that came before it.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Self

#: How long the threads block at most, so that closing them is prompt.
_POLL = 0.05


class _Server:
    """A loopback listener served by one daemon thread until ``close``."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port: int = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self._listener.close()

    def _run(self) -> None:
        raise NotImplementedError


class RecordingTap(_Server):
    """Forwards each connection to ``127.0.0.1:target_port`` and records what
    arrives from the connecting side (the proxy), and what the backend answered."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self._target_port = target_port
        self._lock = threading.Lock()
        self._recorded: list[bytearray] = []
        self._answered: list[bytearray] = []

    def recordings(self) -> list[bytes]:
        """What the proxy sent on each connection so far, oldest first."""
        with self._lock:
            return [bytes(recording) for recording in self._recorded]

    def answers(self) -> list[bytes]:
        """What the backend sent on each connection so far, in the order of ``recordings``."""
        with self._lock:
            return [bytes(answer) for answer in self._answered]

    def everything(self) -> bytes:
        """All recordings, each followed by a NUL so that none runs into the next."""
        return b"".join(recording + b"\0" for recording in self.recordings())

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        #: socket -> (the socket its bytes go to, where they are recorded)
        routes: dict[socket.socket, tuple[socket.socket, bytearray]] = {}
        try:
            while not self._closing.is_set():
                for key, _ in selector.select(_POLL):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        self._accept(selector, routes)
                    else:
                        self._forward(sock, selector, routes)
        finally:
            for sock in routes:
                sock.close()
            selector.close()

    def _accept(
        self,
        selector: selectors.BaseSelector,
        routes: dict[socket.socket, tuple[socket.socket, bytearray]],
    ) -> None:
        try:
            proxy_side, _ = self._listener.accept()
        except TimeoutError:
            return
        try:
            backend_side = socket.create_connection(("127.0.0.1", self._target_port), timeout=5)
        except OSError:
            proxy_side.close()
            return
        recording, answer = bytearray(), bytearray()
        with self._lock:
            self._recorded.append(recording)
            self._answered.append(answer)
        for sock in (proxy_side, backend_side):
            sock.setblocking(True)
            sock.settimeout(5)
            selector.register(sock, selectors.EVENT_READ)
        routes[proxy_side] = (backend_side, recording)
        routes[backend_side] = (proxy_side, answer)

    def _forward(
        self,
        sock: socket.socket,
        selector: selectors.BaseSelector,
        routes: dict[socket.socket, tuple[socket.socket, bytearray]],
    ) -> None:
        if sock not in routes:
            # Closed with its peer earlier in the same round of events.
            return
        peer, recording = routes[sock]
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if data:
            with self._lock:
                recording += data
            with contextlib.suppress(OSError):
                peer.sendall(data)
            return
        for end in (sock, peer):
            if end in routes:
                selector.unregister(end)
                del routes[end]
                end.close()


#: A fake backend's script: it gets the accepted connection and plays its part.
Script = Callable[[socket.socket], None]


class FakeBackend(_Server):
    """Runs ``script`` on every accepted connection, one at a time."""

    def __init__(self, script: Script) -> None:
        super().__init__()
        self._script = script
        self.connections = 0

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with sock:
                sock.settimeout(5)
                with contextlib.suppress(OSError):
                    self._script(sock)


def read_line(sock: socket.socket) -> bytes:
    """One line, read a byte at a time so that nothing after it is consumed."""
    line = b""
    while not line.endswith(b"\n"):
        octet = sock.recv(1)
        if not octet:
            break
        line += octet
    return line


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True
