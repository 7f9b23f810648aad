"""The counter storage interface: an exact rolling window (sliding log) per counter key.

Contract shared by every implementation (``tests/contract/test_counter_backends.py``):

- A counter admits at most ``limit`` hits in ANY interval of ``window_seconds``; an entry
  recorded at ``t`` counts while ``now < t + window_seconds``.
- ``acquire`` decides all counters of one call atomically: the call is *admitted* when no
  enforced counter would go over; then each counter that stays within its own limit records
  ``hits`` entries. A refused call records nothing anywhere. A non-enforced (shadow) counter
  never refuses, and records only what an enforced one would have recorded, so it simulates
  the enforced limit exactly (and stays bounded by ``limit`` entries).
- Keys within one call are distinct (the caller deduplicates).
- Infrastructure failures raise ``StorageError``; a full counter is a result, never an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CounterRequest:
    key: str
    limit: int
    window_seconds: float
    enforced: bool = True
    hits: int = 1


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
    async def acquire(self, counters: Sequence[CounterRequest]) -> Acquisition:
        """Check and record all ``counters`` atomically (see the module contract)."""

    async def close(self) -> None:
        """Release connections; the backend is unusable afterwards."""


def counter_key(tenant_id: str, limit_id: str, key_id: str = "") -> str:
    """The storage-independent key of one counter, hash-tagged per tenant for Redis Cluster."""
    base = f"{{{tenant_id}}}:{limit_id}"
    return f"{base}:{key_id}" if key_id else base
