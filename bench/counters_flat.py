"""Cost per request of the counter backends, block after block: it must stay flat.

``python -m bench.counters_flat [--n N] [--url memory://|redis://HOST:PORT/DB]`` (not part of
``make bench``). One tenant, driven the way the limiter drives a backend: per request one
``acquire`` (a request limit of 1e9 a minute, bucketed; a token budget of 1e9 a minute that
reserves the estimate; a concurrency limit unless ``--concurrency 0``) with the request id and
a 900 s lease, then one ``settle`` with the real amount. Redis calls go in batches
(``acquire_many`` then ``settle_many``, ``--batch`` requests each), as the servicer sends them.
Prints wall and CPU (this process) µs per acquire+settle for consecutive blocks, then what the
counters hold at the end: without per-request state both stay flat however many requests ran.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis

from ratelimit.backends import (
    BUDGET,
    SLOTS,
    AcquireCall,
    CounterBackend,
    CounterRequest,
    MemoryCounterBackend,
    RedisCounterBackend,
    SettleCall,
    Settlement,
    counter_key,
    is_memory_url,
)
from tessera.clock import SYSTEM_CLOCK
from tessera.errors import StorageError

LEASE = 900.0
LIMIT = 1_000_000_000
WINDOW = 60.0
ESTIMATE, ACTUAL = 1000, 700  # tokens reserved, then used


def counters(concurrency: int) -> tuple[list[CounterRequest], list[Settlement]]:
    requests = CounterRequest(counter_key("bench", "requests"), LIMIT, WINDOW)
    tokens = CounterRequest(
        counter_key("bench", "tokens"), LIMIT, WINDOW, hits=ESTIMATE, kind=BUDGET, reserve=True
    )
    acquire = [requests, tokens]
    settle = [Settlement(tokens.key, BUDGET, LIMIT, WINDOW, actual=ACTUAL)]
    if concurrency:
        slots = CounterRequest(counter_key("bench", "concurrency"), concurrency, 0.0, kind=SLOTS)
        acquire.append(slots)
        settle.append(Settlement(slots.key, SLOTS, concurrency, 0.0))
    return acquire, settle


async def run_block(
    backend: CounterBackend,
    first: int,
    count: int,
    *,
    batch: int,
    acquire: Sequence[CounterRequest],
    settle: Sequence[Settlement],
) -> None:
    if batch <= 1:
        for i in range(first, first + count):
            rid = f"r{i}"
            one = await backend.acquire(acquire, request_id=rid, lease_seconds=LEASE)
            if not one.admitted:
                raise SystemExit(f"request {i} refused: {one}")
            await backend.settle(settle, request_id=rid, lease_seconds=LEASE)
        return
    for start in range(first, first + count, batch):
        rids = [f"r{i}" for i in range(start, min(start + batch, first + count))]
        results = await backend.acquire_many([AcquireCall(acquire, rid) for rid in rids], lease_seconds=LEASE)
        for result in results:
            if isinstance(result, StorageError) or not result.admitted:
                raise SystemExit(f"a request of block {first} failed: {result}")
        error = await backend.settle_many([SettleCall(settle, rid) for rid in rids], lease_seconds=LEASE)
        if error is not None:
            raise SystemExit(f"settle failed: {error}")


async def sizes(backend: CounterBackend, keys: Sequence[str], url: str, prefix: str) -> list[str]:
    if isinstance(backend, MemoryCounterBackend):
        return [f"{key}: {backend.entries(key)} entries" for key in keys]
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        out = []
        for key in keys:
            base = prefix + key
            if await client.type(base) == "hash":
                fields = await client.hlen(base)
                idx = await client.zcard(base + ":idx")
                out.append(f"{key}: HLEN {fields}, ZCARD :idx {idx}")
            else:
                out.append(f"{key}: ZCARD {await client.zcard(base)}")
        created = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if created:
            await client.delete(*created)
        return out
    finally:
        await client.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="memory://")
    parser.add_argument("--n", type=int, help="requests (default 1,000,000 on memory, 50,000 on redis)")
    parser.add_argument("--blocks", type=int, default=10, help="blocks to time separately")
    parser.add_argument("--batch", type=int, help="requests per acquire_many (default 1 memory, 16 redis)")
    parser.add_argument("--concurrency", type=int, default=1_000_000, help="slots limit; 0: none")
    args = parser.parse_args()
    memory = is_memory_url(args.url)
    n = args.n or (1_000_000 if memory else 50_000)
    batch = args.batch or (1 if memory else 16)
    prefix = f"tessera:bench:{uuid.uuid4().hex}:"
    backend: CounterBackend = (
        MemoryCounterBackend(SYSTEM_CLOCK) if memory else RedisCounterBackend(args.url, prefix=prefix)
    )
    acquire, settle = counters(args.concurrency)
    block = max(1, n // args.blocks)
    print(f"{args.url}: {n:,} requests, {len(acquire)} counters each, batches of {batch}")
    print(f"{'requests':>21}  {'wall µs/req':>11}  {'cpu µs/req':>10}")
    done = 0
    try:
        while done < n:
            count = min(block, n - done)
            wall, cpu = time.perf_counter(), time.process_time()
            await run_block(backend, done, count, batch=batch, acquire=acquire, settle=settle)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{done:>10,}-{done + count:<10,} {wall / count * 1e6:>11.1f}  {cpu / count * 1e6:>10.1f}")
            done += count
        print("held at the end:")
        for line in await sizes(backend, [c.key for c in acquire], args.url, prefix):
            print(f"  {line}")
    finally:
        await backend.close()


if __name__ == "__main__":
    asyncio.run(main())
