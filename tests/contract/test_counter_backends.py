"""One contract suite over every CounterBackend: memory (FakeClock) and the real Redis.

Redis runs against 127.0.0.1:6379/0 with a per-run key prefix (never FLUSHALL) and real time,
so windows are 1 s and the suite sleeps for a few seconds at most.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from ratelimit.backends import (
    BUDGET,
    SLOTS,
    CounterBackend,
    CounterRequest,
    MemoryCounterBackend,
    RedisCounterBackend,
    Settlement,
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


# --- budgets (tokens, spend) and slots (concurrency) ------------------------------------------


def budget(key: str = "B1", limit: int = 100, *, hits: int, window: float = 0.0, period: int = 1, **kw):
    return CounterRequest(
        counter_key("t1", key), limit, window, hits=hits, kind=BUDGET, reserve=True, period=period,
        period_end=kw.pop("period_end", 4_000_000_000.0), **kw,
    )  # fmt: skip


def settlement(
    key: str = "B1", limit: int = 100, *, actual: int | None, window: float = 0.0, period: int = 1
):
    return Settlement(counter_key("t1", key), BUDGET, limit, window, period=period, actual=actual)


async def test_budget_reserve_then_settle_returns_the_unused_part(harness):
    b = harness.backend
    first = await b.acquire([budget(hits=60)], request_id="r1", lease_seconds=60)
    assert first.admitted
    assert first.states[0].remaining == 40
    refused = await b.acquire([budget(hits=50)], request_id="r2", lease_seconds=60)
    assert not refused.admitted
    assert refused.states[0].over
    assert refused.states[0].retry_after > 3600  # a calendar budget refills at the period's end
    await b.settle([settlement(actual=10)], request_id="r1")  # 60 reserved, 10 used: 50 back
    again = await b.acquire([budget(hits=50)], request_id="r2", lease_seconds=60)
    assert again.admitted
    assert again.states[0].remaining == 40


async def test_settling_twice_changes_nothing_and_an_unknown_reservation_charges_the_actual(harness):
    b = harness.backend
    await b.acquire([budget(hits=30)], request_id="r1", lease_seconds=60)
    await b.settle([settlement(actual=50)], request_id="r1")  # 20 more than reserved
    await b.settle([settlement(actual=50)], request_id="r1")  # a repeat: no-op
    await b.settle([settlement(actual=None)], request_id="r9")  # nothing reserved, nothing known
    state = await b.acquire([budget(hits=0)], request_id="probe", lease_seconds=60)
    assert state.states[0].remaining == 50
    await b.settle([settlement(actual=45)], request_id="late")  # its reservation is gone: charge it
    assert (await b.acquire([budget(hits=6)], request_id="r3", lease_seconds=60)).admitted is False


async def test_usage_above_the_reservation_puts_the_budget_in_debt(harness):
    b = harness.backend
    await b.acquire([budget(hits=10)], request_id="r1", lease_seconds=60)
    await b.settle([settlement(actual=130)], request_id="r1")
    # level -30: even a zero-cost request waits for the next period
    assert not (await b.acquire([budget(hits=0)], request_id="r2", lease_seconds=60)).admitted
    assert (await b.acquire([budget(hits=1, period=2)], request_id="r3", lease_seconds=60)).admitted


async def test_a_reservation_never_settled_is_released_after_its_lease(harness):
    b = harness.backend
    assert (await b.acquire([budget(hits=80)], request_id="r1", lease_seconds=0.3)).admitted
    assert not (await b.acquire([budget(hits=30)], request_id="r2", lease_seconds=0.3)).admitted
    await harness.advance(0.5)
    assert (await b.acquire([budget(hits=30)], request_id="r2", lease_seconds=60)).admitted
    await b.settle([settlement(actual=None)], request_id="r1")  # too late: its tokens came back
    assert (await b.acquire([budget(hits=0)], request_id="p", lease_seconds=60)).states[0].remaining == 70


async def test_token_bucket_refills_over_its_window(harness):
    b = harness.backend
    bucket = {"limit": 10, "window": 1.0}
    assert (await b.acquire([budget(hits=10, **bucket)], request_id="r1", lease_seconds=60)).admitted
    refused = await b.acquire([budget(hits=5, **bucket)], request_id="r2", lease_seconds=60)
    assert not refused.admitted
    assert 0 < refused.states[0].retry_after <= 0.5 + 0.05
    await harness.advance(0.6)
    assert (await b.acquire([budget(hits=5, **bucket)], request_id="r2", lease_seconds=60)).admitted


async def test_slots_bound_requests_in_flight(harness):
    b = harness.backend
    slot = CounterRequest(counter_key("t1", "C1"), 2, 0.0, kind=SLOTS)
    release = Settlement(slot.key, SLOTS, 2, 0.0)
    assert (await b.acquire([slot], request_id="r1", lease_seconds=60)).admitted
    second = await b.acquire([slot], request_id="r2", lease_seconds=0.3)
    assert second.admitted
    assert second.states[0].remaining == 0
    assert not (await b.acquire([slot], request_id="r3", lease_seconds=60)).admitted
    await b.settle([release], request_id="r1")  # a stream ended
    assert (await b.acquire([slot], request_id="r3", lease_seconds=60)).admitted
    await harness.advance(0.5)  # r2's lease ran out (its Envoy never reported)
    assert (await b.acquire([slot], request_id="r4", lease_seconds=60)).admitted


async def test_a_refused_budget_records_nothing_on_the_other_kinds(harness):
    b = harness.backend
    slot = CounterRequest(counter_key("t1", "C1"), 5, 0.0, kind=SLOTS)
    refused = await b.acquire([req("L1", 3), slot, budget(hits=101)], request_id="r1", lease_seconds=60)
    assert not refused.admitted
    ok = await b.acquire([req("L1", 3), slot, budget(hits=100)], request_id="r2", lease_seconds=60)
    assert [s.remaining for s in ok.states] == [2, 4, 0]


async def test_a_shadow_budget_never_refuses(harness):
    b = harness.backend
    shadow = budget(hits=150, enforced=False)
    result = await b.acquire([shadow], request_id="r1", lease_seconds=60)
    assert result.admitted
    assert result.states[0].over


async def test_changing_a_budgets_limit_keeps_what_was_used(harness):
    b = harness.backend
    assert (await b.acquire([budget(hits=100)], request_id="r1", lease_seconds=60)).admitted  # all used
    raised = await b.acquire([budget(limit=1000, hits=400)], request_id="r2", lease_seconds=60)
    assert raised.admitted  # 900 left of the new 1000
    assert raised.states[0].remaining == 500
    lowered = await b.acquire([budget(limit=400, hits=0)], request_id="r3", lease_seconds=60)
    assert not lowered.admitted  # 500 used is over a limit of 400: even a free request waits
    await b.settle([settlement(limit=400, actual=100)], request_id="r2")  # r2 used 100 of its 400
    back = await b.acquire([budget(limit=1000, hits=0)], request_id="p", lease_seconds=60)
    assert back.states[0].remaining == 800  # 100 + 100 used of 1000


@pytest.mark.redis
async def test_a_settled_month_budget_lives_until_its_month_ends():
    prefix = f"tessera:test:{uuid.uuid4().hex}:rl:"
    backend = RedisCounterBackend(REDIS_URL, prefix=prefix)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        end = time.time() + 20 * 86400  # 20 days from now
        await backend.acquire([budget(hits=10, period_end=end)], request_id="r1", lease_seconds=60)
        settle = Settlement(counter_key("t1", "B1"), BUDGET, 100, 0.0, period=1, period_end=end, actual=5)
        await backend.settle([settle], request_id="r1", lease_seconds=60)
        ttl = await client.pttl(prefix + counter_key("t1", "B1"))
        assert ttl > 19 * 86400 * 1000  # not cut to the lease: an idle tenant keeps its count
    finally:
        await client.aclose()
        await backend.close()
