"""``tessera.admission.v1``: a batch of admissions from ext_authz decided, and ``Settle`` (the
meter's settlements, gRPC) answered.

The only module that turns admission protos into limiter calls. ``decide_batch`` answers one
``AdmitBatch`` of the admission stream (``admission_stream.py``) with one counter call.
``Settle`` answers UNAVAILABLE when the counters cannot be reached, so the caller keeps the
batch and tries again. Open admissions it cannot close stay open: the backstop's later bill for
one of them is a duplicate in the ledger (billed once), so a close is never retried.
"""

from __future__ import annotations

from typing import Any

import grpc
import structlog
from prometheus_client import Counter, Histogram

from ratelimit.backstop import Backstop
from ratelimit.limiter import Hit, RateLimiter, Usage, Verdict
from ratelimit.verdicts import limit_headers, refusal_code, retry_after_seconds
from tessera.admission.v1 import admission_pb2, admission_pb2_grpc
from tessera.errors import StorageError

log = structlog.get_logger("ratelimit.admission")

SERVICE_NAME: str = admission_pb2.DESCRIPTOR.services_by_name["AdmissionService"].full_name
BATCH_SIZE = Histogram(
    "tessera_ratelimit_admission_batch_size",
    "Admissions per batch from ext_authz",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
)
SETTLE_USAGES = Counter("tessera_ratelimit_settle_usages_total", "Usages received for settlement")


def hit_of(a: admission_pb2.Admission) -> Hit:
    return Hit(
        tenant_id=a.tenant_id,
        key_id=a.key_id,
        model=a.model,
        request_id=a.request_id,
        max_tokens=a.max_completion_tokens,
        body_bytes=a.body_bytes,
        forced=a.forced,
        node=a.node,
        keep_only=a.keep_only,
    )


def usage_of(u: admission_pb2.Usage) -> Usage:
    return Usage(
        tenant_id=u.tenant_id,
        key_id=u.key_id,
        model=u.model,
        request_id=u.request_id,
        prompt_tokens=u.prompt_tokens if u.HasField("prompt_tokens") else None,
        completion_tokens=u.completion_tokens if u.HasField("completion_tokens") else None,
        cached_tokens=u.cached_tokens,
        status=u.status,
    )


def verdict_message(verdict: Verdict) -> admission_pb2.Verdict:
    out = admission_pb2.Verdict(allowed=verdict.allowed, reserved=verdict.reserved, degraded=verdict.degraded)
    out.headers.extend(admission_pb2.Header(key=k, value=v) for k, v in limit_headers(verdict))
    if not verdict.allowed:
        out.code = refusal_code(verdict)
        out.retry_after_seconds = retry_after_seconds(verdict)
    return out


async def decide_batch(
    limiter: RateLimiter, batch: admission_pb2.AdmitBatch, backstop: Backstop | None = None
) -> admission_pb2.VerdictBatch:
    """One batch of ext_authz's admission stream (``admission_stream.py``): one counter call;
    the admitted requests are then kept open for the usage backstop."""
    BATCH_SIZE.observe(len(batch.admissions))
    hits = [hit_of(a) for a in batch.admissions]
    verdicts = await limiter.admit(hits)
    if backstop is not None:
        backstop.keep(hits, verdicts)
    reply = admission_pb2.VerdictBatch(batch=batch.batch)
    reply.verdicts.extend(verdict_message(v) for v in verdicts)
    return reply


class AdmissionServicer(admission_pb2_grpc.AdmissionServiceServicer):
    """``Settle`` (gRPC: batched and rare); admissions arrive on the frames stream instead."""

    def __init__(self, limiter: RateLimiter, backstop: Backstop | None = None) -> None:
        self._limiter = limiter
        self._backstop = backstop

    async def Settle(  # noqa: N802 - the gRPC method name
        self, request: admission_pb2.SettleBatch, context: Any
    ) -> admission_pb2.SettleReply:
        SETTLE_USAGES.inc(len(request.usages))
        if request.closed and self._backstop is not None:
            try:  # first: the usages below may still be retried; these ids are billed already
                await self._backstop.close(list(request.closed))
            except StorageError as exc:
                # kept open: the backstop's bill for one of them is a duplicate (billed once)
                log.warning("open_admissions_not_closed", error=str(exc), closed=len(request.closed))
        try:
            settled = await self._limiter.settle_many([usage_of(u) for u in request.usages])
        except StorageError as exc:
            log.warning("ratelimit_settle_failed", error=str(exc), usages=len(request.usages))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the counters cannot be reached; retry")
        return admission_pb2.SettleReply(settled=settled)
