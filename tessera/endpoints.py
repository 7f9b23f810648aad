"""The endpoints the gateway serves, per backend kind: the allowlist, defined once.

A model route matches only its kind's endpoints (``POST``, the exact path after Envoy's
normalisation); every other path is answered 404 ``not_found`` by Envoy, never reaches a backend
and is counted against no limit. Backend admin endpoints (vLLM's ``/v1/load_lora_adapter``,
``/sleep``, …) are on no list, so no tenant reaches them. A model whose backends are of several
kinds serves the endpoints all of them serve.

Read by the xDS builder (routes), ext_authz (what an endpoint reserves) and the docs' table
(``tests/unit/test_endpoints.py`` checks the README lists these).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final


class Dialect(Enum):
    """The API an endpoint speaks: its errors and its usage come in that API's shape."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class UsageShape(Enum):
    """Where an endpoint's answers report usage (the usage line keeps each shape's own fields, and
    the meter reads the endpoint's: one answer cannot bill through another API's field names)."""

    CHAT = "chat"  # usage.prompt_tokens / completion_tokens / prompt_tokens_details.cached_tokens
    RESPONSES = "responses"  # usage.input_tokens / output_tokens / input_tokens_details.cached_tokens
    ANTHROPIC = "anthropic"  # usage.input_tokens / output_tokens, cache reads and writes beside them


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    generates: bool = True  # reserves completion tokens (embeddings, rerank, … do not)
    dialect: Dialect = Dialect.OPENAI
    form: bool = False  # multipart/form-data: the model is a form field (audio)
    usage: UsageShape = UsageShape.CHAT


CHAT: Final = Endpoint("/v1/chat/completions")
COMPLETIONS: Final = Endpoint("/v1/completions")
EMBEDDINGS: Final = Endpoint("/v1/embeddings", generates=False)
RESPONSES: Final = Endpoint("/v1/responses", usage=UsageShape.RESPONSES)
MESSAGES: Final = Endpoint("/v1/messages", dialect=Dialect.ANTHROPIC, usage=UsageShape.ANTHROPIC)
TRANSCRIPTIONS: Final = Endpoint("/v1/audio/transcriptions", form=True, usage=UsageShape.RESPONSES)
TRANSLATIONS: Final = Endpoint("/v1/audio/translations", form=True, usage=UsageShape.RESPONSES)
RERANK: Final = Endpoint("/v1/rerank", generates=False)
SCORE: Final = Endpoint("/v1/score", generates=False)
TOKENIZE: Final = Endpoint("/tokenize", generates=False)
DETOKENIZE: Final = Endpoint("/detokenize", generates=False)

_OPENAI: Final = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)
BY_KIND: Final[dict[str, tuple[Endpoint, ...]]] = {
    "openai-compatible": (*_OPENAI, TRANSCRIPTIONS, TRANSLATIONS),
    "vllm": (*_OPENAI, MESSAGES, TRANSCRIPTIONS, TRANSLATIONS, RERANK, SCORE, TOKENIZE, DETOKENIZE),
    "llamacpp": (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES, RERANK, TOKENIZE, DETOKENIZE),
    "dynamo": _OPENAI,
    "trtllm": (CHAT, COMPLETIONS),
}
ALL: Final = tuple(dict.fromkeys(e for endpoints in BY_KIND.values() for e in endpoints))
BY_PATH: Final = {e.path: e for e in ALL}


def served(kinds: set[str] | frozenset[str]) -> tuple[Endpoint, ...]:
    """The endpoints every one of these kinds serves, in catalogue order."""
    return tuple(e for e in ALL if all(e in BY_KIND[k] for k in kinds))


# An upload's audio is billed by the tokens its backend reports. Without them (a reservation, an
# estimate) it counts one token per this many bytes: at 50 audio tokens a second (Whisper's
# encoder rate, more than OpenAI's audio models), any encoding of 4 kbps or more stays under it.
FORM_BYTES_PER_TOKEN: Final = 10

_UNLISTED: Final = Endpoint("")  # any other path a model route serves (a realtime session)


def at(path: str) -> Endpoint:
    """The endpoint at ``path`` (its query ignored); for a path not listed, a generating one that
    speaks OpenAI's API."""
    return BY_PATH.get(path.partition("?")[0], _UNLISTED)


def dialect_of(path: str) -> Dialect:
    return at(path).dialect


def path_regex(endpoints: tuple[Endpoint, ...]) -> str:
    """An RE2 that matches exactly these paths (Envoy matches it against the whole path)."""
    return "(?:" + "|".join(e.path.replace(".", "\\.") for e in endpoints) + ")"
