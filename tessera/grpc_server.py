"""grpc.aio server scaffolding shared by every service.

``start_server`` binds (a taken port is a startup error, not a silent rebind),
registers health and reflection, installs the one interceptor that maps the
``TesseraError`` tree to status codes, and returns a handle the service's
``build_app`` hands to its caller. Health starts NOT_SERVING; the service
flips it once its config or snapshot has loaded.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tessera.errors import ConfigError, TesseraError
from tessera.metrics import set_ready
from tessera.settings import GrpcSettings, IdentitySettings
from tessera.tls import grpc_server_credentials
from tessera.tracing import SERVER, TRACEPARENT, TRACER, Span, enter, leave, parse_traceparent, trace_id_of

log = structlog.get_logger("tessera.grpc")

Register = Callable[[grpc.aio.Server], None]


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, TesseraError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Binds per-RPC log context and maps TesseraError to a status; logs the unexpected once.

    The wrapped handler is built once per method and cached: Check and ShouldRateLimit run
    this on every request, so nothing here allocates per call beyond the context binding.
    """

    def __init__(self, allowed: Mapping[str, frozenset[str]] | None = None) -> None:
        self._wrapped: dict[str, Any] = {}
        # service name -> the SPIFFE IDs that may call it (``permitted``; mutual TLS only); a
        # service not named here (health, reflection) takes any peer whose certificate chains
        # to the CA
        self._allowed = allowed

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        method = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = _wrap(method, handler, self._callers(method))
        return wrapped

    def _callers(self, method: str) -> frozenset[str] | None:
        """Who may call ``method`` (None: anyone who reached it). Under mutual TLS a service not
        in the allow list is refused to everyone, except health and reflection (any peer whose
        certificate chains to the CA)."""
        if self._allowed is None:
            return None
        service = method.split("/")[1]
        if service in _ANY_PEER:
            return None
        return self._allowed.get(service, frozenset())


_ANY_PEER = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})
_TRACE_ROOTS = "/tessera.admin."  # calls that start a trace when their caller sent none


def _bind(rpc: str, ctx: Any, *, roots: bool, span: bool = True) -> Span | None:
    """Log context for the call (its request and trace ids) and, when tracing and ``span``, its
    span: the child of the caller's ``traceparent``, or a new trace where ``roots`` (admin)."""
    request_id, traceparent = "", None
    for key, value in ctx.invocation_metadata() or ():
        if key == "x-request-id":
            request_id = value
        elif key == TRACEPARENT:
            traceparent = value
    trace_id = trace_id_of(traceparent)
    if trace_id is None:
        structlog.contextvars.bind_contextvars(rpc=rpc, request_id=request_id)
    else:
        structlog.contextvars.bind_contextvars(rpc=rpc, request_id=request_id, trace_id=trace_id)
    if not span or not TRACER.enabled:
        return None
    return TRACER.start(rpc, parse_traceparent(traceparent), SERVER, root=roots)


async def _fail(ctx: Any, exc: Exception) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc  # ctx.abort() already carries its status
    code, message = _status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("rpc_failed", exc_info=exc)
    await ctx.abort(code, message)


def permitted(peer: str, allowed: frozenset[str]) -> bool:
    """Whether the SPIFFE ID ``peer`` is in ``allowed``, whose entries ending in ``/`` name every
    ID under them (``spiffe://tessera.local/ns/default/envoy/``: each Envoy node)."""
    if not peer:
        return False
    return peer in allowed or any(p.endswith("/") and peer.startswith(p) for p in allowed)


async def _refuse_unless(allowed: frozenset[str], rpc: str, ctx: Any) -> None:
    """PERMISSION_DENIED (and a log line) for a peer whose identity may not call ``rpc``."""
    found = ctx.auth_context().get("peer_spiffe_id") or [b""]
    peer = found[0].decode()
    if not permitted(peer, allowed):
        log.warning("rpc_refused", rpc=rpc, peer=peer or None, reason="identity not allowed")
        await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, f"{peer or 'this caller'} may not call {rpc}")


