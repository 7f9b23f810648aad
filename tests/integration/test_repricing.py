"""A price added with a ``from`` earlier than usage already metered (issue 17): through the real
control plane's SetModelPrice on a real SQLite file and the real PostgreSQL server, with rows the
real meter wrote from a usage log. The rows it is in effect for are re-priced in its transaction,
exact to the picounit, unless a closed invoice holds them; rollups (`tessera usage`), the open
invoice, the billing outbox and the audit log follow."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from control_plane.app import App, build_app
from control_plane.db.models import (
    AuditEvent,
    Invoice,
    Limit,
    ModelPrice,
    OutboxEvent,
    UsageRecord,
    UsageRollup,
)
from control_plane.db.repositories import as_utc
from control_plane.usage import invoices, ledger
from control_plane.usage.ledger import bucket, picos_to_micros
from control_plane.usage.meter import Meter
from tessera import usage_line
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.integration.conftest import ADMIN_TOKEN, control_plane_settings

pytestmark = pytest.mark.asyncio

TOKEN = ADMIN_TOKEN
AUTH = (("authorization", f"Bearer {TOKEN}"),)
# micros per 1M tokens: (input, output, cached)
P0 = (100_000, 300_000, 50_000)  # from 2026-09-01
LATER = (400_000, 900_000, 200_000)  # from 2026-10-25
NEW = (123_457, 654_321, 11_111)  # from 2026-09-15, added last


@pytest.fixture
async def admin(db_url, tmp_path) -> AsyncIterator[Any]:
    """The admin API of the real control plane on the test's database."""
    pepper = tmp_path / "pepper"
    pepper.write_text(secrets.token_hex(32))
    app: App = await build_app(control_plane_settings(db_url, pepper))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as ch:
        yield (
            admin_pb2_grpc.ModelServiceStub(ch),
            admin_pb2_grpc.TenantServiceStub(ch),
            admin_pb2_grpc.UsageServiceStub(ch),
        )
    await app.stop(0)


def _line(request_id: str, node: str, start: str, tenant: str | None, model: str, **fields: Any) -> str:
    """A usage line as Envoy writes it (tests/integration/test_metering.py has the long story)."""
    doc: dict[str, Any] = dict.fromkeys(usage_line.ENVOY_FORMAT)
    doc |= {"v": 1, "node": node, "request_id": request_id, "start_time": start, "method": "POST",
            "path": "/v1/chat/completions", "status": 200, "duration_ms": 12, "bytes_received": 400,
            "bytes_sent": 900, "content_type": "application/json", "tenant_id": tenant, "key_id": "k1",
            "model": model, "prompt_tokens": "100", "completion_tokens": "10"}  # fmt: skip
    return json.dumps(doc | fields)


async def _meter(sessionmaker, path: Path, node: str, *lines: str) -> None:
    with path.open("a") as f:
        f.write("".join(f"{ln}\n" for ln in lines))
    await Meter(sessionmaker, path, node).ingest_available()


async def _setup(admin, prices: list[tuple[str, tuple[int, int, int]]]) -> tuple[str, str, str]:
    """A model with ``prices`` and two tenants: (model, tenant 1 id, tenant 2 id)."""
    models, tenants, _ = admin
    model = f"m-{uuid.uuid4().hex[:8]}"
    backend = admin_pb2.Backend(url="http://127.0.0.1:9")
    await models.AddModel(admin_pb2.AddModelRequest(name=model, backend=backend), metadata=AUTH)
    for effective, price in prices:
        await _price(admin, model, effective, price)
    ids = []
    for _ in range(2):
        request = admin_pb2.CreateTenantRequest(name=f"t-{uuid.uuid4().hex[:10]}")
        ids.append((await tenants.CreateTenant(request, metadata=AUTH)).tenant.id)
    return model, ids[0], ids[1]


async def _price(admin, model: str, effective: str, price: tuple[int, int, int]) -> None:
    inp, out, cached = price
    request = admin_pb2.SetModelPriceRequest(
        name=model, input_micros=inp, output_micros=out, cached_micros=cached, effective_time=effective
    )
    await admin[0].SetModelPrice(request, metadata=AUTH)


def _picos(price: tuple[int, int, int], prompt: int, completion: int, cached: int = 0) -> int:
    inp, out, cached_price = price
    return (prompt - cached) * inp + cached * cached_price + completion * out


