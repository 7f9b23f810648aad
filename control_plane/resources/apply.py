"""Apply a set of documents: the one reconcile core of ``tessera apply``, the config directory
and the Kubernetes controller.

Each resource is read from the store, compared with its document in the form the store would
keep it (the admin API's own validators and defaults), and changed only through the admin RPCs
(create, update, delete), so their validation, RBAC and audit are the apply's. All of it runs in
one transaction (``AdminServicerBase.batch``): any error rolls the whole set back and names the
document; a dry run rolls back at the end. ``applied_resources`` marks what an apply created or
took over and which manager did; prune deletes only that, never an imperative resource.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import validation as v
from control_plane.admin.auth import Caller
from control_plane.admin.base import AdminContext
from control_plane.admin.convert import aware, backend_pb, limit_pb, model_pb, plan_pb, rfc3339
from control_plane.admin.principals import PrincipalServiceServicer
from control_plane.admin.registry import LimitServiceServicer, ModelServiceServicer, backend_row
from control_plane.admin.tenants import PlanServiceServicer, TenantServiceServicer
from control_plane.db import models as db
from control_plane.db.repositories import ModelRepository
from control_plane.resources.documents import Document
from tessera import resources
from tessera.admin.v1 import admin_pb2 as pb
from tessera.errors import FailedPreconditionError, InvalidArgumentError, TesseraError

M = TypeVar("M", bound=Message)
DEFAULT_MANAGER = "tessera-apply"
CONFIG_DIR = "config-dir"  # the watched directory's manager
KUBERNETES = "kubernetes"  # the controller's
RESERVED_MANAGERS = frozenset({CONFIG_DIR, KUBERNETES})  # not for ApplyResources callers
LIMIT_IN_PLACE = frozenset({"limit", "shadow", "fail_mode"})  # UpdateLimit's mask; the rest: replace


@dataclass(frozen=True, slots=True)
class ApplyContext:
    """What the RPCs read of their gRPC context: only the request id, one for every audit record
    of the apply (the caller is the batch's; its credential goes no further)."""

    metadata: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, context: Any, origin: str) -> ApplyContext:
        pairs = tuple(
            (k, v)
            for k, v in ((context.invocation_metadata() or ()) if context else ())
            if isinstance(v, str)
        )
        request_id = next((v for k, v in pairs if k == "x-request-id" and v), f"{origin}-{uuid.uuid4()}")
        return cls((("x-request-id", request_id),))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


class _DryRun(Exception):  # noqa: N818 - control flow: roll the batch back
    def __init__(self, response: pb.ApplyResourcesResponse) -> None:
        super().__init__("dry run")
        self.response = response


def _differing(want: Message, have: Message) -> list[str]:
    """The top-level fields (proto names, as update masks take them) whose values differ."""
    return [
        f.name
        for f in want.DESCRIPTOR.fields
        if getattr(want, f.name) != getattr(have, f.name)
        or (f.has_presence and want.HasField(f.name) != have.HasField(f.name))
    ]


def _same_fields(src: Message, into: type[M], **given: Any) -> M:
    """A message of type ``into`` holding each field ``src`` has under the same name (a spec's
    fields into its create or update request), then ``given``."""
    names = {f.name for f in src.DESCRIPTOR.fields}
    values = {f.name: getattr(src, f.name) for f in into.DESCRIPTOR.fields if f.name in names}
    return into(**(values | given))


def _camel(spec: Message, fields: Iterable[str]) -> list[str]:
    """Proto field names → the document's (lowerCamelCase)."""
    return [spec.DESCRIPTOR.fields_by_name[f].camelcase_name for f in fields]


