"""The real ratelimit service: build_app() on 127.0.0.1:0, a real policy stream, real stubs.

The policy stream comes from a tiny in-test PolicyService (a real grpc.aio server). No mocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from ratelimit.app import build_app
from ratelimit.backends import MemoryCounterBackend
from ratelimit.settings import RatelimitSettings
from tessera.admission.v1 import admission_pb2
from tessera.clock import FakeClock
from tessera.errors import ConfigError
from tessera.frames import Frames, frame
from tessera.policy.v1 import policy_pb2, policy_pb2_grpc
from tessera.settings import GrpcSettings, MetricsSettings, PolicySettings, RedisSettings

REDIS_URL = "redis://127.0.0.1:6379/0"
OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakePolicyService(policy_pb2_grpc.PolicyServiceServicer):
    """Sends whatever the test queues; records the versions the subscriber acks."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[policy_pb2.StreamPolicyResponse] = asyncio.Queue()
        self.acks: list[str] = []
        self.streams = 0
        self._acked = asyncio.Event()

    async def Stream(self, request_iterator, _context) -> AsyncIterator[policy_pb2.StreamPolicyResponse]:  # noqa: N802
        self.streams += 1

        async def read_acks() -> None:
            async for req in request_iterator:
                if req.ack_version:
                    self.acks.append(req.ack_version)
                    self._acked.set()

        reader = asyncio.create_task(read_acks())
        try:
            while True:
                yield await self.outbox.get()
        finally:
            reader.cancel()

    def snapshot(
        self, version: str, *limits: policy_pb2.Limit, models: tuple[policy_pb2.Model, ...] = ()
    ) -> None:
        self.outbox.put_nowait(
            policy_pb2.StreamPolicyResponse(
                version=version,
                reset=True,
                complete=True,
                upserts=[policy_pb2.Resource(limit=lim) for lim in limits]
                + [policy_pb2.Resource(model=m) for m in models],
            )
        )

    def delta(self, version: str, *limits: policy_pb2.Limit, deletes: tuple[str, ...] = ()) -> None:
        self.outbox.put_nowait(
            policy_pb2.StreamPolicyResponse(
                version=version,
                complete=True,
                upserts=[policy_pb2.Resource(limit=lim) for lim in limits],
                deletes=list(deletes),
            )
        )

    async def wait_ack(self, version: str) -> None:
        async with asyncio.timeout(5):
            while version not in self.acks:
                self._acked.clear()
                await self._acked.wait()


@pytest.fixture
async def policy():
    service = FakePolicyService()
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    service.url = f"127.0.0.1:{port}"
    yield service
    await server.stop(0)


@pytest.fixture
def tenant():
    return f"t-{uuid.uuid4().hex[:12]}"


def settings_for(policy_url: str, redis_url: str = "memory://", **kw) -> RatelimitSettings:
    return RatelimitSettings(
        grpc=GrpcSettings(host="127.0.0.1", port=0, grace_seconds=0.1),
        metrics=MetricsSettings(enabled=False),
        policy=PolicySettings(url=policy_url, reconnect_max_seconds=0.2),
        redis=RedisSettings(url=redis_url),
        **kw,
    )


@pytest.fixture
async def start(policy):
    apps = []

    async def _start(redis_url: str = "memory://"):
        app = await build_app(settings_for(policy.url, redis_url))
        apps.append(app)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        apps.append(channel)
        return app, rls_pb2_grpc.RateLimitServiceStub(channel), health_pb2_grpc.HealthStub(channel)

    yield _start
    for item in reversed(apps):
        await (item.stop() if hasattr(item, "stop") else item.close())


def limit(tenant: str, limit_id: str = "L1", n: int = 2, **kw) -> policy_pb2.Limit:
    kw.setdefault("window_seconds", 60)
    kw.setdefault("kind", policy_pb2.Limit.REQUESTS)
    return policy_pb2.Limit(id=limit_id, tenant_id=tenant, limit=n, **kw)


def descriptor(
    tenant: str, key: str = "k1", model: str = "m1", **extra: str
) -> ratelimit_pb2.RateLimitDescriptor:
    entries = [("tenant_id", tenant), ("key_id", key), ("model", model), *extra.items()]
    return ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )


