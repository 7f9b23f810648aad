"""Composition root: counters, limiter, admission + RLS server, policy subscription, metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import structlog
from envoy.service.ratelimit.v3 import rls_pb2_grpc

from ratelimit.admission import SERVICE_NAME as ADMISSION_SERVICE
from ratelimit.admission import AdmissionServicer
from ratelimit.admission_stream import start_admission_stream
from ratelimit.backends import CounterBackend, make_backend
from ratelimit.backends.open_admissions import OpenAdmissions, make_open_admissions
from ratelimit.backstop import SERVICE_NAME as BACKSTOP_SERVICE
from ratelimit.backstop import Backstop, UsageBackstopServicer
from ratelimit.limiter import RateLimiter
from ratelimit.limits import snapshot_from_policy
from ratelimit.servicer import SERVICE_NAME, RateLimitServicer
from ratelimit.settings import RatelimitSettings, check_settings
from tessera import tracing
from tessera.admission.v1 import admission_pb2_grpc
from tessera.clock import SYSTEM_CLOCK, Clock
from tessera.grpc_server import RunningServer, start_server
from tessera.identity import spiffe_id
from tessera.metrics import MetricsServer, serve_metrics
from tessera.policy.v1 import policy_pb2
from tessera.policy_client import PolicySubscriber, PolicyUpdate, apply_update, follow_policy
from tessera.tls import follow_renewals, server_context

log = structlog.get_logger("ratelimit")


def _callers(namespace: str) -> dict[str, frozenset[str]]:
    """Who may call what, under mutual TLS: Settle only ext_authz (releases) and the meter
    (settlement), the usage backstop only the meter; Envoy's RLS nobody (not in Tessera's
    chain)."""
    return {
        ADMISSION_SERVICE: frozenset({spiffe_id("ext-authz", namespace), spiffe_id("meter", namespace)}),
        BACKSTOP_SERVICE: frozenset({spiffe_id("meter", namespace)}),
        SERVICE_NAME: frozenset(),
    }


@dataclass
class App:
    port: int
    admission_port: int
    metrics_port: int
    limiter: RateLimiter
    subscriber: PolicySubscriber
    server: RunningServer
    _backend: CounterBackend
    _owns_backend: bool
    _open: OpenAdmissions
    _backstop: Backstop
    _grace: float
    _tasks: tuple[asyncio.Task[None], ...]
    _metrics: MetricsServer
    _admission: Any
    _stopped: bool = field(default=False)

    async def stop(self) -> None:
        """Health to NOT_SERVING, drain in-flight calls for the grace period, then release."""
        if self._stopped:
            return
        self._stopped = True
        self._admission.close()  # no new admission streams; open ones are answered until drained
        await self.server.stop(self._grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._backstop.flushed()
        await self._open.aclose()
        if self._owns_backend:
            await self._backend.close()
        await asyncio.to_thread(self._metrics.shutdown)  # blocks up to the server's 0.5 s poll
        await asyncio.to_thread(tracing.shutdown)

    async def wait_closed(self) -> None:
        await self.server.server.wait_for_termination()


async def build_app(
    settings: RatelimitSettings,
    *,
    counters: CounterBackend | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> App:
    """Start serving (NOT_SERVING until the first policy snapshot); ``stop()`` undoes it all.

    ``counters`` replaces the backend named by ``settings.redis.url`` and stays the caller's
    to close; ``clock`` drives the memory backend built here.
    """
    check_settings(settings)
    backend = (
        counters if counters is not None else make_backend(settings.redis.url.get_secret_value(), clock=clock)
    )
    limiter = RateLimiter(
        backend,
        clock=clock,
        lease_seconds=settings.reservation_lease_seconds,
        prompt_bytes_per_token=settings.prompt_bytes_per_token,
    )
    servicer = RateLimitServicer(limiter)
    open_admissions = make_open_admissions(settings.redis.url.get_secret_value())  # beside the counters
    backstop = Backstop(
        open_admissions,
        after_seconds=settings.backstop_after_seconds,
        hold_seconds=settings.backstop_hold_seconds,
        clock=clock,
    )
    kept = backstop if settings.backstop_enabled else None
    admission = AdmissionServicer(limiter, kept)

    held: dict[str, policy_pb2.Resource] = {}

    def on_update(update: PolicyUpdate) -> None:
        nonlocal held
        resources = apply_update(held, update)
        snapshot = snapshot_from_policy(update.version, resources.values())
        limiter.replace(snapshot)
        held = resources
        log.info("ratelimit_limits_applied", version=snapshot.version, limits=snapshot.size)

    try:
        running = await start_server(
            settings.grpc,
            [
                lambda server: admission_pb2_grpc.add_AdmissionServiceServicer_to_server(admission, server),
                lambda server: rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server),
                lambda server: admission_pb2_grpc.add_UsageBackstopServicer_to_server(
                    UsageBackstopServicer(backstop), server
                ),
            ],
            services=[ADMISSION_SERVICE, SERVICE_NAME, BACKSTOP_SERVICE],
            reuse_port=settings.workers > 1,
            identity=settings.identity,
            allowed=_callers(settings.identity.namespace),
        )
    except BaseException:
        await open_admissions.aclose()
        if counters is None:
            await backend.close()
        raise
    try:
        stream = settings.admission_stream
        identity = settings.identity
        tls = server_context(identity) if identity.enabled else None
        admission_server = await start_admission_stream(
            limiter,
            stream.host,
            stream.port,
            reuse_port=settings.workers > 1,
            tls=tls,
            allowed=frozenset({spiffe_id("ext-authz", identity.namespace)}),
            backstop=kept,
        )
        metrics = serve_metrics(settings.metrics)
        tracing.configure("tessera-ratelimit", settings.tracing)
    except BaseException:
        await running.stop(0)
        await open_admissions.aclose()
        if counters is None:
            await backend.close()
        raise

    subscriber, tasks = follow_policy(
        settings.policy, service="ratelimit", on_update=on_update, server=running, identity=identity
    )
    if tls is not None:
        tasks = (*tasks, asyncio.create_task(follow_renewals(tls, identity), name="ratelimit-identity"))
    return App(
        port=running.port,
        admission_port=admission_server.sockets[0].getsockname()[1],
        metrics_port=metrics.port,
        limiter=limiter,
        subscriber=subscriber,
        server=running,
        _backend=backend,
        _owns_backend=counters is None,
        _open=open_admissions,
        _backstop=backstop,
        _grace=settings.grpc.grace_seconds,
        _tasks=tasks,
        _metrics=metrics,
        _admission=admission_server,
    )
