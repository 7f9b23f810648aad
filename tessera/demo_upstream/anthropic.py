"""Anthropic's Messages API, ``POST /v1/messages`` (and ``/v1/messages/count_tokens``), as vLLM
serves it. ``x-api-key`` and ``anthropic-version`` are accepted and not checked.

The demo model's answer is ``DEFAULT_MAX_TOKENS`` words long: a smaller ``max_tokens`` cuts it
(``stop_reason: "max_tokens"``), a larger one lets it end (``"end_turn"``).

JSON: a ``message`` whose ``usage`` is ``{input_tokens, output_tokens}``. Stream: named events;
``message_start`` carries ``usage: {input_tokens: N, output_tokens: 1}``, ``message_delta`` the
final ``usage: {output_tokens: K}``. Errors on these paths are Anthropic's
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tessera.client_errors import ANTHROPIC_TYPES
from tessera.demo_upstream.schema import (
    DEFAULT_MAX_TOKENS,
    MAX_TOKENS_CAP,
    ROLE_OVERHEAD_TOKENS,
    ApiError,
    bad,
    content_words,
    message_tokens,
    model_of,
    optional_bool,
    positive_int,
)
from tessera.demo_upstream.state import (
    check_model,
    delay_seconds,
    event_stream,
    read_json,
    reported,
    state_of,
)
from tessera.demo_upstream.tokens import generated_words

PATH = "/v1/messages"
_ERROR_TYPES = {**ANTHROPIC_TYPES, 529: "overloaded_error"}  # Anthropic's own status for overload


def is_anthropic(path: str) -> bool:
    return path == PATH or path.startswith(f"{PATH}/")


def error_body(exc: ApiError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(exc.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    input_tokens: int
    max_tokens: int
    stream: bool

    @property
    def output_tokens(self) -> int:
        return min(self.max_tokens, DEFAULT_MAX_TOKENS)

    @property
    def stop_reason(self) -> str:
        return "max_tokens" if self.max_tokens < DEFAULT_MAX_TOKENS else "end_turn"


def _input_tokens(body: dict[str, Any]) -> int:
    tokens = message_tokens(body.get("messages"), "messages")
    system = body.get("system")
    if system:
        tokens += content_words(system, "system", "system") + ROLE_OVERHEAD_TOKENS
    return tokens


def parse_messages(body: dict[str, Any]) -> MessagesRequest:
    model = model_of(body)
    tokens = _input_tokens(body)
    max_tokens = positive_int(body, "max_tokens")
    if max_tokens is None:
        raise bad("max_tokens", "max_tokens: Field required")
    return MessagesRequest(model, tokens, min(max_tokens, MAX_TOKENS_CAP), optional_bool(body, "stream"))


async def count_tokens(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    check_model(request, model_of(body))
    return web.json_response({"input_tokens": _input_tokens(body)})


async def create_message(request: web.Request) -> web.StreamResponse:
    req = parse_messages(await read_json(request))
    check_model(request, req.model)
    delay = delay_seconds(request)
    metrics = state_of(request).metrics
    metrics.prompt_tokens.labels(model_name=req.model).inc(req.input_tokens)
    generated = metrics.generation_tokens.labels(model_name=req.model)
    head = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": req.model}
    with metrics.track(req.model):
        if req.stream:
            return await _stream(request, req, head, delay, generated.inc)
        if delay:
            await asyncio.sleep(delay * req.output_tokens)
        generated.inc(req.output_tokens)
        usage = {"input_tokens": req.input_tokens, "output_tokens": req.output_tokens}
        reported(request, usage)
        text = " ".join(generated_words(req.output_tokens))
        return web.json_response(
            {
                **head,
                "content": [{"type": "text", "text": text}],
                "stop_reason": req.stop_reason,
                "stop_sequence": None,
                "usage": usage,
            }
        )


async def _stream(
    request: web.Request,
    req: MessagesRequest,
    head: dict[str, Any],
    delay: float,
    on_tokens: Callable[[int], None],
) -> web.StreamResponse:
    async with event_stream(request) as sse:

        async def emit(kind: str, **fields: Any) -> None:
            await sse.send({"type": kind, **fields}, event=kind)

        start = {"input_tokens": req.input_tokens, "output_tokens": 1}
        message = {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start}
        await emit("message_start", message=message)
        await emit("content_block_start", index=0, content_block={"type": "text", "text": ""})
        await emit("ping")
        async for piece in sse.pieces(req.output_tokens, delay):
            await emit("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
            on_tokens(1)
        await emit("content_block_stop", index=0)
        delta = {"stop_reason": req.stop_reason, "stop_sequence": None}
        await emit("message_delta", delta=delta, usage={"output_tokens": req.output_tokens})
        reported(request, {"input_tokens": req.input_tokens, "output_tokens": req.output_tokens})
        await emit("message_stop")
    return sse.response
