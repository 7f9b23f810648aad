"""W3C trace context parsing (``tessera.tracing``): whatever a client puts in ``traceparent``, a
service either continues a well-formed trace or starts its own; it never fails a request, and a
tracer without a collector records nothing."""

from __future__ import annotations

import pytest

from tessera.tracing import TraceContext, Tracer, parse_traceparent, trace_id_of

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_a_well_formed_traceparent_is_continued_with_its_sampling_flag():
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-01") == TraceContext(TRACE, SPAN, sampled=True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00") == TraceContext(TRACE, SPAN, sampled=False)
    # other flag bits are someone else's: only bit 0 says sampled
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-03") == TraceContext(TRACE, SPAN, sampled=True)
    # a later version may append fields; its first four are read as version 00's
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-extra") == TraceContext(TRACE, SPAN, sampled=True)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "00-zz-not-a-trace",
        f"00-{TRACE}-{SPAN}",  # no flags
        f"00-{TRACE}-{SPAN}-01-",  # version 00 has exactly four fields
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex is not W3C
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE[:-1]}g-{SPAN}-01",
        f"01-{TRACE}-{SPAN}-01x",  # a later version's extra fields follow a dash
        "00-" + "a" * 10_000,
    ],
)
def test_a_malformed_traceparent_is_ignored_not_an_error(value):
    assert parse_traceparent(value) is None


def test_the_context_round_trips_as_a_header():
    ctx = TraceContext(TRACE, SPAN, sampled=True)
    assert parse_traceparent(ctx.traceparent) == ctx


def test_log_lines_take_the_trace_id_of_a_traceparent_shaped_value_only():
    assert trace_id_of(f"00-{TRACE}-{SPAN}-01") == TRACE
    for value in (None, "", "00-zz", f"00_{TRACE}_{SPAN}_01", "x" * 54):
        assert trace_id_of(value) is None


def test_a_tracer_without_a_collector_records_nothing():
    tracer = Tracer()
    assert tracer.start("op", TraceContext(TRACE, SPAN, sampled=True)) is None
    assert tracer.start("op", None) is None
    tracer.end(None)  # ending nothing is fine