async def ask(stub, *descriptors, domain: str = "tessera") -> rls_pb2.RateLimitResponse:
    return await stub.ShouldRateLimit(
        rls_pb2.RateLimitRequest(domain=domain, descriptors=list(descriptors)), timeout=5
    )


def headers(response) -> dict[str, str]:
    return {h.key: h.value for h in response.response_headers_to_add}


async def serving(health) -> int:
    return (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status


async def wait_serving(health) -> None:
    async with asyncio.timeout(5):
        while await serving(health) != SERVING:
            await asyncio.sleep(0.02)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_health_is_not_serving_until_the_first_snapshot(start, policy, tenant):
    app, _, health = await start()
    assert app.port > 0
    await asyncio.sleep(0.2)  # the subscriber is connected, but nothing has been sent
    assert await serving(health) == NOT_SERVING
    rls_health = await health.Check(
        health_pb2.HealthCheckRequest(service="envoy.service.ratelimit.v3.RateLimitService"), timeout=5
    )
    assert rls_health.status == NOT_SERVING
    policy.snapshot("v1", limit(tenant))
    await wait_serving(health)
    await policy.wait_ack("v1")
    assert app.subscriber.version == "v1"


async def test_ok_then_over_limit_with_retry_after(start, policy, tenant):
    _, stub, health = await start()
    policy.snapshot("v1", limit(tenant, n=2))
    await wait_serving(health)
    over_before = sample("tessera_ratelimit_decisions_total", {"result": "over_limit"})

    first, second = await ask(stub, descriptor(tenant)), await ask(stub, descriptor(tenant))
    assert (first.overall_code, second.overall_code) == (OK, OK)
    assert headers(first) == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
    }
    assert headers(second)["x-ratelimit-remaining-requests"] == "0"
    assert not first.dynamic_metadata.fields  # nothing reserved: Envoy makes no settle call
    assert first.statuses[0].current_limit.requests_per_unit == 2
    assert first.statuses[0].current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.MINUTE

    with capture_logs() as logs:
        third = await ask(stub, descriptor(tenant))
    assert third.overall_code == OVER
    assert third.statuses[0].code == OVER
    assert third.statuses[0].limit_remaining == 0
    got = headers(third)
    assert got["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(got["retry-after"]) <= 60
    assert got["content-type"] == "application/json"
    assert json.loads(third.raw_body)["error"]["code"] == "rate_limit_exceeded"
    assert sample("tessera_ratelimit_decisions_total", {"result": "over_limit"}) == over_before + 1
    over = [e for e in logs if e["event"] == "ratelimit_over_limit"]
    assert len(over) == 1
    assert over[0]["tenant_id"] == tenant
    assert over[0]["limit_id"] == "L1"

    # another key of the same tenant shares the tenant-wide limit; another tenant does not
    assert (await ask(stub, descriptor(tenant, key="k2"))).overall_code == OVER
    assert (await ask(stub, descriptor("someone-else"))).overall_code == OK


async def test_a_delta_changing_the_limit_takes_effect(start, policy, tenant):
    _, stub, health = await start()
    policy.snapshot("v1", limit(tenant, n=1))
    await wait_serving(health)
    assert (await ask(stub, descriptor(tenant))).overall_code == OK
    assert (await ask(stub, descriptor(tenant))).overall_code == OVER

    policy.delta("v2", limit(tenant, n=3))
    await policy.wait_ack("v2")
    raised = await ask(stub, descriptor(tenant))
    assert raised.overall_code == OK
    assert headers(raised) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
    }

    policy.delta("v3", deletes=("limit/L1",))
    await policy.wait_ack("v3")
    gone = await ask(stub, descriptor(tenant))
    assert gone.overall_code == OK
    assert headers(gone) == {}


