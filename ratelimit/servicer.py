"""Envoy RLS v3 adapter: the only module that sees Envoy proto types.

Descriptor contract (domain ``tessera``; entries are read by key, values are strings):

- request time: ``tenant_id``, ``key_id``, ``model`` and optionally ``request_id`` (Envoy's
  ``x-request-id``: the reservation's name), ``max_tokens`` and ``body_bytes`` (the estimate).
  Hits: the descriptor's own ``hits_addend`` when set and > 0, else the request's when > 0,
  else 1 (request limits only).
- stream done (``apply_on_stream_done``): ``phase=settle``, ``reserved``, ``tenant_id``,
  ``key_id``, ``model``, ``request_id`` and, when known, ``prompt_tokens``,
  ``completion_tokens``, ``cached_tokens``, ``status``. Envoy sends it only when the
  request-time answer carried ``reserved`` in its dynamic metadata (a request with no token,
  spend or concurrency limit costs one call, not two). Always answered OK; Envoy does not wait.

Any other descriptor (unknown keys, another domain) is answered OK, uncounted.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import Counter

from ratelimit.limiter import Hit, LimitOutcome, RateLimiter, Usage, Verdict
from ratelimit.verdicts import limit_headers, most_restrictive, refusal_code, retry_after_seconds
from tessera.client_errors import error_body

DOMAIN = "tessera"
SERVICE_NAME: str = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
_REQUIRED: Final = frozenset({"tenant_id", "key_id", "model"})
_REQUEST_KEYS: Final = _REQUIRED | {"request_id", "max_tokens", "max_completion_tokens", "body_bytes"}
_SETTLE_KEYS: Final = _REQUIRED | {
    "phase",
    "reserved",
    "request_id",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "status",
}
_MAX_COUNT: Final = 10**12

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

RETRY_AFTER_HEADER = "retry-after"
RESERVED_KEY = "reserved"  # response metadata: this request holds a reservation to settle


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
            entries = _entries(descriptor) if understood else None
            if entries is not None and entries.get("phase") == "settle":
                usage = _usage(entries)
                if usage is not None:
                    await self._limiter.settle(usage)
                    slots.append(-1)
                    continue
            hit = _hit(descriptor, entries, default_hits) if entries is not None else None
            if hit is None:
                IGNORED.inc()
                slots.append(-1)
            else:
                slots.append(len(hits))
                hits.append(hit)
        if not hits:
            return _all_ok(len(slots))
        verdict = await self._limiter.check(hits)
        return _response(verdict, slots)


def _entries(descriptor: Any) -> dict[str, str] | None:
    entries = {e.key: e.value for e in descriptor.entries}
    return entries if len(entries) == len(descriptor.entries) else None  # a repeated key: not ours


def _count(value: str | None) -> int | None:
    """A non-negative integer from a descriptor value ("256", or Envoy's "256.000000"); else None."""
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0 or number != int(number) or number > _MAX_COUNT:
        return None
    return int(number)


def _hit(descriptor: Any, entries: dict[str, str], default_hits: int) -> Hit | None:
    if not _REQUIRED <= entries.keys() <= _REQUEST_KEYS:
        return None
    hits = default_hits
    if descriptor.HasField("hits_addend") and descriptor.hits_addend.value > 0:
        hits = descriptor.hits_addend.value
    return Hit(
        tenant_id=entries["tenant_id"],
        key_id=entries["key_id"],
        model=entries["model"],
        hits=hits,
        request_id=entries.get("request_id", ""),
        # OpenAI's newer name wins when both are given
        max_tokens=_count(entries.get("max_completion_tokens")) or _count(entries.get("max_tokens")) or None,
        from_client=True,
        body_bytes=_count(entries.get("body_bytes")) or 0,
    )


def _usage(entries: dict[str, str]) -> Usage | None:
    if not (_REQUIRED | {"request_id"}) <= entries.keys() <= _SETTLE_KEYS:
        return None
    return Usage(
        tenant_id=entries["tenant_id"],
        key_id=entries["key_id"],
        model=entries["model"],
        request_id=entries["request_id"],
        prompt_tokens=_count(entries.get("prompt_tokens")),
        completion_tokens=_count(entries.get("completion_tokens")),
        cached_tokens=_count(entries.get("cached_tokens")) or 0,
        status=_count(entries.get("status")) or 0,
    )


def _all_ok(n: int) -> rls_pb2.RateLimitResponse:
    response = rls_pb2.RateLimitResponse(overall_code=_OK)
    for _ in range(n):
        response.statuses.add(code=_OK)
    return response


def _fill_status(status: Any, outcomes: tuple[LimitOutcome, ...]) -> None:
    status.code = _OVER_LIMIT if any(o.refuses for o in outcomes) else _OK
    top = most_restrictive(outcomes)
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
    if verdict.reserved:  # Envoy keeps it as metadata: only then does it make the settle call
        response.dynamic_metadata.fields[RESERVED_KEY].string_value = "1"
    headers = response.response_headers_to_add
    for key, value in limit_headers(verdict):
        headers.add(key=key, value=value)
    if not verdict.allowed:
        headers.add(key=RETRY_AFTER_HEADER, value=str(retry_after_seconds(verdict)))
        headers.add(key="content-type", value="application/json")
        response.raw_body = json.dumps(error_body(refusal_code(verdict))).encode()
    return response
