"""Deliver the billing outbox to its sinks, retried with backoff until each sink answers 2xx.

Each sink has its own progress (one ``OutboxDelivery`` row per event and sink), so a sink that
is down holds back nobody else. Delivery is at least once: a receiver that answered 2xx to a
request it also timed out on sees the event twice, and deduplicates it by the event's stable id.
Events a sink does not take (its format does not carry the kind, or ``kinds`` excludes it) are
marked delivered to it without a request, so every event ends up delivered to every sink.

Replicas: each batch is claimed first (a lease on its delivery rows, won by one replica), so
with several control planes on one database each event still goes to each sink once; a replica
that dies mid-batch leaves it to the others when the lease ends (at least once, ids stable).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import structlog
from prometheus_client import Counter, Gauge
from sqlalchemy import Join, Select, and_, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.db.models import OutboxDelivery, OutboxEvent
from control_plane.db.repositories import as_utc, insert_stmt
from control_plane.settings import SinkSettings
from control_plane.usage.formats import Event, Request, requests_from_events, takes, webhook_key
from tessera.clock import SYSTEM_CLOCK, Clock
from tessera.errors import ConfigError

log = structlog.get_logger("control_plane.usage.delivery")

DEPTH = Gauge("tessera_outbox_depth", "Outbox events not yet delivered to the sink", ["sink"])
OLDEST_AGE = Gauge(
    "tessera_outbox_oldest_age_seconds", "Age of the oldest event not yet delivered to the sink", ["sink"]
)
DELIVERED = Counter("tessera_outbox_delivered_total", "Events a sink acknowledged", ["sink"])
FAILURES = Counter("tessera_outbox_delivery_failures_total", "Events whose delivery failed", ["sink"])

BASE_BACKOFF = 1.0
PARALLEL = 16  # requests in flight per deliverer
MAX_ERROR = 500  # OutboxDelivery.last_error holds 512


class OutboxDeliverer:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        sinks: Sequence[SinkSettings],
        *,
        max_backoff: float = 300.0,
        clock: Clock = SYSTEM_CLOCK,
        timeout: float = 10.0,
        lease: float = 60.0,
    ) -> None:
        for sink in sinks:
            if sink.format == "standard-webhooks":
                try:
                    webhook_key(sink.secret.get_secret_value())
                except ValueError as exc:
                    raise ConfigError(f"billing sink {sink.name!r}: {exc}") from None
        if len({s.name for s in sinks}) != len(sinks):
            raise ConfigError("billing sink names must be unique")
        self._sessionmaker = sessionmaker
        self._sinks = tuple(sinks)
        self._max_backoff = max_backoff
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._request_seconds = timeout
        self._lease = lease  # a claimed batch's, at least: each batch's is sized to its requests
        self._http: aiohttp.ClientSession | None = None
        # Bounds the requests in flight, so that no request's timeout runs while it waits for
        # a connection.
        self._slots = asyncio.Semaphore(PARALLEL)

    async def deliver_once(self) -> int:
        """One pass over every sink: send each sink its due events (up to ``batch_size``) and
        record the outcome. Returns how many events were settled: acknowledged by a sink, or
        marked delivered to a sink that does not take them."""
        settled = 0
        for sink in self._sinks:
            settled += await self._deliver(sink, self._clock.now())
            await self._observe(sink)
        return settled

    async def run_forever(self, interval: float) -> None:
        """Deliver until cancelled: straight on while there is work, else every ``interval``."""
        try:
            while True:
                try:
                    busy = await self.deliver_once() > 0
                except Exception:
                    log.exception("outbox_delivery_error")
                    busy = False
                if not busy:
                    await asyncio.sleep(interval)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _claim(self, sink: SinkSettings, now: float) -> list[tuple[OutboxEvent, int | None]]:
        """The sink's due events, each leased to this replica alone for ``lease`` seconds: its
        delivery row is set to be due again only then, by a conditional upsert that one replica
        wins (a replica that dies mid-delivery leaves the events to another after the lease).
        On PostgreSQL the selected events are locked ``SKIP LOCKED``, so concurrent replicas
        take different batches rather than race for one."""
        async with self._sessionmaker.begin() as session:
            due = _due(sink.name, _at(now), sink.batch_size).with_for_update(of=OutboxEvent, skip_locked=True)
            rows = (await session.execute(due)).all()
            if not rows:
                return []
            # long enough for the whole batch: one request per event at worst, 16 at a time
            lease = max(self._lease, -(-len(rows) // PARALLEL) * self._request_seconds + 30.0)
            stmt = insert_stmt(session, OutboxDelivery).values(
                [
                    {
                        "event_id": ev.id,
                        "sink": sink.name,
                        "attempts": n or 0,
                        "next_attempt_at": _at(now + lease),
                    }
                    for ev, n in rows
                ]
            )
            claimed = set(
                (
                    await session.execute(
                        stmt.on_conflict_do_update(
                            index_elements=["event_id", "sink"],
                            set_={"next_attempt_at": stmt.excluded.next_attempt_at},
                            where=and_(
                                OutboxDelivery.delivered_at.is_(None),
                                or_(
                                    OutboxDelivery.next_attempt_at.is_(None),
                                    OutboxDelivery.next_attempt_at <= _at(now),
                                ),
                            ),
                        ).returning(OutboxDelivery.event_id)
                    )
                ).scalars()
            )
        return [(ev, n) for ev, n in rows if ev.id in claimed]

    async def _deliver(self, sink: SinkSettings, now: float) -> int:
        rows = await self._claim(sink, now)
        if not rows:
            return 0
        attempts = {ev.id: n or 0 for ev, n in rows}
        events = [Event(ev.id, ev.kind, ev.tenant_id, ev.payload, ev.created_at) for ev, _ in rows]
        skipped = [e.id for e in events if not takes(sink, e.kind)]
        requests = requests_from_events(sink, [e for e in events if takes(sink, e.kind)], now)
        errors = await asyncio.gather(*(self._post(sink, r) for r in requests))

        done = [(i, attempts[i]) for i in skipped]
        failed: list[tuple[str, int, str]] = []
        for request, error in zip(requests, errors, strict=True):
            for i in request.event_ids:
                if error is None:
                    done.append((i, attempts[i] + 1))
                else:
                    failed.append((i, attempts[i] + 1, error))
        async with self._sessionmaker.begin() as session:
            await _upsert(session, [_delivered(sink.name, i, n, now) for i, n in done])
            await _upsert(session, [self._retry(sink.name, i, n, err, now) for i, n, err in failed])

        sent = len(done) - len(skipped)
        DELIVERED.labels(sink=sink.name).inc(sent)
        FAILURES.labels(sink=sink.name).inc(len(failed))
        if done:
            log.info("outbox_delivered", sink=sink.name, events=sent, skipped=len(skipped))
        for error in sorted({e for _, _, e in failed}):
            events_failed = [(i, n) for i, n, e in failed if e == error]
            log.warning(
                "outbox_delivery_failed",
                sink=sink.name,
                events=len(events_failed),
                attempts=max(n for _, n in events_failed),
                error=error,
            )
        return len(done)

    async def _post(self, sink: SinkSettings, request: Request) -> str | None:
        """Send one request; None on a 2xx, else a short error that never holds the secret or
        the body (the response body is not read: a receiver may echo what it was sent)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with (
                self._slots,
                # A redirect is a failure: following it would resend the credential elsewhere.
                self._http.post(
                    sink.url, data=request.body, headers=dict(request.headers), allow_redirects=False
                ) as resp,
            ):
                if 200 <= resp.status < 300:  # noqa: PLR2004
                    return None
                error = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return _redact(error, sink)[:MAX_ERROR]

    def _retry(self, sink: str, event_id: str, attempts: int, error: str, now: float) -> dict[str, Any]:
        # Exponential from BASE_BACKOFF, capped, then "equal jitter" (half fixed, half random)
        # so that events failed together are not all retried in the same instant.
        delay = min(self._max_backoff, BASE_BACKOFF * 2 ** min(attempts - 1, 30))
        delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
        return {
            "event_id": event_id,
            "sink": sink,
            "attempts": attempts,
            "next_attempt_at": _at(now + delay),
            "delivered_at": None,
            "last_error": error,
        }

    async def _observe(self, sink: SinkSettings) -> None:
        async with self._sessionmaker() as session:
            count, oldest = (await session.execute(_pending(sink.name))).one()
        DEPTH.labels(sink=sink.name).set(count)
        age = 0.0 if oldest is None else self._clock.now() - as_utc(oldest).timestamp()
        OLDEST_AGE.labels(sink=sink.name).set(max(age, 0.0))


