"""ApiKeyService: create, read, revoke and rotate the gateway's API keys.

A logical key (``id``) has one or more secrets (rows of ``api_keys``); rotation adds a
secret of the next generation and gives the previous one a ``grace_until``, after which the
gateway refuses it. Rotation is idempotent per ``rotation_id``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import validation as v
from control_plane.admin.auth import Caller
from control_plane.admin.base import AdminServicerBase
from control_plane.admin.convert import aware, key_pb, key_status, rfc3339
from control_plane.db.models import ApiKey, Tenant
from tessera import keys
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc
from tessera.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, PermissionDeniedError

MAX_TTL_SECONDS = 10 * 365 * 86400


def _expiry(request: pb.CreateApiKeyRequest, now: datetime) -> datetime | None:
    if request.ttl and request.expire_time:
        raise InvalidArgumentError("ttl", "give ttl or expire_time, not both")
    if request.ttl:
        ttl = v.duration_seconds(request.ttl, "ttl")
        if ttl > MAX_TTL_SECONDS:
            raise InvalidArgumentError("ttl", "at most 10 years")
        return now + timedelta(seconds=ttl)
    if request.expire_time:
        when = v.timestamp(request.expire_time, "expire_time")
        if when <= now:
            raise InvalidArgumentError("expire_time", "must be in the future")
        return when
    return None


def _scopes(requested: list[str], tenant: Tenant) -> list[str]:
    models = v.model_names(requested, "allowed_models")
    outside = set(models) - set(tenant.allowed_models) if tenant.allowed_models else set()
    if outside:
        raise InvalidArgumentError(
            "allowed_models", f"not allowed for this tenant: {', '.join(sorted(outside))}"
        )
    return models


class ApiKeyServiceServicer(AdminServicerBase, admin_pb2_grpc.ApiKeyServiceServicer):
    async def _secrets(
        self, s: AsyncSession, caller: Caller, key_id: str, *, write: bool
    ) -> Sequence[ApiKey]:
        """All secrets of a logical key the caller may see (else NOT_FOUND), oldest first."""
        if not key_id:
            raise InvalidArgumentError("id", "is required")
        v.short_text(key_id, "id", 32)
        rows = (
            await s.scalars(select(ApiKey).where(ApiKey.key_id == key_id).order_by(ApiKey.generation))
        ).all()
        if not rows or not caller.can_read(rows[0].tenant_id):
            raise NotFoundError(f"api key {key_id!r} not found")
        if write and not caller.can_write(rows[0].tenant_id):
            raise PermissionDeniedError("changing keys requires the tenant-admin role on their tenant")
        return rows

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Any) -> pb.CreateApiKeyResponse:
        now = datetime.now(UTC)
        expires = _expiry(request, now)
        name = v.short_text(request.name, "name", 128)
        minted = keys.mint_key()
        async with self.tx(context) as (s, caller):
            tenant = await self.tenant_for_write(s, caller, request.tenant)
            if tenant.status != "active":
                raise FailedPreconditionError(f"tenant {tenant.name!r} is {tenant.status}")
            row = ApiKey(
                id=minted.public_id,
                key_id=minted.public_id,
                tenant_id=tenant.id,
                name=name,
                prefix=minted.prefix,
                digest=keys.digest(self.ctx.pepper, minted.key),
                allowed_models=_scopes(list(request.allowed_models), tenant),
                created_at=now,
                expires_at=expires,
                generation=1,
                created_by=caller.principal_id,
            )
            s.add(row)
            await s.flush()
            reply = key_pb([row], now)
            self.audit(
                s,
                context,
                caller,
                "api_key.create",
                target_type="api_key",
                target_id=row.key_id,
                tenant_id=tenant.id,
                after=reply,
            )
        await self.publish()
        return pb.CreateApiKeyResponse(id=row.key_id, key=minted.key, api_key=reply)

    async def GetApiKey(self, request: pb.GetApiKeyRequest, context: Any) -> pb.GetApiKeyResponse:
        async with self.read(context) as (s, caller):
            rows = await self._secrets(s, caller, request.id, write=False)
        return pb.GetApiKeyResponse(api_key=key_pb(rows, datetime.now(UTC)))

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Any) -> pb.ListApiKeysResponse:
        size, after = v.page(request.page_size, request.page_token)
        status = v.short_text(request.status, "status", 16)
        now = datetime.now(UTC)
        async with self.read(context) as (s, caller):
            ids = select(ApiKey.key_id).where(ApiKey.key_id > after).distinct()
            if request.tenant:
                ids = ids.where(
                    ApiKey.tenant_id == (await self.tenant_for_read(s, caller, request.tenant)).id
                )
            elif (readable := caller.readable_tenants) is not None:
                ids = ids.where(ApiKey.tenant_id.in_(readable))
            page_ids = list((await s.scalars(ids.order_by(ApiKey.key_id).limit(size))).all())
            rows = (await s.scalars(select(ApiKey).where(ApiKey.key_id.in_(page_ids)))).all()
        grouped: dict[str, list[ApiKey]] = {}
        for r in rows:
            grouped.setdefault(r.key_id, []).append(r)
        items = [key_pb(grouped[k], now) for k in page_ids]
        if status:
            items = [k for k in items if k.status == status]
        return pb.ListApiKeysResponse(
            items=items, next_page_token=v.next_token(len(page_ids), size, page_ids[-1] if page_ids else "")
        )

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Any) -> pb.RevokeApiKeyResponse:
        now = datetime.now(UTC)
        async with self.tx(context) as (s, caller):
            rows = await self._secrets(s, caller, request.id, write=True)
            before = key_pb(rows, now)
            for r in rows:
                r.revoked_at = r.revoked_at or now
            await s.flush()
            reply = key_pb(rows, now)
            if before.status != "revoked":
                self.audit(
                    s,
                    context,
                    caller,
                    "api_key.revoke",
                    target_type="api_key",
                    target_id=request.id,
                    tenant_id=rows[0].tenant_id,
                    before=before,
                    after=reply,
                )
        await self.publish()
        return pb.RevokeApiKeyResponse(api_key=reply)

    async def RotateApiKey(self, request: pb.RotateApiKeyRequest, context: Any) -> pb.RotateApiKeyResponse:
        now = datetime.now(UTC)
        grace = v.duration_seconds(request.grace, "grace") if request.grace and request.grace != "0s" else 0
        if grace > 30 * 86400:
            raise InvalidArgumentError("grace", "at most 720h")
        rotation_id = v.short_text(request.rotation_id, "rotation_id", 64) or secrets.token_hex(16)
        async with self.tx(context) as (s, caller):
            rows = await self._secrets(s, caller, request.id, write=True)
            done = next((r for r in rows if r.rotation_id == rotation_id), None)
            if done is not None:  # a retry: same secret id and prefix, never a second secret
                previous = next(r for r in rows if r.id == done.rotated_from)
                return pb.RotateApiKeyResponse(
                    id=done.key_id,
                    secret_id=done.id,
                    prefix=done.prefix,
                    grace_until=rfc3339(previous.grace_until),
                    api_key=key_pb(rows, now),
                )
            current = rows[-1]
            if key_status(current, now) != "active":
                raise FailedPreconditionError(f"api key {request.id!r} is {key_status(current, now)}")
            before = key_pb(rows, now)
            minted = keys.mint_key()
            grace_until = now + timedelta(seconds=grace)
            current.grace_until = min(grace_until, aware(current.grace_until) or grace_until)
            new = ApiKey(
                id=minted.public_id,
                key_id=current.key_id,
                tenant_id=current.tenant_id,
                name=current.name,
                prefix=minted.prefix,
                digest=keys.digest(self.ctx.pepper, minted.key),
                allowed_models=current.allowed_models,
                created_at=now,
                expires_at=current.expires_at,
                rotated_from=current.id,
                generation=current.generation + 1,
                rotation_id=rotation_id,
                created_by=caller.principal_id,
            )
            s.add(new)
            await s.flush()
            reply = key_pb([*rows, new], now)
            self.audit(
                s,
                context,
                caller,
                "api_key.rotate",
                target_type="api_key",
                target_id=current.key_id,
                tenant_id=current.tenant_id,
                before=before,
                after=reply,
            )
        await self.publish()
        return pb.RotateApiKeyResponse(
            id=new.key_id,
            key=minted.key,
            secret_id=new.id,
            prefix=new.prefix,
            grace_until=rfc3339(grace_until),
            api_key=reply,
        )
