"""The demo upstream as a real process, spoken to by the official ``openai`` client."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest

MODULE = "tessera.demo_upstream"


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", MODULE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _started_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = json.loads(proc.stdout.readline())
    assert line["event"] == "demo_upstream.started"
    return int(line["port"])


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with _start("--port", "0", "--model", "demo", "--model", "embed") as proc:
        try:
            yield _started_port(proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=10)


@pytest.fixture
def client(upstream: int) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"http://127.0.0.1:{upstream}/v1", api_key="x", max_retries=0) as oai:
        yield oai


def test_chat(client):
    resp = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "say three words"}], max_tokens=5
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert len((resp.choices[0].message.content or "").split()) == 5
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (6, 5, 11)


def test_streaming_chat_without_usage(client):
    stream = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text.split() == ["tok0", "tok1", "tok2", "tok3"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "one two"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    *chunks, last = list(stream)
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (5, 3, 8)
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks).split() == [
        "tok0",
        "tok1",
        "tok2",
    ]


def test_completions(client):
    resp = client.completions.create(model="demo", prompt="once upon a time", max_tokens=2)
    assert resp.choices[0].text.split() == ["tok0", "tok1"]
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (4, 2)


def test_streaming_completions_with_usage(client):
    stream = client.completions.create(
        model="demo", prompt="a b", max_tokens=2, stream=True, stream_options={"include_usage": True}
    )
    *chunks, last = list(stream)
    assert last.usage is not None
    assert last.usage.completion_tokens == 2
    assert "".join(chunk.choices[0].text for chunk in chunks).split() == ["tok0", "tok1"]


def test_embeddings(client):
    # The client asks for base64 by default and decodes it.
    resp = client.embeddings.create(model="embed", input=["hello world", "bye"])
    assert [item.index for item in resp.data] == [0, 1]
    assert all(len(item.embedding) == 8 for item in resp.data)
    assert sum(v * v for v in resp.data[0].embedding) == pytest.approx(1.0, rel=1e-5)
    assert resp.usage.prompt_tokens == 3
    floats = client.embeddings.create(
        model="embed", input="hello world", encoding_format="float", dimensions=8
    )
    assert floats.data[0].embedding == pytest.approx(resp.data[0].embedding, rel=1e-6)


def test_models_list(client):
    assert [model.id for model in client.models.list()] == ["demo", "embed"]


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="demo", messages=[], max_tokens=1)
    assert bad.value.status_code == 400


def test_sigterm_exits_zero():
    with _start("--port", "0") as proc:
        _started_port(proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "demo_upstream.stopping" in out
    assert "Traceback" not in err


def test_taken_port_is_a_one_line_error_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with _start("--port", str(port)) as proc:
            _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert len(err.strip().splitlines()) == 1
    assert str(port) in err
    assert "Traceback" not in err
