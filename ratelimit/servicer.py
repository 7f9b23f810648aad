"""Envoy RLS v3 adapter: the only module that sees Envoy proto types.

Descriptor contract (domain ``tessera``): one descriptor per request whose entries are, in
order, ``tenant_id``, ``key_id``, ``model`` (model may be ""). Hits: the descriptor's own
``hits_addend`` when set and > 0, else the request's ``hits_addend`` when > 0, else 1.
Any other descriptor (other keys, other order, other domain) is answered OK, uncounted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import Counter

from ratelimit.limiter import Hit, LimitOutcome, RateLimiter, Verdict

DOMAIN = "tessera"
SERVICE_NAME: str = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
_ENTRY_KEYS = ("tenant_id", "key_id", "model")

IGNORED = Counter(
    "tessera_ratelimit_ignored_descriptors_total",
    "Descriptors answered OK without counting because their shape is not understood",
)

# Enum values resolved once: attribute lookups on protobuf enum wrappers are slow on the hot path.
_OK: int = rls_pb2.RateLimitResponse.OK
_OVER_LIMIT: int = rls_pb2.RateLimitResponse.OVER_LIMIT
_Unit = rls_pb2.RateLimitResponse.RateLimit
_UNITS: dict[int, int] = {
    1: _Unit.SECOND,
    60: _Unit.MINUTE,
    3600: _Unit.HOUR,
    86400: _Unit.DAY,
    604800: _Unit.WEEK,
}
_UINT32_MAX = 0xFFFFFFFF

LIMIT_HEADER = "x-ratelimit-limit-requests"
REMAINING_HEADER = "x-ratelimit-remaining-requests"
RETRY_AFTER_HEADER = "retry-after"


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, limiter: RateLimiter, *, domain: str = DOMAIN) -> None:
        self._limiter = limiter
        self._domain = domain

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Any
    ) -> rls_pb2.RateLimitResponse:
        del context
        default_hits = request.hits_addend or 1
        understood = request.domain == self._domain
        hits: list[Hit] = []
        slots: list[int] = []  # per descriptor: its index in `hits`, or -1
        for descriptor in request.descriptors:
            hit = _hit_from_descriptor(descriptor, default_hits) if understood else None
            if hit is None:
                IGNORED.inc()
                slots.append(-1)
            else:
                slots.append(len(hits))
                hits.append(hit)
        verdict = await self._limiter.check(hits)
        return _response(verdict, slots)


def _hit_from_descriptor(descriptor: Any, default_hits: int) -> Hit | None:
    entries = descriptor.entries
    if (
        len(entries) != len(_ENTRY_KEYS)
        or entries[0].key != _ENTRY_KEYS[0]
        or entries[1].key != _ENTRY_KEYS[1]
        or entries[2].key != _ENTRY_KEYS[2]
    ):
        return None
    hits = default_hits
    if descriptor.HasField("hits_addend") and descriptor.hits_addend.value > 0:
        hits = descriptor.hits_addend.value
    return Hit(tenant_id=entries[0].value, key_id=entries[1].value, model=entries[2].value, hits=hits)


def _most_restrictive(outcomes: Iterable[LimitOutcome]) -> LimitOutcome | None:
    """The enforced limit with the least room (refusing ones first); shadow limits stay invisible."""
    best: LimitOutcome | None = None
    for o in outcomes:
        if o.limit.shadow:
            continue
        if best is None or _rank(o) < _rank(best):
            best = o
    return best


def _rank(o: LimitOutcome) -> tuple[bool, int, int]:
    return (not o.refuses, o.remaining if o.remaining is not None else o.limit.limit, o.limit.limit)


def _fill_status(status: Any, outcomes: tuple[LimitOutcome, ...]) -> None:
    status.code = _OVER_LIMIT if any(o.refuses for o in outcomes) else _OK
    top = _most_restrictive(outcomes)
    if top is None:
        return
    unit = _UNITS.get(top.limit.window_seconds)
    if unit is not None:
        status.current_limit.name = top.limit.id
        status.current_limit.requests_per_unit = min(top.limit.limit, _UINT32_MAX)
        status.current_limit.unit = unit
    if top.remaining is not None:
        status.limit_remaining = min(top.remaining, _UINT32_MAX)
    if top.refuses:
        status.duration_until_reset.FromNanoseconds(math.ceil(top.retry_after * 1e9))


def _response(verdict: Verdict, slots: list[int]) -> rls_pb2.RateLimitResponse:
    response = rls_pb2.RateLimitResponse(overall_code=_OK if verdict.allowed else _OVER_LIMIT)
    statuses = response.statuses
    for slot in slots:
        status = statuses.add(code=_OK)
        if slot >= 0:
            _fill_status(status, verdict.outcomes[slot])
    outcomes = verdict.outcomes
    top = _most_restrictive(outcomes[0] if len(outcomes) == 1 else [o for per in outcomes for o in per])
    headers = response.response_headers_to_add
    if top is not None and top.remaining is not None:
        headers.add(key=LIMIT_HEADER, value=str(top.limit.limit))
        headers.add(key=REMAINING_HEADER, value=str(top.remaining))
    if not verdict.allowed:
        headers.add(key=RETRY_AFTER_HEADER, value=str(max(1, math.ceil(verdict.retry_after))))
    return response
