"""Routing one model to several demo upstreams (stand-ins for GPU servers) through real Envoy:
weights, health checks, outlier ejection, fallback to the next priority, scheduling hints."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import pytest

from tests.e2e.test_gateway import eventually, http, upstream_requests
from tests.upstream import Upstream

pytestmark = pytest.mark.envoy


def wait_routed(client: Any, model: str, timeout: float = 5) -> None:
    """Until a newly registered model answers (its config reaches Envoy within about a second)."""
    eventually(
        lambda: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1
        ),
        timeout=timeout,
    )


def served_by(stack, model: str, key: str, n: int, threads: int = 8) -> Counter[str]:
    """Send ``n`` chat requests; count the upstream that answered each (or the error status)."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    ).encode()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(share: int) -> None:
        for _ in range(share):
            status, got, _ = http("POST", f"{stack.gateway}/v1/chat/completions", body, headers)
            with lock:
                counts[got.get("x-demo-upstream", "-") if status == 200 else str(status)] += 1

    pool = [threading.Thread(target=worker, args=(n // threads,)) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return counts


def test_weights_split_traffic_as_configured(stack, upstreams):
    model = f"weighted{time.monotonic_ns()}"
    heavy, light = Upstream(model, "heavy"), Upstream(model, "light")
    upstreams += [heavy, light]
    stack.cli("models", "add", model, "--backend", heavy.url, "--kind", "vllm", "--weight", "3")
    stack.cli("models", "add", model, "--backend", light.url, "--kind", "vllm", "--weight", "1")

    def both_serving() -> None:  # a new backend takes traffic once its first health check passes
        assert set(served_by(stack, model, stack.demo_key, 16)) == {"heavy", "light"}

    eventually(both_serving, timeout=10)
    counts = served_by(stack, model, stack.demo_key, 2000)
    assert counts["heavy"] + counts["light"] == 2000, counts
    assert 0.72 <= counts["heavy"] / 2000 <= 0.78, counts  # 3:1, weighted round robin


def test_a_failing_backend_is_ejected_and_traffic_falls_back_to_the_next_priority(stack, upstreams):
    model = f"fallback{time.monotonic_ns()}"
    good, broken, backup = (
        Upstream(model, "good"),
        Upstream(model, "broken", fail_status=500),
        Upstream(model, "backup"),
    )
    upstreams += [good, broken, backup]
    stack.cli("models", "add", model, "--backend", good.url, "--kind", "vllm")
    stack.cli("models", "add", model, "--backend", broken.url, "--kind", "vllm")
    stack.cli("models", "add", model, "--backend", backup.url, "--kind", "vllm", "--priority", "1")

    def only_good() -> None:
        counts = served_by(stack, model, stack.demo_key, 40, threads=4)
        assert counts == Counter({"good": 40}), counts

    # A 500 is retried on another backend at once; health checks then keep `broken` out.
    eventually(only_good, timeout=10)
    good.stop()  # the whole first priority is gone: the backup serves

    def only_backup() -> None:
        counts = served_by(stack, model, stack.demo_key, 20, threads=4)
        assert counts == Counter({"backup": 20}), counts

    eventually(only_backup, timeout=10)
    backup.stop()  # nothing healthy left: an honest 503, not a request to a broken server

    def unavailable() -> None:
        status, _, raw = http(
            "POST",
            f"{stack.gateway}/v1/chat/completions",
            json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]}).encode(),
            {"authorization": f"Bearer {stack.demo_key}", "content-type": "application/json"},
        )
        assert status == 503
        assert json.loads(raw)["error"]["code"] == "no_healthy_backend"

    eventually(unavailable, timeout=10)


def test_the_tenant_and_its_plan_priority_reach_the_backend_as_scheduling_hints(stack):
    plan, tenant = f"gold{time.monotonic_ns()}", f"sched{time.monotonic_ns()}"
    stack.cli("plans", "create", plan, "--priority", "10")
    stack.cli("tenants", "create", tenant, "--plan", plan)
    key = stack.new_key(tenant)
    tenant_id = stack.cli_json("tenants", "get", tenant)["tenant"]["id"]
    time.sleep(1.0)
    client = stack.client(key)
    client.with_options(default_headers={"x-tessera-priority": "999"}).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "who am i"}], max_tokens=1
    )
    headers = upstream_requests(stack)[-1]["headers"]
    assert headers["x-gateway-inference-fairness-id"] == tenant_id
    assert headers["x-tessera-priority"] == "10"


