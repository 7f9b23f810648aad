"""Running the service: one process, or ``workers`` processes sharing the port (SO_REUSEPORT).

Worker processes are spawned by ``tessera.workers``, so their entry point lives here,
importable by name, not in ``__main__``.
"""

from __future__ import annotations

import asyncio

import structlog

from ratelimit.app import build_app
from ratelimit.settings import RatelimitSettings
from tessera.grpc_server import wait_for_termination
from tessera.settings import redact_url
from tessera.workers import serve_workers

log = structlog.get_logger("ratelimit")


async def serve(settings: RatelimitSettings) -> None:
    """Build the app, announce it, serve until SIGTERM/SIGINT, stop gracefully."""
    app = await build_app(settings)
    stopped = asyncio.create_task(wait_for_termination(app.stop))
    await asyncio.sleep(0)  # let it install the signal handlers before announcing the port
    log.info(
        "ratelimit_listening",
        port=app.port,
        admission_port=app.admission_port,
        metrics_port=app.metrics_port,
        counters=redact_url(settings.redis.url.get_secret_value()),
    )
    await stopped
    log.info("ratelimit_stopped")


def supervise(settings: RatelimitSettings) -> int:
    """Start ``settings.workers`` processes sharing the port; 0 if all exit 0."""
    return serve_workers(settings, serve, service="ratelimit")
