"""W3C trace context and this process's spans, exported over OTLP/gRPC.

Envoy starts every request's trace (its OpenTelemetry tracer continues a client's
``traceparent``) and hands the context on: to ext_authz as gRPC metadata (or as a header over
HTTP), to the backend as ``traceparent``, and to the meter in the usage line. A service continues
that trace with spans of its own: one per RPC (``tessera.grpc_server``), one per admission, one per
ingested usage line.

Nothing is recorded unless an OTLP endpoint is configured and the parent was sampled (a span with
no parent, such as an admin call from the CLI, is sampled at ``sampling_percent``). Without an
endpoint a service only reads the trace id, for its log lines. Spans wait in a bounded queue and a
daemon thread exports them in batches; a collector that is slow or down loses spans (counted),
never requests.

The OTLP messages come from the copy of opentelemetry-proto that xds-protos ships. It is an older
revision (``instrumentation_library_spans`` where today's proto says ``scope_spans``), but the wire
format is the same: field numbers did not change.
"""

from __future__ import annotations

import contextvars
import os
import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import grpc
import structlog
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client import Counter

from tessera.settings import TracingSettings

log = structlog.get_logger("tessera.tracing")

TRACEPARENT: Final = "traceparent"
EXPORT_METHOD: Final = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SERVER: Final = trace_pb2.Span.SPAN_KIND_SERVER
INTERNAL: Final = trace_pb2.Span.SPAN_KIND_INTERNAL
CONSUMER: Final = trace_pb2.Span.SPAN_KIND_CONSUMER
QUEUE_MAX: Final = 8192  # spans waiting for export; more are dropped (counted)
BATCH_MAX: Final = 512
FLUSH_SECONDS: Final = 1.0
EXPORT_TIMEOUT_SECONDS: Final = 5.0
SHUTDOWN_SECONDS: Final = 2.0  # a stopping process waits this long for its last export

EXPORTED = Counter("tessera_trace_spans_exported_total", "Spans a collector accepted")
DROPPED = Counter("tessera_trace_spans_dropped_total", "Spans lost: queue full or export failed", ["reason"])


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits: the parent of what continues it
    sampled: bool

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


_HEX: Final = frozenset("0123456789abcdef")


def parse_traceparent(value: str | None) -> TraceContext | None:
    """A W3C ``traceparent`` header (version 00, or a later version read as 00), or None for
    anything malformed: an invalid header starts a new trace rather than failing a request."""
    if not value or len(value) < 55:  # noqa: PLR2004 - 2+1+32+1+16+1+2
        return None
    version, trace_id, span_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if (
        value[2] != "-"
        or value[35] != "-"
        or value[52] != "-"
        or version == "ff"
        or (version == "00" and len(value) != 55)  # noqa: PLR2004
        or (len(value) > 55 and value[55] != "-")  # noqa: PLR2004 - a later version may append fields
        or not _HEX.issuperset(version + trace_id + span_id + flags)
        or trace_id == "0" * 32
        or span_id == "0" * 16
    ):
        return None
    return TraceContext(trace_id, span_id, sampled=bool(int(flags, 16) & 1))


