"""ModelService and LimitService (the model-routing and rate-limit issues deepen both)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from control_plane import validation as v
from control_plane.admin.base import AdminServicerBase
from control_plane.admin.convert import limit_pb, model_pb
from control_plane.db.models import Backend, Limit, Tenant
from control_plane.db.repositories import ModelRepository
from tessera import keys
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc
from tessera.errors import InvalidArgumentError


class ModelServiceServicer(AdminServicerBase, admin_pb2_grpc.ModelServiceServicer):
    async def AddModel(self, request: pb.AddModelRequest, context: Any) -> pb.AddModelResponse:
        name = v.model_name(request.name)
        if not request.HasField("backend") or not request.backend.url:
            raise InvalidArgumentError("backend.url", "is required")
        backend = Backend(
            url=v.backend_url(request.backend.url),
            kind=v.backend_kind(request.backend.kind),
            weight=min(request.backend.weight or 1, 10_000),
            priority=min(request.backend.priority, 1_000),
        )
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
        window = v.window_seconds(request.window)
        if not 0 < request.limit < 2**62:
            raise InvalidArgumentError("limit", "must be a positive integer")
        model = v.model_name(request.model, "model") if request.model else None
        key_id = v.short_text(request.key_id, "key_id", 32) or None
        fail_closed = v.fail_mode(request.fail_mode)
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
                limit=request.limit,
                shadow=request.shadow,
                fail_closed=fail_closed,
            )
            s.add(row)
            await s.flush()
            reply = limit_pb(row)
            self.audit(
                s,
                context,
                caller,
                "limit.create",
                target_type="limit",
                target_id=row.id,
                tenant_id=tenant.id,
                after=reply,
            )
        await self.publish()
        return pb.CreateLimitResponse(limit=reply)

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
