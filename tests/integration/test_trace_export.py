"""The OTLP exporter (``tessera.tracing``) against a real gRPC receiver: spans arrive in batches,
children keep their parents, an unsampled parent records nothing, and a collector that is down
loses spans (counted) without blocking or failing the caller."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from prometheus_client import REGISTRY

from tessera.tracing import EXPORT_METHOD, SERVER, OtlpExporter, TraceContext, Tracer
from tests.conftest import free_port

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lock = threading.Lock()
        service, method = EXPORT_METHOD.strip("/").split("/")
        handler = grpc.method_handlers_generic_handler(
            service,
            {
                method: grpc.unary_unary_rpc_method_handler(
                    self._export,
                    request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
                    response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
                )
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _export(self, request: Any, _ctx: Any) -> Any:
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, Any]]:
        with self.lock:
            return [
                (next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), s)
                for r in self.requests
                for rs in r.resource_spans
                for group in rs.instrumentation_library_spans
                for s in group.spans
            ]


def _wait(fn: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := fn()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return result


def test_spans_reach_the_collector_with_their_parents_and_attributes():
    receiver = Receiver()
    exporter = OtlpExporter(f"127.0.0.1:{receiver.port}", "tessera-test")
    tracer = Tracer(exporter)
    try:
        parent = TraceContext(TRACE, PARENT, sampled=True)
        outer = tracer.start("Check", parent, SERVER, {"tessera.tenant_id": "t1"})
        assert outer is not None
        inner = tracer.start("admission", outer.context, attributes={"n": 3, "ok": True})
        tracer.end(inner)
        tracer.end(outer, "ValueError")
        assert tracer.start("unsampled", TraceContext(TRACE, PARENT, sampled=False)) is None
        spans = _wait(lambda: len(receiver.spans()) >= 2 and receiver.spans())
    finally:
        exporter.shutdown()
        receiver.server.stop(0)
    by_name = {s.name: (service, s) for service, s in spans}
    assert set(by_name) == {"Check", "admission"}
    service, check = by_name["Check"]
    assert service == "tessera-test"
    assert (check.trace_id.hex(), check.parent_span_id.hex()) == (TRACE, PARENT)
    assert check.kind == SERVER
    assert check.status.message == "ValueError"
    assert check.end_time_unix_nano >= check.start_time_unix_nano > 0
    _, admission = by_name["admission"]
    assert admission.parent_span_id == check.span_id
    assert {a.key: a.value for a in admission.attributes}["n"].int_value == 3


def _export_failures() -> float:
    return REGISTRY.get_sample_value("tessera_trace_spans_dropped_total", {"reason": "export_failed"}) or 0


def test_a_collector_that_is_down_loses_spans_counted_and_blocks_nobody():
    before = _export_failures()
    exporter = OtlpExporter(f"127.0.0.1:{free_port()}", "tessera-test")  # nothing listens there
    tracer = Tracer(exporter)
    started = time.monotonic()
    for _ in range(100):
        tracer.end(tracer.start("op", TraceContext(TRACE, PARENT, sampled=True)))
    assert time.monotonic() - started < 0.5  # recording never waits for the network
    try:
        _wait(lambda: _export_failures() - before >= 100, timeout=15)
    finally:
        exporter.shutdown()


def test_a_root_span_is_sampled_at_the_configured_share():
    receiver = Receiver()
    exporter = OtlpExporter(f"127.0.0.1:{receiver.port}", "tessera-test")
    try:
        never = Tracer(exporter, sampling_percent=0)
        assert all(never.start("admin", None, root=True) is None for _ in range(200))
        always = Tracer(exporter, sampling_percent=100)
        # a span of something nobody sampled never becomes a trace of its own
        assert always.start("admission", None) is None
        root = always.start("admin", None, root=True)
        assert root is not None
        assert root.parent_id == ""
        assert len(root.trace_id) == 32
    finally:
        exporter.shutdown()
        receiver.server.stop(0)
