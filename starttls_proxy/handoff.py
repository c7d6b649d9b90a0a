"""Main-process side of the TLS helper: start it, hand it client sockets.

See ``zygote`` for the wire format. ``TLSHelper.start`` is blocking and runs
before the event loop; ``spawn`` is called from the loop and never blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Callable

from starttls_proxy.config import ConfigError, TLSConfig
from starttls_proxy.wire import MAX_EARLY_BYTES, SpawnRequest

log = logging.getLogger(__name__)

#: How long the helper may take to load certificates at start.
STARTUP_TIMEOUT = 30.0
MAX_MESSAGE = 64 * 1024


class HandoffError(Exception):
    """The TLS helper could not take the connection."""


class TLSHelper:
    def __init__(self, process: subprocess.Popen[bytes], control: socket.socket) -> None:
        self.process = process
        self.control = control
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Called with (pid, status) when a worker exits.
        self.on_worker_exit: Callable[[int, int], None] = lambda pid, status: None

    @classmethod
    def start(cls, tls: TLSConfig) -> TLSHelper:
        """Start the helper and wait until its certificates are loaded."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = subprocess.Popen(
            [sys.executable, "-m", "starttls_proxy.zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.settimeout(STARTUP_TIMEOUT)
        ours.send(json.dumps({"tls": tls.model_dump(mode="json")}).encode())
        try:
            reply = json.loads(ours.recv(MAX_MESSAGE) or b"{}")
        except TimeoutError:
            process.kill()
            raise ConfigError(["tls: the TLS helper did not start in time"]) from None
        if not reply.get("ready"):
            process.wait(5)
            raise ConfigError(reply.get("problems") or ["tls: the TLS helper failed to start"])
        ours.setblocking(False)
        return cls(process, ours)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.control.fileno(), self._on_message)

    def _on_message(self) -> None:
        while True:
            try:
                data = self.control.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            if not data:
                assert self._loop is not None
                self._loop.remove_reader(self.control.fileno())
                log.error("the TLS helper exited (status %s)", self.process.poll())
                return
            message = json.loads(data)
            if "exited" in message:
                self.on_worker_exit(message["exited"], message["status"])

    def spawn(self, client: socket.socket, request: SpawnRequest) -> socket.socket:
        """Give ``client`` to a new worker; return the main end of its channel.

        The caller still owns (and must close) ``client``: the worker has its
        own descriptor for it.
        """
        if len(request.early) > MAX_EARLY_BYTES:
            raise HandoffError(f"{len(request.early)} bytes before the TLS handshake started")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        request = dataclasses.replace(request, id=next(self._ids))
        try:
            socket.send_fds(self.control, [request.encode()], [client.fileno(), theirs.fileno()])
        except OSError as error:
            ours.close()
            raise HandoffError(f"cannot reach the TLS helper: {error}") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours

    def stop(self) -> None:
        """Close the control socket (the helper then exits) and reap it."""
        if self.control.fileno() < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.control.fileno())
        self.control.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
