"""Validation of the OpenAI request bodies the demo upstream accepts.

Problems are raised as ``ApiError`` and rendered in OpenAI's ``{"error": {...}}`` shape, as vLLM
does: a bad field is a 400 that names the field in ``param``; bad input is never a 500.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tessera.demo_upstream.tokens import count_words

MAX_TOKENS_CAP = 4096
DEFAULT_MAX_TOKENS = 16
DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 4096
ROLE_OVERHEAD_TOKENS = 3


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "BadRequestError",
        param: str | None = None,
        code: int | str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code: int | str = status if code is None else code

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class GenerateRequest:
    """A chat or text completion, reduced to what the demo needs to answer it."""

    model: str
    prompt_tokens: int
    n_prompts: int
    max_tokens: int | None
    stream: bool
    include_usage: bool

    @property
    def completion_tokens(self) -> int:
        """Tokens generated per prompt."""
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def finish_reason(self) -> str:
        return "stop" if self.max_tokens is None else "length"


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    keys: tuple[str, ...]
    tokens: int
    dimensions: int
    base64: bool


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "`model` must be a non-empty string.")
    return model


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise bad(name, f"`{name}` must be a positive integer.")
    return int(value)


def optional_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"`{name}` must be a boolean.")
    return value


def _common(body: dict[str, Any], max_token_fields: tuple[str, ...]) -> tuple[int | None, bool, bool]:
    """max_tokens (capped), stream, include_usage; also checks n and the sampling numbers."""
    limits = [positive_int(body, name) for name in max_token_fields]
    chosen = next((limit for limit in limits if limit is not None), None)
    n = body.get("n")
    if n is not None and (not is_int(n) or n != 1):
        raise bad("n", "Only `n=1` is supported by the demo upstream.")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise bad(name, f"`{name}` must be a number.")
    stream = optional_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "Stream options can only be defined when `stream=True`.")
        if not isinstance(options, dict):
            raise bad("stream_options", "`stream_options` must be an object.")
        include_usage = optional_bool(options, "include_usage")
    return (None if chosen is None else min(chosen, MAX_TOKENS_CAP)), stream, include_usage


# Content parts that carry text: chat's "text", the Responses API's "input_text"/"output_text".
TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


def content_words(content: object, param: str, where: str) -> int:
    """Words in a message's content: a string, or a list of typed parts (text parts counted)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return count_words(content)
    if not isinstance(content, list):
        raise bad(param, f"`{where}` must be a string or a list of content parts.")
    words = 0
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(param, f"Each part of `{where}` must be an object with a `type`.")
        if part["type"] in TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(param, f"A text part of `{where}` must have a string `text`.")
            words += count_words(text)
    return words


def message_tokens(messages: object, param: str) -> int:
    """Prompt tokens of a list of ``{role, content}`` messages: content words plus a few per
    message for its role."""
    if not isinstance(messages, list) or not messages:
        raise bad(param, f"`{param}` must be a non-empty list.")
    tokens = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(param, f"`{param}[{index}]` must be an object.")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise bad(param, f"`{param}[{index}].role` must be a non-empty string.")
        where = f"{param}[{index}].content"
        tokens += content_words(message.get("content"), param, where) + ROLE_OVERHEAD_TOKENS
    return tokens


def parse_chat(body: dict[str, Any]) -> GenerateRequest:
    model = model_of(body)
    prompt_tokens = message_tokens(body.get("messages"), "messages")
    max_tokens, stream, include_usage = _common(body, ("max_completion_tokens", "max_tokens"))
    return GenerateRequest(model, prompt_tokens, 1, max_tokens, stream, include_usage)


def _inputs(value: object, param: str) -> list[tuple[str, int]]:
    """A prompt/input: a string, a list of strings, a token list, or a list of token lists.

    Returns one ``(hash key, token count)`` per input.
    """
    if isinstance(value, str):
        return [(f"s:{value}", count_words(value))]
    if isinstance(value, list) and value:
        if all(is_int(item) for item in value):
            return [(f"t:{value}", len(value))]
        if all(isinstance(item, str) for item in value):
            return [(f"s:{item}", count_words(item)) for item in value]
        if all(isinstance(item, list) and item and all(is_int(t) for t in item) for item in value):
            return [(f"t:{item}", len(item)) for item in value]
    raise bad(param, f"`{param}` must be a string, a non-empty list of strings, or token lists.")


def parse_completion(body: dict[str, Any]) -> GenerateRequest:
    model = model_of(body)
    prompts = _inputs(body.get("prompt"), "prompt")
    max_tokens, stream, include_usage = _common(body, ("max_tokens",))
    prompt_tokens = sum(tokens for _key, tokens in prompts)
    return GenerateRequest(model, prompt_tokens, len(prompts), max_tokens, stream, include_usage)


def parse_embedding(body: dict[str, Any]) -> EmbeddingRequest:
    model = model_of(body)
    inputs = _inputs(body.get("input"), "input")
    dimensions = positive_int(body, "dimensions") or DEFAULT_DIMENSIONS
    if dimensions > MAX_DIMENSIONS:
        raise bad("dimensions", f"`dimensions` must be at most {MAX_DIMENSIONS}.")
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise bad("encoding_format", "`encoding_format` must be 'float' or 'base64'.")
    keys = tuple(key for key, _tokens in inputs)
    tokens = sum(tokens for _key, tokens in inputs)
    return EmbeddingRequest(model, keys, tokens, dimensions, encoding == "base64")
