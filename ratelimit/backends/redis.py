"""Shared counters in Redis: one Lua script (one round trip) per ``acquire`` or ``settle``."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ratelimit.backends.base import Acquisition, CounterRequest, CounterState, Settlement
from tessera.errors import StorageError

DEFAULT_PREFIX = "tessera:rl:"

# Redis server clock (µs) for everything, so replicas agree. Two keys per counter:
#   LOG:    KEYS[a] sorted set of admission times;            KEYS[a+1] unused
#   BUDGET: KEYS[a] hash {level, t, period, r:<rid> = amount};  KEYS[a+1] sorted set of lease
#           expiries: member <rid> (a reservation) or d:<rid> (settled: a repeat is a no-op)
#   SLOTS:  KEYS[a] sorted set of request ids scored by lease expiry; KEYS[a+1] unused
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local LIMITS = {} -- state key -> the limit this call saw (saved with the level)
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
  for _, m in ipairs(expired) do
    if string.sub(m, 1, 2) == 'd:' then
      redis.call('HDEL', st, m)
    else
      local v = redis.call('HGET', st, 'r:' .. m)
      if v then lv = math.min(limit, lv + tonumber(v)) end
      redis.call('HDEL', st, 'r:' .. m)
    end
    redis.call('ZREM', idx, m)
  end
  return lv, lp
end
local function budget_save(st, idx, lv, lp, ttl_us)
  redis.call('HSET', st, 'level', tostring(lv), 't', now, 'period', lp, 'limit', LIMITS[st])
  local ms = math.ceil(ttl_us / 1000) + 1000
  redis.call('PEXPIRE', st, ms)
  redis.call('PEXPIRE', idx, ms)
end
"""

