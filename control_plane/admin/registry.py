"""ModelService and LimitService (the model-routing and rate-limit issues deepen both)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import sealing
from control_plane import validation as v
from control_plane.admin.base import AdminServicerBase
from control_plane.admin.convert import aware, limit_pb, model_pb, rfc3339
from control_plane.db.models import Backend, Limit, Model, ModelPrice, Tenant
from control_plane.db.repositories import ModelRepository, as_utc, attach_backend
from control_plane.usage import ledger
from tessera import keys
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc
from tessera.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError

MAX_CONCURRENCY = 1_000_000


def _weight(value: int) -> int:
    return min(value or 1, 10_000)


def backend_row(msg: pb.Backend, pepper: bytes) -> Backend:
    """The stored form of a backend message (validated; a declarative apply compares with it)."""
    if not msg.url:
        raise InvalidArgumentError("backend.url", "is required")
    b = Backend(
        url=v.backend_url(msg.url),
        kind=v.backend_kind(msg.kind),
        weight=_weight(msg.weight),
        priority=min(msg.priority, 1_000),
        max_concurrency=_concurrency(msg.max_concurrency),
        credential_header=v.credential_header(msg.credential_header),
        ca_bundle=v.ca_bundle(msg.ca_bundle),
        sni=v.sni(msg.sni),
        health_path=v.health_path(msg.health_path),
        timeout_seconds=v.timeout_seconds(msg.timeout_seconds, "backend.timeout_seconds"),
        idle_timeout_seconds=v.timeout_seconds(msg.idle_timeout_seconds, "backend.idle_timeout_seconds"),
    )
    if msg.credential:
        b.credential_sealed = sealing.seal(pepper, sealing.UPSTREAM_CREDENTIAL, v.credential(msg.credential))
    _check_tls(b)
    return b


def _check_tls(b: Backend) -> None:
    if (b.ca_bundle or b.sni) and not b.url.startswith("https://"):
        raise InvalidArgumentError("backend.ca_bundle", "TLS options need an https:// backend")


def _concurrency(value: int) -> int | None:
    if value > MAX_CONCURRENCY:
        raise InvalidArgumentError("max_concurrency", f"at most {MAX_CONCURRENCY}")
    return value or None


def _find_backend(model: Model, url: str) -> Backend:
    wanted = v.backend_url(url) if url else ""
    for b in model.backends:
        if b.url == wanted:
            return b
    raise NotFoundError(f"model {model.name!r} has no backend {url!r}")


BACKEND_FIELDS = frozenset(
    {"weight", "priority", "kind", "max_concurrency", "credential", "credential_header", "ca_bundle",
     "sni", "health_path", "timeout_seconds", "idle_timeout_seconds"}
)  # fmt: skip


def _backend_changes(request: pb.UpdateBackendRequest, pepper: bytes) -> dict[str, Any]:
    """Column -> new value for each field in the mask (validated before anything changes)."""
    mask = v.update_mask(list(request.update_mask), set(BACKEND_FIELDS))
    parse: dict[str, Callable[[], Any]] = {
        "weight": lambda: _weight(request.weight),
        "priority": lambda: min(request.priority, 1_000),
        "kind": lambda: v.backend_kind(request.kind),
        "max_concurrency": lambda: _concurrency(request.max_concurrency),
        "credential": lambda: (
            sealing.seal(pepper, sealing.UPSTREAM_CREDENTIAL, v.credential(request.credential))
            if request.credential
            else None
        ),
        "credential_header": lambda: v.credential_header(request.credential_header),
        "ca_bundle": lambda: v.ca_bundle(request.ca_bundle),
        "sni": lambda: v.sni(request.sni),
        "health_path": lambda: v.health_path(request.health_path),
        "timeout_seconds": lambda: v.timeout_seconds(request.timeout_seconds, "timeout_seconds"),
        "idle_timeout_seconds": lambda: v.timeout_seconds(
            request.idle_timeout_seconds, "idle_timeout_seconds"
        ),
    }
    column = {"credential": "credential_sealed"}
    return {column.get(f, f): parse[f]() for f in sorted(mask)}


def _repriced_usage(
    model: str, currency: str, changes: list[ledger.Repriced]
) -> dict[str, tuple[pb.UsageRow, pb.UsageRow]]:
    """Per tenant, its re-priced usage at the prices it had and at the new one (the audit
    record's before and after; each cost rounded once)."""
    by_tenant: dict[str, list[ledger.Repriced]] = defaultdict(list)
    for c in changes:
        by_tenant[c.tenant_id].append(c)

    def row(cs: list[ledger.Repriced], picos: int, currency: str, unpriced: int) -> pb.UsageRow:
        prompt, completion = sum(c.prompt_tokens for c in cs), sum(c.completion_tokens for c in cs)
        return pb.UsageRow(
            model=model,
            requests=sum(c.requests for c in cs),
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cached_tokens=sum(c.cached_tokens for c in cs),
            cost_micros=ledger.picos_to_micros(picos),
            currency=currency,
            unpriced_requests=unpriced,
        )

    return {
        tenant: (
            row(
                cs,
                sum(c.previous_picos for c in cs),
                next((c.previous_currency for c in cs if c.previous_currency), ""),
                sum(c.requests for c in cs if not c.previous_currency),
            ),
            row(cs, sum(c.picos for c in cs), currency, 0),
        )
        for tenant, cs in by_tenant.items()
    }


class ModelServiceServicer(AdminServicerBase, admin_pb2_grpc.ModelServiceServicer):
    async def AddModel(self, request: pb.AddModelRequest, context: Any) -> pb.AddModelResponse:
        name = v.model_name(request.name)
        if not request.HasField("backend"):
            raise InvalidArgumentError("backend.url", "is required")
        backend = backend_row(request.backend, self.ctx.pepper)
        visibility = v.visibility(request.visibility)
        async with self.tx(context) as (s, caller):
            caller.require_platform("changing the model registry")
            existing = await ModelRepository(s).get(name)
            before = model_pb(existing) if existing else None
            model = await ModelRepository(s).add_backend(
                name, backend, visibility=visibility, replace=request.replace_backends
            )
            reply = model_pb(model)
            self.audit(
                s,
                context,
                caller,
                "model.add_backend",
                target_type="model",
                target_id=name,
                tenant_id=None,
                before=before,
                after=reply,
            )
        await self.publish()
        return pb.AddModelResponse(model=reply)

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        async with self.read(context) as (s, caller):
            model = await self._model(s, request.name)
            if not await self._visible(s, caller, model):
                raise NotFoundError(f"model {request.name!r} not found")
            return pb.GetModelResponse(model=model_pb(model))

    async def AddBackend(self, request: pb.AddBackendRequest, context: Any) -> pb.AddBackendResponse:
        backend = backend_row(request.backend, self.ctx.pepper)
        return pb.AddBackendResponse(
            model=await self._change(
                context, request.name, "model.add_backend", lambda m: attach_backend(m, backend)
            )
        )

    async def UpdateBackend(self, request: pb.UpdateBackendRequest, context: Any) -> pb.UpdateBackendResponse:
        changes = _backend_changes(request, self.ctx.pepper)

        def change(m: Model) -> None:
            b = _find_backend(m, request.url)
            for column, value in changes.items():
                setattr(b, column, value)
            _check_tls(b)

        return pb.UpdateBackendResponse(
            model=await self._change(context, request.name, "model.update_backend", change)
        )

    async def RemoveBackend(self, request: pb.RemoveBackendRequest, context: Any) -> pb.RemoveBackendResponse:
        def change(m: Model) -> None:
            m.backends.remove(_find_backend(m, request.url))

        return pb.RemoveBackendResponse(
            model=await self._change(context, request.name, "model.remove_backend", change)
        )

    async def RemoveModel(self, request: pb.RemoveModelRequest, context: Any) -> pb.RemoveModelResponse:
        async with self.tx(context) as (s, caller):
            caller.require_platform("changing the model registry")
            model = await self._model(s, request.name)
            before = model_pb(model)
            await s.delete(model)
            self.audit(
                s, context, caller, "model.remove", target_type="model", target_id=model.name,
                tenant_id=None, before=before,
            )  # fmt: skip
        await self.publish()
        return pb.RemoveModelResponse()

    async def _change(
        self, context: Any, name: str, action: str, change: Callable[[Model], None]
    ) -> pb.Model:
        """Apply ``change`` to the model in one audited transaction, then publish."""
        async with self.tx(context) as (s, caller):
            caller.require_platform("changing the model registry")
            model = await self._model(s, name)
            before = model_pb(model)
            change(model)
            await s.flush()
            await s.refresh(model, ["backends", "aliases"])
            reply = model_pb(model)
            self.audit(
                s, context, caller, action, target_type="model", target_id=model.name,
                tenant_id=None, before=before, after=reply,
            )  # fmt: skip
        await self.publish()
        return reply

    @staticmethod
    async def _visible(s: AsyncSession, caller: Any, model: Model) -> bool:
        readable = caller.readable_tenants
        if readable is None or model.visibility == "public":
            return True
        tenants = (await s.scalars(select(Tenant).where(Tenant.id.in_(readable)))).all()
        return any(model.name in t.allowed_models for t in tenants)

    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Any) -> pb.UpdateModelResponse:
        mask = v.update_mask(
            list(request.update_mask),
            {"default_max_tokens", "max_max_tokens", "aliases", "realtime", "visibility"},
        )
        default = v.max_tokens(request.default_max_tokens, "default_max_tokens")
        maximum = v.max_tokens(request.max_max_tokens, "max_max_tokens")
        aliases = v.model_names(list(request.aliases), "aliases") if "aliases" in mask else []
        visibility = v.visibility(request.visibility) if "visibility" in mask else ""
        async with self.tx(context) as (s, caller):
            caller.require_platform("changing the model registry")
            model = await self._model(s, request.name)
            before = model_pb(model)
            if "default_max_tokens" in mask:
                model.default_max_tokens = default
            if "max_max_tokens" in mask:
                model.max_max_tokens = maximum
            if (
                model.default_max_tokens
                and model.max_max_tokens
                and model.default_max_tokens > model.max_max_tokens
            ):
                raise InvalidArgumentError("default_max_tokens", "must not exceed max_max_tokens")
            if "aliases" in mask:
                await ModelRepository(s).set_aliases(model, aliases)
            if "realtime" in mask:
                model.realtime = request.realtime
            if visibility:
                model.visibility = visibility
            await s.flush()
            reply = model_pb(model)
            self.audit(
                s, context, caller, "model.update", target_type="model", target_id=model.name,
                tenant_id=None, before=before, after=reply,
            )  # fmt: skip
        await self.publish()
        return pb.UpdateModelResponse(model=reply)

    async def SetModelPrice(self, request: pb.SetModelPriceRequest, context: Any) -> pb.SetModelPriceResponse:
        """Add a price; one whose ``from`` is earlier than usage already metered re-prices the
        rows it is in effect for that no closed invoice holds, in the same transaction
        (``ledger.reprice``), audited per tenant as ``usage.reprice``."""
        input_micros = v.micros(request.input_micros, "input_micros")
        output_micros = v.micros(request.output_micros, "output_micros")
        cached = (
            v.micros(request.cached_micros, "cached_micros")
            if request.HasField("cached_micros")
            else input_micros
        )
        currency = v.currency(request.currency)
        now = datetime.now(UTC)
        effective = v.effective_time(request.effective_time, now)
        async with self.tx(context) as (s, caller):
            caller.require_platform("pricing a model")
            await ledger.lock_prices(s, exclusive=True)  # the meters wait; then the prices are read
            model = await self._model(s, request.name)
            before = model_pb(model)
            if any(aware(p.effective_at) == effective for p in model.prices):
                raise AlreadyExistsError(
                    f"model {model.name!r} already has a price from {rfc3339(effective)}"
                )
            row = ModelPrice(
                effective_at=effective,
                input_micros=input_micros,
                output_micros=output_micros,
                cached_micros=cached,
                currency=currency,
            )
            model.prices.append(row)
            await s.flush()
            await s.refresh(model, ["prices"])
            reply = model_pb(model)
            self.audit(
                s, context, caller, "model.price", target_type="model", target_id=model.name,
                tenant_id=None, before=before, after=reply,
            )  # fmt: skip
            price = ledger.Price(row.id, effective, input_micros, output_micros, cached, currency)
            later = [as_utc(p.effective_at) for p in model.prices if as_utc(p.effective_at) > effective]
            _, changes = await ledger.reprice(s, model.name, price, min(later, default=None), now)
            for tenant, (was, now_is) in _repriced_usage(model.name, currency, changes).items():
                self.audit(
                    s, context, caller, "usage.reprice", target_type="model", target_id=model.name,
                    tenant_id=tenant, before=was, after=now_is,
                )  # fmt: skip
        await self.publish()
        return pb.SetModelPriceResponse(model=reply)

    @staticmethod
    async def _model(s: AsyncSession, name: str) -> Model:
        model = await ModelRepository(s).get(v.model_name(name))
        if model is None:
            raise NotFoundError(f"model {name!r} not found")
        return model

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        size, after = v.page(request.page_size, request.page_token)
        async with self.read(context) as (s, caller):
            rows = list(await ModelRepository(s).list(after=after, limit=size))
            token = v.next_token(len(rows), size, rows[-1].name if rows else "")
            if (readable := caller.readable_tenants) is not None:
                tenants = (await s.scalars(select(Tenant).where(Tenant.id.in_(readable)))).all()
                entitled = {m for t in tenants for m in t.allowed_models}
                rows = [m for m in rows if m.visibility == "public" or m.name in entitled]
            items = [model_pb(m) for m in rows]
        return pb.ListModelsResponse(items=items, next_page_token=token)


