"""Store rows → admin API messages (never a secret or a digest)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf import json_format
from google.protobuf.message import Message

from control_plane import validation as v
from control_plane.db import models as db
from tessera.admin.v1 import admin_pb2 as pb


def aware(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:  # SQLite returns naive datetimes; we store UTC
        return dt.replace(tzinfo=UTC)
    return dt


def rfc3339(dt: datetime | None) -> str:
    dt = aware(dt)
    if dt is None:
        return ""
    utc = dt.astimezone(UTC)  # the year by hand: strftime's %Y does not pad years before 1000
    return f"{utc.year:04d}" + utc.strftime("-%m-%dT%H:%M:%SZ")


def as_json(msg: Message | None) -> str:
    """Audit before/after: proto3 JSON with proto field names, stable key order."""
    if msg is None:
        return ""
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def tenant_pb(t: db.Tenant) -> pb.Tenant:
    return pb.Tenant(
        id=t.id,
        name=t.name,
        status=t.status,
        plan=t.plan or "",
        allowed_models=t.allowed_models,
        create_time=rfc3339(t.created_at),
        update_time=rfc3339(t.updated_at),
    )


def plan_pb(p: db.Plan) -> pb.Plan:
    return pb.Plan(
        name=p.name,
        priority=p.priority,
        limits=[
            pb.PlanLimit(kind=str(x["kind"]), window=str(x["window"]), limit=int(str(x["limit"])))
            for x in p.limits
        ],
        create_time=rfc3339(p.created_at),
        update_time=rfc3339(p.updated_at),
    )


def principal_pb(p: db.Principal) -> pb.Principal:
    live = [c for c in p.credentials if c.revoked_at is None]
    return pb.Principal(
        id=p.id,
        name=p.name,
        kind=p.kind,
        status=p.status,
        bindings=[pb.RoleBinding(role=b.role, tenant_id=b.tenant_id or "") for b in p.bindings],
        create_time=rfc3339(p.created_at),
        key_prefix=live[-1].prefix if live else "",
    )


def key_status(current: db.ApiKey, now: datetime) -> str:
    if current.revoked_at is not None:
        return "revoked"
    expires = aware(current.expires_at)
    if expires is not None and expires <= now:
        return "expired"
    return "active"


def key_pb(secrets: Sequence[db.ApiKey], now: datetime) -> pb.ApiKey:
    """One logical key from all of its secrets (newest generation is current)."""
    ordered = sorted(secrets, key=lambda s: s.generation)
    current, first = ordered[-1], ordered[0]
    msg = pb.ApiKey(
        id=current.key_id,
        tenant_id=current.tenant_id,
        name=current.name,
        prefix=current.prefix,
        status=key_status(current, now),
        create_time=rfc3339(first.created_at),
        expire_time=rfc3339(current.expires_at),
        allowed_models=current.allowed_models,
        owner=first.created_by or "",
        last_rotation_time=rfc3339(current.created_at) if current.generation > 1 else "",
        secret_id=current.id,
    )
    if len(ordered) > 1:
        previous = ordered[-2]
        grace = aware(previous.grace_until)
        if grace is not None and grace > now and previous.revoked_at is None:
            msg.previous_prefix = previous.prefix
            msg.previous_grace_until = rfc3339(grace)
    return msg


def backend_pb(b: db.Backend) -> pb.Backend:
    return pb.Backend(
        url=b.url,
        kind=b.kind,
        weight=b.weight,
        priority=b.priority,
        max_concurrency=b.max_concurrency or 0,
        # The credential itself is write-only: only whether one is set comes back.
        has_credential=b.credential_sealed is not None,
        credential_header=(b.credential_header or "authorization") if b.credential_sealed else "",
        ca_bundle=b.ca_bundle or "",
        sni=b.sni or "",
        health_path=b.health_path or "",
        timeout_seconds=b.timeout_seconds or 0,
        idle_timeout_seconds=b.idle_timeout_seconds or 0,
    )


def model_pb(m: db.Model) -> pb.Model:
    return pb.Model(
        name=m.name,
        visibility=m.visibility,
        create_time=rfc3339(m.created_at),
        backends=[backend_pb(b) for b in m.backends],
        aliases=[a.alias for a in m.aliases],
        realtime=m.realtime,
        default_max_tokens=m.default_max_tokens or 0,
        max_max_tokens=m.max_max_tokens or 0,
        prices=[
            pb.ModelPrice(
                effective_time=rfc3339(p.effective_at),
                input_micros=p.input_micros,
                output_micros=p.output_micros,
                cached_micros=p.cached_micros,
                currency=p.currency,
            )
            for p in m.prices
        ],
    )


def limit_pb(lim: db.Limit) -> pb.Limit:
    return pb.Limit(
        id=lim.id,
        tenant_id=lim.tenant_id,
        key_id=lim.key_id or "",
        model=lim.model or "",
        kind=lim.kind,
        window=v.window_name(lim.kind, lim.window_seconds),
        limit=lim.limit,
        shadow=lim.shadow,
        fail_mode="closed" if lim.fail_closed else "open",
        create_time=rfc3339(lim.created_at),
        prompt_weight=lim.prompt_weight,
        completion_weight=lim.completion_weight,
    )


def audit_pb(e: db.AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=str(e.id),
        time=rfc3339(e.time),
        actor=e.actor_id,
        actor_name=e.actor_name,
        action=e.action,
        target_type=e.target_type,
        target_id=e.target_id,
        tenant_id=e.tenant_id or "",
        request_id=e.request_id,
        before=e.before,
        after=e.after,
    )


def invoice_pb(i: db.Invoice) -> pb.Invoice:
    return pb.Invoice(
        id=i.id,
        tenant_id=i.tenant_id,
        period_start=rfc3339(i.period_start),
        period_end=rfc3339(i.period_end),
        currency=i.currency,
        status=i.status,
        total_micros=i.total_micros,
        close_time=rfc3339(i.closed_at),
        lines=[
            pb.InvoiceLine(
                kind=ln.kind,
                model=ln.model,
                usage_month=rfc3339(ln.usage_month)[:7],
                price_from=rfc3339(ln.price_from),
                input_micros=ln.input_micros,
                output_micros=ln.output_micros,
                cached_micros=ln.cached_micros,
                requests=ln.requests,
                prompt_tokens=ln.prompt_tokens,
                completion_tokens=ln.completion_tokens,
                cached_tokens=ln.cached_tokens,
                amount_micros=ln.amount_micros,
                unpriced=ln.price_from is None,
            )
            for ln in i.lines
        ],
    )
