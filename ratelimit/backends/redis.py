"""Shared counters in Redis: one Lua script per ``acquire`` or ``settle``, one pipeline per batch."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeAlias

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ratelimit.backends.base import (
    EXACT_LOG_MAX,
    LOG_BUCKETS,
    AcquireCall,
    Acquisition,
    CounterRequest,
    CounterState,
    SettleCall,
    Settlement,
)
from ratelimit.backends.redis_url import close_client, redis_client
from tessera.errors import StorageError

DEFAULT_PREFIX = "tessera:rl:"

# Redis server clock (µs) for everything, so replicas agree. Two keys per counter:
#   LOG:    KEYS[a] hash {time = hits}: exact call times, or bucket ends above EXACT_LOG_MAX
#           (before this layout it was a sorted set of call times: converted on first use)
#   BUDGET: KEYS[a] hash {level, t, period, limit, r:<rid> = amount};
#           KEYS[a+1] sorted set of the reservations' lease expiries (member <rid>)
#   SLOTS:  KEYS[a] sorted set of request ids scored by lease expiry
# Every entry is removed when it ends (expiry, trim, settle): nothing grows with traffic.
_COMMON = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local EXACT, BUCKETS, KEEP = {EXACT_LOG_MAX}, {LOG_BUCKETS}, {EXACT_LOG_MAX + 1}
local function fmt(x) return string.format('%d', x) end
local LIMITS = {{}} -- state key -> the limit this call saw (saved with the level)
local function budget_level(st, idx, limit, window, period)
  local h = redis.call('HMGET', st, 'level', 't', 'period', 'limit')
  local lv, lt, lp, ll = tonumber(h[1]), tonumber(h[2]), tonumber(h[3]), tonumber(h[4])
  if lv == nil then lv, lt, lp, ll = limit, now, period, limit end
  if ll ~= nil and ll ~= limit then lv = lv + limit - ll end -- a changed limit keeps what was used
  if window > 0 then
    lv = math.min(limit, lv + (now - lt) * limit / window)
  elseif period > lp then -- only forward: replicas' clocks may straddle a month's end
    lv, lp = limit, period
  end
  local expired = redis.call('ZRANGEBYSCORE', idx, '-inf', now, 'LIMIT', 0, 256)
  for _, m in ipairs(expired) do -- ended by its lease: stays charged, as reserved (never free)
    redis.call('HDEL', st, 'r:' .. m)
    redis.call('ZREM', idx, m)
  end
  return lv, lp
end
local function budget_save(st, idx, lv, lp, window, lease, period_end)
  local ttl = window + lease -- a month budget lives to its month's end: an idle tenant keeps its count
  if window == 0 then ttl = math.max(period_end - now, 0) + lease end
  redis.call('HSET', st, 'level', tostring(lv), 't', now, 'period', lp, 'limit', LIMITS[st])
  local ms = math.ceil(ttl / 1000) + 1000
  redis.call('PEXPIRE', st, ms)
  redis.call('PEXPIRE', idx, ms)
end
"""

