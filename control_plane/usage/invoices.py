"""Monthly invoices from the ledger, closed after a grace period and immutable once closed.

Closing a tenant's month claims its ledger rows (``invoice_id``) and sums them into lines: one
per model and price in effect (a price change mid-month makes two lines, each at its own price).
Rows that arrive after their month closed are claimed by the tenant's next invoice, as
adjustment lines for the month they belong to. Claim first, then sum what was claimed: a row
the meter commits meanwhile is on this invoice or the next, never on both, never on none. A
price added with an earlier ``from`` re-prices only rows no invoice holds yet (``ledger.reprice``).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import ColumnElement, and_, distinct, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.admin.convert import rfc3339
from control_plane.db.models import Invoice, InvoiceLine, ModelPrice, OutboxEvent, UsageRecord
from control_plane.db.repositories import as_utc, insert_stmt
from control_plane.usage.ledger import lock_prices, picos_to_micros
from tessera import keys

log = structlog.get_logger("control_plane.usage.invoices")


def month_start(when: datetime) -> datetime:
    when = as_utc(when)
    return datetime(when.year, when.month, 1, tzinfo=UTC)


def next_month(start: datetime) -> datetime:
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)


@dataclass
class _Sum:
    requests: int = 0
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    picos: int = 0

    def add(self, requests: int, prompt: int, completion: int, cached: int, picos: int) -> None:
        self.requests += int(requests)
        self.prompt += int(prompt or 0)
        self.completion += int(completion or 0)
        self.cached += int(cached or 0)
        self.picos += int(picos or 0)


async def _claim(
    s: AsyncSession, invoice_id: str, tenant: str, end: datetime, currency: str, *, primary: bool
) -> int:
    """Mark the tenant's unclaimed rows before ``end`` in ``currency`` (and, on the primary
    currency's invoice, its unpriced rows) as this invoice's."""
    r = UsageRecord
    match = r.currency == currency if currency else r.currency.is_(None)
    if primary and currency:
        match = or_(match, r.currency.is_(None))
    done = await s.execute(
        update(r)
        .where(r.tenant_id == tenant, r.invoice_id.is_(None), r.time < end, match)
        .values(invoice_id=invoice_id)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(done, "rowcount", 0) or 0)


async def _lines(
    s: AsyncSession,
    where: ColumnElement[bool],
    period_start: datetime,
    late_months: set[datetime] | None = None,
) -> list[InvoiceLine]:
    """The lines of the rows ``where`` selects: a usage line per model and price for the month
    from ``period_start``; an adjustment line per month, model and price for earlier (late)
    rows, of ``late_months`` only when given."""
    r = UsageRecord
    amounts = (func.count(), func.sum(r.prompt_tokens), func.sum(r.completion_tokens),
               func.sum(r.cached_tokens), func.sum(r.cost_picos))  # fmt: skip
    sums: dict[tuple[datetime, str, int | None], _Sum] = defaultdict(_Sum)
    current = await s.execute(
        select(r.model, r.price_id, *amounts)
        .where(where, r.time >= period_start)
        .group_by(r.model, r.price_id)
    )
    for model, price_id, *values in current:
        sums[(period_start, model or "", price_id)].add(*values)
    late = await s.execute(
        select(
            r.model, r.price_id, r.time, r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.cost_picos
        ).where(where, r.time < period_start)
    )  # few: usage that reached the ledger after its month closed
    for model, price_id, when, *values in late:
        month = month_start(when)
        if late_months is None or month in late_months:
            sums[(month, model or "", price_id)].add(1, *values)
    price_ids = {p for _, _, p in sums if p is not None}
    prices = {
        p.id: p
        for p in (await s.scalars(select(ModelPrice).where(ModelPrice.id.in_(price_ids or {-1})))).all()
    }
    lines = []
    for (usage_month, model, price_id), acc in sorted(
        sums.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)
    ):
        price = prices.get(price_id) if price_id is not None else None
        lines.append(
            InvoiceLine(
                kind="usage" if usage_month == period_start else "adjustment",
                model=model,
                usage_month=usage_month,
                price_from=as_utc(price.effective_at) if price else None,
                input_micros=price.input_micros if price else 0,
                output_micros=price.output_micros if price else 0,
                cached_micros=price.cached_micros if price else 0,
                requests=acc.requests,
                prompt_tokens=acc.prompt,
                completion_tokens=acc.completion,
                cached_tokens=acc.cached,
                amount_micros=picos_to_micros(acc.picos),
            )
        )
    return lines


async def preview(s: AsyncSession, tenant: str, now: datetime) -> Invoice:
    """The open invoice of this month so far (not stored): what closing it now would bill,
    late usage of closed months included. Priced usage in more than one currency shows the first."""
    start = month_start(now)
    end = next_month(start)
    r = UsageRecord
    where = and_(r.tenant_id == tenant, r.invoice_id.is_(None), r.time < end)
    currency = await s.scalar(select(func.min(r.currency)).where(where)) or ""
    match = or_(r.currency == currency, r.currency.is_(None)) if currency else r.currency.is_(None)
    # Late usage of months already closed is this invoice's; a month still in its grace period
    # will have its own invoice.
    closed = {
        as_utc(p) for (p,) in await s.execute(select(Invoice.period_start).where(Invoice.tenant_id == tenant))
    }
    lines = await _lines(s, and_(where, match), start, closed)
    return Invoice(
        id="", tenant_id=tenant, period_start=start, period_end=end, currency=currency, status="open",
        total_micros=sum(ln.amount_micros for ln in lines), closed_at=None, lines=lines,
    )  # fmt: skip


def invoice_event(invoice: Invoice) -> dict[str, object]:
    return {
        "id": f"invoice:{invoice.id}",
        "kind": "invoice.closed",
        "tenant_id": invoice.tenant_id,
        "payload": {
            "invoice_id": invoice.id,
            "tenant_id": invoice.tenant_id,
            "period_start": rfc3339(invoice.period_start),
            "period_end": rfc3339(invoice.period_end),
            "currency": invoice.currency or None,
            "total_micros": invoice.total_micros,
            "lines": [
                {
                    "kind": ln.kind,
                    "model": ln.model,
                    "usage_month": as_utc(ln.usage_month).strftime("%Y-%m"),
                    "requests": ln.requests,
                    "prompt_tokens": ln.prompt_tokens,
                    "completion_tokens": ln.completion_tokens,
                    "cached_tokens": ln.cached_tokens,
                    "amount_micros": ln.amount_micros,
                }
                for ln in invoice.lines
            ],
        },
        "created_at": invoice.closed_at,
    }


async def _close_month(s: AsyncSession, tenant: str, start: datetime, now: datetime) -> list[Invoice]:
    end = next_month(start)
    r = UsageRecord
    currencies = sorted(
        c
        for (c,) in await s.execute(
            select(distinct(r.currency)).where(r.tenant_id == tenant, r.invoice_id.is_(None), r.time < end)
        )
        if c
    ) or [""]
    closed = []
    for i, currency in enumerate(currencies):
        invoice = Invoice(
            id=f"inv_{keys.new_public_id()}",
            tenant_id=tenant,
            period_start=start,
            period_end=end,
            currency=currency,
            status="closed",
            closed_at=now,
            lines=[],  # loaded: nothing to fetch when the lines are added
        )
        s.add(invoice)
        await s.flush()
        if await _claim(s, invoice.id, tenant, end, currency, primary=i == 0) == 0:
            await s.delete(invoice)
            continue
        lines = await _lines(s, UsageRecord.invoice_id == invoice.id, start)
        invoice.lines.extend(lines)
        invoice.total_micros = sum(ln.amount_micros for ln in lines)
        await s.flush()
        await s.execute(
            insert_stmt(s, OutboxEvent)
            .values(invoice_event(invoice))
            .on_conflict_do_nothing(index_elements=["id"])
        )
        closed.append(invoice)
    return closed


async def close_due(s: AsyncSession, now: datetime, grace: timedelta) -> list[Invoice]:
    """Close every tenant month that ended at least ``grace`` ago and has unclaimed usage (its
    own, or late usage of months closed before: adjustments)."""
    boundary = month_start(now - grace)  # months starting before it are closable
    r = UsageRecord
    pending = await s.execute(
        select(r.tenant_id, func.min(r.time))
        .where(r.invoice_id.is_(None), r.tenant_id.is_not(None), r.time < boundary)
        .group_by(r.tenant_id)
    )
    closed: list[Invoice] = []
    for tenant, earliest in sorted(pending.all()):
        existing = {
            as_utc(p)
            for (p,) in await s.execute(select(Invoice.period_start).where(Invoice.tenant_id == tenant))
        }
        month = month_start(earliest)
        while month < boundary:
            unclaimed = await s.scalar(
                select(func.count())
                .select_from(r)
                .where(r.tenant_id == tenant, r.invoice_id.is_(None), r.time < next_month(month))
            )
            if unclaimed and month not in existing:
                await lock_prices(s, exclusive=True)  # no new price re-prices rows while they are claimed
                closed.extend(await _close_month(s, tenant, month, now))
            month = next_month(month)
    return closed


async def list_invoices(s: AsyncSession, tenant: str, *, after: str, limit: int) -> Sequence[Invoice]:
    stmt = (
        select(Invoice)
        .where(Invoice.tenant_id == tenant, Invoice.id > after)
        .order_by(Invoice.id)
        .limit(limit)
    )
    return (await s.scalars(stmt)).all()


async def close_invoices_forever(
    sessionmaker: async_sessionmaker[AsyncSession], grace: timedelta, interval: float = 60.0
) -> None:
    """Close due months every ``interval`` (two control planes racing lose nothing: the invoice
    key (tenant, month, currency) lets one commit, the other retries next round)."""
    while True:
        try:
            async with sessionmaker.begin() as s:
                closed = await close_due(s, datetime.now(UTC), grace)
            for inv in closed:
                log.info(
                    "invoice_closed",
                    invoice_id=inv.id,
                    tenant_id=inv.tenant_id,
                    total_micros=inv.total_micros,
                )
        except Exception:
            log.warning("invoice_close_failed", exc_info=True)
        await asyncio.sleep(interval)
