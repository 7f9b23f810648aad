"""Usage lines as Envoy writes them (``tessera.usage_line.ENVOY_FORMAT``), for the tests that feed
the meter, the ledger or the GenAI metrics one line at a time."""

from __future__ import annotations

import json
from typing import Any

from tessera import usage_line


def line(request_id: str, *, node: str = "", **fields: Any) -> str:
    """A POST to /v1/chat/completions answered 200 (numbers as numbers, metadata as strings, every
    field Envoy has no value for null); ``fields`` override or add."""
    doc: dict[str, Any] = dict.fromkeys(usage_line.ENVOY_FORMAT)
    doc |= {
        "v": 1,
        "node": node or None,
        "request_id": request_id,
        "start_time": "2026-11-10T10:00:00.000000Z",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "duration_ms": 12,
        "bytes_received": 400,
        "bytes_sent": 900,
        "content_type": "application/json",
    }
    doc |= fields
    return json.dumps(doc)


def parsed(request_id: str, **fields: Any) -> usage_line.UsageLine:
    """``line`` as the meter reads it."""
    result = usage_line.parse(line(request_id, **fields))
    assert result is not None, fields
    return result
