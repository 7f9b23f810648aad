"""Running the service: one process, or ``workers`` processes sharing the port (SO_REUSEPORT).

Worker processes are spawned by ``tessera.workers``, so their entry point lives here,
importable by name, not in ``__main__``.
"""

from __future__ import annotations

import asyncio
import functools

import structlog

from ratelimit.app import build_app
from ratelimit.settings import RatelimitSettings
from tessera.grpc_server import wait_for_termination
from tessera.logging import configure_logging
from tessera.settings import redact_url
from tessera.workers import run_workers

log = structlog.get_logger("ratelimit")


async def serve(settings: RatelimitSettings) -> None:
    """Build the app, announce it, serve until SIGTERM/SIGINT, stop gracefully."""
    app = await build_app(settings)
    stopped = asyncio.create_task(wait_for_termination(app.stop))
    await asyncio.sleep(0)  # let it install the signal handlers before announcing the port
    log.info(
        "ratelimit_listening",
        port=app.port,
        metrics_port=app.metrics_port,
        counters=redact_url(settings.redis.url.get_secret_value()),
    )
    await stopped
    log.info("ratelimit_stopped")


def run_worker(settings: RatelimitSettings, index: int) -> None:  # runs in a spawned process
    """Entry point of worker ``index``: its metrics on ``metrics.port + index`` (when fixed)."""
    configure_logging(settings.log, service="ratelimit")
    structlog.contextvars.bind_contextvars(worker=index)
    if settings.metrics.port:
        metrics = settings.metrics.model_copy(update={"port": settings.metrics.port + index})
        settings = settings.model_copy(update={"metrics": metrics})
    asyncio.run(serve(settings))


def supervise(settings: RatelimitSettings) -> int:
    """Start ``settings.workers`` processes sharing the port; 0 if all exit 0."""
    return run_workers(settings.workers, functools.partial(run_worker, settings), name="ratelimit")