@dataclass
class _Run:
    """One apply: the batch's session, the response it builds."""

    applier: Applier
    s: AsyncSession
    context: Any
    manager: str
    dry_run: bool
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    response: pb.ApplyResourcesResponse = field(default_factory=pb.ApplyResourcesResponse)

    def change(self, doc_kind: str, name: str, action: str, fields: Sequence[str] = ()) -> pb.ResourceChange:
        return self.response.changes.add(kind=doc_kind, name=name, action=action, fields=list(fields))

    # --- the applied-by marker ---------------------------------------------------------------

    async def marker(self, kind: str, name: str) -> db.AppliedResource | None:
        return await self.s.get(db.AppliedResource, (kind, name))

    async def mark(self, doc: Document, target: str) -> None:
        row = await self.marker(doc.kind.name, doc.name)
        if row is None:
            self.s.add(
                db.AppliedResource(kind=doc.kind.name, name=doc.name, manager=self.manager, target=target)
            )
        else:
            row.target, row.applied_at = target, self.now
        await self.s.flush()

    async def apply(self, doc: Document) -> None:
        """Apply one document. A resource another manager applied may be declared here too,
        as long as this set changes nothing of it (it stays that manager's)."""
        kind = _KINDS[doc.kind.name]
        target = await kind.ident(self.s, doc.name, await kind.apply(self, doc))
        row = await self.marker(doc.kind.name, doc.name)
        if row is not None and row.manager != self.manager:
            if self.response.changes[-1].action != "unchanged":
                msg = (
                    f"{doc.ref} is applied by {row.manager!r}, not {self.manager!r}: change it in that "
                    "set, or remove it from that set first"
                )
                raise FailedPreconditionError(msg)
            return
        if target is not None:
            await self.mark(doc, target)

    async def prune(self, kinds: set[str], keep: set[tuple[str, str]]) -> None:
        rows = (
            await self.s.scalars(
                select(db.AppliedResource).where(
                    db.AppliedResource.manager == self.manager, db.AppliedResource.kind.in_(kinds)
                )
            )
        ).all()
        doomed = [r for r in rows if (r.kind, r.name) not in keep]
        for row in sorted(doomed, key=lambda r: (-resources.ORDER[r.kind], r.name)):
            kind = _KINDS[row.kind]
            # Only the very resource that was applied: one deleted and made again imperatively
            # since has another id, and is not this manager's to delete (the marker is stale).
            if await kind.ident(self.s, row.name, row.target) == row.target:
                await kind.delete(self, row.name, row.target)
                self.change(row.kind, row.name, "deleted")
            await self.s.delete(row)
        await self.s.flush()


# --- per kind ---------------------------------------------------------------------------------


class _Kind:
    async def apply(self, run: _Run, doc: Document) -> str:
        """Create or update the resource; returns its target (see ``AppliedResource``)."""
        raise NotImplementedError

    async def ident(self, s: AsyncSession, name: str, applied: str) -> str | None:
        """The id of the live resource ``name`` (what a marker holds), None when there is none;
        ``applied``: what ``apply`` returned."""
        raise NotImplementedError

    async def delete(self, run: _Run, name: str, target: str) -> None:
        raise NotImplementedError

    async def export(self, s: AsyncSession) -> list[tuple[str, Message]]:
        """Every resource of the kind as ``(name, spec)``."""
        raise NotImplementedError


def _row_ident(row: Any) -> str | None:
    """An integer id with its creation time: SQLite may give a new row the id of a deleted one."""
    if row is None:
        return None
    created = aware(row[1])
    return f"{row[0]}@{created.timestamp() if created else 0}"


