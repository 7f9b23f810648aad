"""The meter and what follows from the ledger, on a real database (SQLite file and PostgreSQL,
schema from `alembic upgrade head`) and real files: exactly-once ingestion through crashes and
rotation, exact pricing with effective dates, estimates for cut streams, invoices with late
usage as adjustments, budget thresholds in the outbox.

Lines are written the way Envoy writes them (the keys of `tessera.usage_line.ENVOY_FORMAT`;
the e2e tests check the real Envoy's lines)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import (
    Invoice,
    Limit,
    MeterCheckpoint,
    Model,
    ModelPrice,
    OutboxEvent,
    Tenant,
    UsageRecord,
    UsageRollup,
)
from control_plane.usage import invoices, ledger
from control_plane.usage.ledger import picos_to_micros
from control_plane.usage.meter import Meter
from control_plane.usage.settler import Settler
from tessera import usage_line
from tessera.admission.v1 import admission_pb2, admission_pb2_grpc
from tests.conftest import free_port
from tests.usage_lines import line

pytestmark = pytest.mark.asyncio


async def _tenant(s: AsyncSession) -> str:
    tid = f"ten_{uuid.uuid4().hex[:12]}"
    s.add(Tenant(id=tid, name=f"t-{uuid.uuid4().hex[:10]}"))
    await s.flush()
    return tid


async def _model(s: AsyncSession, prices: list[tuple[str, int, int, int]], **kw: Any) -> str:
    """A model with prices (effective RFC 3339, input, output, cached micros per 1M tokens)."""
    name = f"m-{uuid.uuid4().hex[:10]}"
    m = Model(name=name, **kw)
    for effective, inp, out, cached in prices:
        m.prices.append(
            ModelPrice(
                effective_at=datetime.fromisoformat(effective),
                input_micros=inp,
                output_micros=out,
                cached_micros=cached,
                currency="USD",
            )
        )
    s.add(m)
    return name


async def _rows(sm, node: str) -> list[UsageRecord]:
    async with sm() as s:
        return list((await s.scalars(select(UsageRecord).where(UsageRecord.node == node))).all())


async def _closed(s: AsyncSession, now: datetime, tenant: str) -> list[Invoice]:
    """The invoices ``close_due`` closes for ``tenant`` (three days of grace)."""
    return [i for i in await invoices.close_due(s, now, timedelta(days=3)) if i.tenant_id == tenant]


def _write(path: Path, *lines: str, end: str = "\n") -> None:
    with path.open("a") as f:
        f.write("\n".join(lines) + end)


async def test_each_complete_line_counts_once_through_crashes_partial_lines_and_rotation(
    sessionmaker, tmp_path
):
    node = f"node-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "access.log"
    async with sessionmaker.begin() as s:
        tenant = await _tenant(s)
        model = await _model(s, [])
    ok = {
        "tenant_id": tenant,
        "key_id": "k1",
        "model": model,
        "prompt_tokens": "10",
        "completion_tokens": "5",
    }
    _write(log, *(line(f"r{i}", node=node, **ok) for i in range(5)))
    _write(log, line("r5", node=node, **ok)[:40], end="")  # Envoy is mid-write: a partial line
    meter = Meter(sessionmaker, log, "fallback")
    assert await meter.ingest_available() == 5
    assert sorted(r.request_id for r in await _rows(sessionmaker, node)) == [f"r{i}" for i in range(5)]
    _write(log, line("r5", node=node, **ok)[40:])  # the rest of it arrives
    assert await meter.ingest_available() == 1

    # A crash that lost the checkpoint (the worst case) re-reads everything: nothing doubles.
    async with sessionmaker.begin() as s:
        await s.execute(delete(MeterCheckpoint).where(MeterCheckpoint.node == "fallback"))
    assert await Meter(sessionmaker, log, "fallback").ingest_available() == 0
    assert len(await _rows(sessionmaker, node)) == 6

    # Rotation: the file is renamed and Envoy reopens a new one; both are read to their end.
    _write(log, line("r6", node=node, **ok))
    log.rename(tmp_path / "access.log.1")
    _write(tmp_path / "access.log.1", line("r7", node=node, **ok))  # a late flush to the old file
    _write(log, line("r8", node=node, **ok))
    assert await meter.ingest_available() == 3
    rows = await _rows(sessionmaker, node)
    assert sorted(r.request_id for r in rows) == [f"r{i}" for i in range(9)]
    assert {(r.prompt_tokens, r.completion_tokens, r.usage_estimated) for r in rows} == {(10, 5, False)}
    # Hourly and daily rollups count each request once.
    async with sessionmaker() as s:
        hour = await s.scalar(
            select(UsageRollup.requests).where(UsageRollup.tenant_id == tenant, UsageRollup.period == "hour")
        )
        day = await s.scalar(
            select(UsageRollup.prompt_tokens).where(
                UsageRollup.tenant_id == tenant, UsageRollup.period == "day"
            )
        )
    assert (hour, day) == (9, 90)


class RecordingSettle(admission_pb2_grpc.AdmissionServiceServicer):
    """The ratelimit service's Settle, as far as the meter can tell: it records what it is sent."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.closed: list[str] = []

    async def Settle(self, request: Any, _context: Any) -> Any:  # noqa: N802 - the gRPC method name
        self.request_ids.extend(u.request_id for u in request.usages)
        self.closed.extend(request.closed)
        return admission_pb2.SettleReply(settled=len(request.usages))


