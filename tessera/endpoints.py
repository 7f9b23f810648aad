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


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    generates: bool = True  # reserves completion tokens (embeddings, rerank, … do not)
    dialect: Dialect = Dialect.OPENAI
    form: bool = False  # multipart/form-data: the model is a form field (audio)


CHAT: Final = Endpoint("/v1/chat/completions")
COMPLETIONS: Final = Endpoint("/v1/completions")
EMBEDDINGS: Final = Endpoint("/v1/embeddings", generates=False)
RESPONSES: Final = Endpoint("/v1/responses")
MESSAGES: Final = Endpoint("/v1/messages", dialect=Dialect.ANTHROPIC)
TRANSCRIPTIONS: Final = Endpoint("/v1/audio/transcriptions", form=True)
TRANSLATIONS: Final = Endpoint("/v1/audio/translations", form=True)
RERANK: Final = Endpoint("/v1/rerank", generates=False)
SCORE: Final = Endpoint("/v1/score", generates=False)
TOKENIZE: Final = Endpoint("/tokenize", generates=False)
DETOKENIZE: Final = Endpoint("/detokenize", generates=False)

METHOD: Final = "POST"  # every endpoint above (GET /v1/models is answered by the control plane)

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


def dialect_of(path: str) -> Dialect:
    """The dialect of the endpoint at ``path`` (its query ignored); OpenAI's for any other."""
    endpoint = BY_PATH.get(path.partition("?")[0])
    return endpoint.dialect if endpoint else Dialect.OPENAI


def generates(path: str) -> bool:
    """Whether the endpoint at ``path`` may generate tokens (any path not listed is assumed to)."""
    endpoint = BY_PATH.get(path.partition("?")[0])
    return endpoint is None or endpoint.generates


def path_regex(endpoints: tuple[Endpoint, ...]) -> str:
    """An RE2 that matches exactly these paths (Envoy matches it against the whole path)."""
    return "(?:" + "|".join(e.path.replace(".", "\\.") for e in endpoints) + ")"