async def test_an_invalid_version_keeps_the_old_limits(start, policy, tenant):
    _, stub, health = await start()
    policy.snapshot("v1", limit(tenant, n=1))
    await wait_serving(health)
    policy.delta("v2", policy_pb2.Limit(id="bad", tenant_id="", kind=policy_pb2.Limit.REQUESTS, limit=1))
    # Rejected: the service keeps v1 and resubscribes, so it never builds on a version it lacks.
    async with asyncio.timeout(5):
        while policy.streams < 2:
            await asyncio.sleep(0.02)
    assert "v2" not in policy.acks
    assert (await ask(stub, descriptor(tenant))).overall_code == OK
    assert (await ask(stub, descriptor(tenant))).overall_code == OVER  # L1 (1/min) still there
    policy.snapshot("v3", limit(tenant, n=1), limit(tenant, "L2", n=5))  # what a control plane resends
    await policy.wait_ack("v3")


async def test_key_and_model_scoped_and_shadow_limits(start, policy, tenant):
    _, stub, health = await start()
    policy.snapshot(
        "v1",
        limit(tenant, "per-key", n=1, key_id="k1"),
        limit(tenant, "per-model", n=5, model="m2"),
        limit(tenant, "shadow", n=1, shadow=True),
    )
    await wait_serving(health)
    assert (await ask(stub, descriptor(tenant, key="k1"))).overall_code == OK
    over = await ask(stub, descriptor(tenant, key="k1"))
    assert over.overall_code == OVER
    with capture_logs() as logs:
        other_key = await ask(stub, descriptor(tenant, key="k2", model="m2"))
    assert other_key.overall_code == OK  # the shadow limit (1/min) is over, but never refuses
    assert headers(other_key) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "1m0s",
    }
    assert [e["limit_id"] for e in logs if e["event"] == "ratelimit_shadow_over_limit"] == ["shadow"]


async def test_descriptors_it_does_not_understand_are_ok_and_uncounted(start, policy, tenant):
    _, stub, health = await start()
    policy.snapshot("v1", limit(tenant, n=1))
    await wait_serving(health)
    tokens = ratelimit_pb2.RateLimitDescriptor(
        entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant_id", value=tenant),
            ratelimit_pb2.RateLimitDescriptor.Entry(key="limit_kind", value="tokens"),
        ]
    )
    tokens.hits_addend.value = 500
    for _ in range(3):
        response = await ask(stub, tokens)
        assert response.overall_code == OK
        assert [s.code for s in response.statuses] == [OK]
        assert (await ask(stub, descriptor(tenant), domain="elsewhere")).overall_code == OK
    mixed = await ask(stub, tokens, descriptor(tenant))
    assert mixed.overall_code == OK
    assert len(mixed.statuses) == 2
    assert (await ask(stub, descriptor(tenant))).overall_code == OVER


async def test_injected_counters_and_clock(policy):
    clock = FakeClock()
    counters = MemoryCounterBackend(clock)
    app = await build_app(settings_for(policy.url), counters=counters)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        stub, health = rls_pb2_grpc.RateLimitServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        policy.snapshot("v1", limit("t1", n=1, window_seconds=1))
        await wait_serving(health)
        assert (await ask(stub, descriptor("t1"))).overall_code == OK
        refused = await ask(stub, descriptor("t1"))
        assert refused.overall_code == OVER
        assert headers(refused)["retry-after"] == "1"
        assert refused.statuses[0].current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.SECOND
        clock.advance(1.0)
        assert (await ask(stub, descriptor("t1"))).overall_code == OK
    finally:
        await channel.close()
        await app.stop()
        await counters.close()


@pytest.mark.redis
async def test_redis_backend(start, policy, tenant):
    app, stub, health = await start(REDIS_URL)
    try:
        policy.snapshot("v1", limit(tenant, n=2), limit(tenant, "per-key", n=10, key_id="k1"))
        await wait_serving(health)
        assert (await ask(stub, descriptor(tenant))).overall_code == OK
        second = await ask(stub, descriptor(tenant))
        assert second.overall_code == OK
        assert headers(second)["x-ratelimit-remaining-requests"] == "0"
        third = await ask(stub, descriptor(tenant))
        assert third.overall_code == OVER
        assert 1 <= int(headers(third)["retry-after"]) <= 60
    finally:
        await app.stop()
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"tessera:rl:{{{tenant}}}:*")]
        assert len(keys) == 2  # tenant-wide and per-key, hash-tagged by tenant
        await client.delete(*keys)
        await client.aclose()


