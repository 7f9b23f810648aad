"""Server-sent-event streaming: the writer every streaming route uses, and chat and text
completion streams shaped like vLLM's."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Self

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


class ClientGoneError(Exception):
    """The client closed the connection mid-stream."""


class EventStream:
    """An SSE response written one event per write, so the client sees tokens as they come.

    ``async with EventStream(...) as sse``: leaving the block ends the body; a client that
    leaves mid-stream ends the block early and quietly (nothing more is generated or sent).
    ``split``: every event in two writes, a moment apart (as TCP may deliver it).
    """

    def __init__(self, request: web.Request, *, headers: dict[str, str], split: bool = False) -> None:
        self.request = request
        self.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
        )
        self.response.enable_chunked_encoding()
        self._split = split

    async def __aenter__(self) -> Self:
        await self.response.prepare(self.request)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> bool:
        if kind is None:
            await self.response.write_eof()
            return False
        return issubclass(kind, ClientGoneError | ConnectionResetError)

    async def write(self, event: bytes) -> None:
        if self._split:
            half = len(event) // 2
            await self.response.write(event[:half])
            await asyncio.sleep(0.005)
            event = event[half:]
        await self.response.write(event)

    async def send(self, payload: dict[str, Any], *, event: str | None = None) -> None:
        """``data: <json>``, after ``event: <name>`` when named."""
        head = f"event: {event}\n" if event else ""
        await self.write(f"{head}data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode())

    async def pieces(self, count: int, delay: float) -> AsyncIterator[str]:
        """The generated text one token at a time (``tok0``, `` tok1``, …), ``delay`` seconds
        apart; raises ClientGoneError once the client has left."""
        for position, word in enumerate(generated_words(count)):
            if delay:
                await asyncio.sleep(delay)
            if self.request.transport is None or self.request.transport.is_closing():
                raise ClientGoneError
            yield word if position == 0 else f" {word}"


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


async def stream(
    sse: EventStream,
    gen: GenerateRequest,
    *,
    chat: bool,
    delay: float,
    on_tokens: Callable[[int], None],
    on_usage: Callable[[dict[str, int]], None] = lambda _usage: None,
) -> web.StreamResponse:
    """A chat or text completion stream, ending with ``data: [DONE]``."""
    chunks = _Chunks(gen, chat)
    async with sse:
        if chat:
            await sse.send(chunks.role())
        async for piece in sse.pieces(gen.completion_tokens, delay):
            for index in range(gen.n_prompts):
                await sse.send(chunks.piece(index, piece))
            on_tokens(gen.n_prompts)
        for index in range(gen.n_prompts):
            await sse.send(chunks.piece(index, "", gen.finish_reason))
        if gen.include_usage:
            await sse.send(chunks.usage(usage_of(gen)))
            on_usage(usage_of(gen))
        await sse.response.write(b"data: [DONE]\n\n")
    return sse.response
