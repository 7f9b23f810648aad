"""The dashboard's queries and the alert rules against a real Prometheus scraping a real stack (issue 16).

A local ``prometheus`` scrapes every process of a ``tessera up`` every second, each under the job
its PodMonitor gives it in Kubernetes (``k8s/components/observability/pod-monitors.yaml``), and
loads the alert rules (``prometheus-rule.yaml``). After a refused key and a tenant's rate limit,
and while JSON and streamed chat completions keep coming, every query of every dashboard panel
must return data, and every rule must evaluate without error (on that data: some errors, such as
two series with one label set, need it) and stay quiet on this healthy stack.

The stack is this module's own: the billing outbox's gauges exist only per configured sink, so it
runs with one (an address nothing listens on: its events wait, and the gauges show them).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.error import URLError
from urllib.parse import urlencode, urlsplit
from urllib.request import urlopen

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import free_port
from tests.e2e.conftest import Stack, start_stack, stop_stack
from tests.observability import alert_names, dashboard_queries, pod_monitor_jobs, rule_groups

pytestmark = pytest.mark.envoy

PROMETHEUS = shutil.which("prometheus")
DEADLINE = 60.0  # for every panel to have data: scrapes every 1 s, rates need two samples
PRICE = ("--input-price", "150000", "--output-price", "600000")  # micro-units per 1M tokens: spend is not 0
LIMIT = ("--kind", "requests", "--window", "minute", "--limit", "4")
ROOMY_LIMIT = ("--kind", "requests", "--window", "minute", "--limit", "100000")
USAGE = {"match[]": "gen_ai_client_token_usage_count"}  # what the dashboard's variables list labels of


def poll(check: Callable[[], list[str]], timeout: float) -> list[str]:
    """Call ``check`` (what is still wrong) each second until it is empty or time is up."""
    deadline = time.monotonic() + timeout
    while (wrong := check()) and time.monotonic() < deadline:
        time.sleep(1.0)
    return wrong


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        with urlopen(f"{self.url}/api/v1/{path}?{urlencode(params)}", timeout=10) as resp:  # noqa: S310
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])


@pytest.fixture(scope="module")
def obs_stack(tmp_path_factory) -> Iterator[Stack]:
    sink = {"name": "obs", "url": f"http://127.0.0.1:{free_port()}/events", "format": "cloudevents"}
    stack = start_stack(
        tmp_path_factory.mktemp("obs-stack"), env_extra={"TESSERA_BILLING__SINKS": json.dumps([sink])}
    )
    yield stack
    stop_stack(stack)


@pytest.fixture(scope="module")
def prometheus(obs_stack, tmp_path_factory) -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed")
    root = tmp_path_factory.mktemp("prometheus")
    (root / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    # the scrape config `tessera up` writes for its stack (the README's local Prometheus): each
    # process under the job its PodMonitor gives it in Kubernetes, which the rules select by
    config = yaml.safe_load((obs_stack.root / "prometheus.yml").read_text())
    scraped = {c["job_name"]: c for c in config["scrape_configs"]}
    for name, job in pod_monitor_jobs().items():
        target = urlsplit(obs_stack.endpoints()["metrics"][name])
        (static,) = scraped[job]["static_configs"]
        assert target.netloc in static["targets"], job
        assert scraped[job]["metrics_path"] == target.path
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(root / "rules.yaml")]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (root / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def not_ready() -> list[str]:
        try:
            urlopen(f"{url}/-/ready", timeout=1).close()  # noqa: S310 - 503 until ready raises
        except (URLError, OSError) as exc:
            return [str(exc)]
        return []

    try:
        assert not poll(not_ready, 30), (root / "prometheus.log").read_text()
        yield Prometheus(url)
    finally:
        proc.terminate()
        proc.wait(10)


def chat(client: openai.OpenAI, *, stream: bool = False) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "count for me"}]
    if not stream:
        client.chat.completions.create(model="demo", messages=messages, max_tokens=5)
        return
    chunks = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    usage = list(chunks)[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 5


@pytest.fixture(scope="module")
def traffic(obs_stack) -> Iterator[None]:
    """A tenant's rate limit refusing (429) and a bad key (401); then JSON and streamed
    completions several times a second while the module's tests run: a rate needs new samples,
    and a histogram's series appears only with its first observation."""
    obs_stack.cli("models", "price", "demo", *PRICE)
    tenant = f"obs{time.monotonic_ns()}"
    obs_stack.cli("tenants", "create", tenant)
    limited = obs_stack.client(obs_stack.new_key(tenant))
    obs_stack.cli("limits", "create", "--tenant", tenant, *LIMIT)
    # the steady traffic's tenant has a limit it never reaches: its requests keep the counters
    # (and the ratelimit backend's latency panel) moving however long the tests take
    steady_tenant = f"obs-steady{time.monotonic_ns()}"
    obs_stack.cli("tenants", "create", steady_tenant)
    steady = obs_stack.client(obs_stack.new_key(steady_tenant))
    obs_stack.cli("limits", "create", "--tenant", steady_tenant, *ROOMY_LIMIT)
    time.sleep(1.0)  # keys, limits and prices are live everywhere within 1 s
    for _ in range(2):
        chat(limited)
        chat(limited, stream=True)
    with pytest.raises(openai.RateLimitError):  # the fifth in a minute
        chat(limited)
    with pytest.raises(openai.AuthenticationError):
        chat(obs_stack.client("tsk_not_a_key"))

    stop = threading.Event()
    failed: list[Exception] = []

    def run() -> None:
        while not stop.wait(0.2):
            try:
                chat(steady)
                chat(steady, stream=True)
            except (openai.OpenAIError, AssertionError) as exc:
                failed.append(exc)
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(10)
    assert not failed, failed


