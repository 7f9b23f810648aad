"""Through real Envoy with the official openai client: what a gateway user depends on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.envoy


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def upstream_requests(stack) -> list[dict[str, Any]]:
    url = stack.endpoints()["demo_upstream"] + "/debug/requests"
    return json.loads(urllib.request.urlopen(url, timeout=5).read())["requests"]  # noqa: S310


def eventually(fn, timeout: float = 1.0, interval: float = 0.05):
    """Call fn until it stops raising, within ``timeout`` seconds; re-raise the last error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


def test_chat_completion(stack):
    resp = stack.client(stack.demo_key).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello there gateway"}], max_tokens=7
    )
    assert resp.choices[0].message.content.split() == [f"tok{i}" for i in range(7)]
    assert resp.usage.completion_tokens == 7
    assert resp.usage.prompt_tokens > 3


def test_streaming_chat_without_usage_request_has_no_usage_chunk(stack):
    chunks = list(
        stack.client(stack.demo_key).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "stream me"}], max_tokens=5, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == [f"tok{i}" for i in range(5)]
    assert all(c.usage is None for c in chunks)


def test_streaming_chat_with_include_usage(stack):
    chunks = list(
        stack.client(stack.demo_key).chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "stream me please"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4


def test_completions(stack):
    resp = stack.client(stack.demo_key).completions.create(model="demo", prompt="one two three", max_tokens=3)
    assert resp.choices[0].text.split() == ["tok0", "tok1", "tok2"]
    assert resp.usage.prompt_tokens == 3


def test_embeddings(stack):
    resp = stack.client(stack.demo_key).embeddings.create(model="demo", input=["a b", "c"], dimensions=8)
    assert [len(d.embedding) for d in resp.data] == [8, 8]
    assert resp.data[0].embedding != resp.data[1].embedding


def test_models_list_comes_from_the_registry(stack):
    models = stack.client(stack.demo_key).models.list()
    registry = stack.cli_json("models", "list")["items"]
    # The demo tenant may use every public model with a backend (other tests add some).
    public = {
        n
        for m in registry
        if m["visibility"] == "public" and m.get("backends")
        for n in (m["name"], *m.get("aliases", []))
    }
    assert "demo" in public
    assert {m.id for m in models.data} == public
    assert all(m.owned_by == "tessera" for m in models.data)


def test_bad_key_is_authentication_error(stack):
    with pytest.raises(openai.AuthenticationError) as err:
        stack.client("tsk_aaaaaaaaaaaa_" + "x" * 43).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as err:
        stack.client("not-even-a-tessera-key").models.list()
    assert err.value.code == "invalid_api_key"


def test_no_key_is_401_missing_api_key(stack):
    status, headers, body = http(
        "POST",
        f"{stack.gateway}/v1/chat/completions",
        json.dumps({"model": "demo", "messages": []}).encode(),
        {"content-type": "application/json"},
    )
    assert status == 401
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "missing_api_key"


def test_missing_model_and_invalid_json_are_400(stack):
    with pytest.raises(openai.BadRequestError) as err:
        stack.client(stack.demo_key).chat.completions.create(
            model=openai.omit, messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.code == "missing_model"
    auth = {"authorization": f"Bearer {stack.demo_key}", "content-type": "application/json"}
    status, _, body = http("POST", f"{stack.gateway}/v1/chat/completions", b"{not json", auth)
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_json"


def test_unknown_model_is_404_model_not_found(stack):
    with pytest.raises(openai.NotFoundError) as err:
        stack.client(stack.demo_key).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.code == "model_not_found"
    assert "no-such-model" in err.value.message


def test_identity_headers_are_ours_and_credentials_never_reach_the_upstream(stack):
    client = openai.OpenAI(
        base_url=f"{stack.gateway}/v1",
        api_key=stack.demo_key,
        max_retries=0,
        default_headers={
            "x-tenant-id": "evil",
            "x-key-id": "evil",
            "x-api-key": stack.demo_key,
            "x-gateway-inference-fairness-id": "evil",
            "x-tessera-priority": "999",
        },
    )
    marker = f"marker-{time.monotonic_ns()}"
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": marker}], max_tokens=1)
    demo_tenant = stack.cli_json("tenants", "get", "demo")["tenant"]["id"]
    (seen,) = [r for r in upstream_requests(stack) if marker in json.dumps(r)] or [
        upstream_requests(stack)[-1]
    ]
    headers = seen["headers"]
    assert headers["x-tenant-id"] == demo_tenant
    assert headers["x-gateway-inference-fairness-id"] == demo_tenant  # scheduler fairness by tenant
    assert headers["x-tessera-priority"] == "0"  # the demo tenant has no plan
    assert headers["x-key-id"] != "evil"
    assert "authorization" not in headers
    assert "x-api-key" not in headers
    assert stack.demo_key not in json.dumps(headers)


def test_envoy_mints_request_ids(stack):
    client = openai.OpenAI(
        base_url=f"{stack.gateway}/v1",
        api_key=stack.demo_key,
        max_retries=0,
        default_headers={"x-request-id": "client-chosen-id"},
    )
    for _ in range(2):
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "id?"}], max_tokens=1
        )
    ids = [r["headers"]["x-request-id"] for r in upstream_requests(stack)[-2:]]
    assert len(set(ids)) == 2
    assert "client-chosen-id" not in ids


