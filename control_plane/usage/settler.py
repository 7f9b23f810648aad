"""Settlement from the usage record: the meter reports how admitted requests ended to the
ratelimit service (``tessera.admission.v1.AdmissionService/Settle``), off the request path.

Lines of requests ext_authz admitted with a reservation or slot (``reserved``) are queued as
the meter reads them and sent in batches as soon as the previous batch is answered. A batch
the service cannot take (down, or its counters unreachable) is kept and sent again every
``retry_seconds``: when the service comes back, the slots of streams that ended meanwhile are
free within one retry. Idempotent by request id on the service's side, so a line read twice
(the meter restarted before its checkpoint) settles once.

The same batches close the open admissions of requests whose ledger rows are committed
(``close``, after the meter's transaction): the usage backstop (``ratelimit/backstop.py``)
bills only what was never closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable
from typing import Any, Final

import grpc
import structlog
from prometheus_client import Counter, Gauge

from tessera.admission.v1 import admission_pb2, admission_pb2_grpc
from tessera.settings import IdentitySettings
from tessera.tls import PeerChannel
from tessera.usage_line import UsageLine

log = structlog.get_logger("control_plane.usage.settler")

SETTLED = Counter(
    "tessera_meter_settlements_total",
    "Usages and closed admissions sent to the ratelimit service",
    ["result"],
)
PENDING = Gauge("tessera_meter_settlements_pending", "Usages and closed admissions waiting to be sent")
MAX_PENDING: Final = 1_000_000  # beyond this the oldest go: their leases release them
MAX_BATCH: Final = 2000
MAX_REFUSALS: Final = 5  # a batch refused this often, for a reason other than an outage, is dropped
_TRANSIENT: Final = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def usage_of(line: UsageLine) -> admission_pb2.Usage:
    usage = admission_pb2.Usage(
        request_id=line.request_id,
        tenant_id=line.tenant_id or "",
        key_id=line.key_id or "",
        model=line.model or "",
        cached_tokens=line.cached_tokens,
        status=line.status,
    )
    if line.prompt_tokens is not None and line.completion_tokens is not None:
        usage.prompt_tokens = line.prompt_tokens
        usage.completion_tokens = line.completion_tokens
    return usage


class Settler:
    def __init__(
        self, url: str, *, retry_seconds: float = 1.0, identity: IdentitySettings | None = None
    ) -> None:
        self._url = url
        self._identity = identity  # mutual TLS to the ratelimit service when it names one
        self._retry = retry_seconds
        self._pending: deque[admission_pb2.Usage] = deque()
        self._closing: deque[str] = deque()  # request ids whose ledger rows are committed
        self._wake = asyncio.Event()
        self._emptied = asyncio.Event()  # set whenever the send loop has emptied the queue

    def offer(self, lines: Iterable[UsageLine]) -> None:
        """Queue the lines of reserved requests (never blocks the meter)."""
        self.offer_usages(usage_of(line) for line in lines if line.reserved and line.tenant_id)

    def offer_usages(self, usages: Iterable[admission_pb2.Usage]) -> None:
        for usage in usages:
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
                SETTLED.labels("dropped").inc()
            self._pending.append(usage)
        self._woken()

    def close(self, request_ids: Iterable[str]) -> None:
        """Queue the request ids whose ledger rows are committed (never blocks the meter)."""
        closing = self._closing
        closing.extend(request_ids)
        while len(closing) > MAX_PENDING:
            closing.popleft()
            SETTLED.labels("dropped").inc()
        self._woken()

    def _woken(self) -> None:
        PENDING.set(len(self._pending) + len(self._closing))
        if self._pending or self._closing:
            self._emptied.clear()
            self._wake.set()

    async def drained(self, timeout: float) -> bool:
        """Whether every queued usage was sent (or dropped), waiting ``timeout`` s at most (the
        send loop must be running)."""
        if self._pending or self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), timeout)
        return not (self._pending or self._closing)

    async def run(self) -> None:
        channel = PeerChannel(self._url, self._identity, "ratelimit")
        try:
            await self._send_forever(channel)
        finally:
            await channel.close()

    async def _send_forever(self, channel: PeerChannel) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            refused = 0
            while self._pending or self._closing:
                batch = [self._pending[i] for i in range(min(MAX_BATCH, len(self._pending)))]
                closed = [self._closing[i] for i in range(min(MAX_BATCH, len(self._closing)))]
                stub: Any = admission_pb2_grpc.AdmissionServiceStub(channel.get())
                try:
                    await stub.Settle(admission_pb2.SettleBatch(usages=batch, closed=closed), timeout=5.0)
                except grpc.aio.AioRpcError as exc:
                    log.warning("settle_failed", code=exc.code().name, pending=len(self._pending))
                    refused = 0 if exc.code() in _TRANSIENT else refused + 1
                    if refused < MAX_REFUSALS:
                        SETTLED.labels("retried").inc(len(batch))
                        await asyncio.sleep(self._retry)
                        continue
                    # not a passing outage (a version skew, a bug): the leases take over
                    log.error(  # noqa: TRY400
                        "settle_batch_dropped", usages=len(batch), closed=len(closed), code=exc.code().name
                    )
                    SETTLED.labels("dropped").inc(len(batch) + len(closed))
                    refused = 0
                for _ in batch:
                    self._pending.popleft()
                for _ in closed:
                    self._closing.popleft()
                SETTLED.labels("sent").inc(len(batch) + len(closed))
                PENDING.set(len(self._pending) + len(self._closing))
            self._emptied.set()
