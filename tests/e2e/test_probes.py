"""Capability probes of a backend that does not answer, as the real proxy logs them."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.realservers.certs import CertFiles
from tests.realservers.proxy import listener, running_proxy


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
                "(timed out after 0.5 s); advertising PIPELINING 8BITMIME ENHANCEDSTATUSCODES"
            )
