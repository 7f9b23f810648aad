"""TenantService and PlanService."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from control_plane import validation as v
from control_plane.admin.base import AdminServicerBase
from control_plane.admin.convert import plan_pb, tenant_pb
from control_plane.db.models import ApiKey, Plan, Tenant
from tessera import keys
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc
from tessera.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError


async def _plan_exists(s: Any, name: str) -> str:
    if name and await s.scalar(select(Plan.id).where(Plan.name == name)) is None:
        raise InvalidArgumentError("plan", f"no plan named {name!r}")
    return name


class TenantServiceServicer(AdminServicerBase, admin_pb2_grpc.TenantServiceServicer):
    async def CreateTenant(self, request: pb.CreateTenantRequest, context: Any) -> pb.CreateTenantResponse:
        name = v.tenant_name(request.name)
        allowed = v.model_names(list(request.allowed_models), "allowed_models")
        async with self.tx(context) as (s, caller):
            caller.require_platform("creating a tenant")
            plan = await _plan_exists(s, request.plan)
            if await s.scalar(select(Tenant.id).where(Tenant.name == name)):
                raise AlreadyExistsError(f"tenant {name!r} already exists")
            tenant = Tenant(
                id=f"ten_{keys.new_public_id()}",
                name=name,
                status="active",
                plan=plan or None,
                allowed_models=allowed,
            )
            s.add(tenant)
            await s.flush()
            reply = tenant_pb(tenant)
            self.audit(
                s,
                context,
                caller,
                "tenant.create",
                target_type="tenant",
                target_id=tenant.id,
                tenant_id=tenant.id,
                after=reply,
            )
        await self.publish()
        return pb.CreateTenantResponse(tenant=reply)

    async def GetTenant(self, request: pb.GetTenantRequest, context: Any) -> pb.GetTenantResponse:
        async with self.read(context) as (s, caller):
            return pb.GetTenantResponse(
                tenant=tenant_pb(await self.tenant_for_read(s, caller, request.tenant))
            )

    async def ListTenants(self, request: pb.ListTenantsRequest, context: Any) -> pb.ListTenantsResponse:
        size, after = v.page(request.page_size, request.page_token)
        async with self.read(context) as (s, caller):
            stmt = select(Tenant).where(Tenant.id > after)
            readable = caller.readable_tenants
            if readable is not None:
                stmt = stmt.where(Tenant.id.in_(readable))
            if request.status:
                stmt = stmt.where(Tenant.status == v.short_text(request.status, "status", 16))
            if request.plan:
                stmt = stmt.where(Tenant.plan == v.short_text(request.plan, "plan", 63))
            rows = (await s.scalars(stmt.order_by(Tenant.id).limit(size))).all()
        return pb.ListTenantsResponse(
            items=[tenant_pb(t) for t in rows],
            next_page_token=v.next_token(len(rows), size, rows[-1].id if rows else ""),
        )

    async def UpdateTenant(self, request: pb.UpdateTenantRequest, context: Any) -> pb.UpdateTenantResponse:
        mask = v.update_mask(list(request.update_mask), {"plan", "allowed_models"})
        allowed = v.model_names(list(request.allowed_models), "allowed_models")
        async with self.tx(context) as (s, caller):
            tenant = await self.tenant_for_read(s, caller, request.tenant)
            caller.require_platform("changing a tenant's plan or models")
            before = tenant_pb(tenant)
            if "plan" in mask:
                tenant.plan = await _plan_exists(s, request.plan) or None
            if "allowed_models" in mask:
                tenant.allowed_models = allowed
            tenant.updated_at = datetime.now(UTC)
            await s.flush()
            reply = tenant_pb(tenant)
            self.audit(
                s,
                context,
                caller,
                "tenant.update",
                target_type="tenant",
                target_id=tenant.id,
                tenant_id=tenant.id,
                before=before,
                after=reply,
            )
        await self.publish()
        return pb.UpdateTenantResponse(tenant=reply)

    async def _set_status(self, context: Any, ident: str, status: str, action: str, what: str) -> pb.Tenant:
        async with self.tx(context) as (s, caller):
            tenant = await self.tenant_for_read(s, caller, ident)
            caller.require_platform(what)
            if tenant.status == "deleted":
                raise FailedPreconditionError(f"tenant {tenant.name!r} is deleted")
            before = tenant_pb(tenant)
            tenant.status = status
            tenant.updated_at = datetime.now(UTC)
            await s.flush()
            reply = tenant_pb(tenant)
            self.audit(
                s,
                context,
                caller,
                action,
                target_type="tenant",
                target_id=tenant.id,
                tenant_id=tenant.id,
                before=before,
                after=reply,
            )
        await self.publish()
        return reply

    async def SuspendTenant(self, request: pb.SuspendTenantRequest, context: Any) -> pb.SuspendTenantResponse:
        v.short_text(request.reason, "reason")
        return pb.SuspendTenantResponse(
            tenant=await self._set_status(
                context, request.tenant, "suspended", "tenant.suspend", "suspending a tenant"
            )
        )

    async def ResumeTenant(self, request: pb.ResumeTenantRequest, context: Any) -> pb.ResumeTenantResponse:
        return pb.ResumeTenantResponse(
            tenant=await self._set_status(
                context, request.tenant, "active", "tenant.resume", "resuming a tenant"
            )
        )

    async def DeleteTenant(self, request: pb.DeleteTenantRequest, context: Any) -> pb.DeleteTenantResponse:
        now = datetime.now(UTC)
        async with self.tx(context) as (s, caller):
            tenant = await self.tenant_for_read(s, caller, request.tenant)
            caller.require_platform("deleting a tenant")
            before = tenant_pb(tenant)
            revoked = await s.execute(
                update(ApiKey)
                .where(ApiKey.tenant_id == tenant.id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            tenant.status = "deleted"
            tenant.updated_at = now
            await s.flush()
            reply = tenant_pb(tenant)
            self.audit(
                s,
                context,
                caller,
                "tenant.delete",
                target_type="tenant",
                target_id=tenant.id,
                tenant_id=tenant.id,
                before=before,
                after=reply,
            )
        await self.publish()
        return pb.DeleteTenantResponse(tenant=reply, revoked_keys=int(getattr(revoked, "rowcount", 0) or 0))


class PlanServiceServicer(AdminServicerBase, admin_pb2_grpc.PlanServiceServicer):
    async def CreatePlan(self, request: pb.CreatePlanRequest, context: Any) -> pb.CreatePlanResponse:
        name = v.plan_name(request.name)
        limits = v.plan_limits([(x.kind, x.window, x.limit) for x in request.limits])
        async with self.tx(context) as (s, caller):
            caller.require_platform("creating a plan")
            if await s.scalar(select(Plan.id).where(Plan.name == name)):
                raise AlreadyExistsError(f"plan {name!r} already exists")
            plan = Plan(name=name, priority=request.priority, limits=limits)
            s.add(plan)
            await s.flush()
            reply = plan_pb(plan)
            self.audit(
                s,
                context,
                caller,
                "plan.create",
                target_type="plan",
                target_id=name,
                tenant_id=None,
                after=reply,
            )
        await self.publish()
        return pb.CreatePlanResponse(plan=reply)

    async def _get(self, s: Any, name: str) -> Plan:
        if not name:
            raise InvalidArgumentError("plan", "is required")
        plan: Plan | None = await s.scalar(select(Plan).where(Plan.name == v.short_text(name, "plan", 63)))
        if plan is None:
            raise NotFoundError(f"plan {name!r} not found")
        return plan

    async def GetPlan(self, request: pb.GetPlanRequest, context: Any) -> pb.GetPlanResponse:
        async with self.read(context) as (s, _caller):
            return pb.GetPlanResponse(plan=plan_pb(await self._get(s, request.plan)))

    async def ListPlans(self, request: pb.ListPlansRequest, context: Any) -> pb.ListPlansResponse:
        size, after = v.page(request.page_size, request.page_token)
        async with self.read(context) as (s, _caller):
            rows = (
                await s.scalars(select(Plan).where(Plan.name > after).order_by(Plan.name).limit(size))
            ).all()
        return pb.ListPlansResponse(
            items=[plan_pb(p) for p in rows],
            next_page_token=v.next_token(len(rows), size, rows[-1].name if rows else ""),
        )

    async def UpdatePlan(self, request: pb.UpdatePlanRequest, context: Any) -> pb.UpdatePlanResponse:
        mask = v.update_mask(list(request.update_mask), {"priority", "limits"})
        limits = v.plan_limits([(x.kind, x.window, x.limit) for x in request.limits])
        async with self.tx(context) as (s, caller):
            caller.require_platform("changing a plan")
            plan = await self._get(s, request.plan)
            before = plan_pb(plan)
            if "priority" in mask:
                plan.priority = request.priority
            if "limits" in mask:
                plan.limits = limits
            plan.updated_at = datetime.now(UTC)
            await s.flush()
            reply = plan_pb(plan)
            self.audit(
                s,
                context,
                caller,
                "plan.update",
                target_type="plan",
                target_id=plan.name,
                tenant_id=None,
                before=before,
                after=reply,
            )
        await self.publish()
        return pb.UpdatePlanResponse(plan=reply)

    async def DeletePlan(self, request: pb.DeletePlanRequest, context: Any) -> pb.DeletePlanResponse:
        async with self.tx(context) as (s, caller):
            caller.require_platform("deleting a plan")
            plan = await self._get(s, request.plan)
            users = await s.scalar(
                select(Tenant.name).where(Tenant.plan == plan.name, Tenant.status != "deleted").limit(1)
            )
            if users is not None:
                raise FailedPreconditionError(f"plan {plan.name!r} is the plan of tenant {users!r}")
            before = plan_pb(plan)
            await s.delete(plan)
            self.audit(
                s, context, caller, "plan.delete", target_type="plan", target_id=plan.name,
                tenant_id=None, before=before,
            )  # fmt: skip
        await self.publish()
        return pb.DeletePlanResponse()
