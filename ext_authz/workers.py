"""Serving: one process, or ``workers`` processes sharing the port (SO_REUSEPORT).

Each worker holds its own policy snapshot (its own stream to the control plane), so every
worker refuses a revoked key within the same second. Worker processes are spawned by
``tessera.workers``; their entry point lives here, importable by name.
"""

from __future__ import annotations

import structlog

from ext_authz.app import build_app
from ext_authz.settings import ExtAuthzSettings
from tessera.grpc_server import wait_for_termination
from tessera.workers import serve_workers

log = structlog.get_logger("ext_authz")


async def serve(settings: ExtAuthzSettings) -> None:
    app = await build_app(settings)
    await wait_for_termination(app.stop)


def supervise(settings: ExtAuthzSettings) -> int:
    return serve_workers(settings, serve, service="ext_authz")
