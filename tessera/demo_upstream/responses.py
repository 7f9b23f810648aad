"""OpenAI's Responses API, ``POST /v1/responses``, as vLLM serves it.

JSON: a ``response`` object whose ``usage`` is ``{input_tokens, input_tokens_details:
{cached_tokens}, output_tokens, output_tokens_details: {reasoning_tokens}, total_tokens}``.
Stream: named events (``event: <type>`` then ``data: {"type", "sequence_number", ...}``) from
``response.created`` to ``response.completed``, the only one whose ``response.usage`` is set
(``null`` before); no ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tessera.demo_upstream.schema import (
    DEFAULT_MAX_TOKENS,
    MAX_TOKENS_CAP,
    ROLE_OVERHEAD_TOKENS,
    bad,
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
from tessera.demo_upstream.tokens import count_words, generated_words


@dataclass(frozen=True)
class ResponsesRequest:
    model: str
    input_tokens: int
    instructions: str | None
    max_output_tokens: int | None
    stream: bool

    @property
    def output_tokens(self) -> int:
        """As chat's max_tokens: the limit when one is set, else the demo's default length."""
        return DEFAULT_MAX_TOKENS if self.max_output_tokens is None else self.max_output_tokens


def parse_responses(body: dict[str, Any]) -> ResponsesRequest:
    model = model_of(body)
    raw = body.get("input")
    if isinstance(raw, str):
        tokens = count_words(raw)
    elif isinstance(raw, list) and raw:
        tokens = message_tokens(raw, "input")
    else:
        raise bad("input", "`input` must be a string or a non-empty list of input items.")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions", "`instructions` must be a string.")
    if instructions:
        tokens += count_words(instructions) + ROLE_OVERHEAD_TOKENS
    limit = positive_int(body, "max_output_tokens")
    limit = None if limit is None else min(limit, MAX_TOKENS_CAP)
    return ResponsesRequest(model, tokens, instructions, limit, optional_bool(body, "stream"))


def _text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


class _Answer:
    """The response object and its parts, as each event shows them."""

    def __init__(self, req: ResponsesRequest) -> None:
        self.req = req
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        output = req.output_tokens
        self.usage = {
            "input_tokens": req.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": req.input_tokens + output,
        }

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_text(text)]
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": self.req.instructions,
            "max_output_tokens": self.req.max_output_tokens,
            "model": self.req.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "tool_choice": "auto",
            "tools": [],
            "truncation": "disabled",
            "usage": self.usage if status == "completed" else None,
        }


async def create_response(request: web.Request) -> web.StreamResponse:
    req = parse_responses(await read_json(request))
    check_model(request, req.model)
    delay = delay_seconds(request)
    metrics = state_of(request).metrics
    metrics.prompt_tokens.labels(model_name=req.model).inc(req.input_tokens)
    generated = metrics.generation_tokens.labels(model_name=req.model)
    answer = _Answer(req)
    with metrics.track(req.model):
        if req.stream:
            return await _stream(request, answer, delay, generated.inc)
        if delay:
            await asyncio.sleep(delay * req.output_tokens)
        generated.inc(req.output_tokens)
        text = " ".join(generated_words(req.output_tokens))
        reported(request, answer.usage)
        return web.json_response(answer.response("completed", [answer.message(text, "completed")]))


async def _stream(
    request: web.Request, answer: _Answer, delay: float, on_tokens: Callable[[int], None]
) -> web.StreamResponse:
    numbers = itertools.count()
    part = {"item_id": answer.item_id, "output_index": 0, "content_index": 0}
    async with event_stream(request) as sse:

        async def emit(kind: str, **fields: Any) -> None:
            await sse.send({"type": kind, "sequence_number": next(numbers), **fields}, event=kind)

        await emit("response.created", response=answer.response("in_progress", []))
        await emit("response.in_progress", response=answer.response("in_progress", []))
        await emit("response.output_item.added", output_index=0, item=answer.message(None, "in_progress"))
        await emit("response.content_part.added", **part, part=_text(""))
        text = ""
        async for piece in sse.pieces(answer.req.output_tokens, delay):
            await emit("response.output_text.delta", **part, delta=piece, logprobs=[])
            text += piece
            on_tokens(1)
        await emit("response.output_text.done", **part, text=text, logprobs=[])
        await emit("response.content_part.done", **part, part=_text(text))
        message = answer.message(text, "completed")
        await emit("response.output_item.done", output_index=0, item=message)
        await emit("response.completed", response=answer.response("completed", [message]))
        reported(request, answer.usage)
    return sse.response