def _single(rpc: str, inner: Any, allowed: frozenset[str] | None) -> Any:
    """The wrapper of a call with one response: log context, the identity check, its span."""
    roots = rpc.startswith(_TRACE_ROOTS)

    async def single(req: Any, ctx: Any) -> Any:
        span = _bind(rpc, ctx, roots=roots)
        token = enter(span)
        error = ""
        try:
            if allowed is not None:  # only under mutual TLS: Check pays nothing otherwise
                await _refuse_unless(allowed, rpc, ctx)
            return await inner(req, ctx)
        except asyncio.CancelledError:
            error = "Cancelled"  # the caller gave up (Envoy's authz timeout)
            raise
        except Exception as exc:
            error = type(exc).__name__
            await _fail(ctx, exc)
        finally:
            leave(token)
            TRACER.end(span, error)

    return single


def _wrap(rpc: str, handler: Any, allowed: frozenset[str] | None = None) -> Any:
    if handler.unary_unary or handler.stream_unary:  # one response, to one request or a stream
        single = _single(rpc, handler.unary_unary or handler.stream_unary, allowed)
        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(single, handler.request_deserializer, handler.response_serializer)
    if handler.stream_stream or handler.unary_stream:
        streaming: Any = handler.stream_stream or handler.unary_stream

        async def stream(req: Any, ctx: Any) -> AsyncIterator[Any]:
            _bind(rpc, ctx, roots=False, span=False)  # long-lived: its log context only
            if allowed is not None:  # only under mutual TLS: Check pays nothing otherwise
                await _refuse_unless(allowed, rpc, ctx)
            try:
                async for item in streaming(req, ctx):
                    yield item
            except Exception as exc:
                await _fail(ctx, exc)

        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.stream_stream
            else grpc.unary_stream_rpc_method_handler
        )
        return factory(stream, handler.request_deserializer, handler.response_serializer)
    return handler


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    services: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            await self.health.set(name, status)
        set_ready(serving)

    async def stop(self, grace: float) -> None:
        set_ready(False)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    settings: GrpcSettings,
    register: Iterable[Register],
    *,
    services: Iterable[str],
    reuse_port: bool = False,
    interceptors: Iterable[grpc.aio.ServerInterceptor] | None = None,
    identity: IdentitySettings | None = None,
    allowed: Mapping[str, frozenset[str]] | None = None,
) -> RunningServer:
    """Bind, register and start; health begins NOT_SERVING. With an ``identity``: mutual TLS
    (a client certificate from the CA), and each service named in ``allowed`` answers only the
    SPIFFE IDs listed for it (PERMISSION_DENIED for the rest)."""
    tls = identity is not None and identity.enabled
    if tls and interceptors is not None:
        msg = "an identity's allow list lives in the default interceptor: no custom interceptors with it"
        raise ConfigError(msg)
    options = [
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_send_message_length", 8 * 1024 * 1024),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]
    chosen = list(interceptors) if interceptors is not None else [ErrorInterceptor(allowed if tls else None)]
    server = grpc.aio.server(interceptors=chosen, options=options)
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(services)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    try:
        if tls:
            assert identity is not None  # noqa: S101 - tls implies it
            port = server.add_secure_port(address, grpc_server_credentials(identity))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        msg = f"cannot listen on {address}: address already in use or not available"
        raise ConfigError(msg) from exc
    if port == 0:
        msg = f"cannot listen on {address}: address already in use or not available"
        raise ConfigError(msg)
    await server.start()
    running = RunningServer(server=server, port=port, health=health_servicer, services=names)
    await running.set_serving(False)
    return running


async def wait_for_termination(stop: Callable[[], Awaitable[None]]) -> None:
    """Block until SIGTERM or SIGINT, then run ``stop`` once."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    log.info("shutdown_requested")
    await stop()
