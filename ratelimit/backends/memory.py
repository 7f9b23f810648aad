"""In-process counters: the embedded default (one worker) and the unit-test backend."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from ratelimit.backends.base import Acquisition, CounterRequest, CounterState
from tessera.clock import SYSTEM_CLOCK, Clock


class _Log:
    __slots__ = ("stamps", "window")

    def __init__(self, window: float) -> None:
        self.stamps: deque[float] = deque()
        self.window = window


class MemoryCounterBackend:
    """A deque of admission times per key, on the injected monotonic clock.

    Idle keys are dropped once their newest entry has left the window. Keys are kept in one
    insertion-ordered dict per window length, refreshed on every record, so each dict is in
    expiry order and a sweep only looks at keys that are actually due (amortised O(1)).
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._logs: dict[str, _Log] = {}
        self._by_window: dict[float, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._logs)

    async def acquire(self, counters: Sequence[CounterRequest]) -> Acquisition:
        # No await below: the whole call is atomic on the event loop.
        now = self._clock.monotonic()
        self._sweep(now)
        counts: list[int] = []
        admitted = True
        for c in counters:
            log = self._logs.get(c.key)
            count = 0
            if log is not None:
                stamps = log.stamps
                edge = now - c.window_seconds
                while stamps and stamps[0] <= edge:
                    stamps.popleft()
                count = len(stamps)
            counts.append(count)
            if c.enforced and count + c.hits > c.limit:
                admitted = False
        states: list[CounterState] = []
        for c, count in zip(counters, counts, strict=True):
            if count + c.hits > c.limit:
                states.append(
                    CounterState(
                        over=True,
                        remaining=max(0, c.limit - count),
                        retry_after=self._retry_after(c, count, now),
                    )
                )
            elif admitted:
                self._record(c, now)
                states.append(CounterState(over=False, remaining=c.limit - count - c.hits, retry_after=0.0))
            else:
                states.append(CounterState(over=False, remaining=c.limit - count, retry_after=0.0))
        return Acquisition(admitted, tuple(states))

    async def close(self) -> None:
        self._logs.clear()
        self._by_window.clear()

    def _retry_after(self, c: CounterRequest, count: int, now: float) -> float:
        # The entry that must leave before `hits` fit: index count + hits - limit - 1, oldest first.
        index = count + c.hits - c.limit - 1
        if index >= count:  # more hits than the limit: never admissible, report a full window
            return float(c.window_seconds)
        return self._logs[c.key].stamps[index] + c.window_seconds - now

    def _record(self, c: CounterRequest, now: float) -> None:
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
