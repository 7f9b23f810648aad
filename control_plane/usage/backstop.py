"""The usage backstop, the meter's side: bill admitted requests whose usage lines never came.

The ratelimit service keeps every admitted request open until a meter has committed its ledger
row (``ratelimit/backstop.py``). One still open past ``backstop_after_seconds`` lost its line
(Envoy SIGKILLed before its flush, or the log volume deleted unread). Any meter claims such
requests (``UsageBackstop/ClaimOverdue``), bills each as estimated and flagged (``backstop``:
what was reserved for it, never free; ``ledger.bill_overdue``), then settles its reservation
(its usage is unknown: the reservation stands, its slots free) and closes it.

Exactly once: the ledger's (node, request id) key. A line that did arrive first wins; one
arriving later is a duplicate; a claim repeated after a meter died mid-way bills nothing new.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.usage import ledger
from control_plane.usage.settler import Settler
from tessera.admission.v1 import admission_pb2, admission_pb2_grpc
from tessera.settings import IdentitySettings
from tessera.tls import PeerChannel

log = structlog.get_logger("control_plane.usage.backstop")

BILLED = Counter(
    "tessera_meter_backstop_billed_total",
    "Requests billed as estimated by the usage backstop (admitted; their usage line never came)",
)
CLAIMS = Counter("tessera_meter_backstop_claims_total", "ClaimOverdue calls", ["result"])
CLAIM_MAX = 500


def overdue_of(message: admission_pb2.OverdueAdmission) -> ledger.Overdue:
    a = message.admission
    return ledger.Overdue(
        node=a.node,
        request_id=a.request_id,
        admitted_at=datetime.fromtimestamp(message.admitted_at_ms / 1000, UTC),
        tenant_id=a.tenant_id,
        key_id=a.key_id,
        model=a.model,
        body_bytes=a.body_bytes,
        max_completion_tokens=a.max_completion_tokens,
    )


class UsageBackstop:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        url: str,
        settler: Settler,
        *,
        identity: IdentitySettings | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._settler = settler
        self._channel = PeerChannel(url, identity, "ratelimit")

    async def bill_overdue(self) -> int:
        """One claim, billed; how many admissions it held (0: none overdue)."""
        stub: Any = admission_pb2_grpc.UsageBackstopStub(self._channel.get())
        try:
            reply = await stub.ClaimOverdue(admission_pb2.ClaimOverdueRequest(max=CLAIM_MAX), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            CLAIMS.labels("failed").inc()
            log.warning("backstop_claim_failed", code=exc.code().name)
            return 0
        CLAIMS.labels("ok").inc()
        overdue = [overdue_of(m) for m in reply.admissions]
        if not overdue:
            return 0
        async with self._sessionmaker.begin() as s:
            billed = await ledger.bill_overdue(s, overdue, await ledger.load_terms(s), datetime.now(UTC))
        BILLED.inc(len(billed))
        if billed:
            log.warning(
                "usage_billed_by_backstop",
                requests=len(billed),
                tenants=sorted({o.tenant_id for o in overdue}),
                nodes=sorted({o.node for o in overdue}),
            )
        self._settler.offer_usages(
            admission_pb2.Usage(
                request_id=o.request_id, tenant_id=o.tenant_id, key_id=o.key_id, model=o.model, status=0
            )
            for o in overdue
        )
        self._settler.close(o.request_id for o in overdue)
        return len(overdue)

    async def run_forever(self, interval: float) -> None:
        try:
            while True:
                try:
                    full = await self.bill_overdue() >= CLAIM_MAX
                except Exception:
                    log.exception("backstop_pass_failed")  # the database may be down: next pass
                    full = False
                if not full:
                    await asyncio.sleep(interval)
        finally:
            await self._channel.close()
