"""The deployment files: Prometheus rules and the Grafana dashboard parse and
name metrics that exist; the systemd units fit the proxy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from starttls_proxy.config import SocketAddress
from starttls_proxy.proxy import metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "starttls-proxy.json"
#: What Grafana puts in for the dashboard's variables, for checking a query.
_VARIABLES = {"$listener": ".*", "$__rate_interval": "5m"}


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard, its variables filled in."""

    def panels(items: list[Any]) -> Iterator[Any]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    expressions = []
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expression = target["expr"]
            for variable, value in _VARIABLES.items():
                expression = expression.replace(variable, value)
            expressions.append(expression)
    return expressions


def metric_names(expressions: list[str]) -> set[str]:
    return {
        name for expression in expressions for name in re.findall(r"starttls_proxy_\w+", expression)
    }


def _exported_names() -> set[str]:
    names = set()
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names.update(sample.name for sample in family.samples)
    return names


@pytest.mark.parametrize(
    "check",
    [
        ["check", "rules", "alerts.yml"],
        ["check", "config", "scrape.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
)
def test_promtool_accepts(check: list[str]) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run scripts/install-system-deps.sh"
    result = subprocess.run(
        [promtool, *check],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_use_only_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    used = metric_names([rule["expr"] for group in rules["groups"] for rule in group["rules"]])
    assert used
    assert used <= _exported_names(), used - _exported_names()


def test_dashboard_queries_are_promql(tmp_path: Path) -> None:
    """promtool parses each of the dashboard's queries, as a recording rule."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run scripts/install-system-deps.sh"
    rules = [
        {"record": f"dashboard:query_{n}", "expr": expression}
        for n, expression in enumerate(dashboard_expressions())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_datasource_is_a_variable() -> None:
    """Importable anywhere: no panel names a datasource of the machine it was made on."""
    text = DASHBOARD.read_text()
    variables = {v["name"]: v for v in json.loads(text)["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert set(re.findall(r'"uid": "([^"]*)"', text)) == {"${datasource}", "starttls-proxy"}


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