class _Plans(_Kind):
    @staticmethod
    def spec_of(row: db.Plan) -> pb.PlanSpec:
        p = plan_pb(row)
        return pb.PlanSpec(priority=p.priority, limits=p.limits)

    async def apply(self, run: _Run, doc: Document) -> str:
        spec: pb.PlanSpec = doc.spec  # type: ignore[assignment]
        limits = v.plan_limits([(x.kind, x.window, x.limit) for x in spec.limits])
        want = pb.PlanSpec(priority=spec.priority, limits=[pb.PlanLimit(**x) for x in limits])  # type: ignore[arg-type]
        row = await run.s.scalar(select(db.Plan).where(db.Plan.name == doc.name))
        svc = run.applier.plans
        if row is None:
            await svc.CreatePlan(
                pb.CreatePlanRequest(name=doc.name, priority=want.priority, limits=want.limits), run.context
            )
            run.change("Plan", doc.name, "created")
        elif fields := _differing(want, self.spec_of(row)):
            await svc.UpdatePlan(
                pb.UpdatePlanRequest(
                    plan=doc.name, update_mask=fields, priority=want.priority, limits=want.limits
                ),
                run.context,
            )
            run.change("Plan", doc.name, "updated", _camel(want, fields))
        else:
            run.change("Plan", doc.name, "unchanged")
        return doc.name

    async def ident(self, s: AsyncSession, name: str, applied: str) -> str | None:
        return _row_ident(
            (await s.execute(select(db.Plan.id, db.Plan.created_at).where(db.Plan.name == name))).first()
        )

    async def delete(self, run: _Run, name: str, target: str) -> None:
        await run.applier.plans.DeletePlan(pb.DeletePlanRequest(plan=name), run.context)

    async def export(self, s: AsyncSession) -> list[tuple[str, Message]]:
        rows = (await s.scalars(select(db.Plan).order_by(db.Plan.name))).all()
        return [(r.name, self.spec_of(r)) for r in rows]


async def _active_keys(s: AsyncSession, tenant_id: str, now: datetime) -> dict[str, list[str]]:
    """Name → allowed models of the tenant's usable keys."""
    rows = (
        await s.scalars(
            select(db.ApiKey).where(db.ApiKey.tenant_id == tenant_id, db.ApiKey.revoked_at.is_(None))
        )
    ).all()
    live = [r for r in rows if r.expires_at is None or r.expires_at.replace(tzinfo=UTC) > now]
    return {r.name: sorted(r.allowed_models) for r in sorted(live, key=lambda r: r.generation)}


class _Tenants(_Kind):
    @staticmethod
    def spec_of(row: db.Tenant) -> pb.TenantSpec:
        return pb.TenantSpec(plan=row.plan or "", allowed_models=sorted(row.allowed_models))

    async def apply(self, run: _Run, doc: Document) -> str:
        spec: pb.TenantSpec = doc.spec  # type: ignore[assignment]
        want = pb.TenantSpec(
            plan=spec.plan, allowed_models=v.model_names(list(spec.allowed_models), "allowedModels")
        )
        row = await run.s.scalar(select(db.Tenant).where(db.Tenant.name == doc.name))
        svc = run.applier.tenants
        if row is not None and row.status == "deleted":
            raise FailedPreconditionError(
                f"tenant {doc.name!r} was deleted: a deleted tenant's name is not reused"
            )
        if row is None:
            await svc.CreateTenant(
                pb.CreateTenantRequest(name=doc.name, plan=want.plan, allowed_models=want.allowed_models),
                run.context,
            )
            run.change("Tenant", doc.name, "created")
            row = await run.s.scalar(select(db.Tenant).where(db.Tenant.name == doc.name))
            assert row is not None  # noqa: S101 - just created in this transaction
        elif fields := _differing(want, self.spec_of(row)):
            await svc.UpdateTenant(
                pb.UpdateTenantRequest(
                    tenant=doc.name,
                    update_mask=fields,
                    plan=want.plan,
                    allowed_models=want.allowed_models,
                ),
                run.context,
            )
            run.change("Tenant", doc.name, "updated", _camel(want, fields))
        else:
            run.change("Tenant", doc.name, "unchanged")
        have = await _active_keys(run.s, row.id, run.now)
        for key in spec.keys:
            if key.name not in have:
                run.response.warnings.append(
                    f"Tenant/{doc.name}: declares API key {key.name!r}, which it does not have "
                    f"(create it: tessera keys create --tenant {doc.name} --name {key.name})"
                )
            elif sorted(key.allowed_models) != have[key.name]:
                run.response.warnings.append(
                    f"Tenant/{doc.name}: API key {key.name!r} allows {have[key.name] or 'every model'}, "
                    f"the document says {sorted(key.allowed_models) or 'every model'}"
                )
        return doc.name

    async def ident(self, s: AsyncSession, name: str, applied: str) -> str | None:
        found = await s.scalar(
            select(db.Tenant.id).where(db.Tenant.name == name, db.Tenant.status != "deleted")
        )
        return None if found is None else str(found)

    async def delete(self, run: _Run, name: str, target: str) -> None:
        await run.applier.tenants.DeleteTenant(pb.DeleteTenantRequest(tenant=target), run.context)

    async def export(self, s: AsyncSession) -> list[tuple[str, Message]]:
        rows = (
            await s.scalars(select(db.Tenant).where(db.Tenant.status != "deleted").order_by(db.Tenant.name))
        ).all()
        now = datetime.now(UTC)
        out: list[tuple[str, Message]] = []
        for r in rows:
            spec = self.spec_of(r)
            for name, models in sorted((await _active_keys(s, r.id, now)).items()):
                spec.keys.add(name=name, allowed_models=models)
            out.append((r.name, spec))
        return out