async def test_redis_unreachable_applies_each_limits_fail_mode(start, policy, tenant):
    _, stub, health = await start("redis://127.0.0.1:1/0")
    closed = f"{tenant}-closed"
    policy.snapshot("v1", limit(tenant, "open", n=5), limit(closed, "closed", n=5, fail_closed=True))
    await wait_serving(health)  # readiness never depends on Redis
    errors_before = sample("tessera_ratelimit_backend_errors_total")
    with capture_logs() as logs:
        fail_open = await ask(stub, descriptor(tenant))
        fail_closed = await ask(stub, descriptor(closed))
    assert fail_open.overall_code == OK
    assert fail_closed.overall_code == OVER
    assert headers(fail_closed) == {"retry-after": "1", "content-type": "application/json"}
    assert sample("tessera_ratelimit_backend_errors_total") == errors_before + 2
    backend_errors = [e for e in logs if e["event"] == "ratelimit_backend_error"]
    assert len(backend_errors) == 2
    assert all("exc_info" not in e for e in backend_errors)


async def test_memory_with_several_workers_is_a_startup_error(policy):
    with pytest.raises(ConfigError, match="memory://"):
        await build_app(settings_for(policy.url, workers=2))


async def test_metrics_are_served(policy):
    settings = settings_for(policy.url).model_copy(update={"metrics": MetricsSettings(port=0)})
    app = await build_app(settings)
    try:
        assert app.metrics_port > 0
        reader, writer = await asyncio.open_connection("127.0.0.1", app.metrics_port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert b"tessera_ratelimit_decisions_total" in body
    finally:
        await app.stop()


def _run_main(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ratelimit", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_python_m_ratelimit_serves_and_stops_on_sigterm():
    env = {
        "TESSERA_GRPC__PORT": "0",
        "TESSERA_METRICS__PORT": "0",
        "TESSERA_POLICY__URL": "127.0.0.1:1",
        "TESSERA_REDIS__URL": "redis://:hunter2@127.0.0.1:6379/0",
        "TESSERA_LOG__FORMAT": "json",
    }
    proc = _run_main(env)
    try:
        deadline = time.monotonic() + 20
        listening = None
        while listening is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            event = json.loads(line)
            if event["event"] == "ratelimit_listening":
                listening = event
        assert listening is not None
        assert listening["port"] > 0
        assert listening["metrics_port"] > 0
        assert "hunter2" not in json.dumps(listening)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"TESSERA_REDIS__URL": "memory://"}, 0),
        ({"TESSERA_REDIS__URL": "memory://", "TESSERA_WORKERS": "2"}, 2),
        ({"TESSERA_REDIS__URL": "memcached://x"}, 2),
        ({"TESSERA_WORKERS": "0"}, 2),
    ],
)
def test_check_config(env, code):
    proc = _run_main({"TESSERA_LOG__FORMAT": "json", **env}, "check-config")
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == code, (out, err)


# --- tokens, spend and concurrency: reserve at request time, settle at stream end ---------------


def settle(tenant: str, request_id: str, **usage: str) -> ratelimit_pb2.RateLimitDescriptor:
    return descriptor(tenant, phase="settle", request_id=request_id, **usage)


