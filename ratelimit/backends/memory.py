"""In-process counters: the embedded default (one worker) and the unit-test backend."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence

from ratelimit.backends.base import (
    BUDGET,
    EXACT_LOG_MAX,
    LOG,
    LOG_BUCKETS,
    SLOTS,
    AcquireCall,
    Acquisition,
    CounterRequest,
    CounterState,
    SettleCall,
    Settlement,
)
from tessera.clock import SYSTEM_CLOCK, Clock
from tessera.errors import StorageError

SLOT_RETRY_SECONDS = 1.0  # a slot frees when a stream ends: there is no better hint
LOG_KEEP = EXACT_LOG_MAX + 1
"""An exact log keeps its newest LOG_KEEP hits: with more, the oldest leave while the counter is
still full (at least LOG_KEEP >= limit + 1 remain), so dropping them changes no decision."""


class _Log:
    """(time, hits) in time order: exact call times, or bucket ends for a bucketed log."""

    __slots__ = ("entries", "total", "window")

    def __init__(self, window: float) -> None:
        self.entries: deque[tuple[float, int]] = deque()
        self.total = 0
        self.window = window

    def expire(self, window: float, now: float) -> int:
        entries = self.entries
        while entries and entries[0][0] + window <= now:
            self.total -= entries.popleft()[1]
        return self.total

    def record(self, t: float, hits: int) -> None:
        entries = self.entries
        if entries and entries[-1][0] >= t:  # same time or bucket (or a later one: keep the order)
            last, n = entries[-1]
            entries[-1] = (last, n + hits)
        else:
            entries.append((t, hits))
        self.total += hits

    def trim(self, keep: int) -> None:
        """Forget the oldest hits beyond the newest ``keep``."""
        entries, excess = self.entries, self.total - keep
        while excess > 0:
            t, n = entries[0]
            if n > excess:
                entries[0] = (t, n - excess)
                self.total -= excess
                return
            entries.popleft()
            self.total -= n
            excess -= n


class _Budget:
    __slots__ = ("level", "limit", "period", "reservations", "t")

    def __init__(self, limit: int, now: float, period: int) -> None:
        self.level = float(limit)
        self.limit = limit
        self.t = now
        self.period = period
        # request id -> (amount, expiry), in the order taken: the oldest lease ends first
        self.reservations: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def refresh(self, limit: int, window: float, period: int, now: float) -> None:
        """Refill (or start the new calendar period), then end expired reservations: each stays
        charged (it was an upper bound of its request's cost), and a settle that comes later finds
        nothing to replace, so a request that outlives its lease is never free."""
        if limit != self.limit:  # a changed limit keeps what was used
            self.level += limit - self.limit
            self.limit = limit
        if window > 0:
            self.level = min(float(limit), self.level + (now - self.t) * limit / window)
        elif period > self.period:  # only forward: replicas' clocks may straddle a month's end
            self.level, self.period = float(limit), period
        self.t = now
        reservations = self.reservations
        while reservations:
            rid, (_amount, expiry) = next(iter(reservations.items()))
            if expiry > now:
                break
            del reservations[rid]  # charged as reserved: a request never reported is never free


class MemoryCounterBackend:
    """Per key: a ``_Log`` (LOG), a level and its reservations (BUDGET), or the slots held
    (SLOTS), on the injected monotonic clock (calendar periods come from the caller).

    Idle LOG keys are dropped once their newest entry has left the window. Keys are kept in one
    insertion-ordered dict per window length, refreshed on every record, so each dict is in
    expiry order and a sweep only looks at keys that are actually due (amortised O(1)).
    BUDGET and SLOTS keys live as long as the process: one per limit and key in use.
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._logs: dict[str, _Log] = {}
        self._by_window: dict[float, OrderedDict[str, None]] = {}
        self._budgets: dict[str, _Budget] = {}
        self._slots: dict[str, OrderedDict[str, float]] = {}  # key -> request id -> lease expiry

    def __len__(self) -> int:
        return len(self._logs)

    def entries(self, key: str) -> int:
        """What ``key`` holds: log entries, reservations, or slots (for tests and benchmarks)."""
        if (log := self._logs.get(key)) is not None:
            return len(log.entries)
        if (budget := self._budgets.get(key)) is not None:
            return len(budget.reservations)
        return len(self._slots.get(key, ()))

    async def acquire(
        self,
        counters: Sequence[CounterRequest],
        *,
        request_id: str = "",
        lease_seconds: float = 0.0,
        force: bool = False,
    ) -> Acquisition:
        now = self._clock.monotonic()
        self._sweep(now)
        return self._acquire(counters, request_id, force, lease_seconds, now)

    async def acquire_many(
        self, calls: Sequence[AcquireCall], *, lease_seconds: float
    ) -> list[Acquisition | StorageError]:
        now = self._clock.monotonic()
        self._sweep(now)
        return [self._acquire(c.counters, c.request_id, c.force, lease_seconds, now) for c in calls]

    async def settle(
        self,
        settlements: Sequence[Settlement],
        *,
        request_id: str,
        lease_seconds: float = 900.0,  # noqa: ARG002 - the shared signature: no settle marker to keep
    ) -> None:
        self._settle(settlements, request_id, self._clock.monotonic())

    async def settle_many(
        self,
        calls: Sequence[SettleCall],
        *,
        lease_seconds: float,  # noqa: ARG002 - the shared signature
    ) -> StorageError | None:
        now = self._clock.monotonic()
        for call in calls:
            self._settle(call.settlements, call.request_id, now)
        return None

    async def close(self) -> None:
        self._logs.clear()
        self._by_window.clear()
        self._budgets.clear()
        self._slots.clear()

    # No await below: each call (and each batch) is atomic on the event loop.

    def _acquire(
        self, counters: Sequence[CounterRequest], request_id: str, force: bool, lease: float, now: float
    ) -> Acquisition:
        values = [self._current(c, now) for c in counters]  # LOG: hits in window; BUDGET: level; SLOTS: held
        overs = [_over(c, value) for c, value in zip(counters, values, strict=True)]
        admitted = force or not any(over and c.enforced for c, over in zip(counters, overs, strict=True))
        states: list[CounterState] = []
        for c, value, over in zip(counters, values, overs, strict=True):
            if over:
                retry = self._retry_after(c, value, now)
                states.append(CounterState(over=True, remaining=_remaining(c, value), retry_after=retry))
                if force:
                    self._record(c, now, request_id, lease)
            elif admitted:
                self._record(c, now, request_id, lease)
                states.append(
                    CounterState(over=False, remaining=_remaining(c, value, after=True), retry_after=0.0)
                )
            else:
                states.append(CounterState(over=False, remaining=_remaining(c, value), retry_after=0.0))
        return Acquisition(admitted, tuple(states))

    def _settle(self, settlements: Sequence[Settlement], request_id: str, now: float) -> None:
        for s in settlements:
            if s.kind == SLOTS:
                if (held := self._slots.get(s.key)) is not None:
                    held.pop(request_id, None)
                continue
            budget = self._budgets.get(s.key)
            if budget is None or request_id not in budget.reservations:
                continue  # nothing held: already settled, never reserved, or released
            budget.refresh(s.limit, s.window_seconds, s.period, now)
            reserved = budget.reservations.pop(request_id, None)
            if reserved is not None:  # not released by its lease just now
                actual = reserved[0] if s.actual is None else s.actual
                budget.level = min(float(s.limit), budget.level + reserved[0] - actual)

    def _current(self, c: CounterRequest, now: float) -> float:
        if c.kind == BUDGET:
            return self._budget(c.key, c.limit, c.window_seconds, c.period, now).level
        if c.kind == SLOTS:
            held = self._slots.get(c.key)
            if held is None:
                return 0
            while held:
                rid, expiry = next(iter(held.items()))
                if expiry > now:
                    break
                del held[rid]
            return len(held)
        log = self._logs.get(c.key)
        return 0 if log is None else log.expire(c.window_seconds, now)

    def _budget(self, key: str, limit: int, window: float, period: int, now: float) -> _Budget:
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = _Budget(limit, now, period)
        budget.refresh(limit, window, period, now)
        return budget

    def _retry_after(self, c: CounterRequest, value: float, now: float) -> float:
        if c.kind == BUDGET:
            return _budget_retry(c, value, self._clock.now())
        if c.kind == SLOTS:
            return SLOT_RETRY_SECONDS
        if c.hits > c.limit:  # never admissible: report a full window
            return float(c.window_seconds)
        need = int(value) + c.hits - c.limit  # hits that must leave, oldest first
        for t, n in self._logs[c.key].entries:
            need -= n
            if need <= 0:
                return t + c.window_seconds - now
        return float(c.window_seconds)  # unreachable: over means more than `need` are held

    def _record(self, c: CounterRequest, now: float, request_id: str, lease: float) -> None:
        if c.kind == BUDGET:
            budget = self._budgets[c.key]
            budget.level -= c.hits
            if c.reserve and request_id:
                budget.reservations[request_id] = (c.hits, now + lease)
                budget.reservations.move_to_end(request_id)
            return
        if c.kind == SLOTS:
            held = self._slots.get(c.key)
            if held is None:
                held = self._slots[c.key] = OrderedDict()
            held[request_id] = now + lease
            held.move_to_end(request_id)
            return
        if c.hits <= 0:
            return
        log = self._logs.get(c.key)
        if log is None:
            log = self._logs[c.key] = _Log(c.window_seconds)
        if c.limit > EXACT_LOG_MAX and c.window_seconds > 0:
            width = c.window_seconds / LOG_BUCKETS
            log.record((math.floor(now / width) + 1) * width, c.hits)  # the bucket's end
        else:
            log.record(now, c.hits)
            if log.total > LOG_KEEP:  # only forced hits go over an exact limit
                log.trim(LOG_KEEP)
        log.window = c.window_seconds  # a changed window moves the key to its new group
        order = self._by_window.get(c.window_seconds)
        if order is None:
            order = self._by_window[c.window_seconds] = OrderedDict()
        order[c.key] = None
        order.move_to_end(c.key)

    def _sweep(self, now: float) -> None:
        for window, order in list(self._by_window.items()):
            while order:
                key = next(iter(order))
                log = self._logs.get(key)
                if log is not None and log.window == window:
                    if log.entries and log.entries[-1][0] + window > now:
                        break
                    del self._logs[key]
                order.popitem(last=False)
            if not order:
                del self._by_window[window]


def _over(c: CounterRequest, value: float) -> bool:
    if c.kind == BUDGET:
        return value < c.hits  # a zero-cost hit still needs a level not below zero
    return value + c.hits > c.limit if c.kind == LOG else value + 1 > c.limit


def _remaining(c: CounterRequest, value: float, *, after: bool = False) -> int:
    if c.kind == BUDGET:
        return max(0, int(value - (c.hits if after else 0)))
    taken = (c.hits if c.kind == LOG else 1) if after else 0
    return max(0, c.limit - int(value) - taken)


def _budget_retry(c: CounterRequest, level: float, now_unix: float) -> float:
    """Seconds until ``c.hits`` fit: the refill time, or the calendar period's end."""
    if c.window_seconds <= 0:
        return max(1.0, c.period_end - now_unix)
    if c.hits > c.limit:
        return float(c.window_seconds)
    return (c.hits - level) * c.window_seconds / c.limit
