"""Composition root: pepper, admission stream, the transport's server (gRPC ``Check`` or
HTTP ``http_service``), policy subscriber, metrics."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Protocol

import structlog
from envoy.service.auth.v3 import external_auth_pb2_grpc

from ext_authz.admissions import Admitter
from ext_authz.authorize import Authorizer
from ext_authz.http_transport import start_http_server
from ext_authz.key_index import key_index_from_policy
from ext_authz.servicer import ExtAuthzServicer
from ext_authz.settings import ExtAuthzSettings
from ext_authz.sync_grpc import start_sync_server
from tessera import tracing
from tessera.clock import SYSTEM_CLOCK, Clock
from tessera.errors import ConfigError
from tessera.grpc_server import start_server
from tessera.identity import envoy_nodes
from tessera.keys import load_pepper
from tessera.metrics import MetricsServer, serve_metrics
from tessera.policy_client import PolicySubscriber, PolicyUpdate

log = structlog.get_logger("ext_authz")

SERVICE_NAME = "envoy.service.auth.v3.Authorization"


class Server(Protocol):
    """What the app needs of either transport's server."""

    @property
    def port(self) -> int: ...

    async def set_serving(self, serving: bool) -> None: ...

    async def stop(self, grace: float) -> None: ...


@dataclass
class App:
    port: int
    metrics: MetricsServer
    server: Server
    authorizer: Authorizer
    subscriber: PolicySubscriber
    tasks: tuple[asyncio.Task[None], ...]
    grace_seconds: float
    transport: str = "grpc"

    @property
    def metrics_port(self) -> int:
        return self.metrics.port

    async def stop(self) -> None:
        """Stop taking calls (health NOT_SERVING, then drain), then leave the policy stream."""
        await self.server.stop(self.grace_seconds)
        self.metrics.shutdown()
        await asyncio.to_thread(tracing.shutdown)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _start_transport(settings: ExtAuthzSettings, authorizer: Authorizer, clock: Clock) -> Server:
    reuse_port = settings.workers > 1
    # Under mutual TLS only Envoy nodes may ask (health: any identity from the CA).
    envoys = frozenset({envoy_nodes(settings.identity.namespace)})
    identity = settings.identity if settings.identity.enabled else None
    if settings.transport == "http":
        return await start_http_server(
            settings.grpc, authorizer, clock, reuse_port=reuse_port, identity=identity, allowed=envoys
        )
    servicer = ExtAuthzServicer(authorizer, clock)
    if settings.grpc_server == "sync":
        return start_sync_server(
            settings.grpc,
            servicer,
            SERVICE_NAME,
            threads=settings.grpc_server_threads,
            reuse_port=reuse_port,
            identity=identity,
            allowed=envoys,
        )
    return await start_server(
        settings.grpc,
        [lambda s: external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, s)],
        services=[SERVICE_NAME],
        reuse_port=reuse_port,
        identity=identity,
        allowed={SERVICE_NAME: envoys},
    )


def _follow_policy(
    settings: ExtAuthzSettings, authorizer: Authorizer, server: Server
) -> tuple[PolicySubscriber, tuple[asyncio.Task[None], ...]]:
    """Subscribe; the server reports serving once the first full snapshot is applied (never
    on the admission stream: readiness depends on the snapshot only)."""

    def on_update(update: PolicyUpdate) -> None:
        # Compile first: if it raises, the old index stays and the version is not acked.
        index = key_index_from_policy(
            update.upserts,
            update.deletes,
            version=update.version,
            previous=None if update.reset else authorizer.index,
        )
        authorizer.swap_index(index)

    subscriber = PolicySubscriber(
        settings.policy, service="ext_authz", on_update=on_update, identity=settings.identity
    )

    async def serve_when_ready() -> None:
        await subscriber.ready.wait()
        await server.set_serving(True)
        log.info("serving", subscriber="ext_authz", policy_version=subscriber.version)

    tasks = (
        asyncio.create_task(subscriber.run(), name="ext_authz-policy"),
        asyncio.create_task(serve_when_ready(), name="ext_authz-ready"),
    )
    return subscriber, tasks


async def build_app(settings: ExtAuthzSettings, *, clock: Clock = SYSTEM_CLOCK) -> App:
    pepper = load_pepper(settings.pepper.file)  # ConfigError before anything listens
    tracing.configure("tessera-ext-authz", settings.tracing)
    admitter = Admitter(settings.admission, settings.identity) if settings.admission.stream_url else None
    authorizer = Authorizer(pepper, clock, admitter)
    server = await _start_transport(settings, authorizer, clock)
    try:
        metrics = serve_metrics(settings.metrics)
    except ConfigError:
        await server.stop(0)
        raise
    subscriber, tasks = _follow_policy(settings, authorizer, server)
    if admitter is not None:
        tasks = (*tasks, asyncio.create_task(admitter.run(), name="ext_authz-admissions"))
    log.info("ext_authz_listening", port=server.port, metrics_port=metrics.port, transport=settings.transport)
    return App(
        port=server.port,
        metrics=metrics,
        server=server,
        authorizer=authorizer,
        subscriber=subscriber,
        tasks=tasks,
        grace_seconds=settings.grpc.grace_seconds,
        transport=settings.transport,
    )
