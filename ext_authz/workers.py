"""Serving: one process, or ``workers`` processes sharing the port (SO_REUSEPORT).

Each worker holds its own policy snapshot (its own stream to the control plane), so every
worker refuses a revoked key within the same second. Worker processes are spawned by
``tessera.workers``; their entry point lives here, importable by name. The HTTP transport
runs on uvloop when it is installed; the gRPC one on asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import functools

import structlog

from ext_authz.app import build_app
from ext_authz.http_transport import loop_factory
from ext_authz.settings import ExtAuthzSettings
from tessera.grpc_server import wait_for_termination
from tessera.logging import configure_logging
from tessera.workers import run_workers

log = structlog.get_logger("ext_authz")


async def serve(settings: ExtAuthzSettings) -> None:
    app = await build_app(settings)
    await wait_for_termination(app.stop)


def run(settings: ExtAuthzSettings) -> None:
    """Serve in this process until SIGTERM/SIGINT, on the transport's event loop."""
    factory = loop_factory() if settings.transport == "http" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(settings))


def supervise(settings: ExtAuthzSettings) -> int:
    return run_workers(settings.workers, functools.partial(_serve_worker, settings), name="ext_authz")


def _serve_worker(settings: ExtAuthzSettings, index: int) -> None:
    """Worker ``index``: its metrics on the base port + index (0 stays ephemeral)."""
    configure_logging(settings.log, service="ext_authz")
    structlog.contextvars.bind_contextvars(worker=index)
    if settings.metrics.port:
        metrics = settings.metrics.model_copy(update={"port": settings.metrics.port + index})
        settings = settings.model_copy(update={"metrics": metrics})
    run(settings)
