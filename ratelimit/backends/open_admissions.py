"""Open admissions: the usage backstop's store (``tessera.admission.v1``, ``ClaimOverdue``).

Every admitted request whose Envoy node is known is ``add``-ed with the time it falls due
(admitted + ``backstop_after_seconds``). The meter ``close``-s it once its ledger row is
committed (ext_authz, once it knows the request never ran). ``claim_overdue`` hands out those
past due and moves them ``hold_seconds`` on: a claimant that dies before closing them loses
nothing, another claims them then. Billing is idempotent by (node, request id) in the ledger,
so a record claimed twice, or closed after it was billed, is billed once.

Same store as the counters (``memory://`` in-process, or Redis by the same URL): Envoy's crash
or its log volume's loss does not touch it. One sorted set (due time) and one hash (the
records) under one hash tag: one Cluster slot, and a claim is one atomic script.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any, Final, Protocol

from prometheus_client import Counter
from redis.exceptions import NoScriptError, RedisError

from ratelimit.backends.redis_url import close_client, redis_client
from tessera.errors import StorageError

DEFAULT_PREFIX: Final = "tessera:"
MAX_CLAIM: Final = 1000
MAX_OPEN: Final = 1_000_000  # in-process records kept at most (~500 MB)
DROPPED = Counter(
    "tessera_ratelimit_open_admissions_dropped_total",
    "Open admissions dropped unbilled by the in-process store's bound (no meter closing them?)",
)


@dataclass(frozen=True, slots=True)
class OpenAdmission:
    request_id: str
    node: str
    tenant_id: str
    key_id: str
    model: str
    body_bytes: int
    max_completion_tokens: int
    admitted_at: float  # unix seconds

    def encode(self) -> str:
        return json.dumps(astuple(self)[1:], separators=(",", ":"))

    @classmethod
    def decode(cls, request_id: str, raw: str | bytes) -> OpenAdmission:
        node, tenant, key, model, body, tokens, at = json.loads(raw)
        return cls(request_id, node, tenant, key, model, int(body), int(tokens), float(at))


class OpenAdmissions(Protocol):
    async def add(self, records: Sequence[OpenAdmission], due: float) -> None:
        """Keep ``records`` open until ``due`` (unix seconds). Raises StorageError."""

    async def close(self, request_ids: Sequence[str]) -> None:
        """End these requests' open admissions (unknown ids: nothing). Raises StorageError."""

    async def claim_overdue(self, now: float, hold_seconds: float, limit: int) -> list[OpenAdmission]:
        """Up to ``limit`` records due by ``now``, oldest first, each due again in
        ``hold_seconds`` (claimed by no one else before then). Raises StorageError."""

    async def aclose(self) -> None:
        """Release connections."""


class MemoryOpenAdmissions:
    """One process (``memory://``): the records by request id, and a heap of (due, request id)
    whose entries a later ``add``, a claim or a close made stale (skipped when popped).

    Bounded: beyond ``max_open`` records the oldest admitted is dropped and counted (a
    deployment with no meter to close them must not grow without end)."""

    def __init__(self, max_open: int = MAX_OPEN) -> None:
        self._open: OrderedDict[str, tuple[float, OpenAdmission]] = OrderedDict()  # admission order
        self._due: list[tuple[float, str]] = []
        self._max = max_open

    def __len__(self) -> int:
        return len(self._open)

    async def add(self, records: Sequence[OpenAdmission], due: float) -> None:
        for r in records:
            self._open.pop(r.request_id, None)
            self._open[r.request_id] = (due, r)
            heapq.heappush(self._due, (due, r.request_id))
        while len(self._open) > self._max:
            self._open.popitem(last=False)
            DROPPED.inc()
        if len(self._due) > 2 * len(self._open) + 1024:  # mostly stale: rebuild
            self._due = [(due, rid) for rid, (due, _) in self._open.items()]
            heapq.heapify(self._due)

    async def close(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self._open.pop(rid, None)

    async def claim_overdue(self, now: float, hold_seconds: float, limit: int) -> list[OpenAdmission]:
        claimed: list[OpenAdmission] = []
        heap = self._due
        while heap and heap[0][0] <= now and len(claimed) < limit:
            due, rid = heapq.heappop(heap)
            current = self._open.get(rid)
            if current is None or current[0] != due:
                continue  # closed, or added or claimed again since: a stale entry
            claimed.append(current[1])
        for r in claimed:
            self._open[r.request_id] = (now + hold_seconds, r)
            heapq.heappush(heap, (now + hold_seconds, r.request_id))
        return claimed

    async def aclose(self) -> None:
        self._open.clear()


_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local v = redis.call('HGET', KEYS[2], id)
  if v then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    out[#out + 1] = id
    out[#out + 1] = v
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""
_CLAIM_SHA: Final = hashlib.sha1(_CLAIM.encode(), usedforsecurity=False).hexdigest()


class RedisOpenAdmissions:
    """``<prefix>{open-admissions}:due`` (sorted set: request id by due time, milliseconds) and
    ``…:records`` (hash: request id -> record), one hash tag: one Cluster slot."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, timeout_seconds: float = 1.0) -> None:
        self._client = redis_client(url, timeout_seconds)
        base = prefix + "{open-admissions}"
        self._due, self._records = base + ":due", base + ":records"

    async def add(self, records: Sequence[OpenAdmission], due: float) -> None:
        if not records:
            return
        score = round(due * 1000)
        await self._run(  # a due time without its record is dropped by the next claim
            ("ZADD", self._due, *(x for r in records for x in (score, r.request_id))),
            ("HSET", self._records, *(x for r in records for x in (r.request_id, r.encode()))),
        )

    async def close(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            await self._run(("HDEL", self._records, *request_ids), ("ZREM", self._due, *request_ids))

    async def claim_overdue(self, now: float, hold_seconds: float, limit: int) -> list[OpenAdmission]:
        args = (round(now * 1000), round((now + hold_seconds) * 1000), limit)
        try:
            try:
                reply = await self._client.evalsha(_CLAIM_SHA, 2, self._due, self._records, *args)
            except NoScriptError:
                reply = await self._client.eval(_CLAIM, 2, self._due, self._records, *args)
        except (RedisError, OSError) as exc:
            raise StorageError(f"redis unavailable: {exc}", transient=True) from exc
        return [OpenAdmission.decode(_text(reply[i]), reply[i + 1]) for i in range(0, len(reply), 2)]

    async def _run(self, *commands: tuple[Any, ...]) -> None:
        """One round trip (one slot), in order."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StorageError(f"redis unavailable: {exc}", transient=True) from exc

    async def aclose(self) -> None:
        await close_client(self._client)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def make_open_admissions(url: str) -> OpenAdmissions:
    """The store beside the counters at ``url`` (``memory://`` or a Redis URL)."""
    if url.partition("://")[0].lower() == "memory":
        return MemoryOpenAdmissions()
    return RedisOpenAdmissions(url)