@pytest.mark.parametrize("backend", ["memory://", pytest.param(REDIS_URL, marks=pytest.mark.redis)])
async def test_token_budget_reserves_then_settles_to_the_real_count(start, policy, tenant, backend):
    _, stub, health = await start(backend)
    budget = limit(tenant, "T1", n=100, kind=policy_pb2.Limit.TOKENS, window_seconds=0)
    policy.snapshot(
        "v1", budget, models=(policy_pb2.Model(name="m1", default_max_tokens=30, max_max_tokens=60),)
    )
    await wait_serving(health)
    # The prompt is reserved at one token per body byte (prompt_bytes_per_token = 1):
    # 10 body bytes = 10 prompt tokens + max_tokens 50 = 60 reserved, 100 - 60 = 40 left
    first = await ask(stub, descriptor(tenant, request_id="r1", max_tokens="50", body_bytes="10"))
    assert first.overall_code == OK
    assert headers(first)["x-ratelimit-remaining-tokens"] == "40"
    assert first.dynamic_metadata.fields["reserved"].string_value == "1"  # Envoy will settle it
    # max_tokens above the model's maximum is capped at 60: 40 + 60 = 100 > 40 left
    second = await ask(stub, descriptor(tenant, request_id="r2", max_tokens="500", body_bytes="40"))
    assert second.overall_code == OVER
    got = headers(second)
    assert json.loads(second.raw_body)["error"]["code"] == "insufficient_quota"  # a calendar-month budget
    assert int(got["retry-after"]) >= 1
    # r2 was refused: its stream-done call (Envoy makes one anyway) changes nothing
    await ask(stub, settle(tenant, "r2", status="429"))
    # r1 used 8 + 4 = 12: 60 - 12 = 48 of its reservation come back, 40 + 48 = 88 left
    assert (
        await ask(stub, settle(tenant, "r1", prompt_tokens="8", completion_tokens="4"))
    ).overall_code == OK
    await ask(stub, settle(tenant, "r1", prompt_tokens="8", completion_tokens="4"))  # a repeat: no-op
    # A client's max_tokens (an RLS descriptor) is capped by the model's maximum, not refused:
    # 500 -> 60 reserved (0 body bytes), 88 - 60 = 28 left (uncapped, 500 > 88 would refuse)
    capped = await ask(stub, descriptor(tenant, request_id="r2b", max_tokens="500"))
    assert capped.overall_code == OK
    assert headers(capped)["x-ratelimit-remaining-tokens"] == "28"
    await ask(stub, settle(tenant, "r2b", status="503"))  # failed: its 60 come back, 88 left
    third = await ask(stub, descriptor(tenant, request_id="r3", body_bytes="10"))  # 10 + default 30
    assert third.overall_code == OK
    assert headers(third)["x-ratelimit-remaining-tokens"] == "48"  # 88 - 40
    # a stream the client cut (no usage, no status) keeps its whole reservation: charged, not free
    await ask(stub, settle(tenant, "r3"))
    probe = await ask(stub, descriptor(tenant, request_id="r4", max_tokens="1"))
    assert headers(probe)["x-ratelimit-remaining-tokens"] == "47"  # 48 - 1
    # a failed request (5xx) gets its reservation back
    await ask(stub, settle(tenant, "r4", status="503"))
    assert (
        headers(await ask(stub, descriptor(tenant, request_id="r5", max_tokens="1")))[
            "x-ratelimit-remaining-tokens"
        ]
        == "47"  # 48 (r4's 1 back) - r5's 1
    )
    # A settlement for a request that holds no reservation (never admitted, or settled
    # already) changes nothing, whatever usage it reports.
    await ask(stub, settle(tenant, "never-admitted", prompt_tokens="30", completion_tokens="10"))
    await ask(stub, settle(tenant, "r1", prompt_tokens="30", completion_tokens="10"))
    probe = await ask(stub, descriptor(tenant, request_id="r6", max_tokens="1"))
    assert headers(probe)["x-ratelimit-remaining-tokens"] == "46"  # 47 - r6's 1, nothing else


