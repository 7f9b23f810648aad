"""The decision: applicable limits from the current snapshot, one backend call, fail modes.

No Envoy types here (they stay in ``servicer.py``). A decision is always a ``Verdict``:
a backend failure applies each limit's own fail mode and is counted, never raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from prometheus_client import Counter

from ratelimit.backends.base import CounterBackend, CounterRequest, CounterState
from ratelimit.limits import EMPTY_SNAPSHOT, LimitSnapshot, RequestLimit
from tessera.errors import StorageError

log = structlog.get_logger("ratelimit")

DECISIONS = Counter(
    "tessera_ratelimit_decisions_total",
    "ShouldRateLimit answers: ok, over_limit, or ok with a shadow limit over",
    ["result"],
)
BACKEND_ERRORS = Counter(
    "tessera_ratelimit_backend_errors_total",
    "Counter backend calls that failed; each limit's fail mode decided the answer",
)
_OK = DECISIONS.labels("ok")
_OVER = DECISIONS.labels("over_limit")
_SHADOW_OVER = DECISIONS.labels("shadow_over_limit")

FAIL_CLOSED_RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Hit:
    """One understood descriptor: who is calling, and how many hits it costs."""

    tenant_id: str
    key_id: str
    model: str
    hits: int = 1


@dataclass(frozen=True, slots=True)
class LimitOutcome:
    limit: RequestLimit
    over: bool
    """This limit alone is over (or, after a backend failure, it fails closed)."""
    remaining: int | None
    """None when unknown (the backend failed)."""
    retry_after: float

    @property
    def refuses(self) -> bool:
        return self.over and not self.limit.shadow


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    outcomes: tuple[tuple[LimitOutcome, ...], ...]
    """Per hit, in request order: the outcome of each applicable limit."""
    retry_after: float
    """When refused: seconds until every refusing limit has room again; else 0."""


class RateLimiter:
    def __init__(self, backend: CounterBackend, snapshot: LimitSnapshot = EMPTY_SNAPSHOT) -> None:
        self._backend = backend
        self.snapshot = snapshot

    def replace(self, snapshot: LimitSnapshot) -> None:
        """Swap the whole snapshot; requests in flight keep the one they started with."""
        self.snapshot = snapshot

    async def check(self, hits: Sequence[Hit]) -> Verdict:
        snapshot = self.snapshot
        per_hit = [snapshot.applicable(h.tenant_id, h.key_id, h.model) for h in hits]
        index: dict[str, int] = {}  # counter key -> position; a limit counts once per request
        requests: list[CounterRequest] = []
        for hit, limits in zip(hits, per_hit, strict=True):
            for lim in limits:
                if lim.counter_key not in index:
                    index[lim.counter_key] = len(requests)
                    requests.append(
                        CounterRequest(
                            lim.counter_key, lim.limit, lim.window_seconds, not lim.shadow, hit.hits
                        )
                    )
        if not requests:
            _OK.inc()
            return Verdict(allowed=True, outcomes=tuple(() for _ in hits), retry_after=0.0)
        states = await self._acquire(requests, hits[0].tenant_id)
        outcomes = tuple(
            tuple(_outcome(lim, states[index[lim.counter_key]] if states else None) for lim in limits)
            for limits in per_hit
        )
        return self._judge(hits, outcomes)

    async def _acquire(self, requests: list[CounterRequest], tenant_id: str) -> tuple[CounterState, ...]:
        try:
            return (await self._backend.acquire(requests)).states
        except StorageError as exc:
            BACKEND_ERRORS.inc()
            log.warning(
                "ratelimit_backend_error", error=str(exc), transient=exc.transient, tenant_id=tenant_id
            )
            return ()

    def _judge(self, hits: Sequence[Hit], outcomes: tuple[tuple[LimitOutcome, ...], ...]) -> Verdict:
        refusing = [(h, o) for h, per in zip(hits, outcomes, strict=True) for o in per if o.refuses]
        if refusing:
            _OVER.inc()
            retry = max(o.retry_after for _, o in refusing)
            for hit, o in refusing:
                log.info(
                    "ratelimit_over_limit",
                    tenant_id=hit.tenant_id,
                    key_id=hit.key_id,
                    model=hit.model,
                    limit_id=o.limit.id,
                    retry_after=round(o.retry_after, 3),
                    backend_failed=o.remaining is None,
                )
            return Verdict(allowed=False, outcomes=outcomes, retry_after=retry)
        shadow = [(h, o) for h, per in zip(hits, outcomes, strict=True) for o in per if o.over]
        if shadow:
            _SHADOW_OVER.inc()
            for hit, o in shadow:
                log.info(
                    "ratelimit_shadow_over_limit",
                    tenant_id=hit.tenant_id,
                    key_id=hit.key_id,
                    model=hit.model,
                    limit_id=o.limit.id,
                )
        else:
            _OK.inc()
        return Verdict(allowed=True, outcomes=outcomes, retry_after=0.0)


def _outcome(lim: RequestLimit, state: CounterState | None) -> LimitOutcome:
    if state is None:  # backend failed: the limit's own fail mode (a shadow limit never refuses)
        closed = lim.fail_closed and not lim.shadow
        return LimitOutcome(lim, closed, None, FAIL_CLOSED_RETRY_SECONDS if closed else 0.0)
    return LimitOutcome(lim, state.over, state.remaining, state.retry_after)
