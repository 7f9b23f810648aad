"""The counter storage interface. Three kinds of counter share one atomic ``acquire``:

- ``LOG`` (request limits): a rolling window that never admits more than ``limit`` hits in
  ANY interval of ``window_seconds``. Up to ``EXACT_LOG_MAX`` it is exact (a sliding log: a
  hit recorded at ``t`` counts while ``now < t + window_seconds``). Above it, the window is
  split into ``LOG_BUCKETS`` buckets of ``window_seconds / LOG_BUCKETS`` and a hit counts
  from its bucket's end, so for at least ``window_seconds`` and at most one bucket longer: it
  may refuse up to one bucket early, never admit late. A key holds at most
  ``EXACT_LOG_MAX + 1`` entries (exact) or ``LOG_BUCKETS + 1`` (bucketed) whatever the
  traffic, plus for one window those recorded before its limit or window changed (the count
  carries over: a hit keeps its time, or its bucket's end). An exact log keeps only its
  newest ``EXACT_LOG_MAX + 1`` hits (more arrive only by ``force``): exact for every limit up
  to ``EXACT_LOG_MAX``, but a limit raised above it sees at most that many of them.
- ``BUDGET`` (tokens, spend; requests per calendar month): a level that starts at ``limit``.
  With ``window_seconds > 0`` it is a token bucket refilled at ``limit / window_seconds`` per
  second up to ``limit``; with ``window_seconds == 0`` it is a calendar budget: it is full
  again whenever ``period`` changes (the caller passes the current month's id). A hit of
  ``hits`` fits while the level is at least ``hits``, and lowers it. With ``reserve`` the
  amount is also recorded as the reservation of ``request_id``. ``settle`` replaces a
  reservation that is still held by the real amount (returning or adding the difference; the
  level may go below zero) and is otherwise a no-op: settling twice, settling a request that
  never reserved (or was refused), or settling after the lease ended it changes nothing.
  A reservation not settled within ``lease_seconds`` is ended by a later call and stays
  charged as reserved (an upper bound of its request's cost: never free).
- ``SLOTS`` (concurrency): at most ``limit`` request ids hold a slot; a slot is freed by
  ``settle`` (a no-op when not held) or when its lease expires.

Leases are released in the order they were taken, by later calls, at O(1) amortised cost
per call: the lease is one setting of the caller, so taking order is expiry order. If the
lease changes between calls, a lease ends no earlier than its expiry, but the in-process
backend may release it only once the leases taken before it have ended too.

Shared rules (``tests/contract/test_counter_backends.py``):

- ``acquire`` decides all counters of one call atomically: the call is *admitted* when no
  enforced counter would go over; then each counter that stays within its own limit records
  its hit. A refused call records nothing anywhere. A non-enforced (shadow) counter never
  refuses, and records only what an enforced one would have recorded, so it simulates the
  enforced limit exactly.
- ``force`` (an admission already let through, e.g. by ext_authz failing open) admits the
  call whatever the counters say, and every counter records its hit even over its limit (a
  budget's level goes below zero, slots and logs above the limit). The states still report
  ``over`` and ``retry_after`` as an unforced call would have seen them.
- ``acquire_many`` / ``settle_many`` run a batch of calls in order, each one atomic on its
  own, with one round trip to shared storage; a call the storage fails gets its own
  ``StorageError`` and the others still run. The single-call methods are a batch of one.
- Keys within one call are distinct (the caller deduplicates).
- Infrastructure failures raise ``StorageError`` (or return it, in the batch methods); a full
  counter is a result, never an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from tessera.errors import StorageError

LOG: Final = 1
BUDGET: Final = 2
SLOTS: Final = 3

EXACT_LOG_MAX: Final = 128
"""The largest LOG limit kept as an exact sliding log; above it the log is bucketed."""
LOG_BUCKETS: Final = 60
"""Buckets per window of a bucketed LOG counter."""


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


@dataclass(frozen=True, slots=True)
class AcquireCall:
    """One ``acquire`` of a batch."""

    counters: Sequence[CounterRequest]
    request_id: str = ""
    force: bool = False


@dataclass(frozen=True, slots=True)
class SettleCall:
    """One ``settle`` of a batch."""

    settlements: Sequence[Settlement]
    request_id: str


class CounterBackend(Protocol):
    async def acquire(
        self,
        counters: Sequence[CounterRequest],
        *,
        request_id: str = "",
        lease_seconds: float = 0.0,
        force: bool = False,
    ) -> Acquisition:
        """Check and record all ``counters`` atomically (see the module contract)."""

    async def acquire_many(
        self, calls: Sequence[AcquireCall], *, lease_seconds: float
    ) -> list[Acquisition | StorageError]:
        """One result per call, in order; a failure of the whole batch fills every slot."""

    async def settle(
        self, settlements: Sequence[Settlement], *, request_id: str, lease_seconds: float = 900.0
    ) -> None:
        """Settle ``request_id``'s held reservations and free its slots (a no-op when none)."""

    async def settle_many(self, calls: Sequence[SettleCall], *, lease_seconds: float) -> StorageError | None:
        """Settle every call, in order; the first failure, if any."""

    async def close(self) -> None:
        """Release connections; the backend is unusable afterwards."""


def counter_key(tenant_id: str, limit_id: str, key_id: str = "") -> str:
    """The storage-independent key of one counter, hash-tagged per tenant for Redis Cluster."""
    base = f"{{{tenant_id}}}:{limit_id}"
    return f"{base}:{key_id}" if key_id else base
