"""Server-sent-event streaming of chat and text completions, shaped like vLLM's."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tessera.demo_upstream.schema import GenerateRequest
from tessera.demo_upstream.tokens import generated_words


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage_of(gen: GenerateRequest) -> dict[str, int]:
    completion = gen.completion_tokens * gen.n_prompts
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": gen.prompt_tokens + completion,
    }


class _Chunks:
    """Builds the chunk objects; ``usage: null`` is on each only when include_usage was asked."""

    def __init__(self, gen: GenerateRequest, chat: bool) -> None:
        self.chat = chat
        self.base: dict[str, Any] = {
            "id": new_id(chat),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": gen.model,
        }
        if gen.include_usage:
            self.base["usage"] = None

    def _wrap(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.base, "choices": choices}

    def role(self) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""}
        return self._wrap([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def piece(self, index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return self._wrap([choice])

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage}


async def _write_event(response: web.StreamResponse, event: bytes, *, split: bool) -> None:
    if split:  # the first half now, the rest a moment later: a proxy sees two reads
        half = len(event) // 2
        await response.write(event[:half])
        await asyncio.sleep(0.005)
        event = event[half:]
    await response.write(event)


async def stream(
    request: web.Request,
    gen: GenerateRequest,
    *,
    chat: bool,
    delay: float,
    headers: dict[str, str],
    on_tokens: Callable[[int], None],
    on_usage: Callable[[dict[str, int]], None] = lambda _usage: None,
    split: bool = False,
) -> web.StreamResponse:
    """One write per chunk (so the client sees tokens as they come); stops if the client leaves."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    chunks = _Chunks(gen, chat)

    async def send(payload: dict[str, Any]) -> None:
        await _write_event(
            response, b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n", split=split
        )

    try:
        if chat:
            await send(chunks.role())
        for position, word in enumerate(generated_words(gen.completion_tokens)):
            if delay:
                await asyncio.sleep(delay)
            if request.transport is None or request.transport.is_closing():
                return response
            for index in range(gen.n_prompts):
                await send(chunks.piece(index, word if position == 0 else f" {word}"))
            on_tokens(gen.n_prompts)
        for index in range(gen.n_prompts):
            await send(chunks.piece(index, "", gen.finish_reason))
        if gen.include_usage:
            await send(chunks.usage(usage_of(gen)))
            on_usage(usage_of(gen))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client disconnected mid-stream: stop generating
    return response