# ARGV[1]: request id; ARGV[2]: lease (µs); ARGV[3]: force (1|0); then per counter 8 values:
# kind, limit, window_us, enforced (1|0), hits, reserve (1|0), period, period_end_us.
# Returns {admitted, then per counter: over (1|0), remaining, retry_us}.
_ACQUIRE = (
    _COMMON
    + """
local function log_migrate(lk, window) -- a sorted set of call times: count it per bucket, once
  redis.call('ZREMRANGEBYSCORE', lk, '-inf', now - window)
  local w = math.ceil(window / BUCKETS)
  local h, last = {}, math.floor(now / w)
  for j = math.floor((now - window) / w), last do
    local hi = '(' .. fmt((j + 1) * w)
    if j == last then hi = '+inf' end
    local n = redis.call('ZCOUNT', lk, fmt(j * w), hi)
    if n > 0 then h[#h + 1], h[#h + 2] = fmt((j + 1) * w), n end
  end
  redis.call('UNLINK', lk)
  if #h > 0 then
    redis.call('HSET', lk, unpack(h))
    redis.call('PEXPIRE', lk, math.ceil((window + w) / 1000) + 1)
  end
  return h
end
local function log_count(lk, window) -- hits in the window, and their entries {time, hits}
  local h = redis.pcall('HGETALL', lk)
  if h.err then h = log_migrate(lk, window) end
  local count, entries, gone = 0, {}, {}
  for j = 1, #h, 2 do
    local at = tonumber(h[j])
    if at + window <= now then
      gone[#gone + 1] = h[j]
    else
      local n = tonumber(h[j + 1])
      count = count + n
      entries[#entries + 1] = {at, n}
    end
  end
  if #gone > 0 then redis.call('HDEL', lk, unpack(gone)) end
  return count, entries
end
local function log_retry(entries, count, hits, limit, window) -- until enough of the oldest leave
  if hits > limit then return window end
  table.sort(entries, function(x, y) return x[1] < y[1] end)
  local need = count + hits - limit
  for _, e in ipairs(entries) do
    need = need - e[2]
    if need <= 0 then return e[1] + window - now end
  end
  return window
end
local function log_trim(lk) -- keep the newest KEEP hits (only forced hits go over an exact limit)
  local h = redis.call('HGETALL', lk)
  local entries = {}
  for j = 1, #h, 2 do entries[#entries + 1] = {tonumber(h[j]), tonumber(h[j + 1]), h[j]} end
  table.sort(entries, function(x, y) return x[1] > y[1] end)
  local keep = KEEP
  for _, e in ipairs(entries) do
    if keep <= 0 then
      redis.call('HDEL', lk, e[3])
    elseif e[2] > keep then
      redis.call('HSET', lk, e[3], keep)
    end
    keep = keep - e[2]
  end
end
local function log_record(lk, entries, count, hits, limit, window)
  if hits <= 0 then return end
  local at = now
  if limit > EXACT and window > 0 then
    local w = math.ceil(window / BUCKETS)
    at = (math.floor(now / w) + 1) * w -- the bucket's end
  end
  for _, e in ipairs(entries) do
    if e[1] > at then at = e[1] end -- never behind the newest entry, as in memory
  end
  redis.call('HINCRBY', lk, fmt(at), hits)
  if limit <= EXACT and count + hits > KEEP then log_trim(lk) end
  redis.call('PEXPIRE', lk, math.ceil((at + window - now) / 1000) + 1)
end

local rid, lease, force = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local n = #KEYS / 2
local value, over, periods, entries = {}, {}, {}, {}
local admitted = 1
for i = 1, n do
  local a, k = 4 + (i - 1) * 8, 2 * i - 1
  local kind, limit = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local window, hits = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 4])
  if kind == 2 then
    LIMITS[KEYS[k]] = limit
    value[i], periods[i] = budget_level(KEYS[k], KEYS[k + 1], limit, window, tonumber(ARGV[a + 6]))
    over[i] = value[i] < hits
  elseif kind == 3 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
    value[i] = redis.call('ZCARD', KEYS[k])
    over[i] = value[i] + 1 > limit
  else
    value[i], entries[i] = log_count(KEYS[k], window)
    over[i] = value[i] + hits > limit
  end
  if over[i] and ARGV[a + 3] == '1' and not force then admitted = 0 end
end
local out = {admitted}
for i = 1, n do
  local a, k = 4 + (i - 1) * 8, 2 * i - 1
  local kind, limit = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local window, hits = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 4])
  local record = admitted == 1 and (force or not over[i])
  local remaining, retry = 0, 0
  if kind == 2 then
    local lv = value[i]
    remaining = math.floor(lv)
    if over[i] then
      if window > 0 then
        if hits > limit then retry = window else retry = (hits - lv) * window / limit end
      else
        retry = math.max(1000000, tonumber(ARGV[a + 7]) - now)
      end
    end
    if record then
      lv = lv - hits
      if ARGV[a + 5] == '1' and rid ~= '' then
        redis.call('HSET', KEYS[k], 'r:' .. rid, hits)
        redis.call('ZADD', KEYS[k + 1], now + lease, rid)
      end
      if not over[i] then remaining = math.floor(lv) end
    end
    budget_save(KEYS[k], KEYS[k + 1], lv, periods[i], window, lease, tonumber(ARGV[a + 7]))
  elseif kind == 3 then
    remaining = limit - value[i]
    if over[i] then retry = 1000000 end
    if record then
      redis.call('ZADD', KEYS[k], now + lease, rid)
      redis.call('PEXPIRE', KEYS[k], math.ceil(lease / 1000) + 1000)
      if not over[i] then remaining = remaining - 1 end
    end
  else
    remaining = limit - value[i]
    if over[i] then retry = log_retry(entries[i], value[i], hits, limit, window) end
    if record then
      log_record(KEYS[k], entries[i], value[i], hits, limit, window)
      if not over[i] then remaining = remaining - hits end
    end
  end
  if remaining < 0 then remaining = 0 end
  if over[i] then out[#out + 1] = 1 else out[#out + 1] = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(retry)
end
return out
"""
)

