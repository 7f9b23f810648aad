"""AuditService: read the append-only audit log, scoped to what the caller may read."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from control_plane import validation as v
from control_plane.admin.base import AdminServicerBase
from control_plane.admin.convert import audit_pb
from control_plane.db.models import AuditEvent
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc
from tessera.errors import InvalidArgumentError


class AuditServiceServicer(AdminServicerBase, admin_pb2_grpc.AuditServiceServicer):
    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Any
    ) -> pb.ListAuditEventsResponse:
        size, after = v.page(request.page_size, request.page_token)
        if after and not (after.isascii() and after.isdigit() and len(after) <= 18):  # noqa: PLR2004
            raise InvalidArgumentError("page_token", "is not a token this API returned")
        stmt = select(AuditEvent).where(AuditEvent.id > int(after or 0))
        if request.actor:
            stmt = stmt.where(AuditEvent.actor_id == v.short_text(request.actor, "actor", 32))
        if request.action:
            stmt = stmt.where(AuditEvent.action == v.short_text(request.action, "action", 64))
        if request.start_time:
            stmt = stmt.where(AuditEvent.time >= v.timestamp(request.start_time, "start_time"))
        if request.end_time:
            stmt = stmt.where(AuditEvent.time < v.timestamp(request.end_time, "end_time"))
        async with self.read(context) as (s, caller):
            if request.tenant:
                stmt = stmt.where(
                    AuditEvent.tenant_id == (await self.tenant_for_read(s, caller, request.tenant)).id
                )
            elif (readable := caller.readable_tenants) is not None:
                stmt = stmt.where(AuditEvent.tenant_id.in_(readable))
            rows = (await s.scalars(stmt.order_by(AuditEvent.id).limit(size))).all()
        return pb.ListAuditEventsResponse(
            items=[audit_pb(e) for e in rows],
            next_page_token=v.next_token(len(rows), size, str(rows[-1].id) if rows else ""),
        )
