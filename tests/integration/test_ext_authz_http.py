"""ext_authz over HTTP/1.1 (Envoy's ``http_service``): the real build_app with
``transport=http``, spoken to over a real socket exactly as Envoy speaks to it
(``<method> /authz<path>``, the allowed headers, no body, keep-alive), with a small in-test
policy server and, for limits, an in-process stand-in for the ratelimit service's side of
admission (the ``Admitter`` the ``Authorizer`` calls: ``admit``, ``force``, ``abandon``), whose
verdicts a test can hold back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
import structlog
import yaml
from envoy_data_plane.envoy.config.listener.v3 import Listener

from control_plane.app import ADMIN_DESCRIPTOR
from control_plane.state import State
from control_plane.xds.listener import listener as gateway_listener
from control_plane.xds.resources import LISTENER_TYPE, encode_all
from control_plane.xds.translate import GatewayConfig, resources_from_state
from ext_authz.app import build_app
from ext_authz.settings import ExtAuthzSettings
from tessera import gateway_headers as gh
from tessera.admission.v1 import admission_pb2
from tessera.bootstrap import BootstrapParams, render_bootstrap
from tessera.keys import digest, display_prefix, mint_key
from tessera.policy.v1 import policy_pb2, policy_pb2_grpc
from tessera.settings import (
    GrpcSettings,
    MetricsSettings,
    PepperSettings,
    PolicySettings,
)
from tests.conftest import envoy_identity

PEPPER = b"0123456789abcdef" * 4
KEY = mint_key().key
NEW_KEY = mint_key().key
LIMITED_KEY = mint_key().key  # tenant t2: a requests limit on model demo
ROOT = Path(__file__).resolve().parents[2]
ENVOY = str(Path(sys.executable).parent / "envoy")
REMOVED = ", ".join((*gh.CREDENTIALS, *gh.SET_BY_GATEWAY))


# --- the fake control plane and counters ------------------------------------------------------


class FakePolicyServer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self) -> None:
        self.queues: list[asyncio.Queue[policy_pb2.StreamPolicyResponse]] = []
        self.acks: list[str] = []
        self.subscribed = asyncio.Event()

    async def Stream(self, request_iterator, _context):  # noqa: N802 - gRPC method name
        queue: asyncio.Queue[policy_pb2.StreamPolicyResponse] = asyncio.Queue()

        async def read() -> None:
            async for req in request_iterator:
                if req.ack_version:
                    self.acks.append(req.ack_version)
                else:
                    self.queues.append(queue)
                    self.subscribed.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await queue.get()
        finally:
            reader.cancel()

    def push(self, msg: policy_pb2.StreamPolicyResponse) -> None:
        for queue in self.queues:
            queue.put_nowait(msg)


class FakeAdmitter:
    """What ``Authorizer`` needs of an ``Admitter``; every verdict arrives a loop tick later
    (as over a real stream), or when the test lets held ones go."""

    connected = True

    def __init__(self) -> None:
        self.verdict: admission_pb2.Verdict | None = admission_pb2.Verdict(allowed=True, reserved=True)
        self.holding = False
        self.held: list[asyncio.Future[admission_pb2.Verdict | None]] = []
        self.admitted: list[admission_pb2.Admission] = []
        self.received = asyncio.Event()
        self.forced: list[admission_pb2.Admission] = []
        self.abandoned: list[admission_pb2.Admission] = []

    def admit(self, admission: admission_pb2.Admission) -> asyncio.Future[admission_pb2.Verdict | None]:
        self.admitted.append(admission)
        self.received.set()
        future: asyncio.Future[admission_pb2.Verdict | None] = asyncio.get_running_loop().create_future()
        if self.holding:
            self.held.append(future)
        else:
            asyncio.get_running_loop().call_soon(future.set_result, self.verdict)
        return future

    def release_held(self) -> None:
        self.holding = False
        for future in self.held:
            if not future.done():  # as the real Admitter: a Check cancelled meanwhile cancelled it
                future.set_result(self.verdict)

    def force(self, admission: admission_pb2.Admission) -> None:
        self.forced.append(admission)

    def abandon(self, admission: admission_pb2.Admission) -> None:
        """Envoy gave up on the check: the admitter gives back whatever the admission takes."""
        self.abandoned.append(admission)


def api_key_res(key: str, *, secret_id: str, key_id: str, tenant: str = "t1", **kw):
    return policy_pb2.Resource(
        api_key=policy_pb2.ApiKey(
            id=secret_id,
            key_id=key_id,
            tenant_id=tenant,
            digest=digest(PEPPER, key),
            prefix=display_prefix(key),
            **kw,
        )
    )


def full_snapshot(version: str = "1") -> policy_pb2.StreamPolicyResponse:
    limit = policy_pb2.Limit(
        id="l1", tenant_id="t2", model="demo", kind=policy_pb2.Limit.REQUESTS, window_seconds=60, limit=10
    )
    return policy_pb2.StreamPolicyResponse(
        version=version,
        reset=True,
        complete=True,
        upserts=[
            api_key_res(KEY, secret_id="s1", key_id="k1"),
            api_key_res(NEW_KEY, secret_id="s9", key_id="k9", revoked=True),
            api_key_res(LIMITED_KEY, secret_id="s2", key_id="k2", tenant="t2"),
            policy_pb2.Resource(tenant=policy_pb2.Tenant(id="t1", name="acme")),
            policy_pb2.Resource(tenant=policy_pb2.Tenant(id="t2", name="limited", priority=7)),
            policy_pb2.Resource(model=policy_pb2.Model(name="demo", max_max_tokens=1000)),
            policy_pb2.Resource(model=policy_pb2.Model(name="secret", restricted=True)),
            policy_pb2.Resource(limit=limit),
        ],
    )


# --- a client that speaks like Envoy ----------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    header: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.header = dict(self.headers)

    @property
    def error(self) -> dict:
        return json.loads(self.body)["error"]


def envoy_request(
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
    *,
    method: str = "POST",
    model: str | None = "demo",
    prefix: str = "/authz",
) -> bytes:
    """What Envoy's http_service sends: the original method, path_prefix + path, no body."""
    lines = [
        f"{method} {prefix}{path} HTTP/1.1",
        "host: gateway.example",
        "content-length: 0",
        "x-envoy-internal: true",
        "x-envoy-expected-rq-timeout-ms: 500",
        "x-request-id: req-1",
    ]
    if model is not None:
        lines.append(f"{gh.MODEL}: {model}")
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def read(self, *, head_request: bool = False) -> Response:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *lines = raw.decode("latin-1").split("\r\n")[:-2]
        version, status, _reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = [(k.lower(), v) for k, _, v in (line.partition(": ") for line in lines)]
        length = int(dict(headers)["content-length"])
        body = b"" if head_request else await asyncio.wait_for(self.reader.readexactly(length), 5)
        return Response(int(status), headers, body)

    async def ask(self, raw: bytes) -> Response:
        await self.send(raw)
        return await self.read()

    async def closed(self) -> bool:
        """True when the server closed the connection (EOF)."""
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def ask(port: int, raw: bytes) -> Response:
    conn = await Conn.open(port)
    try:
        return await conn.ask(raw)
    finally:
        await conn.close()


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def pepper_file(tmp_path):
    path = tmp_path / "pepper"
    path.write_bytes(PEPPER)
    path.chmod(0o600)
    return path


