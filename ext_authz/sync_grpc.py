"""gRPC ``Check`` on grpcio's sync server (``TESSERA_GRPC_SERVER=sync``), measured against
grpc.aio in docs/benchmarks.md.

The server's threads receive the calls; each Check's decision runs on the event loop, where
the batched admission stream lives, and the thread waits for its answer. A Check Envoy gives
up on is cancelled on the loop (its admission released), as on grpc.aio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ext_authz.servicer import ExtAuthzServicer
from tessera.errors import ConfigError
from tessera.grpc_server import permitted
from tessera.metrics import set_ready
from tessera.settings import GrpcSettings, IdentitySettings
from tessera.tls import grpc_server_credentials
from tessera.tracing import SERVER, TRACEPARENT, TRACER, Span, enter, leave, parse_traceparent, trace_id_of

log = structlog.get_logger("ext_authz.sync_grpc")
NO_DEADLINE = 86_400.0  # a deadline further away than this is none
CHECK_RPC = "/envoy.service.auth.v3.Authorization/Check"  # the span's name, as on grpc.aio


class _ThreadedCheck(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self, servicer: ExtAuthzServicer, loop: asyncio.AbstractEventLoop, allowed: frozenset[str] | None
    ) -> None:
        self._servicer = servicer
        self._loop = loop
        self._allowed = allowed  # under mutual TLS: who may call Check (grpc_server.permitted)

    def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
        if self._allowed is not None:
            peer = (context.auth_context().get("peer_spiffe_id") or [b""])[0].decode()
            if not permitted(peer, self._allowed):
                log.warning("rpc_refused", rpc="Check", peer=peer or None, reason="identity not allowed")
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"{peer or 'this caller'} may not call Check"
                )
        traceparent = next((v for k, v in context.invocation_metadata() if k == TRACEPARENT), None)
        span = TRACER.start(CHECK_RPC, parse_traceparent(traceparent), SERVER) if TRACER.enabled else None
        future = asyncio.run_coroutine_threadsafe(
            self._check(request, trace_id_of(traceparent), span), self._loop
        )
        context.add_callback(future.cancel)  # the call ended first (Envoy went away): cancel it
        error = ""
        try:
            # Envoy's ext_authz timeout travels as the call's deadline: past it, nobody waits.
            return future.result(timeout=_remaining(context))
        except TimeoutError:
            error = "DeadlineExceeded"
            future.cancel()  # on the loop: the Check's admission is abandoned, given back
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except concurrent.futures.CancelledError:
            error = "Cancelled"
            context.abort(grpc.StatusCode.CANCELLED, "cancelled")
        except Exception as exc:
            error = type(exc).__name__
            log.exception("check_failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            TRACER.end(span, error)

    async def _check(self, request: Any, trace_id: str | None, span: Span | None) -> Any:
        """The decision, on the loop, in its own task: its log lines name the trace, and the
        admission's span is the Check's child."""
        if trace_id is not None:
            structlog.contextvars.bind_contextvars(trace_id=trace_id)
        token = enter(span)
        try:
            return await self._servicer.Check(request, None)
        finally:
            leave(token)


def _remaining(context: Any) -> float | None:
    """Seconds to the call's deadline; None without one (grpcio then reports a huge number)."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE else left


@dataclass
class SyncServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    services: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            self.health.set(name, status)
        set_ready(serving)

    async def stop(self, grace: float) -> None:
        set_ready(False)
        self.health.enter_graceful_shutdown()
        await asyncio.to_thread(self.server.stop(grace).wait)


def start_sync_server(
    settings: GrpcSettings,
    servicer: ExtAuthzServicer,
    service: str,
    *,
    threads: int,
    reuse_port: bool,
    identity: IdentitySettings | None = None,
    allowed: frozenset[str] = frozenset(),
) -> SyncServer:
    """Bind, register Check, health and reflection, start; health begins NOT_SERVING. With an
    ``identity``: mutual TLS, and only the ``allowed`` SPIFFE IDs may call Check."""
    options = [
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=threads), options=options)
    loop = asyncio.get_running_loop()
    check = _ThreadedCheck(servicer, loop, allowed if identity is not None else None)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(check, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    try:
        if identity is not None:
            port = server.add_secure_port(address, grpc_server_credentials(identity))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        msg = f"cannot listen on {address}: address already in use or not available"
        raise ConfigError(msg)
    server.start()
    running = SyncServer(server=server, port=port, health=health_servicer, services=(service,))
    for name in ("", service):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return running