def test_changing_weights_while_streams_run_cuts_none_and_streams_arrive_incrementally(
    stack, upstreams, tmp_path
):
    model = f"live{time.monotonic_ns()}"
    one, two = Upstream(model, "one"), Upstream(model, "two")
    upstreams += [one, two]
    stack.cli("models", "add", model, "--backend", one.url, "--kind", "vllm")
    stack.cli("models", "add-backend", model, "--backend", two.url, "--kind", "vllm")
    client = stack.client(stack.demo_key)
    wait_routed(client, model)
    results: list[tuple[int, float, float]] = []  # (tokens, first chunk at, done at)
    lock = threading.Lock()

    def stream() -> None:
        started = time.monotonic()
        first = 0.0
        words: list[str] = []
        for chunk in client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "go"}],
            max_tokens=20,
            stream=True,
            extra_headers={"x-demo-delay-ms": "120"},
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic() - started
                words += chunk.choices[0].delta.content.split()
        with lock:
            results.append((len(words), first, time.monotonic() - started))

    threads = [threading.Thread(target=stream) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.4)  # every stream is under way
    # Endpoint (EDS), cluster (CDS: a credential, new upstream filters) and route (RDS: an
    # alias, timeouts) changes: none may cut a stream in flight.
    (tmp_path / "key").write_text("sk-live")
    stack.cli("models", "update-backend", model, "--backend", one.url, "--weight", "5")
    stack.cli("models", "update-backend", model, "--backend", two.url, "--priority", "1")
    stack.cli(
        "models", "update-backend", model, "--backend", one.url, "--credential-file", str(tmp_path / "key")
    )
    stack.cli("models", "update-backend", model, "--backend", two.url, "--idle-timeout", "600")
    stack.cli("models", "update", model, "--alias", f"{model}-alias")
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [20] * 20  # every stream got every token
    # the first chunk is with the client long before the last one is generated (20 x 120 ms)
    assert all(first < done / 2 for _, first, done in results), results


def test_a_client_disconnect_reaches_the_upstream(stack, upstreams):
    model = f"cancel{time.monotonic_ns()}"
    up = Upstream(model, "cancel")
    upstreams.append(up)
    stack.cli("models", "add", model, "--backend", up.url, "--kind", "vllm")
    client = stack.client(stack.demo_key)
    wait_routed(client, model)

    def running() -> float:
        text = urllib.request.urlopen(f"{up.url}/metrics", timeout=2).read().decode()  # noqa: S310
        line = next(x for x in text.splitlines() if x.startswith("vllm:num_requests_running{"))
        return float(line.rsplit(" ", 1)[1])

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "go"}],
        max_tokens=100,
        stream=True,
        extra_headers={"x-demo-delay-ms": "200"},  # 20 s if nobody stops it
    )
    it = iter(stream)
    next(it)
    next(it)
    assert running() == 1
    stream.close()
    started = time.monotonic()

    def stopped() -> None:
        assert running() == 0

    eventually(stopped, timeout=3)
    assert time.monotonic() - started < 3  # the generation was cancelled, not finished


def test_a_backend_with_a_deep_queue_gets_less_traffic_until_it_drains(stack, upstreams):
    model = f"load{time.monotonic_ns()}"
    calm, busy = Upstream(model, "calm"), Upstream(model, "busy")
    upstreams += [calm, busy]
    stack.cli("models", "add", model, "--backend", calm.url, "--kind", "vllm")
    stack.cli("models", "add-backend", model, "--backend", busy.url, "--kind", "vllm")

    def report(upstream: Upstream, **load: object) -> None:
        http(
            "POST",
            f"{upstream.url}/debug/load",
            json.dumps(load).encode(),
            {"content-type": "application/json"},
        )

    def busy_share() -> float:
        counts = served_by(stack, model, stack.demo_key, 400, threads=1)
        assert counts["calm"] + counts["busy"] == 400, counts
        return counts["busy"] / 400

    def share_between(low: float, high: float) -> None:
        share = busy_share()
        assert low <= share <= high, share

    eventually(lambda: share_between(0.4, 0.6), timeout=10)  # equal weights: half each
    report(busy, waiting=20)  # a deep queue: a factor of 1/11 on the next scrape (every 2 s)
    eventually(lambda: share_between(0.0, 0.5 / 3), timeout=10)  # at most a third of its share
    report(busy, waiting=0)  # drained
    eventually(lambda: share_between(0.4, 0.6), timeout=10)
    report(busy, waiting=20, broken=True)  # its /metrics fail: neutral, whatever it last said
    time.sleep(4.5)
    share_between(0.4, 0.6)


def test_max_concurrency_is_a_circuit_breaker(stack, upstreams):
    model = f"breaker{time.monotonic_ns()}"
    up = Upstream(model, "small")
    upstreams.append(up)
    stack.cli("models", "add", model, "--backend", up.url, "--kind", "vllm", "--max-concurrency", "1")
    client = stack.client(stack.demo_key)
    wait_routed(client, model)
    held = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "go"}], max_tokens=10, stream=True,
        extra_headers={"x-demo-delay-ms": "100"},
    )  # fmt: skip
    it = iter(held)
    next(it)
    status, _, raw = http(
        "POST",
        f"{stack.gateway}/v1/chat/completions",
        json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        ).encode(),
        {"authorization": f"Bearer {stack.demo_key}", "content-type": "application/json"},
    )
    assert status == 503  # the backend's one slot is taken: refused at the gateway, not queued there
    assert json.loads(raw)["error"]["type"] == "server_error"
    list(it)
    wait_routed(client, model, timeout=3)
