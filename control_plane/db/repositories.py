"""Repositories: take an AsyncSession, never commit (the caller owns the transaction).

All SQL goes through SQLAlchemy constructs, so every value is a bound parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import ApiKey, Backend, Limit, Model, Tenant
from tessera.errors import AlreadyExistsError, NotFoundError


class TenantRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    async def add(self, tenant: Tenant) -> Tenant:
        if await self.s.scalar(select(Tenant.id).where(Tenant.name == tenant.name)):
            raise AlreadyExistsError(f"tenant {tenant.name!r} already exists")
        self.s.add(tenant)
        try:
            await self.s.flush()
        except IntegrityError as exc:
            raise AlreadyExistsError(f"tenant {tenant.name!r} already exists") from exc
        return tenant

    async def resolve(self, id_or_name: str) -> Tenant:
        tenant = await self.s.scalar(
            select(Tenant).where((Tenant.id == id_or_name) | (Tenant.name == id_or_name))
        )
        if tenant is None:
            raise NotFoundError(f"tenant {id_or_name!r} not found")
        return tenant

    async def list(self, *, after: str, limit: int) -> Sequence[Tenant]:
        stmt = select(Tenant).where(Tenant.id > after).order_by(Tenant.id).limit(limit)
        return (await self.s.scalars(stmt)).all()

    async def all(self) -> Sequence[Tenant]:
        return (await self.s.scalars(select(Tenant))).all()


class ApiKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    async def add(self, key: ApiKey) -> ApiKey:
        self.s.add(key)
        await self.s.flush()
        return key

    async def list(self, *, tenant_id: str | None, after: str, limit: int) -> Sequence[ApiKey]:
        stmt = select(ApiKey).where(ApiKey.id > after)
        if tenant_id is not None:
            stmt = stmt.where(ApiKey.tenant_id == tenant_id)
        return (await self.s.scalars(stmt.order_by(ApiKey.id).limit(limit))).all()

    async def all(self) -> Sequence[ApiKey]:
        return (await self.s.scalars(select(ApiKey))).all()


class ModelRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    async def get(self, name: str) -> Model | None:
        model: Model | None = await self.s.scalar(select(Model).where(Model.name == name))
        return model

    async def add_backend(
        self, name: str, backend: Backend, *, visibility: str, replace: bool = False
    ) -> Model:
        """Create the model if needed and attach the backend (same URL twice is a conflict)."""
        model = await self.get(name)
        if model is None:
            model = Model(name=name, visibility=visibility)
            self.s.add(model)
            await self.s.flush()
            await self.s.refresh(model, ["backends"])
        elif replace:
            model.backends.clear()
            await self.s.flush()
        elif any(b.url == backend.url for b in model.backends):
            raise AlreadyExistsError(f"model {name!r} already has backend {backend.url}")
        model.backends.append(backend)
        await self.s.flush()
        return model

    async def list(self, *, after: str, limit: int) -> Sequence[Model]:
        stmt = select(Model).where(Model.name > after).order_by(Model.name).limit(limit)
        return (await self.s.scalars(stmt)).all()

    async def all(self) -> Sequence[Model]:
        return (await self.s.scalars(select(Model))).all()


class LimitRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    async def add(self, limit: Limit) -> Limit:
        self.s.add(limit)
        await self.s.flush()
        return limit

    async def list(self, *, tenant_id: str | None, after: str, limit: int) -> Sequence[Limit]:
        stmt = select(Limit).where(Limit.id > after)
        if tenant_id is not None:
            stmt = stmt.where(Limit.tenant_id == tenant_id)
        return (await self.s.scalars(stmt.order_by(Limit.id).limit(limit))).all()

    async def all(self) -> Sequence[Limit]:
        return (await self.s.scalars(select(Limit))).all()
