"""Usage lines → ledger rows, priced; rollups, usage events and budget thresholds, all in the
caller's transaction (the meter's, with its checkpoint): a line counts exactly once.

Money: ``cost_picos`` = tokens x price in micros per 1M tokens (1e-12 of the currency unit), an
exact integer; sums are rounded to micros once (``picos_to_micros``). No floats.

A row takes the price in effect at its request's start. A price added later with an earlier
``from`` re-prices the rows it is in effect for that no closed invoice holds (``reprice``, in
the price's transaction); ``lock_prices`` keeps the meter from pricing rows meanwhile with the
prices that held before it.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, false, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.admin.convert import rfc3339
from control_plane.db.models import Limit, Model, ModelPrice, OutboxEvent, UsageRecord, UsageRollup
from control_plane.db.repositories import as_utc, insert_many_new, insert_stmt
from tessera import endpoints
from tessera.clock import calendar_month
from tessera.endpoints import FORM_BYTES_PER_TOKEN
from tessera.errors import InvalidArgumentError
from tessera.usage_line import BYTES_PER_TOKEN, UsageLine, reserved_tokens

PICOS_PER_MICRO = 1_000_000


BUDGET_THRESHOLDS = (80, 100)
_PERIODS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}


def picos_to_micros(picos: int) -> int:
    """Rounded half up (costs are never negative)."""
    return (picos + PICOS_PER_MICRO // 2) // PICOS_PER_MICRO


@dataclass(frozen=True, slots=True)
class Price:
    id: int
    effective_at: datetime
    input_micros: int
    output_micros: int
    cached_micros: int
    currency: str


@dataclass(frozen=True, slots=True)
class ModelTerms:
    prices: tuple[Price, ...]  # oldest first
    default_max_tokens: int
    max_max_tokens: int

    def price_at(self, when: datetime) -> Price | None:
        """The price in effect at ``when``: old usage keeps old prices."""
        i = bisect.bisect_right(self.prices, when, key=lambda p: p.effective_at)
        return self.prices[i - 1] if i else None


PRICES_LOCK = "tessera.model_prices"


async def lock_prices(s: AsyncSession, *, exclusive: bool) -> None:
    """Prices and the rows priced with them change together. Whoever prices rows (the meter, the
    usage backstop: ``load_terms``) holds this lock shared from reading the prices until its
    rows commit; a new price (``reprice``) and an invoice's close hold it exclusively. So a
    re-price sees every row priced before it, and no row is priced after it with the prices it
    replaced. PostgreSQL: a transaction-level advisory lock. SQLite has one writer at a time:
    its write lock, taken now by a write that changes nothing, serves for both kinds."""
    if s.get_bind().dialect.name == "postgresql":
        take = func.pg_advisory_xact_lock if exclusive else func.pg_advisory_xact_lock_shared
        await s.execute(select(take(func.hashtext(PRICES_LOCK))))
    else:
        nothing = update(ModelPrice).where(false()).values(id=ModelPrice.id)
        await s.execute(nothing.execution_options(synchronize_session=False))


async def load_terms(s: AsyncSession) -> dict[str, ModelTerms]:
    """Every model's prices and token terms (two plain queries: read once per meter batch),
    under the prices lock (shared) until the caller's transaction ends."""
    await lock_prices(s, exclusive=False)
    m, p = Model.__table__.c, ModelPrice.__table__.c
    prices: dict[int, list[Price]] = {}
    rows = await s.execute(
        select(
            p.model_id, p.id, p.effective_at, p.input_micros, p.output_micros, p.cached_micros, p.currency
        ).order_by(p.model_id, p.effective_at)
    )
    for model_id, *price in rows:
        prices.setdefault(model_id, []).append(Price(price[0], as_utc(price[1]), *price[2:]))
    models = await s.execute(select(m.id, m.name, m.default_max_tokens, m.max_max_tokens))
    return {
        name: ModelTerms(tuple(prices.get(model_id, ())), default or 0, cap or 0)
        for model_id, name, default, cap in models
    }


def _is_inference(line: UsageLine) -> bool:
    """A request a model route served: only listed endpoints reach one, all by POST."""
    return line.method == "POST" and line.model is not None


