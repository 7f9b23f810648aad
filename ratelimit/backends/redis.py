"""Shared counters in Redis: one Lua script (one round trip) per ``acquire``."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ratelimit.backends.base import Acquisition, CounterRequest, CounterState
from tessera.errors import StorageError

DEFAULT_PREFIX = "tessera:rl:"

# One sorted set of admission times (µs, Redis server clock, so replicas agree) per counter.
# KEYS[i]: counter i.  ARGV[1]: a nonce unique to this call (keeps members unique);
# then per counter: limit, window_us, enforced (1|0), hits.
# Returns {admitted, then per counter: over (1|0), remaining, retry_us}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local counts, over = {}, {}
local admitted = 1
for i = 1, n do
  local a = 2 + (i - 1) * 4
  local limit, window, hits = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 3])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local count = redis.call('ZCARD', KEYS[i])
  counts[i] = count
  over[i] = count + hits > limit
  if over[i] and ARGV[a + 2] == '1' then admitted = 0 end
end
local out = {admitted}
for i = 1, n do
  local a = 2 + (i - 1) * 4
  local limit, window, hits = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 3])
  local count = counts[i]
  local remaining, retry = limit - count, 0
  if over[i] then
    if remaining < 0 then remaining = 0 end
    local index = count + hits - limit - 1
    if index >= count then
      retry = window
    else
      local entry = redis.call('ZRANGE', KEYS[i], index, index, 'WITHSCORES')
      retry = tonumber(entry[2]) + window - now
    end
    out[#out + 1] = 1
  else
    if admitted == 1 then
      for j = 1, hits do
        redis.call('ZADD', KEYS[i], now, ARGV[1] .. ':' .. i .. ':' .. j)
      end
      redis.call('PEXPIRE', KEYS[i], math.ceil(window / 1000) + 1)
      remaining = remaining - hits
    end
    out[#out + 1] = 0
  end
  out[#out + 1] = remaining
  out[#out + 1] = retry
end
return out
"""


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
        self._script = self._client.register_script(_ACQUIRE)
        self._prefix = prefix
        self._nonce = secrets.token_hex(6)
        self._seq = itertools.count()

    async def acquire(self, counters: Sequence[CounterRequest]) -> Acquisition:
        if not counters:
            return Acquisition(admitted=True, states=())
        keys = [self._prefix + c.key for c in counters]
        args: list[str | int] = [f"{self._nonce}{next(self._seq)}"]
        for c in counters:
            args += (c.limit, round(c.window_seconds * 1_000_000), 1 if c.enforced else 0, c.hits)
        try:
            reply = await self._script(keys=keys, args=args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StorageError(f"redis unavailable: {exc}", transient=True) from exc
        except RedisError as exc:
            raise StorageError(f"redis error: {exc}", transient=False) from exc
        values = [int(v) for v in reply]
        states = tuple(
            CounterState(
                over=values[i] == 1,
                remaining=values[i + 1],
                retry_after=values[i + 2] / 1_000_000,
            )
            for i in range(1, len(values), 3)
        )
        return Acquisition(admitted=values[0] == 1, states=states)

    async def close(self) -> None:
        await self._client.aclose()
