"""Time sources: the system clock for production, a settable one for tests."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (wall clock, for expiries and timestamps)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for windows and timeouts)."""


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 1000.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds


SYSTEM_CLOCK = SystemClock()


def calendar_month(unix: float) -> tuple[int, float, float]:
    """The UTC calendar month holding ``unix``: (id = year * 12 + month - 1, start, end)."""
    t = datetime.fromtimestamp(unix, UTC)
    start = datetime(t.year, t.month, 1, tzinfo=UTC)
    end = datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=UTC)
    return t.year * 12 + t.month - 1, start.timestamp(), end.timestamp()
