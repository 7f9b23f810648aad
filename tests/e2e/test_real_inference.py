"""Real inference through the whole Tessera path: llama.cpp's llama-server with Gemma 3 270M
(built by `make llm`) behind Envoy, driven by the official `openai` client.

The base model's text is not meaningful: these tests assert shape, usage, metering, limits,
cancellation, balancing and errors, never content. Skipped, saying why, when `make llm` has
not been run on this machine.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator

import anthropic
import openai
import pytest

from tessera import llm
from tests.conftest import free_port
from tests.e2e.conftest import Stack, start_stack, stop_stack
from tests.e2e.test_gateway import eventually
from tests.e2e.test_limits import SETTLE_SECONDS

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.real,
    pytest.mark.skipif(
        not llm.available(), reason=f"no llama-server + Gemma 3 270M in {llm.cache_dir()}: run `make llm`"
    ),
]

MODEL = llm.MODEL_NAME
HI = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("real"), "--real-model")
    yield s
    stop_stack(s)


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()  # noqa: S310
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in {url}/metrics")


def test_chat_completions_and_embeddings_are_metered_as_llama_server_reported(real):
    client = real.client(real.demo_key)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=12)
    chat = raw.parse()
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None
    assert chat.usage.prompt_tokens > 5
    row = real.ledger_row(raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    assert (row["model"], row["usage_estimated"], row["status"]) == (MODEL, 0, 200)

    done = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=8)
    assert done.usage is not None
    assert done.usage.completion_tokens <= 8
    emb = client.embeddings.create(model=MODEL, input=["the sea", "the sky"])
    assert [len(e.embedding) for e in emb.data] == [640, 640]
    assert emb.usage.prompt_tokens > 0


def test_streams_with_and_without_usage_are_metered_exactly(real):
    client = real.client(real.demo_key)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(raw.parse())
    usage = chunks[-1].usage
    assert usage is not None
    assert chunks[-1].choices == []
    row = real.ledger_row(raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert row["streamed"] == 1

    # A client that did not ask gets no usage chunk; the ledger still has the real usage.
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, max_tokens=10, stream=True
    )
    chunks = list(raw.parse())
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices  # the last chunk the client sees is the model's own
    row = real.ledger_row(raw.headers["x-request-id"])
    assert row["usage_estimated"] == 0
    assert row["completion_tokens"] == usage.completion_tokens  # same prompt, same budget
    assert row["prompt_tokens"] == usage.prompt_tokens


def test_responses_and_messages_are_metered_as_llama_server_reported(real):
    """llama-server serves the Responses API and Anthropic's Messages API: JSON and streams, each
    billed at the usage its answer reported."""
    client = real.client(real.demo_key)
    raw = client.responses.with_raw_response.create(model=MODEL, input="The sea is", max_output_tokens=8)
    usage = raw.parse().usage
    assert usage is not None
    row = real.ledger_row(raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_estimated"]) == (
        usage.input_tokens,
        usage.output_tokens,
        0,
    )
    raw = client.responses.with_raw_response.create(
        model=MODEL, input="The sea is", max_output_tokens=8, stream=True
    )
    completed = [e for e in raw.parse() if e.type == "response.completed"]
    assert len(completed) == 1
    usage = completed[0].response.usage
    assert usage is not None
    row = real.ledger_row(raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.input_tokens, usage.output_tokens)

    claude = anthropic.Anthropic(base_url=real.gateway, api_key=real.demo_key, max_retries=0, timeout=60)
    raw_msg = claude.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=HI)  # type: ignore[arg-type]
    message = raw_msg.parse()
    row = real.ledger_row(raw_msg.headers["x-request-id"])
    cache_read = message.usage.cache_read_input_tokens or 0  # Anthropic counts it beside input_tokens
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_estimated"]) == (
        message.usage.input_tokens + cache_read,
        message.usage.output_tokens,
        0,
    )
    raw_msg = claude.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=HI, stream=True)  # type: ignore[arg-type]
    events = list(raw_msg.parse())
    (start,) = [e for e in events if e.type == "message_start"]
    deltas = [e for e in events if e.type == "message_delta"]
    row = real.ledger_row(raw_msg.headers["x-request-id"])
    assert row["completion_tokens"] == deltas[-1].usage.output_tokens
    started = start.message.usage
    assert row["prompt_tokens"] == started.input_tokens + (started.cache_read_input_tokens or 0)
    assert row["usage_estimated"] == 0


def test_a_token_limit_reserves_then_settles_real_counts(real):
    tenant = f"realtok{time.monotonic_ns()}"
    real.cli("tenants", "create", tenant)
    key = real.new_key(tenant)
    budget = 400
    real.cli(
        "limits",
        "create",
        "--tenant",
        tenant,
        "--kind",
        "tokens",
        "--window",
        "hour",
        "--limit",
        str(budget),
    )
    time.sleep(1.0)  # live everywhere within 1 s
    client = real.client(key)
    used, accepted, refused = 0, 0, None
    for _ in range(16):
        try:
            resp = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24)
        except openai.RateLimitError as exc:
            refused = exc
            break
        assert resp.usage is not None
        used += resp.usage.total_tokens
        accepted += 1
        time.sleep(SETTLE_SECONDS)  # its real usage replaces its reservation (off the request path)
    assert refused is not None, "never refused"
    assert refused.code == "rate_limit_exceeded"
    assert used <= budget + 10  # settled real usage never passes the limit (+ 20 s of an hourly refill)
    # Each request reserves its body's bytes (~110) + 24 completion tokens, about 135: without
    # settlement two fit; settling to the real counts (~20 prompt + at most 24) lets 5+ in.
    assert accepted >= 5, (accepted, used)


def test_a_request_without_max_tokens_generates_at_most_the_models_default(real):
    client = real.client(real.demo_key)
    answer = client.chat.completions.create(model=MODEL, messages=HI)  # no max_tokens
    assert answer.usage is not None
    assert answer.usage.completion_tokens <= llm.DEFAULT_MAX_TOKENS  # written into the body: 64
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=llm.MAX_MAX_TOKENS + 1)
    assert (err.value.code, err.value.param) == ("integer_above_max_value", "max_tokens")


def test_a_client_disconnect_cancels_the_generation(real):
    server = real.endpoints()["llama_server"]
    client = openai.OpenAI(base_url=f"{real.gateway}/v1", api_key=real.demo_key, max_retries=0, timeout=30)
    stream = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1000, stream=True)
    for n, _chunk in enumerate(stream):
        if n == 3:
            break
    assert _metric(server, "llamacpp:requests_processing") >= 0
    stream.close()  # the client leaves mid-generation
    eventually(lambda: _assert_zero(_metric(server, "llamacpp:requests_processing")), timeout=5, interval=0.2)


def _assert_zero(value: float) -> None:
    assert value == 0


def test_malformed_requests_get_openai_shaped_4xx_never_5xx(real):
    url = f"{real.gateway}/v1/chat/completions"
    headers = {"authorization": f"Bearer {real.demo_key}", "content-type": "application/json"}
    long_prompt = "sea " * 5000  # well over a slot's 2,048 tokens
    cases = {
        "invalid json": b'{"model": "gemma-3-270m", "messages": [',
        "messages not a list": json.dumps({"model": MODEL, "messages": "hi", "max_tokens": 4}).encode(),
        "no messages": json.dumps({"model": MODEL, "max_tokens": 4}).encode(),
        "wrong type": json.dumps(
            {"model": MODEL, "messages": HI, "max_tokens": 4, "temperature": "hot"}
        ).encode(),
        "over the context": json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 4}
        ).encode(),
    }
    for name, body in cases.items():
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        assert 400 <= status < 500, (name, status, raw[:300])
        error = json.loads(raw)["error"]
        assert error["message"], (name, error)


@pytest.mark.timeout(150)
def test_traffic_moves_off_a_busy_llama_server(real):
    model = f"gemma-pair-{time.monotonic_ns()}"
    busy_port, idle_port = real.endpoints()["llama_server"].rsplit(":", 1)[1], free_port()
    second = subprocess.Popen(
        llm.server_argv(llm.binary_path(), llm.model_path(), "127.0.0.1", idle_port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = threading.Event()
    try:
        idle = f"http://127.0.0.1:{idle_port}"
        eventually(lambda: urllib.request.urlopen(f"{idle}/health", timeout=1), timeout=30, interval=0.3)  # noqa: S310
        busy = f"http://127.0.0.1:{busy_port}"
        real.cli("models", "add", model, "--backend", busy, "--kind", "llamacpp")
        real.cli("models", "add-backend", model, "--backend", idle, "--kind", "llamacpp")
        client = real.client(real.demo_key)
        eventually(
            lambda: client.chat.completions.create(model=model, messages=HI, max_tokens=2),
            timeout=15,
            interval=0.5,
        )

        # Keep the first server busy beyond its 4 slots for the whole test, straight to it (not
        # through the gateway): its /metrics reports a queue (llamacpp:requests_deferred).
        def hog() -> None:
            # short generations: a queue that moves (a request sent to it is answered in seconds)
            body = json.dumps({"messages": HI, "max_tokens": 48}).encode()
            while not done.is_set():
                req = urllib.request.Request(  # noqa: S310
                    f"{busy}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
                )
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(req, timeout=120).read()  # noqa: S310

        for _ in range(8):
            threading.Thread(target=hog, daemon=True).start()
        eventually(lambda: _assert_deferred(busy), timeout=15, interval=0.2)
        time.sleep(4.5)  # two load scrapes (every 2 s): the busy one's weight drops

        ids: list[str] = []
        lock = threading.Lock()

        def ask() -> None:
            c = real.client(real.demo_key).with_options(timeout=60)
            raw = c.chat.completions.with_raw_response.create(model=model, messages=HI, max_tokens=1)
            with lock:
                ids.append(raw.headers["x-request-id"])

        for _ in range(3):  # in waves: each wave's requests are under way together
            wave = [threading.Thread(target=ask) for _ in range(6)]
            for t in wave:
                t.start()
            for t in wave:
                t.join()
        served = Counter(real.ledger_row(rid)["backend"] for rid in ids)
        assert sum(served.values()) == 18
        assert served[f"127.0.0.1:{idle_port}"] >= 2 * served[f"127.0.0.1:{busy_port}"], served
    finally:
        done.set()
        second.terminate()
        second.wait(10)


def _assert_deferred(url: str) -> None:
    assert _metric(url, "llamacpp:requests_deferred") >= 2
