"""Serving: one process, or ``workers`` processes sharing the port (SO_REUSEPORT).

Each worker holds its own policy snapshot (its own stream to the control plane), so every
worker refuses a revoked key within the same second. Worker processes are spawned by
``tessera.workers``; their entry point lives here, importable by name.
"""

from __future__ import annotations

import asyncio
import functools

import structlog

from ext_authz.app import build_app
from ext_authz.settings import ExtAuthzSettings
from tessera.grpc_server import wait_for_termination
from tessera.logging import configure_logging
from tessera.workers import run_workers

log = structlog.get_logger("ext_authz")


async def serve(settings: ExtAuthzSettings) -> None:
    app = await build_app(settings)
    await wait_for_termination(app.stop)


def run_worker(settings: ExtAuthzSettings, index: int) -> None:  # runs in a spawned process
    configure_logging(settings.log, service="ext_authz")
    structlog.contextvars.bind_contextvars(worker=index)
    if settings.metrics.port:
        metrics = settings.metrics.model_copy(update={"port": settings.metrics.port + index})
        settings = settings.model_copy(update={"metrics": metrics})
    asyncio.run(serve(settings))


def supervise(settings: ExtAuthzSettings) -> int:
    return run_workers(settings.workers, functools.partial(run_worker, settings), name="ext_authz")
