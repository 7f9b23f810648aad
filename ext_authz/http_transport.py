"""Envoy's ext_authz over HTTP/1.1 (``http_service``): the same decision as the gRPC ``Check``.

Envoy sends ``<method> /authz<original path and query>`` with the allowed headers (plus
``host``, ``content-length: 0`` and ``authorization``) and no body, over keep-alive
connections, one request in flight on each. This is a lean asyncio.Protocol + httptools
server (uvloop when installed): no framework, and the common decision (no admission to wait
for) is answered in the same callback that parsed it, without a task.

The ``Outcome`` becomes the answer Envoy's filter understands (``control_plane/xds/listener.py``
lists these headers):

* allow: ``200`` with the identity headers (``allowed_upstream_headers``: they replace the
  client's), ``x-envoy-auth-headers-to-remove`` (the credentials and every ``x-tessera-*`` fact),
  the metadata headers ``tenant_id``, ``key_id`` and ``reserved`` (``dynamic_metadata_from_headers``
  stores them under ``envoy.filters.http.ext_authz`` by these names, as the gRPC Struct does)
  and the ``x-ratelimit-*`` headers (``allowed_client_headers_on_success``).
* deny: the OpenAI status (400/401/404/429) and JSON body, ``content-type``,
  ``www-authenticate`` on 401, ``retry-after`` and ``x-ratelimit-*`` (``allowed_client_headers``).
  A 400 or 429 refusal of an authenticated caller also carries the metadata headers
  ``tenant_id`` and ``key_id`` (its usage line names the tenant), as over gRPC.
* an unexpected error: ``500``, which Envoy turns into its ``status_on_error`` 503 (fail closed),
  as it does with a failed gRPC call.

``GET /healthz`` answers 200 once the first policy snapshot is in and 503 before (and while
stopping): the supervisor's and Kubernetes' probe, like gRPC health.

Responses go out in request order (pipelining-safe). When Envoy drops a connection, decisions
still waiting for an admission are cancelled, and ``Authorizer.authorize`` gives back what they
were admitted with.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Coroutine
from http import HTTPStatus
from typing import Any, Final, cast

import httptools
import structlog

from ext_authz.answers import (
    FAIRNESS_HEADER,
    HEADERS_TO_REMOVE,
    PRIORITY_HEADER,
    RESERVED_KEY,
    Answers,
    names_tenant,
)
from ext_authz.authorize import Authorizer, Outcome
from tessera.client_errors import error_json, status_of
from tessera.clock import Clock
from tessera.endpoints import Dialect
from tessera.errors import ConfigError
from tessera.grpc_server import permitted
from tessera.metrics import set_ready
from tessera.settings import GrpcSettings, IdentitySettings
from tessera.tls import follow_renewals, peer_spiffe_id, server_context
from tessera.tracing import SERVER, TRACEPARENT, TRACER, Span, parse_traceparent, trace_id_of

log = structlog.get_logger("ext_authz")

PATH_PREFIX: Final = "/authz"  # Envoy's http_service.path_prefix (control_plane/xds/config.py)
HEALTH_PATH: Final = "/healthz"
MAX_HEAD_BYTES: Final = 64 * 1024  # request line and headers; Envoy's own default limit is 60 KiB
MAX_PIPELINE: Final = 256  # answers queued on one connection before it stops reading
CHECK_SPAN: Final = "ext_authz Check"

_PREFIX: Final = PATH_PREFIX.encode() + b"/"
_PREFIX_LEN: Final = len(PATH_PREFIX)
_HEALTH: Final = HEALTH_PATH.encode()
_END_EMPTY: Final = b"content-length: 0\r\n\r\n"
_HEADER_END: Final = b"\r\n\r\n"
_CLOSE: Final = b"\r\nconnection: close\r\n\r\n"


def _value(text: str) -> str:
    """A header value that cannot end the header early (ids and counters never carry CR/LF)."""
    return text.replace("\r", " ").replace("\n", " ") if "\r" in text or "\n" in text else text


def _head(status: int, headers: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> bytes:
    """The status line and header lines, without the framing (content-length, blank line)."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"]
    lines.extend(f"{k}: {_value(v)}\r\n" for k, v in headers)
    return "".join(lines).encode("latin-1", "replace")


def _framed(head: bytes, body: bytes = b"") -> bytes:
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


_REMOVE: Final = ", ".join(HEADERS_TO_REMOVE)


