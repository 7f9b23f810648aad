"""Sampled logging for events an attacker can trigger at will (a flood of random keys).

At most ``per_second`` lines per one-second window; the number of lines dropped is carried
on the next line that is written (``suppressed=N``), so volume stays bounded and nothing is
lost silently. The metric counters still see every event.
"""

from __future__ import annotations

from tessera.clock import SYSTEM_CLOCK, Clock


class LogSampler:
    def __init__(self, per_second: int = 20, clock: Clock = SYSTEM_CLOCK) -> None:
        self._per_second = per_second
        self._clock = clock
        self._window = -1
        self._written = 0
        self._suppressed = 0

    def admit(self) -> int | None:
        """None: drop this line. Otherwise log it, with this many earlier lines suppressed."""
        window = int(self._clock.monotonic())
        if window != self._window:
            self._window, self._written = window, 0
        if self._written >= self._per_second:
            self._suppressed += 1
            return None
        self._written += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed
