"""Composition root of the control plane."""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import structlog
from aiohttp import web
from envoy.service.discovery.v3 import ads_pb2_grpc
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane import changes
from control_plane.admin.api_keys import ApiKeyServiceServicer
from control_plane.admin.audit_service import AuditServiceServicer
from control_plane.admin.auth import Authenticator
from control_plane.admin.base import AdminContext
from control_plane.admin.principals import PrincipalServiceServicer
from control_plane.admin.registry import LimitServiceServicer, ModelServiceServicer
from control_plane.admin.resources import ResourceServiceServicer
from control_plane.admin.tenants import PlanServiceServicer, TenantServiceServicer
from control_plane.admin.usage import InvoiceServiceServicer, UsageServiceServicer
from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.db.migrate import current_revision, head_revision
from control_plane.http_api import build_http_app
from control_plane.jwt_keys import JwtPolicy
from control_plane.load import LoadWatcher
from control_plane.policy_servicer import PolicyCache, PolicyServiceServicer, subscribers
from control_plane.publisher import Publisher
from control_plane.resources.apply import Applier
from control_plane.resources.config_dir import ConfigDirSource
from control_plane.resources.kube import Controller
from control_plane.settings import ControlPlaneSettings
from control_plane.usage.delivery import OutboxDeliverer, prune_forever
from control_plane.usage.invoices import close_invoices_forever
from control_plane.xds.ads_servicer import AggregatedDiscoveryServiceServicer
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.translate import GatewayConfig
from tessera import keys, tracing
from tessera.admin.v1 import admin_pb2_grpc
from tessera.errors import ConfigError
from tessera.grpc_server import RunningServer, permitted, start_server
from tessera.identity import envoy_nodes, spiffe_id
from tessera.metrics import MetricsServer, serve_metrics
from tessera.policy.v1 import policy_pb2_grpc
from tessera.settings import redact_url
from tessera.tls import peer_spiffe_id, server_context

log = structlog.get_logger("control_plane")

ADMIN_DESCRIPTOR = Path(admin_pb2_grpc.__file__).with_name("admin_descriptor.pb")
ADMIN_SERVICERS = {
    "TenantService": TenantServiceServicer,
    "PlanService": PlanServiceServicer,
    "PrincipalService": PrincipalServiceServicer,
    "ApiKeyService": ApiKeyServiceServicer,
    "AuditService": AuditServiceServicer,
    "ModelService": ModelServiceServicer,
    "LimitService": LimitServiceServicer,
    "UsageService": UsageServiceServicer,
    "InvoiceService": InvoiceServiceServicer,
    "ResourceService": ResourceServiceServicer,
}
POLICY_SERVICE = "tessera.policy.v1.PolicyService"
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


@dataclass
class App:
    admin: RunningServer
    xds: RunningServer
    policy: RunningServer
    http_runner: web.AppRunner
    http_port: int
    metrics: MetricsServer
    engine: AsyncEngine
    publisher: Publisher
    applier: Applier  # declarative resources: the config directory's and the controller's core
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def admin_port(self) -> int:
        return self.admin.port

    @property
    def xds_port(self) -> int:
        return self.xds.port

    @property
    def policy_port(self) -> int:
        return self.policy.port

    @property
    def metrics_port(self) -> int:
        return self.metrics.port

    async def stop(self, grace: float = 1.0) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(self.admin.stop(grace), self.xds.stop(grace), self.policy.stop(grace))
        await self.http_runner.cleanup()
        self.metrics.shutdown()
        await asyncio.to_thread(tracing.shutdown)
        await self.engine.dispose()


async def check_schema(engine: AsyncEngine) -> None:
    try:
        current = await current_revision(engine)
    except (OperationalError, InterfaceError) as exc:
        msg = f"cannot reach the database: {type(exc.orig or exc).__name__}"
        raise ConfigError(msg) from exc
    head = head_revision()
    if current != head:
        msg = (
            f"database schema is at revision {current or 'empty'}, expected {head}: "
            "run `tessera control-plane migrate`"
        )
        raise ConfigError(msg)


