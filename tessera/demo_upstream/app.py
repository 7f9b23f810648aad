"""The demo upstream's aiohttp app: vLLM's OpenAI-compatible server, answered without a model.

Routes, as vLLM serves them:

- OpenAI: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
  ``POST /v1/responses`` (responses.py), ``POST /v1/audio/transcriptions`` and
  ``POST /v1/audio/translations`` (audio.py), ``GET /v1/models``, ``GET /v1/realtime``
  (a WebSocket);
- Anthropic: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` (anthropic.py);
- vLLM's own (extras.py): ``POST /v1/rerank`` (also ``/rerank``, ``/v2/rerank``),
  ``POST /v1/score`` (also ``/score``), ``POST /tokenize``, ``POST /detokenize``, and the admin
  routes a gateway must never let a tenant reach: ``POST /v1/load_lora_adapter``,
  ``POST /v1/unload_lora_adapter``, ``POST /reset_prefix_cache``, ``POST /sleep``;
- ``GET /health`` and ``GET /metrics`` (vLLM metric names).

Because this is a test stand-in, it records every request that reaches it (whatever its path or
method, unknown ones included, which answer aiohttp's 404), except ``/debug/*``, ``/health`` and
``/metrics``, in a ring buffer of the last 200: ``GET /debug/requests`` returns them (newest
last) and ``DELETE /debug/requests`` clears them. An entry is ``{path, query, method, headers,
model, body}``: ``path`` as received (``raw_path`` less its query: dot segments and escapes
kept), the lower-cased headers, the model and the body when the route reads them (``null``
otherwise), and ``usage``, the usage object as the answer carried it, once it was sent (a stream
cut before its usage has none). Tests use it to check what the gateway lets through, and that
some requests never reach the backend.

A request header ``x-demo-delay-ms`` adds that many milliseconds per generated token, so tests
can hold requests in flight or disconnect mid-stream. Every response carries
``x-demo-upstream: <name>`` so tests can tell upstreams apart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from tessera.demo_upstream import anthropic, audio, extras, responses
from tessera.demo_upstream.metrics import UpstreamMetrics
from tessera.demo_upstream.schema import (
    ApiError,
    parse_body,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from tessera.demo_upstream.state import (
    ENTRY,
    NAME_HEADER,
    STATE,
    State,
    check_model,
    delay_seconds,
    event_stream,
    note,
    read_json,
    reported,
    state_of,
)
from tessera.demo_upstream.stream import new_id, stream, usage_of
from tessera.demo_upstream.tokens import embedding, generated_words, to_base64

# Large enough for an audio file (vLLM takes up to 25 MB); aiohttp's default is 1 MiB.
MAX_BODY_BYTES = 32 * 1024 * 1024
_UNRECORDED = ("/health", "/metrics")


def build_app(
    models: Sequence[str] = ("demo",), *, name: str = "demo-upstream", fail_status: int = 0
) -> web.Application:
    """``fail_status`` (e.g. 500): a broken server that answers every request, /health included,
    with that status, as a GPU server with a dead engine would."""
    models = tuple(models)
    app = web.Application(middlewares=[_record, _errors], client_max_size=MAX_BODY_BYTES)
    app[STATE] = State(name=name, models=models, metrics=UpstreamMetrics(models), fail_status=fail_status)
    for path, handler in (
        ("/v1/chat/completions", _chat),
        ("/v1/completions", _completions),
        ("/v1/embeddings", _embeddings),
        ("/v1/responses", responses.create_response),
        ("/v1/messages", anthropic.create_message),
        ("/v1/messages/count_tokens", anthropic.count_tokens),
        ("/v1/audio/transcriptions", audio.transcriptions),
        ("/v1/audio/translations", audio.translations),
        ("/v1/rerank", extras.rerank),
        ("/rerank", extras.rerank),
        ("/v2/rerank", extras.rerank),
        ("/v1/score", extras.score),
        ("/score", extras.score),
        ("/tokenize", extras.tokenize),
        ("/detokenize", extras.detokenize),
        ("/v1/load_lora_adapter", extras.load_lora_adapter),
        ("/v1/unload_lora_adapter", extras.unload_lora_adapter),
        ("/reset_prefix_cache", extras.no_content),
        ("/sleep", extras.no_content),
        ("/debug/load", _debug_load),
    ):
        app.router.add_post(path, handler)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/realtime", _realtime)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/debug/requests", _debug_list)
    app.router.add_delete("/debug/requests", _debug_clear)
    return app


@web.middleware
async def _record(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record the request for /debug/requests before routing (so unknown paths are too)."""
    path, _, query = request.raw_path.partition("?")
    if path not in _UNRECORDED and not path.startswith("/debug/"):
        entry: dict[str, Any] = {
            "path": path,
            "query": query,
            "method": request.method,
            "headers": {key.lower(): value for key, value in request.headers.items()},
            "model": None,
            "body": None,
        }
        state_of(request).seen.append(entry)
        request[ENTRY] = entry
    return await handler(request)


