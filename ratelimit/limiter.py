"""The decision: applicable limits from the current snapshot, one backend call, fail modes.

No Envoy or admission protos here (they stay in ``servicer.py`` and ``admission.py``). A
decision is always a ``Verdict``: a backend failure applies each limit's own fail mode and is
counted, never raised. ``admit`` decides a batch of requests with one backend call (one Redis
pipeline); ``settle_many`` replaces a batch's reservations by their real usage.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

import structlog
from prometheus_client import Counter, Gauge, Histogram

from ratelimit.backends.base import (
    BUDGET,
    SLOTS,
    AcquireCall,
    Acquisition,
    CounterBackend,
    CounterRequest,
    CounterState,
    SettleCall,
    Settlement,
)
from ratelimit.limits import (
    CONCURRENCY,
    EMPTY_SNAPSHOT,
    REQUESTS,
    SPEND,
    TOKENS,
    LimitSnapshot,
    ModelInfo,
    RequestLimit,
)
from tessera.clock import SYSTEM_CLOCK, Clock, calendar_month
from tessera.errors import StorageError
from tessera.metrics import LabelCap
from tessera.usage_line import token_terms

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
SETTLED = Counter("tessera_ratelimit_settlements_total", "Settlements of ended requests applied")
FORCED = Counter(
    "tessera_ratelimit_forced_admissions_total",
    "Requests ext_authz admitted while degraded (fail-open), counted afterwards",
)
RESERVED = Counter(
    "tessera_ratelimit_reservations_total", "Admitted requests that reserved tokens, spend or a slot"
)
OUTCOMES = Counter(
    "tessera_limit_outcomes",
    "Limits that refused (over_limit), refused because the counters failed (fail_closed), would"
    " have refused (shadow_over_limit), or were left under 10% of their value by an admitted"
    " request (near_limit; enforced limits only), by tenant and kind",
    ["tenant", "kind", "outcome"],
)
TENANT_LABELS: Final = LabelCap(1000)  # distinct tenants named in OUTCOMES; the rest: _other
BACKEND_SECONDS = Histogram(
    "tessera_ratelimit_backend_seconds",
    "Counter backend call latency",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
NEAR_LIMIT_SHARE: Final = 0.1
_OK = DECISIONS.labels("ok")
_OVER = DECISIONS.labels("over_limit")
_SHADOW_OVER = DECISIONS.labels("shadow_over_limit")

FAIL_CLOSED_RETRY_SECONDS = 1.0
RECENT_MAX: Final = 100_000  # request ids remembered, so a forced admission never counts twice
UNCOUNTED_MAX: Final = 100_000  # fail-open admissions waiting for the counters to come back
EARLY_MAX: Final = 100_000  # settlements that arrived before their admission, kept for it
UNCOUNTED = Gauge(
    "tessera_ratelimit_uncounted_admissions",
    "Requests admitted fail-open while the counters were unreachable, not counted yet",
)
EARLY_APPLIED = Counter(
    "tessera_ratelimit_early_settlements_total",
    "Settlements that arrived before their admission, applied when it arrived",
)
UNCOUNTED_LOST = Counter(
    "tessera_ratelimit_uncounted_dropped_total",
    "Fail-open admissions dropped uncounted (the backlog was full)",
)


@dataclass(frozen=True, slots=True)
class Hit:
    """One understood request-time descriptor: who is calling, and what the request may cost."""

    tenant_id: str
    key_id: str
    model: str
    hits: int = 1
    request_id: str = ""
    max_tokens: int | None = None
    """Completion tokens to reserve: from ext_authz the most the backend may generate (checked
    against the model's cap, n included); None: the model's default."""
    from_client: bool = False
    """``max_tokens`` is as the client wrote it (Envoy RLS descriptors): capped by the model's."""
    body_bytes: int = 0  # the request body's size: the prompt-size estimate
    forced: bool = False  # admitted already (degraded, fail-open): count it whatever
    node: str = ""  # the Envoy node that asked, when known (the usage backstop keeps it open)
    keep_only: bool = False  # no limit applied at ext_authz: admitted, never counted here


@dataclass(frozen=True, slots=True)
class Usage:
    """One stream-done descriptor: the request's real usage, as far as it is known."""

    tenant_id: str
    key_id: str
    model: str
    request_id: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    status: int = 0  # the response status (0: none, e.g. the client left first)


@dataclass(frozen=True, slots=True)
class LimitOutcome:
    limit: RequestLimit
    over: bool
    """This limit alone is over (or, after a backend failure, it fails closed)."""
    remaining: int | None
    """None when unknown (the backend failed)."""
    retry_after: float
    reset_after: float = 0.0
    """Seconds until this limit is back to its full value (OpenAI's ``x-ratelimit-reset-*``)."""

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
    reserved: bool = False
    """Admitted with a reservation or a slot: the stream-done call must settle it."""
    degraded: bool = False
    """The counters failed: each limit's own fail mode decided."""


ALLOWED = Verdict(allowed=True, outcomes=((),), retry_after=0.0)


@dataclass(frozen=True, slots=True)
class _Plan:
    """One request's counter call within a batch."""

    position: int  # in the batch
    limits: tuple[RequestLimit, ...]
    index: dict[str, int]  # counter key -> its position in call.counters
    call: AcquireCall


_SETTLED_KINDS: Final = (TOKENS, SPEND, CONCURRENCY)


class RateLimiter:
    def __init__(
        self,
        backend: CounterBackend,
        snapshot: LimitSnapshot = EMPTY_SNAPSHOT,
        *,
        clock: Clock = SYSTEM_CLOCK,
        lease_seconds: float = 900.0,
        prompt_bytes_per_token: int = 1,
    ) -> None:
        self._backend = backend
        self.snapshot = snapshot
        self._clock = clock
        self._lease = lease_seconds
        self._bytes_per_token = max(1, prompt_bytes_per_token)
        self._month_cache = (0, 0.0, 0.0)  # (id, start, end) of the calendar month last seen
        self._recent: dict[str, bool] = {}  # request id -> admitted (insertion ordered, bounded)
        # Admitted fail-open while the counters failed: counted (forced) by the next backend call
        # that reaches them, before anything else in it, so their settles find them held.
        self._uncounted: deque[AcquireCall] = deque()
        # Settled before this process admitted them (a fail-open admission sent again after a
        # reconnect, or answered late): applied as soon as their admission reserves.
        self._early: OrderedDict[str, Usage] = OrderedDict()

    def replace(self, snapshot: LimitSnapshot) -> None:
        """Swap the whole snapshot; requests in flight keep the one they started with."""
        self.snapshot = snapshot

    async def check(self, hits: Sequence[Hit]) -> Verdict:
        snapshot = self.snapshot
        per_hit = [snapshot.applicable(h.tenant_id, h.key_id, h.model) for h in hits]
        index: dict[str, int] = {}  # counter key -> position; a limit counts once per request
        requests: list[CounterRequest] = []
        now = self._clock.now()
        month = self._month(now)
        request_id = ""
        for hit, limits in zip(hits, per_hit, strict=True):
            request_id = request_id or hit.request_id
            for lim in limits:
                if lim.counter_key not in index:
                    index[lim.counter_key] = len(requests)
                    requests.append(self._counter(lim, hit, snapshot.model(hit.model), month))
        if not requests:
            _OK.inc()
            return Verdict(allowed=True, outcomes=tuple(() for _ in hits), retry_after=0.0)
        states = await self._acquire(requests, hits[0].tenant_id, request_id)
        outcomes = tuple(
            tuple(
                _outcome(lim, states[index[lim.counter_key]] if states else None, month[2] - now)
                for lim in limits
            )
            for limits in per_hit
        )
        verdict = self._judge(hits, outcomes)
        if verdict.allowed and states and any(r.reserve or r.kind == SLOTS for r in requests):
            RESERVED.inc()
            return replace(verdict, reserved=True)
        return verdict

    async def admit(self, hits: Sequence[Hit]) -> list[Verdict]:
        """One verdict per request (each decided on its own), with one backend call for all."""
        snapshot = self.snapshot
        now = self._clock.now()
        month = self._month(now)
        verdicts: list[Verdict] = [ALLOWED] * len(hits)
        plans: list[_Plan] = []
        for i, hit in enumerate(hits):
            if hit.keep_only:
                continue  # ext_authz admitted it with no limit: counting it now would hold a
                # reservation nobody settles (its line is not marked reserved)
            limits = snapshot.applicable(hit.tenant_id, hit.key_id, hit.model)
            if not limits:
                continue
            if hit.forced and self._recent.get(hit.request_id):
                verdicts[i] = replace(ALLOWED, reserved=True)  # its own admission counted it
                continue
            plans.append(self._plan(i, hit, limits, month))
        if not plans:
            _OK.inc(len(hits))
            return verdicts
        results, counted = await self._acquire_with_backlog([p.call for p in plans])
        for plan, result in zip(plans, results, strict=True):
            verdict = self._verdict(hits[plan.position], plan, result, month[2] - now)
            if verdict.allowed and isinstance(result, StorageError):
                self._count_later(plan.call)  # not counted yet: keeps any early settlement
            elif verdict.reserved and self._early:  # only then is the list read
                counted.append(plan.call.request_id)
            verdicts[plan.position] = verdict
        _OK.inc(len(hits) - len(plans))
        if self._early:
            await self._settle_early(counted)
        return verdicts

    async def _acquire_with_backlog(
        self, calls: list[AcquireCall]
    ) -> tuple[Sequence[Acquisition | StorageError], list[str]]:
        """One backend call for ``calls``, the fail-open backlog (if any) counted first in it:
        the calls' results, and the request ids of the backlog counted now."""
        backlog = self._take_uncounted() if self._uncounted else []  # empty but after an outage
        started = time.perf_counter()
        try:
            results = await self._backend.acquire_many(
                [*backlog, *calls] if backlog else calls, lease_seconds=self._lease
            )
        except BaseException:
            self._uncounted.extendleft(reversed(backlog))  # not counted: first in line again
            raise
        BACKEND_SECONDS.observe(time.perf_counter() - started)
        if not backlog:
            return results, []
        return results[len(backlog) :], self._counted(backlog, results[: len(backlog)])

    async def _settle_early(self, counted: Sequence[str]) -> None:
        """Requests just counted whose usage was settled before: their reservations are
        replaced by that usage now (else they would be held until their lease ends)."""
        early = self._early
        usages = [early.pop(rid) for rid in counted if rid in early]
        if not usages:
            return
        try:
            await self.settle_many(usages)
        except StorageError as exc:
            for usage in usages:  # kept for the admission counted later (the backlog)
                early[usage.request_id] = usage
            log.warning("ratelimit_settle_failed", error=str(exc), tenant_id=usages[0].tenant_id)
            return
        EARLY_APPLIED.inc(len(usages))

    def _count_later(self, call: AcquireCall) -> None:
        """A request admitted fail-open by the counters' outage: counted once they answer."""
        if len(self._uncounted) >= UNCOUNTED_MAX:
            self._uncounted.popleft()
            UNCOUNTED_LOST.inc()
        self._uncounted.append(AcquireCall(call.counters, call.request_id, force=True))
        UNCOUNTED.set(len(self._uncounted))

    def _take_uncounted(self) -> list[AcquireCall]:
        """The whole backlog, taken: a concurrent batch does not count it a second time."""
        taken = list(self._uncounted)
        self._uncounted.clear()
        return taken

    def _counted(
        self, backlog: list[AcquireCall], results: Sequence[Acquisition | StorageError]
    ) -> list[str]:
        """Put back, first in line, what the backend could not count yet; the request ids of
        the others (counted now)."""
        failed = [call for call, r in zip(backlog, results, strict=True) if isinstance(r, StorageError)]
        self._uncounted.extendleft(reversed(failed))
        UNCOUNTED.set(len(self._uncounted))
        return [
            call.request_id
            for call, r in zip(backlog, results, strict=True)
            if not isinstance(r, StorageError)
        ]

    async def count_uncounted(self) -> None:
        """Count the fail-open backlog now (before settling: a settle only replaces what is held).
        Raises StorageError while the counters are still unreachable."""
        backlog = self._take_uncounted()
        if not backlog:
            return
        try:
            results = await self._backend.acquire_many(backlog, lease_seconds=self._lease)
        except BaseException:
            self._uncounted.extendleft(reversed(backlog))
            raise
        counted = self._counted(backlog, results)
        if self._early:
            await self._settle_early(counted)
        error = next((r for r in results if isinstance(r, StorageError)), None)
        if error is not None:
            BACKEND_ERRORS.inc()
            raise error

    def _plan(
        self, position: int, hit: Hit, limits: tuple[RequestLimit, ...], month: tuple[int, float, float]
    ) -> _Plan:
        index: dict[str, int] = {}  # counter key -> position; a limit counts once per request
        requests: list[CounterRequest] = []
        info = self.snapshot.model(hit.model)
        for lim in limits:
            if lim.counter_key not in index:
                index[lim.counter_key] = len(requests)
                requests.append(self._counter(lim, hit, info, month))
        return _Plan(position, limits, index, AcquireCall(requests, hit.request_id, hit.forced))

    def _verdict(
        self, hit: Hit, plan: _Plan, result: Acquisition | StorageError, to_month_end: float
    ) -> Verdict:
        states: tuple[CounterState, ...] | None = None
        if isinstance(result, StorageError):
            BACKEND_ERRORS.inc()
            log.warning("ratelimit_backend_error", error=str(result), tenant_id=hit.tenant_id)
        else:
            states = result.states
        outcomes = (
            tuple(
                _outcome(lim, states[plan.index[lim.counter_key]] if states else None, to_month_end)
                for lim in plan.limits
            ),
        )
        if hit.forced:
            FORCED.inc()
            verdict = Verdict(allowed=True, outcomes=outcomes, retry_after=0.0)
        else:
            verdict = self._judge((hit,), outcomes)
        self._remember(hit.request_id, verdict.allowed)  # a forced copy sent again is not counted again
        reserved = verdict.allowed and any(r.reserve or r.kind == SLOTS for r in plan.call.counters)
        if reserved:
            RESERVED.inc()
        return replace(verdict, reserved=reserved, degraded=states is None)

    def _remember(self, request_id: str, admitted: bool) -> None:
        if not request_id:
            return
        recent = self._recent
        recent[request_id] = admitted
        if len(recent) > RECENT_MAX:
            del recent[next(iter(recent))]

    async def settle(self, *usages: Usage) -> None:
        """Replace the requests' reservations by their real cost and free their slots (the RLS
        stream-done call). A failure is logged and counted: the leases release them later."""
        try:
            await self.settle_many(usages)
        except StorageError as exc:
            log.warning("ratelimit_settle_failed", error=str(exc), tenant_id=usages[0].tenant_id)

    async def settle_many(self, usages: Sequence[Usage]) -> int:
        """Settle ended requests in one backend call; how many touched a counter. Raises
        StorageError (counted) when the counters cannot be reached: the caller retries."""
        calls = [SettleCall(found, u.request_id) for u in usages if (found := self._settlements(u))]
        if not calls:
            return 0
        self._keep_early(usages)
        await self.count_uncounted()
        error = await self._backend.settle_many(calls, lease_seconds=self._lease)
        if error is not None:
            BACKEND_ERRORS.inc()
            raise error
        SETTLED.inc(len(calls))
        return len(calls)

    def _keep_early(self, usages: Sequence[Usage]) -> None:
        """Remember the settlements of requests this process has not admitted (yet): their
        admission may still arrive (sent again after a reconnect), and must end settled."""
        recent, early = self._recent, self._early
        for usage in usages:
            if usage.request_id and not recent.get(usage.request_id):
                early[usage.request_id] = usage
                if len(early) > EARLY_MAX:
                    early.popitem(last=False)

    def _settlements(self, usage: Usage) -> list[Settlement]:
        snapshot = self.snapshot
        limits = [
            lim
            for lim in snapshot.applicable(usage.tenant_id, usage.key_id, usage.model)
            if lim.kind in _SETTLED_KINDS
        ]
        if not limits:
            return []
        period, _, period_end = self._month(self._clock.now())
        info = snapshot.model(usage.model)
        seen: set[str] = set()
        settlements = []
        for lim in limits:
            if lim.counter_key in seen:
                continue
            seen.add(lim.counter_key)
            kind = SLOTS if lim.kind == CONCURRENCY else BUDGET
            settlements.append(
                Settlement(
                    lim.counter_key,
                    kind,
                    lim.limit,
                    lim.window_seconds,
                    period,
                    period_end,
                    _actual(lim, usage, info),
                )
            )
        return settlements

    def _counter(
        self, lim: RequestLimit, hit: Hit, info: ModelInfo, month: tuple[int, float, float]
    ) -> CounterRequest:
        enforced = not lim.shadow
        if lim.kind == CONCURRENCY:
            return CounterRequest(lim.counter_key, lim.limit, 0.0, enforced, 1, kind=SLOTS)
        if lim.kind == REQUESTS and lim.window_seconds > 0:
            return CounterRequest(lim.counter_key, lim.limit, lim.window_seconds, enforced, hit.hits)
        if lim.kind == REQUESTS:
            amount = hit.hits
        else:
            prompt, completion = self.estimate(hit, info)
            amount = _cost(lim, info, prompt, completion, 0)
        return CounterRequest(
            lim.counter_key,
            lim.limit,
            lim.window_seconds,
            enforced,
            amount,
            kind=BUDGET,
            reserve=lim.kind != REQUESTS,
            period=month[0],
            period_end=month[2],
        )

    def _month(self, now: float) -> tuple[int, float, float]:
        """The calendar month of ``now``, recomputed only when it changes (a hot-path call)."""
        cached = self._month_cache
        if not cached[1] <= now < cached[2]:
            cached = self._month_cache = calendar_month(now)
        return cached

    def estimate(self, hit: Hit, info: ModelInfo) -> tuple[int, int]:
        """(prompt, completion) tokens to reserve. The prompt: the body's size in bytes /
        ``prompt_bytes_per_token`` (1 by default: no tokenizer makes more tokens than the bytes
        of the JSON that carries them, so usage can never exceed the reservation). The
        completion: the request's admitted maximum, else the model's default."""
        prompt = -(-hit.body_bytes // self._bytes_per_token)
        default, cap = token_terms(info.default_max_tokens, info.max_max_tokens)
        if hit.max_tokens is None:
            return prompt, default
        return prompt, min(hit.max_tokens, cap) if hit.from_client else hit.max_tokens

    async def _acquire(
        self, requests: list[CounterRequest], tenant_id: str, request_id: str
    ) -> tuple[CounterState, ...]:
        started = time.perf_counter()
        try:
            return (
                await self._backend.acquire(requests, request_id=request_id, lease_seconds=self._lease)
            ).states
        except StorageError as exc:
            BACKEND_ERRORS.inc()
            log.warning(
                "ratelimit_backend_error", error=str(exc), transient=exc.transient, tenant_id=tenant_id
            )
            return ()
        finally:
            BACKEND_SECONDS.observe(time.perf_counter() - started)

    def _judge(self, hits: Sequence[Hit], outcomes: tuple[tuple[LimitOutcome, ...], ...]) -> Verdict:
        refusing = [(h, o) for h, per in zip(hits, outcomes, strict=True) for o in per if o.refuses]
        if refusing:
            _OVER.inc()
            retry = max(o.retry_after for _, o in refusing)
            for hit, o in refusing:
                outcome = "fail_closed" if o.remaining is None else "over_limit"
                OUTCOMES.labels(TENANT_LABELS(hit.tenant_id), o.limit.kind, outcome).inc()
                log.info(
                    "ratelimit_over_limit",
                    request_id=hit.request_id,  # the ledger row's key: its trace id is there
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
                OUTCOMES.labels(TENANT_LABELS(hit.tenant_id), o.limit.kind, "shadow_over_limit").inc()
                log.info(
                    "ratelimit_shadow_over_limit",
                    request_id=hit.request_id,
                    tenant_id=hit.tenant_id,
                    key_id=hit.key_id,
                    model=hit.model,
                    limit_id=o.limit.id,
                )
        else:
            _OK.inc()
        return Verdict(allowed=True, outcomes=outcomes, retry_after=0.0)


def _outcome(lim: RequestLimit, state: CounterState | None, to_month_end: float) -> LimitOutcome:
    if state is None:  # backend failed: the limit's own fail mode (a shadow limit never refuses)
        closed = lim.fail_closed and not lim.shadow
        return LimitOutcome(lim, closed, None, FAIL_CLOSED_RETRY_SECONDS if closed else 0.0)
    if state.over:
        reset = state.retry_after
    elif lim.kind == CONCURRENCY:
        reset = 0.0
    elif lim.window_seconds == 0:
        reset = to_month_end
    elif lim.kind == REQUESTS:
        reset = float(lim.window_seconds)  # the entry just recorded leaves after one window
    else:  # a bucket is full again once it has refilled what is missing
        reset = (lim.limit - state.remaining) * lim.window_seconds / lim.limit if lim.limit else 0.0
    if not state.over and not lim.shadow and lim.limit and state.remaining < lim.limit * NEAR_LIMIT_SHARE:
        OUTCOMES.labels(TENANT_LABELS(lim.tenant_id), lim.kind, "near_limit").inc()
    return LimitOutcome(lim, state.over, state.remaining, state.retry_after, max(0.0, reset))


def _actual(lim: RequestLimit, usage: Usage, info: ModelInfo) -> int | None:
    """The request's real cost on ``lim``: 0 for a failed request (its reservation comes back),
    None when the usage is unknown (the reservation stands: a stream the client cut is charged
    what was reserved, never zero)."""
    if usage.prompt_tokens is not None and usage.completion_tokens is not None:
        return _cost(lim, info, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
    if usage.status >= 400:  # noqa: PLR2004 - HTTP error statuses: failed, nothing to charge
        return 0
    return None


def _cost(lim: RequestLimit, info: ModelInfo, prompt: int, completion: int, cached: int) -> int:
    """Tokens (weighted, in percent) or spend (micro-units; 0 for an unpriced model)."""
    if lim.kind == TOKENS:
        return -(-(prompt * lim.prompt_weight + completion * lim.completion_weight) // 100)
    if lim.kind == SPEND:
        cached = min(cached, prompt)
        micros = (
            (prompt - cached) * info.input_micros
            + cached * info.cached_micros
            + completion * info.output_micros
        )
        return -(-micros // 1_000_000)
    return 0