@dataclass(slots=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    attributes: dict[str, str | int | bool] = field(default_factory=dict)
    end_ns: int = 0
    error: str = ""

    @property
    def context(self) -> TraceContext:
        return TraceContext(self.trace_id, self.span_id, sampled=True)


def _new_id(digits: int) -> str:
    return f"{random.getrandbits(digits * 4) or 1:0{digits}x}"


class Tracer:
    """Starts and ends this process's spans. Disabled (no exporter) it records nothing."""

    def __init__(self, exporter: OtlpExporter | None = None, sampling_percent: float = 100.0) -> None:
        self.exporter = exporter
        self.sampling = sampling_percent / 100

    @property
    def enabled(self) -> bool:
        return self.exporter is not None

    def start(
        self,
        name: str,
        parent: TraceContext | None,
        kind: int = INTERNAL,
        attributes: Mapping[str, str | int | bool] | None = None,
        *,
        root: bool = False,
    ) -> Span | None:
        """A recording span, or None: not exporting, or the parent was not sampled. With no
        parent, a new trace only where ``root`` (sampled at ``sampling``): a span of a request
        nobody sampled must not become a trace of its own."""
        if self.exporter is None:
            return None
        if parent is None:
            if not root or random.random() >= self.sampling:  # noqa: S311 - sampling, not secrecy
                return None
            trace_id, parent_id = _new_id(32), ""
        elif not parent.sampled:
            return None
        else:
            trace_id, parent_id = parent.trace_id, parent.span_id
        return Span(name, trace_id, _new_id(16), parent_id, kind, time.time_ns(), dict(attributes or {}))

    def end(self, span: Span | None, error: str = "") -> None:
        if span is None or self.exporter is None:
            return
        span.end_ns = time.time_ns()
        span.error = error
        self.exporter.add(span)


_current: contextvars.ContextVar[Span | None] = contextvars.ContextVar("tessera_span", default=None)


def current_context() -> TraceContext | None:
    """The current recording span's context (the parent of a child started now), if any."""
    span = _current.get()
    return span.context if span is not None else None


def enter(span: Span | None) -> contextvars.Token[Span | None] | None:
    """Make ``span`` current for this task (RPC handlers: ``tessera.grpc_server``)."""
    return _current.set(span) if span is not None else None


def leave(token: contextvars.Token[Span | None] | None) -> None:
    if token is not None:
        _current.reset(token)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a ``traceparent`` for log lines, cheaply (no exporter: no span needs the
    whole context); None for anything that is not shaped like one."""
    if traceparent is None or len(traceparent) < 55 or traceparent[2] != "-" or traceparent[35] != "-":  # noqa: PLR2004
        return None
    return traceparent[3:35]


class OtlpExporter:
    """A bounded queue of ended spans and a daemon thread that sends them to an OTLP/gRPC
    collector, at most ``BATCH_MAX`` a call and at least every ``FLUSH_SECONDS``."""

    def __init__(self, endpoint: str, service: str) -> None:
        self.endpoint = endpoint
        self._resource = resource_pb2.Resource(
            attributes=[
                _attr("service.name", service),
                _attr("service.instance.id", f"{os.uname().nodename}/{os.getpid()}"),
            ]
        )
        self._queue: deque[Span] = deque()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._channel = grpc.insecure_channel(endpoint)
        self._export = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=trace_service_pb2.ExportTraceServiceRequest.SerializeToString,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
        )
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    def add(self, span: Span) -> None:
        if len(self._queue) >= QUEUE_MAX:
            DROPPED.labels("queue_full").inc()
            return
        self._queue.append(span)
        if len(self._queue) >= BATCH_MAX:
            self._wake.set()

    def shutdown(self) -> None:
        """Send what is queued (one last flush), then stop."""
        self._stopped.set()
        self._wake.set()
        self._thread.join(SHUTDOWN_SECONDS)
        self._channel.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            self._flush()
        self._flush()

    def _flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH_MAX, len(self._queue)))]
            try:
                self._export(self._request(batch), timeout=EXPORT_TIMEOUT_SECONDS)
            except grpc.RpcError as exc:
                DROPPED.labels("export_failed").inc(len(batch))
                code = exc.code().name
                log.warning("trace_export_failed", endpoint=self.endpoint, code=code, spans=len(batch))
                return  # the rest waits for the next flush
            except Exception:  # a span that would not encode: this thread must live on
                DROPPED.labels("export_failed").inc(len(batch))
                log.exception("trace_export_failed", endpoint=self.endpoint, spans=len(batch))
                continue
            EXPORTED.inc(len(batch))

    def _request(self, batch: list[Span]) -> trace_service_pb2.ExportTraceServiceRequest:
        return trace_service_pb2.ExportTraceServiceRequest(
            resource_spans=[
                trace_pb2.ResourceSpans(
                    resource=self._resource,
                    instrumentation_library_spans=[
                        trace_pb2.InstrumentationLibrarySpans(
                            instrumentation_library=common_pb2.InstrumentationLibrary(name="tessera"),
                            spans=[_proto(s) for s in batch],
                        )
                    ],
                )
            ]
        )


def _attr(key: str, value: str | int | bool) -> common_pb2.KeyValue:
    if isinstance(value, bool):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(bool_value=value))
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def _proto(span: Span) -> trace_pb2.Span:
    status = (
        trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message=span.error)
        if span.error
        else trace_pb2.Status()
    )
    return trace_pb2.Span(
        trace_id=bytes.fromhex(span.trace_id),
        span_id=bytes.fromhex(span.span_id),
        parent_span_id=bytes.fromhex(span.parent_id),
        name=span.name,
        kind=span.kind,
        start_time_unix_nano=span.start_ns,
        end_time_unix_nano=span.end_ns,
        attributes=[_attr(k, v) for k, v in span.attributes.items()],
        status=status,
    )


TRACER = Tracer()
"""This process's tracer: disabled until ``configure`` is called with an endpoint."""


def configure(service: str, settings: TracingSettings) -> Tracer:
    """Set up this process's ``TRACER`` (once, in a service's main)."""
    exporter = OtlpExporter(settings.otlp_endpoint, service) if settings.otlp_endpoint else None
    TRACER.exporter = exporter
    TRACER.sampling = settings.sampling_percent / 100
    if exporter is not None:
        log.info(
            "tracing_enabled", endpoint=settings.otlp_endpoint, sampling_percent=settings.sampling_percent
        )
    return TRACER


def shutdown() -> None:
    """Export what is queued (bounded by the export timeout) and stop recording."""
    exporter, TRACER.exporter = TRACER.exporter, None
    if exporter is not None:
        exporter.shutdown()