async def _until(condition: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_lines_read_for_settlement_reach_the_ledger_once_through_partial_lines_truncation_and_rotation(
    sessionmaker, tmp_path
):
    """The settle pass reads ahead of the ledger and hands it the lines it parsed: every
    reserved line is settled, every line reaches the ledger exactly once, whatever the
    interleaving of settle passes, ledger passes, partial writes, truncation and rotation."""
    recorder = RecordingSettle()
    server = grpc.aio.server()
    admission_pb2_grpc.add_AdmissionServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    settler = Settler(f"127.0.0.1:{port}")
    sending = asyncio.create_task(settler.run())
    node = f"node-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "access.log"
    async with sessionmaker.begin() as s:
        tenant = await _tenant(s)
    ok = {"tenant_id": tenant, "key_id": "k1", "prompt_tokens": "10", "completion_tokens": "5"}

    def reserved(i: int) -> str:
        return line(f"r{i}", node=node, reserved="1", **ok)

    try:
        meter = Meter(sessionmaker, log, "fallback", settler=settler)
        _write(log, reserved(0), line("plain1", node=node, **ok), reserved(1))
        _write(log, reserved(2)[:30], end="")  # mid-write
        assert await meter.settle_available() == 2
        await asyncio.sleep(0.2)
        assert recorder.closed == []  # settled ahead of the ledger, but not billed yet: still open
        _write(log, reserved(2)[30:])
        _write(log, "not json")
        assert await meter.settle_available() == 1
        _write(log, reserved(3))
        assert await meter.ingest_available() == 5  # two settle chunks joined, one read afresh
        assert await meter.settle_available() == 1  # r3, which the ledger read first
        assert await meter.ingest_available() == 0

        # Truncated in place and rewritten: the new lines count, nothing stale is reused.
        log.write_text("")
        _write(log, reserved(4), reserved(5))
        assert await meter.settle_available() == 2
        assert await meter.ingest_available() == 2

        # Rotated: the settle pass reads both files; the ledger takes each line once.
        _write(log, reserved(6))
        assert await meter.settle_available() == 1
        log.rename(tmp_path / "access.log.1")
        _write(tmp_path / "access.log.1", reserved(7))
        _write(log, reserved(8))
        assert await meter.settle_available() == 2
        assert await meter.ingest_available() == 3

        ids = sorted(r.request_id for r in await _rows(sessionmaker, node))
        assert ids == sorted(["plain1", *(f"r{i}" for i in range(9))])
        await _until(lambda: len(recorder.request_ids) >= 9 and len(set(recorder.closed)) >= 10)
        assert sorted(recorder.request_ids) == [f"r{i}" for i in range(9)]  # reserved lines only, once
        # every line committed closes its admission (the usage backstop bills only the others)
        assert set(recorder.closed) == {"plain1", *(f"r{i}" for i in range(9))}
    finally:
        sending.cancel()
        await server.stop(0)


async def test_lines_without_a_node_take_the_meters_and_bad_lines_are_skipped(sessionmaker, tmp_path):
    node = f"fallback-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "access.log"
    _write(log, "not json", json.dumps({"v": 2, "request_id": "x"}), line("ok1"), '{"v": 1}')
    assert await Meter(sessionmaker, log, node).ingest_available() == 1
    (row,) = await _rows(sessionmaker, node)
    assert (row.request_id, row.tenant_id, row.status) == ("ok1", None, 200)


async def test_prices_apply_by_request_time_exactly_and_invoices_use_each_period_price(
    sessionmaker, tmp_path
):
    node = f"node-{uuid.uuid4().hex[:8]}"
    async with sessionmaker.begin() as s:
        tenant = await _tenant(s)
        # 0.15 / 0.60 USD per 1M tokens until the 15th, then 0.20 / 0.80 (cached: 0.075 then 0.10).
        model = await _model(
            s,
            [
                ("2026-10-01T00:00:00+00:00", 150_000, 600_000, 75_000),
                ("2026-10-15T00:00:00+00:00", 200_000, 800_000, 100_000),
            ],
        )
        free = await _model(s, [])
    common = {"tenant_id": tenant, "key_id": "k", "model": model}
    before = [
        line(f"a{i}", node=node, start_time=f"2026-10-0{i + 1}T12:00:00.000000Z", prompt_tokens="1001",
             completion_tokens="333", cached_tokens="7", **common)
        for i in range(3)
    ]  # fmt: skip
    after = [
        line(f"b{i}", node=node, start_time=f"2026-10-2{i}T12:00:00.000000Z", prompt_tokens="999",
             completion_tokens="1", **common)
        for i in range(2)
    ]  # fmt: skip
    unpriced = line("c0", node=node, start_time="2026-10-21T00:00:00.000000Z", tenant_id=tenant, model=free,
                    prompt_tokens="50", completion_tokens="50")  # fmt: skip
    _write(tmp_path / "u.log", *before, *after, unpriced)
    await Meter(sessionmaker, tmp_path / "u.log", node).ingest_available()

    rows = {r.request_id: r for r in await _rows(sessionmaker, node)}
    # picos = tokens x micros per 1M: (1001 - 7) x 150000 + 7 x 75000 + 333 x 600000
    assert rows["a0"].cost_picos == 994 * 150_000 + 7 * 75_000 + 333 * 600_000
    assert rows["b0"].cost_picos == 999 * 200_000 + 1 * 800_000
    assert (rows["c0"].cost_picos, rows["c0"].unpriced, rows["c0"].currency) == (0, True, None)

    async with sessionmaker.begin() as s:
        closed = await invoices.close_due(s, datetime(2026, 11, 5, tzinfo=UTC), timedelta(days=3))
    (invoice,) = [i for i in closed if i.tenant_id == tenant]
    by_price = {(ln.model, ln.input_micros): ln for ln in invoice.lines}
    first, second = by_price[(model, 150_000)], by_price[(model, 200_000)]
    assert (first.requests, first.prompt_tokens, first.completion_tokens, first.cached_tokens) == (
        3,
        3003,
        999,
        21,
    )
    assert first.amount_micros == picos_to_micros(3 * (994 * 150_000 + 7 * 75_000 + 333 * 600_000))
    assert first.amount_micros == 1048  # 1,048,275,000 picos, rounded once per line
    assert second.amount_micros == picos_to_micros(2 * (999 * 200_000 + 800_000)) == 401
    assert by_price[(free, 0)].amount_micros == 0
    assert by_price[(free, 0)].price_from is None  # unpriced: recorded, billed 0, flagged
    assert invoice.total_micros == first.amount_micros + second.amount_micros
    assert invoice.currency == "USD"


async def test_late_usage_goes_on_the_next_invoice_and_closed_invoices_do_not_change(sessionmaker, tmp_path):
    node = f"node-{uuid.uuid4().hex[:8]}"
    async with sessionmaker.begin() as s:
        tenant = await _tenant(s)
        model = await _model(s, [("2026-01-01T00:00:00+00:00", 1_000_000, 2_000_000, 0)])
    common = {"tenant_id": tenant, "model": model, "prompt_tokens": "100", "completion_tokens": "10"}
    log = tmp_path / "u.log"
    _write(log, line("oct1", node=node, start_time="2026-10-10T00:00:00.000000Z", **common))
    meter = Meter(sessionmaker, log, node)
    await meter.ingest_available()
    async with sessionmaker() as s:  # mid-month: the open invoice so far, nothing stored
        draft = await invoices.preview(s, tenant, datetime(2026, 10, 20, tzinfo=UTC))
        assert (draft.status, draft.total_micros, [ln.kind for ln in draft.lines]) == ("open", 120, ["usage"])
        assert (
            await s.scalar(select(func.count()).select_from(Invoice).where(Invoice.tenant_id == tenant)) == 0
        )
    async with sessionmaker() as s:  # October in its grace period: on its own invoice, not this one
        early = await invoices.preview(s, tenant, datetime(2026, 11, 2, tzinfo=UTC))
        assert (early.total_micros, early.lines) == (0, [])
    async with sessionmaker.begin() as s:
        # Not due before the grace period has passed.
        assert not await _closed(s, datetime(2026, 11, 2, tzinfo=UTC), tenant)
        (october,) = await _closed(s, datetime(2026, 11, 4, tzinfo=UTC), tenant)
    assert october.total_micros == 100 + 20  # 100 x 1.0 + 10 x 2.0 micros

    # October usage that reaches the ledger after October closed, and November's own.
    _write(log, line("oct2", node=node, start_time="2026-10-31T23:59:59.000000Z", **common))
    _write(log, line("nov1", node=node, start_time="2026-11-20T00:00:00.000000Z", **common))
    await meter.ingest_available()
    async with sessionmaker() as s:  # October is closed now: its late row is November's adjustment
        draft = await invoices.preview(s, tenant, datetime(2026, 11, 25, tzinfo=UTC))
        assert sorted((ln.kind, ln.amount_micros) for ln in draft.lines) == [
            ("adjustment", 120),
            ("usage", 120),
        ]
    async with sessionmaker.begin() as s:
        (november,) = await _closed(s, datetime(2026, 12, 4, tzinfo=UTC), tenant)
    kinds = sorted((ln.kind, ln.usage_month.strftime("%Y-%m"), ln.amount_micros) for ln in november.lines)
    assert kinds == [("adjustment", "2026-10", 120), ("usage", "2026-11", 120)]
    assert november.total_micros == 240
    async with sessionmaker() as s:
        again = await s.get(Invoice, october.id)
        assert again is not None
        assert (again.total_micros, len(again.lines)) == (120, 1)  # the closed invoice is as it was
        claimed = await s.scalar(
            select(func.count())
            .select_from(UsageRecord)
            .where(UsageRecord.node == node, UsageRecord.invoice_id.is_(None))
        )
        assert claimed == 0
        # Closing again finds nothing new: each row is on exactly one invoice.
        assert not await _closed(s, datetime(2026, 12, 5, tzinfo=UTC), tenant)


async def test_a_cut_stream_is_charged_its_reservation_or_what_was_sent_and_flagged(sessionmaker, tmp_path):
    node = f"node-{uuid.uuid4().hex[:8]}"
    async with sessionmaker.begin() as s:
        tenant = await _tenant(s)
        model = await _model(s, [], default_max_tokens=300)
    sse = {"tenant_id": tenant, "model": model, "content_type": "text/event-stream", "bytes_received": 401}
    _write(
        tmp_path / "u.log",
        line("cut", node=node, max_tokens="50", chunks="7", **sse),  # reservation 50 > 7 sent
        line("long", node=node, max_tokens="50", chunks="80", **sse),  # more sent than reserved
        line("nomax", node=node, chunks="3", **sse),  # the model's default_max_tokens
        line("refused", node=node, status=429, **sse),  # refused: nothing used, nothing estimated
    )
    await Meter(sessionmaker, tmp_path / "u.log", node).ingest_available()
    got = {
        r.request_id: (r.prompt_tokens, r.completion_tokens, r.usage_estimated)
        for r in await _rows(sessionmaker, node)
    }
    assert got == {
        "cut": (101, 50, True),  # prompt: 401 body bytes / 4, rounded up
        "long": (101, 80, True),
        "nomax": (101, 300, True),
        "refused": (0, 0, False),
    }


async def test_spend_thresholds_become_outbox_events_once_per_period(sessionmaker, tmp_path):
    node = f"node-{uuid.uuid4().hex[:8]}"
    async with sessionmaker.begin() as s:
        tenant = await _tenant(s)
        model = await _model(s, [("2026-01-01T00:00:00+00:00", 1_000_000, 0, 0)])  # 1 micro per token
        s.add(
            Limit(
                id=f"lim_{uuid.uuid4().hex[:8]}", tenant_id=tenant, kind="spend", window_seconds=0, limit=1000
            )
        )
    log = tmp_path / "u.log"
    meter = Meter(sessionmaker, log, node)
    common = {"tenant_id": tenant, "model": model, "completion_tokens": "0"}

    async def events() -> list[OutboxEvent]:
        async with sessionmaker() as s:
            stmt = select(OutboxEvent).where(
                OutboxEvent.tenant_id == tenant, OutboxEvent.kind == "budget.threshold"
            )
            return list((await s.scalars(stmt)).all())

    _write(log, line("s1", node=node, prompt_tokens="700", **common))
    await meter.ingest_available()
    assert await events() == []
    _write(log, line("s2", node=node, prompt_tokens="150", **common))  # 850 of 1000: 80%
    await meter.ingest_available()
    assert [e.payload["threshold_percent"] for e in await events()] == [80]
    _write(
        log,
        line("s3", node=node, prompt_tokens="10", **common),
        line("s4", node=node, prompt_tokens="200", **common),
    )
    await meter.ingest_available()
    got = sorted((e.payload["threshold_percent"], e.id) for e in await events())
    assert [p for p, _ in got] == [80, 100]
    assert all(i.endswith(f":{p}") and "2026-11-01T00:00:00Z" in i for p, i in got)  # stable ids
    async with sessionmaker() as s:
        usage = await s.scalar(
            select(func.count())
            .select_from(OutboxEvent)
            .where(OutboxEvent.tenant_id == tenant, OutboxEvent.kind == "usage.recorded")
        )
    assert usage == 4  # and every request is a usage event


async def test_the_meter_rotates_a_full_log_once_read_and_removes_it_once_quiet(sessionmaker, tmp_path):
    reopened: list[str] = []
    failing = [True]  # the first /reopen_logs fails

    async def reopen(request: web.Request) -> web.Response:  # Envoy's admin endpoint, as a stand-in
        if failing.pop() if failing else False:
            return web.Response(status=500)
        reopened.append(request.path)
        return web.Response(text="OK\n")

    app = web.Application()
    app.router.add_post("/reopen_logs", reopen)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        node = f"node-{uuid.uuid4().hex[:8]}"
        log = tmp_path / "access.log"
        meter = Meter(sessionmaker, log, node, rotate_bytes=3000, envoy_admin=f"http://127.0.0.1:{port}")
        _write(log, *(line(f"q{i}", node=node) for i in range(2)))
        await meter.ingest_available()
        await meter.rotate()
        assert reopened == []  # under the size: left alone
        _write(log, *(line(f"q{i}", node=node) for i in range(2, 6)))
        await meter.rotate()
        assert reopened == []  # over the size, but not read yet: never rotated before it is
        await meter.ingest_available()
        await meter.rotate()  # Envoy did not reopen: the file is put back, Envoy writes on to it
        assert reopened == []
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("access.log")] == ["access.log"]
        await meter.rotate()
        assert reopened == ["/reopen_logs"]
        (rotated,) = [p for p in tmp_path.iterdir() if p.name.startswith("access.log.")]
        _write(rotated, line("q6", node=node))  # Envoy flushed to the old file before reopening
        _write(log, line("q7", node=node))  # ... and writes the new one after
        await meter.ingest_available()
        await meter.rotate()
        assert rotated.exists()  # read to its end, but written to a moment ago
        await meter.rotate(now=time.time() + 120)
        assert not rotated.exists()
        assert sorted(r.request_id for r in await _rows(sessionmaker, node)) == [f"q{i}" for i in range(8)]
    finally:
        await runner.cleanup()