def test_over_the_limit_is_rate_limit_error(stack):
    tenant = f"rl{time.monotonic_ns()}"
    stack.cli("tenants", "create", tenant)
    key = stack.new_key(tenant)
    stack.cli(
        "limits", "create", "--tenant", tenant, "--kind", "requests", "--window", "minute", "--limit", "2"
    )
    client = stack.client(key)

    def call():
        return client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )

    time.sleep(1.0)  # key and limit are live everywhere within 1 s
    call()
    call()  # two per minute are allowed
    with pytest.raises(openai.RateLimitError) as err:
        call()
    assert err.value.code == "rate_limit_exceeded"
    assert int(err.value.response.headers["retry-after"]) >= 1
    # Another tenant is unaffected.
    stack.client(stack.demo_key).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )


def test_new_key_works_within_a_second(stack):
    tenant = f"fresh{time.monotonic_ns()}"
    stack.cli("tenants", "create", tenant)
    created_at = time.monotonic()
    key = stack.new_key(tenant)
    eventually(stack.client(key).models.list, timeout=1.0)
    assert time.monotonic() - created_at < 1.0 + 0.5  # CLI round trip included


def test_model_added_later_serves_within_a_second_and_unregistered_models_stay_hidden(stack, tmp_path):
    port = free_port()
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tessera.demo_upstream",
            "--port",
            str(port),
            "--model",
            "alpha",
            "--model",
            "beta",
            "--name",
            "second-upstream",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        eventually(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1), timeout=15)
        client = stack.client(stack.demo_key)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}])
        stack.cli("models", "add", "alpha", "--backend", f"http://127.0.0.1:{port}")
        added = time.monotonic()
        resp = eventually(
            lambda: client.chat.completions.create(
                model="alpha", messages=[{"role": "user", "content": "x"}]
            ),
            timeout=1.0,
        )
        assert time.monotonic() - added <= 1.0 + 0.3
        assert resp.model == "alpha"
        listed = [m.id for m in client.models.list().data]
        assert "alpha" in listed
        assert "beta" not in listed  # served by the upstream, absent from the registry
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}])
    finally:
        upstream.terminate()
        upstream.wait(10)


def test_every_process_serves_prometheus_metrics(stack):
    for name, url in stack.endpoints()["metrics"].items():
        status, _, body = http("GET", url)
        assert status == 200, name
        assert b"# TYPE" in body, name
