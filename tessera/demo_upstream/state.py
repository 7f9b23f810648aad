"""What every route of the demo upstream shares: its state, its test headers, and the
``/debug/requests`` entry of the request being answered."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tessera.demo_upstream.metrics import UpstreamMetrics
from tessera.demo_upstream.schema import ApiError, parse_body
from tessera.demo_upstream.stream import EventStream

RECORDED_REQUESTS = 200
DELAY_HEADER = "x-demo-delay-ms"
SPLIT_HEADER = "x-demo-split-events"  # "1": every SSE event in two writes (as TCP may deliver it)
MAX_DELAY_MS = 10_000
NAME_HEADER = "x-demo-upstream"


@dataclass
class State:
    name: str
    models: tuple[str, ...]
    metrics: UpstreamMetrics
    fail_status: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    seen: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECORDED_REQUESTS))


STATE = web.AppKey("demo_upstream_state", State)
ENTRY = web.RequestKey("demo_upstream_entry", dict)  # the request's /debug/requests entry


def state_of(request: web.Request) -> State:
    return request.app[STATE]


def note(request: web.Request, **fields: Any) -> None:
    """Add to this request's /debug/requests entry (none for the unrecorded paths)."""
    entry = request.get(ENTRY)
    if entry is not None:
        entry.update(fields)


async def read_json(request: web.Request) -> dict[str, Any]:
    """Parse the JSON body, noting it and its model on the request's /debug/requests entry."""
    body = parse_body(await request.read())
    model = body.get("model")
    note(request, body=body, model=model if isinstance(model, str) else None)
    return body


def reported(request: web.Request, usage: dict[str, Any]) -> None:
    """Note on this request's /debug/requests entry the usage it was sent, as sent (what a meter
    must count: a stream cut before its usage event has none)."""
    note(request, usage=usage)


def check_model(request: web.Request, model: str) -> None:
    if model not in state_of(request).models:
        raise ApiError(404, f"The model `{model}` does not exist.", kind="NotFoundError", param="model")


def delay_seconds(request: web.Request) -> float:
    """The per-token delay asked for with ``x-demo-delay-ms``."""
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


def event_stream(request: web.Request) -> EventStream:
    """An SSE response carrying this upstream's name (split in two writes per event when the
    request asks with ``x-demo-split-events: 1``)."""
    headers = {NAME_HEADER: state_of(request).name}
    return EventStream(request, headers=headers, split=request.headers.get(SPLIT_HEADER) == "1")
