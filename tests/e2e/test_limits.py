"""Token budgets, concurrency and usage through real Envoy with the openai client (ARCHITECTURE §2, §4).

Each test has a tenant of its own on the shared stack (memory:// counters). Reservations are
estimated from the request (body bytes + max_tokens), so requests with the same body reserve
the same amount, and the difference of two ``x-ratelimit-remaining-tokens`` readings is what
was really charged in between. Settlement is off the request path (the meter reads Envoy's
usage log): a request's real usage replaces its reservation within ``SETTLE_SECONDS`` of its
end, which is what ``settled()`` waits for.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from typing import Any

import openai
import pytest

from tests.e2e.conftest import start_stack, stop_stack
from tests.e2e.test_gateway import eventually, http, upstream_requests
from tests.proxy import ThreadedTcpProxy

pytestmark = pytest.mark.envoy

DELAY = "x-demo-delay-ms"  # the demo upstream waits this long per generated token
SETTLE_SECONDS = 1.0  # the promise: a request's usage settles within 1 s of its end


def settled() -> None:
    """Wait until the requests that ended so far are settled."""
    time.sleep(SETTLE_SECONDS)


def tenant_with(stack, *limit_args: list[str]) -> str:
    """A new tenant with these limits and a key; returns the key once the limits are live."""
    tenant = f"lim{time.monotonic_ns()}"
    stack.cli("tenants", "create", tenant)
    key = stack.new_key(tenant)
    for args in limit_args:
        stack.cli("limits", "create", "--tenant", tenant, *args)
    time.sleep(1.0)  # keys and limits are live everywhere within 1 s
    return key


def chat(client: openai.OpenAI, **kw: Any) -> Any:
    kw.setdefault("model", "demo")
    kw.setdefault("messages", [{"role": "user", "content": "count for me"}])
    kw.setdefault("max_tokens", 5)
    return client.chat.completions.with_raw_response.create(**kw)


def burst(client: openai.OpenAI, n: int, outcomes: list[str]) -> None:
    """``n`` requests at once; appends "ok" or "429" for each to ``outcomes``."""
    lock = threading.Lock()

    def one() -> None:
        try:
            chat(client, max_tokens=1)
            result = "ok"
        except openai.RateLimitError:
            result = "429"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def remaining_tokens(raw: Any) -> int:
    return int(raw.headers["x-ratelimit-remaining-tokens"])


def test_a_stream_without_include_usage_is_charged_its_real_tokens_and_shows_no_usage(stack):
    client = stack.client(tenant_with(stack, ["--kind", "tokens", "--window", "month", "--limit", "100000"]))
    plain = chat(client)  # a JSON answer tells the real prompt size of this body
    prompt = plain.parse().usage.prompt_tokens
    settled()
    first = chat(client, stream=True)
    chunks = list(first.parse())
    assert all(c.usage is None for c in chunks)  # the client did not ask: no usage chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split() == [
        f"tok{i}" for i in range(5)
    ]
    sent = upstream_requests(stack)[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}  # Tessera asked the upstream for it

    settled()
    again = chat(client, stream=True)
    list(again.parse())
    # same body, same reservation: the difference is what the first stream was charged
    assert remaining_tokens(first) - remaining_tokens(again) == prompt + 5


def test_include_usage_false_cannot_defeat_metering(stack):
    client = stack.client(tenant_with(stack, ["--kind", "tokens", "--window", "day", "--limit", "100000"]))
    chunks = list(chat(client, stream=True, stream_options={"include_usage": False}).parse())
    assert all(c.usage is None for c in chunks)
    assert upstream_requests(stack)[-1]["body"]["stream_options"] == {"include_usage": True}
    asked = list(chat(client, stream=True, stream_options={"include_usage": True}).parse())
    assert asked[-1].usage.completion_tokens == 5  # a client that asks still gets it


def test_reservations_bound_concurrent_streams_and_unused_tokens_come_back(stack):
    key = tenant_with(stack, ["--kind", "tokens", "--window", "month", "--limit", "1000"])
    client = stack.client(key)
    # One 600-character word: the estimate (~680 prompt tokens + 10) is far above the real (~1 + 10).
    big = [{"role": "user", "content": "a" * 600}]
    held = chat(client, messages=big, max_tokens=10, stream=True, extra_headers={DELAY: "150"})
    reserved = 1000 - remaining_tokens(held)
    assert reserved > 600
    stream = held.parse()
    next(iter(stream))  # the first stream is in flight, its reservation held
    with pytest.raises(openai.RateLimitError) as err:
        chat(client, messages=big, max_tokens=10)
    assert err.value.code == "insufficient_quota"  # a calendar-month budget
    assert int(err.value.response.headers["retry-after"]) >= 1
    list(stream)  # the first stream ends and settles its real, much smaller, usage
    settled()
    assert chat(client, messages=big, max_tokens=10).parse().usage.completion_tokens == 10


def test_a_client_that_disconnects_mid_stream_is_charged_not_free(stack):
    client = stack.client(tenant_with(stack, ["--kind", "tokens", "--window", "month", "--limit", "100000"]))
    cut = chat(client, max_tokens=40, stream=True, extra_headers={DELAY: "100"})
    stream = cut.parse()
    it = iter(stream)
    next(it)
    next(it)
    stream.close()  # gone before the usage arrived
    settled()
    probe = chat(client, max_tokens=40, stream=True)  # same body: same reservation
    list(probe.parse())
    reservation = 100000 - remaining_tokens(cut)
    assert remaining_tokens(cut) - remaining_tokens(probe) == reservation


def test_concurrency_limit_refuses_the_extra_stream_and_frees_the_slot(stack):
    client = stack.client(tenant_with(stack, ["--kind", "concurrency", "--limit", "1"]))
    held = chat(client, max_tokens=6, stream=True, extra_headers={DELAY: "150"}).parse()
    it = iter(held)
    next(it)
    with pytest.raises(openai.RateLimitError) as err:
        chat(client)
    assert err.value.code == "rate_limit_exceeded"
    list(it)
    eventually(lambda: chat(client), timeout=SETTLE_SECONDS)  # the slot is free within 1 s of the end


def test_limits_show_openai_headers_and_shadow_limits_never_refuse(stack):
    key = tenant_with(
        stack,
        ["--kind", "requests", "--window", "minute", "--limit", "50"],
        ["--kind", "tokens", "--window", "minute", "--limit", "10000"],
        ["--kind", "tokens", "--window", "day", "--limit", "1", "--shadow"],
    )
    raw = chat(stack.client(key))
    h = raw.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("50", "49")
    assert h["x-ratelimit-reset-requests"] == "1m0s"
    assert h["x-ratelimit-limit-tokens"] == "10000"  # the shadow limit stays invisible
    assert 0 < int(h["x-ratelimit-remaining-tokens"]) < 10000
    assert h["x-ratelimit-reset-tokens"].endswith(("ms", "s"))
    for _ in range(3):
        chat(stack.client(key))  # far over the shadow limit of 1 token a day: never refused


def test_parallel_requests_never_exceed_a_request_limit(stack):
    client = stack.client(tenant_with(stack, ["--kind", "requests", "--window", "minute", "--limit", "7"]))
    outcomes: list[str] = []
    burst(client, 16, outcomes)
    assert outcomes.count("ok") == 7
    assert outcomes.count("429") == 9


def test_per_ip_guard_is_429_rate_limit_exceeded_and_a_spoofed_forwarded_for_does_not_help(tmp_path):
    s = start_stack(
        tmp_path,
        env_extra={"TESSERA_GATEWAY__PER_IP_REQUESTS_PER_SECOND": "1", "TESSERA_GATEWAY__PER_IP_BURST": "3"},
    )
    try:
        body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        headers = {"authorization": f"Bearer {s.demo_key}", "content-type": "application/json"}
        url = f"{s.gateway}/v1/chat/completions"
        codes = [http("POST", url, body.encode(), headers)[0] for _ in range(4)]
        # a burst of 3 (the stack's own readiness probe may have taken one), then refused
        assert codes[0] == 200
        assert codes[-1] == 429
        status, got, raw = http("POST", url, body.encode(), headers)
        assert status == 429
        assert got["content-type"] == "application/json"
        assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        spoofed = http("POST", url, body.encode(), {**headers, "x-forwarded-for": "203.0.113.9"})
        assert spoofed[0] == 429  # the peer address counts, not a client-sent header
    finally:
        stop_stack(s)


@pytest.mark.postgres
@pytest.mark.redis
def test_two_gateways_share_exact_limits_on_one_redis_and_each_limit_keeps_its_fail_mode(
    tmp_path, postgres_url, redis_url
):
    """Two full stacks (two Envoys, two ratelimit services, two control planes) on one PostgreSQL
    and one Redis, reached through a proxy the test can cut and restore."""
    redis_proxy = ThreadedTcpProxy(6379)
    shared_redis = redis_url.replace("127.0.0.1:6379", f"127.0.0.1:{redis_proxy.port}")
    # Exact while the counters answer in time: two stacks on two cores can stall past the 0.2 s
    # default, and a request admitted fail-open then is counted, not refused (its fail mode).
    slow_ok = {"TESSERA_ADMISSION__TIMEOUT_SECONDS": "2"}
    a = start_stack(tmp_path / "a", "--db", postgres_url, "--redis", shared_redis, env_extra=slow_ok)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "pepper", tmp_path / "b" / "pepper")  # replicas share the secret pepper
    b = start_stack(tmp_path / "b", "--db", postgres_url, "--redis", shared_redis, env_extra=slow_ok)
    try:
        n = 20
        exact, fail_open, fail_closed = (f"{x}{time.monotonic_ns()}" for x in ("exact", "open", "closed"))
        for tenant, args in (
            (exact, ["--window", "minute", "--limit", str(n)]),
            (fail_open, ["--window", "minute", "--limit", "1000"]),
            (fail_closed, ["--window", "minute", "--limit", "1000", "--fail", "closed"]),
        ):
            a.cli("tenants", "create", tenant)
            a.cli("limits", "create", "--tenant", tenant, "--kind", "requests", *args)
        keys = {t: a.new_key(t) for t in (exact, fail_open, fail_closed)}
        time.sleep(1.5)  # a's writes reach b's control plane by NOTIFY, its subscribers within 1 s
        body = json.dumps(
            {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        ).encode()

        def post(stack, key: str) -> int:
            headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
            return http("POST", f"{stack.gateway}/v1/chat/completions", body, headers)[0]

        codes: list[int] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            code = post(a if i % 2 else b, keys[exact])
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (codes.count(200), codes.count(429)) == (n, 64 - n), sorted(codes)  # 64 clients, 2 gateways

        redis_proxy.cut()  # Redis goes away mid-run
        assert [post(a, keys[fail_open]), post(b, keys[fail_open])] == [200, 200]
        assert [post(a, keys[fail_closed]), post(b, keys[fail_closed])] == [429, 429]
        redis_proxy.resume()  # and comes back: no restart needed
        eventually(
            lambda: [post(a, keys[fail_closed]), post(b, keys[fail_closed])] == [200, 200] or 1 / 0, 5.0
        )
    finally:
        stop_stack(b)
        stop_stack(a)
        redis_proxy.close()


def test_no_double_burst_at_a_window_edge(stack):
    """N at x.8 s and N at (x+1).2 s of the wall clock: a fixed per-second window would admit 2N."""
    n = 4
    client = stack.client(tenant_with(stack, ["--kind", "requests", "--window", "second", "--limit", str(n)]))
    outcomes: list[str] = []
    now = time.time()
    time.sleep((0.8 - now % 1) % 1)  # to x.8
    started = time.monotonic()
    burst(client, n, outcomes)
    time.sleep(max(0.0, 0.4 - (time.monotonic() - started)))  # to (x+1).2
    burst(client, n, outcomes)
    assert time.monotonic() - started < 1.0  # both bursts inside one window length
    assert outcomes.count("ok") == n


def test_events_split_across_reads_reach_the_client_whole_when_usage_is_stripped(stack):
    """An upstream (or TCP) may cut an SSE event in two: the usage strip must not lose bytes."""
    client = stack.client(stack.demo_key)
    for include_usage in (None, True):  # stripped (injected) and passed through (asked for)
        options = {} if include_usage is None else {"stream_options": {"include_usage": True}}
        chunks = list(
            chat(
                client, max_tokens=6, stream=True, extra_headers={"x-demo-split-events": "1"}, **options
            ).parse()
        )
        words = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split()
        assert words == [f"tok{i}" for i in range(6)]
        assert (chunks[-1].usage is not None) == bool(include_usage)


@pytest.mark.redis
@pytest.mark.parametrize("topology", ["redis_cluster", "redis_sentinel"])
def test_a_redis_master_failover_under_load_keeps_fail_modes_and_exact_counts(tmp_path, topology, request):
    """Counters on a real Redis Cluster (3 masters, a replica each) or a Sentinel-watched master.
    Its master(s) fail over while requests flow: a fail-open limit never refuses, a fail-closed
    one refuses at most (never a 5xx), and a request limit's count from before the failover is
    still exact after it (10 of 20 used before; exactly 10 more admitted after)."""
    redis = request.getfixturevalue(topology)
    stack = start_stack(tmp_path / "stack", "--redis", redis.url)
    try:
        exact, fail_open, fail_closed = (f"{x}{time.monotonic_ns()}" for x in ("exact", "open", "closed"))
        for tenant, args in (
            (exact, ["--window", "hour", "--limit", "20"]),
            (fail_open, ["--window", "minute", "--limit", "100000"]),
            (fail_closed, ["--window", "minute", "--limit", "100000", "--fail", "closed"]),
        ):
            stack.cli("tenants", "create", tenant)
            stack.cli("limits", "create", "--tenant", tenant, "--kind", "requests", *args)
        keys = {t: stack.new_key(t) for t in (exact, fail_open, fail_closed)}
        time.sleep(1.0)
        body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})

        def post(key: str) -> int:
            headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
            return http("POST", f"{stack.gateway}/v1/chat/completions", body.encode(), headers)[0]

        assert [post(keys[exact]) for _ in range(10)] == [200] * 10
        codes: dict[str, list[int]] = {fail_open: [], fail_closed: []}
        stop = threading.Event()

        def load(tenant: str) -> None:
            while not stop.is_set():
                codes[tenant].append(post(keys[tenant]))

        loaders = [threading.Thread(target=load, args=(t,)) for t in codes]
        for t in loaders:
            t.start()
        try:
            time.sleep(0.5)
            redis.failover()
            time.sleep(1.0)
        finally:
            stop.set()
            for t in loaders:
                t.join()
        assert len(codes[fail_open]) > 20 and set(codes[fail_open]) == {200}  # noqa: PT018
        assert set(codes[fail_closed]) <= {200, 429}, codes[fail_closed]
        # the counters answer again (a fail-closed limit admits) before the exact count is read
        eventually(lambda: post(keys[fail_closed]) == 200 or 1 / 0, timeout=15, interval=0.2)
        after = [post(keys[exact]) for _ in range(12)]
        assert (after.count(200), after.count(429)) == (10, 2), after
    finally:
        stop_stack(stack)
