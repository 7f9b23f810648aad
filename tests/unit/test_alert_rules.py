"""Tessera's alert rules and dashboard queries, checked offline with promtool (issue 16).

The PrometheusRule in ``k8s/components/observability/`` is the one source: its ``spec.groups`` is
written out as a plain rule file, ``promtool check rules`` parses it, and ``promtool test rules``
runs the unit tests in ``tests/fixtures/alerts/`` against it (one file per alert: a case where it
fires, with its labels and annotations, and one just short of firing). Every alert has a
severity, a summary, a description and a runbook link to a section of ``docs/runbooks.md``; every
query of the Grafana dashboard parses. ``tests/e2e/test_prometheus.py`` runs both against a real
stack.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tessera.up import metrics_job, prometheus_config
from tests.observability import ROOT, alert_names, dashboard_queries, pod_monitor_jobs, rule_groups

FIXTURES = ROOT / "tests" / "fixtures" / "alerts"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_URL = "https://github.com/tessera/tessera/blob/main/docs/runbooks.md#"
TEST_FILES = sorted(FIXTURES.glob("*.yaml"))
SEVERITIES = {"critical", "warning", "info"}
ANNOTATIONS = {"summary", "description", "runbook_url"}
PROMTOOL = shutil.which("promtool")


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"] if "alert" in rule}


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings (outside code blocks): lower case, punctuation
    other than ``-`` and ``_`` dropped, spaces made ``-``."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", prose, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def promtool(*args: str, cwd: Path) -> str:
    """Run promtool in ``cwd``; its output, asserted successful."""
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """A folder holding the rules as a plain rule file, ``rules.yaml`` (what the fixtures name)."""
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (`make` installs it)")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    return tmp_path


def test_the_rules_pass_promtool_check(rules_dir):
    assert f"SUCCESS: {len(alerts())} rules found" in promtool("check", "rules", "rules.yaml", cwd=rules_dir)


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.stem)
def test_promtool_unit_tests(rules_dir, test_file):
    shutil.copy(test_file, rules_dir)
    promtool("test", "rules", test_file.name, cwd=rules_dir)


def test_every_alert_is_labelled_annotated_and_has_a_runbook_section():
    anchors = github_anchors(RUNBOOKS.read_text())
    assert anchors, "docs/runbooks.md has no headings"
    errors = []
    for name, rule in alerts().items():
        if not re.fullmatch(r"Tessera[A-Z][A-Za-z0-9]+", name):
            errors.append(f"{name}: name it Tessera<What>")
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            errors.append(f"{name}: severity must be one of {sorted(SEVERITIES)}")
        annotations = rule.get("annotations", {})
        if missing := ANNOTATIONS - annotations.keys():
            errors.append(f"{name}: no {sorted(missing)}")
        url = annotations.get("runbook_url", "")
        if not url.startswith(RUNBOOK_URL) or url.removeprefix(RUNBOOK_URL) not in anchors:
            errors.append(f"{name}: runbook_url {url!r} is not {RUNBOOK_URL}<a heading of docs/runbooks.md>")
    assert not errors, "\n".join(errors)


def test_alert_names_are_unique():
    names = alert_names()
    assert len(names) == len(set(names))


def test_every_alert_has_a_firing_and_a_quiet_test_case():
    seen: dict[str, set[str]] = {}
    for path in TEST_FILES:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["rules.yaml"], f"{path.name}: the test writes the rules as rules.yaml"
        for case in doc["tests"]:
            for test in case.get("alert_rule_test", []):
                seen.setdefault(test["alertname"], set()).add("fires" if test.get("exp_alerts") else "quiet")
    missing = {name: sorted({"fires", "quiet"} - seen.get(name, set())) for name in alerts()}
    assert not {name: m for name, m in missing.items() if m}, "alerts without these test cases"
    unknown = seen.keys() - alerts().keys()
    assert not unknown, f"tests of alerts that do not exist: {unknown}"


def test_every_dashboard_query_parses(rules_dir):
    """Each panel query, variables stood in for, as a recording rule: promtool parses them all."""
    queries = dashboard_queries()
    assert queries
    rules = [{"record": f"dashboard_query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    groups = [{"name": "dashboard", "rules": rules}]
    (rules_dir / "dashboard.yaml").write_text(yaml.safe_dump({"groups": groups}))
    promtool("check", "rules", "dashboard.yaml", cwd=rules_dir)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Gateway 5xx ratio", "gateway-5xx-ratio"),
        ("`ext_authz` unavailable", "ext_authz-unavailable"),
        ("Certificate expiring (workload, Envoy)", "certificate-expiring-workload-envoy"),
    ],
)
def test_github_anchors(heading, anchor):
    markdown = f"# Runbooks\n\n```sh\n# not a heading\n```\n\n## {heading}\n"
    assert github_anchors(markdown) == {"runbooks", anchor}


def test_the_local_scrape_config_names_each_process_as_its_pod_monitor_does():
    """`tessera up` writes prometheus.yml for the README's local Prometheus: the rules and the
    dashboard select by job, so its jobs are the PodMonitors' (every ext_authz replica too)."""
    targets = {name: [f"http://127.0.0.1:{9000 + i}/metrics"] for i, name in enumerate(pod_monitor_jobs())}
    targets["ext_authz"] = ["http://127.0.0.1:9100/metrics", "http://127.0.0.1:9101/metrics"]
    targets["envoy"] = ["http://127.0.0.1:9102/stats/prometheus"]
    jobs = {c["job_name"]: c for c in prometheus_config(targets)["scrape_configs"]}
    for name, job in pod_monitor_jobs().items():
        assert metrics_job(name) == job
        assert jobs[job]["static_configs"] == [{"targets": [u.split("/")[2] for u in targets[name]]}]
    assert jobs["tessera-envoy"]["metrics_path"] == "/stats/prometheus"
