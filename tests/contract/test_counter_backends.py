"""One contract suite over every CounterBackend: memory (FakeClock) and the real Redis.

Redis runs against 127.0.0.1:6379/0 with a per-run key prefix (never FLUSHALL) and real time,
so windows are 1 s and the suite sleeps for about seven seconds in all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import pytest
import redis.asyncio as aioredis

from ratelimit.backends import (
    BUDGET,
    EXACT_LOG_MAX,
    LOG,
    LOG_BUCKETS,
    SLOTS,
    AcquireCall,
    Acquisition,
    CounterBackend,
    CounterRequest,
    MemoryCounterBackend,
    RedisCounterBackend,
    SettleCall,
    Settlement,
    counter_key,
    make_backend,
)
from ratelimit.backends.redis_url import close_client, redis_client
from tessera.clock import FakeClock
from tessera.errors import ConfigError, StorageError

REDIS_URL = "redis://127.0.0.1:6379/0"
WINDOW = 1.0


@dataclass
class Harness:
    backend: CounterBackend
    advance: Callable[[float], Awaitable[None]]
    clock: Callable[[], float]  # the time the backend decides by (memory: fake; Redis: this host's)
    size: Callable[[str, int], Awaitable[int]]  # entries a key holds: log entries, reservations, slots

    async def hit(self, *counters: CounterRequest, force: bool = False):
        return await self.backend.acquire(list(counters), force=force)


def req(key: str = "L1", limit: int = 3, *, enforced: bool = True, hits: int = 1, window: float = WINDOW):
    return CounterRequest(counter_key("t1", key), limit, window, enforced, hits)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis_cluster", marks=pytest.mark.redis),
        pytest.param("redis_sentinel", marks=pytest.mark.redis),
    ]
)
async def harness(request):
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        backend = MemoryCounterBackend(clock)

        async def memory_size(key: str, kind: int) -> int:
            return backend.entries(key)

        yield Harness(backend, advance, clock.monotonic, memory_size)
        await backend.close()
        return
    prefix = f"tessera:test:{uuid.uuid4().hex}:rl:"
    url = REDIS_URL if request.param == "redis" else request.getfixturevalue(request.param).url
    backend = RedisCounterBackend(url, prefix=prefix)
    client = redis_client(url, 5.0)  # the same server(s), to look inside

    async def redis_size(key: str, kind: int) -> int:
        base = prefix + key
        if kind == LOG:
            return await client.hlen(base)
        if kind == SLOTS:
            return await client.zcard(base)
        reserved = [f for f in await client.hkeys(base) if f.startswith(b"r:")]
        assert await client.zcard(base + ":idx") == len(reserved)  # each reservation has one lease
        assert await client.hlen(base) - len(reserved) in {0, 4}  # level, t, period, limit: no markers
        return len(reserved)

    yield Harness(backend, asyncio.sleep, time.time, redis_size)
    await backend.close()
    try:
        for key in [k async for k in client.scan_iter(match=f"{prefix}*")]:
            await client.delete(key)  # one by one: a Cluster's keys live in different slots
    finally:
        await close_client(client)


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


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1,127.0.0.1:2", "redis+sentinel://127.0.0.1:1/m"],
)
async def test_redis_unreachable_is_a_transient_storage_error(url):
    """Never an exception of the client's own: the caller applies each limit's fail mode."""
    backend = RedisCounterBackend(url, prefix="tessera:test:unreachable:")
    try:
        results = await backend.acquire_many(
            [AcquireCall([req()]), AcquireCall([req("L2")])], lease_seconds=1
        )
        assert [type(r) for r in results] == [StorageError, StorageError]
        with pytest.raises(StorageError) as info:
            await backend.acquire([req()])
        assert info.value.transient
    finally:
        await backend.close()


async def test_redis_timeouts_are_not_retried():
    """A timed-out script may have run: a second try could count the request twice."""
    connections = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await reader.read(65536):
            pass  # never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = RedisCounterBackend(f"redis://127.0.0.1:{port}/0", timeout_seconds=0.1)
    try:
        with pytest.raises(StorageError) as info:
            await backend.acquire([req()])
        assert info.value.transient
        assert connections == 1
    finally:
        await backend.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", MemoryCounterBackend),
        ("redis://127.0.0.1:6379/0", RedisCounterBackend),
        ("rediss://user:pw@redis.example:6380/0", RedisCounterBackend),
        ("unix:///run/redis.sock", RedisCounterBackend),
        ("redis+sentinel://:p%40ss@10.0.0.1:26379,10.0.0.2:26379/tessera/2", RedisCounterBackend),
    ],
)
async def test_make_backend_by_scheme(url, kind):
    backend = make_backend(url)
    assert isinstance(backend, kind)
    await backend.close()


@pytest.mark.parametrize(
    "url",
    [
        "memcached://user:s3cret@host:11211",
        "redis+cluster://user:s3cret@h1:7000,h2/",  # a node without a port
        "redis+cluster://user:s3cret@h1:7000/3",  # a Cluster has one database
        "redis+sentinel://user:s3cret@h1:26379",  # no master name
        "redis+sentinel://user:s3cret@h1:26379/tessera/x",  # not a database number
    ],
)
def test_make_backend_rejects_bad_urls_without_leaking_passwords(url):
    with pytest.raises(ConfigError) as info:
        make_backend(url)
    assert "s3cret" not in str(info.value)


async def test_sentinel_credentials_are_percent_decoded_for_the_data_nodes():
    client = redis_client("redis+sentinel://u%3A1:p%40ss@127.0.0.1:26379/tessera/2", 1.0)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("u:1", "p@ss", 2)
    await close_client(client)


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


async def test_only_a_held_reservation_is_settled(harness):
    b = harness.backend
    await b.acquire([budget(hits=30)], request_id="r1", lease_seconds=60)
    await b.settle([settlement(actual=50)], request_id="r1")  # 20 more than reserved: level 50
    await b.settle([settlement(actual=50)], request_id="r1")  # a repeat: no-op
    await b.settle([settlement(actual=45)], request_id="r9")  # never reserved: no-op
    await b.settle([settlement(actual=None)], request_id="r9")
    refused = await b.acquire([budget(hits=60)], request_id="r2", lease_seconds=60)
    assert not refused.admitted
    await b.settle([settlement(actual=10)], request_id="r2")  # refused: nothing reserved, no-op
    state = await b.acquire([budget(hits=0)], request_id="probe", lease_seconds=60)
    assert state.states[0].remaining == 50
    assert await harness.size(counter_key("t1", "B1"), BUDGET) == 1  # only the probe's (of 0)


async def test_settling_an_unknown_counter_creates_nothing(harness):
    await harness.backend.settle([settlement(key="never", actual=5)], request_id="r1")
    await harness.backend.settle([Settlement(counter_key("t1", "C9"), SLOTS, 1, 0.0)], request_id="r1")
    state = await harness.backend.acquire([budget(key="never", hits=0)], request_id="p", lease_seconds=60)
    assert state.states[0].remaining == 100


async def test_usage_above_the_reservation_puts_the_budget_in_debt(harness):
    b = harness.backend
    await b.acquire([budget(hits=10)], request_id="r1", lease_seconds=60)
    await b.settle([settlement(actual=130)], request_id="r1")
    # level -30: even a zero-cost request waits for the next period
    assert not (await b.acquire([budget(hits=0)], request_id="r2", lease_seconds=60)).admitted
    assert (await b.acquire([budget(hits=1, period=2)], request_id="r3", lease_seconds=60)).admitted


async def test_a_reservation_never_settled_stays_charged_after_its_lease(harness):
    """A request whose usage never arrives (an Envoy crash) is charged what it reserved, an upper
    bound of its cost: never free, however long it ran."""
    b = harness.backend
    assert (await b.acquire([budget(hits=80)], request_id="r1", lease_seconds=0.3)).admitted
    assert not (await b.acquire([budget(hits=30)], request_id="r2", lease_seconds=0.3)).admitted
    await harness.advance(0.5)
    assert not (await b.acquire([budget(hits=30)], request_id="r2", lease_seconds=60)).admitted
    await b.settle([settlement(actual=None)], request_id="r1")  # too late: it stays charged
    assert (await b.acquire([budget(hits=0)], request_id="p", lease_seconds=60)).states[0].remaining == 20


async def test_a_settle_after_the_lease_ended_changes_nothing(harness):
    b = harness.backend
    assert (await b.acquire([budget(hits=80)], request_id="r1", lease_seconds=0.3)).admitted
    await harness.advance(0.5)
    await b.settle([settlement(actual=50)], request_id="r1")  # the first call since: the lease wins
    probe = await b.acquire([budget(hits=0)], request_id="p", lease_seconds=60)
    assert probe.states[0].remaining == 20  # charged as reserved, not the 50 reported too late


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


# --- cost and memory independent of traffic: leases in order, bounded logs ---------------------

BUCKET = WINDOW / LOG_BUCKETS


async def test_leases_end_in_order_and_settled_requests_leave_nothing(harness):
    b = harness.backend
    slot = CounterRequest(counter_key("t1", "C1"), 50, 0.0, kind=SLOTS)
    log = req("L1", limit=10_000)
    started = time.monotonic()
    for i in range(40):
        result = await b.acquire([budget(hits=1), slot, log], request_id=f"r{i}", lease_seconds=60)
        assert result.admitted
        await b.settle([settlement(actual=1), Settlement(slot.key, SLOTS, 50, 0.0)], request_id=f"r{i}")
    assert await harness.size(counter_key("t1", "B1"), BUDGET) == 0
    assert await harness.size(slot.key, SLOTS) == 0
    # the 40 hits fall in the buckets their time spans: two, or more on a slow (loaded) run
    spanned = 2 + int((time.monotonic() - started) / BUCKET)
    size = await harness.size(log.key, LOG)
    assert size <= min(spanned, LOG_BUCKETS + 1)
    assert size < 40
    for i in range(5):  # never settled: ended by later calls once their lease ends
        await b.acquire([budget(hits=10), slot], request_id=f"lost{i}", lease_seconds=0.2)
    kept = await b.acquire([budget(hits=10), slot], request_id="kept", lease_seconds=60)
    assert kept.states[0].remaining == 100 - 40 - 60
    assert await harness.size(counter_key("t1", "B1"), BUDGET) == 6
    await harness.advance(0.3)
    probe = await b.acquire([budget(hits=0), slot], request_id="probe", lease_seconds=60)
    assert probe.states[0].remaining == 100 - 40 - 60  # the 5 lost reservations stay charged
    assert probe.states[1].remaining == 50 - 2  # "kept" and "probe" hold a slot
    assert await harness.size(counter_key("t1", "B1"), BUDGET) == 2  # "kept" and "probe" (of 0)
    assert await harness.size(slot.key, SLOTS) == 2


async def test_a_large_limit_admits_exactly_n_then_refuses(harness):
    for expected in range(900, -1, -100):
        result = await harness.hit(req(limit=1000, hits=100))
        assert result.admitted
        assert result.states[0].remaining == expected
    refused = await harness.hit(req(limit=1000))
    assert not refused.admitted
    assert refused.states[0].over
    assert refused.states[0].remaining == 0
    assert 0 < refused.states[0].retry_after <= WINDOW + BUCKET + 0.001
    too_many = await harness.hit(req(limit=1000, hits=1001))
    assert too_many.states[0].retry_after == pytest.approx(WINDOW)
    await harness.advance(WINDOW + BUCKET + 0.05)  # at most one bucket late
    again = await harness.hit(req(limit=1000, hits=1000))
    assert again.admitted
    assert again.states[0].remaining == 0


async def test_a_large_limit_never_admits_more_than_n_in_any_window_and_stays_small(harness):
    limit, hits, step = 650, 7, 0.01
    admitted: list[float] = []  # the time of each admitted call
    refused = largest = 0
    for _ in range(130):  # 1.3 windows, up to 3 calls a step: the limit stays saturated
        for _ in range(3):
            at = harness.clock()
            result = await harness.hit(req(limit=limit, hits=hits))
            if not result.admitted:
                refused += 1
                assert 0 < result.states[0].retry_after <= WINDOW + BUCKET + 0.001
                break
            admitted.append(at)
        largest = max(largest, await harness.size(counter_key("t1", "L1"), LOG))
        await harness.advance(step)
    slack = 0.0 if isinstance(harness.backend, MemoryCounterBackend) else 0.002  # Redis's clock
    for i, end in enumerate(admitted):
        in_window = [t for t in admitted[: i + 1] if t > end - WINDOW + slack]
        assert len(in_window) * hits <= limit
    assert refused > 0
    assert len(admitted) * hits > limit  # the window slid: old hits left, new ones got in
    assert 15 <= largest <= LOG_BUCKETS + 1  # spread over buckets, never more than one window's


async def test_a_large_limit_counts_each_hit_for_a_full_window(harness):
    await harness.advance(BUCKET / 2)  # memory: mid-bucket (Redis: wherever its clock is)
    start = harness.clock()
    assert (await harness.hit(req(limit=1000, hits=1000))).admitted
    margin = 0.001 if isinstance(harness.backend, MemoryCounterBackend) else 0.01
    await harness.advance(start + WINDOW - margin - harness.clock())
    assert not (await harness.hit(req(limit=1000))).admitted


async def test_changing_a_limit_across_the_exact_bound_keeps_the_count(harness):
    assert (await harness.hit(req(limit=EXACT_LOG_MAX, hits=100))).admitted
    raised = await harness.hit(req(limit=1000))  # now bucketed: the exact hits carry over
    assert raised.admitted
    assert raised.states[0].remaining == 1000 - 101
    lowered = await harness.hit(req(limit=EXACT_LOG_MAX, hits=EXACT_LOG_MAX - 100))  # exact again
    assert not lowered.admitted
    assert lowered.states[0].remaining == EXACT_LOG_MAX - 101


async def test_an_exact_log_stays_small_under_forced_hits(harness):
    for _ in range(200):
        assert (await harness.hit(req(limit=5), force=True)).admitted
        await harness.advance(0.001)
    assert await harness.size(counter_key("t1", "L1"), LOG) <= EXACT_LOG_MAX + 1
    refused = await harness.hit(req(limit=5))
    assert not refused.admitted
    assert refused.states[0].retry_after > 0.5  # the newest forced hits leave last
    await harness.advance(WINDOW)
    assert (await harness.hit(req(limit=5))).admitted


# --- forced admissions (ext_authz failed open): counted even over the limit ---------------------


async def test_forced_hits_are_admitted_and_counted_over_the_limit(harness):
    exact, bucketed, shadow = req("E", limit=2), req("B", limit=200), req("S", limit=1, enforced=False)
    assert (await harness.hit(exact, replace(bucketed, hits=200), shadow)).admitted
    assert (await harness.hit(exact)).admitted
    await harness.advance(0.5)
    forced = await harness.hit(exact, replace(bucketed, hits=100), shadow, force=True)
    assert forced.admitted
    assert [s.over for s in forced.states] == [True, True, True]  # reported as an unforced call sees it
    assert [s.remaining for s in forced.states] == [0, 0, 0]
    assert all(s.retry_after > 0 for s in forced.states)
    assert not (await harness.hit(exact)).admitted
    await harness.advance(0.55)  # the first hits left; the forced ones (at 0.5) still count
    assert not (await harness.hit(replace(exact, hits=2))).admitted
    assert not (await harness.hit(replace(bucketed, hits=101))).admitted
    assert (await harness.hit(exact)).admitted
    assert (await harness.hit(replace(bucketed, hits=100))).admitted
    assert (await harness.hit(shadow)).states[0].over


async def test_a_forced_budget_goes_into_debt_and_forced_slots_exceed_the_limit(harness):
    b = harness.backend
    assert (await b.acquire([budget(hits=60)], request_id="r1", lease_seconds=60)).admitted
    forced = await b.acquire([budget(hits=60)], request_id="r2", lease_seconds=60, force=True)
    assert forced.admitted
    assert forced.states[0].over
    assert forced.states[0].remaining == 40
    assert forced.states[0].retry_after > 3600
    assert not (await b.acquire([budget(hits=0)], request_id="p", lease_seconds=60)).admitted  # level -20
    await b.settle([settlement(actual=0)], request_id="r2")  # the forced reservation is held too
    back = await b.acquire([budget(hits=0)], request_id="p", lease_seconds=60)
    assert back.states[0].remaining == 40

    slot = CounterRequest(counter_key("t1", "C1"), 1, 0.0, kind=SLOTS)
    release = Settlement(slot.key, SLOTS, 1, 0.0)
    assert (await b.acquire([slot], request_id="s1", lease_seconds=60)).admitted
    forced_slot = await b.acquire([slot], request_id="s2", lease_seconds=60, force=True)
    assert forced_slot.admitted
    assert forced_slot.states[0].over
    await b.settle([release], request_id="s1")
    assert not (await b.acquire([slot], request_id="s3", lease_seconds=60)).admitted  # s2 holds it
    await b.settle([release], request_id="s2")
    assert (await b.acquire([slot], request_id="s3", lease_seconds=60)).admitted


# --- batches ------------------------------------------------------------------------------------


async def test_a_batch_runs_its_calls_in_order(harness):
    b = harness.backend
    two = req("L1", limit=2)
    calls = [
        AcquireCall([two]),
        AcquireCall([]),
        AcquireCall([two, budget(hits=30)], request_id="r1"),
        AcquireCall([two]),
        AcquireCall([two], force=True),
        AcquireCall([req("L2", limit=1)]),
    ]
    results = await b.acquire_many(calls, lease_seconds=60)
    assert all(isinstance(r, Acquisition) for r in results)
    assert [r.admitted for r in results] == [True, True, True, False, True, True]
    assert results[1].states == ()
    assert [s.remaining for s in results[2].states] == [0, 70]
    assert results[4].states[0].over
    assert not (await harness.hit(two)).admitted  # three hits recorded: two admitted, one forced

    assert (await b.acquire([budget(hits=30)], request_id="r2", lease_seconds=60)).admitted
    settled = await b.settle_many(
        [
            SettleCall([settlement(actual=10)], "r1"),
            SettleCall([settlement(actual=10)], "r1"),  # a repeat in the same batch: no-op
            SettleCall([], "nothing"),
            SettleCall([settlement(actual=0)], "r2"),
        ],
        lease_seconds=60,
    )
    assert settled is None
    probe = await b.acquire([budget(hits=0)], request_id="p", lease_seconds=60)
    assert probe.states[0].remaining == 90
    assert await b.acquire_many([], lease_seconds=60) == []
    assert await b.settle_many([], lease_seconds=60) is None


# --- Redis only: healing, per-call errors, the old log layout ---------------------------------


@pytest.fixture
async def redis_parts():
    """A backend whose connections can be told apart (by client name), an admin client, the prefix."""
    name = f"tessera-test-{uuid.uuid4().hex[:12]}"
    prefix = f"tessera:test:{uuid.uuid4().hex}:rl:"
    backend = RedisCounterBackend(f"{REDIS_URL}?client_name={name}", prefix=prefix)
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield backend, admin, prefix, name
    finally:
        await backend.close()
        keys = [k async for k in admin.scan_iter(match=f"{prefix}*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


@pytest.mark.redis
async def test_redis_heals_at_once_after_a_restart(redis_parts):
    backend, admin, _, name = redis_parts
    first = await asyncio.gather(*(backend.acquire([req(limit=10)]) for _ in range(3)))  # 3 pooled
    assert sorted(r.states[0].remaining for r in first) == [7, 8, 9]

    async def restart() -> int:
        """What a restart does to this backend: its connections close, Lua scripts are gone."""
        ids = [c["id"] for c in await admin.client_list() if c["name"] == name]
        for client_id in ids:
            await admin.client_kill_filter(_id=client_id)
        await admin.script_flush()
        return len(ids)

    assert await restart() == 3
    after = await backend.acquire([req(limit=10)])  # no StorageError: a fresh connection, reloaded
    assert after.states[0].remaining == 6  # counted exactly once
    await restart()
    batch = await backend.acquire_many([AcquireCall([req(limit=10)])] * 3, lease_seconds=60)
    assert [r.states[0].remaining for r in batch if isinstance(r, Acquisition)] == [5, 4, 3]
    await backend.acquire([budget(hits=10)], request_id="r1", lease_seconds=60)
    await restart()
    assert await backend.settle_many([SettleCall([settlement(actual=1)], "r1")], lease_seconds=60) is None
    probe = await backend.acquire([budget(hits=0)], request_id="p", lease_seconds=60)
    assert probe.states[0].remaining == 99


@pytest.mark.redis
async def test_a_script_error_fails_only_its_call(redis_parts):
    backend, admin, prefix, _ = redis_parts
    await admin.set(prefix + counter_key("t1", "bad"), "not a counter")
    results = await backend.acquire_many(
        [AcquireCall([req("L1")]), AcquireCall([req("bad")]), AcquireCall([req("L1")])], lease_seconds=60
    )
    assert [r.states[0].remaining for r in results if isinstance(r, Acquisition)] == [2, 1]
    assert isinstance(results[1], StorageError)
    assert not results[1].transient
    with pytest.raises(StorageError):
        await backend.acquire([req("bad")])
    error = await backend.settle_many([SettleCall([settlement(key="bad", actual=1)], "r1")], lease_seconds=60)
    assert isinstance(error, StorageError)


@pytest.mark.redis
async def test_a_log_from_before_the_bucketed_layout_keeps_its_count(redis_parts):
    backend, admin, prefix, _ = redis_parts
    seconds, micros = await admin.time()
    now = seconds * 1_000_000 + micros
    old = prefix + counter_key("t1", "L1")
    await admin.zadd(old, {f"n:{i}": now - i * 1000 for i in range(5)})  # 5 hits in the last 5 ms
    await admin.zadd(old, {"gone": now - 2_000_000})  # out of the window
    result = await backend.acquire([req(limit=6)])
    assert result.admitted
    assert result.states[0].remaining == 0
    assert not (await backend.acquire([req(limit=6)])).admitted
    assert await admin.type(old) == b"hash"
