"""PrincipalService: admin callers, their role bindings and admin keys.

Nobody grants more than they hold: only a platform-admin binds platform-admin; a
tenant-admin binds tenant roles on its own tenants only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import validation as v
from control_plane.admin.auth import LOCAL_ADMIN_ID, PLATFORM_ADMIN, ROLES, Caller
from control_plane.admin.base import AdminServicerBase
from control_plane.admin.convert import principal_pb
from control_plane.db.models import AdminCredential, Principal, RoleBinding
from tessera import keys
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc
from tessera.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)

MAX_BINDINGS = 64


def mint_admin_key(principal: Principal, pepper: bytes) -> tuple[AdminCredential, str]:
    minted = keys.mint_key(kind=keys.ADMIN_KEY)
    cred = AdminCredential(
        id=minted.public_id, principal=principal, prefix=minted.prefix, digest=keys.digest(pepper, minted.key)
    )
    return cred, minted.key


def view(caller: Caller, p: Principal) -> pb.Principal:
    """The principal as this caller may see it: no bindings on tenants it cannot read."""
    msg = principal_pb(p)
    if not caller.platform_admin:
        kept = [b for b in msg.bindings if not b.tenant_id or caller.can_read(b.tenant_id)]
        del msg.bindings[:]
        msg.bindings.extend(kept)
    return msg


def visible(caller: Caller, p: Principal) -> bool:
    return (
        caller.platform_admin
        or p.id == caller.principal_id
        or any(caller.can_read(b.tenant_id) for b in p.bindings)
    )


class PrincipalServiceServicer(AdminServicerBase, admin_pb2_grpc.PrincipalServiceServicer):
    async def _binding(
        self, s: AsyncSession, caller: Caller, b: pb.RoleBinding, field: str
    ) -> tuple[str, str | None]:
        """Validate one binding and that the caller may grant (or remove) it."""
        if b.role not in ROLES:
            raise InvalidArgumentError(f"{field}.role", f"must be one of {', '.join(ROLES)}")
        if b.role == PLATFORM_ADMIN:
            if b.tenant_id:
                raise InvalidArgumentError(f"{field}.tenant_id", "must be empty for platform-admin")
            caller.require_platform("granting platform-admin")
            return b.role, None
        tenant = await self.tenant_for_write(s, caller, b.tenant_id, f"{field}.tenant_id")
        return b.role, tenant.id

    async def _get(self, s: AsyncSession, caller: Caller, ident: str) -> Principal:
        if not ident:
            raise InvalidArgumentError("principal", "is required (id or name)")
        v.short_text(ident, "principal", 128)
        p: Principal | None = await s.scalar(
            select(Principal).where((Principal.id == ident) | (Principal.name == ident))
        )
        if p is None or not visible(caller, p):
            raise NotFoundError(f"principal {ident!r} not found")
        return p

    async def CreatePrincipal(
        self, request: pb.CreatePrincipalRequest, context: Any
    ) -> pb.CreatePrincipalResponse:
        name = v.principal_name(request.name)
        kind = v.principal_kind(request.kind)
        if len(request.bindings) > MAX_BINDINGS:
            raise InvalidArgumentError("bindings", f"at most {MAX_BINDINGS}")
        async with self.tx(context) as (s, caller):
            wanted = {
                await self._binding(s, caller, b, f"bindings[{i}]") for i, b in enumerate(request.bindings)
            }
            if not wanted and not caller.platform_admin:
                raise InvalidArgumentError("bindings", "give at least one role on a tenant you administer")
            if await s.scalar(select(Principal.id).where(Principal.name == name)):
                raise AlreadyExistsError(f"principal {name!r} already exists")
            principal = Principal(id=f"prn_{keys.new_public_id()}", name=name, kind=kind, status="active")
            principal.bindings = [RoleBinding(role=r, tenant_id=t) for r, t in sorted(wanted, key=str)]
            s.add(principal)
            cred, secret = mint_admin_key(principal, self.ctx.pepper)
            s.add(cred)
            await s.flush()
            await s.refresh(principal, ["bindings", "credentials"])
            reply = principal_pb(principal)
            self.audit(
                s,
                context,
                caller,
                "principal.create",
                target_type="principal",
                target_id=principal.id,
                tenant_id=_tenant_of(principal),
                after=reply,
            )
        return pb.CreatePrincipalResponse(principal=reply, key=secret)

    async def GetPrincipal(self, request: pb.GetPrincipalRequest, context: Any) -> pb.GetPrincipalResponse:
        async with self.read(context) as (s, caller):
            return pb.GetPrincipalResponse(
                principal=view(caller, await self._get(s, caller, request.principal))
            )

    async def ListPrincipals(
        self, request: pb.ListPrincipalsRequest, context: Any
    ) -> pb.ListPrincipalsResponse:
        size, after = v.page(request.page_size, request.page_token)
        async with self.read(context) as (s, caller):
            stmt = select(Principal).where(Principal.id > after)
            scope: frozenset[str] | None = caller.readable_tenants
            if request.tenant:
                scope = frozenset({(await self.tenant_for_read(s, caller, request.tenant)).id})
            if scope is not None:
                bound = select(RoleBinding.principal_id).where(RoleBinding.tenant_id.in_(scope))
                stmt = stmt.where(Principal.id.in_(bound))
            rows: Sequence[Principal] = (await s.scalars(stmt.order_by(Principal.id).limit(size))).all()
            items = [view(caller, p) for p in rows]
        return pb.ListPrincipalsResponse(
            items=items, next_page_token=v.next_token(len(rows), size, rows[-1].id if rows else "")
        )

    async def _change_bindings(self, request: Any, context: Any, *, add: bool) -> pb.Principal:
        action = "principal.bind" if add else "principal.unbind"
        async with self.tx(context) as (s, caller):
            principal = await self._get(s, caller, request.principal)
            role, tenant_id = await self._binding(s, caller, request.binding, "binding")
            before = principal_pb(principal)
            existing = next(
                (b for b in principal.bindings if (b.role, b.tenant_id) == (role, tenant_id)), None
            )
            if add and existing is None:
                principal.bindings.append(RoleBinding(role=role, tenant_id=tenant_id))
            elif not add and existing is not None:
                if role == PLATFORM_ADMIN and principal.id == caller.principal_id:
                    raise FailedPreconditionError(
                        "a platform-admin cannot remove its own platform-admin role"
                    )
                principal.bindings.remove(existing)
            await s.flush()
            await s.refresh(principal, ["bindings"])
            after = principal_pb(principal)
            if after != before:
                self.audit(
                    s,
                    context,
                    caller,
                    action,
                    target_type="principal",
                    target_id=principal.id,
                    tenant_id=tenant_id,
                    before=before,
                    after=after,
                )
            return view(caller, principal)

    async def AddRoleBinding(
        self, request: pb.AddRoleBindingRequest, context: Any
    ) -> pb.AddRoleBindingResponse:
        return pb.AddRoleBindingResponse(principal=await self._change_bindings(request, context, add=True))

    async def RemoveRoleBinding(
        self, request: pb.RemoveRoleBindingRequest, context: Any
    ) -> pb.RemoveRoleBindingResponse:
        return pb.RemoveRoleBindingResponse(
            principal=await self._change_bindings(request, context, add=False)
        )

    async def DisablePrincipal(
        self, request: pb.DisablePrincipalRequest, context: Any
    ) -> pb.DisablePrincipalResponse:
        now = datetime.now(UTC)
        async with self.tx(context) as (s, caller):
            principal = await self._get(s, caller, request.principal)
            # Only someone who could grant every role it holds may disable it.
            for b in principal.bindings:
                if b.role == PLATFORM_ADMIN:
                    caller.require_platform("disabling a platform-admin")
                elif not caller.can_write(b.tenant_id):
                    raise PermissionDeniedError("the principal holds roles on tenants you do not administer")
            if principal.id == caller.principal_id:
                raise FailedPreconditionError("a principal cannot disable itself")
            before = principal_pb(principal)
            principal.status = "disabled"
            for c in principal.credentials:
                c.revoked_at = c.revoked_at or now
            await s.flush()
            reply = principal_pb(principal)
            self.audit(
                s,
                context,
                caller,
                "principal.disable",
                target_type="principal",
                target_id=principal.id,
                tenant_id=_tenant_of(principal),
                before=before,
                after=reply,
            )
        return pb.DisablePrincipalResponse(principal=reply)

    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Any) -> pb.WhoAmIResponse:
        del request
        async with self.read(context) as (s, caller):
            if caller.principal_id == LOCAL_ADMIN_ID:
                me = pb.Principal(
                    id=LOCAL_ADMIN_ID,
                    name=LOCAL_ADMIN_ID,
                    kind="service_account",
                    status="active",
                    bindings=[pb.RoleBinding(role=PLATFORM_ADMIN)],
                )
                return pb.WhoAmIResponse(principal=me)
            return pb.WhoAmIResponse(principal=principal_pb(await self._get(s, caller, caller.principal_id)))


def _tenant_of(p: Principal) -> str | None:
    """The tenant an audit row about this principal belongs to (its first tenant binding)."""
    return next((b.tenant_id for b in p.bindings if b.tenant_id), None)


async def bootstrap_platform_admin(s: AsyncSession, name: str, pepper: bytes) -> tuple[Principal, str]:
    """Create the first platform admin of a deployment; refused once one exists."""
    name = v.principal_name(name)
    if await s.scalar(select(RoleBinding.id).where(RoleBinding.role == PLATFORM_ADMIN).limit(1)):
        raise FailedPreconditionError("a platform-admin already exists; bootstrap runs once per deployment")
    if await s.scalar(select(Principal.id).where(Principal.name == name)):
        raise AlreadyExistsError(f"principal {name!r} already exists")
    principal = Principal(id=f"prn_{keys.new_public_id()}", name=name, kind="human", status="active")
    principal.bindings = [RoleBinding(role=PLATFORM_ADMIN, tenant_id=None)]
    s.add(principal)
    cred, secret = mint_admin_key(principal, pepper)
    s.add(cred)
    await s.flush()
    return principal, secret