class LimitServiceServicer(AdminServicerBase, admin_pb2_grpc.LimitServiceServicer):
    async def CreateLimit(self, request: pb.CreateLimitRequest, context: Any) -> pb.CreateLimitResponse:
        kind = v.limit_kind(request.kind)
        window = v.limit_window(kind, request.window)
        limit = v.limit_value(request.limit)
        model = v.model_name(request.model, "model") if request.model else None
        key_id = v.short_text(request.key_id, "key_id", 32) or None
        fail_closed = v.fail_mode(request.fail_mode)
        prompt_weight = v.weight_percent(request.prompt_weight, "prompt_weight")
        completion_weight = v.weight_percent(request.completion_weight, "completion_weight")
        async with self.tx(context) as (s, caller):
            tenant = await self.tenant_for_read(s, caller, request.tenant)
            caller.require_platform("creating a limit")
            row = Limit(
                id=f"lim_{keys.new_public_id()}",
                tenant_id=tenant.id,
                key_id=key_id,
                model=model,
                kind=kind,
                window_seconds=window,
                limit=limit,
                shadow=request.shadow,
                fail_closed=fail_closed,
                prompt_weight=prompt_weight,
                completion_weight=completion_weight,
            )
            s.add(row)
            await s.flush()
            reply = limit_pb(row)
            self.audit(
                s, context, caller, "limit.create", target_type="limit", target_id=row.id,
                tenant_id=tenant.id, after=reply,
            )  # fmt: skip
        await self.publish()
        return pb.CreateLimitResponse(limit=reply)

    async def UpdateLimit(self, request: pb.UpdateLimitRequest, context: Any) -> pb.UpdateLimitResponse:
        """The limit value, shadow flag or fail mode; the counters are keyed by limit id, so the
        count carries over."""
        mask = v.update_mask(list(request.update_mask), {"limit", "shadow", "fail_mode"})
        limit = v.limit_value(request.limit) if "limit" in mask else 0
        fail_closed = v.fail_mode(request.fail_mode)
        async with self.tx(context) as (s, caller):
            row = await self._limit(s, caller, request.id)
            caller.require_platform("changing a limit")
            before = limit_pb(row)
            if "limit" in mask:
                row.limit = limit
            if "shadow" in mask:
                row.shadow = request.shadow
            if "fail_mode" in mask:
                row.fail_closed = fail_closed
            await s.flush()
            reply = limit_pb(row)
            self.audit(
                s, context, caller, "limit.update", target_type="limit", target_id=row.id,
                tenant_id=row.tenant_id, before=before, after=reply,
            )  # fmt: skip
        await self.publish()
        return pb.UpdateLimitResponse(limit=reply)

    async def DeleteLimit(self, request: pb.DeleteLimitRequest, context: Any) -> pb.DeleteLimitResponse:
        async with self.tx(context) as (s, caller):
            row = await self._limit(s, caller, request.id)
            caller.require_platform("deleting a limit")
            before = limit_pb(row)
            await s.delete(row)
            self.audit(
                s, context, caller, "limit.delete", target_type="limit", target_id=row.id,
                tenant_id=row.tenant_id, before=before,
            )  # fmt: skip
        await self.publish()
        return pb.DeleteLimitResponse()

    @staticmethod
    async def _limit(s: AsyncSession, caller: Any, ident: str) -> Limit:
        """The limit, or NOT_FOUND (also when its tenant is not the caller's to read)."""
        if not ident or len(ident) > 64:  # noqa: PLR2004 - longer than any id
            raise InvalidArgumentError("id", "must be a limit id")
        row = await s.get(Limit, ident)
        if row is None or not caller.can_read(row.tenant_id):
            raise NotFoundError(f"limit {ident!r} not found")
        return row

    async def ListLimits(self, request: pb.ListLimitsRequest, context: Any) -> pb.ListLimitsResponse:
        size, after = v.page(request.page_size, request.page_token)
        async with self.read(context) as (s, caller):
            stmt = select(Limit).where(Limit.id > after)
            if request.tenant:
                stmt = stmt.where(
                    Limit.tenant_id == (await self.tenant_for_read(s, caller, request.tenant)).id
                )
            elif (readable := caller.readable_tenants) is not None:
                stmt = stmt.where(Limit.tenant_id.in_(readable))
            rows = (await s.scalars(stmt.order_by(Limit.id).limit(size))).all()
        return pb.ListLimitsResponse(
            items=[limit_pb(x) for x in rows],
            next_page_token=v.next_token(len(rows), size, rows[-1].id if rows else ""),
        )