def _document_backend(b: pb.Backend) -> pb.Backend:
    out = pb.Backend()
    out.CopyFrom(b)
    out.ClearField("credential")
    out.ClearField("has_credential")
    return out


class _Models(_Kind):
    @staticmethod
    def spec_of(row: db.Model) -> pb.ModelSpec:
        m = model_pb(row)
        return pb.ModelSpec(
            visibility=m.visibility,
            backends=sorted((_document_backend(b) for b in m.backends), key=lambda b: b.url),
            prices=[_same_fields(p, pb.PriceSpec) for p in m.prices],
            aliases=sorted(m.aliases),
            default_max_tokens=m.default_max_tokens,
            max_max_tokens=m.max_max_tokens,
            realtime=m.realtime,
        )

    def wanted(self, run: _Run, spec: pb.ModelSpec, row: db.Model | None) -> pb.ModelSpec:
        """The spec as the store keeps it; credentials stay as they are (documents have none)."""
        if not spec.backends:
            raise InvalidArgumentError("spec.backends", "a model needs at least one backend")
        sealed = {b.url: b.credential_sealed for b in row.backends} if row is not None else {}
        backends = []
        urls: set[str] = set()
        for i, b in enumerate(spec.backends):
            stored = backend_row(b, run.applier.pepper)
            if stored.url in urls:
                raise InvalidArgumentError(f"spec.backends[{i}].url", f"{stored.url} is listed twice")
            urls.add(stored.url)
            stored.credential_sealed = sealed.get(stored.url)
            backends.append(_document_backend(backend_pb(stored)))
        prices: list[pb.PriceSpec] = []
        for i, p in enumerate(spec.prices):
            if not p.effective_time:
                raise InvalidArgumentError(f"spec.prices[{i}].effectiveTime", "is required in a document")
            effective = v.effective_time(p.effective_time, run.now)
            if any(q.effective_time == rfc3339(effective) for q in prices):
                raise InvalidArgumentError(f"spec.prices[{i}].effectiveTime", "two prices from the same time")
            input_micros = v.micros(p.input_micros, "inputMicros")
            prices.append(
                pb.PriceSpec(
                    effective_time=rfc3339(effective),
                    input_micros=input_micros,
                    output_micros=v.micros(p.output_micros, "outputMicros"),
                    cached_micros=p.cached_micros if p.HasField("cached_micros") else input_micros,
                    currency=v.currency(p.currency),
                )
            )
        return pb.ModelSpec(
            visibility=v.visibility(spec.visibility),
            backends=sorted(backends, key=lambda b: b.url),
            prices=sorted(prices, key=lambda p: p.effective_time),
            aliases=v.model_names(list(spec.aliases), "aliases"),
            default_max_tokens=v.max_tokens(spec.default_max_tokens, "defaultMaxTokens") or 0,
            max_max_tokens=v.max_tokens(spec.max_max_tokens, "maxMaxTokens") or 0,
            realtime=spec.realtime,
        )

    async def apply(self, run: _Run, doc: Document) -> str:
        repo = ModelRepository(run.s)
        row = await repo.get(doc.name)
        want = self.wanted(run, doc.spec, row)  # type: ignore[arg-type]
        svc, ctx = run.applier.models, run.context
        if row is None:
            await svc.AddModel(
                pb.AddModelRequest(name=doc.name, backend=want.backends[0], visibility=want.visibility), ctx
            )
            row = await repo.get(doc.name)
            assert row is not None  # noqa: S101 - just created in this transaction
            have = self.spec_of(row)
            created = True
        else:
            have, created = self.spec_of(row), False
        fields = _differing(want, have)
        if "backends" in fields:
            await self._backends(run, doc.name, want.backends, have.backends)
        if "prices" in fields:
            await self._prices(run, doc.name, want.prices, have.prices)
        mask = [f for f in fields if f not in {"backends", "prices"}]
        if mask:
            await svc.UpdateModel(
                _same_fields(want, pb.UpdateModelRequest, name=doc.name, update_mask=mask), ctx
            )
        if created:
            run.change("Model", doc.name, "created")
        else:
            run.change("Model", doc.name, "updated" if fields else "unchanged", _camel(want, fields))
        return doc.name

    @staticmethod
    async def _backends(run: _Run, name: str, want: Sequence[pb.Backend], have: Sequence[pb.Backend]) -> None:
        svc, ctx = run.applier.models, run.context
        current = {b.url: b for b in have}
        wanted = {b.url: b for b in want}
        for url, b in wanted.items():  # add before removing: a model never has no backend
            if url not in current:
                await svc.AddBackend(pb.AddBackendRequest(name=name, backend=b), ctx)
            elif fields := _differing(b, current[url]):
                await svc.UpdateBackend(
                    _same_fields(b, pb.UpdateBackendRequest, name=name, update_mask=fields), ctx
                )
        for url in current.keys() - wanted.keys():
            await svc.RemoveBackend(pb.RemoveBackendRequest(name=name, url=url), ctx)

    @staticmethod
    async def _prices(
        run: _Run, name: str, want: Sequence[pb.PriceSpec], have: Sequence[pb.PriceSpec]
    ) -> None:
        current = {p.effective_time: p for p in have}
        wanted = {p.effective_time: p for p in want}
        if missing := sorted(current.keys() - wanted.keys()):
            msg = (
                f"model {name!r} has a price from {missing[0]} that the document lacks: prices are "
                "history and never removed; add it to the document"
            )
            raise FailedPreconditionError(msg)
        for when, p in sorted(wanted.items()):
            if when in current and current[when] != p:
                msg = (
                    f"model {name!r} already has a different price from {when}: a price never changes; "
                    "add a new one from a later time"
                )
                raise FailedPreconditionError(msg)
            if when not in current:
                await run.applier.models.SetModelPrice(
                    _same_fields(p, pb.SetModelPriceRequest, name=name), run.context
                )

    async def ident(self, s: AsyncSession, name: str, applied: str) -> str | None:
        return _row_ident(
            (await s.execute(select(db.Model.id, db.Model.created_at).where(db.Model.name == name))).first()
        )

    async def delete(self, run: _Run, name: str, target: str) -> None:
        await run.applier.models.RemoveModel(pb.RemoveModelRequest(name=name), run.context)

    async def export(self, s: AsyncSession) -> list[tuple[str, Message]]:
        rows = list(await ModelRepository(s).list(after="", limit=1_000_000))
        return [(r.name, self.spec_of(r)) for r in rows]


