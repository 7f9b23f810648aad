"""ResourceService: apply and export declarative documents (control_plane.resources)."""

from __future__ import annotations

import asyncio
from typing import Any

import yaml

from control_plane.admin.base import AdminContext, AdminServicerBase
from control_plane.resources.apply import RESERVED_MANAGERS, Applier
from control_plane.resources.documents import parse_files
from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc
from tessera.errors import InvalidArgumentError


class ResourceServiceServicer(AdminServicerBase, admin_pb2_grpc.ResourceServiceServicer):
    def __init__(self, ctx: AdminContext) -> None:
        super().__init__(ctx)
        self.applier = Applier(ctx)

    async def ApplyResources(
        self, request: pb.ApplyResourcesRequest, context: Any
    ) -> pb.ApplyResourcesResponse:
        # Who asks first: parsing is CPU work, and nobody else's to cause.
        async with self.read(context) as (_s, caller):
            caller.require_platform("applying resources")
        if request.manager in RESERVED_MANAGERS:
            raise InvalidArgumentError(
                "manager", f"{request.manager!r} is reserved for Tessera's own sources"
            )
        files = [(f.name, f.content) for f in request.files]
        docs = await asyncio.to_thread(parse_files, files)  # off the event loop
        return await self.applier.apply(
            docs, context, dry_run=request.dry_run, prune=request.prune, manager=request.manager
        )

    async def ExportResources(
        self, request: pb.ExportResourcesRequest, context: Any
    ) -> pb.ExportResourcesResponse:
        docs = await self.applier.export(context, request.kind, request.name)
        text = yaml.safe_dump_all(docs, sort_keys=False) if docs else ""
        return pb.ExportResourcesResponse(yaml=text, count=len(docs))
