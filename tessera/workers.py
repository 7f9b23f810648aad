"""Several processes serving one gRPC port (SO_REUSEPORT), for services that scale across cores.

Workers are spawned (a fresh interpreter each: no forked grpc or asyncio state), so the
target must be a picklable top-level function (or a ``functools.partial`` of one).
SIGTERM/SIGINT to the parent are forwarded; the parent exits 0 only if every worker did.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import multiprocessing
import signal
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

import structlog

from tessera.logging import configure_logging

log = structlog.get_logger("tessera.workers")
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (no orphans, even after SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _worker_main(target: Callable[[int], None], index: int) -> None:
    die_with_parent()
    target(index)


def run_workers(count: int, target: Callable[[int], None], *, name: str) -> int:
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_worker_main, args=(target, i), name=f"{name}-worker-{i}") for i in range(count)
    ]

    def forward(_signum: int, _frame: FrameType | None) -> None:
        for proc in workers:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: each worker stops gracefully

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join()
    failed = [proc.name for proc in workers if proc.exitcode != 0]
    if failed:
        log.error("workers_failed", workers=failed)
        return 1
    return 0


S = TypeVar("S", bound=Any)  # a service's settings: has .log, .metrics, .workers, .model_copy


def serve_workers(settings: S, serve: Callable[[S], Coroutine[Any, Any, None]], *, service: str) -> int:
    """Run ``serve(settings)`` in ``settings.workers`` processes; worker i's metrics on port + i."""
    return run_workers(
        settings.workers, functools.partial(_serve_one, settings, serve, service), name=service
    )


def _serve_one(
    settings: S, serve: Callable[[S], Coroutine[Any, Any, None]], service: str, index: int
) -> None:
    configure_logging(settings.log, service=service)
    structlog.contextvars.bind_contextvars(worker=index)
    if settings.metrics.port:
        metrics = settings.metrics.model_copy(update={"port": settings.metrics.port + index})
        settings = settings.model_copy(update={"metrics": metrics})
    asyncio.run(serve(settings))