async def test_retention_drops_old_billed_rows_and_keeps_rollups(sessionmaker, tmp_path):
    node = f"node-{uuid.uuid4().hex[:8]}"
    async with sessionmaker.begin() as s:
        tenant = await _tenant(s)
    old = {"tenant_id": tenant, "start_time": "2025-01-10T00:00:00.000000Z", "prompt_tokens": "3"}
    _write(
        tmp_path / "u.log",
        line("old", node=node, **old),
        line("anon", node=node, start_time=old["start_time"]),
    )
    _write(tmp_path / "u.log", line("new", node=node, tenant_id=tenant, prompt_tokens="4"))
    meter = Meter(sessionmaker, tmp_path / "u.log", node, retention=timedelta(days=30))
    await meter.ingest_available()
    await meter.expire()  # (retention is global: other tests' old rows may go too)
    # "anon" was billed to no one; "old" is not invoiced yet, so it stays.
    assert sorted(r.request_id for r in await _rows(sessionmaker, node)) == ["new", "old"]
    async with sessionmaker.begin() as s:
        await invoices.close_due(s, datetime(2025, 2, 5, tzinfo=UTC), timedelta(days=3))
    await meter.expire()  # invoiced now
    assert [r.request_id for r in await _rows(sessionmaker, node)] == ["new"]
    async with sessionmaker() as s:
        kept = await s.scalar(
            select(func.sum(UsageRollup.prompt_tokens)).where(
                UsageRollup.tenant_id == tenant, UsageRollup.period == "day"
            )
        )
    assert kept == 7


