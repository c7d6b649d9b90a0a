"""The TLS helper process: holds the TLS contexts and forks one worker per
connection.

The main process starts it as a fresh interpreter (``python -m
starttls_proxy.zygote FD``) before its event loop runs, so the helper never
inherits the main process's memory, and no fork ever happens inside a
running event loop. It imports only what workers need, loads the
certificates, freezes the garbage collector (so that forked workers keep
sharing the pages copy-on-write), then serves requests on a SOCK_SEQPACKET
control socket.

Wire format: one JSON object per datagram.

* main -> helper, first: ``{"tls": <TLSConfig as JSON>}``
* helper -> main: ``{"ready": true}`` or ``{"problems": ["tls.certificates[0].key: ..."]}``
* main -> helper: ``{"spawn": ID, "handshake_timeout": S, "server_name_hint": NAME|null}``
  with two descriptors attached (SCM_RIGHTS): the client socket and the
  worker's end of the plaintext channel.
* helper -> main: ``{"spawned": ID, "pid": PID}`` and later
  ``{"exited": PID, "status": CODE}`` (a negative code is the killing signal).
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import sys

from starttls_proxy.config import ConfigError, TLSConfig
from starttls_proxy.tls_contexts import CertificateStore, load_certificates
from starttls_proxy.wire import MAX_SPAWN_REQUEST, SpawnRequest
from starttls_proxy.worker import main as worker_main

MAX_MESSAGE = 64 * 1024


def _send(control: socket.socket, message: dict[str, object]) -> None:
    control.send(json.dumps(message).encode())


def _close_all_fds_except(keep: list[int]) -> None:
    """Close every descriptor above stderr that is not in ``keep``."""
    low = 3
    for fd in sorted(fd for fd in keep if fd >= low):
        # Never call closerange(a, b) with b < a: CPython hands it to
        # close_range(2) as an unsigned "up to the end".
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _fork_worker(store: CertificateStore, request: SpawnRequest, fds: list[int]) -> int:
    client_fd, channel_fd = fds
    context = store.context_for(request.server_name_hint)
    pid = os.fork()
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _close_all_fds_except([0, 1, 2, client_fd, channel_fd])
        worker_main(client_fd, channel_fd, context, request)
    os.close(client_fd)
    os.close(channel_fd)
    return pid


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        _send(control, {"exited": pid, "status": code})


def serve(control: socket.socket) -> int:
    """Load the certificates, then fork workers until the main process leaves."""
    first = json.loads(control.recv(MAX_MESSAGE))
    try:
        store = load_certificates(TLSConfig.model_validate(first["tls"]))
    except ConfigError as error:
        _send(control, {"problems": error.problems})
        return 1
    _send(control, {"ready": True})

    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    # Ctrl-C in a terminal reaches the whole process group: the main process
    # decides when the helper ends (by closing the control socket).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()

    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_read:
                while True:
                    try:
                        os.read(wake_read, 512)
                    except BlockingIOError:
                        break
                _reap(control)
                continue
            try:
                message, fds, _, _ = socket.recv_fds(control, MAX_SPAWN_REQUEST, 2)
            except InterruptedError:
                continue
            if not message:
                return 0
            request = SpawnRequest.decode(message)
            if len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                continue
            pid = _fork_worker(store, request, fds)
            _send(control, {"spawned": request.id, "pid": pid})


if __name__ == "__main__":
    sys.exit(serve(socket.socket(fileno=int(sys.argv[1]))))
