"""Tracing through a real Envoy (issue 16): the W3C trace context continues from the client to the
backend with or without a collector, and with one (an OTLP/gRPC receiver implemented here, the
way a collector serves ``TraceService/Export``) one trace per request holds the gateway's span,
ext_authz's Check and admission, the backend-facing span and the meter's ingestion, each the
child of the span that caused it. The ledger row carries the trace id."""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.e2e.conftest import AUTHZ_TRANSPORT, Stack, start_stack, stop_stack

pytestmark = pytest.mark.envoy

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


@dataclass(frozen=True)
class SeenSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


class Collector:
    """An OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[SeenSpan] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    self._export,
                    request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
                    response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _export(self, request: Any, _context: Any) -> Any:
        # opentelemetry-proto as xds-protos ships it: field 2 is today's scope_spans
        with self._lock:
            for rs in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                for group in rs.instrumentation_library_spans:
                    for s in group.spans:
                        self.spans.append(
                            SeenSpan(
                                service=attrs.get("service.name", ""),
                                name=s.name,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_id=s.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in s.attributes},
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[SeenSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture(scope="module", params=["aio", "sync"])
def traced(request, tmp_path_factory) -> Iterator[tuple[Stack, Collector]]:
    """A stack exporting to a collector; ext_authz's gRPC Check on grpc.aio, then on grpcio's
    sync server (TESSERA_GRPC_SERVER=sync), which takes its calls on threads."""
    if request.param == "sync" and AUTHZ_TRANSPORT != "grpc":
        pytest.skip("the sync server serves gRPC Check only")
    collector = Collector()
    stack = start_stack(
        tmp_path_factory.mktemp("traced"),
        "--otlp-endpoint",
        f"127.0.0.1:{collector.port}",
        env_extra={"TESSERA_GRPC_SERVER": request.param},
    )
    yield stack, collector
    stop_stack(stack)
    collector.server.stop(0)


def _limited_key(stack: Stack) -> str:
    """A key of a new tenant with a request limit: its requests are admitted by ratelimit."""
    tenant = f"tr{time.monotonic_ns()}"
    stack.cli("tenants", "create", tenant)
    key = stack.new_key(tenant)
    stack.cli(
        "limits", "create", "--tenant", tenant, "--kind", "requests", "--limit", "1000", "--window", "minute"
    )
    time.sleep(1.0)  # keys and limits are live everywhere within 1 s
    return key


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def _chat(
    stack: Stack,
    key: str,
    traceparent: str | None,
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> str:
    """One chat completion; returns the request id the gateway answered with."""
    headers = dict(headers or {}) | ({"traceparent": traceparent} if traceparent else {})
    client = stack.client(key).with_options(default_headers=headers)
    raw = client.chat.completions.with_raw_response.create(
        model="demo",
        messages=[{"role": "user", "content": "trace me"}],
        max_tokens=5,
        stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    body = raw.parse()
    if stream:
        for _ in body:
            pass
    return str(raw.headers["x-request-id"])


def _upstream_traceparent(stack: Stack, request_id: str) -> str:
    url = stack.endpoints()["demo_upstream"] + "/debug/requests"
    deadline = time.monotonic() + 5
    while True:
        seen = json.loads(urllib.request.urlopen(url, timeout=5).read())["requests"]  # noqa: S310
        for r in seen:
            if r["headers"].get("x-request-id") == request_id:
                return str(r["headers"].get("traceparent", ""))
        assert time.monotonic() < deadline, f"the backend never saw {request_id}"
        time.sleep(0.1)


def test_without_a_collector_the_backend_continues_the_clients_trace_from_the_gateways_span(stack):
    """The session stack has no collector: nothing is recorded, and still the trace goes on."""
    trace_id, parent, traceparent = _traceparent()
    request_id = _chat(stack, stack.demo_key, traceparent)
    upstream = _upstream_traceparent(stack, request_id)
    version, got_trace, got_parent, _flags = upstream.split("-")
    assert (version, got_trace) == ("00", trace_id)  # the client's trace, kept
    assert got_parent not in (parent, "0" * 16)  # the gateway's span is the backend's parent
    assert stack.ledger_row(request_id)["trace_id"] == trace_id

    # nor can a client force its request recorded (x-client-trace-id is Envoy's way to ask)
    request_id = _chat(stack, stack.demo_key, traceparent, headers={"x-client-trace-id": "force-me"})
    assert _upstream_traceparent(stack, request_id).endswith("-00")

    # a client that sends none still gets a trace: the backend and the ledger row name it
    request_id = _chat(stack, stack.demo_key, None)
    _, minted, _, _ = _upstream_traceparent(stack, request_id).split("-")
    assert len(minted) == 32
    assert minted != "0" * 32
    assert stack.ledger_row(request_id)["trace_id"] == minted


def test_a_malformed_traceparent_fails_nothing_and_never_reaches_the_backend(stack):
    """Envoy cannot continue it (and starts no trace for it): the request is served, and the
    backend is not handed the client's garbage as if it were the gateway's context."""
    request_id = _chat(stack, stack.demo_key, "00-zz-not-a-trace")
    assert _upstream_traceparent(stack, request_id) == ""


def _wait_for(collector: Collector, trace_id: str, names: set[str], timeout: float = 20) -> list[SeenSpan]:
    """The trace once it holds ``names`` and Envoy's three spans (request, ext_authz call,
    backend call: Envoy exports every 5 s, a stream's spans when it ends)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = collector.trace(trace_id)
        gateway = [s for s in spans if s.service == "tessera-gateway"]
        if names <= {s.name for s in spans} and len(gateway) >= 3:
            return spans
        assert time.monotonic() < deadline, f"spans of {trace_id}: {sorted(s.name for s in spans)}"
        time.sleep(0.25)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_one_trace_per_request_with_every_span_parented(traced, stream):
    stack, collector = traced
    key = _limited_key(stack)
    trace_id, client_span, traceparent = _traceparent()
    request_id = _chat(stack, key, traceparent, stream=stream)
    upstream = _upstream_traceparent(stack, request_id)
    check = "/envoy.service.auth.v3.Authorization/Check" if _grpc(stack) else "ext_authz Check"
    spans = _wait_for(collector, trace_id, {check, "ratelimit admission", "meter ingest"})
    by_id = {s.span_id: s for s in spans}

    ingress = [s for s in spans if s.service == "tessera-gateway" and s.parent_id == client_span]
    assert len(ingress) == 1, spans  # the gateway's span continues the client's
    root = ingress[0]
    assert root.attributes.get("gen_ai.request.model") == "demo"

    authz = next(s for s in spans if s.name == check)
    assert authz.service == "tessera-ext-authz"
    envoy_authz = by_id[authz.parent_id]  # Envoy's call to ext_authz ...
    assert (envoy_authz.service, envoy_authz.parent_id) == (
        "tessera-gateway",
        root.span_id,
    )  # ... in its request
    admission = next(s for s in spans if s.name == "ratelimit admission")
    assert admission.parent_id == authz.span_id
    assert admission.attributes["tessera.verdict"] == "allowed"

    # the backend-facing span: the router's call, the parent the backend was given
    _, got_trace, backend_parent, flags = upstream.split("-")
    assert (got_trace, flags) == (trace_id, "01")
    backend_span = by_id[backend_parent]
    assert (backend_span.service, backend_span.parent_id) == ("tessera-gateway", root.span_id)

    meter = next(s for s in spans if s.name == "meter ingest")
    assert (meter.service, meter.parent_id) == ("tessera-meter", backend_parent)
    assert meter.attributes["tessera.request_id"] == request_id
    assert stack.ledger_row(request_id)["trace_id"] == trace_id
    # no span twice
    assert len(by_id) == len(spans)