async def _rows(sessionmaker, node: str) -> dict[str, UsageRecord]:
    async with sessionmaker() as s:
        rows = (await s.scalars(select(UsageRecord).where(UsageRecord.node == node))).all()
    return {r.request_id: r for r in rows}


async def _price_ids(sessionmaker) -> dict[str, int]:
    """Price ids by effective day (YYYY-MM-DD)."""
    async with sessionmaker() as s:
        prices = (await s.scalars(select(ModelPrice))).all()
    return {as_utc(p.effective_at).strftime("%Y-%m-%d"): p.id for p in prices}


async def _rollups_match_the_ledger(sessionmaker, model: str) -> None:
    """Every hourly and daily rollup of ``model`` is the sum of its ledger rows, and no rollup is
    left without a row."""
    expected: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * 6)
    async with sessionmaker() as s:
        for r in (await s.scalars(select(UsageRecord).where(UsageRecord.model == model))).all():
            if r.tenant_id is None:
                continue
            when = as_utc(r.time)
            for period in ("hour", "day"):
                acc = expected[(period, bucket(period, when), r.tenant_id, r.key_id or "", r.currency or "")]
                values = (
                    1,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cached_tokens,
                    r.cost_picos,
                    int(r.unpriced),
                )
                for i, v in enumerate(values):
                    acc[i] += v
        rollups = (await s.scalars(select(UsageRollup).where(UsageRollup.model == model))).all()
    actual = {
        (u.period, as_utc(u.bucket), u.tenant_id, u.key_id, u.currency): [
            u.requests, u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.cost_picos,
            u.unpriced_requests,
        ]
        for u in rollups
    }  # fmt: skip
    assert actual == dict(expected)