@pytest.mark.timeout(240)
def test_every_dashboard_query_returns_data(prometheus, traffic):
    def without_data() -> list[str]:
        return [
            f"{panel}: {expr}"
            for panel, expr in dashboard_queries()
            if not any(math.isfinite(float(s["value"][1])) for s in prometheus.query(expr))
        ]

    missing = poll(without_data, DEADLINE)
    assert not missing, "panels without data:\n" + "\n".join(missing)
    down = [s["metric"]["job"] for s in prometheus.query("up == 0")]
    assert not down, f"scrape targets down: {down}"


@pytest.mark.timeout(240)
def test_the_dashboard_variables_list_tenants_and_models(prometheus, traffic):
    """The ``tenant`` and ``model`` variables: label_values over gen_ai_client_token_usage_count."""

    def missing() -> list[str]:
        tenants = prometheus.api("label/tenant/values", **USAGE)
        models = prometheus.api("label/gen_ai_request_model/values", **USAGE)
        return [*(["no tenant"] if not tenants else []), *(["no model demo"] if "demo" not in models else [])]

    missing_labels = poll(missing, DEADLINE)
    assert not missing_labels, missing_labels


@pytest.mark.timeout(240)
def test_the_alert_rules_evaluate_and_stay_quiet_on_a_healthy_stack(prometheus, traffic):
    names = set(alert_names())
    flowing = 'sum(rate(envoy_http_ext_authz_ok{job="tessera-envoy"}[1m])) > 0'
    assert not poll(lambda: [] if prometheus.query(flowing) else ["no traffic seen yet"], DEADLINE)
    time.sleep(3.0)  # three evaluations on it

    def loaded() -> list[dict[str, Any]]:
        return [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]

    def unhealthy() -> list[str]:
        rules = loaded()
        wrong = [f"{r['name']}: {r['health']} {r.get('lastError', '')}" for r in rules if r["health"] != "ok"]
        return wrong + [f"{name}: not loaded" for name in names - {r["name"] for r in rules}]

    wrong = poll(unhealthy, 30)
    assert not wrong, "\n".join(wrong)
    active = [f"{r['name']}: {r['state']}" for r in loaded() if r.get("state", "inactive") != "inactive"]
    assert not active, "alerts pending or firing on a healthy stack:\n" + "\n".join(active)
