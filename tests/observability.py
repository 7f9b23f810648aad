"""Test support: Tessera's alert rules, dashboard and PodMonitors as the tests read them
(``k8s/components/observability``), shared by the promtool tests and the real-Prometheus e2e."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OBSERVABILITY = ROOT / "k8s" / "components" / "observability"
RULE = OBSERVABILITY / "prometheus-rule.yaml"
DASHBOARD = OBSERVABILITY / "dashboards" / "tessera.json"
POD_MONITORS = OBSERVABILITY / "pod-monitors.yaml"
# How the dashboard's Grafana variables are stood in for outside Grafana.
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$tenant": ".*", "$model": ".*"}


def rule_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's ``spec.groups``: a plain Prometheus rule file's groups."""
    (doc,) = yaml.safe_load_all(RULE.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    return list(doc["spec"]["groups"])


def alert_names() -> list[str]:
    return [rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title and refId, expression with the variables stood in for), every panel's."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((f"{panel['title']} [{target['refId']}]", expr))
    return queries


def pod_monitor_jobs() -> dict[str, str]:
    """endpoints.json's ``metrics`` key (``ext_authz``) -> the job its PodMonitor sets."""
    found = {}
    for monitor in yaml.safe_load_all(POD_MONITORS.read_text()):
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        (job,) = [r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        found[monitor["metadata"]["name"].removeprefix("tessera-").replace("-", "_")] = job
    return found
