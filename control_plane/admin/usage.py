"""UsageService and InvoiceService: a tenant's usage and invoices, to those who may read it."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from control_plane import validation as v
from control_plane.admin.base import AdminServicerBase
from control_plane.admin.convert import invoice_pb, rfc3339
from control_plane.db.models import Invoice, UsageRollup
from control_plane.db.repositories import as_utc
from control_plane.usage import invoices
from control_plane.usage.ledger import picos_to_micros
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc
from tessera.errors import InvalidArgumentError, NotFoundError

GROUPS = ("model", "key", "day")
MAX_RANGE = timedelta(days=400)


def _bound(value: str, field: str, *, up: bool) -> datetime | None:
    """RFC 3339 or YYYY-MM-DD (UTC), to the hour: down for ``from``, up for ``to``."""
    if not value:
        return None
    when = v.effective_time(value, datetime.now(UTC)) if len(value) == 10 else v.timestamp(value, field)  # noqa: PLR2004
    hour = when.replace(minute=0, second=0, microsecond=0)
    return hour + timedelta(hours=1) if up and hour != when else hour


def usage_range(request: pb.QueryUsageRequest, now: datetime) -> tuple[datetime, datetime]:
    this_month = invoices.month_start(now)
    start = _bound(getattr(request, "from"), "from", up=False) or this_month
    end = _bound(request.to, "to", up=True) or invoices.next_month(this_month)
    if end <= start:
        raise InvalidArgumentError("to", "must be after from")
    if end - start > MAX_RANGE:
        raise InvalidArgumentError("to", f"the range is at most {MAX_RANGE.days} days")
    return start, end


class UsageServiceServicer(AdminServicerBase, admin_pb2_grpc.UsageServiceServicer):
    async def QueryUsage(self, request: pb.QueryUsageRequest, context: Any) -> pb.QueryUsageResponse:
        group = request.group_by or "model"
        if group not in GROUPS:
            raise InvalidArgumentError("group_by", f"must be one of {', '.join(GROUPS)}")
        start, end = usage_range(request, datetime.now(UTC))
        r = UsageRollup
        column = {"model": r.model, "key": r.key_id, "day": r.bucket}[group]
        sums = (
            func.sum(r.requests),
            func.sum(r.prompt_tokens),
            func.sum(r.completion_tokens),
            func.sum(r.cached_tokens),
            func.sum(r.cost_picos),
            func.sum(r.unpriced_requests),
        )
        async with self.read(context) as (s, caller):
            tenant = await self.tenant_for_read(s, caller, request.tenant)
            rows = await s.execute(
                select(column, r.currency, *sums)
                .where(r.period == "hour", r.tenant_id == tenant.id, r.bucket >= start, r.bucket < end)
                .group_by(column, r.currency)
            )
            totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * 6)
            for value, currency, *amounts in rows:
                name = as_utc(value).strftime("%Y-%m-%d") if group == "day" else str(value)
                acc = totals[(name, currency)]
                for i, amount in enumerate(amounts):
                    acc[i] += int(amount or 0)
        field = {"model": "model", "key": "key_id", "day": "day"}[group]
        out = []
        for (name, currency), (requests, prompt, completion, cached, picos, unpriced) in sorted(
            totals.items()
        ):
            out.append(
                pb.UsageRow(
                    **{field: name},
                    requests=requests,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    total_tokens=prompt + completion,
                    cached_tokens=cached,
                    cost_micros=picos_to_micros(picos),
                    currency=currency,
                    unpriced_requests=unpriced,
                )
            )
        return pb.QueryUsageResponse(rows=out, to=rfc3339(end), **{"from": rfc3339(start)})


class InvoiceServiceServicer(AdminServicerBase, admin_pb2_grpc.InvoiceServiceServicer):
    async def ListInvoices(self, request: pb.ListInvoicesRequest, context: Any) -> pb.ListInvoicesResponse:
        size, after = v.page(request.page_size, request.page_token)
        async with self.read(context) as (s, caller):
            tenant = await self.tenant_for_read(s, caller, request.tenant)
            rows = list(await invoices.list_invoices(s, tenant.id, after=after, limit=size))
        token = v.next_token(len(rows), size, rows[-1].id if rows else "")
        return pb.ListInvoicesResponse(items=[invoice_pb(i) for i in rows], next_page_token=token)

    async def GetInvoice(self, request: pb.GetInvoiceRequest, context: Any) -> pb.GetInvoiceResponse:
        ident = v.short_text(request.id, "id", 32)
        async with self.read(context) as (s, caller):
            invoice = await s.get(Invoice, ident) if ident else None
            if invoice is None or not caller.can_read(invoice.tenant_id):
                raise NotFoundError(f"invoice {request.id!r} not found")
            return pb.GetInvoiceResponse(invoice=invoice_pb(invoice))

    async def PreviewInvoice(
        self, request: pb.PreviewInvoiceRequest, context: Any
    ) -> pb.PreviewInvoiceResponse:
        async with self.read(context) as (s, caller):
            tenant = await self.tenant_for_read(s, caller, request.tenant)
            invoice = await invoices.preview(s, tenant.id, datetime.now(UTC))
            return pb.PreviewInvoiceResponse(invoice=invoice_pb(invoice))

    async def CloseDueInvoices(
        self, request: pb.CloseDueInvoicesRequest, context: Any
    ) -> pb.CloseDueInvoicesResponse:
        del request
        async with self.tx(context) as (s, caller):
            caller.require_platform("closing invoices")
            closed = await invoices.close_due(s, datetime.now(UTC), self.ctx.invoice_grace)
            reply = [invoice_pb(i) for i in closed]
            for inv in closed:
                self.audit(
                    s, context, caller, "invoice.close", target_type="invoice", target_id=inv.id,
                    tenant_id=inv.tenant_id, after=invoice_pb(inv),
                )  # fmt: skip
        return pb.CloseDueInvoicesResponse(closed=reply)
