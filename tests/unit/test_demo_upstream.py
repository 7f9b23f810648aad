"""The demo upstream (vLLM stand-in), driven in-process through aiohttp's test server."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tessera.demo_upstream.app import build_app

CHAT = "/v1/chat/completions"


@pytest.fixture
async def client():
    async with TestClient(TestServer(build_app(("demo", "other"), name="up-a"))) as test_client:
        yield test_client


def _chat_body(content: Any = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": content}], **extra}


async def _events(resp) -> list[Any]:
    """Parse an SSE body into JSON chunks, with the final ``[DONE]`` kept as a string."""
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert "Content-Length" not in resp.headers
    raw = (await resp.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events: list[Any] = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: ")
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def _metric(client, name: str, model: str = "demo") -> float:
    text = await (await client.get("/metrics")).text()
    prefix = f'{name}{{model_name="{model}"}} '
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return float(line.removeprefix(prefix))


# --- chat completions ---------------------------------------------------------------------------


async def test_chat_counts_depend_on_the_input_and_max_tokens(client):
    short = await (await client.post(CHAT, json=_chat_body("one two"))).json()
    long = await (await client.post(CHAT, json=_chat_body("one two three four five"))).json()
    assert short["usage"]["prompt_tokens"] == 2 + 3
    assert long["usage"]["prompt_tokens"] == 5 + 3

    resp = await client.post(CHAT, json=_chat_body(max_tokens=5))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "demo"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


async def test_chat_defaults_to_sixteen_tokens_and_stop(client):
    body = await (await client.post(CHAT, json=_chat_body())).json()
    assert body["usage"]["completion_tokens"] == 16
    assert len(body["choices"][0]["message"]["content"].split()) == 16
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_chat_counts_text_parts_and_every_message(client):
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a b c"}, {"type": "image_url", "image_url": {}}],
        },
    ]
    payload = {"model": "demo", "messages": messages, "max_completion_tokens": 2}
    body = await (await client.post(CHAT, json=payload)).json()
    assert body["usage"]["prompt_tokens"] == (2 + 3) + (3 + 3)
    assert body["usage"]["completion_tokens"] == 2


async def test_max_tokens_is_capped(client):
    body = await (await client.post(CHAT, json=_chat_body(max_tokens=100_000))).json()
    assert body["usage"]["completion_tokens"] == 4096


async def test_chat_stream_without_include_usage_has_no_usage(client):
    events = await _events(await client.post(CHAT, json=_chat_body(max_tokens=3, stream=True)))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    words = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:-1]]
    assert len(words) == 3
    assert "".join(words).split() == ["tok0", "tok1", "tok2"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_with_include_usage_ends_with_a_usage_chunk(client):
    payload = _chat_body("a b c", max_tokens=4, stream=True, stream_options={"include_usage": True})
    events = await _events(await client.post(CHAT, json=payload))
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    assert all(chunk["usage"] is None for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_stream_with_include_usage_false_has_no_usage_chunk(client):
    payload = _chat_body(max_tokens=2, stream=True, stream_options={"include_usage": False})
    events = await _events(await client.post(CHAT, json=payload))
    assert all(chunk["choices"] for chunk in events[:-1])


async def test_stream_is_incremental_and_disconnect_stops_it(client):
    payload = _chat_body(max_tokens=1000, stream=True)
    resp = await client.post(CHAT, json=payload, headers={"x-demo-delay-ms": "20"})
    first = await resp.content.readuntil(b"\n\n")
    assert json.loads(first.removeprefix(b"data: "))["choices"][0]["delta"]["role"] == "assistant"
    await resp.content.readuntil(b"\n\n")  # a token arrives before the stream ends
    assert await _metric(client, "vllm:num_requests_running") == 1
    resp.close()
    for _ in range(200):
        if await _metric(client, "vllm:num_requests_running") == 0:
            break
        await asyncio.sleep(0.02)
    assert await _metric(client, "vllm:num_requests_running") == 0
    assert await _metric(client, "vllm:generation_tokens_total") < 1000


async def test_running_gauge_reflects_in_flight_requests(client):
    task = asyncio.create_task(
        client.post(CHAT, json=_chat_body(max_tokens=10), headers={"x-demo-delay-ms": "30"})
    )
    for _ in range(100):
        if await _metric(client, "vllm:num_requests_running") == 1:
            break
        await asyncio.sleep(0.01)
    assert await _metric(client, "vllm:num_requests_running") == 1
    assert await _metric(client, "vllm:kv_cache_usage_perc") > 0
    resp = await task
    assert resp.status == 200
    assert await _metric(client, "vllm:num_requests_running") == 0


# --- text completions ---------------------------------------------------------------------------


async def test_completions(client):
    resp = await client.post(
        "/v1/completions", json={"model": "demo", "prompt": "one two three", "max_tokens": 4}
    )
    body = await resp.json()
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["text"].split() == ["tok0", "tok1", "tok2", "tok3"]
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


async def test_completions_with_a_list_of_prompts(client):
    payload = {"model": "demo", "prompt": ["a b", "c"], "max_tokens": 2}
    body = await (await client.post("/v1/completions", json=payload)).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


@pytest.mark.parametrize("include_usage", [False, True])
async def test_completions_stream(client, include_usage):
    payload: dict[str, Any] = {"model": "demo", "prompt": "x y", "max_tokens": 3, "stream": True}
    if include_usage:
        payload["stream_options"] = {"include_usage": True}
    events = await _events(await client.post("/v1/completions", json=payload))
    chunks = events[:-1]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    if include_usage:
        *chunks, usage_chunk = chunks
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    else:
        assert all("usage" not in chunk for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks).split() == ["tok0", "tok1", "tok2"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# --- embeddings ---------------------------------------------------------------------------------


async def test_embeddings_are_deterministic_unit_vectors(client):
    payload = {"model": "demo", "input": ["the cat sat", "a dog"], "dimensions": 16}
    body = await (await client.post("/v1/embeddings", json=payload)).json()
    assert body["object"] == "list"
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    first, second = body["data"]
    assert (first["object"], first["index"], second["index"]) == ("embedding", 0, 1)
    assert len(first["embedding"]) == 16
    assert math.isclose(math.fsum(v * v for v in first["embedding"]), 1.0)
    assert first["embedding"] != second["embedding"]
    again = await (await client.post("/v1/embeddings", json={**payload, "input": "the cat sat"})).json()
    assert again["data"][0]["embedding"] == first["embedding"]


async def test_embeddings_default_dimensions_and_base64(client):
    floats = await (await client.post("/v1/embeddings", json={"model": "demo", "input": "hi"})).json()
    vector = floats["data"][0]["embedding"]
    assert len(vector) == 8
    payload = {"model": "demo", "input": "hi", "encoding_format": "base64"}
    encoded = (await (await client.post("/v1/embeddings", json=payload)).json())["data"][0]["embedding"]
    decoded = struct.unpack("<8f", base64.b64decode(encoded))
    assert decoded == pytest.approx(vector, rel=1e-6)


async def test_embeddings_accept_token_lists(client):
    payload = {"model": "demo", "input": [[1, 2, 3], [4]]}
    body = await (await client.post("/v1/embeddings", json=payload)).json()
    assert len(body["data"]) == 2
    assert body["usage"]["prompt_tokens"] == 4


# --- models, health, metrics --------------------------------------------------------------------


async def test_models_list(client):
    resp = await client.get("/v1/models")
    body = await resp.json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == ["demo", "other"]
    assert all(model["object"] == "model" and model["owned_by"] == "up-a" for model in body["data"])
    assert resp.headers["x-demo-upstream"] == "up-a"


async def test_health(client):
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.read() == b""


async def test_metrics_use_vllm_names(client):
    await client.post(CHAT, json=_chat_body("a b", max_tokens=4))
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    ):
        assert f'{name}{{model_name="demo"}}' in text
    assert await _metric(client, "vllm:prompt_tokens_total") == 5
    assert await _metric(client, "vllm:generation_tokens_total") == 4
    assert await _metric(client, "vllm:generation_tokens_total", "other") == 0


async def test_apps_have_separate_registries(client):
    async with TestClient(TestServer(build_app())) as other:
        await other.post(CHAT, json=_chat_body(max_tokens=3))
        assert await _metric(other, "vllm:generation_tokens_total") == 3
    assert await _metric(client, "vllm:generation_tokens_total") == 0


# --- errors -------------------------------------------------------------------------------------


def _assert_error(body: dict[str, Any], param: str | None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["param"] == param


async def test_invalid_json_is_400(client):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        resp = await client.post(CHAT, data=raw, headers={"Content-Type": "application/json"})
        assert resp.status == 400
        body = await resp.json()
        _assert_error(body, None)
        assert body["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "model"),
        (CHAT, {"model": 7, "messages": [{"role": "user", "content": "x"}]}, "model"),
        (CHAT, {"model": "demo"}, "messages"),
        (CHAT, {"model": "demo", "messages": "hi"}, "messages"),
        (CHAT, {"model": "demo", "messages": ["hi"]}, "messages"),
        (CHAT, {"model": "demo", "messages": [{"content": "hi"}]}, "messages"),
        (CHAT, {"model": "demo", "messages": [{"role": "user", "content": 5}]}, "messages"),
        (CHAT, {"model": "demo", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
        (CHAT, _chat_body(max_tokens=0), "max_tokens"),
        (CHAT, _chat_body(max_tokens="5"), "max_tokens"),
        (CHAT, _chat_body(max_tokens=True), "max_tokens"),
        (CHAT, _chat_body(max_completion_tokens=-1), "max_completion_tokens"),
        (CHAT, _chat_body(n=2), "n"),
        (CHAT, _chat_body(stream="yes"), "stream"),
        (CHAT, _chat_body(temperature="hot"), "temperature"),
        (CHAT, _chat_body(stream_options={"include_usage": True}), "stream_options"),
        (CHAT, _chat_body(stream=False, stream_options={"include_usage": True}), "stream_options"),
        (CHAT, _chat_body(stream=True, stream_options={"include_usage": "yes"}), "include_usage"),
        ("/v1/completions", {"model": "demo"}, "prompt"),
        ("/v1/completions", {"model": "demo", "prompt": []}, "prompt"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "stream_options": {}}, "stream_options"),
        ("/v1/embeddings", {"model": "demo", "input": 3}, "input"),
        ("/v1/embeddings", {"model": "demo", "input": "x", "dimensions": 0}, "dimensions"),
        ("/v1/embeddings", {"model": "demo", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ],
)
async def test_bad_fields_are_400_naming_the_field(client, path, payload, param):
    resp = await client.post(path, json=payload)
    assert resp.status == 400
    _assert_error(await resp.json(), param)


async def test_bad_delay_header_is_400(client):
    resp = await client.post(CHAT, json=_chat_body(), headers={"x-demo-delay-ms": "soon"})
    assert resp.status == 400
    _assert_error(await resp.json(), "x-demo-delay-ms")


@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/v1/embeddings"])
async def test_unknown_model_is_404(client, path):
    payload = {"model": "nope", "messages": [{"role": "user", "content": "x"}], "prompt": "x", "input": "x"}
    resp = await client.post(path, json=payload)
    assert resp.status == 404
    body = await resp.json()
    _assert_error(body, "model")
    assert body["error"]["message"] == "The model `nope` does not exist."
    assert body["error"]["type"] == "NotFoundError"
    assert body["error"]["code"] == 404


# --- /debug/requests ----------------------------------------------------------------------------


async def test_debug_requests_records_headers(client):
    await client.post(
        CHAT, json=_chat_body(max_tokens=1), headers={"X-Tenant-Id": "t1", "Authorization": "Bearer k"}
    )
    await client.post("/v1/embeddings", json={"model": "other", "input": "x"})
    await client.post(CHAT, data=b"{bad")
    await client.get("/v1/models")
    await client.get("/health")  # probes and /debug are not recorded
    await client.get("/metrics")
    recorded = (await (await client.get("/debug/requests")).json())["requests"]
    assert [(entry["method"], entry["path"], entry["model"]) for entry in recorded] == [
        ("POST", CHAT, "demo"),
        ("POST", "/v1/embeddings", "other"),
        ("POST", CHAT, None),
        ("GET", "/v1/models", None),
    ]
    assert recorded[0]["body"] == _chat_body(max_tokens=1)
    assert recorded[0]["usage"] == {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    assert recorded[2]["body"] is None
    assert "usage" not in recorded[2]
    assert recorded[0]["headers"]["x-tenant-id"] == "t1"
    assert recorded[0]["headers"]["authorization"] == "Bearer k"
    assert "x-tenant-id" not in recorded[1]["headers"]

    assert (await client.delete("/debug/requests")).status == 204
    assert (await (await client.get("/debug/requests")).json())["requests"] == []


async def test_debug_requests_keeps_the_last_200(client):
    for index in range(205):
        await client.post("/v1/embeddings", json={"model": "demo", "input": "x"}, headers={"x-n": str(index)})
    recorded = (await (await client.get("/debug/requests")).json())["requests"]
    assert len(recorded) == 200
    assert recorded[0]["headers"]["x-n"] == "5"
    assert recorded[-1]["headers"]["x-n"] == "204"


async def _recorded(client) -> list[dict[str, Any]]:
    return (await (await client.get("/debug/requests")).json())["requests"]


async def test_every_request_is_recorded_as_received_before_routing(client):
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"DELETE /v1/../admin/%2e%2e/x?y=1 HTTP/1.1\r\nHost: up\r\nConnection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 404 ")
    assert b"Content-Type: text/plain" in raw
    assert raw.endswith(b"\r\n\r\n404: Not Found")  # aiohttp's own 404, as for any unknown path
    resp = await client.get(CHAT)  # a known path, the wrong method
    assert resp.status == 405
    [unknown, wrong_method] = await _recorded(client)
    assert unknown == {
        "path": "/v1/../admin/%2e%2e/x",  # dot segments and escapes as the backend received them
        "query": "y=1",
        "method": "DELETE",
        "headers": {"host": "up", "connection": "close"},
        "model": None,
        "body": None,
    }
    assert (wrong_method["method"], wrong_method["path"]) == ("GET", CHAT)


async def test_a_broken_upstream_still_records_what_reached_it():
    async with TestClient(TestServer(build_app(fail_status=503))) as broken:
        assert (await broken.post(CHAT, json=_chat_body())).status == 503
        [entry] = await _recorded(broken)
        assert (entry["method"], entry["path"]) == ("POST", CHAT)


# --- vLLM's admin routes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload", "text"),
    [
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"}, "Success: LoRA adapter 'a' added"),
        ("/v1/unload_lora_adapter", {"lora_name": "a"}, "Success: LoRA adapter 'a' removed"),
        ("/reset_prefix_cache", None, ""),
        ("/sleep?level=1", None, ""),
    ],
)
async def test_admin_routes_answer_200_and_are_recorded(client, path, payload, text):
    resp = await client.post(path, json=payload, headers={"Authorization": "Bearer tenant"})
    assert resp.status == 200
    assert (await resp.text()).startswith(text)
    [entry] = await _recorded(client)
    assert (entry["method"], entry["path"]) == ("POST", path.partition("?")[0])
    assert entry["headers"]["authorization"] == "Bearer tenant"
    assert entry["body"] == payload


# --- Responses API ------------------------------------------------------------------------------

RESPONSES = "/v1/responses"
RESPONSES_USAGE = {
    "input_tokens": 3,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 4,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 7,
}


def _named_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """An SSE body of named events (``event:`` then ``data:``), as (name, data) pairs."""
    assert raw.endswith("\n\n")
    assert "[DONE]" not in raw
    events = []
    for block in raw.split("\n\n")[:-1]:
        event, data = block.split("\n")
        assert event.startswith("event: ")
        assert data.startswith("data: ")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == event.removeprefix("event: ")
        events.append((payload["type"], payload))
    return events


async def test_responses_json(client):
    payload = {"model": "demo", "input": "one two three", "max_output_tokens": 4}
    resp = await client.post(RESPONSES, json=payload)
    assert resp.status == 200
    body = await resp.json()
    assert body["id"].startswith("resp_")
    assert (body["object"], body["status"], body["model"]) == ("response", "completed", "demo")
    assert isinstance(body["created_at"], int)
    [message] = body["output"]
    assert message["id"].startswith("msg_")
    assert (message["type"], message["status"], message["role"]) == ("message", "completed", "assistant")
    assert message["content"] == [{"type": "output_text", "text": "tok0 tok1 tok2 tok3", "annotations": []}]
    assert body["usage"] == RESPONSES_USAGE
    [entry] = await _recorded(client)
    assert (entry["path"], entry["model"], entry["body"]) == (RESPONSES, "demo", payload)
    assert entry["usage"] == RESPONSES_USAGE


async def test_responses_count_input_items_and_instructions(client):
    items = [
        {"role": "user", "content": "a b"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "c d e"}]},
    ]
    payload = {"model": "demo", "input": items, "instructions": "be brief"}
    body = await (await client.post(RESPONSES, json=payload)).json()
    assert body["usage"]["input_tokens"] == (2 + 3) + (3 + 3) + (2 + 3)
    assert body["usage"]["output_tokens"] == 16  # the default length without max_output_tokens
    assert body["instructions"] == "be brief"


async def test_responses_stream_events(client):
    payload = {"model": "demo", "input": "one two three", "max_output_tokens": 4, "stream": True}
    resp = await client.post(RESPONSES, json=payload)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["x-demo-upstream"] == "up-a"
    events = _named_events(await resp.text())
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    by_name = dict(events)
    for early in ("response.created", "response.in_progress"):
        assert by_name[early]["response"]["usage"] is None
        assert by_name[early]["response"]["status"] == "in_progress"
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    assert "".join(deltas) == by_name["response.output_text.done"]["text"] == "tok0 tok1 tok2 tok3"
    item_id = by_name["response.output_item.added"]["item"]["id"]
    assert all(data["item_id"] == item_id for name, data in events if "output_text" in name)
    final = by_name["response.completed"]["response"]
    assert final["status"] == "completed"
    assert final["usage"] == RESPONSES_USAGE
    assert final["output"] == [by_name["response.output_item.done"]["item"]]
    [entry] = await _recorded(client)
    assert entry["usage"] == RESPONSES_USAGE


async def test_responses_through_the_openai_client(client):
    oai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    answer = await oai.responses.create(model="demo", input="one two three", max_output_tokens=4)
    assert answer.output_text == "tok0 tok1 tok2 tok3"
    assert answer.usage is not None
    assert answer.usage.model_dump(exclude_none=True) == RESPONSES_USAGE
    stream = await oai.responses.create(model="demo", input="one two three", max_output_tokens=4, stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.total_tokens == 7
    assert events[-1].response.output_text == "tok0 tok1 tok2 tok3"
    await oai.close()


# --- Anthropic Messages API ---------------------------------------------------------------------

MESSAGES = "/v1/messages"
ANTHROPIC_HEADERS = {"x-api-key": "sk-ant-x", "anthropic-version": "2023-06-01"}


def _messages_body(max_tokens: int | None = 5, **extra: Any) -> dict[str, Any]:
    body = {"model": "demo", "system": "be brief", "messages": [{"role": "user", "content": "one two"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return {**body, **extra}


async def test_messages_json(client):
    resp = await client.post(MESSAGES, json=_messages_body(), headers=ANTHROPIC_HEADERS)
    assert resp.status == 200
    body = await resp.json()
    assert body["id"].startswith("msg_")
    assert body == {
        "id": body["id"],
        "type": "message",
        "role": "assistant",
        "model": "demo",
        "content": [{"type": "text", "text": "tok0 tok1 tok2 tok3 tok4"}],
        "stop_reason": "max_tokens",  # the demo's answer is 16 words: 5 cut it
        "stop_sequence": None,
        "usage": {"input_tokens": (2 + 3) + (2 + 3), "output_tokens": 5},
    }
    [entry] = await _recorded(client)
    assert entry["usage"] == body["usage"]
    assert entry["headers"]["x-api-key"] == "sk-ant-x"
    assert entry["headers"]["anthropic-version"] == "2023-06-01"
    ended = await (await client.post(MESSAGES, json=_messages_body(max_tokens=100))).json()
    assert ended["stop_reason"] == "end_turn"
    assert ended["usage"]["output_tokens"] == 16


async def test_messages_stream_events(client):
    resp = await client.post(MESSAGES, json=_messages_body(max_tokens=3, stream=True))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = _named_events(await resp.text())
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_")
    assert (start["content"], start["stop_reason"]) == ([], None)
    assert start["usage"] == {"input_tokens": 10, "output_tokens": 1}
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert all(delta["type"] == "text_delta" for delta in deltas)
    assert "".join(delta["text"] for delta in deltas) == "tok0 tok1 tok2"
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"output_tokens": 3},
    }
    [entry] = await _recorded(client)
    assert entry["usage"] == {"input_tokens": 10, "output_tokens": 3}


async def test_messages_through_the_anthropic_client(client):
    anthropic = pytest.importorskip("anthropic")
    claude = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="sk-ant-x", max_retries=0)
    kwargs = {"model": "demo", "system": "be brief", "messages": [{"role": "user", "content": "one two"}]}
    message = await claude.messages.create(max_tokens=5, **kwargs)
    assert message.content[0].text == "tok0 tok1 tok2 tok3 tok4"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (10, 5)
    events = [event async for event in await claude.messages.create(max_tokens=5, stream=True, **kwargs)]
    assert [event.type for event in events][-2:] == ["message_delta", "message_stop"]
    async with claude.messages.stream(max_tokens=50, **kwargs) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (10, 16)
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.create(max_tokens=5, **{**kwargs, "model": "nope"})
    with pytest.raises(anthropic.BadRequestError):
        await claude.messages.create(max_tokens=0, **kwargs)
    await claude.close()


@pytest.mark.parametrize(
    ("payload", "status", "kind"),
    [
        (_messages_body(max_tokens=None), 400, "invalid_request_error"),
        (_messages_body(max_tokens=0), 400, "invalid_request_error"),
        (_messages_body(messages=[]), 400, "invalid_request_error"),
        (_messages_body(model="nope"), 404, "not_found_error"),
        (b"{not json", 400, "invalid_request_error"),
    ],
)
async def test_messages_errors_have_anthropics_shape(client, payload, status, kind):
    if isinstance(payload, bytes):
        resp = await client.post(MESSAGES, data=payload, headers={"Content-Type": "application/json"})
    else:
        resp = await client.post(MESSAGES, json=payload)
    assert resp.status == status
    body = await resp.json()
    assert set(body) == {"type", "error"}
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    assert body["error"]["message"]


async def test_messages_missing_max_tokens_says_so(client):
    body = await (await client.post(MESSAGES, json=_messages_body(max_tokens=None))).json()
    assert body["error"]["message"] == "max_tokens: Field required"


async def test_a_broken_upstream_answers_messages_in_anthropics_shape():
    async with TestClient(TestServer(build_app(fail_status=500))) as broken:
        resp = await broken.post(MESSAGES, json=_messages_body())
        assert resp.status == 500
        assert (await resp.json())["error"]["type"] == "api_error"


async def test_messages_count_tokens(client):
    payload = _messages_body(max_tokens=None)
    resp = await client.post(f"{MESSAGES}/count_tokens", json=payload)
    assert await resp.json() == {"input_tokens": 10}


# --- streams cut early --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        (RESPONSES, {"model": "demo", "input": "x", "max_output_tokens": 1000, "stream": True}),
        (MESSAGES, _messages_body(max_tokens=1000, stream=True)),
    ],
)
async def test_a_stream_cut_early_reports_no_usage(client, path, payload):
    resp = await client.post(path, json=payload, headers={"x-demo-delay-ms": "200"})
    await resp.content.readuntil(b"\n\n")  # the first event; the words come 200 ms apart
    resp.close()
    for _ in range(100):
        if await _metric(client, "vllm:num_requests_running") == 0:
            break
        await asyncio.sleep(0.02)
    [entry] = await _recorded(client)
    assert "usage" not in entry


# --- audio --------------------------------------------------------------------------------------


def _form(size: int = 1000, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", b"\0" * size, filename="a.wav", content_type="audio/wav")
    for name, value in {"model": "demo", **fields}.items():
        form.add_field(name, value)
    return form


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
async def test_audio_json_with_usage(client, path):
    resp = await client.post(path, data=_form(1000, language="en", prompt="names"))
    assert resp.status == 200
    body = await resp.json()
    usage = {"type": "tokens", "input_tokens": 4, "output_tokens": 4, "total_tokens": 8}  # ceil(1000/320)
    assert body == {"text": "tok0 tok1 tok2 tok3", "usage": usage}
    [entry] = await _recorded(client)
    assert (entry["path"], entry["model"], entry["usage"]) == (path, "demo", usage)
    assert entry["body"] == {
        "model": "demo",
        "language": "en",
        "prompt": "names",
        "file": {"filename": "a.wav", "bytes": 1000},
    }


async def test_audio_text_and_no_usage(client):
    path = "/v1/audio/transcriptions"
    resp = await client.post(path, data=_form(100_000, response_format="text"))
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert len((await resp.text()).split()) == 16
    resp = await client.post(path, data=_form(), headers={"x-demo-no-usage": "1"})
    assert await resp.json() == {"text": "tok0 tok1 tok2 tok3"}
    assert all("usage" not in entry for entry in await _recorded(client))


async def test_audio_verbose_json(client):
    resp = await client.post("/v1/audio/transcriptions", data=_form(64_000, response_format="verbose_json"))
    body = await resp.json()
    assert (body["task"], body["language"], body["duration"]) == ("transcribe", "en", 2.0)
    assert body["segments"][0]["text"] == body["text"]
    assert body["usage"]["input_tokens"] == 200


async def test_audio_through_the_openai_client(client):
    oai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    answer = await oai.audio.transcriptions.create(model="demo", file=("a.wav", b"\0" * 640))
    assert answer.text == "tok0 tok1"
    assert answer.usage is not None
    assert answer.usage.type == "tokens"
    assert answer.usage.total_tokens == 4
    await oai.close()


@pytest.mark.parametrize(
    ("form", "status", "param"),
    [
        (_form(0), 400, "file"),
        (_form(response_format="srt"), 400, "response_format"),
        (_form(model="nope"), 404, "model"),
    ],
)
async def test_audio_errors(client, form, status, param):
    resp = await client.post("/v1/audio/transcriptions", data=form)
    assert resp.status == status
    _assert_error(await resp.json(), param)


async def test_audio_without_a_form_is_400(client):
    resp = await client.post("/v1/audio/transcriptions", json={"model": "demo"})
    assert resp.status == 400
    _assert_error(await resp.json(), "model")


# --- rerank, score, tokenize --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
async def test_rerank(client, path):
    documents = ["a cat", {"text": "a dog sat"}, "fish"]
    payload = {"model": "demo", "query": "cat", "documents": documents, "top_n": 2}
    body = await (await client.post(path, json=payload)).json()
    assert body["id"].startswith("rerank-")
    assert body["model"] == "demo"
    assert body["usage"] == {"total_tokens": (1 + 2) + (1 + 3) + (1 + 1)}
    results = body["results"]
    assert len(results) == 2
    scores = [result["relevance_score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= score <= 1 for score in scores)
    texts = ["a cat", "a dog sat", "fish"]
    assert all(result["document"]["text"] == texts[result["index"]] for result in results)
    again = await (await client.post(path, json=payload)).json()
    assert again["results"] == results  # deterministic
    [entry, _] = await _recorded(client)
    assert entry["usage"] == body["usage"]


async def test_score(client):
    payload = {"model": "demo", "text_1": "cat", "text_2": ["a cat", "a dog"]}
    body = await (await client.post("/v1/score", json=payload)).json()
    assert body["id"].startswith("score-")
    assert (body["object"], body["model"]) == ("list", "demo")
    assert [(item["index"], item["object"]) for item in body["data"]] == [(0, "score"), (1, "score")]
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6, "completion_tokens": 0}
    pairs = {"model": "demo", "text_1": ["cat", "dog"], "text_2": ["a cat", "a dog"]}
    assert len((await (await client.post("/score", json=pairs)).json())["data"]) == 2
    mismatched = {"model": "demo", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}
    resp = await client.post("/v1/score", json=mismatched)
    assert resp.status == 400
    _assert_error(await resp.json(), "text_2")


async def test_tokenize_and_detokenize(client):
    body = await (await client.post("/tokenize", json={"model": "demo", "prompt": "one two three"})).json()
    assert body["count"] == len(body["tokens"]) == 3
    assert body["max_model_len"] == 8192
    assert all(isinstance(token, int) for token in body["tokens"])
    chat = {"model": "demo", "messages": [{"role": "user", "content": "one two"}]}
    assert (await (await client.post("/tokenize", json=chat)).json())["count"] == 2 + 3
    back = await (await client.post("/detokenize", json={"model": "demo", "tokens": [7, 9]})).json()
    assert back == {"prompt": "tok7 tok9"}
    resp = await client.post("/detokenize", json={"model": "demo", "tokens": ["x"]})
    _assert_error(await resp.json(), "tokens")
