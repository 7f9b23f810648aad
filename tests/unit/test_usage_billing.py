"""What the meter bills for one usage line: each endpoint's usage read from its own API's fields
(``tessera.usage_line``), and the estimate when the answer did not report its completion
(``control_plane.usage.ledger.tokens_of``)."""

from __future__ import annotations

import secrets
from typing import Any

from control_plane.usage.ledger import ModelTerms, tokens_of
from tessera.endpoints import FORM_BYTES_PER_TOKEN
from tests.usage_lines import parsed

TERMS = ModelTerms((), default_max_tokens=100, max_max_tokens=1000)


def billed(path: str, **fields: Any) -> tuple[int, int, int, bool]:
    counts = {k: str(v) for k, v in fields.items() if k not in ("status", "bytes_received")}
    status, received = fields.get("status", 200), fields.get("bytes_received", 400)
    line = parsed(
        secrets.token_hex(8),
        node="n1",
        path=path,
        tenant_id="t1",
        model="m1",
        status=status,
        bytes_received=received,
        **counts,
    )
    return tokens_of(line, TERMS)


def test_each_endpoint_is_billed_from_its_own_apis_fields():
    assert billed("/v1/chat/completions", prompt_tokens=10, completion_tokens=5) == (10, 5, 0, False)
    assert billed("/v1/responses", input_tokens=7, output_tokens=9, input_cached_tokens=2) == (7, 9, 2, False)
    assert billed("/v1/audio/transcriptions", input_tokens=30, output_tokens=4) == (30, 4, 0, False)
    # Anthropic: cache reads and writes are beside input_tokens; the prompt counts them in
    assert billed(
        "/v1/messages", input_tokens=5, output_tokens=3, cache_read_tokens=100, cache_write_tokens=20
    ) == (125, 3, 100, False)


def test_another_apis_fields_in_an_answer_bill_nothing():
    """A chat answer that also carries Anthropic's or the Responses API's field names (a proxy
    upstream adds them) is billed from chat's own fields only, and the other way round."""
    chat = billed(
        "/v1/chat/completions",
        prompt_tokens=1000,
        completion_tokens=10,
        cached_tokens=800,
        input_tokens=3,
        cache_read_tokens=800,
        cache_write_tokens=200,
    )
    assert chat == (1000, 10, 800, False)
    assert billed("/v1/embeddings", prompt_tokens=1000, input_tokens=3) == (1000, 0, 0, False)
    assert billed("/v1/responses", prompt_tokens=1000, completion_tokens=1, input_tokens=7, output_tokens=9)[
        :2
    ] == (7, 9)


def test_endpoints_that_generate_nothing_are_never_charged_a_completion():
    assert billed("/v1/rerank", total_tokens=13) == (13, 0, 0, False)  # rerank reports only this
    assert billed("/v1/embeddings", prompt_tokens=6) == (6, 0, 0, False)
    prompt, completion, _, estimated = billed("/tokenize")  # nothing reported: estimated
    assert (prompt, completion, estimated) == (100, 0, True)  # 400 bytes / 4, no completion


def test_a_stream_cut_before_its_last_event_keeps_the_prompt_and_estimates_the_completion():
    """An Anthropic stream cut after message_start: the input it reported is exact, the output
    unknown: charged the reservation (or what was streamed, if more), flagged."""
    assert billed("/v1/messages", input_tokens=5, max_tokens=500, chunks=12) == (5, 500, 0, True)
    assert billed("/v1/messages", input_tokens=5, max_tokens=10, chunks=12) == (5, 12, 0, True)
    # nothing at all reported (a Responses stream cut early): the whole reservation
    assert billed("/v1/responses", max_tokens=50) == (100, 50, 0, True)


def test_audio_without_usage_is_estimated_by_its_audio_not_as_text():
    prompt, completion, _, estimated = billed("/v1/audio/transcriptions", bytes_received=400_000)
    assert prompt == 400_000 // FORM_BYTES_PER_TOKEN
    assert (completion, estimated) == (100, True)


def test_a_failed_request_reporting_nothing_is_not_estimated():
    assert billed("/v1/messages", status=500, max_tokens=500) == (0, 0, 0, False)
