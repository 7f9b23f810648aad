"""The demo upstream's aiohttp app: vLLM's OpenAI-compatible routes, answered without a model.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (vLLM metric names).

Because this is a test stand-in, it also records, for every inference request it receives, the
path, the lower-cased request headers and the model, in a ring buffer of the last 200:
``GET /debug/requests`` returns them (newest last) and ``DELETE /debug/requests`` clears them.
Tests use it to check which headers the gateway lets through to the upstream.

A request header ``x-demo-delay-ms`` adds that many milliseconds per generated token, so tests
can hold requests in flight or disconnect mid-stream. Every response carries
``x-demo-upstream: <name>`` so tests can tell upstreams apart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from tessera.demo_upstream.metrics import UpstreamMetrics
from tessera.demo_upstream.schema import (
    ApiError,
    parse_body,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from tessera.demo_upstream.stream import new_id, stream, usage_of
from tessera.demo_upstream.tokens import embedding, generated_words, to_base64

RECORDED_REQUESTS = 200
DELAY_HEADER = "x-demo-delay-ms"
SPLIT_HEADER = "x-demo-split-events"  # "1": every SSE event in two writes (as TCP may deliver it)
MAX_DELAY_MS = 10_000
NAME_HEADER = "x-demo-upstream"


@dataclass
class _State:
    name: str
    models: tuple[str, ...]
    metrics: UpstreamMetrics
    fail_status: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    seen: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECORDED_REQUESTS))


_STATE = web.AppKey("demo_upstream_state", _State)
_ENTRY = web.RequestKey("demo_upstream_entry", dict)  # the request's /debug/requests entry


def build_app(
    models: Sequence[str] = ("demo",), *, name: str = "demo-upstream", fail_status: int = 0
) -> web.Application:
    """``fail_status`` (e.g. 500): a broken server that answers every request, /health included,
    with that status, as a GPU server with a dead engine would."""
    models = tuple(models)
    app = web.Application(middlewares=[_errors])
    app[_STATE] = _State(name=name, models=models, metrics=UpstreamMetrics(models), fail_status=fail_status)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/realtime", _realtime)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/debug/requests", _debug_list)
    app.router.add_delete("/debug/requests", _debug_clear)
    app.router.add_post("/debug/load", _debug_load)
    return app


def _fail_if_broken(request: web.Request) -> None:
    fail = request.app[_STATE].fail_status
    if fail and not request.path.startswith("/debug/"):
        raise ApiError(fail, "This demo upstream is set to fail.", kind="InternalServerError")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        _fail_if_broken(request)
        response = await handler(request)
    except ApiError as exc:
        response = web.json_response(exc.body(), status=exc.status)
    if not response.prepared:
        response.headers[NAME_HEADER] = request.app[_STATE].name
    return response


async def _read(request: web.Request) -> dict[str, Any]:
    """Record the request (headers and JSON body) for /debug/requests, then parse its body."""
    state = request.app[_STATE]
    entry: dict[str, Any] = {
        "path": request.path,
        "headers": {key.lower(): value for key, value in request.headers.items()},
        "model": None,
    }
    state.seen.append(entry)
    request[_ENTRY] = entry
    body = parse_body(await request.read())
    entry["body"] = body
    model = body.get("model")
    entry["model"] = model if isinstance(model, str) else None
    return body


def _reported(request: web.Request, usage: dict[str, int]) -> None:
    """Note on this request's /debug/requests entry the usage it was sent (what a meter must
    count: a stream cut before its usage chunk has none)."""
    entry = request.get(_ENTRY)
    if entry is not None:
        entry["usage"] = usage


def _check_model(request: web.Request, model: str) -> None:
    if model not in request.app[_STATE].models:
        raise ApiError(404, f"The model `{model}` does not exist.", kind="NotFoundError", param="model")


def _delay_seconds(request: web.Request) -> float:
    raw = request.headers.get(DELAY_HEADER, "0")
    try:
        delay = int(raw)
    except ValueError:
        delay = -1
    if not 0 <= delay <= MAX_DELAY_MS:
        raise ApiError(
            400, f"`{DELAY_HEADER}` must be an integer from 0 to {MAX_DELAY_MS}.", param=DELAY_HEADER
        )
    return delay / 1000


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    body = await _read(request)
    gen = parse_chat(body) if chat else parse_completion(body)
    _check_model(request, gen.model)
    delay = _delay_seconds(request)
    metrics = request.app[_STATE].metrics
    metrics.prompt_tokens.labels(model_name=gen.model).inc(gen.prompt_tokens)
    with metrics.track(gen.model):
        if gen.stream:
            state = request.app[_STATE]
            return await stream(
                request,
                gen,
                chat=chat,
                delay=delay,
                headers={NAME_HEADER: state.name},
                on_tokens=metrics.generation_tokens.labels(model_name=gen.model).inc,
                on_usage=lambda usage: _reported(request, usage),
                split=request.headers.get(SPLIT_HEADER) == "1",
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
        _reported(request, usage_of(gen))
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
    body = await _read(request)
    req = parse_embedding(body)
    _check_model(request, req.model)
    metrics = request.app[_STATE].metrics
    metrics.prompt_tokens.labels(model_name=req.model).inc(req.tokens)
    with metrics.track(req.model):
        data = []
        for index, key in enumerate(req.keys):
            vector = embedding(key, req.dimensions)
            encoded: list[float] | str = to_base64(vector) if req.base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        return web.json_response(
            {
                "id": f"embd-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": req.model,
                "data": data,
                "usage": {"prompt_tokens": req.tokens, "total_tokens": req.tokens},
            }
        )


async def _models(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    data = [
        {"id": model, "object": "model", "created": state.created, "owned_by": state.name, "root": model}
        for model in state.models
    ]
    return web.json_response({"object": "list", "data": data})


async def _realtime(request: web.Request) -> web.StreamResponse:
    """A WebSocket like vLLM's realtime endpoint, reduced to what a gateway test needs: it
    records the upgrade request, announces the session with its model (``?model=``), then
    answers each text message with a ``response.done`` event that echoes it."""
    state = request.app[_STATE]
    model = request.query.get("model", "")
    state.seen.append(
        {
            "path": request.path,
            "headers": {key.lower(): value for key, value in request.headers.items()},
            "model": model,
            "body": None,
        }
    )
    _check_model(request, model)
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
    metrics = request.app[_STATE].metrics
    if metrics.broken:
        return web.Response(status=500, text="metrics are broken on purpose")
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _debug_load(request: web.Request) -> web.StreamResponse:
    """``{"waiting": N, "broken": bool}``: pretend N requests are queued (a loaded GPU), or make
    ``/metrics`` fail. Tests use it to drive the gateway's load-aware weights."""
    body = parse_body(await request.read())
    state = request.app[_STATE]
    waiting = body.get("waiting", 0)
    if not isinstance(waiting, int) or waiting < 0:
        raise ApiError(400, "`waiting` must be a non-negative integer.", param="waiting")
    state.metrics.pretend_waiting(waiting)
    state.metrics.broken = bool(body.get("broken", False))
    return web.Response(status=204)


async def _debug_list(request: web.Request) -> web.StreamResponse:
    return web.json_response({"requests": list(request.app[_STATE].seen)})


async def _debug_clear(request: web.Request) -> web.StreamResponse:
    request.app[_STATE].seen.clear()
    return web.Response(status=204)