# --- the usage backstop: requests whose lines never came ------------------------------------


def _overdue(node: str, rid: str, tenant: str, model: str, **kw: Any) -> ledger.Overdue:
    fields: dict[str, Any] = {
        "admitted_at": datetime(2026, 11, 10, 10, 0, tzinfo=UTC),
        "key_id": "key_x",
        "body_bytes": 400,
        "max_completion_tokens": 50,
    }
    return ledger.Overdue(node=node, request_id=rid, tenant_id=tenant, model=model, **(fields | kw))


async def _usage(sm, tenant: str) -> tuple[int, int, int]:
    """(ledger rows, hourly rollup requests, usage events) of ``tenant``."""
    async with sm() as s:
        rows = await s.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.tenant_id == tenant)
        )
        hour = await s.scalar(
            select(func.coalesce(func.sum(UsageRollup.requests), 0)).where(
                UsageRollup.tenant_id == tenant, UsageRollup.period == "hour"
            )
        )
        events = await s.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.tenant_id == tenant)
        )
    return int(rows or 0), int(hour or 0), int(events or 0)


async def test_the_backstop_bills_a_lost_line_once_as_estimated_and_its_late_line_is_a_duplicate(
    sessionmaker, tmp_path
):
    node = f"node-{uuid.uuid4().hex[:8]}"
    async with sessionmaker.begin() as s:
        tenant = await _tenant(s)
        # $1 per 1M input tokens, $2 per 1M output tokens
        model = await _model(s, [("2026-11-01T00:00:00+00:00", 1_000_000, 2_000_000, 0)], max_max_tokens=30)
    lost = _overdue(node, "lost", tenant, model)
    embedding = _overdue(node, "emb", tenant, model, max_completion_tokens=0)  # not a generation
    now = datetime.now(UTC)
    async with sessionmaker.begin() as s:
        terms = await ledger.load_terms(s)
        # the same admission twice in one claim (sent again after a reconnect): one row
        assert sorted(await ledger.bill_overdue(s, [lost, embedding, lost], terms, now)) == ["emb", "lost"]
    async with sessionmaker.begin() as s:  # claimed again (a meter died before closing it): nothing new
        assert await ledger.bill_overdue(s, [lost], await ledger.load_terms(s), now) == []
    rows = {r.request_id: r for r in await _rows(sessionmaker, node)}
    row = rows["lost"]
    assert (row.backstop, row.usage_estimated, row.status) == (True, True, 0)
    # estimated as the meter estimates a cut stream: the body's bytes / BYTES_PER_TOKEN for the
    # prompt, max_tokens capped by the model's cap (30) for the completion
    prompt = 400 // usage_line.BYTES_PER_TOKEN
    assert (row.prompt_tokens, row.completion_tokens) == (prompt, 30)
    assert row.cost_picos == prompt * 1_000_000 + 30 * 2_000_000
    assert (rows["emb"].prompt_tokens, rows["emb"].completion_tokens) == (prompt, 0)
    assert await _usage(sessionmaker, tenant) == (2, 2, 2)

    # The lost line turns up after all (a meter that was down catches up): billed already.
    log = tmp_path / "access.log"
    reported = {"tenant_id": tenant, "model": model, "prompt_tokens": 7, "completion_tokens": 3}
    _write(log, line("lost", node=node, **reported), line("fresh", node=node, **reported))
    meter = Meter(sessionmaker, log, node)
    assert await meter.ingest_available() == 1  # "fresh" only
    assert await _usage(sessionmaker, tenant) == (3, 3, 3)
    rows = {r.request_id: r for r in await _rows(sessionmaker, node)}
    assert rows["lost"].backstop  # the first bill stands
    assert rows["lost"].prompt_tokens == prompt
    assert not rows["fresh"].backstop

    # A line that came first wins: its admission claimed later bills nothing.
    async with sessionmaker.begin() as s:
        came = _overdue(node, "fresh", tenant, model)
        assert await ledger.bill_overdue(s, [came], await ledger.load_terms(s), now) == []
    assert await _usage(sessionmaker, tenant) == (3, 3, 3)
    async with sessionmaker() as s:
        event = await s.scalar(select(OutboxEvent).where(OutboxEvent.id == f"usage:{node}:lost"))
    assert event is not None
    assert event.payload["backstop"] is True  # receivers see the flag