def _only_envoy(namespace: str) -> Any:
    """aiohttp middleware under mutual TLS: only Envoy nodes' certificates are answered."""
    envoys = frozenset({envoy_nodes(namespace)})

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        peer = peer_spiffe_id(request.transport) if request.transport is not None else None
        if not permitted(peer or "", envoys):
            log.warning("rpc_refused", rpc=f"http {request.path}", peer=peer, reason="identity not allowed")
            raise web.HTTPForbidden(text="this identity may not call the control plane's HTTP API")
        response: web.StreamResponse = await handler(request)
        return response

    return check


async def _start_http(
    settings: ControlPlaneSettings, publisher: Publisher, pepper: bytes
) -> tuple[web.AppRunner, int]:
    identity = settings.identity
    app = build_http_app(publisher, pepper)
    tls = server_context(identity) if identity.enabled else None
    if tls is not None:
        app.middlewares.insert(0, _only_envoy(identity.namespace))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # SO_REUSEADDR: a restart must not trip over TIME_WAIT; Linux still refuses a second listener.
    site = web.TCPSite(runner, settings.http.host, settings.http.port, reuse_address=True, ssl_context=tls)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        msg = f"cannot listen on {settings.http.host}:{settings.http.port}: {exc.strerror}"
        raise ConfigError(msg) from exc
    server = site._server  # noqa: SLF001 - aiohttp exposes the bound port only here
    sockets = getattr(server, "sockets", None) or []
    return runner, int(sockets[0].getsockname()[1]) if sockets else settings.http.port


def _registrar(service: str, servicer: object) -> Callable[[grpc.aio.Server], None]:
    add = getattr(admin_pb2_grpc, f"add_{service}Servicer_to_server")
    return lambda server: add(servicer, server)


def _resource_sources(settings: ControlPlaneSettings, applier: Applier) -> list[asyncio.Task[None]]:
    """The declarative sources configured: a watched directory, Kubernetes custom resources."""
    tasks = []
    if settings.config_dir is not None:
        source = ConfigDirSource(settings.config_dir, applier, settings.config_dir_poll_seconds)
        tasks.append(asyncio.create_task(source.run_forever()))
    if settings.kube_namespace:
        controller = Controller(applier, settings.kube_namespace)
        tasks.append(asyncio.create_task(controller.run_forever()))
    return tasks


