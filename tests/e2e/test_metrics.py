"""Prometheus metrics, scraped over HTTP from the real proxy after real sessions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_smtp_reply, smtp_starttls
from tests.realservers.metrics import exported_names, only, scrape
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener, start_proxy
from tests.test_deploy import dashboard_expressions, metric_names


@pytest.fixture(scope="module")
def proxy(
    module_proxy: StartProxy,
    postfix: PostfixInstance,
    metrics_port: int,
) -> ProxyProcess:
    return module_proxy(
        [listener("m", postfix.proxy_port, backend={"identity": "proxy-v2"})],
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )


def test_metrics_count_real_sessions(
    proxy: ProxyProcess, test_certs: CertFiles, metrics_port: int
) -> None:
    tls = smtp_starttls(proxy.connect("m", "127.0.0.30"), test_certs, pipelined=b"RSET\r\n")
    tls.sendall(b"EHLO client.test\r\n")
    assert read_smtp_reply(tls).startswith(b"250-")
    tls.sendall(b"QUIT\r\n")
    assert read_smtp_reply(tls).startswith(b"221")
    tls.close()
    proxy.wait_for_log("127.0.0.30")
    proxy.wait_for_log("closed after")

    samples = scrape(metrics_port)
    ours = {"listener": "m", "protocol": "smtp"}
    assert only(samples, "starttls_proxy_connections_accepted_total", **ours) == 1
    assert only(samples, "starttls_proxy_tls_handshakes_total", **ours, result="ok") == 1
    assert only(samples, "starttls_proxy_discarded_after_starttls_bytes_total", **ours) == 6
    assert only(samples, "starttls_proxy_tls_handshake_seconds_count", **ours) == 1
    assert only(samples, "starttls_proxy_sessions_closed_total", **ours, end="clean") == 1
    assert only(samples, "starttls_proxy_tls_sessions_total", listener="m", version="TLSv1.3") == 1
    for phase in ("plaintext", "handshake", "tls"):
        assert only(samples, "starttls_proxy_sessions_active", **ours, phase=phase) == 0
    certificate = str(test_certs.cert)
    expiry = only(samples, "starttls_proxy_certificate_not_after_seconds", certificate=certificate)
    assert expiry > 1.7e9
    assert only(samples, "starttls_proxy_backend_connect_seconds_count", listener="m") == 1


def test_isolation_layers_are_exported(proxy: ProxyProcess, metrics_port: int) -> None:
    samples = scrape(metrics_port)
    for layer in ("namespaces", "pid_namespace", "chroot", "identity", "seccomp"):
        assert only(samples, "starttls_proxy_isolation_layer_applied", layer=layer) == 1


def test_json_log_lines_describe_each_session(
    tmp_path: Path, postfix: PostfixInstance, test_certs: CertFiles
) -> None:
    process = start_proxy(
        tmp_path,
        [(test_certs.cert, test_certs.key)],
        [listener("j", postfix.proxy_port, backend={"identity": "proxy-v2"})],
        log_format="json",
    )
    try:
        tls = smtp_starttls(process.connect("j", "127.0.0.31"), test_certs)
        tls.sendall(b"QUIT\r\n")
        assert read_smtp_reply(tls).startswith(b"221")
        tls.close()
        process.wait_for_log('"event": "session_end"')
    finally:
        assert process.stop() == 0
    entries = [json.loads(line) for line in process.log().splitlines()]
    (end,) = [entry for entry in entries if entry.get("event") == "session_end"]
    assert end["listener"] == "j"
    assert end["client_address"] == "127.0.0.31"
    assert end["tls_version"] == "TLSv1.3"
    assert end["sni"] == "localhost"
    assert end["clean"] is True
    assert end["bytes_from_client"] > 0
    assert {"time", "level", "logger", "message", "duration_seconds"} <= set(end)


def test_dashboard_uses_only_metrics_the_proxy_exports(
    proxy: ProxyProcess, metrics_port: int
) -> None:
    used = metric_names(dashboard_expressions())
    exported = exported_names(metrics_port)
    assert used <= exported, used - exported