@pytest.fixture
async def policy_server():
    fake = FakePolicyServer()
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(fake, server)
    fake.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.server = server
    yield fake
    await server.stop(0)


@pytest.fixture
def admission():
    return FakeAdmitter()


def make_settings(tmp_path, pepper_file, policy_port, **overrides) -> ExtAuthzSettings:
    values = {
        "transport": "http",
        "grpc": GrpcSettings(port=0, grace_seconds=0.5),
        "metrics": MetricsSettings(enabled=False),
        "policy": PolicySettings(url=f"127.0.0.1:{policy_port}", reconnect_max_seconds=0.2),
        "pepper": PepperSettings(file=pepper_file),
    }
    values.update(overrides)
    return ExtAuthzSettings(_secrets_dir=tmp_path, **values)


@pytest.fixture
async def app(tmp_path, pepper_file, policy_server, admission):
    app = await build_app(make_settings(tmp_path, pepper_file, policy_server.port))
    app.authorizer._admitter = admission  # the ratelimit service's side, in process
    yield app
    await app.stop()


async def healthz(port: int) -> int:
    return (await ask(port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")).status


async def wait_healthz(port: int, want: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (got := await healthz(port)) != want:
        assert time.monotonic() < deadline, f"/healthz stayed {got}"
        await asyncio.sleep(0.01)


@pytest.fixture
async def ready(app, policy_server):
    """The app after its first full snapshot."""
    await asyncio.wait_for(policy_server.subscribed.wait(), 5)
    policy_server.push(full_snapshot())
    await wait_healthz(app.port, 200)
    return app


@pytest.fixture
async def conn(ready):
    c = await Conn.open(ready.port)
    yield c
    await c.close()


async def wait_for_code(port: int, raw: bytes, want: str, within: float = 1.0) -> float:
    """Ask until the answer's code is ``want`` ("" = allowed); returns seconds taken."""
    start = time.monotonic()
    while True:
        resp = await ask(port, raw)
        code = "" if resp.status == 200 else resp.error["code"]
        if code == want:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"still {code or 'allowed'} after {within}s"
        await asyncio.sleep(0.005)


# --- readiness ------------------------------------------------------------------------------


async def test_not_serving_until_first_snapshot(app, policy_server):
    await asyncio.wait_for(policy_server.subscribed.wait(), 5)
    assert await healthz(app.port) == 503
    policy_server.push(full_snapshot("7"))
    await wait_healthz(app.port, 200)
    deadline = time.monotonic() + 2
    while "7" not in policy_server.acks:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_a_delta_before_any_snapshot_is_not_applied(app, policy_server):
    await asyncio.wait_for(policy_server.subscribed.wait(), 5)
    policy_server.push(
        policy_pb2.StreamPolicyResponse(version="9", complete=True, upserts=full_snapshot().upserts)
    )
    await asyncio.sleep(0.2)
    assert await healthz(app.port) == 503
    assert "9" not in policy_server.acks


# --- allow ------------------------------------------------------------------------------------


async def test_allow_sets_identity_and_strips_credentials(conn):
    for creds in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        resp = await conn.ask(envoy_request({**creds, "x-tenant-id": "spoofed"}))
        assert resp.status == 200
        assert resp.headers == [
            ("x-tenant-id", "t1"),
            ("x-key-id", "k1"),
            ("x-gateway-inference-fairness-id", "t1"),
            ("x-tessera-priority", "0"),
            ("x-envoy-auth-headers-to-remove", REMOVED),
            ("tenant_id", "t1"),
            ("key_id", "k1"),
            ("content-length", "0"),
        ]
        assert resp.body == b""
    removed = REMOVED.split(", ")
    assert removed[:2] == ["authorization", "x-api-key"]
    assert set(removed) == {*gh.CREDENTIALS, *gh.SET_BY_GATEWAY}


async def test_allow_without_model(conn):
    resp = await conn.ask(
        envoy_request({"authorization": f"bearer {KEY}"}, "/v1/models", method="GET", model=None)
    )
    assert resp.status == 200
    assert resp.header["x-key-id"] == "k1"


async def test_allow_with_admission_carries_reservation_and_limit_headers(conn, admission):
    admission.verdict = admission_pb2.Verdict(
        allowed=True,
        reserved=True,
        headers=[admission_pb2.Header(key="x-ratelimit-remaining-requests", value="9")],
    )
    resp = await conn.ask(envoy_request({"x-api-key": LIMITED_KEY, gh.MAX_TOKENS: "100"}))
    assert resp.status == 200
    assert resp.header["x-tenant-id"] == "t2"
    assert resp.header["x-tessera-priority"] == "7"
    assert resp.header["reserved"] == "1"
    assert resp.header["x-ratelimit-remaining-requests"] == "9"
    (admitted,) = admission.admitted
    assert (admitted.tenant_id, admitted.key_id, admitted.model) == ("t2", "k2", "demo")
    assert admitted.request_id == "req-1"
    assert admitted.max_completion_tokens == 100


async def test_the_path_prefix_is_stripped_before_deciding(conn, admission):
    """The decision sees the original path: embeddings reserve no completion tokens."""
    await conn.ask(envoy_request({"x-api-key": LIMITED_KEY}, "/v1/embeddings"))
    await conn.ask(envoy_request({"x-api-key": LIMITED_KEY}, "/v1/chat/completions"))
    assert [a.max_completion_tokens for a in admission.admitted] == [0, 1000]


async def test_head_request_answer_has_no_body(conn):
    await conn.send(envoy_request({}, method="HEAD"))
    resp = await conn.read(head_request=True)
    assert resp.status == 401
    assert int(resp.header["content-length"]) > 0
    # The connection is still in step: the next answer starts right after the head.
    assert (await conn.ask(envoy_request({"x-api-key": KEY}))).status == 200


# --- deny -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code", "message"),
    [
        ({}, "missing_api_key", None),
        ({"authorization": "Bearer sk-not-ours"}, "invalid_api_key", "Incorrect API key provided."),
        ({"x-api-key": mint_key().key}, "invalid_api_key", "Incorrect API key provided."),
        ({"x-api-key": NEW_KEY}, "api_key_revoked", "This API key has been revoked."),
    ],
)
async def test_unauthenticated_denials(conn, headers, code, message):
    resp = await conn.ask(envoy_request(headers))
    assert resp.status == 401
    assert resp.headers == [
        ("content-type", "application/json"),
        ("www-authenticate", "Bearer"),
        ("content-length", str(len(resp.body))),
    ]
    body = json.loads(resp.body)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    if message:
        assert body["error"]["message"] == message


async def test_model_not_found_denial(conn):
    resp = await conn.ask(envoy_request({"x-api-key": KEY}, model="secret"))
    assert resp.status == 404
    assert resp.header["content-type"] == "application/json"
    assert "www-authenticate" not in resp.header
    assert "tenant_id" not in resp.header  # only a 400 or 429 names its tenant, as over gRPC
    assert json.loads(resp.body) == {
        "error": {
            "message": "The model `secret` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
        }
    }


@pytest.mark.parametrize(
    ("facts", "code", "param"),
    [
        ({gh.MAX_TOKENS: "1001"}, "integer_above_max_value", "max_tokens"),
        ({gh.MAX_COMPLETION_TOKENS: '"ten"'}, "invalid_value", "max_completion_tokens"),
        ({gh.N: "0"}, "invalid_value", "n"),
        ({gh.BEST_OF: "129"}, "integer_above_max_value", "best_of"),
    ],
)
async def test_bad_params_are_400_with_param(conn, admission, facts, code, param):
    resp = await conn.ask(envoy_request({"x-api-key": LIMITED_KEY, **facts}))
    assert resp.status == 400
    assert resp.header["content-type"] == "application/json"
    error = resp.error
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert not admission.admitted  # refused before anything was counted
    # An authenticated caller's refusal: its usage line names the tenant (metadata headers).
    assert (resp.header["tenant_id"], resp.header["key_id"]) == ("t2", "k2")


async def test_rate_limited_is_429_with_retry_after(conn, admission):
    admission.verdict = admission_pb2.Verdict(
        allowed=False,
        code="rate_limit_exceeded",
        retry_after_seconds=7,
        headers=[admission_pb2.Header(key="x-ratelimit-remaining-requests", value="0")],
    )
    resp = await conn.ask(envoy_request({"x-api-key": LIMITED_KEY}))
    assert resp.status == 429
    assert resp.header["content-type"] == "application/json"
    assert resp.header["retry-after"] == "7"
    assert resp.header["x-ratelimit-remaining-requests"] == "0"
    assert "reserved" not in resp.header
    assert (resp.header["tenant_id"], resp.header["key_id"]) == ("t2", "k2")
    assert resp.error["code"] == "rate_limit_exceeded"
    assert resp.error["type"] == "rate_limit_error"


async def test_no_verdict_in_time_admits_fail_open_and_counts_it_later(conn, admission):
    admission.verdict = None  # the counters did not answer in time
    resp = await conn.ask(envoy_request({"x-api-key": LIMITED_KEY}))
    assert resp.status == 200
    assert resp.header["reserved"] == "1"
    assert [a.request_id for a in admission.forced] == ["req-1"]


async def test_denial_is_logged_with_prefix_only(conn):
    with structlog.testing.capture_logs() as logs:
        await conn.ask(envoy_request({"x-api-key": NEW_KEY, "x-request-id": "rid-42"}, model=None))
        await conn.ask(envoy_request({"x-api-key": KEY}))
    denied = [e for e in logs if e["event"] == "authz_denied"]
    assert denied == [
        {
            "event": "authz_denied",
            "log_level": "info",
            "code": "api_key_revoked",
            "key_prefix": display_prefix(NEW_KEY),
            "tenant_id": "t1",
            "request_id": "req-1,rid-42",  # repeated headers are joined, as in a CheckRequest
            "suppressed": 0,
        }
    ]
    assert NEW_KEY not in repr(logs)
    assert KEY not in repr(logs)


# --- the connection ---------------------------------------------------------------------------


async def test_keep_alive_many_requests_on_one_connection(conn, ready):
    for i in range(300):
        headers = {"x-api-key": KEY} if i % 3 else {"x-api-key": NEW_KEY}
        resp = await conn.ask(envoy_request(headers))
        assert resp.status == (200 if i % 3 else 401)
    assert len(ready.server.connections) == 1


async def test_pipelined_requests_are_answered_in_order(conn):
    # More than MAX_PIPELINE at once: the server stops reading for a while, and loses nothing.
    asks = [{"x-api-key": KEY}, {}, {"x-api-key": NEW_KEY}, {"x-api-key": KEY}, {"x-api-key": "nope"}] * 120
    await conn.send(b"".join(envoy_request(h) for h in asks))
    statuses = [(await conn.read()).status for _ in asks]
    assert statuses == [200, 401, 401, 200, 401] * 120
    assert (await conn.ask(envoy_request({"x-api-key": KEY}))).status == 200


async def test_pipelined_answers_wait_for_an_earlier_admission(conn, admission):
    admission.holding = True
    await conn.send(
        envoy_request({"x-api-key": LIMITED_KEY}) + envoy_request({}) + envoy_request({"x-api-key": KEY})
    )
    await asyncio.wait_for(admission.received.wait(), 5)
    await asyncio.sleep(0.1)  # the denial and the plain allow are decided, and must wait
    admission.release_held()
    first, second, third = [await conn.read() for _ in range(3)]
    assert (first.status, first.header["x-tenant-id"], first.header.get("reserved")) == (200, "t2", "1")
    assert second.status == 401
    assert (third.status, third.header["x-tenant-id"]) == (200, "t1")


async def test_disconnect_while_admission_pending_abandons_it(ready, admission):
    admission.holding = True
    conn = await Conn.open(ready.port)
    await conn.send(envoy_request({"x-api-key": LIMITED_KEY, "x-request-id": "gone-1"}, model="demo"))
    await asyncio.wait_for(admission.received.wait(), 5)
    await conn.close()  # Envoy gave up (its timeout, or the client left)
    deadline = time.monotonic() + 5
    while not admission.abandoned:
        assert time.monotonic() < deadline, "the decision was not cancelled"
        await asyncio.sleep(0.01)
    # The admitter gives back what it takes, whenever its verdict lands.
    (gone,) = admission.abandoned
    assert (gone.request_id, gone.tenant_id, gone.key_id) == ("req-1,gone-1", "t2", "k2")
    admission.release_held()
    await asyncio.sleep(0.05)
    # The server is unharmed.
    assert (await ask(ready.port, envoy_request({"x-api-key": KEY}))).status == 200


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /authz/v1/models HTTP/1.1\r\ncontent-length: nope\r\n\r\n",
        b"GET /authz/v1/models HTTP/1.1\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
)
async def test_a_malformed_request_does_not_kill_the_server(ready, garbage):
    conn = await Conn.open(ready.port)
    try:
        await conn.send(envoy_request({"x-api-key": KEY}) + garbage)
        assert (await conn.read()).status == 200  # what came before is answered
        resp = await conn.read()
        assert resp.status in {400, 431}
        assert resp.header["connection"] == "close"
        assert await conn.closed()
    finally:
        await conn.close()
    assert (await ask(ready.port, envoy_request({"x-api-key": KEY}))).status == 200


async def test_connection_close_is_honoured(ready):
    conn = await Conn.open(ready.port)
    try:
        resp = await conn.ask(envoy_request({"x-api-key": KEY, "connection": "close"}))
        assert resp.status == 200
        assert resp.header["connection"] == "close"
        assert await conn.closed()
    finally:
        await conn.close()


async def test_other_paths_are_404(conn):
    resp = await conn.ask(envoy_request({"x-api-key": KEY}, prefix=""))
    assert resp.status == 404
    assert resp.error["code"] == "not_found"
    assert (await conn.ask(envoy_request({"x-api-key": KEY}))).status == 200


async def test_stop_answers_health_503_and_closes_idle_connections(tmp_path, pepper_file, policy_server):
    app = await build_app(make_settings(tmp_path, pepper_file, policy_server.port))
    await asyncio.wait_for(policy_server.subscribed.wait(), 5)
    policy_server.push(full_snapshot())
    await wait_healthz(app.port, 200)
    conn = await Conn.open(app.port)
    try:
        assert (await conn.ask(envoy_request({"x-api-key": KEY}))).status == 200
        await app.stop()
        assert await conn.closed()
    finally:
        await conn.close()
    with pytest.raises(OSError):
        await Conn.open(app.port)


# --- policy updates ---------------------------------------------------------------------------


async def test_revocation_delta_refused_within_1s(ready, policy_server):
    raw = envoy_request({"x-api-key": KEY})
    assert (await ask(ready.port, raw)).status == 200
    policy_server.push(
        policy_pb2.StreamPolicyResponse(
            version="2", complete=True, upserts=[api_key_res(KEY, secret_id="s1", key_id="k1", revoked=True)]
        )
    )
    assert await wait_for_code(ready.port, raw, "api_key_revoked") < 1.0


async def test_key_added_by_delta_accepted_within_1s(ready, policy_server):
    added = mint_key().key
    raw = envoy_request({"authorization": f"Bearer {added}"})
    assert (await ask(ready.port, raw)).error["code"] == "invalid_api_key"
    policy_server.push(
        policy_pb2.StreamPolicyResponse(
            version="2", complete=True, upserts=[api_key_res(added, secret_id="s3", key_id="k3")]
        )
    )
    assert await wait_for_code(ready.port, raw, "") < 1.0
    assert (await ask(ready.port, raw)).header["x-key-id"] == "k3"


async def test_metrics_count_decisions(tmp_path, pepper_file, policy_server):
    settings = make_settings(tmp_path, pepper_file, policy_server.port, metrics=MetricsSettings(port=0))
    app = await build_app(settings)
    try:
        assert app.metrics_port > 0
        await asyncio.wait_for(policy_server.subscribed.wait(), 5)
        policy_server.push(full_snapshot())
        await wait_healthz(app.port, 200)
        assert (await ask(app.port, envoy_request({}))).status == 401
        url = f"http://127.0.0.1:{app.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            text = await resp.text()
        assert 'tessera_authz_decisions_total{result="missing_api_key"}' in text
    finally:
        await app.stop()


# --- the process ------------------------------------------------------------------------


def _env(pepper: Path, policy_port: int, port: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update(
        TESSERA_TRANSPORT="http",
        TESSERA_GRPC__PORT=str(port),
        TESSERA_METRICS__PORT="0",
        TESSERA_POLICY__URL=f"127.0.0.1:{policy_port}",
        TESSERA_PEPPER__FILE=str(pepper),
        TESSERA_LOG__FORMAT="json",
    )
    return env


async def _listening(proc) -> dict:
    async with asyncio.timeout(20):
        while True:
            line = await proc.stdout.readline()
            assert line, "process exited before listening"
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if event.get("event") == "ext_authz_listening":
                    return event


async def test_python_m_serves_http_and_stops_on_sigterm(pepper_file, policy_server):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ext_authz",
        cwd=ROOT,
        env=_env(pepper_file, policy_server.port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        listening = await _listening(proc)
        assert listening["transport"] == "http"
        await asyncio.wait_for(policy_server.subscribed.wait(), 5)
        policy_server.push(full_snapshot())
        await wait_healthz(listening["port"], 200)
        assert (await ask(listening["port"], envoy_request({"x-api-key": KEY}))).status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_workers_share_the_http_port(pepper_file, policy_server, tmp_path):
    from tests.conftest import free_port  # noqa: PLC0415

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ext_authz",
        "serve",
        "--workers",
        "2",
        cwd=ROOT,
        env=_env(pepper_file, policy_server.port, port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await _listening(proc)
        await _listening(proc)
        deadline = time.monotonic() + 10
        while len(policy_server.queues) < 2:
            assert time.monotonic() < deadline, "both workers subscribe"
            await asyncio.sleep(0.05)
        policy_server.push(full_snapshot())
        # Each connection lands on either worker: every one answers once it has the snapshot.
        await wait_healthz(port, 200)
        for _ in range(20):
            await wait_healthz(port, 200)
            assert (await ask(port, envoy_request({"x-api-key": KEY}))).status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- Envoy's side -------------------------------------------------------------------------------


def _ext_authz_filter(listener: dict) -> dict:
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (authz,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    return authz["typed_config"]


def _rendered_bootstrap(tmp_path: Path) -> dict:
    params = BootstrapParams(
        "n",
        str(tmp_path / "admin.sock"),
        "127.0.0.1",
        9902,
        "127.0.0.1",
        1,
        (("10.0.0.1", 2), ("10.0.0.2", 2)),
        *envoy_identity(tmp_path / "identity"),
    )
    return yaml.safe_load(render_bootstrap(params))


def test_the_listener_calls_ext_authz_over_http_with_the_bootstrap_cluster(tmp_path):
    cfg = GatewayConfig("127.0.0.1", 8080, "127.0.0.1", 9999, None, 1 << 20, authz_transport="http")
    listener = gateway_listener(cfg)
    authz = _ext_authz_filter(listener)
    assert "grpc_service" not in authz
    http = authz["http_service"]
    assert http["server_uri"]["timeout"] == "0.5s"
    assert http["path_prefix"] == "/authz"
    response = http["authorization_response"]
    assert response["allowed_upstream_headers"]["patterns"] == [
        {"exact": h}
        for h in ("x-tenant-id", "x-key-id", "x-gateway-inference-fairness-id", "x-tessera-priority")
    ]
    assert response["dynamic_metadata_from_headers"]["patterns"] == [
        {"exact": "tenant_id"},
        {"exact": "key_id"},
        {"exact": "reserved"},
    ]
    assert {"exact": "www-authenticate"} in response["allowed_client_headers"]["patterns"]
    assert {"prefix": "x-ratelimit-"} in response["allowed_client_headers_on_success"]["patterns"]
    assert (authz["failure_mode_allow"], authz["status_on_error"]) == (False, {"code": 503})
    # The same headers reach ext_authz as over gRPC.
    grpc_cfg = GatewayConfig("127.0.0.1", 8080, "127.0.0.1", 9999, None, 1 << 20)
    grpc_listener = gateway_listener(grpc_cfg)
    assert _ext_authz_filter(grpc_listener)["allowed_headers"] == authz["allowed_headers"]
    # The cluster it names is in the bootstrap: HTTP/1.1 to every ext_authz replica.
    clusters = {c["name"]: c for c in _rendered_bootstrap(tmp_path)["static_resources"]["clusters"]}
    http_cluster = clusters[http["server_uri"]["cluster"]]
    options = http_cluster["typed_extension_protocol_options"]
    (protocol,) = options.values()
    assert protocol["explicit_http_config"] == {"http_protocol_options": {}}
    grpc_cluster = clusters[_ext_authz_filter(grpc_listener)["grpc_service"]["envoy_grpc"]["cluster_name"]]
    assert http_cluster["load_assignment"]["endpoints"] == grpc_cluster["load_assignment"]["endpoints"]
    assert len(http_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2


def test_client_identity_headers_are_dropped_before_any_filter():
    cfg = GatewayConfig("127.0.0.1", 8080, "127.0.0.1", 9999, None, 1 << 20, authz_transport="http")
    listener = gateway_listener(cfg)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (early,) = hcm["early_header_mutation_extensions"]
    removed = {m["remove"] for m in early["typed_config"]["mutations"]}
    assert removed >= {"x-tenant-id", "x-key-id", "x-gateway-inference-fairness-id", "x-tessera-priority"}


@pytest.mark.envoy
def test_the_http_listener_passes_envoy_validation(tmp_path):
    cfg = GatewayConfig(
        "127.0.0.1",
        18080,
        "127.0.0.1",
        9999,
        str(tmp_path / "access.log"),
        16 << 20,
        admin_descriptor=ADMIN_DESCRIPTOR.read_bytes(),
        authz_transport="http",
    )
    (listener,) = encode_all(resources_from_state(State(models=()), cfg))[LISTENER_TYPE].values()
    boot = _rendered_bootstrap(tmp_path)
    boot["static_resources"]["listeners"] = [Listener.parse(listener.value).to_dict()]
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(boot))
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
