"""One contract suite over every OpenAdmissions store (the usage backstop's): in-process, the real
Redis, a real Redis Cluster and a Sentinel-found master. Times are passed in, so nothing sleeps."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from ratelimit.backends.open_admissions import (
    MemoryOpenAdmissions,
    OpenAdmission,
    OpenAdmissions,
    RedisOpenAdmissions,
    make_open_admissions,
)
from ratelimit.backends.redis_url import close_client, redis_client
from tessera.errors import StorageError

REDIS_URL = "redis://127.0.0.1:6379/0"
T0 = 1_800_000_000.0


def record(n: int, *, node: str = "gw-1", admitted_at: float = T0) -> OpenAdmission:
    return OpenAdmission(f"req-{n}", node, "ten_a", "key_a", "demo", 400 + n, 64, admitted_at)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis_cluster", marks=pytest.mark.redis),
        pytest.param("redis_sentinel", marks=pytest.mark.redis),
    ]
)
async def store(request):
    if request.param == "memory":
        memory = MemoryOpenAdmissions()
        yield memory
        await memory.aclose()
        return
    prefix = f"tessera:test:{uuid.uuid4().hex}:"
    url = REDIS_URL if request.param == "redis" else request.getfixturevalue(request.param).url
    redis_store = RedisOpenAdmissions(url, prefix=prefix)
    yield redis_store
    await redis_store.aclose()
    client = redis_client(url, 5.0)
    try:
        for key in [k async for k in client.scan_iter(match=f"{prefix}*")]:
            await client.delete(key)
    finally:
        await close_client(client)


async def test_only_records_past_due_are_claimed_whole_and_oldest_first(store: OpenAdmissions):
    await store.add([record(1), record(2)], due=T0 + 10)
    await store.add([record(3, node="gw-2", admitted_at=T0 + 5)], due=T0 + 15)
    assert await store.claim_overdue(T0 + 9.999, 60, 100) == []
    assert await store.claim_overdue(T0 + 10, 60, 100) == [record(1), record(2)]  # every field back
    assert await store.claim_overdue(T0 + 20, 60, 100) == [record(3, node="gw-2", admitted_at=T0 + 5)]


async def test_closed_records_are_never_claimed_and_closing_unknown_ids_changes_nothing(store):
    await store.add([record(n) for n in range(5)], due=T0)
    await store.close(["req-1", "req-3", "never-admitted"])
    await store.close([])
    claimed = await store.claim_overdue(T0 + 1, 60, 100)
    assert [r.request_id for r in claimed] == ["req-0", "req-2", "req-4"]


async def test_a_claim_holds_records_for_its_hold_then_they_can_be_claimed_again(store):
    """A meter that claims and dies before closing loses nothing: after the hold, another gets them."""
    await store.add([record(1)], due=T0)
    assert len(await store.claim_overdue(T0 + 1, 30, 100)) == 1
    assert await store.claim_overdue(T0 + 30, 30, 100) == []  # still held by the first claim
    assert [r.request_id for r in await store.claim_overdue(T0 + 31, 30, 100)] == ["req-1"]
    await store.close(["req-1"])  # billed and closed: gone for good
    assert await store.claim_overdue(T0 + 1000, 30, 100) == []


async def test_a_claim_takes_at_most_its_limit_and_the_rest_stay(store):
    await store.add([record(n) for n in range(7)], due=T0)
    first = await store.claim_overdue(T0 + 1, 60, 3)
    second = await store.claim_overdue(T0 + 1, 60, 10)
    assert len(first) == 3
    assert len(second) == 4
    assert {r.request_id for r in first} | {r.request_id for r in second} == {f"req-{n}" for n in range(7)}


async def test_concurrent_claimants_never_get_the_same_record(store):
    await store.add([record(n) for n in range(60)], due=T0)
    claims = await asyncio.gather(*(store.claim_overdue(T0 + 1, 60, 7) for _ in range(12)))
    ids = [r.request_id for claim in claims for r in claim]
    assert sorted(ids) == sorted(f"req-{n}" for n in range(60))  # each once, none lost


async def test_a_record_added_again_keeps_one_entry_with_the_later_due_time(store):
    """A forced admission sent again after a reconnect is kept open once."""
    await store.add([record(1)], due=T0)
    await store.add([record(1)], due=T0 + 50)
    assert await store.claim_overdue(T0 + 10, 60, 100) == []
    assert len(await store.claim_overdue(T0 + 50, 60, 100)) == 1


async def test_names_odd_enough_to_break_an_encoding_come_back_unchanged(store):
    odd = OpenAdmission('r"\t\n,{}', "gw/ü", "ten\x00", "k ey", 'mo"del', 0, 0, T0)
    await store.add([odd], due=T0)
    assert await store.claim_overdue(T0, 60, 100) == [odd]


async def test_the_store_follows_the_counters_url():
    assert isinstance(make_open_admissions("memory://"), MemoryOpenAdmissions)
    redis_store = make_open_admissions("redis://127.0.0.1:6379/0")
    assert isinstance(redis_store, RedisOpenAdmissions)
    await redis_store.aclose()


@pytest.mark.redis
async def test_an_unreachable_redis_is_a_storage_error_not_a_crash():
    dead = RedisOpenAdmissions("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(StorageError):
            await dead.add([record(1)], due=T0)
        with pytest.raises(StorageError):
            await dead.claim_overdue(T0, 60, 10)
    finally:
        await dead.aclose()


async def test_a_claim_held_past_its_hold_is_claimable_before_records_due_later(store):
    """A meter died holding a claim: its records come back after the hold, not after the
    records admitted later fall due."""
    await store.add([record(1)], due=T0)
    await store.add([record(2)], due=T0 + 100)
    assert [r.request_id for r in await store.claim_overdue(T0 + 1, 10, 100)] == ["req-1"]
    assert [r.request_id for r in await store.claim_overdue(T0 + 12, 10, 100)] == ["req-1"]


async def test_the_in_process_store_is_bounded_and_drops_the_oldest():
    bounded = MemoryOpenAdmissions(max_open=3)
    await bounded.add([record(n) for n in range(5)], due=T0)
    assert len(bounded) == 3
    assert [r.request_id for r in await bounded.claim_overdue(T0, 60, 100)] == ["req-2", "req-3", "req-4"]