async def test_a_backdated_price_reprices_open_usage_exactly_where_it_is_in_effect(
    admin, sessionmaker, tmp_path
):
    model, t1, t2 = await _setup(admin, [("2026-09-01", P0), ("2026-10-25", LATER)])
    node, log = f"n-{uuid.uuid4().hex[:8]}", tmp_path / "u.log"
    async with sessionmaker.begin() as s:
        await s.execute(  # t2 spends 1 USD a month at most: the new price takes it past 100%
            Limit.__table__.insert().values(id=f"lim_{uuid.uuid4().hex[:12]}", tenant_id=t2, kind="spend",
                                            window_seconds=0, limit=40, shadow=False, fail_closed=False,
                                            prompt_weight=100, completion_weight=100,
                                            created_at=datetime.now(UTC))
        )  # fmt: skip
    await _meter(sessionmaker, log, node, _line("s0", node, "2026-09-20T10:00:00Z", t1, model))
    async with sessionmaker.begin() as s:  # September closes with s0 on it
        closed = await invoices.close_due(s, datetime(2026, 10, 5, tzinfo=UTC), timedelta(days=3))
    (september,) = [i for i in closed if i.tenant_id == t1]
    await _meter(
        sessionmaker, log, node,
        _line("s2", node, "2026-09-10T00:00:00Z", t1, model),  # late, before the new price: P0
        _line("s1", node, "2026-09-25T12:30:00Z", t1, model, completion_tokens="7"),  # late, open
        _line("o1", node, "2026-10-02T08:00:00Z", t1, model, prompt_tokens="1001", completion_tokens="333",
              cached_tokens="7"),
        _line("o2", node, "2026-10-02T08:59:59Z", t1, model, key_id="k2", prompt_tokens="999",
              completion_tokens="1"),
        _line("o3", node, "2026-10-20T00:00:00Z", t2, model, prompt_tokens="55", completion_tokens="66"),
        _line("o4", node, "2026-10-28T00:00:00Z", t1, model),  # the later price is in effect
        _line("x0", node, "2026-10-11T00:00:00Z", None, model, status=401, prompt_tokens=None,
              completion_tokens=None),  # refused before anyone was known: billed to no one
    )  # fmt: skip
    before = await _rows(sessionmaker, node)
    assert before["o1"].cost_picos == _picos(P0, 1001, 333, 7)

    await _price(admin, model, "2026-09-15", NEW)

    rows, ids = await _rows(sessionmaker, node), await _price_ids(sessionmaker)
    repriced = {
        "s1": (100, 7, 0),
        "o1": (1001, 333, 7),
        "o2": (999, 1, 0),
        "o3": (55, 66, 0),
        "x0": (0, 0, 0),
    }
    for rid, tokens in repriced.items():
        assert (rows[rid].price_id, rows[rid].cost_picos) == (ids["2026-09-15"], _picos(NEW, *tokens)), rid
        assert (rows[rid].currency, rows[rid].unpriced) == ("USD", False)
    for rid in ("s0", "s2", "o4"):  # on a closed invoice, before the new price, after the next one
        assert (rows[rid].price_id, rows[rid].cost_picos) == (before[rid].price_id, before[rid].cost_picos)
    assert (rows["s0"].price_id, rows["o4"].price_id) == (ids["2026-09-01"], ids["2026-10-25"])

    async with sessionmaker() as s:  # the closed invoice is as it was
        again = await s.get(Invoice, september.id)
        assert again is not None
        assert again.total_micros == september.total_micros == picos_to_micros(_picos(P0, 100, 10))
        assert [ln.amount_micros for ln in again.lines] == [september.total_micros]
        draft = await invoices.preview(s, t1, datetime(2026, 10, 31, tzinfo=UTC))
    lines = {(ln.kind, ln.input_micros): ln.amount_micros for ln in draft.lines}
    assert lines == {
        ("adjustment", P0[0]): picos_to_micros(_picos(P0, 100, 10)),
        ("adjustment", NEW[0]): picos_to_micros(_picos(NEW, 100, 7)),
        ("usage", NEW[0]): picos_to_micros(_picos(NEW, 1001, 333, 7) + _picos(NEW, 999, 1)),  # once per line
        ("usage", LATER[0]): picos_to_micros(_picos(LATER, 100, 10)),
    }
    assert draft.total_micros == sum(lines.values())

    usage = admin_pb2.QueryUsageRequest(tenant=t1, to="2026-11-01", **{"from": "2026-10-01"})
    (row,) = (await admin[2].QueryUsage(usage, metadata=AUTH)).rows
    october = _picos(NEW, 1001, 333, 7) + _picos(NEW, 999, 1) + _picos(LATER, 100, 10)
    assert (row.requests, row.cost_micros, row.currency, row.unpriced_requests) == (
        3,
        picos_to_micros(october),
        "USD",
        0,
    )
    await _rollups_match_the_ledger(sessionmaker, model)

    async with sessionmaker() as s:
        events = {
            e.id: e.payload
            for e in (await s.scalars(select(OutboxEvent).where(OutboxEvent.tenant_id.in_([t1, t2])))).all()
        }
        audit = (
            await s.scalars(
                select(AuditEvent).where(AuditEvent.action == "usage.reprice", AuditEvent.target_id == model)
            )
        ).all()
    new_id = ids["2026-09-15"]
    changed = {k: v for k, v in events.items() if k.startswith("repriced:")}
    assert sorted(changed) == sorted(
        [f"repriced:{new_id}:{t1}:2026-09:USD", f"repriced:{new_id}:{t1}:2026-10:USD",
         f"repriced:{new_id}:{t2}:2026-10:USD"]
    )  # fmt: skip
    t1_october = changed[f"repriced:{new_id}:{t1}:2026-10:USD"]
    assert t1_october["requests"] == 2
    assert t1_october["cost_micros"] == picos_to_micros(_picos(NEW, 1001, 333, 7) + _picos(NEW, 999, 1))
    assert t1_october["previous_cost_micros"] == picos_to_micros(
        _picos(P0, 1001, 333, 7) + _picos(P0, 999, 1)
    )
    assert t1_october["price_from"] == "2026-09-15T00:00:00Z"
    # t2's month: 55 x 0.123457 + 66 x 0.654321 = 49.97 micros > its 40: both thresholds
    assert picos_to_micros(_picos(P0, 55, 66)) < 40 * 80 // 100
    assert {k.rsplit(":", 1)[-1] for k in events if k.startswith("budget:")} == {"80", "100"}
    by_tenant = {a.tenant_id: (json.loads(a.before), json.loads(a.after)) for a in audit}
    assert set(by_tenant) == {t1, t2}
    was, now = by_tenant[t2]
    assert (int(was["cost_micros"]), int(now["cost_micros"]), now["currency"]) == (
        picos_to_micros(_picos(P0, 55, 66)), picos_to_micros(_picos(NEW, 55, 66)), "USD"
    )  # fmt: skip