async def _tenant_name(s: AsyncSession, ident: str, field: str) -> str:
    row = await s.scalar(select(db.Tenant).where((db.Tenant.name == ident) | (db.Tenant.id == ident)))
    if row is None or row.status == "deleted":
        raise InvalidArgumentError(field, f"no tenant {ident!r}")
    return row.name


class _Limits(_Kind):
    @staticmethod
    async def spec_of(s: AsyncSession, row: db.Limit) -> pb.LimitSpec:
        x = limit_pb(row)
        tenant = await s.get(db.Tenant, row.tenant_id)
        return _same_fields(x, pb.LimitSpec, tenant=tenant.name if tenant else row.tenant_id)

    @staticmethod
    async def wanted(s: AsyncSession, spec: pb.LimitSpec) -> pb.LimitSpec:
        kind = v.limit_kind(spec.kind)
        return pb.LimitSpec(
            tenant=await _tenant_name(s, spec.tenant, "spec.tenant"),
            key_id=v.short_text(spec.key_id, "keyId", 32),
            model=v.model_name(spec.model, "model") if spec.model else "",
            kind=kind,
            window=v.window_name(kind, v.limit_window(kind, spec.window)),
            limit=v.limit_value(spec.limit),
            shadow=spec.shadow,
            fail_mode="closed" if v.fail_mode(spec.fail_mode) else "open",
            prompt_weight=v.weight_percent(spec.prompt_weight, "promptWeight"),
            completion_weight=v.weight_percent(spec.completion_weight, "completionWeight"),
        )

    @staticmethod
    async def find(run: _Run, name: str) -> db.Limit | None:
        """The limit a document names: the one it was applied as, else one whose id is the name
        (an exported imperative limit)."""
        mark = await run.marker("Limit", name)
        if mark is not None:
            return await run.s.get(db.Limit, mark.target)
        claimed = await run.s.scalar(
            select(db.AppliedResource.name).where(
                db.AppliedResource.kind == "Limit", db.AppliedResource.target == name
            )
        )
        return None if claimed is not None else await run.s.get(db.Limit, name)

    async def _create(self, run: _Run, want: pb.LimitSpec) -> str:
        reply = await run.applier.limits.CreateLimit(_same_fields(want, pb.CreateLimitRequest), run.context)
        return str(reply.limit.id)

    async def apply(self, run: _Run, doc: Document) -> str:
        want = await self.wanted(run.s, doc.spec)  # type: ignore[arg-type]
        row = await self.find(run, doc.name)
        if row is None:
            target = await self._create(run, want)
            run.change("Limit", doc.name, "created")
            return target
        fields = _differing(want, await self.spec_of(run.s, row))
        if not fields:
            run.change("Limit", doc.name, "unchanged")
            return row.id
        run.change("Limit", doc.name, "updated", _camel(want, fields))
        if set(fields) <= LIMIT_IN_PLACE:  # counters are keyed by limit id: they carry over
            await run.applier.limits.UpdateLimit(
                pb.UpdateLimitRequest(
                    id=row.id,
                    update_mask=fields,
                    limit=want.limit,
                    shadow=want.shadow,
                    fail_mode=want.fail_mode,
                ),
                run.context,
            )
            return row.id
        await run.applier.limits.DeleteLimit(pb.DeleteLimitRequest(id=row.id), run.context)
        return await self._create(run, want)

    async def ident(self, s: AsyncSession, name: str, applied: str) -> str | None:
        return applied if await s.get(db.Limit, applied) is not None else None

    async def delete(self, run: _Run, name: str, target: str) -> None:
        await run.applier.limits.DeleteLimit(pb.DeleteLimitRequest(id=target), run.context)

    async def export(self, s: AsyncSession) -> list[tuple[str, Message]]:
        names = {
            m.target: m.name
            for m in (await s.scalars(select(db.AppliedResource).where(db.AppliedResource.kind == "Limit")))
        }
        live = select(db.Tenant.id).where(db.Tenant.status != "deleted")
        rows = (
            await s.scalars(select(db.Limit).where(db.Limit.tenant_id.in_(live)).order_by(db.Limit.id))
        ).all()
        out = [(names.get(r.id, r.id), await self.spec_of(s, r)) for r in rows]
        return sorted(out, key=lambda x: x[0])