def tokens_of(line: UsageLine, terms: ModelTerms | None) -> tuple[int, int, int, bool]:
    """(prompt, completion, cached, estimated). A successful inference whose answer did not report
    its completion (a stream the client cut before its last event, a server that reports none)
    is charged what was reserved for it, or what was counted going out if that is more, and
    flagged: never zero. A prompt it did report is kept."""
    if line.completion_tokens is not None or not (200 <= line.status < 300 and _is_inference(line)):  # noqa: PLR2004
        return line.prompt_tokens or 0, line.completion_tokens or 0, line.cached_tokens, False
    endpoint = endpoints.at(line.path)
    prompt, completion = reserved_tokens(
        line.bytes_received,
        line.max_tokens,
        default_max_tokens=terms.default_max_tokens if terms else 0,
        max_max_tokens=terms.max_max_tokens if terms else 0,
        bytes_per_token=FORM_BYTES_PER_TOKEN if endpoint.form else BYTES_PER_TOKEN,
    )
    if not endpoint.generates:
        completion = 0
    if line.prompt_tokens is not None:
        return line.prompt_tokens, max(completion, line.chunks), line.cached_tokens, True
    return prompt, max(completion, line.chunks), 0, True


def _cost(price: Price | None, prompt: int, completion: int, cached: int) -> int:
    if price is None:
        return 0
    cost = (prompt - cached) * price.input_micros + cached * price.cached_micros
    return cost + completion * price.output_micros


def record_values(line: UsageLine, terms: dict[str, ModelTerms], now: datetime) -> dict[str, Any]:
    model_terms = terms.get(line.model) if line.model else None
    prompt, completion, cached, estimated = tokens_of(line, model_terms)
    cached = min(cached, prompt)
    price = model_terms.price_at(line.start_time) if model_terms else None
    cost = _cost(price, prompt, completion, cached)
    return {
        "node": line.node,
        "request_id": line.request_id,
        "time": line.start_time,
        "ingested_at": now,
        "tenant_id": line.tenant_id,
        "key_id": line.key_id,
        "principal": line.principal,
        "model_requested": line.model_requested,
        "model": line.model,
        "backend": line.backend,
        "status": line.status,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "usage_estimated": estimated,
        "backstop": False,
        "streamed": line.streamed,
        "duration_ms": line.duration_ms,
        "ttfb_ms": line.ttfb_ms,
        "bytes_received": line.bytes_received,
        "bytes_sent": line.bytes_sent,
        "price_id": price.id if price else None,
        "cost_picos": cost,
        "currency": price.currency if price else None,
        "unpriced": price is None and line.model is not None,
        "trace_id": line.trace_id,
    }


@dataclass(frozen=True, slots=True)
class Overdue:
    """An admitted request whose usage line never reached a meter (the usage backstop,
    ``control_plane/usage/backstop.py``): what its admission said."""

    node: str
    request_id: str
    admitted_at: datetime
    tenant_id: str
    key_id: str
    model: str
    body_bytes: int
    max_completion_tokens: int  # 0: not a generation request


def overdue_values(o: Overdue, terms: dict[str, ModelTerms], now: datetime) -> dict[str, Any]:
    """Its ledger row: billed as estimated (what was reserved for it, never free), flagged
    ``backstop``; status 0, as what the client got is unknown."""
    model_terms = terms.get(o.model)
    prompt, completion = reserved_tokens(
        o.body_bytes,
        o.max_completion_tokens or None,
        default_max_tokens=model_terms.default_max_tokens if model_terms else 0,
        max_max_tokens=model_terms.max_max_tokens if model_terms else 0,
    )
    completion = completion if o.max_completion_tokens else 0
    price = model_terms.price_at(o.admitted_at) if model_terms else None
    return {
        "node": o.node,
        "request_id": o.request_id,
        "time": o.admitted_at,
        "ingested_at": now,
        "tenant_id": o.tenant_id,
        "key_id": o.key_id,
        "principal": o.key_id,
        "model_requested": o.model,
        "model": o.model,
        "backend": None,
        "status": 0,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": 0,
        "usage_estimated": True,
        "backstop": True,
        "streamed": False,
        "duration_ms": 0,
        "ttfb_ms": None,
        "bytes_received": o.body_bytes,
        "bytes_sent": 0,
        "price_id": price.id if price else None,
        "cost_picos": _cost(price, prompt, completion, 0),
        "currency": price.currency if price else None,
        "unpriced": price is None,
        "trace_id": None,
    }