async def build_app(settings: ControlPlaneSettings) -> App:  # noqa: PLR0915 - the composition root
    url = settings.database.url.get_secret_value()
    engine = make_engine(url)
    try:
        await check_schema(engine)
    except ConfigError:
        await engine.dispose()
        raise
    pepper = keys.load_pepper(settings.pepper.file)
    sessionmaker = make_sessionmaker(engine)

    xds_cache, policy_cache = SnapshotCache(), PolicyCache()
    jwt_settings = settings.jwt
    jwt_policy = JwtPolicy(
        issuer=jwt_settings.issuer,
        audience=jwt_settings.audience,
        token_ttl=timedelta(seconds=jwt_settings.token_ttl_seconds),
        rotate_after=timedelta(seconds=jwt_settings.rotate_after_seconds),
        publish_lead=timedelta(seconds=jwt_settings.publish_lead_seconds),
    )
    publisher = Publisher(sessionmaker, xds_cache, policy_cache, pepper=pepper, jwt_policy=jwt_policy)
    grace = timedelta(seconds=settings.billing.invoice_grace_seconds)
    # Replicas on one PostgreSQL tell each other of every write (control_plane.changes).
    origin = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    announce = functools.partial(changes.announce, engine, origin) if changes.shares_changes(engine) else None
    ctx = AdminContext(
        sessionmaker,
        publisher,
        Authenticator(pepper, settings.admin_token.get_secret_value()),
        pepper,
        grace,
        announce,
    )
    identity = settings.identity
    envoys = envoy_nodes(identity.namespace)
    admin_services = [f"tessera.admin.v1.{name}" for name in ADMIN_SERVICERS]
    # Under mutual TLS the admin API answers operators (the CLI's identity) and Envoy (REST);
    # each call is then authenticated by its bearer token and authorised by role.
    admin_callers = frozenset({spiffe_id("operator", identity.namespace), envoys})
    admin = await start_server(
        settings.admin,
        [_registrar(name, cls(ctx)) for name, cls in ADMIN_SERVICERS.items()],
        services=admin_services,
        identity=identity,
        allowed=dict.fromkeys(admin_services, admin_callers),
    )
    http_runner, http_port = await _start_http(settings, publisher, pepper)
    gw = settings.gateway
    tls_files = (gw.tls_cert_file, gw.tls_key_file) if gw.tls_cert_file and gw.tls_key_file else None
    # Envoy's view of us needs the bound ports, so the first publish waits for them.
    publisher.configure(
        GatewayConfig(
            host=gw.host,
            port=gw.port,
            control_plane_http_host=gw.control_plane_http_host,
            control_plane_http_port=gw.control_plane_http_port or http_port,
            access_log_path=str(gw.access_log_path) if gw.access_log_path else None,
            max_request_bytes=gw.max_request_bytes,
            admin_host=gw.admin_api_host,
            admin_port=gw.admin_api_port or admin.port,
            admin_descriptor=ADMIN_DESCRIPTOR.read_bytes(),
            per_ip_requests_per_second=gw.per_ip_requests_per_second,
            per_ip_burst=gw.per_ip_burst,
            xff_trusted_hops=gw.xff_trusted_hops,
            upstream_ca_file=gw.upstream_ca_file,
            authz_transport=gw.authz_transport,
            jwt_issuer=settings.jwt.issuer,
            jwt_audience=settings.jwt.audience,
            tls=tls_files is not None,
            admin_rest=gw.admin_rest,
            admin_rest_host=gw.admin_rest_host,
            admin_rest_port=gw.admin_rest_port,
            envoy_identity_sds=gw.envoy_identity_sds,
            envoy_ca_file=gw.envoy_ca_file,
            namespace=identity.namespace,
            otlp_endpoint=settings.tracing.otlp_endpoint,
            trace_sampling_percent=settings.tracing.sampling_percent,
        ),
        tls_files,
    )
    await publisher.publish()

    # ADS under mutual TLS: Envoy nodes only, each served as the node its certificate names.
    xds = await start_server(
        settings.xds,
        [
            lambda s: ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
                AggregatedDiscoveryServiceServicer(xds_cache, envoys if identity.enabled else None), s
            ),
        ],
        services=[ADS_SERVICE],
        identity=identity,
        allowed={ADS_SERVICE: frozenset({envoys})},
    )
    callers = subscribers(identity.namespace)
    policy = await start_server(
        settings.policy_server,
        [
            lambda s: policy_pb2_grpc.add_PolicyServiceServicer_to_server(
                PolicyServiceServicer(policy_cache, callers if identity.enabled else None), s
            ),
        ],
        services=[POLICY_SERVICE],
        identity=identity,
        allowed={POLICY_SERVICE: frozenset(callers)},
    )
    metrics = serve_metrics(settings.metrics)
    tracing.configure("tessera-control-plane", settings.tracing)
    await admin.set_serving(True)
    await xds.set_serving(True)
    await policy.set_serving(True)
    applier = Applier(ctx)
    app = App(admin, xds, policy, http_runner, http_port, metrics, engine, publisher, applier)
    app.tasks.append(asyncio.create_task(publisher.refresh_forever(settings.refresh_seconds)))
    if announce is not None:
        app.tasks.append(asyncio.create_task(changes.follow(engine, origin, publisher.publish)))
    if settings.load_scrape_seconds > 0:
        watcher = LoadWatcher(
            publisher.load_targets, publisher.set_load, interval=settings.load_scrape_seconds
        )
        app.tasks.append(asyncio.create_task(watcher.run_forever()))
    app.tasks.extend(_resource_sources(settings, applier))
    app.tasks.append(asyncio.create_task(close_invoices_forever(sessionmaker, grace)))
    sink_names = [sink.name for sink in settings.billing.sinks]
    keep = timedelta(days=settings.billing.outbox_retention_days)
    app.tasks.append(asyncio.create_task(prune_forever(sessionmaker, sink_names, keep)))
    if settings.billing.sinks:
        deliverer = OutboxDeliverer(
            sessionmaker, settings.billing.sinks, max_backoff=settings.billing.max_backoff_seconds
        )
        app.tasks.append(
            asyncio.create_task(deliverer.run_forever(settings.billing.delivery_interval_seconds))
        )
    log.info(
        "control_plane_listening",
        admin_port=admin.port,
        xds_port=xds.port,
        policy_port=policy.port,
        http_port=http_port,
        metrics_port=metrics.port,
        database=redact_url(url),
    )
    return app
