"""What every admin servicer shares: sessions, the caller, RBAC lookups, audit, publishing.

Each mutating RPC runs ``async with self.tx(context) as (s, caller):`` — one transaction
holding the row change and its audit record — then ``await self.publish()``.

A declarative apply (``control_plane.resources``) runs many RPCs as one: inside
:meth:`AdminServicerBase.batch` every ``tx``/``read`` joins the batch's transaction and caller,
and ``publish`` waits for the batch's end, so the RPCs' own validation, RBAC and audit apply
and an error anywhere rolls the whole set back.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.admin.auth import Authenticator, Caller
from control_plane.admin.convert import as_json
from control_plane.db.models import AuditEvent, Tenant
from control_plane.publisher import Publisher
from tessera.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError, StorageError

log = structlog.get_logger("control_plane.admin")


@dataclass(frozen=True)
class AdminContext:
    """Collaborators every admin servicer needs."""

    sessionmaker: async_sessionmaker[AsyncSession]
    publisher: Publisher
    auth: Authenticator
    pepper: bytes
    invoice_grace: timedelta = timedelta(days=3)  # after a month ends, before its invoice closes
    # Tells the other replicas on the same store to read it again (control_plane.changes); None
    # when the store is single-replica (SQLite).
    announce: Callable[[], Awaitable[None]] | None = None


# The batch this task runs in: its session and caller (None outside a batch).
_BATCH: ContextVar[tuple[AsyncSession, Caller] | None] = ContextVar("admin_batch", default=None)


def _metadata(context: Any) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class AdminServicerBase:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    # --- sessions ------------------------------------------------------------------------------

    @staticmethod
    @asynccontextmanager
    async def _storage() -> AsyncIterator[None]:
        # A database that cannot be reached is UNAVAILABLE (retryable), not INTERNAL.
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            log.warning("database_unavailable", error=type(exc.orig or exc).__name__)
            raise StorageError("the database is unavailable; retry later", transient=True) from exc

    @asynccontextmanager
    async def read(self, context: Any) -> AsyncIterator[tuple[AsyncSession, Caller]]:
        if (batch := _BATCH.get()) is not None:
            yield batch
            return
        async with self._storage(), self.ctx.sessionmaker() as session:
            yield session, await self._caller(session, context)

    @asynccontextmanager
    async def tx(self, context: Any) -> AsyncIterator[tuple[AsyncSession, Caller]]:
        """One transaction: commits on success, rolls back (no partial write) on any error."""
        if (batch := _BATCH.get()) is not None:
            yield batch
            return
        async with self._storage(), self.ctx.sessionmaker.begin() as session:
            yield session, await self._caller(session, context)

    @asynccontextmanager
    async def batch(
        self, context: Any, caller: Caller | None = None
    ) -> AsyncIterator[tuple[AsyncSession, Caller]]:
        """One transaction for every RPC run inside (see the module docstring); the caller is
        the context's unless given (the config directory applies as itself)."""
        if _BATCH.get() is not None:
            raise RuntimeError("admin batches do not nest")
        async with self._storage(), self.ctx.sessionmaker.begin() as session:
            pair = (session, caller or await self._caller(session, context))
            token = _BATCH.set(pair)
            try:
                yield pair
            finally:
                _BATCH.reset(token)

    async def publish(self) -> None:
        if _BATCH.get() is not None:  # the batch publishes once, after its commit
            return
        # The write is committed; if the push fails the periodic refresh publishes it later.
        async with self._storage():
            await self.ctx.publisher.publish()
        if self.ctx.announce is not None:
            try:
                await self.ctx.announce()
            except Exception:  # the write is committed: the others' periodic refresh reads it
                log.warning("change_announce_failed", exc_info=True)

    async def _caller(self, session: AsyncSession, context: Any) -> Caller:
        caller = await self.ctx.auth.authenticate(session, _metadata(context).get("authorization", ""))
        structlog.contextvars.bind_contextvars(actor=caller.principal_id)
        return caller

    # --- RBAC ----------------------------------------------------------------------------------

    async def tenant_for_read(
        self, s: AsyncSession, caller: Caller, ident: str, field: str = "tenant"
    ) -> Tenant:
        if not ident:
            raise InvalidArgumentError(field, "is required (tenant id or name)")
        if len(ident) > 128:  # noqa: PLR2004 - longer than any id or name
            raise InvalidArgumentError(field, "is too long")
        tenant: Tenant | None = await s.scalar(
            select(Tenant).where((Tenant.id == ident) | (Tenant.name == ident))
        )
        if tenant is None or not caller.can_read(tenant.id):
            raise NotFoundError(f"tenant {ident!r} not found")
        return tenant

    async def tenant_for_write(
        self, s: AsyncSession, caller: Caller, ident: str, field: str = "tenant"
    ) -> Tenant:
        tenant = await self.tenant_for_read(s, caller, ident, field)
        if not caller.can_write(tenant.id):
            raise PermissionDeniedError(
                f"changing tenant {tenant.name!r} requires the tenant-admin role on it"
            )
        return tenant

    # --- audit ---------------------------------------------------------------------------------

    def audit(
        self,
        s: AsyncSession,
        context: Any,
        caller: Caller,
        action: str,
        *,
        target_type: str,
        target_id: str,
        tenant_id: str | None,
        before: Message | None = None,
        after: Message | None = None,
    ) -> None:
        """Append the audit record in the caller's transaction (so it commits with the change)."""
        request_id = _metadata(context).get("x-request-id") or f"grpc-{uuid.uuid4()}"
        s.add(
            AuditEvent(
                actor_id=caller.principal_id,
                actor_name=caller.name,
                action=action,
                target_type=target_type,
                target_id=target_id,
                tenant_id=tenant_id,
                request_id=request_id[:128],
                before=as_json(before),
                after=as_json(after),
            )
        )
        log.info(action.replace(".", "_"), target_id=target_id, tenant_id=tenant_id, request_id=request_id)