def _fail_if_broken(request: web.Request) -> None:
    fail = state_of(request).fail_status
    if fail and not request.path.startswith("/debug/"):
        raise ApiError(fail, "This demo upstream is set to fail.", kind="InternalServerError")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        _fail_if_broken(request)
        response = await handler(request)
    except ApiError as exc:
        body = anthropic.error_body(exc) if anthropic.is_anthropic(request.path) else exc.body()
        response = web.json_response(body, status=exc.status)
    if not response.prepared:
        response.headers[NAME_HEADER] = state_of(request).name
    return response


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    body = await read_json(request)
    gen = parse_chat(body) if chat else parse_completion(body)
    check_model(request, gen.model)
    delay = delay_seconds(request)
    metrics = state_of(request).metrics
    metrics.prompt_tokens.labels(model_name=gen.model).inc(gen.prompt_tokens)
    with metrics.track(gen.model):
        if gen.stream:
            return await stream(
                event_stream(request),
                gen,
                chat=chat,
                delay=delay,
                on_tokens=metrics.generation_tokens.labels(model_name=gen.model).inc,
                on_usage=lambda usage: reported(request, usage),
            )
        if delay:
            await asyncio.sleep(delay * gen.completion_tokens)
        text = " ".join(generated_words(gen.completion_tokens))
        metrics.generation_tokens.labels(model_name=gen.model).inc(gen.completion_tokens * gen.n_prompts)
        choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": text}}
            if chat
            else {"index": i, "text": text}
            for i in range(gen.n_prompts)
        ]
        for choice in choices:
            choice.update(finish_reason=gen.finish_reason, logprobs=None)
        reported(request, usage_of(gen))
        return web.json_response(
            {
                "id": new_id(chat),
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": gen.model,
                "choices": choices,
                "usage": usage_of(gen),
            }
        )


async def _embeddings(request: web.Request) -> web.StreamResponse:
    req = parse_embedding(await read_json(request))
    check_model(request, req.model)
    metrics = state_of(request).metrics
    metrics.prompt_tokens.labels(model_name=req.model).inc(req.tokens)
    with metrics.track(req.model):
        data = []
        for index, key in enumerate(req.keys):
            vector = embedding(key, req.dimensions)
            encoded: list[float] | str = to_base64(vector) if req.base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        usage = {"prompt_tokens": req.tokens, "total_tokens": req.tokens}
        reported(request, usage)
        return web.json_response(
            {
                "id": f"embd-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": req.model,
                "data": data,
                "usage": usage,
            }
        )


async def _models(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    data = [
        {"id": model, "object": "model", "created": state.created, "owned_by": state.name, "root": model}
        for model in state.models
    ]
    return web.json_response({"object": "list", "data": data})


async def _realtime(request: web.Request) -> web.StreamResponse:
    """A WebSocket like vLLM's realtime endpoint, reduced to what a gateway test needs: it
    notes the model of the upgrade request (``?model=``), announces the session with it, then
    answers each text message with a ``response.done`` event that echoes it."""
    state = state_of(request)
    model = request.query.get("model", "")
    note(request, model=model)
    check_model(request, model)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_json({"type": "session.created", "session": {"model": model}, "upstream": state.name})
    async for msg in ws:
        if msg.type == web.WSMsgType.TEXT:
            await ws.send_json({"type": "response.done", "echo": msg.data})
    return ws


async def _health(_request: web.Request) -> web.StreamResponse:
    return web.Response(status=200)


async def _metrics(request: web.Request) -> web.StreamResponse:
    metrics = state_of(request).metrics
    if metrics.broken:
        return web.Response(status=500, text="metrics are broken on purpose")
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _debug_load(request: web.Request) -> web.StreamResponse:
    """``{"waiting": N, "broken": bool}``: pretend N requests are queued (a loaded GPU), or make
    ``/metrics`` fail. Tests use it to drive the gateway's load-aware weights."""
    body = parse_body(await request.read())
    state = state_of(request)
    waiting = body.get("waiting", 0)
    if not isinstance(waiting, int) or waiting < 0:
        raise ApiError(400, "`waiting` must be a non-negative integer.", param="waiting")
    state.metrics.pretend_waiting(waiting)
    state.metrics.broken = bool(body.get("broken", False))
    return web.Response(status=204)


async def _debug_list(request: web.Request) -> web.StreamResponse:
    return web.json_response({"requests": list(state_of(request).seen)})


async def _debug_clear(request: web.Request) -> web.StreamResponse:
    state_of(request).seen.clear()
    return web.Response(status=204)
