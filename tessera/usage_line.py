"""The usage line, version 1: what Envoy writes for every completed request, and what the meter
reads back (ARCHITECTURE §4). Defined once: the control plane puts ``ENVOY_FORMAT`` in the
listener's file access log, ``tessera meter`` parses lines with ``parse``.

One JSON object per line. Envoy fills each field from a command operator; a value it does not
have is left out (``omit_empty_values``; read as ``null``). Token counts arrive as strings (they
come from dynamic metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from tessera import endpoints
from tessera.endpoints import UsageShape

VERSION: Final = 1
NODE_ENV: Final = "ENVOY_NODE_ID"  # Envoy's environment names its node in every line

# JSON key -> Envoy command operator (or a literal).
ENVOY_FORMAT: Final[dict[str, Any]] = {
    "v": VERSION,
    "node": f"%ENVIRONMENT({NODE_ENV})%",
    "request_id": "%REQ(X-REQUEST-ID)%",  # minted by Envoy: clients cannot choose it
    "start_time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%6fZ)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "tenant_id": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:tenant_id)%",
    "key_id": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:key_id)%",
    # ext_authz admitted it with a reservation or a concurrency slot: the meter settles it.
    "reserved": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:reserved)%",
    "jwt_sub": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:jwt_payload:sub)%",
    "model_requested": "%DYNAMIC_METADATA(ai.gw:model)%",
    "model": "%METADATA(ROUTE:tessera:model)%",  # served: an alias resolved
    "backend": "%UPSTREAM_HOST%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    # Usage as the answer reported it, each API's fields apart (tessera.endpoints.UsageShape);
    # ``parse`` reads those of the request's endpoint. Chat, completions, embeddings, rerank:
    "prompt_tokens": "%DYNAMIC_METADATA(ai.gw.usage:prompt_tokens)%",
    "completion_tokens": "%DYNAMIC_METADATA(ai.gw.usage:completion_tokens)%",
    "cached_tokens": "%DYNAMIC_METADATA(ai.gw.usage:cached_tokens)%",
    "total_tokens": "%DYNAMIC_METADATA(ai.gw.usage:total_tokens)%",  # rerank reports only this
    # the Responses API, audio, Anthropic's Messages:
    "input_tokens": "%DYNAMIC_METADATA(ai.gw.usage:input_tokens)%",
    "output_tokens": "%DYNAMIC_METADATA(ai.gw.usage:output_tokens)%",
    "input_cached_tokens": "%DYNAMIC_METADATA(ai.gw.usage:input_cached_tokens)%",
    # Anthropic's: input read from / written to its prompt cache, reported beside input_tokens
    "cache_read_tokens": "%DYNAMIC_METADATA(ai.gw.usage:cache_read_tokens)%",
    "cache_write_tokens": "%DYNAMIC_METADATA(ai.gw.usage:cache_write_tokens)%",
    "max_tokens": "%DYNAMIC_METADATA(ai.gw:max_tokens)%",
    "max_completion_tokens": "%DYNAMIC_METADATA(ai.gw:max_completion_tokens)%",
    "chunks": "%DYNAMIC_METADATA(ai.gw:chunks)%",  # SSE events sent (the Lua filter counts)
    "content_type": "%RESP(CONTENT-TYPE)%",
    "duration_ms": "%DURATION%",
    "ttfb_ms": "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%",  # to the first response-body byte
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "trace_id": "%TRACE_ID%",  # Envoy's trace of the request (a client's traceparent continued)
    # the context the backend got (the router's span), when the request reached one
    # (a refused request's is the client's own: at most a traceparent's 55 characters)
    "traceparent": "%REQ(TRACEPARENT):55%",
}


@dataclass(frozen=True, slots=True)
class UsageLine:
    node: str
    request_id: str
    start_time: datetime
    method: str
    path: str
    tenant_id: str | None
    key_id: str | None
    principal: str | None  # the JWT subject, else the key id
    model_requested: str | None
    model: str | None
    backend: str | None
    status: int
    prompt_tokens: int | None  # None: the answer carried no usage
    completion_tokens: int | None
    cached_tokens: int
    max_tokens: int | None
    chunks: int
    streamed: bool
    duration_ms: int
    ttfb_ms: int | None
    bytes_received: int
    bytes_sent: int
    reserved: bool = False
    trace_id: str | None = None  # 32 hex digits
    traceparent: str | None = None  # W3C, as sent upstream: the meter's span continues it


MAX_COUNT: Final = 10**9  # a count (tokens, bytes, ms) beyond this is capped: money stays in int64


def _int(value: Any) -> int | None:
    if value.__class__ is int:  # the common cases first: a number, or a count as a string
        return min(value, MAX_COUNT) if value >= 0 else None
    if value is None or isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return min(number, MAX_COUNT) if number >= 0 else None


def _str(value: Any, limit: int = 256) -> str | None:
    if not isinstance(value, str) or not value or value == "-" or value.startswith(":"):
        return None  # ":missing" / ":invalid" are Envoy-side sentinels, not names
    return value[:limit]


def parse(line: str | bytes, default_node: str = "") -> UsageLine | None:
    """A v1 line, or None when it is not one (another version, not JSON, no request id)."""
    try:
        raw = json.loads(line.decode() if isinstance(line, bytes) else line)  # str: no encoding sniffing
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        return None
    request_id = _str(raw.get("request_id"), 64)
    node = _str(raw.get("node"), 128) or default_node
    started = _str(raw.get("start_time"), 40)
    if request_id is None or not node or started is None:
        return None
    try:
        start_time = datetime.fromisoformat(started).astimezone(UTC)
    except ValueError:
        return None
    key_id = _str(raw.get("key_id"), 32)
    max_tokens = _int(raw.get("max_completion_tokens"))
    path = _str(raw.get("path"), 1024) or ""
    prompt, completion, cached = _usage(raw, endpoints.at(path))
    return UsageLine(
        node=node,
        request_id=request_id,
        start_time=start_time,
        method=_str(raw.get("method"), 16) or "",
        path=path,
        tenant_id=_str(raw.get("tenant_id"), 32),
        key_id=key_id,
        principal=_str(raw.get("jwt_sub")) or key_id,
        model_requested=_str(raw.get("model_requested"), 128),
        model=_str(raw.get("model"), 128),
        backend=_str(raw.get("backend")),
        status=_int(raw.get("status")) or 0,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        max_tokens=max_tokens if max_tokens is not None else _int(raw.get("max_tokens")),
        chunks=_int(raw.get("chunks")) or 0,
        streamed=(_str(raw.get("content_type")) or "").startswith("text/event-stream"),
        duration_ms=_int(raw.get("duration_ms")) or 0,
        ttfb_ms=_int(raw.get("ttfb_ms")),
        bytes_received=_int(raw.get("bytes_received")) or 0,
        bytes_sent=_int(raw.get("bytes_sent")) or 0,
        reserved=raw.get("reserved") == "1",
        trace_id=_trace_id(raw.get("trace_id")),
        traceparent=_str(raw.get("traceparent"), 64),
    )


def _usage(raw: dict[str, Any], endpoint: endpoints.Endpoint) -> tuple[int | None, int | None, int]:
    """(prompt, completion, cached) from the fields of the endpoint's usage shape; None: not
    reported. The prompt counts cached tokens in (OpenAI's way): Anthropic reports cache reads and
    writes beside input_tokens, so they are added. An endpoint that generates nothing reported
    no completion because there was none."""
    shape = endpoint.usage
    if shape is UsageShape.CHAT:
        prompt, completion = _int(raw.get("prompt_tokens")), _int(raw.get("completion_tokens"))
        cached = _int(raw.get("cached_tokens")) or 0
        if prompt is None and completion is None:
            prompt = _int(raw.get("total_tokens"))  # rerank: the tokens it read
    else:
        prompt, completion = _int(raw.get("input_tokens")), _int(raw.get("output_tokens"))
        cached = _int(raw.get("input_cached_tokens")) or 0
    if shape is UsageShape.ANTHROPIC:
        read, write = _int(raw.get("cache_read_tokens")) or 0, _int(raw.get("cache_write_tokens")) or 0
        if read or write:
            prompt = min((prompt or 0) + read + write, MAX_COUNT)
            cached = read
    if prompt is not None and completion is None and not endpoint.generates:
        completion = 0
    return prompt, completion, min(cached, prompt or 0)


def _trace_id(value: Any) -> str | None:
    if isinstance(value, str) and len(value) == 32 and _HEX.issuperset(value) and value != "0" * 32:  # noqa: PLR2004
        return value
    return None


_HEX: Final = frozenset("0123456789abcdef")


# --- estimates: what a request is assumed to use before (or without) its real usage ----------

BYTES_PER_TOKEN: Final = 4  # a billing estimate of the prompt: the body's size / 4
DEFAULT_COMPLETION_TOKENS: Final = 1024  # written into a body that names no max_tokens
PLATFORM_MAX_TOKENS: Final = 32_768  # the cap of a model registered without --max-tokens


def token_terms(default_max_tokens: int, max_max_tokens: int) -> tuple[int, int]:
    """A model's effective (default, cap) of completion tokens: its own, else the platform's.
    The gateway writes the default into a body that names none and refuses a request above
    the cap, so the backend never generates more than was admitted."""
    cap = max_max_tokens or max(PLATFORM_MAX_TOKENS, default_max_tokens)
    return min(default_max_tokens or DEFAULT_COMPLETION_TOKENS, cap), cap


def reserved_tokens(
    body_bytes: int,
    max_tokens: int | None,
    *,
    default_max_tokens: int = 0,
    max_max_tokens: int = 0,
    bytes_per_token: int = BYTES_PER_TOKEN,
) -> tuple[int, int]:
    """(prompt, completion): the body's size / ``bytes_per_token`` for the prompt; for the
    completion the request's ``max_tokens``, else the model's default, capped by its maximum
    (``token_terms``). The meter charges at least this for a stream cut before its usage."""
    prompt = -(-body_bytes // max(1, bytes_per_token))
    default, cap = token_terms(default_max_tokens, max_max_tokens)
    return prompt, min(max_tokens or default, cap)
