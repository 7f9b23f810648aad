"""The counter storage interface. Three kinds of counter share one atomic ``acquire``:

- ``LOG`` (request limits): an exact rolling window (sliding log). A counter admits at most
  ``limit`` hits in ANY interval of ``window_seconds``; an entry recorded at ``t`` counts
  while ``now < t + window_seconds``.
- ``BUDGET`` (tokens, spend; requests per calendar month): a level that starts at ``limit``.
  With ``window_seconds > 0`` it is a token bucket refilled at ``limit / window_seconds`` per
  second up to ``limit``; with ``window_seconds == 0`` it is a calendar budget: it is full
  again whenever ``period`` changes (the caller passes the current month's id). A hit of
  ``hits`` fits while the level is at least ``hits``, and lowers it. With ``reserve`` the
  amount is also recorded as the reservation of ``request_id``: ``settle`` later replaces it
  by the real amount (returning or adding the difference; the level may go below zero), and
  a reservation not settled within ``lease_seconds`` is released (given back) by a later call.
- ``SLOTS`` (concurrency): at most ``limit`` request ids hold a slot; a slot is released by
  ``settle`` or when its lease expires.

Shared rules (``tests/contract/test_counter_backends.py``):

- ``acquire`` decides all counters of one call atomically: the call is *admitted* when no
  enforced counter would go over; then each counter that stays within its own limit records
  its hit. A refused call records nothing anywhere. A non-enforced (shadow) counter never
  refuses, and records only what an enforced one would have recorded, so it simulates the
  enforced limit exactly.
- Keys within one call are distinct (the caller deduplicates).
- Infrastructure failures raise ``StorageError``; a full counter is a result, never an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

LOG: Final = 1
BUDGET: Final = 2
SLOTS: Final = 3


@dataclass(frozen=True, slots=True)
class CounterRequest:
    key: str
    limit: int
    window_seconds: float  # LOG: the rolling window; BUDGET: refill period, 0 = calendar; SLOTS: unused
    enforced: bool = True
    hits: int = 1  # LOG: entries; BUDGET: the amount; SLOTS: always one slot
    kind: int = LOG
    reserve: bool = False  # BUDGET: record the amount as this request's reservation
    period: int = 0  # BUDGET with window 0: the calendar period's id
    period_end: float = 0.0  # ... and its end (unix seconds), for retry_after


@dataclass(frozen=True, slots=True)
class Settlement:
    """The end of a request that reserved on a BUDGET or SLOTS counter."""

    key: str
    kind: int
    limit: int
    window_seconds: float
    period: int = 0
    period_end: float = 0.0  # BUDGET with window 0: the calendar period's end (unix seconds)
    actual: int | None = None
    """BUDGET: the real amount (0 gives the whole reservation back); None keeps the reservation."""


@dataclass(frozen=True, slots=True)
class CounterState:
    over: bool
    """``count + hits > limit`` for this counter alone (whether or not it is enforced)."""
    remaining: int
    """Hits still available in the window after this call."""
    retry_after: float
    """When ``over``: seconds until ``hits`` entries could be recorded; else 0."""


@dataclass(frozen=True, slots=True)
class Acquisition:
    admitted: bool
    states: tuple[CounterState, ...]
    """One per requested counter, in request order."""


class CounterBackend(Protocol):
    async def acquire(
        self, counters: Sequence[CounterRequest], *, request_id: str = "", lease_seconds: float = 0.0
    ) -> Acquisition:
        """Check and record all ``counters`` atomically (see the module contract)."""

    async def settle(
        self, settlements: Sequence[Settlement], *, request_id: str, lease_seconds: float = 900.0
    ) -> None:
        """Settle ``request_id``'s reservations and free its slots (idempotent per counter)."""

    async def close(self) -> None:
        """Release connections; the backend is unusable afterwards."""


def counter_key(tenant_id: str, limit_id: str, key_id: str = "") -> str:
    """The storage-independent key of one counter, hash-tagged per tenant for Redis Cluster."""
    base = f"{{{tenant_id}}}:{limit_id}"
    return f"{base}:{key_id}" if key_id else base
