"""ext_authz's side of ``tessera.admission.v1``: admissions batched onto one long-lived stream.

Every Check that needs counting calls ``Admitter.admit``; the admissions that arrive within one
event-loop tick leave together as one ``AdmitBatch`` frame and are answered by one
``VerdictBatch`` frame (the ratelimit service makes one counter call, one Redis pipeline, per
batch). No per-request RPC: Envoy's one callout is ext_authz's ``Check``. The stream is a plain
TCP connection carrying length-prefixed frames (``tessera/frames.py``), not a gRPC stream: at
the batch sizes of a few thousand requests a second a gRPC message cost more CPU, on each side,
than all the work it carried (docs/benchmarks.md).

Fail modes: an admission not answered within ``timeout_seconds`` (the service is slow, down, or
the stream is reconnecting) returns None and the caller applies each limit's own fail mode. A
request admitted that way (fail-open) is still counted: ``force`` sends it again marked
``forced`` (kept, bounded, until the stream is back). ``release`` gives back what a request
was admitted with when Envoy abandoned the Check before its answer arrived.

A request no limit applies to is not admitted (nothing to count, nobody waits) but ``keep``
sends it marked ``keep_only``: the ratelimit service keeps it open until the meter has billed
its usage line (the usage backstop, ``ratelimit/backstop.py``). Those go last in a batch, in a
queue of their own (bounded: an outage drops the oldest, never a fail-open count).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Final

import grpc
import structlog
from prometheus_client import Counter, Gauge

from tessera.admission.v1 import admission_pb2, admission_pb2_grpc
from tessera.errors import InvalidArgumentError
from tessera.frames import Frames, frame
from tessera.identity import spiffe_id
from tessera.settings import AdmissionSettings, IdentitySettings
from tessera.tls import PeerChannel, client_context, peer_spiffe_id

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
KEPT_DROPPED = Counter(
    "tessera_authz_keep_only_dropped_total",
    "Unlimited requests not kept open for the usage backstop (backlog full): their lines alone bill them",
)
FORCED_BACKLOG_MAX: Final = 100_000
KEPT_BACKLOG_MAX: Final = 100_000
MAX_BATCH: Final = 4096
LATE_BATCHES_MAX: Final = 4096  # expired batches whose late answers are still watched
ABANDONED_MAX: Final = 100_000  # requests refused fail-closed whose admission may still land
MISSES_BEFORE_RECONNECT: Final = 3  # batches in a row unanswered: the connection is presumed dead

Verdict = admission_pb2.Verdict


@dataclass(slots=True)
class _Batch:
    admissions: list[admission_pb2.Admission]  # those with a Check waiting first, then forced
    futures: list[asyncio.Future[Verdict | None]]


class Admitter:
    def __init__(self, settings: AdmissionSettings, identity: IdentitySettings | None = None) -> None:
        self._settings = settings
        self._identity = identity if identity is not None and identity.enabled else None
        # with identities: mutual TLS, and the peer must be the ratelimit service
        self._peer = spiffe_id("ratelimit", self._identity.namespace) if self._identity else None
        self._timeout = settings.timeout_seconds
        self._seq = itertools.count(1)
        self._waiting: list[tuple[admission_pb2.Admission, asyncio.Future[Verdict | None]]] = []
        self._forced: deque[admission_pb2.Admission] = deque()
        self._kept: deque[admission_pb2.Admission] = deque(maxlen=KEPT_BACKLOG_MAX)  # keep_only
        self._flush_soon = False  # a _flush is scheduled for this tick
        self._in_flight: dict[int, _Batch] = {}
        self._late: OrderedDict[int, _Batch] = OrderedDict()  # expired, still answerable
        self._abandoned: OrderedDict[str, admission_pb2.Admission] = OrderedDict()
        self._misses = 0
        self._transport: asyncio.Transport | None = None  # None: not connected
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: PeerChannel | None = None  # to the AdmissionService (Settle) while running

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def admit(self, admission: admission_pb2.Admission) -> asyncio.Future[Verdict | None]:
        """A future of the verdict; None when there is none in time (apply the fail modes)."""
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Verdict | None] = loop.create_future()
        if self._transport is None:
            UNANSWERED.inc()
            future.set_result(None)  # not connected: do not make the request wait for nothing
            return future
        self._waiting.append((admission, future))
        self._schedule(loop)
        return future

    def _schedule(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not self._flush_soon and self._transport is not None:
            self._flush_soon = True
            (loop or self._loop or asyncio.get_running_loop()).call_soon(self._flush)

    def keep(self, admission: admission_pb2.Admission) -> None:
        """Send a request no limit applies to, only to be kept open until billed (no answer)."""
        admission.keep_only = True
        if len(self._kept) == KEPT_BACKLOG_MAX:
            KEPT_DROPPED.inc()  # the deque drops the oldest
        self._kept.append(admission)
        self._schedule()

    def force(self, admission: admission_pb2.Admission) -> None:
        """Count a request admitted while the counters could not answer (fail-open)."""
        admission.forced = True
        if len(self._forced) >= FORCED_BACKLOG_MAX:
            FORCED_DROPPED.inc()
            return
        self._forced.append(admission)
        self._schedule()

    def abandon(self, admission: admission_pb2.Admission) -> None:
        """The request will not run (refused while its admission was unanswered, or its Check
        abandoned by Envoy): give back whatever its admission takes, now and if it lands late."""
        self._abandoned[admission.request_id] = admission
        if len(self._abandoned) > ABANDONED_MAX:
            self._abandoned.popitem(last=False)
        self._release(admission)

    def _release(self, admission: admission_pb2.Admission) -> None:
        usage = admission_pb2.Usage(
            request_id=admission.request_id,
            tenant_id=admission.tenant_id,
            key_id=admission.key_id,
            model=admission.model,
            prompt_tokens=0,
            completion_tokens=0,
        )
        (self._loop or asyncio.get_running_loop()).create_task(self.release(usage))

    async def release(self, usage: admission_pb2.Usage) -> None:
        """Give back what an abandoned request was admitted with (best effort: else its lease)."""
        if self._channel is None:
            return
        stub: Any = admission_pb2_grpc.AdmissionServiceStub(self._channel.get())
        try:
            # closed: it never runs, so the usage backstop must not bill it
            batch = admission_pb2.SettleBatch(usages=[usage], closed=[usage.request_id])
            await stub.Settle(batch, timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            log.warning("admission_release_failed", code=exc.code().name, request_id=usage.request_id)

    def _flush(self) -> None:
        self._flush_soon = False
        waiting, self._waiting = self._waiting, []
        transport = self._transport
        if transport is None:
            for _, future in waiting:
                if not future.done():
                    UNANSWERED.inc()
                    future.set_result(None)
            return
        while waiting or self._forced or self._kept:
            chunk, waiting = waiting[:MAX_BATCH], waiting[MAX_BATCH:]
            batch = admission_pb2.AdmitBatch(batch=next(self._seq))
            batch.admissions.extend(a for a, _ in chunk)
            for queue in (self._forced, self._kept):  # fail-open counts before keep-only records
                while queue and len(batch.admissions) < MAX_BATCH:
                    batch.admissions.append(queue.popleft())
            self._in_flight[batch.batch] = _Batch(list(batch.admissions), [f for _, f in chunk])
            transport.write(frame(batch.SerializeToString()))
            BATCHES.inc()
            # every batch, answered or not: an unanswered one marks the stream as dead
            asyncio.get_running_loop().call_later(self._timeout, self._expire, batch.batch)

    def _expire(self, batch: int) -> None:
        """The batch's time is up: its Checks decide by fail mode. Its answer is still watched
        for: a reservation granted late to a request that will not run is given back."""
        pending = self._in_flight.pop(batch, None)
        if pending is None:
            return
        for future in pending.futures:
            if not future.done():
                UNANSWERED.inc()
                future.set_result(None)
        self._late[batch] = pending
        if len(self._late) > LATE_BATCHES_MAX:
            self._late.popitem(last=False)
        self._misses += 1
        if self._misses >= MISSES_BEFORE_RECONNECT and self._transport is not None:
            log.warning("admission_stream_unresponsive", batches=self._misses, url=self._settings.stream_url)
            self._transport.abort()  # a half-open connection is never reported: start afresh

    def _answer(self, reply: admission_pb2.VerdictBatch) -> None:
        self._misses = 0
        pending = self._in_flight.pop(reply.batch, None)
        late = pending is None
        if pending is None:
            pending = self._late.pop(reply.batch, None)
            if pending is None:
                return
        if self._abandoned:
            self._release_abandoned(pending, reply)
        if late:
            return
        for future, verdict in zip(pending.futures, reply.verdicts, strict=False):
            if not future.done():
                future.set_result(verdict)
        for future in pending.futures[len(reply.verdicts) :]:
            if not future.done():
                future.set_result(None)

    def _release_abandoned(self, pending: _Batch, reply: admission_pb2.VerdictBatch) -> None:
        """A reservation granted to a request that will not run: give it back."""
        for admission, verdict in zip(pending.admissions, reply.verdicts, strict=False):
            if verdict.reserved and admission.request_id in self._abandoned:
                self._release(admission)

    def _disconnected(self) -> None:
        self._transport = None
        CONNECTED.set(0)
        self._misses = 0  # counted per connection: the next one gets its own
        in_flight, self._in_flight = self._in_flight, {}
        late, self._late = self._late, OrderedDict()  # their answers cannot arrive any more
        for pending in in_flight.values():
            for future in pending.futures:
                if not future.done():
                    UNANSWERED.inc()
                    future.set_result(None)
        # forced admissions not acknowledged (in flight, or in a batch that expired): sent again
        # on the next connection (a repeat that was counted already is recognised by its request id)
        unacknowledged = [p for _, p in sorted({**late, **in_flight}.items())]
        again = [a for p in unacknowledged for a in p.admissions[len(p.futures) :]]
        self._forced.extendleft(reversed([a for a in again if not a.keep_only][:FORCED_BACKLOG_MAX]))
        self._kept.extendleft(reversed([a for a in again if a.keep_only]))  # full: the newest go

    async def run(self) -> None:
        """Keep the stream open; reconnect with backoff capped at ``reconnect_max_seconds``."""
        self._loop = asyncio.get_running_loop()
        host, _, port = self._settings.stream_url.rpartition(":")
        self._channel = PeerChannel(self._settings.url, self._identity, "ratelimit")
        try:
            delay = 0.05
            while True:
                try:
                    if await self._follow(host, int(port)):
                        delay = 0.05
                except asyncio.CancelledError:
                    self._disconnected()
                    raise
                except OSError as exc:
                    log.warning("admission_stream_lost", error=str(exc), url=self._settings.stream_url)
                self._disconnected()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.reconnect_max_seconds)
        finally:
            channel, self._channel = self._channel, None
            await channel.close()

    async def _follow(self, host: str, port: int) -> bool:
        """One connection, until it closes; True if it answered anything."""
        assert self._loop is not None  # noqa: S101 - set by run
        closed: asyncio.Future[None] = self._loop.create_future()
        client = _Client(self, closed)
        # A fresh context per connection: a renewed certificate is used from the next one on.
        tls = client_context(self._identity) if self._identity is not None else None
        transport, _ = await self._loop.create_connection(lambda: client, host, port, ssl=tls)
        if tls is not None and (peer := peer_spiffe_id(transport)) != self._peer:
            transport.abort()
            log.error("admission_stream_wrong_peer", peer=peer, expected=self._peer)
            msg = f"the admission stream's peer is {peer}, not {self._peer}"
            raise OSError(msg)
        self._transport = transport
        CONNECTED.set(1)
        log.info("admission_stream_open", url=self._settings.stream_url)
        if self._forced or self._kept:
            self._flush()  # what was admitted meanwhile is counted (and kept open) first
        try:
            await closed
        finally:
            transport.close()
        return client.answered


class _Client(asyncio.Protocol):
    def __init__(self, admitter: Admitter, closed: asyncio.Future[None]) -> None:
        self._admitter = admitter
        self._closed = closed
        self._frames = Frames()
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._frames.feed(data)
        except InvalidArgumentError as exc:
            log.error("admission_stream_garbled", error=str(exc))  # noqa: TRY400 - no traceback
            self.connection_lost(None)
            return
        for raw in replies:
            self._admitter._answer(admission_pb2.VerdictBatch.FromString(raw))  # noqa: SLF001
            self.answered = True

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio.Protocol
        if not self._closed.done():
            self._closed.set_result(None)