def test_an_unsampled_client_trace_records_nothing_anywhere(traced):
    """A client that says it does not sample (flags 00) is followed: no span is recorded, in its
    trace or as a trace of its own (its Check, its admission, its billing)."""
    stack, collector = traced
    key = _limited_key(stack)
    time.sleep(6)  # the admin calls' spans (Envoy exports every 5 s) are in
    before = len(collector.spans)
    trace_id, _, _ = _traceparent()
    request_id = _chat(stack, key, f"00-{trace_id}-{secrets.token_hex(8)}-00")
    assert _upstream_traceparent(stack, request_id).endswith("-00")
    assert stack.ledger_row(request_id)["trace_id"] == trace_id
    time.sleep(6)
    assert collector.spans[before:] == []


def test_admin_calls_start_traces_of_their_own(traced):
    stack, collector = traced
    before = {s.span_id for s in collector.spans}
    stack.cli("tenants", "list")
    deadline = time.monotonic() + 10
    while True:
        admin = [
            s
            for s in collector.spans
            if s.span_id not in before and s.service == "tessera-control-plane" and "TenantService" in s.name
        ]
        if admin:
            break
        assert time.monotonic() < deadline, "no admin span"
        time.sleep(0.25)
    assert admin[0].parent_id == ""  # the CLI sent no trace: the call starts one


def _grpc(stack: Stack) -> bool:
    return stack.endpoints()["ext_authz_transport"] == "grpc"
