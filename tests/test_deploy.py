"""The deployment files: Prometheus rules parse and name metrics that exist;
the systemd units fit the proxy."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from starttls_proxy import metrics
from starttls_proxy.config import SocketAddress

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _exported_names() -> set[str]:
    names = set()
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names.update(sample.name for sample in family.samples)
    return names


@pytest.mark.parametrize("check", [["rules", "alerts.yml"], ["config", "scrape.yml"]])
def test_promtool_accepts(check: list[str]) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run scripts/install-system-deps.sh"
    result = subprocess.run(
        [promtool, "check", *check],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_use_only_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    used = {
        name
        for group in rules["groups"]
        for rule in group["rules"]
        for name in re.findall(r"starttls_proxy_\w+", rule["expr"])
    }
    assert used
    assert used <= _exported_names(), used - _exported_names()


def test_systemd_unit_reloads_with_sighup() -> None:
    unit = (DEPLOY / "systemd" / "starttls-proxy.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    # The workers' sandbox needs namespaces and UID changes from the helper.
    directives = {line.partition("=")[0] for line in unit.splitlines() if "=" in line}
    assert not directives & {"RestrictNamespaces", "User", "PrivateUsers"}


def test_systemd_socket_unit_passes_listen_addresses_to_the_service() -> None:
    unit = (DEPLOY / "systemd" / "starttls-proxy.socket").read_text()
    assert "Service=starttls-proxy.service" in unit
    streams = [
        line.removeprefix("ListenStream=")
        for line in unit.splitlines()
        if line.startswith("ListenStream=")
    ]
    assert streams
    for stream in streams:
        SocketAddress.parse(stream, allow_unix=False)  # what a listener's `listen` takes
