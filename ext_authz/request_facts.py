"""What a request may cost, from the facts the gateway read off its body: pure, no I/O.

The Lua filter before ext_authz copies the body's ``max_tokens``, ``max_completion_tokens``,
``n`` and ``best_of`` as written (JSON text, escaped keys decoded, duplicates refused) and the
body's size into headers (``tessera.gateway_headers``); it writes the model's default into a
body that names no ``max_tokens``. Here each is checked the way the backend will read it, so
what is admitted bounds what the backend can generate: an integer from 1 to the model's cap
(``max_tokens`` up to the cap, ``n``/``best_of`` up to ``MAX_CHOICES``), else a 400 naming the
parameter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ext_authz.key_index import ModelTokens
from tessera import endpoints
from tessera import gateway_headers as gh
from tessera.usage_line import token_terms

MAX_CHOICES: Final = 128  # OpenAI's bound on n
MAX_PROMPTS: Final = 2048  # prompts batched in one completions body


@dataclass(frozen=True, slots=True)
class Cost:
    body_bytes: int
    max_completion_tokens: int  # the most the backend may generate (n included)


@dataclass(frozen=True, slots=True)
class BadParam:
    param: str
    message: str
    code: str = "invalid_value"


_JSON_NUMBER: Final = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")


def _json_int(raw: str) -> int | None:
    """An integer-valued JSON number (``10``, ``1e3``, ``10.0``), else None (strings, bools,
    arrays... anything but a number is never parsed: a deeply nested array must not recurse)."""
    raw = raw.strip()
    if len(raw) > 64 or not _JSON_NUMBER.fullmatch(raw):  # noqa: PLR2004 - far beyond any count
        return None
    try:
        value = json.loads(raw)
    except (ValueError, OverflowError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value)


def _bounded(raw: str | None, param: str, cap: int) -> int | BadParam | None:
    """None when absent (or JSON null); the integer when 1 <= it <= cap; else why not."""
    if raw is None or raw.strip() == "null":
        return None
    value = _json_int(raw)
    if value is None:
        return BadParam(param, f"Invalid type for '{param}': expected an integer.")
    if value < 1:
        return BadParam(param, f"Invalid '{param}': integer below minimum value. Expected a value >= 1.")
    if value > cap:
        return BadParam(
            param,
            f"Invalid '{param}': {value} is above this model's maximum of {cap}.",
            "integer_above_max_value",
        )
    return value


def request_cost(headers: Mapping[str, str], path: str, tokens: ModelTokens | None) -> Cost | BadParam:
    """The request's admitted maximum, or the parameter that makes it inadmissible."""
    try:
        body_bytes = max(0, int(headers.get(gh.BODY_BYTES) or 0))
    except ValueError:
        body_bytes = 0  # never from a client: the gateway removes client-sent copies
    endpoint = endpoints.at(path)
    if endpoint.form:  # an upload's audio: reserved as its tokens can be, not as text bytes
        body_bytes = -(-body_bytes // endpoints.FORM_BYTES_PER_TOKEN)
    _default, cap = token_terms(tokens.default if tokens else 0, tokens.cap if tokens else 0)
    limits = []
    for header, param, bound in (  # max_completion_tokens first: the gateway copies it into a
        # body's missing max_tokens, and the client should hear about the parameter it sent
        (gh.MAX_COMPLETION_TOKENS, "max_completion_tokens", cap),
        (gh.MAX_TOKENS, "max_tokens", cap),
        (gh.MAX_OUTPUT_TOKENS, "max_output_tokens", cap),
        (gh.N_PREDICT, "n_predict", cap),
        (gh.N, "n", MAX_CHOICES),
        (gh.BEST_OF, "best_of", MAX_CHOICES),
        (gh.PROMPTS, "prompt", MAX_PROMPTS),
    ):
        value = _bounded(headers.get(header), param, bound)
        if isinstance(value, BadParam):
            return value
        limits.append(value)
    *asked_limits, n, best_of, prompts = limits
    given = [t for t in asked_limits if t is not None]
    # Whichever limit the backend honours, the largest. None given: the gateway writes the
    # default into every JSON body of an endpoint that generates and names none, so this is another
    # endpoint: embeddings, rerank, … generate nothing; anything else (audio transcriptions, a
    # realtime session) may generate up to the model's cap.
    asked = max(given) if given else (cap if endpoint.generates else 0)
    choices = max(n or 1, best_of or 1) * (prompts or 1)
    return Cost(body_bytes=body_bytes, max_completion_tokens=asked * choices)