def allow_head(tenant_id: str, key_id: str, priority: int = 0) -> bytes:
    """Identity and scheduling headers (Envoy replaces the client's), what to strip, metadata."""
    return _head(
        200,
        (
            ("x-tenant-id", tenant_id),
            ("x-key-id", key_id),
            (FAIRNESS_HEADER, tenant_id),
            (PRIORITY_HEADER, str(priority)),
            ("x-envoy-auth-headers-to-remove", _REMOVE),
            # dynamic_metadata_from_headers: envoy.filters.http.ext_authz {tenant_id, key_id}
            ("tenant_id", tenant_id),
            ("key_id", key_id),
        ),
    )


def deny_response(
    code: str,
    message: str | None = None,
    dialect: Dialect = Dialect.OPENAI,
    param: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    http_status = status_of(code)
    headers = [("content-type", "application/json")]
    if http_status == 401:  # noqa: PLR2004
        headers.append(("www-authenticate", "Bearer"))
    headers.extend(extra)
    return _framed(_head(http_status, headers), error_json(code, message, param, dialect).encode())


_HEALTHY: Final = _framed(_head(200, [("content-type", "text/plain")]), b"serving\n")
_UNHEALTHY: Final = _framed(_head(503, [("content-type", "text/plain")]), b"not serving\n")
_NOT_FOUND: Final = _framed(
    _head(404, [("content-type", "application/json")]), error_json("not_found").encode()
)
_FAILED: Final = _framed(
    _head(500, [("content-type", "application/json")]), b'{"error":{"message":"internal error"}}'
)
_BAD_REQUEST: Final = _framed(_head(400, [("connection", "close")]))
# A peer whose identity may not ask (mutual TLS): Envoy's own 403 would look like a denial.
_REFUSED: Final = _framed(_head(403, [("connection", "close")]))
_TOO_LARGE: Final = _framed(_head(431, [("connection", "close")]))


def _allow_answer(tenant_id: str, key_id: str, priority: int) -> tuple[bytes, bytes]:
    """(the head to extend with more headers, the whole answer as it is)."""
    head = allow_head(tenant_id, key_id, priority)
    return head, head + _END_EMPTY


class Responder:
    """Outcome -> HTTP response bytes (cached and counted by ``ext_authz.answers``)."""

    def __init__(self, authorizer: Authorizer, clock: Clock) -> None:
        self._answers: Answers[tuple[bytes, bytes], bytes] = Answers(
            authorizer, clock, allow=_allow_answer, deny=deny_response
        )

    def respond(self, outcome: Outcome, request_id: str) -> bytes:
        if not outcome.decision.allowed:
            return self._deny(outcome, request_id)
        head, whole = self._answers.allowed(outcome.decision)
        if not outcome.response_headers and not outcome.reserved:
            return whole
        extra = list(outcome.response_headers)
        if outcome.reserved:
            extra.append((RESERVED_KEY, "1"))
        return head + "".join(f"{k}: {_value(v)}\r\n" for k, v in extra).encode() + _END_EMPTY

    def _deny(self, outcome: Outcome, request_id: str) -> bytes:
        fixed = self._answers.refused(outcome, request_id)
        if fixed is not None:
            return fixed
        decision = outcome.decision
        extra = outcome.response_headers
        if names_tenant(decision):  # an authenticated tenant's refusal: its usage line says so
            extra = (*extra, ("tenant_id", decision.tenant_id), ("key_id", decision.key_id))
        return deny_response(decision.code, decision.message, outcome.dialect, decision.param, extra)


async def _finish(coro: Coroutine[Any, Any, Outcome], waiting: Any) -> Outcome:
    """Drive ``coro`` on from where its first step (run inline, without a task) suspended.

    ``waiting`` is what it yielded: the future it awaits. This task waits for the same future,
    then resumes ``coro``, which reads the future's result (or its cancellation) itself. If this
    task is cancelled while that future is already done, the cancellation is thrown into ``coro``.
    """
    while True:
        cancelled = False
        try:
            if waiting is None:  # a bare yield (asyncio.sleep(0))
                await asyncio.sleep(0)
            else:
                # As a Task does with what its coroutine yields: the future's own await sets
                # this flag, and refuses a second await while it is set.
                waiting._asyncio_future_blocking = False  # noqa: SLF001 - asyncio's protocol
                await waiting
        except asyncio.CancelledError:
            cancelled = True
        except BaseException:  # noqa: S110 - coro reads the exception from the future itself
            pass
        try:
            if cancelled and not (isinstance(waiting, asyncio.Future) and waiting.cancelled()):
                waiting = coro.throw(asyncio.CancelledError())
            else:
                waiting = coro.send(None)
        except StopIteration as done:
            result: Outcome = done.value
            return result


class _Pending:
    """A decision still waiting (for an admission verdict), in its place in the answer order."""

    __slots__ = ("request_id", "span", "strip_body", "task", "traceparent")

    def __init__(
        self,
        task: asyncio.Task[Outcome],
        request_id: str,
        strip_body: bool,
        traceparent: str | None,
        span: Span | None,
    ) -> None:
        self.task = task
        self.request_id = request_id
        self.strip_body = strip_body
        self.traceparent = traceparent
        self.span = span


class _Connection(asyncio.Protocol):
    """One Envoy connection: parse, decide, answer in order; never more than one parser error."""

    def __init__(self, server: HttpAuthzServer) -> None:
        self._server = server
        self._responder = server.responder
        self._authorizer = server.authorizer
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[bytes | _Pending] = deque()
        self._url: list[bytes] = []
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._closing = False  # answer what is queued, then close; read no more
        self._paused = False  # reading paused: Envoy does not read, or too many answers wait
        self._write_paused = False
        self._may_decide = True  # under mutual TLS: whether this peer may ask (else health only)

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport (uvloop's is no asyncio.Transport subclass, but is one).
        self._transport = cast("asyncio.Transport", transport)
        self._server.connections.add(self)
        allowed = self._server.allowed
        if allowed is not None:  # mutual TLS: the handshake is done, the peer's certificate known
            peer = peer_spiffe_id(transport) or ""
            self._may_decide = permitted(peer, allowed)
            if not self._may_decide:
                log.warning(
                    "rpc_refused", rpc="http_service", peer=peer or None, reason="identity not allowed"
                )

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._closing = True  # CONNECT or Upgrade: answered above, nothing after it is HTTP
        except httptools.HttpParserError:
            self._queue.append(_TOO_LARGE if self._head_bytes > MAX_HEAD_BYTES else _BAD_REQUEST)
            self._closing = True
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's signature
        self._server.forget(self)
        self._closing = True
        queue, self._queue = self._queue, deque()
        for item in queue:
            if isinstance(item, _Pending):
                TRACER.end(item.span, "Cancelled")  # answered to nobody
                task = item.task
                if not task.done():
                    # Envoy gave up on this check: the request will not run, and authorize
                    # gives back what it was admitted with. Cancelled in a later callback, so
                    # that the task has begun waiting (a task cancelled before its first step
                    # would never resume the decision).
                    asyncio.get_running_loop().call_soon(task.cancel)
                elif not task.cancelled():
                    task.exception()  # retrieved: no "exception was never retrieved" noise

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = []
        self._headers = {}
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head too large")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        seen = self._headers.get(key)
        # Envoy's gRPC CheckRequest joins repeated headers the same way.
        self._headers[key] = text if seen is None else f"{seen},{text}"

    def on_message_complete(self) -> None:
        if self._closing:
            return
        parser = self._parser
        url = b"".join(self._url)
        if not parser.should_keep_alive():
            self._closing = True
        if url.startswith(_PREFIX) and not self._may_decide:
            self._queue.append(_REFUSED)
            self._closing = True
        elif url.startswith(_PREFIX):
            self._decide(url[_PREFIX_LEN:].decode("latin-1"), parser.get_method() == b"HEAD")
        elif url == _HEALTH or url.startswith(_HEALTH + b"?"):
            self._queue.append(_HEALTHY if self._server.serving else _UNHEALTHY)
        else:
            self._queue.append(_NOT_FOUND)
        if len(self._queue) > MAX_PIPELINE:
            self._update_reading()

    # --- deciding and answering ---------------------------------------------------------------

    def _decide(self, path: str, strip_body: bool) -> None:
        headers = self._headers
        request_id = headers.get("x-request-id", "")
        # Envoy's HTTP authz client sets traceparent (its span); the client's own is replaced
        traceparent = headers.get(TRACEPARENT)
        span = TRACER.start(CHECK_SPAN, parse_traceparent(traceparent), SERVER) if TRACER.enabled else None
        coro = self._authorizer.authorize(headers, path, span.context if span is not None else None)
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            # Decided without waiting (no limit applies, or a denial): answered at once.
            self._queue.append(self._answer(done.value, request_id, strip_body, traceparent))
            TRACER.end(span)
            return
        except Exception as exc:
            log.exception("authz_failed", request_id=request_id)
            self._queue.append(_FAILED)
            TRACER.end(span, type(exc).__name__)
            return
        task = asyncio.get_running_loop().create_task(_finish(coro, waiting))
        task.add_done_callback(self._on_decided)
        self._queue.append(_Pending(task, request_id, strip_body, traceparent, span))

    def _answer(self, outcome: Outcome, request_id: str, strip_body: bool, traceparent: str | None) -> bytes:
        try:
            trace_id = None if outcome.decision.allowed else trace_id_of(traceparent)
            if trace_id:  # a refusal: its log line names the trace
                with structlog.contextvars.bound_contextvars(trace_id=trace_id):
                    resp = self._responder.respond(outcome, request_id)
            else:
                resp = self._responder.respond(outcome, request_id)
        except Exception:
            log.exception("authz_failed", request_id=request_id)
            return _FAILED
        if strip_body:  # a HEAD request's answer has no body (Envoy's codec reads none)
            resp = resp[: resp.index(_HEADER_END) + len(_HEADER_END)]
        return resp

    def _on_decided(self, _task: asyncio.Task[Outcome]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._flush()

    def _flush(self) -> None:
        """Write every answer at the head of the queue that is ready, in order, in one write."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        out = self._ready_answers()
        closing = not self._queue and (self._closing or self._server.draining)
        if out:
            if closing:  # the last answer on this connection says so
                out[-1] = _close_header(out[-1])
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if closing:
            transport.close()
        else:
            self._update_reading()

    def _ready_answers(self) -> list[bytes]:
        queue = self._queue
        out: list[bytes] = []
        while queue:
            item = queue[0]
            if isinstance(item, _Pending):
                task = item.task
                if not task.done():
                    break
                try:
                    outcome = task.result()
                except (Exception, asyncio.CancelledError) as exc:
                    log.exception("authz_failed", request_id=item.request_id)
                    out.append(_FAILED)
                    TRACER.end(item.span, type(exc).__name__)
                else:
                    out.append(self._answer(outcome, item.request_id, item.strip_body, item.traceparent))
                    TRACER.end(item.span)
            else:
                out.append(item)
            queue.popleft()
        return out

    def drain(self) -> None:
        """The server is stopping: close now if idle, else once the queued answers are out."""
        if not self._queue:
            if self._transport is not None:
                self._transport.close()
        else:
            self._flush()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _update_reading(self) -> None:
        """Stop reading while Envoy does not read our answers or too many wait; resume after."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._paused:
            if not self._write_paused and len(self._queue) <= MAX_PIPELINE // 2:
                self._paused = False
                transport.resume_reading()
        elif self._write_paused or len(self._queue) > MAX_PIPELINE:
            self._paused = True
            transport.pause_reading()


def _close_header(resp: bytes) -> bytes:
    if b"\r\nconnection: close\r\n" in resp[: resp.index(_HEADER_END) + 2]:
        return resp
    return resp.replace(_HEADER_END, _CLOSE, 1)


class HttpAuthzServer:
    """The listening socket and its connections; NOT serving until the first policy snapshot."""

    def __init__(
        self,
        authorizer: Authorizer,
        clock: Clock,
        identity: IdentitySettings | None = None,
        allowed: frozenset[str] = frozenset(),
    ) -> None:
        self.authorizer = authorizer
        # Mutual TLS with an identity: only ``allowed`` peers (grpc_server.permitted) may ask;
        # any peer from the CA may read /healthz.
        self.identity = identity
        self.allowed = allowed if identity is not None else None
        self.responder = Responder(authorizer, clock)
        self.connections: set[_Connection] = set()
        self.serving = False
        self.draining = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._all_closed = asyncio.Event()
        self._tls: ssl.SSLContext | None = None
        self._renewals: asyncio.Task[None] | None = None

    def forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._all_closed.set()

    async def start(self, settings: GrpcSettings, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if self.identity is not None:
            self._tls = server_context(self.identity)
            self._renewals = loop.create_task(follow_renewals(self._tls, self.identity))
        address = f"{settings.host}:{settings.port}"
        try:
            self._server = await loop.create_server(
                lambda: _Connection(self),
                settings.host,
                settings.port,
                reuse_port=reuse_port,
                backlog=1024,
                ssl=self._tls,
            )
        except OSError as exc:
            msg = f"cannot listen on {address}: address already in use or not available"
            raise ConfigError(msg) from exc
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        set_ready(serving)

    async def stop(self, grace: float) -> None:
        """Health 503, stop accepting, answer what is in flight (``connection: close``), close."""
        self.serving = False
        set_ready(False)
        self.draining = True
        if self._renewals is not None:
            self._renewals.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.drain()
        if self.connections:
            self._all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost and the cancellations run


async def start_http_server(
    settings: GrpcSettings,
    authorizer: Authorizer,
    clock: Clock,
    *,
    reuse_port: bool = False,
    identity: IdentitySettings | None = None,
    allowed: frozenset[str] = frozenset(),
) -> HttpAuthzServer:
    server = HttpAuthzServer(authorizer, clock, identity, allowed)
    await server.start(settings, reuse_port=reuse_port)
    return server


def loop_factory() -> Any:
    """uvloop's event loop when it is installed, else None (asyncio's default)."""
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return None
    return uvloop.new_event_loop
