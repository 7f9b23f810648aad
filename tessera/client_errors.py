"""The error bodies clients get, defined once for every producer (Envoy's own replies, the Lua
filter, ext_authz, the ratelimit service): OpenAI's shape, and Anthropic's on the endpoints that
speak Anthropic's API (``/v1/messages``: ``{"type": "error", "error": {"type", "message"}}``).
The status is the same in both."""

from __future__ import annotations

import json
from typing import Final

from tessera.endpoints import Dialect

# code -> (HTTP status, OpenAI error type, default message)
ERRORS: Final[dict[str, tuple[int, str, str]]] = {
    "missing_api_key": (
        401,
        "invalid_request_error",
        "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key'.",
    ),
    "invalid_api_key": (401, "invalid_request_error", "Incorrect API key provided."),
    "api_key_revoked": (401, "invalid_request_error", "This API key has been revoked."),
    "api_key_expired": (401, "invalid_request_error", "This API key has expired."),
    "model_not_found": (
        404,
        "invalid_request_error",
        "The model does not exist or you do not have access to it.",
    ),
    "not_found": (404, "invalid_request_error", "Unknown request URL: the gateway serves no such endpoint."),
    "invalid_json": (400, "invalid_request_error", "The request body is not valid JSON."),
    "missing_model": (
        400,
        "invalid_request_error",
        "You must provide a model parameter in the JSON request body.",
    ),
    "invalid_value": (400, "invalid_request_error", "A parameter of the request is not valid."),
    "integer_above_max_value": (
        400,
        "invalid_request_error",
        "A parameter of the request is above its maximum.",
    ),
    "duplicate_key": (400, "invalid_request_error", "The request body names a key twice."),
    "invalid_form": (
        400,
        "invalid_request_error",
        "The multipart form is not one the gateway can read unambiguously.",
    ),
    "request_too_large": (413, "invalid_request_error", "The request body is too large."),
    "rate_limit_exceeded": (429, "rate_limit_error", "Rate limit reached. Retry later."),
    "insufficient_quota": (429, "insufficient_quota", "You exceeded your current quota."),
    "no_healthy_backend": (503, "server_error", "No healthy backend is available for this model."),
    "service_unavailable": (503, "server_error", "The authentication service is unavailable."),
    "upstream_timeout": (504, "server_error", "The model backend did not answer in time."),
}


def error_body(code: str, message: str | None = None, param: str | None = None) -> dict[str, object]:
    _status, kind, default = ERRORS[code]
    return {"error": {"message": message or default, "type": kind, "code": code, "param": param}}


# HTTP status -> Anthropic's error type (https://docs.anthropic.com/en/api/errors)
ANTHROPIC_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_body(code: str, message: str | None = None) -> dict[str, object]:
    status, _kind, default = ERRORS[code]
    return {
        "type": "error",
        "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message or default},
    }


def body_in(
    dialect: Dialect, code: str, message: str | None = None, param: str | None = None
) -> dict[str, object]:
    """The error body in ``dialect``'s shape."""
    if dialect is Dialect.ANTHROPIC:
        return anthropic_body(code, message)
    return error_body(code, message, param)


def error_json(
    code: str, message: str | None = None, param: str | None = None, dialect: Dialect = Dialect.OPENAI
) -> str:
    return json.dumps(body_in(dialect, code, message, param), separators=(",", ":"))


def status_of(code: str) -> int:
    return ERRORS[code][0]
