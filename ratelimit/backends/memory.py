"""In-process counters: the embedded default (one worker) and the unit-test backend."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from ratelimit.backends.base import (
    BUDGET,
    LOG,
    SLOTS,
    Acquisition,
    CounterRequest,
    CounterState,
    Settlement,
)
from tessera.clock import SYSTEM_CLOCK, Clock

SLOT_RETRY_SECONDS = 1.0  # a slot frees when a stream ends: there is no better hint


class _Log:
    __slots__ = ("stamps", "window")

    def __init__(self, window: float) -> None:
        self.stamps: deque[float] = deque()
        self.window = window


class _Budget:
    __slots__ = ("level", "limit", "period", "reservations", "settled", "t")

    def __init__(self, limit: int, now: float, period: int) -> None:
        self.level = float(limit)
        self.limit = limit
        self.t = now
        self.period = period
        self.reservations: dict[str, tuple[int, float]] = {}  # request id -> (amount, expiry)
        self.settled: dict[str, float] = {}  # request id -> expiry (a second settle is a no-op)

    def refresh(self, limit: int, window: float, period: int, now: float) -> None:
        """Refill (or start the new calendar period), then release expired reservations."""
        if limit != self.limit:  # a changed limit keeps what was used
            self.level += limit - self.limit
            self.limit = limit
        if window > 0:
            self.level = min(float(limit), self.level + (now - self.t) * limit / window)
        elif period > self.period:  # only forward: replicas' clocks may straddle a month's end
            self.level, self.period = float(limit), period
        self.t = now
        for rid, (amount, expiry) in list(self.reservations.items()):
            if expiry <= now:
                del self.reservations[rid]
                self.level = min(float(limit), self.level + amount)
        for rid, expiry in list(self.settled.items()):
            if expiry <= now:
                del self.settled[rid]


class MemoryCounterBackend:
    """A deque of admission times per LOG key, a level per BUDGET key, leases per SLOTS key,
    on the injected monotonic clock (calendar periods come from the caller).

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
        self._slots: dict[str, dict[str, float]] = {}  # key -> request id -> lease expiry

    def __len__(self) -> int:
        return len(self._logs)

    async def acquire(
        self, counters: Sequence[CounterRequest], *, request_id: str = "", lease_seconds: float = 0.0
    ) -> Acquisition:
        # No await below: the whole call is atomic on the event loop.
        now = self._clock.monotonic()
        self._sweep(now)
        used: list[float] = []  # LOG: entries in window; BUDGET: level; SLOTS: slots held
        admitted = True
        for c in counters:
            value = self._current(c, now)
            used.append(value)
            if c.enforced and _over(c, value):
                admitted = False
        states: list[CounterState] = []
        for c, value in zip(counters, used, strict=True):
            if _over(c, value):
                states.append(
                    CounterState(
                        over=True,
                        remaining=_remaining(c, value),
                        retry_after=self._retry_after(c, value, now),
                    )
                )
            elif admitted:
                self._record(c, now, request_id, lease_seconds)
                states.append(
                    CounterState(over=False, remaining=_remaining(c, value, after=True), retry_after=0.0)
                )
            else:
                states.append(CounterState(over=False, remaining=_remaining(c, value), retry_after=0.0))
        return Acquisition(admitted, tuple(states))

    async def settle(
        self, settlements: Sequence[Settlement], *, request_id: str, lease_seconds: float = 900.0
    ) -> None:
        now = self._clock.monotonic()
        for s in settlements:
            if s.kind == SLOTS:
                self._slots.get(s.key, {}).pop(request_id, None)
                continue
            budget = self._budget(s.key, s.limit, s.window_seconds, s.period, now)
            if request_id in budget.settled:
                continue
            reserved, expiry = budget.reservations.pop(request_id, (0, now))
            actual = reserved if s.actual is None else s.actual
            budget.level = min(float(s.limit), budget.level + reserved - actual)
            budget.settled[request_id] = max(expiry, now) + lease_seconds

    async def close(self) -> None:
        self._logs.clear()
        self._by_window.clear()
        self._budgets.clear()
        self._slots.clear()

    def _current(self, c: CounterRequest, now: float) -> float:
        if c.kind == BUDGET:
            return self._budget(c.key, c.limit, c.window_seconds, c.period, now).level
        if c.kind == SLOTS:
            held = self._slots.get(c.key)
            if held is None:
                return 0
            for rid, expiry in list(held.items()):
                if expiry <= now:
                    del held[rid]
            return len(held)
        log = self._logs.get(c.key)
        if log is None:
            return 0
        stamps = log.stamps
        edge = now - c.window_seconds
        while stamps and stamps[0] <= edge:
            stamps.popleft()
        return len(stamps)

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
        count = int(value)
        # The entry that must leave before `hits` fit: index count + hits - limit - 1, oldest first.
        index = count + c.hits - c.limit - 1
        if index >= count:  # more hits than the limit: never admissible, report a full window
            return float(c.window_seconds)
        return self._logs[c.key].stamps[index] + c.window_seconds - now

    def _record(self, c: CounterRequest, now: float, request_id: str, lease: float) -> None:
        if c.kind == BUDGET:
            budget = self._budgets[c.key]
            budget.level -= c.hits
            if c.reserve and request_id:
                budget.reservations[request_id] = (c.hits, now + lease)
            return
        if c.kind == SLOTS:
            self._slots.setdefault(c.key, {})[request_id] = now + lease
            return
        log = self._logs.get(c.key)
        if log is None:
            log = self._logs[c.key] = _Log(c.window_seconds)
        log.window = c.window_seconds  # a changed window moves the key to its new group
        log.stamps.extend([now] * c.hits)
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
                    if log.stamps and log.stamps[-1] + window > now:
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