async def test_unpriced_usage_is_priced_by_a_price_from_before_it(admin, sessionmaker, tmp_path):
    """The README's walkthrough: requests first, then a price from the start of their month."""
    model, t1, _ = await _setup(admin, [])
    node, log = f"n-{uuid.uuid4().hex[:8]}", tmp_path / "u.log"
    await _meter(
        sessionmaker, log, node,
        *(_line(f"r{i}", node, f"2026-11-26T1{i}:00:00Z", t1, model, prompt_tokens="5",
                completion_tokens="16") for i in range(4)),
    )  # fmt: skip
    usage = admin_pb2.QueryUsageRequest(tenant=t1, to="2026-12-01", **{"from": "2026-11-01"})
    (unpriced,) = (await admin[2].QueryUsage(usage, metadata=AUTH)).rows
    assert (unpriced.requests, unpriced.cost_micros, unpriced.currency, unpriced.unpriced_requests) == (
        4,
        0,
        "",
        4,
    )

    await _price(admin, model, "2026-11-01", (150_000, 600_000, 150_000))

    (priced,) = (await admin[2].QueryUsage(usage, metadata=AUTH)).rows  # one row: no unpriced row of zeros
    assert (priced.requests, priced.prompt_tokens, priced.completion_tokens) == (4, 20, 64)
    assert (priced.cost_micros, priced.currency, priced.unpriced_requests) == (41, "USD", 0)  # 41.4 rounded
    async with sessionmaker() as s:
        draft = await invoices.preview(s, t1, datetime(2026, 11, 30, tzinfo=UTC))
    assert [(ln.kind, ln.requests, ln.amount_micros) for ln in draft.lines] == [("usage", 4, 41)]
    await _rollups_match_the_ledger(sessionmaker, model)


async def test_a_price_from_after_the_usage_or_in_the_future_changes_nothing(admin, sessionmaker, tmp_path):
    model, t1, _ = await _setup(admin, [("2026-09-01", P0)])
    node, log = f"n-{uuid.uuid4().hex[:8]}", tmp_path / "u.log"
    await _meter(sessionmaker, log, node, *(_line(f"r{i}", node, f"2026-10-0{i + 1}T00:00:00Z", t1, model)
                                            for i in range(3)))  # fmt: skip

    async def state() -> tuple[Any, ...]:
        async with sessionmaker() as s:
            r = UsageRecord
            rows = (
                await s.execute(select(r.request_id, r.price_id, r.cost_picos).where(r.node == node))
            ).all()
            rollups = (await s.execute(select(UsageRollup.bucket, UsageRollup.cost_picos)
                                       .where(UsageRollup.model == model))).all()  # fmt: skip
            events = (await s.scalars(select(OutboxEvent.id).where(OutboxEvent.tenant_id == t1))).all()
            audit = (await s.scalars(select(AuditEvent.id).where(AuditEvent.action == "usage.reprice"))).all()
        return sorted(rows), sorted(rollups), sorted(events), sorted(audit)

    before = await state()
    await _price(admin, model, "2026-10-03T00:00:01Z", NEW)  # a second after the last request
    await _price(admin, model, "2999-01-01", LATER)
    assert await state() == before
    assert {r[1] for r in before[0]} == {(await _price_ids(sessionmaker))["2026-09-01"]}


async def test_a_meter_batch_that_read_the_old_prices_is_repriced_once_it_commits(
    admin, sessionmaker, tmp_path
):
    """The meter prices a batch with the prices it read at the start of its transaction: a new
    price waits for that transaction, then re-prices what it wrote (without the wait, those rows
    would keep the old price for good)."""
    model, t1, _ = await _setup(admin, [])
    node = f"n-{uuid.uuid4().hex[:8]}"
    lines = [usage_line.parse(_line(f"r{i}", node, "2026-10-10T00:00:00Z", t1, model)) for i in range(3)]
    assert all(lines)
    async with sessionmaker.begin() as s:
        terms = await ledger.load_terms(s)  # no price yet
        pricing = asyncio.create_task(_price(admin, model, "2026-10-01", NEW))
        await asyncio.sleep(0.5)
        assert not pricing.done()  # waits for the meter's transaction
        await ledger.ingest(s, lines, terms, datetime.now(UTC))
    await asyncio.wait_for(pricing, 30)
    rows = await _rows(sessionmaker, node)
    assert {(r.cost_picos, r.unpriced) for r in rows.values()} == {(_picos(NEW, 100, 10), False)}
    await _rollups_match_the_ledger(sessionmaker, model)
