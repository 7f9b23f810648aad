"""Speech to text, ``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations``: a
multipart form with ``file`` and ``model`` (``response_format``, ``language``, ``prompt``
optional), answered without listening.

The audio counts ``ceil(bytes / 320)`` input tokens (320 bytes: 10 ms of 16 kHz 16-bit mono);
the text is that many words, at most ``DEFAULT_MAX_TOKENS``. ``json`` (the default) and
``verbose_json`` answers carry ``usage: {type: "tokens", input_tokens, output_tokens,
total_tokens}``, unless the request has ``x-demo-no-usage: 1`` (a backend that reports none);
``text`` answers are the bare text, with no usage.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from aiohttp import web

from tessera.demo_upstream.schema import DEFAULT_MAX_TOKENS, bad, model_of
from tessera.demo_upstream.state import check_model, delay_seconds, note, reported, state_of
from tessera.demo_upstream.tokens import generated_words

BYTES_PER_TOKEN = 320
BYTES_PER_SECOND = 32_000
NO_USAGE_HEADER = "x-demo-no-usage"
FORMATS = ("json", "text", "verbose_json")
_SEGMENT: dict[str, Any] = {  # verbose_json's one segment, less its end and text
    "id": 0,
    "seek": 0,
    "start": 0.0,
    "tokens": [],
    "temperature": 0.0,
    "avg_logprob": 0.0,
    "compression_ratio": 1.0,
    "no_speech_prob": 0.0,
}


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _speech_to_text(request, "transcribe")


async def translations(request: web.Request) -> web.StreamResponse:
    return await _speech_to_text(request, "translate")


async def _read_form(request: web.Request) -> tuple[dict[str, str], bytes | None]:
    """The form's text fields, and the file's bytes (None without one); noted for /debug."""
    form = await request.post()
    fields = {name: value for name, value in form.items() if isinstance(value, str)}
    upload = form.get("file")
    audio = upload.file.read() if isinstance(upload, web.FileField) else None
    recorded: dict[str, Any] = {**fields}
    if isinstance(upload, web.FileField) and audio is not None:
        recorded["file"] = {"filename": upload.filename, "bytes": len(audio)}
    note(request, body=recorded, model=fields.get("model"))
    return fields, audio


async def _speech_to_text(request: web.Request, task: str) -> web.StreamResponse:
    fields, audio = await _read_form(request)
    model = model_of(fields)
    if not audio:
        raise bad("file", "`file` must be a non-empty audio file in a multipart/form-data body.")
    response_format = fields.get("response_format", "json")
    if response_format not in FORMATS:
        raise bad("response_format", f"`response_format` must be one of {', '.join(FORMATS)}.")
    check_model(request, model)
    delay = delay_seconds(request)
    input_tokens = math.ceil(len(audio) / BYTES_PER_TOKEN)
    output_tokens = min(input_tokens, DEFAULT_MAX_TOKENS)
    metrics = state_of(request).metrics
    metrics.prompt_tokens.labels(model_name=model).inc(input_tokens)
    with metrics.track(model):
        if delay:
            await asyncio.sleep(delay * output_tokens)
        metrics.generation_tokens.labels(model_name=model).inc(output_tokens)
    text = " ".join(generated_words(output_tokens))
    if response_format == "text":
        return web.Response(text=text)
    answer: dict[str, Any] = {"text": text}
    if response_format == "verbose_json":
        duration = len(audio) / BYTES_PER_SECOND
        segment = dict(_SEGMENT, end=duration, text=text)
        language = fields.get("language", "en") if task == "transcribe" else "en"
        answer = {"task": task, "language": language, "duration": duration, **answer, "segments": [segment]}
    if request.headers.get(NO_USAGE_HEADER) != "1":
        usage = {
            "type": "tokens",
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        }
        answer["usage"] = usage
        reported(request, usage)
    return web.json_response(answer)