class _Principals(_Kind):
    @staticmethod
    async def spec_of(s: AsyncSession, row: db.Principal) -> pb.PrincipalSpec:
        bindings = []
        for b in row.bindings:
            tenant = await s.get(db.Tenant, b.tenant_id) if b.tenant_id else None
            if b.tenant_id and (tenant is None or tenant.status == "deleted"):
                continue  # a deleted tenant's role is no role (and could not be applied back)
            bindings.append(pb.RoleBinding(role=b.role, tenant_id=tenant.name if tenant else ""))
        return pb.PrincipalSpec(kind=row.kind, bindings=sorted(bindings, key=lambda b: (b.role, b.tenant_id)))

    async def apply(self, run: _Run, doc: Document) -> str:
        spec: pb.PrincipalSpec = doc.spec  # type: ignore[assignment]
        bindings = [
            pb.RoleBinding(
                role=b.role,
                tenant_id=await _tenant_name(run.s, b.tenant_id, f"spec.bindings[{i}].tenantId")
                if b.tenant_id
                else "",
            )
            for i, b in enumerate(spec.bindings)
        ]
        if len({(b.role, b.tenant_id) for b in bindings}) != len(bindings):
            raise InvalidArgumentError("spec.bindings", "a binding is listed twice")
        want = pb.PrincipalSpec(
            kind=v.principal_kind(spec.kind), bindings=sorted(bindings, key=lambda b: (b.role, b.tenant_id))
        )
        row = await run.s.scalar(select(db.Principal).where(db.Principal.name == doc.name))
        svc, ctx = run.applier.principals, run.context
        if row is None:
            reply = await svc.CreatePrincipal(
                pb.CreatePrincipalRequest(name=doc.name, kind=want.kind, bindings=want.bindings), ctx
            )
            change = run.change("Principal", doc.name, "created")
            if not run.dry_run:
                change.key = reply.key
            return doc.name
        if row.status != "active":
            raise FailedPreconditionError(f"principal {doc.name!r} is disabled: it cannot be applied again")
        have = await self.spec_of(run.s, row)
        fields = _differing(want, have)
        if "kind" in fields:
            raise FailedPreconditionError(
                f"principal {doc.name!r} is a {row.kind}: a principal's kind never changes"
            )
        key: Callable[[pb.RoleBinding], tuple[str, str]] = lambda b: (b.role, b.tenant_id)  # noqa: E731
        current, wanted = {key(b) for b in have.bindings}, {key(b) for b in want.bindings}
        for role, tenant in sorted(wanted - current):
            binding = pb.RoleBinding(role=role, tenant_id=tenant)
            await svc.AddRoleBinding(pb.AddRoleBindingRequest(principal=doc.name, binding=binding), ctx)
        for role, tenant in sorted(current - wanted):
            binding = pb.RoleBinding(role=role, tenant_id=tenant)
            await svc.RemoveRoleBinding(pb.RemoveRoleBindingRequest(principal=doc.name, binding=binding), ctx)
        run.change("Principal", doc.name, "updated" if fields else "unchanged", _camel(want, fields))
        return doc.name

    async def ident(self, s: AsyncSession, name: str, applied: str) -> str | None:
        found = await s.scalar(
            select(db.Principal.id).where(db.Principal.name == name, db.Principal.status == "active")
        )
        return None if found is None else str(found)

    async def delete(self, run: _Run, name: str, target: str) -> None:
        await run.applier.principals.DisablePrincipal(
            pb.DisablePrincipalRequest(principal=target), run.context
        )

    async def export(self, s: AsyncSession) -> list[tuple[str, Message]]:
        rows = (
            await s.scalars(
                select(db.Principal).where(db.Principal.status == "active").order_by(db.Principal.name)
            )
        ).all()
        return [(r.name, await self.spec_of(s, r)) for r in rows]