# ARGV[1]: request id; ARGV[2]: lease (µs); then per counter 6 values: kind, limit, window_us,
# period, period_end_us, actual (-1: keep the reservation). Only a reservation still held is
# settled: a repeat, or one released by its lease, finds none and changes nothing.
_SETTLE = (
    _COMMON
    + """
local rid, lease = ARGV[1], tonumber(ARGV[2])
for i = 1, #KEYS / 2 do
  local a, k = 3 + (i - 1) * 6, 2 * i - 1
  local kind, limit, window = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if kind == 3 then
    redis.call('ZREM', KEYS[k], rid)
  elseif redis.call('HEXISTS', KEYS[k], 'r:' .. rid) == 1 then
    LIMITS[KEYS[k]] = limit
    local lv, lp = budget_level(KEYS[k], KEYS[k + 1], limit, window, tonumber(ARGV[a + 3]))
    local v = redis.call('HGET', KEYS[k], 'r:' .. rid)
    if v then -- not released by its lease just now
      local actual = tonumber(ARGV[a + 5])
      if actual < 0 then actual = tonumber(v) end
      lv = math.min(limit, lv + tonumber(v) - actual)
      redis.call('HDEL', KEYS[k], 'r:' .. rid)
      redis.call('ZREM', KEYS[k + 1], rid)
    end
    budget_save(KEYS[k], KEYS[k + 1], lv, lp, window, lease, tonumber(ARGV[a + 4]))
  end
end
return 1
"""
)


class _Script(NamedTuple):
    text: str
    sha: str


def _script(text: str) -> _Script:
    return _Script(text, hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest())


_ACQUIRE_SCRIPT = _script(_ACQUIRE)
_SETTLE_SCRIPT = _script(_SETTLE)

_Job: TypeAlias = tuple[list[str], list[str | int]]  # one script call: keys, args