@pytest.mark.postgres
async def test_a_line_racing_its_backstop_bill_on_postgres_is_billed_once(postgres_url, tmp_path):
    """The backstop's INSERT is not committed when the meter ingests the same request's line: the
    meter's INSERT waits for it, then finds the row billed (no second row, no second rollup)."""
    from control_plane.db.engine import make_engine, make_sessionmaker  # noqa: PLC0415
    from control_plane.db.migrate import upgrade  # noqa: PLC0415

    await asyncio.to_thread(upgrade, postgres_url)  # alembic runs its own event loop
    engine = make_engine(postgres_url)
    sm = make_sessionmaker(engine)
    try:
        node = f"node-{uuid.uuid4().hex[:8]}"
        async with sm.begin() as s:
            tenant = await _tenant(s)
            model = await _model(s, [])
        ids = [f"race-{i}" for i in range(20)]
        log = tmp_path / "access.log"
        _write(log, *(line(rid, node=node, tenant_id=tenant, model=model) for rid in ids))
        meter = Meter(sm, log, node)
        async with sm.begin() as backstop:
            terms = await ledger.load_terms(backstop)
            overdue = [_overdue(node, rid, tenant, model) for rid in ids[:10]]
            assert len(await ledger.bill_overdue(backstop, overdue, terms, datetime.now(UTC))) == 10
            ingesting = asyncio.create_task(meter.ingest_available())
            await asyncio.sleep(0.5)
            assert not ingesting.done()  # its INSERT waits on the backstop's uncommitted rows
        assert await ingesting == 10  # committed: the other ten are the meter's
        assert await _usage(sm, tenant) == (20, 20, 20)
        rows = await _rows(sm, node)
        assert sorted(r.request_id for r in rows if r.backstop) == sorted(ids[:10])
    finally:
        await engine.dispose()
