"""ext_authz's side of ``tessera.admission.v1``: admissions batched onto one long-lived stream.

Every Check that needs counting calls ``Admitter.admit``; the admissions that arrive within one
event-loop tick leave together as one ``AdmitBatch`` and are answered by one ``VerdictBatch``
(the ratelimit service makes one counter call, one Redis pipeline, per batch). No per-request
RPC: Envoy's one callout is ext_authz's ``Check``.

Fail modes: an admission not answered within ``timeout_seconds`` (the service is slow, down, or
the stream is reconnecting) returns None and the caller applies each limit's own fail mode. A
request admitted that way (fail-open) is still counted: ``force`` sends it again marked
``forced`` (kept, bounded, until the stream is back). ``release`` gives back what a request
was admitted with when Envoy abandoned the Check before its answer arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from typing import Any, Final

import grpc
import structlog
from prometheus_client import Counter, Gauge

from tessera.admission.v1 import admission_pb2, admission_pb2_grpc
from tessera.settings import AdmissionSettings

log = structlog.get_logger("ext_authz.admissions")

CONNECTED = Gauge("tessera_authz_admission_connected", "1 while the admission stream is open")
BATCHES = Counter("tessera_authz_admission_batches_total", "Admission batches sent")
UNANSWERED = Counter(
    "tessera_authz_admissions_unanswered_total",
    "Admissions not answered in time (the limits' fail modes decided)",
)
FORCED_DROPPED = Counter(
    "tessera_authz_forced_dropped_total", "Fail-open admissions that could not be counted (backlog full)"
)
FORCED_BACKLOG_MAX: Final = 100_000
MAX_BATCH: Final = 4096

Verdict = admission_pb2.Verdict


class Admitter:
    def __init__(self, settings: AdmissionSettings) -> None:
        self._settings = settings
        self._timeout = settings.timeout_seconds
        self._seq = itertools.count(1)
        self._waiting: list[tuple[admission_pb2.Admission, asyncio.Future[Verdict | None]]] = []
        self._forced: deque[admission_pb2.Admission] = deque()
        self._in_flight: dict[int, list[asyncio.Future[Verdict | None]]] = {}
        self._outbox: asyncio.Queue[admission_pb2.AdmitBatch] | None = None  # None: not connected
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stub: Any = None  # the AdmissionService stub while the channel is open

    @property
    def connected(self) -> bool:
        return self._outbox is not None

    def admit(self, admission: admission_pb2.Admission) -> asyncio.Future[Verdict | None]:
        """A future of the verdict; None when there is none in time (apply the fail modes)."""
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Verdict | None] = loop.create_future()
        if self._outbox is None:
            UNANSWERED.inc()
            future.set_result(None)  # not connected: do not make the request wait for nothing
            return future
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((admission, future))
        return future

    def force(self, admission: admission_pb2.Admission) -> None:
        """Count a request admitted while the counters could not answer (fail-open)."""
        admission.forced = True
        if len(self._forced) >= FORCED_BACKLOG_MAX:
            FORCED_DROPPED.inc()
            return
        self._forced.append(admission)
        if self._outbox is not None and not self._waiting:
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush)

    async def release(self, usage: admission_pb2.Usage) -> None:
        """Give back what an abandoned request was admitted with (best effort: else its lease)."""
        stub = self._stub
        if stub is None:
            return
        try:
            await stub.Settle(admission_pb2.SettleBatch(usages=[usage]), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            log.warning("admission_release_failed", code=exc.code().name, request_id=usage.request_id)

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        outbox = self._outbox
        if outbox is None:
            for _, future in waiting:
                if not future.done():
                    UNANSWERED.inc()
                    future.set_result(None)
            return
        while waiting or self._forced:
            chunk, waiting = waiting[:MAX_BATCH], waiting[MAX_BATCH:]
            batch = admission_pb2.AdmitBatch(batch=next(self._seq))
            batch.admissions.extend(a for a, _ in chunk)
            while self._forced and len(batch.admissions) < MAX_BATCH:
                batch.admissions.append(self._forced.popleft())
            self._in_flight[batch.batch] = [f for _, f in chunk]
            outbox.put_nowait(batch)
            BATCHES.inc()
            if chunk:
                asyncio.get_running_loop().call_later(self._timeout, self._expire, batch.batch)

    def _expire(self, batch: int) -> None:
        """The batch's time is up: its Checks decide by fail mode (a late answer is dropped)."""
        futures = self._in_flight.pop(batch, None)
        for future in futures or ():
            if not future.done():
                UNANSWERED.inc()
                future.set_result(None)

    def _answer(self, reply: admission_pb2.VerdictBatch) -> None:
        futures = self._in_flight.pop(reply.batch, None)
        if futures is None:
            return  # expired already, or only forced admissions
        for future, verdict in zip(futures, reply.verdicts, strict=False):
            if not future.done():
                future.set_result(verdict)
        for future in futures[len(reply.verdicts) :]:
            if not future.done():
                future.set_result(None)

    def _disconnected(self) -> None:
        self._outbox = None
        CONNECTED.set(0)
        in_flight, self._in_flight = self._in_flight, {}
        for futures in in_flight.values():
            for future in futures:
                if not future.done():
                    UNANSWERED.inc()
                    future.set_result(None)

    async def run(self) -> None:
        """Keep the stream open; reconnect with backoff capped at ``reconnect_max_seconds``."""
        self._loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            try:
                async with grpc.aio.insecure_channel(self._settings.url) as channel:
                    self._stub = admission_pb2_grpc.AdmissionServiceStub(channel)
                    if await self._follow(self._stub):
                        delay = 0.05
            except asyncio.CancelledError:
                self._disconnected()
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("admission_stream_lost", code=exc.code().name, url=self._settings.url)
            except Exception:
                log.exception("admission_stream_error")
            finally:
                self._stub = None
            self._disconnected()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._settings.reconnect_max_seconds)

    async def _follow(self, stub: Any) -> bool:
        outbox: asyncio.Queue[admission_pb2.AdmitBatch] = asyncio.Queue()
        call = stub.Admit()
        await call.wait_for_connection()

        async def send() -> None:
            while True:
                await call.write(await outbox.get())

        sender = asyncio.create_task(send(), name="ext_authz-admission-sender")
        self._outbox = outbox
        CONNECTED.set(1)
        log.info("admission_stream_open", url=self._settings.url)
        if self._forced:
            self._flush()  # what was admitted fail-open meanwhile is counted first
        answered = False
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    return answered
                self._answer(reply)
                answered = True
        finally:
            self._outbox = None
            sender.cancel()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await sender
