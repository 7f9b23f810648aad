"""Every endpoint the gateway routes is allowed on purpose, metered exactly and answered in the
client's own error shape (issue 17), through real Envoy to the demo upstream (kind ``vllm``):

- the official ``openai`` client's Responses API and the official ``anthropic`` client's Messages
  API, JSON and streams, and multipart audio: the ledger holds the tokens each answer reported;
- path tricks, other methods and backend admin endpoints: 404 ``not_found`` JSON, the backend
  never reached, no limit counted;
- Anthropic's endpoint answers every refusal in Anthropic's shape.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import anthropic
import openai
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.test_gateway import upstream_requests
from tests.e2e.test_routing import wait_routed
from tests.upstream import Upstream

pytestmark = pytest.mark.envoy

PROBE = "x-test-probe"  # a header only this test's requests carry: found upstream = reached it


def raw(
    stack: Stack, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with ``path`` sent byte for byte (no client-side normalisation)."""
    url = urlsplit(stack.gateway)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def anthropic_client(stack: Stack, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.gateway, api_key=key, max_retries=0, timeout=30)


def reported(stack: Stack, probe: str) -> dict[str, Any]:
    """The usage the demo upstream sent for the request carrying ``probe``."""
    (entry,) = [r for r in upstream_requests(stack) if r["headers"].get(PROBE) == probe]
    return dict(entry["usage"])