@functools.lru_cache(maxsize=4096)
def _second(unix: int) -> str:
    """``rfc3339`` of a whole second, cached: a batch's rows share a few seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def usage_event(row: dict[str, Any]) -> dict[str, Any]:
    """The ``usage.recorded`` outbox event of a ledger row (its id: the row's identity)."""
    payload = {
        "node": row["node"],
        "request_id": row["request_id"],
        "time": _second(int(row["time"].timestamp())),
        "tenant_id": row["tenant_id"],
        "key_id": row["key_id"],
        "model": row["model"],
        "model_requested": row["model_requested"],
        "status": row["status"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "cached_tokens": row["cached_tokens"],
        "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
        "usage_estimated": row["usage_estimated"],
        "backstop": row["backstop"],
        "streamed": row["streamed"],
        "cost_micros": picos_to_micros(row["cost_picos"]),
        "currency": row["currency"],
        "unpriced": row["unpriced"],
        "trace_id": row.get("trace_id"),
    }
    return {
        "id": f"usage:{row['node']}:{row['request_id']}",
        "kind": "usage.recorded",
        "tenant_id": row["tenant_id"],
        "payload": payload,
        "created_at": row["ingested_at"],
    }


def _by_node(values: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    nodes: dict[str, list[str]] = {}
    for v in values:
        nodes.setdefault(v["node"], []).append(v["request_id"])
    return nodes


def bucket(period: str, when: datetime) -> datetime:
    when = as_utc(when)
    if period == "hour":
        return when.replace(minute=0, second=0, microsecond=0)
    return when.replace(hour=0, minute=0, second=0, microsecond=0)


_ROLLUP_SUMS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_picos",
                "unpriced_requests")  # fmt: skip
# (period, bucket, tenant, key id or "", model or "", currency or "") -> the sums, in that order
_RollupSums = dict[tuple[str, datetime, str, str, str, str], list[int]]


async def _add_rollups(s: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    # Summed per hour first (one pass over the rows), then the hours per day.
    hours: dict[tuple[datetime, str, str, str, str], list[int]] = {}
    for r in rows:
        if r["tenant_id"] is None:
            continue  # refused before anyone was identified: in the ledger, billed to no one
        group = (r["time"].replace(minute=0, second=0, microsecond=0), r["tenant_id"], r["key_id"] or "",
                 r["model"] or "", r["currency"] or "")  # fmt: skip
        acc = hours.get(group)
        if acc is None:
            hours[group] = [1, r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"],
                            r["cost_picos"], int(r["unpriced"])]  # fmt: skip
        else:
            acc[0] += 1
            acc[1] += r["prompt_tokens"]
            acc[2] += r["completion_tokens"]
            acc[3] += r["cached_tokens"]
            acc[4] += r["cost_picos"]
            acc[5] += r["unpriced"]
    sums: _RollupSums = {}
    for (hour, tenant, key_id, model, currency), acc in hours.items():
        sums[("hour", as_utc(hour), tenant, key_id, model, currency)] = acc
        day_group = ("day", bucket("day", hour), tenant, key_id, model, currency)
        day = sums.setdefault(day_group, [0] * len(_ROLLUP_SUMS))
        for i, v in enumerate(acc):
            day[i] += v
    await _apply_rollups(s, sums)


async def _apply_rollups(s: AsyncSession, sums: _RollupSums) -> None:
    """Add ``sums`` (negative ones subtract) to the rollups."""
    table = UsageRollup.__table__.c
    for (period, start, tenant, key_id, model, currency), acc in sorted(sums.items()):
        stmt = insert_stmt(s, UsageRollup).values(
            period=period, bucket=start, tenant_id=tenant, key_id=key_id, model=model, currency=currency,
            **dict(zip(_ROLLUP_SUMS, acc, strict=True)),
        )  # fmt: skip
        stmt = stmt.on_conflict_do_update(
            index_elements=["period", "bucket", "tenant_id", "key_id", "model", "currency"],
            set_={n: table[n] + stmt.excluded[n] for n in _ROLLUP_SUMS},
        )
        await s.execute(stmt)


def _window(limit: Limit, when: datetime) -> tuple[datetime, datetime] | None:
    """The calendar period a spend limit counts over, for threshold events (rolling windows
    shorter than an hour have none)."""
    if limit.window_seconds == 0:
        _, start_unix, end_unix = calendar_month(when.timestamp())
        return datetime.fromtimestamp(start_unix, UTC), datetime.fromtimestamp(end_unix, UTC)
    for period, length in _PERIODS.items():
        if limit.window_seconds == int(length.total_seconds()):
            start = bucket(period, when)
            return start, start + length
    return None


async def _budget_events(s: AsyncSession, rows: Sequence[dict[str, Any]], now: datetime) -> None:
    """80% and 100% of each spend limit, once per limit and period (stable ids)."""
    touched = {(r["tenant_id"], r["time"]) for r in rows if r["tenant_id"] and r["cost_picos"]}
    if not touched:
        return
    tenants = {t for t, _ in touched}
    limits = (await s.scalars(select(Limit).where(Limit.tenant_id.in_(tenants), Limit.kind == "spend"))).all()
    seen: set[tuple[str, datetime]] = set()
    for lim in limits:
        for tenant, when in touched:
            window = _window(lim, when) if tenant == lim.tenant_id else None
            if window is None or (lim.id, window[0]) in seen:
                continue
            seen.add((lim.id, window[0]))
            r = UsageRollup
            q = select(func.coalesce(func.sum(r.cost_picos), 0), func.max(r.currency)).where(
                r.period == "hour", r.tenant_id == tenant, r.bucket >= window[0], r.bucket < window[1]
            )
            if lim.key_id:
                q = q.where(r.key_id == lim.key_id)
            if lim.model:
                q = q.where(r.model == lim.model)
            spent_picos, currency = (await s.execute(q)).one()
            spent = picos_to_micros(int(spent_picos))
            for pct in BUDGET_THRESHOLDS:
                if spent * 100 < lim.limit * pct:
                    continue
                event = {
                    "id": f"budget:{lim.id}:{rfc3339(window[0])}:{pct}",
                    "kind": "budget.threshold",
                    "tenant_id": tenant,
                    "payload": {
                        "tenant_id": tenant,
                        "limit_id": lim.id,
                        "threshold_percent": pct,
                        "period_start": rfc3339(window[0]),
                        "period_end": rfc3339(window[1]),
                        "spent_micros": spent,
                        "limit_micros": lim.limit,
                        "currency": currency or None,
                    },
                    "created_at": now,
                }
                await s.execute(
                    insert_stmt(s, OutboxEvent).values(event).on_conflict_do_nothing(index_elements=["id"])
                )


async def ingest(
    s: AsyncSession, lines: Iterable[UsageLine], terms: dict[str, ModelTerms], now: datetime
) -> tuple[list[dict[str, Any]], int]:
    """Insert the lines not in the ledger yet (by node + request id), and what follows from
    them. Returns (the rows inserted, the number of duplicates)."""
    unique = {(ln.node, ln.request_id): ln for ln in lines}
    if not unique:
        return [], 0
    values = [record_values(ln, terms, now) for ln in unique.values()]
    # The meter is its node's only writer: the lines of a batch already in the ledger (re-read
    # after a crash, before its checkpoint) are found by one indexed query, the rest inserted.
    ledger = UsageRecord.__table__.c
    seen: set[tuple[str, str]] = set()
    for node, ids in _by_node(values).items():
        query = select(ledger.request_id).where(ledger.node == node, ledger.request_id.in_(ids))
        present = await s.execute(query)
        seen.update((node, request_id) for (request_id,) in present)
    # in key order, as bill_overdue inserts: two writers of overlapping keys wait, never deadlock
    rows = sorted(
        (v for v in values if (v["node"], v["request_id"]) not in seen),
        key=lambda v: (v["node"], v["request_id"]),
    )
    await insert_many_new(s, UsageRecord.__table__, rows, ["node", "request_id"])
    # The usage backstop is the one other writer: a row it committed meanwhile (the request
    # fell overdue just as its line came) kept the key; that line is a duplicate after all.
    for node, ids in _by_node(rows).items():
        query = select(ledger.request_id).where(
            ledger.node == node, ledger.request_id.in_(ids), ledger.backstop.is_(True)
        )
        seen.update((node, request_id) for (request_id,) in await s.execute(query))
    rows = [v for v in rows if (v["node"], v["request_id"]) not in seen]
    await _follow(s, rows, now)
    return rows, len(unique) - len(rows)


async def _follow(s: AsyncSession, rows: Sequence[dict[str, Any]], now: datetime) -> None:
    """What follows from new ledger rows: rollups, usage events, budget thresholds."""
    await _add_rollups(s, rows)
    events = [usage_event(r) for r in rows if r["tenant_id"]]
    await insert_many_new(s, OutboxEvent.__table__, events, ["id"])
    await _budget_events(s, rows, now)


async def bill_overdue(
    s: AsyncSession, overdue: Sequence[Overdue], terms: dict[str, ModelTerms], now: datetime
) -> list[str]:
    """Bill requests whose lines never came (the usage backstop): those not in the ledger yet
    (by node + request id: a line that did arrive wins, and a request claimed twice is billed
    once). Returns the request ids billed now."""
    keyed = {(o.node, o.request_id): overdue_values(o, terms, now) for o in overdue}
    values = [keyed[k] for k in sorted(keyed)]  # in key order, as ingest inserts
    if not values:
        return []
    stmt = (
        insert_stmt(s, UsageRecord)
        .values(values)
        .on_conflict_do_nothing(index_elements=["node", "request_id"])
        .returning(UsageRecord.node, UsageRecord.request_id)
    )
    inserted = set((await s.execute(stmt)).tuples())
    rows = [v for v in values if (v["node"], v["request_id"]) in inserted]
    await _follow(s, rows, now)
    return [r["request_id"] for r in rows]


# --- re-pricing: a price added with an earlier ``from`` ---------------------------------------

MAX_PICOS = 2**63 - 1  # a row's cost is a 64-bit integer


@dataclass(slots=True)
class Repriced:
    """A tenant's usage of one month, priced before in one currency ("" = unpriced), that a new
    price re-priced: one ``usage.repriced`` event."""

    tenant_id: str
    usage_month: datetime
    previous_currency: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    previous_picos: int = 0
    picos: int = 0

    def add(self, requests: int, tokens: tuple[int, int, int], previous_picos: int, picos: int) -> None:
        self.requests += requests
        self.prompt_tokens += tokens[0]
        self.completion_tokens += tokens[1]
        self.cached_tokens += tokens[2]
        self.previous_picos += previous_picos
        self.picos += picos


def _hour(s: AsyncSession, column: Any) -> Any:
    """A time column's UTC hour, in SQL (rollups are hourly)."""
    if s.get_bind().dialect.name == "postgresql":
        return func.date_trunc("hour", func.timezone("UTC", column))
    return func.strftime("%Y-%m-%d %H:00:00", column)


def repriced_event(model: str, price: Price, r: Repriced, now: datetime) -> dict[str, Any]:
    """The ``usage.repriced`` outbox event: the rows' new cost beside what their
    ``usage.recorded`` events said, each sum rounded once."""
    month = r.usage_month.strftime("%Y-%m")
    return {
        "id": f"repriced:{price.id}:{r.tenant_id}:{month}:{r.previous_currency or '-'}",
        "kind": "usage.repriced",
        "tenant_id": r.tenant_id,
        "payload": {
            "tenant_id": r.tenant_id,
            "model": model,
            "usage_month": month,
            "requests": r.requests,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "cached_tokens": r.cached_tokens,
            "price_from": rfc3339(price.effective_at),
            "input_micros": price.input_micros,
            "output_micros": price.output_micros,
            "cached_micros": price.cached_micros,
            "currency": price.currency,
            "cost_micros": picos_to_micros(r.picos),
            "previous_currency": r.previous_currency or None,
            "previous_cost_micros": picos_to_micros(r.previous_picos),
        },
        "created_at": now,
    }


async def reprice(
    s: AsyncSession, model: str, price: Price, until: datetime | None, now: datetime
) -> tuple[int, list[Repriced]]:
    """Price with ``price`` the rows of ``model`` it is in effect for (requests from its
    ``effective_at`` until ``until``, the next later price's) that no closed invoice holds; and
    what follows: the rollups, a ``usage.repriced`` event per tenant, month and previous
    currency, and the budget thresholds the new costs cross. The caller holds
    ``lock_prices(exclusive=True)``. Returns (rows re-priced, the tenants' changes)."""
    r = UsageRecord
    scope = [r.model == model, r.time >= price.effective_at, r.invoice_id.is_(None)]
    if until is not None:
        scope.append(r.time < until)
    hour = _hour(s, r.time)
    groups = (
        await s.execute(
            select(hour, r.tenant_id, r.key_id, r.currency, func.count(), func.sum(r.prompt_tokens),
                   func.sum(r.completion_tokens), func.sum(r.cached_tokens), func.sum(r.cost_picos),
                   func.sum(case((r.unpriced, 1), else_=0)), func.max(r.prompt_tokens),
                   func.max(r.completion_tokens))
            .where(*scope)
            .group_by(hour, r.tenant_id, r.key_id, r.currency)
        )
    ).all()  # fmt: skip
    if not groups:
        return 0, []
    # Each row's cost is computed in SQL: it must fit in 64 bits (SQLite would go to floating point).
    # (a bound on every row's: its prompt all at the dearer of the input and cached prices)
    per_prompt_token = max(price.input_micros, price.cached_micros)
    if (
        max(g[10] for g in groups) * per_prompt_token + max(g[11] for g in groups) * price.output_micros
        > MAX_PICOS
    ):
        raise InvalidArgumentError("input_micros", "too high for the token counts of the usage it re-prices")
    cost = ((r.prompt_tokens - r.cached_tokens) * price.input_micros + r.cached_tokens * price.cached_micros
            + r.completion_tokens * price.output_micros)  # fmt: skip
    done = await s.execute(
        update(r)
        .where(*scope)
        .values(price_id=price.id, cost_picos=cost, currency=price.currency, unpriced=False)
        .execution_options(synchronize_session=False)
    )
    rollups: _RollupSums = defaultdict(lambda: [0] * len(_ROLLUP_SUMS))
    changed: dict[tuple[str, datetime, str], Repriced] = {}
    spent: list[dict[str, Any]] = []
    for when, tenant, key_id, currency, *amounts in groups:
        if tenant is None:
            continue  # billed to no one: in no rollup, no event
        n, prompt, completion, cached, picos, unpriced = (int(a or 0) for a in amounts[:6])
        new = _cost(price, prompt, completion, cached)  # exact: the cost is linear in the tokens
        start = as_utc(when if isinstance(when, datetime) else datetime.fromisoformat(when))
        for period, at in (("hour", start), ("day", bucket("day", start))):
            group = (period, at, tenant, key_id or "", model)
            _add(rollups[(*group, currency or "")], (n, prompt, completion, cached, picos, unpriced), -1)
            _add(rollups[(*group, price.currency)], (n, prompt, completion, cached, new, 0), 1)
        month = bucket("day", start).replace(day=1)
        c = changed.setdefault((tenant, month, currency or ""), Repriced(tenant, month, currency or ""))
        c.add(n, (prompt, completion, cached), picos, new)
        spent.append({"tenant_id": tenant, "time": start, "cost_picos": new})
    await _apply_rollups(s, {k: v for k, v in rollups.items() if any(v)})
    # a rollup whose every request moved to the new price's currency is gone, not a row of zeros
    await s.execute(delete(UsageRollup).where(UsageRollup.model == model, UsageRollup.requests == 0))
    repriced = [c for _, c in sorted(changed.items())]
    await insert_many_new(
        s, OutboxEvent.__table__, [repriced_event(model, price, c, now) for c in repriced], ["id"]
    )
    await _budget_events(s, spent, now)
    return int(getattr(done, "rowcount", 0) or 0), repriced


def _add(acc: list[int], values: Sequence[int], sign: int) -> None:
    for i, v in enumerate(values):
        acc[i] += sign * v
