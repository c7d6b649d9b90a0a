"""Private keys only in the key server, proven on the real proxy (as root).

The proxy serves an ECDSA P-256 certificate (the default) and an RSA-2048
one (SNI ``rsa.example.test``) with ``isolation.key_server: true``. Every
full handshake must be one signature by the key server (its counter, which
the keeper passes on to the main process's metrics), no process but the key
server may hold key material (``/proc/PID/mem``), a stopped or dead key
server makes new handshakes fail cleanly and is restarted, and established
sessions never notice.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.realservers import processes
from tests.realservers.certs import CertFiles, write_test_certs
from tests.realservers.dialogue import read_smtp_reply, smtp_upgraded
from tests.realservers.memory import memory_contains, private_key_patterns
from tests.realservers.metrics import scrape, total
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener

RSA_NAME = "rsa.example.test"
SIMULTANEOUS_HANDSHAKES = 64
#: The provider's wait for an answer (signature.c: TIMEOUT_MS), plus slack.
KEY_SERVER_TIMEOUT = 3.0
SIGNED = "starttls_proxy_key_server_requests_total"


@pytest.fixture(scope="module")
def rsa_certs(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA) -> CertFiles:
    return write_test_certs(
        tmp_path_factory.mktemp("certs-rsa"), test_ca, (RSA_NAME,), key_type=trustme.KeyType.RSA
    )


@pytest.fixture(scope="module")
def proxy(
    module_proxy: StartProxy,
    postfix: PostfixInstance,
    test_certs: CertFiles,
    rsa_certs: CertFiles,
    metrics_port: int,
) -> ProxyProcess:
    return module_proxy(
        [
            listener("relay", postfix.plain_port, backend={"identity": "xclient"}),
            listener(
                "implicit", postfix.plain_port, tls="implicit", backend={"identity": "xclient"}
            ),
        ],
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
        isolation={"key_server": True},
        certificates=[(test_certs.cert, test_certs.key), (rsa_certs.cert, rsa_certs.key)],
    )


# ----------------------------------------------------------------------
# Helpers.


def _signatures(port: int) -> float:
    """The key server's signatures so far, as the main process exports them."""
    return total(scrape(port), SIGNED, result="signed")


def _wait_for_signatures(port: int, expected: float) -> None:
    deadline = time.monotonic() + 10
    while (seen := _signatures(port)) < expected:
        assert time.monotonic() < deadline, f"{seen} signatures, expected {expected}"
        time.sleep(0.05)
    assert seen == expected


def _client_context(certs: CertFiles, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = certs.client_context()
    context.minimum_version = context.maximum_version = version
    return context


def _implicit(
    proxy: ProxyProcess, context: ssl.SSLContext, name: str, **options: object
) -> ssl.SSLSocket:
    """An implicit-TLS session, greeted by the backend (through the proxy)."""
    sock = proxy.connect("implicit")
    tls = context.wrap_socket(sock, server_hostname=name, **options)  # type: ignore[arg-type]
    assert read_smtp_reply(tls).startswith(b"220 ")
    return tls


def _still_works(tls: ssl.SSLSocket) -> None:
    tls.sendall(b"NOOP\r\n")
    assert read_smtp_reply(tls).startswith(b"250")


def _processes(proxy: ProxyProcess) -> dict[str, list[int]]:
    """main, keeper, key server, helper and its live children, by role."""
    helpers = processes.helpers(proxy)
    return {
        "main": [proxy.process.pid],
        "keeper": [processes.keeper(proxy)],
        "key server": processes.key_servers(proxy),
        "helper": helpers,
        "workers": [child for helper in helpers for child in processes.children(helper)],
    }


# ----------------------------------------------------------------------
# Every signature by the key server.


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("kind", ["ecdsa-p256", "rsa-2048"])
def test_every_full_handshake_is_one_key_server_signature(
    proxy: ProxyProcess,
    test_certs: CertFiles,
    rsa_certs: CertFiles,
    metrics_port: int,
    kind: str,
    version: ssl.TLSVersion,
) -> None:
    certs, name = (test_certs, "localhost") if kind == "ecdsa-p256" else (rsa_certs, RSA_NAME)
    before = _signatures(metrics_port)
    tls = _implicit(proxy, _client_context(certs, version), name)
    assert tls.version() == version.name.replace("v1_", "v1.")
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    public = x509.load_der_x509_certificate(der).public_key()
    if kind == "ecdsa-p256":
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    else:
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    _still_works(tls)
    tls.close()
    _wait_for_signatures(metrics_port, before + 1)


def _s_client(proxy: ProxyProcess, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{proxy.ports['implicit']}",
            "-servername",
            RSA_NAME,
            "-tls1_2",
            *arguments,
        ],
        input="QUIT\r\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_tls12_rsa_pkcs1_signature(
    proxy: ProxyProcess, rsa_certs: CertFiles, metrics_port: int
) -> None:
    before = _signatures(metrics_port)
    result = _s_client(proxy, "-sigalgs", "RSA+SHA256", "-CAfile", str(rsa_certs.ca))
    assert "Peer signature type: RSA\n" in result.stdout, result.stdout + result.stderr
    assert "Verify return code: 0 (ok)" in result.stdout
    _wait_for_signatures(metrics_port, before + 1)