async def test_spend_limit_charges_prices_and_concurrency_frees_slots(start, policy, tenant):
    _, stub, health = await start()
    spend = limit(tenant, "S1", n=1000, kind=policy_pb2.Limit.SPEND, window_seconds=86400)
    slots = limit(tenant, "C1", n=1, kind=policy_pb2.Limit.CONCURRENCY, window_seconds=0)
    # 2,000,000 micros per 1M tokens = 2 micros per input token, 10 per output token
    priced = policy_pb2.Model(name="m1", input_micros=2_000_000, output_micros=10_000_000, currency="USD")
    policy.snapshot("v1", spend, slots, models=(priced,))
    await wait_serving(health)
    reserved0, settled0 = (
        sample("tessera_ratelimit_reservations_total"),
        sample("tessera_ratelimit_settlements_total"),
    )
    # 100 body bytes = 100 prompt tokens (one per byte):
    first = await ask(stub, descriptor(tenant, request_id="r1", max_tokens="50", body_bytes="100"))
    assert first.overall_code == OK  # reserves 100 * 2 + 50 * 10 = 700 micros and the one slot
    busy = await ask(stub, descriptor(tenant, request_id="r2", max_tokens="1"))
    assert busy.overall_code == OVER
    assert json.loads(busy.raw_body)["error"]["code"] == "rate_limit_exceeded"  # concurrency is a rate
    await ask(
        stub, settle(tenant, "r1", prompt_tokens="10", completion_tokens="5", status="200")
    )  # 70 micros
    again = await ask(stub, descriptor(tenant, request_id="r2", max_tokens="90", body_bytes="0"))
    assert again.overall_code == OK  # the slot is free; 930 micros left covers 900
    await ask(stub, settle(tenant, "r2"))  # the client left before usage: the 900 stay charged
    over = await ask(stub, descriptor(tenant, request_id="r3", max_tokens="5"))  # 50 > 30 left
    assert over.overall_code == OVER
    assert json.loads(over.raw_body)["error"]["code"] == "insufficient_quota"  # spend is a quota
    # two admitted requests reserved, two settled: the backlog (the difference) is back to zero
    assert sample("tessera_ratelimit_reservations_total") - reserved0 == 2
    assert sample("tessera_ratelimit_settlements_total") - settled0 == 2


async def test_bad_descriptor_values_are_estimated_not_trusted(start, policy, tenant):
    _, stub, health = await start()
    policy.snapshot("v1", limit(tenant, "T1", n=100, kind=policy_pb2.Limit.TOKENS, window_seconds=60))
    await wait_serving(health)
    for value in ["-5", "abc", "1e400", "2.5"]:
        resp = await ask(stub, descriptor(tenant, request_id=f"r-{value}", max_tokens=value))
        assert resp.overall_code == OVER  # the default (DEFAULT_COMPLETION_TOKENS = 1024) > 100
    ok = await ask(stub, descriptor(tenant, request_id="float", max_tokens="64.000000"))
    assert ok.overall_code == OK
    assert headers(ok)["x-ratelimit-remaining-tokens"] == "36"


# --- the admission stream (ext_authz's batches, frames over TCP) -------------------------------


async def _exchange(port: int, *batches: admission_pb2.AdmitBatch) -> list[admission_pb2.VerdictBatch]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(frame(b.SerializeToString()) for b in batches))
        replies: list[admission_pb2.VerdictBatch] = []
        frames = Frames()
        async with asyncio.timeout(5):
            while len(replies) < len(batches):
                data = await reader.read(65536)
                assert data, "the admission stream closed before answering"
                replies += [admission_pb2.VerdictBatch.FromString(raw) for raw in frames.feed(data)]
        return replies
    finally:
        writer.close()


async def test_admission_stream_decides_batches_in_order_and_drops_a_peer_not_speaking_it(
    start, policy, tenant
):
    app, _, health = await start()
    policy.snapshot("v1", limit(tenant, n=3))
    await wait_serving(health)

    def batch(seq: int, *rids: str) -> admission_pb2.AdmitBatch:
        b = admission_pb2.AdmitBatch(batch=seq)
        b.admissions.extend(
            admission_pb2.Admission(request_id=r, tenant_id=tenant, key_id="k1", model="m1") for r in rids
        )
        return b

    # A peer that is not speaking the protocol (a length far over the limit) is cut off ...
    reader, writer = await asyncio.open_connection("127.0.0.1", app.admission_port)
    writer.write(b"\xff\xff\xff\xff" + b"x" * 64)
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed, nothing answered
    writer.close()
    # ... and decides nothing: two batches sent back to back are answered in order, exactly 3 of 4.
    first, second = await _exchange(app.admission_port, batch(7, "a", "b"), batch(8, "c", "d"))
    assert (first.batch, second.batch) == (7, 8)
    assert [v.allowed for v in (*first.verdicts, *second.verdicts)] == [True, True, True, False]
    assert second.verdicts[1].code == "rate_limit_exceeded"
    assert second.verdicts[1].retry_after_seconds >= 1
