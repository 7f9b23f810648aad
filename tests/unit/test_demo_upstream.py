"""The demo upstream (vLLM stand-in), driven in-process through aiohttp's test server."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from typing import Any

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
    await client.get("/v1/models")  # not an inference request: not recorded
    recorded = (await (await client.get("/debug/requests")).json())["requests"]
    assert [(entry["path"], entry["model"]) for entry in recorded] == [
        (CHAT, "demo"),
        ("/v1/embeddings", "other"),
        (CHAT, None),
    ]
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