def test_static_rsa_key_exchange_stays_disabled(proxy: ProxyProcess, metrics_port: int) -> None:
    before = _signatures(metrics_port)
    result = _s_client(proxy, "-cipher", "AES128-GCM-SHA256")
    assert result.returncode != 0
    assert "handshake failure" in result.stderr, result.stderr
    assert _signatures(metrics_port) == before


def test_a_resumed_handshake_needs_no_signature(
    proxy: ProxyProcess, test_certs: CertFiles, metrics_port: int
) -> None:
    context = _client_context(test_certs, ssl.TLSVersion.TLSv1_3)
    before = _signatures(metrics_port)
    first = _implicit(proxy, context, "localhost")  # the greeting brought the ticket
    session = first.session
    first.close()
    resumed = _implicit(proxy, context, "localhost", session=session)
    assert resumed.session_reused
    resumed.close()
    _wait_for_signatures(metrics_port, before + 1)


def test_simultaneous_handshakes_never_cross_replies(
    proxy: ProxyProcess, test_certs: CertFiles, rsa_certs: CertFiles, metrics_port: int
) -> None:
    before = _signatures(metrics_port)

    def session(number: int) -> int:
        certs, name = (test_certs, "localhost") if number % 2 else (rsa_certs, RSA_NAME)
        tls = _implicit(proxy, _client_context(certs, ssl.TLSVersion.TLSv1_3), name)
        tls.sendall(b"QUIT\r\n")
        read_smtp_reply(tls)
        tls.close()
        return number

    with ThreadPoolExecutor(SIMULTANEOUS_HANDSHAKES) as pool:
        done = list(pool.map(session, range(SIMULTANEOUS_HANDSHAKES)))
    # A crossed reply is a signature the client rejects: the session would fail.
    assert done == list(range(SIMULTANEOUS_HANDSHAKES))
    _wait_for_signatures(metrics_port, before + SIMULTANEOUS_HANDSHAKES)


# ----------------------------------------------------------------------
# Memory.