_KINDS: dict[str, _Kind] = {
    "Plan": _Plans(),
    "Tenant": _Tenants(),
    "Model": _Models(),
    "Limit": _Limits(),
    "Principal": _Principals(),
}


class Applier:
    """Applies and exports documents with the admin servicers' own code."""

    def __init__(self, ctx: AdminContext) -> None:
        self.pepper = ctx.pepper
        self.tenants = TenantServiceServicer(ctx)
        self.plans = PlanServiceServicer(ctx)
        self.models = ModelServiceServicer(ctx)
        self.limits = LimitServiceServicer(ctx)
        self.principals = PrincipalServiceServicer(ctx)

    async def apply(
        self,
        docs: Sequence[Document],
        context: Any,
        *,
        caller: Caller | None = None,
        dry_run: bool = False,
        prune: bool = False,
        manager: str = "",
        keep: frozenset[tuple[str, str]] = frozenset(),
        whole: bool = False,
    ) -> pb.ApplyResourcesResponse:
        """Prune considers the kinds in the set, or with ``whole`` every kind (the set is all
        there is: the Kubernetes controller's objects); ``keep``: (kind, name) of resources prune
        must leave although no document declares them (objects whose spec is invalid now)."""
        manager = v.short_text(manager, "manager", 63) or DEFAULT_MANAGER
        inner = ApplyContext.of(context, manager)  # what the RPCs see: one request id, no credential
        try:
            # a dry run's audit log lines say so: they record RPCs whose transaction rolls back
            tag = {"dry_run": True} if dry_run else {}
            with structlog.contextvars.bound_contextvars(**tag):
                async with self.tenants.batch(context, caller) as (s, who):
                    who.require_platform("applying resources")
                    run = _Run(self, s, inner, manager, dry_run)
                    for doc in sorted(docs, key=lambda d: resources.ORDER[d.kind.name]):
                        try:
                            await run.apply(doc)
                        except TesseraError as exc:
                            exc.args = (f"{doc.source}: {doc.ref}: {exc.args[0] if exc.args else exc}",)
                            exc.document = (doc.kind.name, doc.name)  # type: ignore[attr-defined]
                            raise
                    if prune:
                        kinds = set(resources.BY_NAME) if whole else {d.kind.name for d in docs}
                        await run.prune(kinds, {(d.kind.name, d.name) for d in docs} | keep)
                    if dry_run:
                        raise _DryRun(run.response)  # noqa: TRY301 - unwinds the batch
        except _DryRun as done:
            return done.response
        if any(c.action != "unchanged" for c in run.response.changes):
            await self.tenants.publish()
        return run.response

    async def export(self, context: Any, kind: str = "", name: str = "") -> list[dict[str, Any]]:
        chosen = [resources.kind_of(kind)] if kind else list(resources.KINDS)
        if None in chosen:
            raise InvalidArgumentError("kind", f"must be one of {', '.join(resources.BY_NAME)}")
        docs: list[dict[str, Any]] = []
        async with self.tenants.read(context) as (s, who):
            who.require_platform("exporting resources")
            for k in chosen:
                assert k is not None  # noqa: S101 - checked above
                for n, spec in await _KINDS[k.name].export(s):
                    if not name or n == name:
                        docs.append(resources.document(k, n, spec))
        return docs


def failed_document(exc: TesseraError) -> tuple[str, str] | None:
    """The (kind, name) of the document an apply failed at, if it failed at one."""
    found = getattr(exc, "document", None)
    return found if isinstance(found, tuple) else None
