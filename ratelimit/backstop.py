"""The usage backstop, ratelimit's side: admitted requests kept open until billed.

Usage is billed from Envoy's log. A line can be lost before a meter reads it (Envoy SIGKILLed
before its 200 ms flush, or a pod's log volume deleted with an unread tail). So every admitted
request whose Envoy node is known is kept open (``backends/open_admissions.py``) from its
admission until the meter reports its ledger row committed. One still open
``after_seconds`` later is handed to a meter (``UsageBackstop/ClaimOverdue``), which bills it
as estimated and flagged (``control_plane/usage/backstop.py``).

Keeping a batch open is one store call after its verdicts are sent, off the request path; a
failure is counted and logged (those requests then rely on their lines alone).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import structlog
from prometheus_client import Counter

from ratelimit.backends.open_admissions import MAX_CLAIM, OpenAdmission, OpenAdmissions
from ratelimit.limiter import Hit, Verdict
from tessera.admission.v1 import admission_pb2, admission_pb2_grpc
from tessera.clock import SYSTEM_CLOCK, Clock
from tessera.errors import StorageError

log = structlog.get_logger("ratelimit.backstop")

SERVICE_NAME: str = admission_pb2.DESCRIPTOR.services_by_name["UsageBackstop"].full_name
KEPT = Counter("tessera_ratelimit_open_admissions_total", "Admitted requests kept open until billed")
KEEP_FAILED = Counter(
    "tessera_ratelimit_open_admission_errors_total",
    "Admitted requests that could not be kept open (the store failed): their lines alone bill them",
)
CLAIMED = Counter(
    "tessera_ratelimit_overdue_admissions_claimed_total", "Open admissions past due handed to a meter"
)


class Backstop:
    def __init__(
        self,
        store: OpenAdmissions,
        *,
        after_seconds: float = 3600.0,
        hold_seconds: float = 60.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._store = store
        self._after = after_seconds
        self._hold = hold_seconds
        self._clock = clock
        self._writes: set[asyncio.Task[None]] = set()

    def keep(self, hits: Sequence[Hit], verdicts: Sequence[Verdict]) -> None:
        """Keep the admitted ones open (in the background: the verdicts do not wait)."""
        now = self._clock.now()
        records = [
            OpenAdmission(
                h.request_id, h.node, h.tenant_id, h.key_id, h.model, h.body_bytes, h.max_tokens or 0, now
            )
            for h, v in zip(hits, verdicts, strict=True)
            if v.allowed and h.node and h.request_id
        ]
        if records:
            task = asyncio.get_running_loop().create_task(self._add(records, now + self._after))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _add(self, records: list[OpenAdmission], due: float) -> None:
        try:
            await self._store.add(records, due)
        except StorageError as exc:
            KEEP_FAILED.inc(len(records))
            log.warning("open_admissions_not_kept", error=str(exc), requests=len(records))
            return
        KEPT.inc(len(records))

    async def close(self, request_ids: Sequence[str]) -> None:
        """Raises StorageError (the caller logs it: an admission left open is billed once anyway)."""
        await self._store.close(request_ids)

    async def claim_overdue(self, limit: int) -> list[OpenAdmission]:
        claimed = await self._store.claim_overdue(self._clock.now(), self._hold, min(limit, MAX_CLAIM))
        CLAIMED.inc(len(claimed))
        return claimed

    async def flushed(self) -> None:
        """Wait for the writes under way (on shutdown, and in tests)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


def overdue_message(record: OpenAdmission) -> admission_pb2.OverdueAdmission:
    return admission_pb2.OverdueAdmission(
        admission=admission_pb2.Admission(
            request_id=record.request_id,
            node=record.node,
            tenant_id=record.tenant_id,
            key_id=record.key_id,
            model=record.model,
            body_bytes=record.body_bytes,
            max_completion_tokens=record.max_completion_tokens,
        ),
        admitted_at_ms=round(record.admitted_at * 1000),
    )


class UsageBackstopServicer(admission_pb2_grpc.UsageBackstopServicer):
    def __init__(self, backstop: Backstop) -> None:
        self._backstop = backstop

    async def ClaimOverdue(  # noqa: N802 - the gRPC method name
        self, request: admission_pb2.ClaimOverdueRequest, context: Any
    ) -> admission_pb2.OverdueAdmissions:
        try:
            claimed = await self._backstop.claim_overdue(request.max or MAX_CLAIM)
        except StorageError as exc:
            log.warning("overdue_claim_failed", error=str(exc))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the open admissions cannot be reached; retry")
        return admission_pb2.OverdueAdmissions(admissions=[overdue_message(r) for r in claimed])