def test_key_material_only_in_the_key_server(
    proxy: ProxyProcess, test_certs: CertFiles, rsa_certs: CertFiles
) -> None:
    # Live workers of both kinds, mid-session, after their handshakes.
    sessions = [
        _implicit(proxy, _client_context(test_certs, ssl.TLSVersion.TLSv1_3), "localhost"),
        _implicit(proxy, _client_context(rsa_certs, ssl.TLSVersion.TLSv1_2), RSA_NAME),
    ]
    processes = _processes(proxy)
    assert len(processes["workers"]) >= len(sessions)
    ec_patterns = private_key_patterns(test_certs.key)
    rsa_patterns = private_key_patterns(rsa_certs.key)
    for role in ("main", "keeper", "helper", "workers"):
        for pid in processes[role]:
            assert memory_contains(pid, ec_patterns) == set(), (role, pid)
            assert memory_contains(pid, rsa_patterns) == set(), (role, pid)
    # The same scanner finds them where they are.
    (key_server,) = processes["key server"]
    assert {"scalar", "scalar-le"} & memory_contains(key_server, ec_patterns)
    found = memory_contains(key_server, rsa_patterns)
    for number in ("d", "p", "q"):
        assert {number, f"{number}-le"} & found, found
    for tls in sessions:
        _still_works(tls)
        tls.close()


def test_the_provider_is_only_in_the_tls_helper_and_its_workers(
    proxy: ProxyProcess, test_certs: CertFiles
) -> None:
    tls = _implicit(proxy, _client_context(test_certs, ssl.TLSVersion.TLSv1_3), "localhost")
    processes = _processes(proxy)
    assert processes["workers"]
    for role, pids in processes.items():
        for pid in pids:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            configured = any(entry.startswith(b"OPENSSL_CONF=") for entry in environment)
            mapped = "keyref.so" in Path(f"/proc/{pid}/maps").read_text()
            expected = role in ("helper", "workers")
            assert (configured, mapped) == (expected, expected), (role, pid)
    tls.close()


# ----------------------------------------------------------------------
# A key server that hangs or dies.


def test_a_stopped_or_killed_key_server(
    proxy: ProxyProcess, test_certs: CertFiles, metrics_port: int
) -> None:
    established = smtp_upgraded(proxy.connect("relay"), test_certs)
    key_server = processes.key_server(proxy)
    context = _client_context(test_certs, ssl.TLSVersion.TLSv1_3)
    os.kill(key_server, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
            _implicit(proxy, context, "localhost")
        assert time.monotonic() - started < KEY_SERVER_TIMEOUT + 5
        _still_works(established)
    finally:
        os.kill(key_server, signal.SIGKILL)
    proxy.wait_for_log("keeper: the key server died (status -9)")
    proxy.wait_for_log("the TLS helper runs again")
    assert processes.key_server(proxy) != key_server
    before = _signatures(metrics_port)
    fresh = _implicit(proxy, context, "localhost")
    _wait_for_signatures(metrics_port, before + 1)
    for tls in (established, fresh):
        _still_works(tls)
        tls.sendall(b"QUIT\r\n")
        assert read_smtp_reply(tls).startswith(b"221")
        tls.close()


def test_handshakes_while_the_key_server_is_restarted(
    proxy: ProxyProcess, test_certs: CertFiles
) -> None:
    """Between the key server's death and the new helper, new connections
    wait for the helper linked to the new key server; only a handshake
    already with the old helper's worker can fail, with an alert, at once."""
    context = _client_context(test_certs, ssl.TLSVersion.TLSv1_3)
    mark = len(proxy.log())
    os.kill(processes.key_server(proxy), signal.SIGKILL)
    outcomes = []
    while "the TLS helper runs again" not in proxy.log()[mark:]:
        started = time.monotonic()
        try:
            _implicit(proxy, context, "localhost").close()
            outcomes.append("ok")
        except ssl.SSLError as error:
            assert "INTERNAL_ERROR" in str(error)
            outcomes.append("alert")
        assert time.monotonic() - started < KEY_SERVER_TIMEOUT
        time.sleep(0.05)
    assert "new connections wait for a new TLS helper" in proxy.log()[mark:]
    # Once the keeper has said so, a handshake waits for the new helper and
    # succeeds: only those before that word can fail.
    assert not outcomes or outcomes[-1] == "ok", outcomes
    _implicit(proxy, context, "localhost").close()
