"""One contract suite over every CounterBackend: memory (FakeClock) and the real Redis.

Redis runs against 127.0.0.1:6379/0 with a per-run key prefix (never FLUSHALL) and real time,
so windows are 1 s and the suite sleeps for a few seconds at most.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from ratelimit.backends import (
    CounterBackend,
    CounterRequest,
    MemoryCounterBackend,
    RedisCounterBackend,
    counter_key,
    make_backend,
)
from tessera.clock import FakeClock
from tessera.errors import ConfigError, StorageError

REDIS_URL = "redis://127.0.0.1:6379/0"
WINDOW = 1.0


@dataclass
class Harness:
    backend: CounterBackend
    advance: Callable[[float], Awaitable[None]]

    async def hit(self, *counters: CounterRequest):
        return await self.backend.acquire(list(counters))


def req(key: str = "L1", limit: int = 3, *, enforced: bool = True, hits: int = 1, window: float = WINDOW):
    return CounterRequest(counter_key("t1", key), limit, window, enforced, hits)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(request):
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        backend = MemoryCounterBackend(clock)
        yield Harness(backend, advance)
        await backend.close()
        return
    prefix = f"tessera:test:{uuid.uuid4().hex}:rl:"
    backend = RedisCounterBackend(REDIS_URL, prefix=prefix)
    yield Harness(backend, asyncio.sleep)
    await backend.close()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_exactly_n_admitted_then_refused(harness):
    remaining = []
    for _ in range(3):
        result = await harness.hit(req())
        assert result.admitted
        assert not result.states[0].over
        remaining.append(result.states[0].remaining)
    assert remaining == [2, 1, 0]
    refused = await harness.hit(req())
    assert not refused.admitted
    (state,) = refused.states
    assert state.over
    assert state.remaining == 0
    assert 0 < state.retry_after <= WINDOW


async def test_admitted_again_after_the_window_slides(harness):
    for _ in range(3):
        assert (await harness.hit(req())).admitted
    assert not (await harness.hit(req())).admitted
    await harness.advance(WINDOW + 0.1)
    result = await harness.hit(req())
    assert result.admitted
    assert result.states[0].remaining == 2


async def test_no_double_burst_at_the_window_edge(harness):
    assert (await harness.hit(req())).admitted  # t = 0
    await harness.advance(0.6)
    assert (await harness.hit(req())).admitted  # t = 0.6
    assert (await harness.hit(req())).admitted
    assert not (await harness.hit(req())).admitted
    await harness.advance(0.5)  # t = 1.1: past a fixed window's edge, but only the t=0 hit left
    assert (await harness.hit(req())).admitted
    refused = await harness.hit(req())
    assert not refused.admitted
    assert 0.2 < refused.states[0].retry_after <= 0.5  # the t=0.6 hits leave at 1.6
    await harness.advance(0.6)  # t = 1.7: the t=0.6 hits are out, the t=1.1 one is not
    assert (await harness.hit(req())).admitted
    assert (await harness.hit(req())).admitted
    assert not (await harness.hit(req())).admitted


async def test_all_or_nothing_across_limits(harness):
    wide, tight = req("wide", limit=5), req("tight", limit=1)
    first = await harness.hit(wide, tight)
    assert first.admitted
    assert [s.remaining for s in first.states] == [4, 0]
    second = await harness.hit(wide, tight)
    assert not second.admitted
    assert [s.over for s in second.states] == [False, True]
    assert second.states[0].remaining == 4  # reported, not recorded
    alone = await harness.hit(wide)
    assert alone.admitted
    assert alone.states[0].remaining == 3  # the refused call recorded nothing


async def test_shadow_never_refuses(harness):
    shadow, enforced = req("shadow", limit=1, enforced=False), req("enforced", limit=10)
    states = []
    for _ in range(3):
        result = await harness.hit(shadow, enforced)
        assert result.admitted
        states.append(result.states)
    assert [s[0].over for s in states] == [False, True, True]
    assert [s[1].remaining for s in states] == [9, 8, 7]
    assert states[1][0].retry_after > 0
    only_shadow = await harness.hit(shadow)
    assert only_shadow.admitted
    assert only_shadow.states[0].over


async def test_shadow_records_only_what_an_enforced_limit_would(harness):
    shadow = req("shadow", limit=2, enforced=False)
    for _ in range(5):
        assert (await harness.hit(shadow)).admitted
    await harness.advance(WINDOW + 0.1)
    result = await harness.hit(shadow)
    assert not result.states[0].over
    assert result.states[0].remaining == 1


async def test_counters_per_key_id_are_separate(harness):
    key_a = CounterRequest(counter_key("t1", "L", "a"), 1, WINDOW)
    key_b = CounterRequest(counter_key("t1", "L", "b"), 1, WINDOW)
    other_tenant = CounterRequest(counter_key("t2", "L", "a"), 1, WINDOW)
    assert (await harness.hit(key_a)).admitted
    assert (await harness.hit(key_b)).admitted
    assert (await harness.hit(other_tenant)).admitted
    assert not (await harness.hit(key_a)).admitted


async def test_retry_after_is_time_until_the_oldest_leaves(harness):
    assert (await harness.hit(req(limit=2))).admitted
    await harness.advance(0.3)
    assert (await harness.hit(req(limit=2))).admitted
    await harness.advance(0.2)
    refused = await harness.hit(req(limit=2))
    assert not refused.admitted
    assert 0.4 <= refused.states[0].retry_after <= 0.5 + 1e-6


async def test_several_hits_per_call(harness):
    assert (await harness.hit(req(limit=5, hits=3))).admitted
    refused = await harness.hit(req(limit=5, hits=3))
    assert not refused.admitted
    assert refused.states[0].remaining == 2
    ok = await harness.hit(req(limit=5, hits=2))
    assert ok.admitted
    assert ok.states[0].remaining == 0


async def test_more_hits_than_the_limit_is_never_admitted(harness):
    refused = await harness.hit(req(limit=2, hits=3))
    assert not refused.admitted
    assert refused.states[0].retry_after == pytest.approx(WINDOW)
    assert (await harness.hit(req(limit=2, hits=2))).admitted  # nothing was recorded


async def test_zero_limit_refuses_everything(harness):
    refused = await harness.hit(req(limit=0))
    assert not refused.admitted
    assert refused.states[0].remaining == 0


async def test_changing_the_limit_keeps_the_count(harness):
    for _ in range(3):
        assert (await harness.hit(req(limit=3))).admitted
    raised = await harness.hit(req(limit=5))
    assert raised.admitted
    assert raised.states[0].remaining == 1
    lowered = await harness.hit(req(limit=2))
    assert not lowered.admitted


async def test_empty_call_is_admitted(harness):
    result = await harness.backend.acquire([])
    assert result.admitted
    assert result.states == ()


async def test_memory_backend_drops_idle_keys():
    clock = FakeClock()
    backend = MemoryCounterBackend(clock)
    for i in range(100):
        await backend.acquire([CounterRequest(f"k{i}", 5, 1.0)])
    await backend.acquire([CounterRequest("long", 5, 60.0)])
    assert len(backend) == 101
    clock.advance(1.0)
    await backend.acquire([])
    assert len(backend) == 1  # only the 60 s key is still inside its window
    clock.advance(59.0)
    await backend.acquire([])
    assert len(backend) == 0


async def test_memory_backend_window_change_moves_the_key():
    clock = FakeClock()
    backend = MemoryCounterBackend(clock)
    await backend.acquire([CounterRequest("k", 5, 1.0)])
    await backend.acquire([CounterRequest("k", 5, 10.0)])
    clock.advance(2.0)
    result = await backend.acquire([CounterRequest("k", 5, 10.0)])
    assert result.states[0].remaining == 2  # both entries still count under the 10 s window
    assert len(backend) == 1


async def test_redis_unreachable_is_a_transient_storage_error():
    backend = RedisCounterBackend("redis://127.0.0.1:1/0", prefix="tessera:test:unreachable:")
    try:
        with pytest.raises(StorageError) as info:
            await backend.acquire([req()])
        assert info.value.transient
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", MemoryCounterBackend),
        ("redis://127.0.0.1:6379/0", RedisCounterBackend),
        ("rediss://user:pw@redis.example:6380/0", RedisCounterBackend),
        ("unix:///run/redis.sock", RedisCounterBackend),
    ],
)
async def test_make_backend_by_scheme(url, kind):
    backend = make_backend(url)
    assert isinstance(backend, kind)
    await backend.close()


def test_make_backend_rejects_unknown_schemes_without_leaking_passwords():
    with pytest.raises(ConfigError) as info:
        make_backend("memcached://user:s3cret@host:11211")
    assert "s3cret" not in str(info.value)