def _joined(sink: str) -> Join:
    on = and_(OutboxDelivery.event_id == OutboxEvent.id, OutboxDelivery.sink == sink)
    return OutboxEvent.__table__.outerjoin(OutboxDelivery.__table__, on)


def _due(sink: str, now: datetime, limit: int) -> Select[tuple[OutboxEvent, int]]:
    """Events not yet delivered to ``sink`` whose retry time (if any) has come, oldest first,
    with the attempts made so far (None before the first)."""
    return (
        select(OutboxEvent, OutboxDelivery.attempts)
        .select_from(_joined(sink))
        .where(
            OutboxDelivery.delivered_at.is_(None),
            or_(OutboxDelivery.next_attempt_at.is_(None), OutboxDelivery.next_attempt_at <= now),
        )
        .order_by(OutboxEvent.seq)
        .limit(limit)
    )


def _pending(sink: str) -> Select[tuple[int, datetime]]:
    """How many events ``sink`` still lacks, and when the oldest was written (None if none)."""
    return (
        select(func.count(), func.min(OutboxEvent.created_at))
        .select_from(_joined(sink))
        .where(OutboxDelivery.delivered_at.is_(None))
    )


def _delivered(sink: str, event_id: str, attempts: int, now: float) -> dict[str, Any]:
    at = _at(now)
    return {
        "event_id": event_id,
        "sink": sink,
        "attempts": attempts,
        "next_attempt_at": at,
        "delivered_at": at,
        "last_error": None,
    }


