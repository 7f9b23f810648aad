"""The GenAI metrics the meter derives from ledger rows (``control_plane/usage/telemetry.py``):
what each histogram observes for a JSON answer, a stream, a failure and an estimate, and that the
tenant label cannot grow without bound. Read back from the process's Prometheus registry."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from prometheus_client import REGISTRY

from control_plane.usage.ledger import record_values
from control_plane.usage.telemetry import RequestMetrics
from tessera.metrics import LabelCap
from tests.usage_lines import parsed


def _row(tenant: str, **line: Any) -> dict[str, Any]:
    fields = {
        "tenant_id": tenant,
        "model": "m1",
        "status": "200",
        "prompt_tokens": "12",
        "completion_tokens": "41",
        "duration_ms": "2100",
        "ttfb_ms": "100",
        "content_type": "text/event-stream",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    } | line
    return record_values(parsed(secrets.token_hex(8), node="n1", **fields), {}, datetime.now(UTC))


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_stream_is_observed_as_tokens_duration_ttft_and_time_per_token():
    tenant = f"t{secrets.token_hex(4)}"
    RequestMetrics().observe([_row(tenant)])
    labels = {"gen_ai_request_model": "m1", "tenant": tenant}
    assert _sample("gen_ai_client_token_usage_sum", gen_ai_token_type="input", **labels) == 12
    assert _sample("gen_ai_client_token_usage_sum", gen_ai_token_type="output", **labels) == 41
    assert _sample("gen_ai_server_request_duration_seconds_sum", error_type="", **labels) == 2.1
    assert _sample("gen_ai_server_time_to_first_token_seconds_sum", **labels) == 0.1
    # (2.1 s - 0.1 s) over the 40 tokens after the first
    assert abs(_sample("gen_ai_server_time_per_output_token_seconds_sum", **labels) - 0.05) < 1e-9


def test_failures_count_only_their_duration_by_error_type_and_estimates_no_tokens():
    tenant = f"t{secrets.token_hex(4)}"
    m = RequestMetrics()
    m.observe([_row(tenant, status="503", content_type="application/json")])
    cut = _row(tenant, prompt_tokens=None, completion_tokens=None, max_tokens="64")  # no usage: estimated
    assert cut["usage_estimated"]
    m.observe([cut])
    labels = {"gen_ai_request_model": "m1", "tenant": tenant}
    assert _sample("gen_ai_server_request_duration_seconds_count", error_type="503", **labels) == 1
    assert _sample("gen_ai_server_request_duration_seconds_count", error_type="", **labels) == 1
    assert _sample("gen_ai_client_token_usage_count", gen_ai_token_type="output", **labels) == 0
    assert _sample("gen_ai_server_time_per_output_token_seconds_count", **labels) == 0
    assert _sample("gen_ai_server_time_to_first_token_seconds_count", **labels) == 1  # it did stream


def test_requests_without_a_model_are_not_inference_and_not_observed():
    tenant = f"t{secrets.token_hex(4)}"
    RequestMetrics().observe([_row(tenant, model=None, status="401")])
    labels = {"gen_ai_request_model": "", "tenant": tenant, "error_type": "401"}
    assert _sample("gen_ai_server_request_duration_seconds_count", **labels) == 0
    RequestMetrics().observe([_row(tenant, status="401")])  # the same with a model: observed
    labels["gen_ai_request_model"] = "m1"
    assert _sample("gen_ai_server_request_duration_seconds_count", **labels) == 1


def test_tenants_beyond_the_cap_share_one_label():
    m = RequestMetrics(max_label_values=2)
    tenants = [f"t{secrets.token_hex(4)}" for _ in range(5)]
    m.observe([_row(t) for t in tenants])

    def count(tenant: str) -> float:
        return _sample(
            "gen_ai_server_request_duration_seconds_count",
            gen_ai_request_model="m1",
            tenant=tenant,
            error_type="",
        )

    assert [t for t in tenants if count(t)] == tenants[:2]
    assert count(LabelCap.OTHER) >= 3


def test_the_usage_line_carries_the_trace_and_refuses_a_malformed_id():
    row = _row("t1")
    assert row["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    trace = row["trace_id"]
    forms = ("0x" + trace[2:], " " + trace[1:], "+" + trace[1:], trace.upper())  # int() would take them
    for bad in ("zz" * 16, "0" * 32, "abc", 7, None, *forms):
        assert _row("t1", trace_id=bad)["trace_id"] is None


def test_spend_is_counted_as_billed_in_its_currency_failures_included():
    tenant = f"t{secrets.token_hex(4)}"
    rows = [_row(tenant, status="500"), _row(tenant)]
    for row in rows:
        row.update(cost_picos=2_500_000, currency="EUR")  # 2.5 micro-units each, as the ledger billed
    RequestMetrics().observe(rows)
    labels = {"gen_ai_request_model": "m1", "tenant": tenant, "currency": "EUR"}
    assert _sample("tessera_spend_micros_total", **labels) == 5.0
