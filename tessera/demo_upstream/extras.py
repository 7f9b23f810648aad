"""vLLM's routes beyond OpenAI's: rerank, score, tokenize and detokenize, and the admin routes
(LoRA adapters, prefix cache, sleep) a gateway must never let a tenant reach."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from tessera.demo_upstream.schema import bad, is_int, message_tokens, model_of, positive_int
from tessera.demo_upstream.state import check_model, read_json, reported, state_of
from tessera.demo_upstream.tokens import count_words, relevance, token_ids

MAX_MODEL_LEN = 8192


def _texts(value: object, param: str) -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    raise bad(param, f"`{param}` must be a string or a non-empty list of strings.")


def _document_text(document: object) -> str:
    if isinstance(document, dict):
        document = document.get("text")
    if not isinstance(document, str):
        raise bad("documents", "Each of `documents` must be a string or an object with a string `text`.")
    return document


async def _model(request: web.Request) -> tuple[dict[str, Any], str]:
    body = await read_json(request)
    model = model_of(body)
    check_model(request, model)
    return body, model


async def rerank(request: web.Request) -> web.StreamResponse:
    """``{model, query, documents, top_n?}``: the documents, most relevant first."""
    body, model = await _model(request)
    query = body.get("query")
    if not isinstance(query, str):
        raise bad("query", "`query` must be a string.")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise bad("documents", "`documents` must be a non-empty list.")
    texts = [_document_text(document) for document in documents]
    top_n = positive_int(body, "top_n") or len(texts)
    tokens = sum(count_words(query) + count_words(text) for text in texts)
    state_of(request).metrics.prompt_tokens.labels(model_name=model).inc(tokens)
    scored = sorted(enumerate(texts), key=lambda pair: -relevance(query, pair[1]))[:top_n]
    results = [
        {"index": index, "document": {"text": text}, "relevance_score": relevance(query, text)}
        for index, text in scored
    ]
    usage = {"total_tokens": tokens}
    reported(request, usage)
    answer = {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "usage": usage, "results": results}
    return web.json_response(answer)


async def score(request: web.Request) -> web.StreamResponse:
    """``{model, text_1, text_2}``: one score per pair (one ``text_1`` scores every ``text_2``)."""
    body, model = await _model(request)
    firsts, seconds = _texts(body.get("text_1"), "text_1"), _texts(body.get("text_2"), "text_2")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise bad("text_2", "`text_1` must have one text, or as many as `text_2`.")
    pairs = list(zip(firsts, seconds, strict=True))
    tokens = sum(count_words(first) + count_words(second) for first, second in pairs)
    state_of(request).metrics.prompt_tokens.labels(model_name=model).inc(tokens)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
    reported(request, usage)
    data = [
        {"index": index, "object": "score", "score": relevance(first, second)}
        for index, (first, second) in enumerate(pairs)
    ]
    return web.json_response(
        {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": usage,
        }
    )


async def tokenize(request: web.Request) -> web.StreamResponse:
    """``{model, prompt}`` or ``{model, messages}``: the token ids, one per word (plus a few per
    message), as chat and completions count them."""
    body, _model_name = await _model(request)
    if "messages" in body:
        count = message_tokens(body["messages"], "messages")
        key = json.dumps(body["messages"], sort_keys=True)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("prompt", "`prompt` must be a string (or send `messages`).")
        count, key = count_words(prompt), prompt
    tokens = token_ids(key, count)
    return web.json_response(
        {"count": count, "max_model_len": MAX_MODEL_LEN, "tokens": tokens, "token_strs": None}
    )


async def detokenize(request: web.Request) -> web.StreamResponse:
    """``{model, tokens}``: a word per token, ``tok<id>`` (not the inverse of /tokenize)."""
    body, _model_name = await _model(request)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_int(token) and token >= 0 for token in tokens):
        raise bad("tokens", "`tokens` must be a list of non-negative integers.")
    return web.json_response({"prompt": " ".join(f"tok{token}" for token in tokens)})


async def load_lora_adapter(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    return web.Response(text=f"Success: LoRA adapter '{body.get('lora_name')}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    return web.Response(text=f"Success: LoRA adapter '{body.get('lora_name')}' removed successfully.")


async def no_content(_request: web.Request) -> web.StreamResponse:
    """``/reset_prefix_cache``, ``/sleep``: done (nothing to do), an empty 200 as vLLM answers."""
    return web.Response(status=200)
