"""Admission as a hostile tenant and a crash would test it (ARCHITECTURE §2, §6, §7).

One Python callout per request: ext_authz admits by the ratelimit service's counters, the meter
settles real usage from Envoy's usage log. Each promise here is tried with the worst input a
client can choose (the cap, chunked bodies, escaped and duplicate keys) and with the services
killed mid-stream, on memory:// (the session stack) and redis:// (a stack of its own). The demo
upstream generates exactly the completion tokens its body allows, and counts a prompt's words.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import openai
import pytest

from tessera.admission.v1 import admission_pb2
from tessera.frames import frame
from tests.conftest import free_port
from tests.e2e.conftest import Stack, start_stack, stop_stack
from tests.e2e.test_gateway import eventually, http, upstream_requests
from tests.e2e.test_limits import DELAY, SETTLE_SECONDS, settled
from tests.e2e.test_routing import wait_routed
from tests.upstream import Upstream

pytestmark = pytest.mark.envoy

CAP = 1000  # the test model's --max-tokens
DEFAULT = 64  # ... and its --default-max-tokens


@pytest.fixture(scope="module")
def redis_stack(tmp_path_factory, redis_url) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("redis-stack"), "--redis", redis_url)
    yield s
    stop_stack(s)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def any_stack(request) -> Stack:
    return request.getfixturevalue("stack" if request.param == "memory" else "redis_stack")


def capped_model(stack: Stack, upstreams: list[Upstream]) -> tuple[str, Upstream]:
    """A model with a cap and a default of its own, on a demo upstream of its own."""
    model = f"capped{time.monotonic_ns()}"
    upstream = Upstream(model, model)
    upstreams.append(upstream)
    stack.cli("models", "add", model, "--backend", upstream.url)
    stack.cli("models", "update", model, "--default-max-tokens", str(DEFAULT), "--max-tokens", str(CAP))
    return model, upstream


def tenant(stack: Stack, *limits: list[str]) -> tuple[str, str]:
    """A new tenant with these limits; (tenant, key) once they are live everywhere."""
    name = f"adm{time.monotonic_ns()}"
    stack.cli("tenants", "create", name)
    key = stack.new_key(name)
    for args in limits:
        stack.cli("limits", "create", "--tenant", name, *args)
    time.sleep(1.0)
    return name, key


def post(stack: Stack, key: str, body: bytes | dict[str, Any], path: str = "/v1/chat/completions"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return http("POST", f"{stack.gateway}{path}", raw, headers)


def post_chunked(stack: Stack, key: str, raw: bytes, piece: int = 4096) -> tuple[int, bytes]:
    """The body in chunks, with no Content-Length (Transfer-Encoding: chunked)."""
    conn = HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=(raw[i : i + piece] for i in range(0, len(raw), piece)),
            headers=headers,
            encode_chunked=True,
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def ledger_tokens(stack: Stack, name: str) -> int:
    rows = stack.cli_json("usage", "--tenant", name, "--group-by", "model")["rows"]
    return sum(int(r["total_tokens"]) for r in rows)


def wait_metered(stack: Stack, name: str, requests: int, timeout: float = 10.0) -> None:
    def all_in() -> None:
        rows = stack.cli_json("usage", "--tenant", name, "--group-by", "model")["rows"]
        assert sum(int(r["requests"]) for r in rows) >= requests

    eventually(all_in, timeout=timeout, interval=0.3)


def in_parallel(threads: int, work: Callable[[], None]) -> None:
    """``work`` on ``threads`` threads at once; returns once every one has ended."""
    running = [threading.Thread(target=work) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()


def post_from_threads(
    stack: Stack, key: str, body: dict[str, Any], threads: int, *, each: int = 1, seconds: float = 0.0
) -> list[int]:
    """The statuses of ``body`` posted by ``threads`` clients at once: ``each`` requests apiece,
    or as many as fit in ``seconds``."""
    codes: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        made = 0
        while time.monotonic() < deadline if seconds else made < each:
            status = post(stack, key, body)[0]
            made += 1
            with lock:
                codes.append(status)

    in_parallel(threads, client)
    return codes


def test_concurrent_requests_at_the_cap_overshoot_a_token_budget_by_at_most_one_request(any_stack, upstreams):
    stack = any_stack
    model, upstream = capped_model(stack, upstreams)
    budget = 20_000
    name, key = tenant(stack, ["--kind", "tokens", "--window", "hour", "--limit", str(budget)])
    wait_routed(stack.client(key), model)
    settled()
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": CAP}
    one_request_max = len(json.dumps(body)) + CAP  # what one admission reserves at most
    codes = post_from_threads(stack, key, body, 40)
    assert set(codes) <= {200, 429}, codes
    admitted = codes.count(200)
    assert 0 < admitted <= budget // CAP + 1  # each uses the cap: settled, they add up to the budget
    # What the tenant could still hope to game: 1e13 is not "absent", escapes are decoded.
    assert post(stack, key, {**body, "max_tokens": 1e13})[0] == 400
    raw = json.dumps({"model": model, "messages": [{"role": "user", "content": "go"}]})
    escaped = raw.replace('"messages"', '"max_tok\\u0065ns": 5000, "messages"')  # max_tokens
    assert post(stack, key, escaped.encode())[0] == 400  # read decoded: above the cap
    wait_metered(stack, name, admitted + 1)  # the warm-up request too
    used = ledger_tokens(stack, name)
    assert used <= budget + one_request_max
    # The ledger agrees with what the upstream generated: CAP each, exactly.
    generated = [
        r["usage"]["completion_tokens"] for r in upstream.requests() if r["body"].get("max_tokens") == CAP
    ]
    assert generated.count(CAP) == admitted


def test_a_chunked_prompt_is_counted_by_the_bytes_received(any_stack):
    stack = any_stack
    name, key = tenant(stack, ["--kind", "tokens", "--window", "hour", "--limit", "5000"])
    words = " ".join(["tok"] * 20_000)  # 20,000 prompt tokens for the demo upstream
    raw = json.dumps({"model": "demo", "messages": [{"role": "user", "content": words}], "max_tokens": 1})
    status, answer = post_chunked(stack, key, raw.encode())
    assert status == 429, answer
    assert json.loads(answer)["error"]["code"] == "rate_limit_exceeded"
    assert post(stack, key, raw.encode())[0] == 429  # with a Content-Length, the same
    small = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert post_chunked(stack, key, small.encode(), piece=7)[0] == 200  # chunking itself is fine
    wait_metered(stack, name, 3)
    assert ledger_tokens(stack, name) <= 5000


def test_the_backend_receives_the_models_default_and_a_request_above_the_cap_is_refused(stack, upstreams):
    model, upstream = capped_model(stack, upstreams)
    _, key = tenant(stack)
    wait_routed(stack.client(key), model)
    client = stack.client(key)
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert answer.usage.completion_tokens == DEFAULT
    assert upstream.requests()[-1]["body"]["max_tokens"] == DEFAULT  # written into the body
    # null is "absent"; max_completion_tokens alone also bounds the backend's max_tokens
    assert post(stack, key, {"model": model, "messages": [], "max_tokens": None})[0] in {200, 400}
    assert upstream.requests()[-1]["body"]["max_tokens"] == DEFAULT
    status, _, _ = post(
        stack,
        key,
        {"model": model, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 7},
    )
    assert status == 200
    assert upstream.requests()[-1]["body"]["max_tokens"] == 7
    for param, value, code in (
        ("max_tokens", CAP + 1, "integer_above_max_value"),
        ("max_completion_tokens", 10**6, "integer_above_max_value"),
        ("max_tokens", "10", "invalid_value"),
        ("max_tokens", 0, "invalid_value"),
        ("max_tokens", 2.5, "invalid_value"),
        ("n", 0, "invalid_value"),
        ("n", 1000, "integer_above_max_value"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}], **{param: value}
            )
        assert (err.value.code, err.value.param) == (code, param)
    status, _, raw = post(
        stack, key, b'{"model": "%s", "max_tokens": 5, "max_tokens": 9999}' % model.encode()
    )
    assert status == 400
    assert json.loads(raw)["error"]["code"] == "duplicate_key"


def test_an_escaped_stream_key_is_still_metered_exactly(stack):
    name, key = tenant(stack, ["--kind", "tokens", "--window", "day", "--limit", "100000"])
    raw = b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, '
    raw += b'"stre\\u0061m": true}'
    status, headers, body = post(stack, key, raw)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert upstream_requests(stack)[-1]["body"]["stream_options"] == {"include_usage": True}
    assert b'"usage": {' not in body  # the client did not ask
    assert b'"usage":{' not in body
    wait_metered(stack, name, 1)
    rows = stack.cli_json("usage", "--tenant", name, "--group-by", "model")["rows"]
    assert int(rows[0]["completion_tokens"]) == 4  # exact: not an estimate


def _streams(stack: Stack, key: str, n: int, delay_ms: int, tokens: int) -> tuple[list[int], list[Any]]:
    """Open ``n`` slow streams at once; (statuses, the open responses of those admitted)."""
    statuses: list[int] = []
    held: list[Any] = []
    lock = threading.Lock()
    client = stack.client(key)

    def one() -> None:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="demo",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=tokens,
                stream=True,
                extra_headers={DELAY: str(delay_ms)},
            )
            it = iter(raw.parse())
            next(it)
            with lock:
                statuses.append(200)
                held.append(it)
        except openai.RateLimitError:
            with lock:
                statuses.append(429)

    in_parallel(n, one)
    return statuses, held


def _finish(held: list[Any]) -> None:
    for it in held:
        for _ in it:
            pass


def _kill(stack: Stack, child: str) -> None:
    pid = stack.endpoints()["pids"][child]
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: stack.endpoints()["pids"][child] != pid or 1 / 0, timeout=10)


@pytest.mark.redis
def test_concurrency_slots_come_back_after_ratelimit_and_ext_authz_are_killed_mid_stream(redis_stack):
    stack = redis_stack
    k = 3
    _, key = tenant(stack, ["--kind", "concurrency", "--limit", str(k)])
    for child in ("ratelimit", "ext-authz"):
        statuses, held = _streams(stack, key, k + 10, delay_ms=200, tokens=10)
        assert statuses.count(200) == k, statuses  # at most K in flight
        _kill(stack, child)  # the supervisor starts it again; the streams go on
        _finish(held)
        recovered = time.monotonic()

        def k_slots_again() -> None:
            again, more = _streams(stack, key, k, delay_ms=1, tokens=1)
            _finish(more)
            assert again.count(200) == k, again

        eventually(k_slots_again, timeout=5.0, interval=0.5)
        assert time.monotonic() - recovered < 5.0 + 2.0
        settled()


def _redis_server(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    eventually(
        lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, check=True),
        timeout=10,
    )
    return proc


def test_the_admission_stream_answers_no_one_but_ext_authz(stack: Stack) -> None:
    """An anonymous client on ratelimit's admission port (mutual TLS under ``tessera up``)
    gets no verdict and cannot spend a tenant's requests."""
    name = f"adm{time.monotonic_ns()}"
    stack.cli("tenants", "create", name)
    tenant_id = stack.cli_json("tenants", "get", name)["tenant"]["id"]
    key = stack.new_key(name)
    limit = ["--kind", "requests", "--window", "minute", "--limit", "2"]
    stack.cli("limits", "create", "--tenant", name, *limit)
    time.sleep(1.0)
    admit = admission_pb2.AdmitBatch(batch=1)
    for i in range(10):
        admit.admissions.add(request_id=f"spent-{i}", tenant_id=tenant_id, key_id="k", model="demo")
    host, port = stack.endpoints()["ratelimit_admission_stream"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(frame(admit.SerializeToString()))
        sock.settimeout(2)
        try:
            answer = sock.recv(65536)
        except (TimeoutError, ConnectionError):
            answer = b""
    assert answer == b""  # not a verdict: the TLS handshake never happened
    body = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    codes = [post(stack, key, body)[0] for _ in range(3)]
    assert codes == [200, 200, 429]  # the tenant's two requests of the minute were still its own


class PrivateRedis:
    """A redis-server of the test's own, which it can SIGKILL and start again on its port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc = _redis_server(self.port, workdir)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # gone, with every count
        self.proc.wait()

    def restart(self) -> None:
        self.proc = _redis_server(self.port, self.workdir)


@contextlib.contextmanager
def redis_stack_with_limit(tmp_path: Path, per_minute: int) -> Iterator[tuple[Stack, PrivateRedis, str]]:
    """A stack counting in a private Redis, and a key whose tenant may make ``per_minute``."""
    redis = PrivateRedis(tmp_path)
    stack = start_stack(tmp_path / "stack", "--redis", f"redis://127.0.0.1:{redis.port}/0")
    try:
        _, key = tenant(stack, ["--kind", "requests", "--window", "minute", "--limit", str(per_minute)])
        yield stack, redis, key
    finally:
        stop_stack(stack)
        redis.proc.kill()
        redis.proc.wait()


ONE_TOKEN = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}


@pytest.mark.redis
def test_after_a_redis_restart_under_load_a_request_limit_is_exact_again_at_once(tmp_path):
    with redis_stack_with_limit(tmp_path, 20) as (stack, redis, key):
        stop = threading.Event()

        def load() -> None:  # other tenants' traffic keeps the pooled connections busy
            other = stack.demo_key
            while not stop.is_set():
                post(stack, other, ONE_TOKEN)

        loaders = [threading.Thread(target=load) for _ in range(4)]
        for t in loaders:
            t.start()
        try:
            codes = [post(stack, key, ONE_TOKEN)[0] for _ in range(25)]
            assert (codes.count(200), codes.count(429)) == (20, 5)
            redis.kill()
            redis.restart()
            codes = [post(stack, key, ONE_TOKEN)[0] for _ in range(25)]
            # a fresh window (the counts died with Redis), exact from the first request on: no
            # pooled connection's failure let the fail mode decide instead of the counter
            assert (codes.count(200), codes.count(429)) == (20, 5), codes
        finally:
            stop.set()
            for t in loaders:
                t.join()


@pytest.mark.redis
def test_requests_admitted_fail_open_while_redis_is_down_are_counted_once_it_is_back(tmp_path):
    with redis_stack_with_limit(tmp_path, 20) as (stack, redis, key):
        redis.kill()
        # the limit fails open (its default): served while nothing can count them...
        assert [post(stack, key, ONE_TOKEN)[0] for _ in range(5)] == [200] * 5
        redis.restart()
        # ...and counted as soon as Redis answers again: 15 of the minute's 20 are left
        codes = [post(stack, key, ONE_TOKEN)[0] for _ in range(20)]
        assert (codes.count(200), codes.count(429)) == (15, 5), codes


def _pin_to_one_core(stack: Stack) -> None:
    """Every process of the stack (and every thread of each) on CPU 0."""
    pids = [stack.proc.pid, *stack.endpoints()["pids"].values()]
    for pid in pids:
        subprocess.run(["taskset", "-a", "-cp", "0", str(pid)], capture_output=True, check=True)


def test_under_overload_every_admitted_request_is_counted_and_settled(tmp_path):
    stack = start_stack(tmp_path / "stack")
    try:
        _pin_to_one_core(stack)
        budget = 10**9
        # the scenario (1e9 a minute), and a month budget that never refills, to read
        # back exactly what was counted
        name, key = tenant(
            stack,
            ["--kind", "tokens", "--window", "minute", "--limit", str(budget)],
            ["--kind", "tokens", "--window", "month", "--limit", str(budget)],
        )
        body = {"model": "demo", "messages": [{"role": "user", "content": "x y z"}], "max_tokens": 3}
        codes = post_from_threads(stack, key, body, 64, seconds=8.0)
        answered = codes.count(200)
        assert answered > 0
        assert set(codes) <= {200, 429, 503}, set(codes)
        wait_metered(stack, name, answered, timeout=30)
        time.sleep(SETTLE_SECONDS + 1)
        used = ledger_tokens(stack, name)  # what the answered requests really used
        status, headers, _ = post(stack, key, body)
        assert status == 200
        probe_reservation = len(json.dumps(body)) + 3
        counted = budget - int(headers["x-ratelimit-remaining-tokens"]) - probe_reservation
        # every request answered 200 is in the counters at its real usage, and nothing else
        # is: none slipped through uncounted, none holds a reservation never settled
        assert counted == used, (counted, used, answered)
    finally:
        stop_stack(stack)


@pytest.mark.redis
def test_admissions_that_land_after_their_settlement_still_end_at_the_real_usage(tmp_path, redis_url):
    """An admission timeout (0.2 ms) below the stream's round trip: every request is admitted
    fail-open, the stream is cut after three unanswered batches and reconnects, and the meter's
    settlements often reach the service before the admissions sent again. Each request must
    still end counted once, at its real usage, not held until its lease ends. Read back on the
    same data dir and Redis, restarted with the default timeout."""
    root = tmp_path / "stack"
    stack = start_stack(
        root, "--redis", redis_url, env_extra={"TESSERA_ADMISSION__TIMEOUT_SECONDS": "0.0002"}
    )
    try:
        budget = 10**9
        name, key = tenant(stack, ["--kind", "tokens", "--window", "month", "--limit", str(budget)])
        body = {"model": "demo", "messages": [{"role": "user", "content": "x y z"}], "max_tokens": 3}
        codes = post_from_threads(stack, key, body, 8, each=40)
        assert codes == [200] * len(codes)
        wait_metered(stack, name, len(codes), timeout=30)
        time.sleep(SETTLE_SECONDS + 1)
        used = ledger_tokens(stack, name)
    finally:
        stop_stack(stack)
    stack = start_stack(root, "--redis", redis_url)
    try:
        status, headers, _ = post(stack, key, body)
        assert status == 200
        counted = budget - int(headers["x-ratelimit-remaining-tokens"]) - (len(json.dumps(body)) + 3)
        assert counted == used, (counted, used)
    finally:
        stop_stack(stack)