class RedisCounterBackend:
    """Counters in Redis: one server, a Cluster or a Sentinel-found master (``redis_url.py``).

    All keys of one call must hash to one Cluster slot: they do, being tagged by one tenant.
    A batch is one pipeline of EVALSHA calls (one round trip); a script Redis lost (a restart,
    SCRIPT FLUSH) is loaded and only the calls it refused run again, as they never ran.

    A connection error is retried once, at once, on a fresh connection, so a restarted Redis
    is used again by the next call instead of failing once per pooled connection. Timeouts are
    not retried: the script may have run, and a rerun would count the request twice (a
    connection lost after sending is rare, and accepted). Then the call fails at once and the
    caller applies the limits' fail mode, rather than stalling Envoy behind backoff.
    """

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, timeout_seconds: float = 0.25) -> None:
        self._client = redis_client(url, timeout_seconds)
        self._cluster = isinstance(self._client, RedisCluster)
        self._prefix = prefix

    def _keys(self, key: str) -> list[str]:
        base = self._prefix + key
        return [base, base + ":idx"]  # same hash tag: one Cluster slot

    async def acquire(
        self,
        counters: Sequence[CounterRequest],
        *,
        request_id: str = "",
        lease_seconds: float = 0.0,
        force: bool = False,
    ) -> Acquisition:
        (result,) = await self.acquire_many(
            [AcquireCall(counters, request_id, force)], lease_seconds=lease_seconds
        )
        if isinstance(result, StorageError):
            raise result
        return result

    async def acquire_many(
        self, calls: Sequence[AcquireCall], *, lease_seconds: float
    ) -> list[Acquisition | StorageError]:
        results: list[Acquisition | StorageError] = [Acquisition(admitted=True, states=())] * len(calls)
        slots: list[int] = []
        jobs: list[_Job] = []
        lease = _us(lease_seconds)
        for i, call in enumerate(calls):
            if not call.counters:
                continue
            keys: list[str] = []
            args: list[str | int] = [call.request_id, lease, 1 if call.force else 0]
            for c in call.counters:
                keys += self._keys(c.key)
                args += (
                    c.kind, c.limit, _us(c.window_seconds), 1 if c.enforced else 0, c.hits,
                    1 if c.reserve else 0, c.period, _us(c.period_end),
                )  # fmt: skip
            slots.append(i)
            jobs.append((keys, args))
        if not jobs:
            return results
        try:
            replies = await self._run(_ACQUIRE_SCRIPT, jobs)
        except StorageError as exc:
            return [exc] * len(calls)
        for i, reply in zip(slots, replies, strict=True):
            results[i] = reply if isinstance(reply, StorageError) else _acquisition(reply)
        return results

    async def settle(
        self, settlements: Sequence[Settlement], *, request_id: str, lease_seconds: float = 900.0
    ) -> None:
        error = await self.settle_many([SettleCall(settlements, request_id)], lease_seconds=lease_seconds)
        if error is not None:
            raise error

    async def settle_many(self, calls: Sequence[SettleCall], *, lease_seconds: float) -> StorageError | None:
        jobs: list[_Job] = []
        lease = _us(lease_seconds)
        for call in calls:
            if not call.settlements:
                continue
            keys: list[str] = []
            args: list[str | int] = [call.request_id, lease]
            for s in call.settlements:
                keys += self._keys(s.key)
                args += (
                    s.kind, s.limit, _us(s.window_seconds), s.period, _us(s.period_end),
                    -1 if s.actual is None else s.actual,
                )  # fmt: skip
            jobs.append((keys, args))
        if not jobs:
            return None
        try:
            replies = await self._run(_SETTLE_SCRIPT, jobs)
        except StorageError as exc:
            return exc
        return next((r for r in replies if isinstance(r, StorageError)), None)

    async def _run(self, script: _Script, jobs: list[_Job]) -> list[Any]:
        """Each job's reply, or a StorageError for a job the script failed; raises StorageError
        when the batch could not run."""
        try:
            replies = await self._pipeline(script, jobs)
            lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if lost:  # Redis restarted or flushed its scripts: load it, rerun what did not run
                await self._client.script_load(script.text)  # on every master of a Cluster
                again = await self._pipeline(script, [jobs[i] for i in lost])
                for i, reply in zip(lost, again, strict=True):
                    replies[i] = reply
        except (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException) as exc:
            # a Cluster that cannot be reached, or a slot without a master mid-failover, too
            raise StorageError(f"redis unavailable: {exc}", transient=True) from exc
        except RedisError as exc:
            raise StorageError(f"redis error: {exc}", transient=False) from exc
        return [_error(reply) if isinstance(reply, ResponseError) else reply for reply in replies]

    async def _pipeline(self, script: _Script, jobs: list[_Job]) -> list[Any]:
        if len(jobs) == 1:  # a single call: a pipeline would only add client CPU
            return [await self._call(script, jobs[0])]
        if self._cluster:  # no EVALSHA in a Cluster pipeline
            return await self._by_slot(script, jobs)
        pipe = self._client.pipeline(transaction=False)
        for keys, args in jobs:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _by_slot(self, script: _Script, jobs: list[_Job]) -> list[Any]:
        """A Cluster: the calls of one slot in batch order (a counter sees them as a pipeline
        would), the slots at once, each at its master."""
        slots: dict[int, list[int]] = {}
        for i, (keys, _) in enumerate(jobs):
            slots.setdefault(key_slot(keys[0].encode()), []).append(i)
        replies: list[Any] = [None] * len(jobs)

        async def in_order(indices: list[int]) -> None:
            for n, i in enumerate(indices):
                try:
                    replies[i] = await self._call(script, jobs[i])
                except (RedisError, OSError) as exc:  # this slot's master is gone: the rest too
                    for j in indices[n:]:
                        replies[j] = StorageError(f"redis unavailable: {exc}", transient=True)
                    return

        await asyncio.gather(*(in_order(indices) for indices in slots.values()))
        return replies

    async def _call(self, script: _Script, job: _Job) -> Any:
        keys, args = job
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            return exc

    async def close(self) -> None:
        await close_client(self._client)


def _acquisition(reply: Any) -> Acquisition:
    values = [int(v) for v in reply]
    states = tuple(
        CounterState(over=values[i] == 1, remaining=values[i + 1], retry_after=values[i + 2] / 1_000_000)
        for i in range(1, len(values), 3)
    )
    return Acquisition(admitted=values[0] == 1, states=states)


def _error(reply: ResponseError) -> StorageError:
    return StorageError(f"redis error: {reply}", transient=False)


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)