async def _upsert(session: AsyncSession, rows: Iterable[dict[str, Any]]) -> None:
    """Insert or update deliveries by (event_id, sink); a row already delivered (say, by another
    replica) stays as it is."""
    values = list(rows)
    if not values:
        return
    stmt = insert_stmt(session, OutboxDelivery).values(values)
    update = {c: stmt.excluded[c] for c in ("attempts", "next_attempt_at", "delivered_at", "last_error")}
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=["event_id", "sink"], set_=update, where=OutboxDelivery.delivered_at.is_(None)
        )
    )


def _redact(text: str, sink: SinkSettings) -> str:
    secret = sink.secret.get_secret_value()
    for value in (secret, secret.removeprefix("whsec_")):
        if value:
            text = text.replace(value, "[redacted]")
    return text


def _at(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


async def prune_outbox(session: AsyncSession, sink_names: Sequence[str], before: datetime) -> int:
    """Delete events written before ``before`` that every sink has acknowledged (with no sink,
    every such event: there is no one to deliver to). Undelivered events are never pruned."""
    stmt = select(OutboxEvent.id).where(OutboxEvent.created_at < before).limit(10_000)
    for name in sink_names:
        stmt = stmt.where(
            select(OutboxDelivery.event_id)
            .where(
                OutboxDelivery.event_id == OutboxEvent.id,
                OutboxDelivery.sink == name,
                OutboxDelivery.delivered_at.is_not(None),
            )
            .exists()
        )
    ids = list((await session.scalars(stmt)).all())
    if ids:
        await session.execute(delete(OutboxDelivery).where(OutboxDelivery.event_id.in_(ids)))
        await session.execute(delete(OutboxEvent).where(OutboxEvent.id.in_(ids)))
    return len(ids)


async def prune_forever(
    sessionmaker: async_sessionmaker[AsyncSession],
    sink_names: Sequence[str],
    keep: timedelta,
    interval: float = 3600.0,
) -> None:
    while True:
        try:
            async with sessionmaker.begin() as s:
                pruned = await prune_outbox(s, sink_names, datetime.now(UTC) - keep)
            if pruned:
                log.info("outbox_pruned", events=pruned)
        except Exception:
            log.warning("outbox_prune_failed", exc_info=True)
        await asyncio.sleep(interval)
