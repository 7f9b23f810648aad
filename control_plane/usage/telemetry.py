"""What the meter tells Prometheus and the trace collector about each request it bills.

The meter reads every request's usage line, so the per-request GenAI metrics are computed here,
off the request path, once per ledger row (a line read twice is not counted twice). Names and
buckets follow the OpenTelemetry GenAI semantic conventions, in Prometheus form; labels are the
served model and the tenant, each capped (``LabelCap``) so a flood of names cannot grow the
series without bound. Per-key labels are not offered: keys are too many to chart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from prometheus_client import Counter, Histogram

from tessera.metrics import LabelCap
from tessera.tracing import CONSUMER, TRACER, parse_traceparent
from tessera.usage_line import UsageLine

TOKEN_BUCKETS: Final = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
DURATION_BUCKETS: Final = tuple(round(0.01 * 2**i, 2) for i in range(14))  # 0.01 s .. 81.92 s
TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
TPOT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LABELS: Final = ("gen_ai_request_model", "tenant")
DEFAULT_LABEL_VALUES: Final = 100  # distinct tenants, and models, each metric names

TOKENS = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per request as the backend reported them (input: prompt, output: completion)",
    ["gen_ai_token_type", *LABELS],
    buckets=TOKEN_BUCKETS,
)
DURATION = Histogram(
    "gen_ai_server_request_duration_seconds",
    "Time from the request's first byte to the response's last, at the gateway",
    [*LABELS, "error_type"],
    buckets=DURATION_BUCKETS,
)
TTFT = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Streamed responses: time to the first response-body byte (the first event) at the gateway",
    LABELS,
    buckets=TTFT_BUCKETS,
)
TPOT = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "Streamed responses: time per output token after the first",
    LABELS,
    buckets=TPOT_BUCKETS,
)
SPEND = Counter(
    "tessera_spend_micros",
    "Spend in micro-units of its currency, by model and tenant: what the ledger bills",
    [*LABELS, "currency"],
)
HTTP_ERROR: Final = 400


class RequestMetrics:
    """Observes ledger rows (``ledger.record_values``) into the GenAI metrics."""

    def __init__(self, max_label_values: int = DEFAULT_LABEL_VALUES) -> None:
        self._tenant = LabelCap(max_label_values)
        self._model = LabelCap(max_label_values)

    def observe(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            model = row["model"]
            if not model or row["backstop"]:  # not inference, or nothing measured
                continue
            labels = (self._model(model), self._tenant(row["tenant_id"] or ""))
            status = row["status"]
            failed = status >= HTTP_ERROR or status == 0
            duration = row["duration_ms"] / 1000
            DURATION.labels(*labels, str(status) if failed else "").observe(duration)
            if row["cost_picos"] > 0:  # whatever the status: as billed
                SPEND.labels(*labels, row["currency"] or "").inc(row["cost_picos"] / 1_000_000)
            if failed:
                continue
            if not row["usage_estimated"]:
                TOKENS.labels("input", *labels).observe(row["prompt_tokens"])
                TOKENS.labels("output", *labels).observe(row["completion_tokens"])
            ttfb = row["ttfb_ms"]
            if row["streamed"] and ttfb is not None:
                TTFT.labels(*labels).observe(ttfb / 1000)
                output = row["completion_tokens"]
                if not row["usage_estimated"] and output > 1:
                    TPOT.labels(*labels).observe(max(0.0, duration - ttfb / 1000) / (output - 1))


def trace_ingestion(lines: Sequence[UsageLine], rows: Iterable[Mapping[str, Any]], started_ns: int) -> None:
    """A span per newly billed line of a sampled trace, the child of the span the backend saw
    (the line's ``traceparent``): the meter's part of the request's trace."""
    if not TRACER.enabled:
        return
    new = {(r["node"], r["request_id"]) for r in rows}
    for line in lines:
        if line.backend is None or (line.node, line.request_id) not in new:
            continue  # a request no backend saw: its traceparent is the client's, not Envoy's
        parent = parse_traceparent(line.traceparent)
        if parent is None or parent.trace_id != line.trace_id:
            continue
        span = TRACER.start("meter ingest", parent, CONSUMER, {"tessera.request_id": line.request_id})
        if span is not None:
            span.start_ns = started_ns
            TRACER.end(span)