# ARGV[1]: a nonce unique to this call; ARGV[2]: request id; ARGV[3]: lease (µs); then per
# counter 8 values: kind, limit, window_us, enforced (1|0), hits, reserve (1|0), period, period_end_us.
# Returns {admitted, then per counter: over (1|0), remaining, retry_us}.
_ACQUIRE = (
    _COMMON
    + """
local rid, lease = ARGV[2], tonumber(ARGV[3])
local n = #KEYS / 2
local value, over, periods = {}, {}, {}
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
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now - window)
    value[i] = redis.call('ZCARD', KEYS[k])
    over[i] = value[i] + hits > limit
  end
  if over[i] and ARGV[a + 3] == '1' then admitted = 0 end
end
local out = {admitted}
for i = 1, n do
  local a, k = 4 + (i - 1) * 8, 2 * i - 1
  local kind, limit = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local window, hits = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 4])
  local remaining, retry = 0, 0
  if kind == 2 then
    local lv = value[i]
    if over[i] then
      if window > 0 then
        if hits > limit then retry = window else retry = (hits - lv) * window / limit end
      else
        retry = math.max(1000000, tonumber(ARGV[a + 7]) - now)
      end
    elseif admitted == 1 then
      lv = lv - hits
      if ARGV[a + 5] == '1' and rid ~= '' then
        redis.call('HSET', KEYS[k], 'r:' .. rid, hits)
        redis.call('ZADD', KEYS[k + 1], now + lease, rid)
      end
    end
    local ttl = window + lease
    if window == 0 then ttl = math.max(tonumber(ARGV[a + 7]) - now, 0) + lease end
    budget_save(KEYS[k], KEYS[k + 1], lv, periods[i], ttl)
    remaining = math.floor(lv)
  elseif kind == 3 then
    remaining = limit - value[i]
    if over[i] then
      retry = 1000000
    elseif admitted == 1 then
      redis.call('ZADD', KEYS[k], now + lease, rid)
      redis.call('PEXPIRE', KEYS[k], math.ceil(lease / 1000) + 1000)
      remaining = remaining - 1
    end
  else
    local count = value[i]
    remaining = limit - count
    if over[i] then
      local index = count + hits - limit - 1
      if index >= count then
        retry = window
      else
        local entry = redis.call('ZRANGE', KEYS[k], index, index, 'WITHSCORES')
        retry = tonumber(entry[2]) + window - now
      end
    elseif admitted == 1 then
      for j = 1, hits do
        redis.call('ZADD', KEYS[k], now, ARGV[1] .. ':' .. i .. ':' .. j)
      end
      redis.call('PEXPIRE', KEYS[k], math.ceil(window / 1000) + 1)
      remaining = remaining - hits
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
# period, period_end_us, actual (-1: keep the reservation).
_SETTLE = (
    _COMMON
    + """
local rid, lease = ARGV[1], tonumber(ARGV[2])
for i = 1, #KEYS / 2 do
  local a, k = 3 + (i - 1) * 6, 2 * i - 1
  local kind, limit, window = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if kind == 3 then
    redis.call('ZREM', KEYS[k], rid)
  elseif redis.call('HEXISTS', KEYS[k], 'd:' .. rid) == 0 then
    LIMITS[KEYS[k]] = limit
    local lv, lp = budget_level(KEYS[k], KEYS[k + 1], limit, window, tonumber(ARGV[a + 3]))
    local v = redis.call('HGET', KEYS[k], 'r:' .. rid)
    local reserved = 0
    if v then reserved = tonumber(v) end
    local actual = tonumber(ARGV[a + 5])
    if actual < 0 then actual = reserved end
    lv = math.min(limit, lv + reserved - actual)
    redis.call('HDEL', KEYS[k], 'r:' .. rid)
    redis.call('ZREM', KEYS[k + 1], rid)
    redis.call('HSET', KEYS[k], 'd:' .. rid, 1)
    redis.call('ZADD', KEYS[k + 1], now + lease, 'd:' .. rid)
    local ttl = window + 2 * lease -- the same rule as acquire: a month budget lives to its end
    if window == 0 then ttl = math.max(tonumber(ARGV[a + 4]) - now, 0) + 2 * lease end
    budget_save(KEYS[k], KEYS[k + 1], lv, lp, ttl)
  end
end
return 1
"""
)


class RedisCounterBackend:
    """Counters in Redis (``redis://``, ``rediss://``, ``unix://``).

    All keys of one call must hash to one Cluster slot: they do, being tagged by one tenant.
    No client retries: a failed call is reported at once and the caller applies the
    limits' fail mode, rather than stalling Envoy's request behind backoff.
    """

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, timeout_seconds: float = 0.25) -> None:
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
        )
        self._acquire = self._client.register_script(_ACQUIRE)
        self._settle = self._client.register_script(_SETTLE)
        self._prefix = prefix
        self._nonce = secrets.token_hex(6)
        self._seq = itertools.count()

    def _keys(self, key: str) -> list[str]:
        base = self._prefix + key
        return [base, base + ":idx"]  # same hash tag: one Cluster slot

    async def acquire(
        self, counters: Sequence[CounterRequest], *, request_id: str = "", lease_seconds: float = 0.0
    ) -> Acquisition:
        if not counters:
            return Acquisition(admitted=True, states=())
        keys: list[str] = []
        args: list[str | int] = [f"{self._nonce}{next(self._seq)}", request_id, _us(lease_seconds)]
        for c in counters:
            keys += self._keys(c.key)
            args += (
                c.kind, c.limit, _us(c.window_seconds), 1 if c.enforced else 0, c.hits,
                1 if c.reserve else 0, c.period, _us(c.period_end),
            )  # fmt: skip
        values = [int(v) for v in await self._call(self._acquire, keys, args)]
        states = tuple(
            CounterState(over=values[i] == 1, remaining=values[i + 1], retry_after=values[i + 2] / 1_000_000)
            for i in range(1, len(values), 3)
        )
        return Acquisition(admitted=values[0] == 1, states=states)

    async def settle(
        self, settlements: Sequence[Settlement], *, request_id: str, lease_seconds: float = 900.0
    ) -> None:
        if not settlements:
            return
        keys: list[str] = []
        args: list[str | int] = [request_id, _us(lease_seconds)]
        for s in settlements:
            keys += self._keys(s.key)
            args += (
                s.kind, s.limit, _us(s.window_seconds), s.period, _us(s.period_end),
                -1 if s.actual is None else s.actual,
            )  # fmt: skip
        await self._call(self._settle, keys, args)

    @staticmethod
    async def _call(script: Any, keys: list[str], args: list[str | int]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StorageError(f"redis unavailable: {exc}", transient=True) from exc
        except RedisError as exc:
            raise StorageError(f"redis error: {exc}", transient=False) from exc

    async def close(self) -> None:
        await self._client.aclose()


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)