def assert_metered(stack: Stack, request_id: str, prompt: int, completion: int) -> None:
    row = stack.ledger_row(request_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_estimated"]) == (prompt, completion, 0)


# --- the Responses API (openai) ------------------------------------------------------------------


def test_responses_json_is_metered_as_the_backend_reported(stack):
    probe = uuid.uuid4().hex
    client = stack.client(stack.demo_key)
    resp = client.responses.with_raw_response.create(
        model="demo", input="say something", max_output_tokens=6, extra_headers={PROBE: probe}
    )
    answer = resp.parse()
    assert answer.output_text.split() == [f"tok{i}" for i in range(6)]
    usage = reported(stack, probe)
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (usage["input_tokens"], 6)
    assert_metered(stack, resp.headers["x-request-id"], usage["input_tokens"], usage["output_tokens"])


def test_responses_stream_is_metered_from_its_response_completed_event(stack):
    probe = uuid.uuid4().hex
    client = stack.client(stack.demo_key)
    resp = client.responses.with_raw_response.create(
        model="demo", input="stream it", max_output_tokens=5, stream=True, extra_headers={PROBE: probe}
    )
    events = list(resp.parse())
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.split() == [f"tok{i}" for i in range(5)]
    usage = events[-1].response.usage
    assert (usage.input_tokens, usage.output_tokens) == (reported(stack, probe)["input_tokens"], 5)
    assert_metered(stack, resp.headers["x-request-id"], usage.input_tokens, usage.output_tokens)
    # the Responses API always reports usage: nothing asked of the client's body
    (entry,) = [r for r in upstream_requests(stack) if r["headers"].get(PROBE) == probe]
    assert "stream_options" not in entry["body"]


# --- Anthropic's Messages API ---------------------------------------------------------------------


def test_messages_json_through_the_anthropic_client_is_metered_as_reported(stack):
    probe = uuid.uuid4().hex
    client = anthropic_client(stack, stack.demo_key)  # sent as x-api-key
    resp = client.messages.with_raw_response.create(
        model="demo",
        max_tokens=7,
        messages=[{"role": "user", "content": "hello there"}],
        extra_headers={PROBE: probe},
    )
    message = resp.parse()
    assert message.content[0].text.split() == [f"tok{i}" for i in range(7)]
    assert message.usage.output_tokens == 7
    assert message.usage.input_tokens == reported(stack, probe)["input_tokens"]
    assert_metered(stack, resp.headers["x-request-id"], message.usage.input_tokens, 7)


def test_messages_stream_is_metered_from_message_start_and_message_delta(stack):
    probe = uuid.uuid4().hex
    client = anthropic_client(stack, stack.demo_key)
    resp = client.messages.with_raw_response.create(
        model="demo",
        max_tokens=4,
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        extra_headers={PROBE: probe},
    )
    events = list(resp.parse())
    start = next(e for e in events if e.type == "message_start")
    delta = next(e for e in events if e.type == "message_delta")
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text.split() == [f"tok{i}" for i in range(4)]
    # message_start says 1 output token so far; message_delta the total: the total is billed
    assert delta.usage.output_tokens == 4
    usage = reported(stack, probe)
    assert start.message.usage.input_tokens == usage["input_tokens"]
    assert_metered(stack, resp.headers["x-request-id"], usage["input_tokens"], 4)


def test_messages_refusals_come_in_anthropics_shape(stack):
    with pytest.raises(anthropic.AuthenticationError) as auth:
        anthropic_client(stack, "tsk_aaaaaaaaaaaa_" + "x" * 43).messages.create(
            model="demo", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
        )
    assert auth.value.body["type"] == "error"  # type: ignore[index]
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    client = anthropic_client(stack, stack.demo_key)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(
            model="no-such-model", max_tokens=3, messages=[{"role": "user", "content": "x"}]
        )
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "no-such-model" in missing.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as too_many:
        client.messages.create(model="demo", max_tokens=10**9, messages=[{"role": "user", "content": "x"}])
    assert too_many.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "max_tokens" in too_many.value.body["error"]["message"]  # type: ignore[index]
    headers = {"x-api-key": stack.demo_key, "content-type": "application/json"}
    for body in (b'{"model": "demo", "max_tokens": 1, "max_tokens": 2}', b'{"model":', b"{}"):
        status, got, answer = raw(stack, "POST", "/v1/messages", body, headers)
        assert status == 400, body
        assert got["content-type"] == "application/json"
        shaped = json.loads(answer)
        assert shaped["type"] == "error"
        assert shaped["error"]["type"] == "invalid_request_error"
    # OpenAI's endpoints keep OpenAI's shape
    status, _, answer = raw(
        stack, "POST", "/v1/chat/completions", b"{}", {**headers, "content-type": "application/json"}
    )
    assert (status, json.loads(answer)["error"]["code"]) == (400, "missing_model")


# --- the allowlist ---------------------------------------------------------------------------------

TRICKS = (
    ("POST", "/v1/../debug/requests"),
    ("POST", "/v1/%2e%2e/debug/requests"),
    ("POST", "/v1/..%2fdebug/requests"),
    ("POST", "/v1/..%2Fdebug%2Frequests"),
    ("POST", "/v1/..%5cdebug/requests"),
    ("POST", "/v1/chat/completions/../../debug/requests"),
    ("POST", "/v1/anything"),
    ("POST", "/v1/v1/chat/completions"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/V1/chat/completions"),
    ("POST", "/v1/load_lora_adapter"),  # vLLM's admin endpoints
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/v1/%6coad_lora_adapter"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/sleep"),
    ("GET", "/v1/chat/completions"),  # the right path, the wrong method
    ("DELETE", "/v1/chat/completions"),
    ("PUT", "/v1/completions"),
    ("GET", "/debug/requests"),
)


def test_paths_off_the_allowlist_are_404_json_never_reach_the_backend_and_count_against_no_limit(stack):
    tenant = f"paths{time.monotonic_ns()}"
    stack.cli("tenants", "create", tenant)
    key = stack.new_key(tenant)
    stack.cli(
        "limits", "create", "--tenant", tenant, "--kind", "requests", "--window", "minute", "--limit", "3"
    )
    time.sleep(1.0)  # the limit is live everywhere within 1 s
    probe = uuid.uuid4().hex
    body = json.dumps(
        {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    ).encode()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json", PROBE: probe}
    for method, path in TRICKS:
        status, got, answer = raw(stack, method, path, body, headers)
        assert status == 404, (method, path, status, answer)
        assert got["content-type"] == "application/json", (method, path)
        assert json.loads(answer)["error"]["code"] == "not_found", (method, path)
    assert not [r for r in upstream_requests(stack) if r["headers"].get(PROBE) == probe]
    # none of them counted: the limit of 3 admits exactly 3 real requests
    statuses = [raw(stack, "POST", "/v1/chat/completions", body, headers)[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    # without a key, off-list paths are refused as unauthenticated first (nothing is revealed)
    assert raw(stack, "POST", "/v1/load_lora_adapter", body, {"content-type": "application/json"})[0] == 401


def test_a_path_is_normalised_before_it_is_matched_and_the_backend_reads_what_was_matched(stack):
    body = json.dumps(
        {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    ).encode()
    for path in ("//v1//chat/completions", "/v1/./chat/completions", "/v1/x/../chat/completions"):
        probe = uuid.uuid4().hex
        headers = {
            "authorization": f"Bearer {stack.demo_key}",
            "content-type": "application/json",
            PROBE: probe,
        }
        status, _, _ = raw(stack, "POST", path, body, headers)
        assert status == 200, path
        (entry,) = [r for r in upstream_requests(stack) if r["headers"].get(PROBE) == probe]
        assert entry["path"] == "/v1/chat/completions"


def test_each_kind_serves_its_own_endpoints(stack, upstreams):
    """The demo model is kind vllm (its extras reachable); a generic OpenAI-compatible model serves
    neither vLLM's extras nor Anthropic's API; a model of two kinds serves what both serve."""
    generic = Upstream("plain", "plain-upstream")
    upstreams.append(generic)
    stack.cli("models", "add", "plain", "--backend", generic.url, "--kind", "openai-compatible")
    wait_routed(stack.client(stack.demo_key), "plain")
    headers = {"authorization": f"Bearer {stack.demo_key}", "content-type": "application/json"}
    rerank = {"query": "q", "documents": ["a", "b"]}
    status, _, answer = raw(
        stack, "POST", "/v1/rerank", json.dumps({"model": "demo", **rerank}).encode(), headers
    )
    assert status == 200, answer
    assert len(json.loads(answer)["results"]) == 2
    for path, extra in (
        ("/v1/rerank", rerank),
        ("/tokenize", {"prompt": "a b"}),
        ("/v1/messages", {"max_tokens": 2}),
    ):
        status, _, answer = raw(
            stack, "POST", path, json.dumps({"model": "plain", **extra}).encode(), headers
        )
        assert status == 404, path
        assert "not_found" in answer.decode(), path
    assert not [r for r in generic.requests() if r["path"] != "/v1/chat/completions"]
    # embeddings: every kind serves them
    assert stack.client(stack.demo_key).embeddings.create(model="plain", input="a b").data


# --- audio (multipart) -----------------------------------------------------------------------------


def test_audio_transcriptions_route_by_the_form_model_and_are_metered_as_reported(stack):
    probe = uuid.uuid4().hex
    client = stack.client(stack.demo_key)
    resp = client.audio.transcriptions.with_raw_response.create(
        model="demo", file=("hello.wav", b"\x00" * 3200), extra_headers={PROBE: probe}
    )
    assert resp.parse().text
    usage = reported(stack, probe)
    assert_metered(stack, resp.headers["x-request-id"], usage["input_tokens"], usage["output_tokens"])
    # a backend that reports no usage: estimated, and flagged as such
    resp = client.audio.transcriptions.with_raw_response.create(
        model="demo", file=("hello.wav", b"\x00" * 3200), extra_headers={"x-demo-no-usage": "1"}
    )
    row = stack.ledger_row(resp.headers["x-request-id"])
    assert row["usage_estimated"] == 1
    assert row["prompt_tokens"] > 0


def test_a_form_that_names_no_model_or_two_or_an_unknown_one_is_refused(stack):
    client = stack.client(stack.demo_key)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.audio.transcriptions.create(model="no-such-model", file=("a.wav", b"\x00" * 320))
    assert unknown.value.code == "model_not_found"
    boundary = "b0undary"

    def form(*fields: tuple[str, str]) -> bytes:
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n' for n, v in fields
        ]
        file = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            + "x" * 320
        )
        return ("".join(parts) + file + f"\r\n--{boundary}--\r\n").encode()

    headers = {
        "authorization": f"Bearer {stack.demo_key}",
        "content-type": f"multipart/form-data; boundary={boundary}",
    }
    path = "/v1/audio/transcriptions"
    status, _, answer = raw(stack, "POST", path, form(("model", "demo"), ("model", "demo")), headers)
    assert (status, json.loads(answer)["error"]["code"]) == (400, "duplicate_key")
    status, _, answer = raw(stack, "POST", path, form(("language", "en")), headers)
    assert (status, json.loads(answer)["error"]["code"]) == (400, "missing_model")
    # a field whose name only contains "model" is not the model
    status, _, answer = raw(stack, "POST", path, form(("xmodel", "demo")), headers)
    assert status == 400


def test_a_responses_stream_whose_last_event_is_large_is_still_metered(stack):
    """response.completed repeats the whole response (instructions and output): a long one must
    not lose the usage it carries when it arrives in pieces (sse_to_metadata buffers an event up to
    its limit: 1 MiB; 64 KiB lost it)."""
    client = stack.client(stack.demo_key)
    resp = client.responses.with_raw_response.create(
        model="demo",
        input="x",
        instructions="word " * 40_000,
        max_output_tokens=5,
        stream=True,
        extra_headers={"x-demo-split-events": "1"},  # each event in two writes: Envoy buffers it
    )
    usage = list(resp.parse())[-1].response.usage
    assert usage.input_tokens > 40_000
    assert_metered(stack, resp.headers["x-request-id"], usage.input_tokens, 5)


# --- multipart forms: entitlement, limits, aliases, and a form read as the backend reads it --------


def _form(boundary: str, *parts: tuple[str, str], file: bytes = b"\x00" * 640) -> bytes:
    """A multipart body: each (Content-Disposition parameters, value) part, then a file part."""
    out = b""
    for disposition, value in parts:
        out += f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n{value}\r\n".encode()
    out += f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode()
    return out + file + f"\r\n--{boundary}--\r\n".encode()


def test_audio_is_entitled_limited_and_aliased_like_any_request(stack, upstreams):
    model, alias = f"audio{time.monotonic_ns()}", f"speech{time.monotonic_ns()}"
    upstream = Upstream(model, "audio-upstream")
    upstreams.append(upstream)
    stack.cli(
        "models", "add", model, "--backend", upstream.url, "--kind", "vllm", "--visibility", "restricted"
    )
    stack.cli("models", "update", model, "--alias", alias)
    entitled, other = f"ent{time.monotonic_ns()}", f"oth{time.monotonic_ns()}"
    stack.cli("tenants", "create", entitled, "--allow-model", model)
    stack.cli("tenants", "create", other)
    key, other_key = stack.new_key(entitled), stack.new_key(other)
    stack.cli(
        "limits", "create", "--tenant", entitled, "--kind", "requests", "--window", "minute", "--limit", "2"
    )
    wait_routed(stack.client(key), model)  # (one request of the limit's 2)
    audio = ("a.wav", b"\x00" * 3200)
    # not entitled: the same answer as an unknown model, and the backend never asked
    seen = len(upstream.requests())
    with pytest.raises(openai.NotFoundError) as denied:
        stack.client(other_key).audio.transcriptions.create(model=model, file=audio)
    assert denied.value.code == "model_not_found"
    assert len(upstream.requests()) == seen
    # entitled, through the alias: the backend is asked for its own name; the limit counts it
    assert stack.client(key).audio.transcriptions.create(model=alias, file=audio).text
    assert upstream.requests()[-1]["body"]["model"] == model
    with pytest.raises(openai.RateLimitError):
        stack.client(key).audio.transcriptions.create(model=model, file=audio)


@pytest.mark.parametrize(
    ("second", "code"),
    [
        ("name=model", "duplicate_key"),  # unquoted
        ('NAME="model"', "duplicate_key"),  # parameter names are case-insensitive
        ('name = "model"', "duplicate_key"),  # spaces around '='
        ("name*=UTF-8''model", "invalid_form"),  # RFC 2231: refused, never guessed
        ('name="model"; name="x"', "invalid_form"),  # one part, two names
    ],
)
def test_a_form_the_backend_could_read_another_model_from_is_refused(stack, second, code):
    boundary = "REAL"
    body = _form(boundary, ('name="model"', "demo"), (second, "SMUGGLED"))
    headers = {
        "authorization": f"Bearer {stack.demo_key}",
        "content-type": f"multipart/form-data; boundary={boundary}",
        PROBE: uuid.uuid4().hex,
    }
    status, _, answer = raw(stack, "POST", "/v1/audio/transcriptions", body, headers)
    assert (status, json.loads(answer)["error"]["code"]) == (400, code)
    assert not [r for r in upstream_requests(stack) if r["headers"].get(PROBE) == headers[PROBE]]


def test_the_gateway_reads_the_boundary_and_the_model_a_backend_reads_or_refuses_the_form(stack):
    auth = {"authorization": f"Bearer {stack.demo_key}"}
    hidden = _form("FAKE", ('name="model"', "demo"))  # a form inside another field's value
    body = _form("REAL", ('name="x"', hidden.decode("latin-1")), ('name="model"', "SMUGGLED"))
    path = "/v1/audio/transcriptions"
    # another parameter ending in "boundary" is not the boundary: the gateway reads the real
    # form, as the backend would, and its model is not one the caller may use
    content_type = 'multipart/form-data; xboundary="FAKE"; boundary=REAL'
    status, _, answer = raw(stack, "POST", path, body, {**auth, "content-type": content_type})
    assert status == 404
    assert "SMUGGLED" in json.loads(answer)["error"]["message"]
    for content_type, sent in (
        ('multipart/form-data; boundary="FAKE"; boundary=REAL', body),  # which one? refused
        ("multipart/form-data; boundary=REAL", b"preamble\r\n" + _form("REAL", ('name="model"', "demo"))),
    ):
        status, _, answer = raw(stack, "POST", path, sent, {**auth, "content-type": content_type})
        assert (status, json.loads(answer)["error"]["code"]) == (400, "invalid_form"), content_type


# --- what each endpoint is billed ------------------------------------------------------------------


def test_an_anthropic_stream_cut_before_its_total_is_billed_the_reservation_not_nothing(stack):
    body = json.dumps(
        {"model": "demo", "max_tokens": 500, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    ).encode()
    url = urlsplit(stack.gateway)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    conn.request(
        "POST",
        "/v1/messages",
        body=body,
        headers={"x-api-key": stack.demo_key, "content-type": "application/json", "x-demo-delay-ms": "50"},
    )
    resp = conn.getresponse()
    request_id = resp.getheader("x-request-id")
    deltas = 0
    while deltas < 5:  # read part of the answer, then leave before message_delta
        deltas += resp.readline().startswith(b"event: content_block_delta")
    conn.close()
    row = stack.ledger_row(str(request_id))
    assert row["usage_estimated"] == 1
    assert row["completion_tokens"] >= 500  # the reservation, never the 1 of message_start
    assert 0 < row["prompt_tokens"] < 50  # the input message_start reported, exact


def test_rerank_is_billed_its_reported_tokens_and_no_completion(stack):
    headers = {"authorization": f"Bearer {stack.demo_key}", "content-type": "application/json"}
    body = json.dumps({"model": "demo", "query": "q", "documents": ["a b", "c"]}).encode()
    status, got, answer = raw(stack, "POST", "/v1/rerank", body, headers)
    assert status == 200
    row = stack.ledger_row(got["x-request-id"])
    total = json.loads(answer)["usage"]["total_tokens"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_estimated"]) == (total, 0, 0)


def test_a_jwt_reaches_endpoints_outside_v1(stack):
    key = stack.cli_json("keys", "create", "--tenant", "demo")
    form = f"grant_type=client_credentials&client_id={key['id']}&client_secret={key['key']}".encode()
    status, _, answer = raw(
        stack, "POST", "/oauth/token", form, {"content-type": "application/x-www-form-urlencoded"}
    )
    assert status == 200, answer
    bearer = {
        "authorization": f"Bearer {json.loads(answer)['access_token']}",
        "content-type": "application/json",
    }
    status, _, answer = raw(
        stack, "POST", "/tokenize", json.dumps({"model": "demo", "prompt": "a b"}).encode(), bearer
    )
    assert status == 200, answer
    assert json.loads(answer)["count"] == 2
