"""AdminService: tenants, API keys, models and limits over gRPC.

Every write is one transaction; after it commits the publisher pushes the new
state (xDS + policy stream) before the RPC returns. Callers authenticate with
``authorization: Bearer <token>`` metadata (the local platform-admin credential
in admin.json; principals and role bindings come with the admin API issue).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane import validation as v
from control_plane.db import models as db
from control_plane.db.repositories import (
    ApiKeyRepository,
    LimitRepository,
    ModelRepository,
    TenantRepository,
)
from control_plane.publisher import Publisher
from tessera import keys
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.errors import InvalidArgumentError, StorageError, UnauthenticatedError

log = structlog.get_logger("control_plane.admin")


def rfc3339(dt: datetime | None) -> str:
    if dt is None:
        return ""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{keys.new_public_id()}"


def tenant_pb(t: db.Tenant) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(
        id=t.id,
        name=t.name,
        status=t.status,
        allowed_models=t.allowed_models,
        create_time=rfc3339(t.created_at),
    )


def key_pb(k: db.ApiKey, now: datetime) -> admin_pb2.ApiKey:
    expires = (
        k.expires_at.replace(tzinfo=UTC) if k.expires_at and k.expires_at.tzinfo is None else k.expires_at
    )
    status = "revoked" if k.revoked_at else "expired" if expires and expires <= now else "active"
    return admin_pb2.ApiKey(
        id=k.key_id,
        tenant_id=k.tenant_id,
        name=k.name,
        prefix=k.prefix,
        status=status,
        create_time=rfc3339(k.created_at),
        expire_time=rfc3339(k.expires_at),
        allowed_models=k.allowed_models,
    )


def model_pb(m: db.Model) -> admin_pb2.Model:
    return admin_pb2.Model(
        name=m.name,
        visibility=m.visibility,
        create_time=rfc3339(m.created_at),
        backends=[
            admin_pb2.Backend(url=b.url, kind=b.kind, weight=b.weight, priority=b.priority)
            for b in m.backends
        ],
    )


def limit_pb(lim: db.Limit) -> admin_pb2.Limit:
    return admin_pb2.Limit(
        id=lim.id,
        tenant_id=lim.tenant_id,
        key_id=lim.key_id or "",
        model=lim.model or "",
        kind=lim.kind,
        window=v.window_name(lim.window_seconds),
        limit=lim.limit,
        shadow=lim.shadow,
        fail_mode="closed" if lim.fail_closed else "open",
        create_time=rfc3339(lim.created_at),
    )


class AdminServiceServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        publisher: Publisher,
        *,
        admin_token: str,
        pepper: bytes,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._publisher = publisher
        self._token = admin_token.encode()
        self._pepper = pepper

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        async with self._storage(), self._sessionmaker() as session:
            yield session

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        """One transaction; commits on success, rolls back on any error."""
        async with self._storage(), self._sessionmaker.begin() as session:
            yield session

    @staticmethod
    @asynccontextmanager
    async def _storage() -> AsyncIterator[None]:
        # A database that cannot be reached is UNAVAILABLE (retryable), not INTERNAL.
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            log.warning("database_unavailable", error=type(exc.orig or exc).__name__)
            raise StorageError("the database is unavailable; retry later", transient=True) from exc

    async def _publish(self) -> None:
        # The write is committed; if the push fails the periodic refresh publishes it later.
        async with self._storage():
            await self._publisher.publish()

    def _authorize(self, context: Any) -> None:
        md = dict(context.invocation_metadata() or ())
        header = md.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("missing admin credential: send 'authorization: Bearer <token>'")
        if not self._token or not hmac.compare_digest(token.encode(), self._token):
            raise UnauthenticatedError("invalid admin credential")

    # --- tenants ---------------------------------------------------------------------------

    async def CreateTenant(
        self, request: admin_pb2.CreateTenantRequest, context: Any
    ) -> admin_pb2.CreateTenantResponse:
        self._authorize(context)
        name = v.tenant_name(request.name)
        allowed = v.model_names(list(request.allowed_models), "allowed_models")
        async with self._write() as s:
            tenant = await TenantRepository(s).add(
                db.Tenant(id=_new_id("ten"), name=name, status="active", allowed_models=allowed)
            )
        await self._publish()
        log.info("tenant_created", tenant_id=tenant.id, name=name)
        return admin_pb2.CreateTenantResponse(tenant=tenant_pb(tenant))

    async def GetTenant(
        self, request: admin_pb2.GetTenantRequest, context: Any
    ) -> admin_pb2.GetTenantResponse:
        self._authorize(context)
        if not request.tenant:
            raise InvalidArgumentError("tenant", "is required (id or name)")
        async with self._read() as s:
            tenant = await TenantRepository(s).resolve(request.tenant)
        return admin_pb2.GetTenantResponse(tenant=tenant_pb(tenant))

    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: Any
    ) -> admin_pb2.ListTenantsResponse:
        self._authorize(context)
        size, after = v.page(request.page_size, request.page_token)
        async with self._read() as s:
            rows = await TenantRepository(s).list(after=after, limit=size)
        return admin_pb2.ListTenantsResponse(
            items=[tenant_pb(t) for t in rows],
            next_page_token=v.next_token(len(rows), size, rows[-1].id if rows else ""),
        )

    # --- API keys --------------------------------------------------------------------------

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: Any
    ) -> admin_pb2.CreateApiKeyResponse:
        self._authorize(context)
        if not request.tenant:
            raise InvalidArgumentError("tenant", "is required (id or name)")
        ttl = v.duration_seconds(request.ttl, "ttl") if request.ttl else None
        allowed = v.model_names(list(request.allowed_models), "allowed_models")
        minted = keys.mint_key()
        now = datetime.now(UTC)
        async with self._write() as s:
            tenant = await TenantRepository(s).resolve(request.tenant)
            row = await ApiKeyRepository(s).add(
                db.ApiKey(
                    id=minted.public_id,
                    key_id=minted.public_id,
                    tenant_id=tenant.id,
                    name=request.name,
                    prefix=minted.prefix,
                    digest=keys.digest(self._pepper, minted.key),
                    allowed_models=allowed,
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl) if ttl else None,
                )
            )
        await self._publish()
        log.info("api_key_created", tenant_id=row.tenant_id, key_id=row.key_id, prefix=row.prefix)
        return admin_pb2.CreateApiKeyResponse(id=row.key_id, key=minted.key, api_key=key_pb(row, now))

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: Any
    ) -> admin_pb2.ListApiKeysResponse:
        self._authorize(context)
        size, after = v.page(request.page_size, request.page_token)
        async with self._read() as s:
            tenant_id = (await TenantRepository(s).resolve(request.tenant)).id if request.tenant else None
            rows = await ApiKeyRepository(s).list(tenant_id=tenant_id, after=after, limit=size)
        now = datetime.now(UTC)
        return admin_pb2.ListApiKeysResponse(
            items=[key_pb(k, now) for k in rows],
            next_page_token=v.next_token(len(rows), size, rows[-1].id if rows else ""),
        )

    # --- models ----------------------------------------------------------------------------

    async def AddModel(self, request: admin_pb2.AddModelRequest, context: Any) -> admin_pb2.AddModelResponse:
        self._authorize(context)
        name = v.model_name(request.name)
        if not request.HasField("backend") or not request.backend.url:
            raise InvalidArgumentError("backend.url", "is required")
        backend = db.Backend(
            url=v.backend_url(request.backend.url),
            kind=v.backend_kind(request.backend.kind),
            weight=request.backend.weight or 1,
            priority=request.backend.priority,
        )
        async with self._write() as s:
            model = await ModelRepository(s).add_backend(
                name, backend, visibility=v.visibility(request.visibility), replace=request.replace_backends
            )
            reply = model_pb(model)
        await self._publish()
        log.info("model_added", model=name, backend=backend.url)
        return admin_pb2.AddModelResponse(model=reply)

    async def ListModels(
        self, request: admin_pb2.ListModelsRequest, context: Any
    ) -> admin_pb2.ListModelsResponse:
        self._authorize(context)
        size, after = v.page(request.page_size, request.page_token)
        async with self._read() as s:
            rows = await ModelRepository(s).list(after=after, limit=size)
            items = [model_pb(m) for m in rows]
        return admin_pb2.ListModelsResponse(
            items=items, next_page_token=v.next_token(len(rows), size, rows[-1].name if rows else "")
        )

    # --- limits ----------------------------------------------------------------------------

    async def CreateLimit(
        self, request: admin_pb2.CreateLimitRequest, context: Any
    ) -> admin_pb2.CreateLimitResponse:
        self._authorize(context)
        if not request.tenant:
            raise InvalidArgumentError("tenant", "is required (id or name)")
        kind = v.limit_kind(request.kind)
        window = v.window_seconds(request.window)
        if request.limit <= 0:
            raise InvalidArgumentError("limit", "must be a positive integer")
        model = v.model_name(request.model, "model") if request.model else None
        async with self._write() as s:
            tenant = await TenantRepository(s).resolve(request.tenant)
            row = await LimitRepository(s).add(
                db.Limit(
                    id=_new_id("lim"),
                    tenant_id=tenant.id,
                    key_id=request.key_id or None,
                    model=model,
                    kind=kind,
                    window_seconds=window,
                    limit=request.limit,
                    shadow=request.shadow,
                    fail_closed=v.fail_mode(request.fail_mode),
                )
            )
        await self._publish()
        log.info("limit_created", tenant_id=row.tenant_id, limit_id=row.id, kind=kind, limit=row.limit)
        return admin_pb2.CreateLimitResponse(limit=limit_pb(row))

    async def ListLimits(
        self, request: admin_pb2.ListLimitsRequest, context: Any
    ) -> admin_pb2.ListLimitsResponse:
        self._authorize(context)
        size, after = v.page(request.page_size, request.page_token)
        async with self._read() as s:
            tenant_id = (await TenantRepository(s).resolve(request.tenant)).id if request.tenant else None
            rows = await LimitRepository(s).list(tenant_id=tenant_id, after=after, limit=size)
        return admin_pb2.ListLimitsResponse(
            items=[limit_pb(x) for x in rows],
            next_page_token=v.next_token(len(rows), size, rows[-1].id if rows else ""),
        )


def new_admin_token() -> str:
    return "tadm_" + secrets.token_urlsafe(32)
