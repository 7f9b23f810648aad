"""ext_authz end to end over gRPC: the real build_app, a real xds-protos Authorization
stub, and a small in-test policy server speaking tessera.policy.v1 over a real socket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_authz.app import SERVICE_NAME, build_app
from ext_authz.settings import ExtAuthzSettings
from tessera.admission.v1 import admission_pb2
from tessera.errors import ConfigError
from tessera.frames import Frames, frame
from tessera.keys import digest, display_prefix, mint_key
from tessera.policy.v1 import policy_pb2, policy_pb2_grpc
from tessera.settings import (
    AdmissionSettings,
    GrpcSettings,
    MetricsSettings,
    PepperSettings,
    PolicySettings,
)

PEPPER = b"0123456789abcdef" * 4
KEY = mint_key().key
NEW_KEY = mint_key().key
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ROOT = Path(__file__).resolve().parents[2]


# --- the fake control plane ---------------------------------------------------------------


class FakePolicyServer(policy_pb2_grpc.PolicyServiceServicer):
    """Hands every subscriber what the test pushes; records subscriptions and acks."""

    def __init__(self) -> None:
        self.queues: list[asyncio.Queue[policy_pb2.StreamPolicyResponse]] = []
        self.hellos: list[policy_pb2.StreamPolicyRequest] = []
        self.acks: list[str] = []
        self.subscribed = asyncio.Event()

    async def Stream(self, request_iterator, _context):  # noqa: N802 - gRPC method name
        queue: asyncio.Queue[policy_pb2.StreamPolicyResponse] = asyncio.Queue()

        async def read() -> None:
            async for req in request_iterator:
                if req.ack_version:
                    self.acks.append(req.ack_version)
                else:
                    self.hellos.append(req)
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
    return policy_pb2.StreamPolicyResponse(
        version=version,
        reset=True,
        complete=True,
        upserts=[
            api_key_res(KEY, secret_id="s1", key_id="k1"),
            api_key_res(NEW_KEY, secret_id="s9", key_id="k9", revoked=True),
            policy_pb2.Resource(tenant=policy_pb2.Tenant(id="t1", name="acme")),
            policy_pb2.Resource(model=policy_pb2.Model(name="demo")),
            policy_pb2.Resource(model=policy_pb2.Model(name="secret", restricted=True)),
            # completion tokens: written into bodies naming none (50), at most 100 a request
            policy_pb2.Resource(
                model=policy_pb2.Model(name="capped", default_max_tokens=50, max_max_tokens=100)
            ),
        ],
    )


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
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.port = port
    fake.server = server
    yield fake
    await server.stop(0)


def make_settings(tmp_path, pepper_file, policy_port, **overrides) -> ExtAuthzSettings:
    values = {
        "grpc": GrpcSettings(port=0, grace_seconds=0.1),
        "metrics": MetricsSettings(enabled=False),
        "policy": PolicySettings(url=f"127.0.0.1:{policy_port}", reconnect_max_seconds=0.2),
        "pepper": PepperSettings(file=pepper_file),
    }
    values.update(overrides)
    # A secrets dir that exists: the kernel's default one warns when absent.
    return ExtAuthzSettings(_secrets_dir=tmp_path, **values)


@pytest.fixture(params=["aio", "sync"])
async def app(request, tmp_path, pepper_file, policy_server):
    """Each test on both gRPC server modes: grpc.aio, and grpcio's sync server (threads)."""
    app = await build_app(make_settings(tmp_path, pepper_file, policy_server.port, grpc_server=request.param))
    yield app
    await app.stop()


@pytest.fixture
async def channel(app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        yield ch


@pytest.fixture
def authz(channel):
    return external_auth_pb2_grpc.AuthorizationStub(channel)


@pytest.fixture
async def ready(app, channel, policy_server):
    """The app after its first full snapshot."""
    await asyncio.wait_for(policy_server.subscribed.wait(), 5)
    policy_server.push(full_snapshot())
    await wait_health(channel, SERVING)
    return app


# --- helpers ------------------------------------------------------------------------------


async def health(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return resp.status


async def wait_health(channel, want: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (got := await health(channel)) != want:
        assert time.monotonic() < deadline, f"health stayed {got}"
        await asyncio.sleep(0.01)


def check_request(headers: dict[str, str], model: str | None = None, path: str = "/v1/chat/completions"):
    """A CheckRequest as Envoy sends it: everything ext_authz reads is a request header; the
    served model is ``x-tessera-model``, which the gateway's Lua filter sets from the route."""
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = "POST"
    http.path = path
    http.headers.update({"x-request-id": "req-1", **headers})
    if model is not None:
        http.headers["x-tessera-model"] = model
    return req


def jwt_payload(claims: dict) -> str:
    """What Envoy's jwt_authn forwards (forward_payload_header): the verified payload, base64url."""
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()


def headers_of(options) -> dict[str, tuple[str, int]]:
    return {o.header.key: (o.header.value, o.append_action) for o in options}


def error_of(resp) -> dict:
    return json.loads(resp.denied_response.body)["error"]


async def wait_for_code(authz, req, want: str, within: float = 1.0) -> float:
    """Poll Check until the answer's code is ``want`` ("" = allowed); returns seconds taken."""
    start = time.monotonic()
    while True:
        resp = await authz.Check(req)
        code = "" if resp.status.code == 0 else error_of(resp)["code"]
        if code == want:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"still {code or 'allowed'} after {within}s"
        await asyncio.sleep(0.005)


# --- tests --------------------------------------------------------------------------------


async def test_not_serving_until_first_snapshot(app, channel, authz, policy_server):
    await asyncio.wait_for(policy_server.subscribed.wait(), 5)
    assert policy_server.hellos[0].service == "ext_authz"
    assert await health(channel) == NOT_SERVING
    assert await health(channel, SERVICE_NAME) == NOT_SERVING
    # Envoy does not ask health before a Check: one that comes now is our outage (503, retry),
    # never a 401 that would tell the client its valid key is bad
    early = await authz.Check(check_request({"authorization": f"Bearer {KEY}"}, "demo"))
    assert early.denied_response.status.code == 503
    assert json.loads(early.denied_response.body)["error"]["code"] == "service_unavailable"
    policy_server.push(full_snapshot("7"))
    await wait_health(channel, SERVING)
    assert await health(channel, SERVICE_NAME) == SERVING
    deadline = time.monotonic() + 2
    while "7" not in policy_server.acks:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


GATEWAY_HEADERS = [
    "x-tessera-model",
    "x-tessera-body-bytes",
    "x-tessera-max-tokens",
    "x-tessera-max-completion-tokens",
    "x-tessera-max-output-tokens",
    "x-tessera-n-predict",
    "x-tessera-n",
    "x-tessera-best-of",
    "x-tessera-prompts",
    "x-tessera-jwt-payload",
    "x-tessera-node",
]


async def test_allow_sets_identity_and_strips_credentials(ready, authz):
    for creds in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        resp = await authz.Check(check_request({**creds, "x-tenant-id": "spoofed"}, model="demo"))
        assert resp.status.code == 0
        assert resp.WhichOneof("http_response") == "ok_response"
        ok = resp.ok_response
        assert headers_of(ok.headers) == {
            "x-tenant-id": ("t1", OVERWRITE),
            "x-key-id": ("k1", OVERWRITE),
            "x-gateway-inference-fairness-id": ("t1", OVERWRITE),
            "x-tessera-priority": ("0", OVERWRITE),
        }
        # The credentials and every header the gateway set for ext_authz never reach a backend.
        assert list(ok.headers_to_remove) == ["authorization", "x-api-key", *GATEWAY_HEADERS]
        assert dict(resp.dynamic_metadata) == {"tenant_id": "t1", "key_id": "k1"}


async def test_allow_without_model(ready, authz):
    resp = await authz.Check(check_request({"authorization": f"bearer {KEY}"}))
    assert resp.status.code == 0


@pytest.mark.parametrize(
    ("headers", "code", "message"),
    [
        ({}, "missing_api_key", None),
        ({"authorization": "Bearer sk-not-ours"}, "invalid_api_key", "Incorrect API key provided."),
        ({"x-api-key": mint_key().key}, "invalid_api_key", "Incorrect API key provided."),
        ({"x-api-key": NEW_KEY}, "api_key_revoked", "This API key has been revoked."),
    ],
)
async def test_unauthenticated_denials(ready, authz, headers, code, message):
    resp = await authz.Check(check_request(headers, model="demo"))
    assert resp.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert resp.WhichOneof("http_response") == "denied_response"
    denied = resp.denied_response
    assert denied.status.code == 401
    assert headers_of(denied.headers) == {
        "content-type": ("application/json", OVERWRITE),
        "www-authenticate": ("Bearer", OVERWRITE),
    }
    body = json.loads(denied.body)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    if message:
        assert body["error"]["message"] == message


async def test_model_not_found_denial(ready, authz):
    resp = await authz.Check(check_request({"x-api-key": KEY}, model="secret"))
    assert resp.status.code == grpc.StatusCode.NOT_FOUND.value[0]
    denied = resp.denied_response
    assert denied.status.code == 404
    assert headers_of(denied.headers) == {"content-type": ("application/json", OVERWRITE)}
    assert json.loads(denied.body) == {
        "error": {
            "message": "The model `secret` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
        }
    }


# --- what the request may cost: the facts the gateway read off its body --------------------


def assert_bad_param(resp, code: str, param: str) -> dict:
    assert resp.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert resp.WhichOneof("http_response") == "denied_response"
    denied = resp.denied_response
    assert denied.status.code == 400
    assert headers_of(denied.headers) == {"content-type": ("application/json", OVERWRITE)}
    error = error_of(resp)
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    return error


@pytest.mark.parametrize(
    ("header", "param"),
    [("x-tessera-max-tokens", "max_tokens"), ("x-tessera-max-completion-tokens", "max_completion_tokens")],
)
async def test_max_tokens_above_the_models_cap_is_refused_naming_the_param(ready, authz, header, param):
    # "capped" is registered with max_max_tokens=100: 100 is admitted, 101 is not.
    at_cap = await authz.Check(check_request({"x-api-key": KEY, header: "100"}, model="capped"))
    assert at_cap.status.code == 0
    above = await authz.Check(check_request({"x-api-key": KEY, header: "101"}, model="capped"))
    error = assert_bad_param(above, "integer_above_max_value", param)
    assert "100" in error["message"]  # the client is told the model's maximum
    # A model registered without a cap has the platform's (PLATFORM_MAX_TOKENS = 32768).
    platform = await authz.Check(check_request({"x-api-key": KEY, header: "32769"}, model="demo"))
    assert_bad_param(platform, "integer_above_max_value", param)
    at_platform_cap = await authz.Check(check_request({"x-api-key": KEY, header: "32768"}, model="demo"))
    assert at_platform_cap.status.code == 0


@pytest.mark.parametrize("raw", ['"10"', "true", "10.5", "[10]", "ten"])
async def test_a_max_tokens_that_is_not_an_integer_is_an_invalid_value(ready, authz, raw):
    # The header carries the body's JSON text as written: a string "10" is not the integer 10.
    resp = await authz.Check(check_request({"x-api-key": KEY, "x-tessera-max-tokens": raw}, model="capped"))
    assert_bad_param(resp, "invalid_value", "max_tokens")


async def test_integral_json_numbers_are_integers(ready, authz):
    for raw in ("10", "1e1", "10.0", "null"):  # null: as if absent
        req = check_request({"x-api-key": KEY, "x-tessera-max-tokens": raw}, model="capped")
        assert (await authz.Check(req)).status.code == 0, raw


@pytest.mark.parametrize(
    ("header", "value", "refusal"),
    [
        ("x-tessera-n", "0", ("invalid_value", "n")),
        ("x-tessera-n", "-1", ("invalid_value", "n")),
        ("x-tessera-n", "129", ("integer_above_max_value", "n")),  # at most 128 choices
        ("x-tessera-best-of", "0", ("invalid_value", "best_of")),
        ("x-tessera-max-tokens", "0", ("invalid_value", "max_tokens")),
    ],
)
async def test_choices_or_tokens_out_of_bounds_are_refused(ready, authz, header, value, refusal):
    resp = await authz.Check(check_request({"x-api-key": KEY, header: value}, model="demo"))
    assert_bad_param(resp, *refusal)


async def test_a_bad_param_is_checked_after_the_key(ready, authz):
    # An unauthenticated caller learns nothing about parameters: the key is refused first.
    resp = await authz.Check(check_request({"x-tessera-n": "0"}, model="demo"))
    assert error_of(resp)["code"] == "missing_api_key"


# --- a verified JWT, forwarded by jwt_authn as a header -----------------------------------


async def test_a_verified_jwt_payload_header_identifies_the_key(ready, authz):
    resp = await authz.Check(
        check_request({"x-tessera-jwt-payload": jwt_payload({"sub": "svc", "key_id": "k1"})}, model="demo")
    )
    assert resp.status.code == 0
    assert headers_of(resp.ok_response.headers)["x-key-id"] == ("k1", OVERWRITE)
    revoked = await authz.Check(
        check_request({"x-tessera-jwt-payload": jwt_payload({"key_id": "k9"})}, model="demo")
    )
    assert error_of(revoked)["code"] == "api_key_revoked"
    # A payload that is not base64url JSON, or has no key_id, identifies nobody.
    for bad in ("%%%not-base64%%%", jwt_payload({"sub": "svc"}), jwt_payload(["k1"])):
        resp = await authz.Check(check_request({"x-tessera-jwt-payload": bad}, model="demo"))
        assert error_of(resp)["code"] == "missing_api_key", bad


# --- admission by the ratelimit service's counters ----------------------------------------


class FakeAdmissionServer:
    """The ratelimit service's admission stream, faked: admits everything with a reservation and
    records every admission it was asked (frames of tessera.admission.v1, tessera/frames.py)."""

    def __init__(self) -> None:
        self.admissions: list[admission_pb2.Admission] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = Frames()
        while data := await reader.read(65536):
            for raw in frames.feed(data):
                batch = admission_pb2.AdmitBatch.FromString(raw)
                self.admissions.extend(batch.admissions)
                reply = admission_pb2.VerdictBatch(batch=batch.batch)
                for _ in batch.admissions:
                    verdict = reply.verdicts.add(allowed=True, reserved=True)
                    verdict.headers.add(key="x-ratelimit-remaining-requests", value="9")
                writer.write(frame(reply.SerializeToString()))
        writer.close()


@pytest.fixture
async def admission_server():
    fake = FakeAdmissionServer()
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    yield fake
    server.close()


@pytest.fixture
async def admitting(tmp_path, pepper_file, policy_server, admission_server):
    """ext_authz with an admission stream, and a limit on tenant t1 (so its requests count)."""
    admission = AdmissionSettings(
        url="127.0.0.1:9", stream_url=f"127.0.0.1:{admission_server.port}", timeout_seconds=5
    )
    app = await build_app(make_settings(tmp_path, pepper_file, policy_server.port, admission=admission))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            await asyncio.wait_for(policy_server.subscribed.wait(), 5)
            snapshot = full_snapshot()
            snapshot.upserts.append(
                policy_pb2.Resource(
                    limit=policy_pb2.Limit(
                        id="L1", tenant_id="t1", kind=policy_pb2.Limit.REQUESTS, limit=10, window_seconds=60
                    )
                )
            )
            policy_server.push(snapshot)
            await wait_health(ch, SERVING)
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            # Until the stream is open an admission is decided by fail mode (no verdict headers).
            warm_up = check_request({"x-api-key": KEY, "x-request-id": "warm-up"}, model="demo")
            deadline = time.monotonic() + 5
            while not (await stub.Check(warm_up)).ok_response.response_headers_to_add:
                assert time.monotonic() < deadline, "the admission stream never opened"
                await asyncio.sleep(0.02)
            yield stub
    finally:
        await app.stop()


async def test_a_request_without_a_model_is_allowed_without_admission(admitting, admission_server):
    no_model = await admitting.Check(check_request({"x-api-key": KEY, "x-request-id": "no-model"}))
    assert no_model.status.code == 0
    assert dict(no_model.dynamic_metadata) == {"tenant_id": "t1", "key_id": "k1"}  # nothing to settle
    assert not no_model.ok_response.response_headers_to_add
    assert list(no_model.ok_response.headers_to_remove) == ["authorization", "x-api-key", *GATEWAY_HEADERS]
    # The same caller with a model is admitted by the counters (after the one above: batches
    # leave in order, so an admission of the first would have been recorded by now).
    facts = {"x-tessera-body-bytes": "123", "x-tessera-max-tokens": "20", "x-tessera-n": "3"}
    with_model = await admitting.Check(
        check_request({"x-api-key": KEY, "x-request-id": "with-model", **facts}, model="demo")
    )
    assert with_model.status.code == 0
    assert with_model.dynamic_metadata["reserved"] == "1"  # the meter settles it when it ends
    assert headers_of(with_model.ok_response.response_headers_to_add) == {
        "x-ratelimit-remaining-requests": ("9", OVERWRITE)
    }
    asked = {a.request_id: a for a in admission_server.admissions}
    assert "no-model" not in asked
    admitted = asked["with-model"]
    assert (admitted.tenant_id, admitted.key_id, admitted.model) == ("t1", "k1", "demo")
    assert not admitted.forced
    # what it may cost: its body's size, and max_tokens x n = 20 x 3 = 60 completion tokens
    assert (admitted.body_bytes, admitted.max_completion_tokens) == (123, 60)


async def test_denial_is_logged_with_prefix_only(ready, authz):
    with structlog.testing.capture_logs() as logs:
        await authz.Check(check_request({"x-api-key": NEW_KEY, "x-request-id": "rid-42"}))
        await authz.Check(check_request({"x-api-key": KEY}))
    denied = [e for e in logs if e["event"] == "authz_denied"]
    assert denied == [
        {
            "event": "authz_denied",
            "log_level": "info",
            "code": "api_key_revoked",
            "key_prefix": display_prefix(NEW_KEY),
            "tenant_id": "t1",
            "request_id": "rid-42",
            "suppressed": 0,
        }
    ]
    assert NEW_KEY not in repr(logs)
    assert KEY not in repr(logs)


async def test_a_flood_of_bad_keys_is_logged_sampled(ready, authz):
    with structlog.testing.capture_logs() as logs:
        for i in range(200):
            await authz.Check(check_request({"x-api-key": f"tsk_{'a' * 12}_{i:043d}"}))
    denied = [e for e in logs if e["event"] == "authz_denied"]
    assert 1 <= len(denied) <= 40  # 20 lines per second at most, whatever the flood


async def test_revocation_delta_refused_within_1s(ready, authz, policy_server):
    req = check_request({"x-api-key": KEY}, model="demo")
    assert (await authz.Check(req)).status.code == 0
    policy_server.push(
        policy_pb2.StreamPolicyResponse(
            version="2", complete=True, upserts=[api_key_res(KEY, secret_id="s1", key_id="k1", revoked=True)]
        )
    )
    assert await wait_for_code(authz, req, "api_key_revoked") < 1.0


async def test_key_added_by_delta_accepted_within_1s(ready, authz, policy_server):
    added = mint_key().key
    req = check_request({"authorization": f"Bearer {added}"})
    assert error_of(await authz.Check(req))["code"] == "invalid_api_key"
    policy_server.push(
        policy_pb2.StreamPolicyResponse(
            version="2", complete=True, upserts=[api_key_res(added, secret_id="s2", key_id="k2")]
        )
    )
    assert await wait_for_code(authz, req, "") < 1.0
    resp = await authz.Check(req)
    assert headers_of(resp.ok_response.headers)["x-key-id"] == ("k2", OVERWRITE)


async def test_delete_delta_and_bad_update_keeps_old_snapshot(ready, authz, policy_server):
    req = check_request({"x-api-key": KEY})
    # An inconsistent version (bad digest) is rejected: the old snapshot keeps answering.
    bad = policy_pb2.Resource(api_key=policy_pb2.ApiKey(id="bad", key_id="kb", tenant_id="t1", digest=b"x"))
    policy_server.push(policy_pb2.StreamPolicyResponse(version="3", complete=True, upserts=[bad]))
    await asyncio.sleep(0.1)
    assert (await authz.Check(req)).status.code == 0
    assert "3" not in policy_server.acks
    # The subscriber dropped that stream; the new one starts from a full snapshot.
    deadline = time.monotonic() + 5
    while len(policy_server.hellos) < 2:
        assert time.monotonic() < deadline, "no resubscription"
        await asyncio.sleep(0.01)
    policy_server.push(full_snapshot("4"))
    await wait_for_code(authz, req, "")
    # A delta that deletes the key's tenant refuses the key.
    policy_server.push(policy_pb2.StreamPolicyResponse(version="5", complete=True, deletes=["tenant/t1"]))
    assert await wait_for_code(authz, req, "invalid_api_key") < 1.0


async def test_a_delta_before_any_snapshot_is_not_applied(app, channel, policy_server):
    await asyncio.wait_for(policy_server.subscribed.wait(), 5)
    policy_server.push(
        policy_pb2.StreamPolicyResponse(version="9", complete=True, upserts=full_snapshot().upserts)
    )
    await asyncio.sleep(0.2)
    assert await health(channel) == NOT_SERVING
    assert "9" not in policy_server.acks


async def test_keeps_serving_when_policy_server_stops(ready, authz, channel, policy_server):
    await policy_server.server.stop(0)
    await asyncio.sleep(0.3)  # the subscriber notices and starts reconnecting
    assert await health(channel) == SERVING
    assert (await authz.Check(check_request({"x-api-key": KEY}))).status.code == 0
    assert error_of(await authz.Check(check_request({"x-api-key": NEW_KEY})))["code"] == "api_key_revoked"


async def test_missing_pepper_is_a_config_error(tmp_path, policy_server):
    settings = make_settings(tmp_path, tmp_path / "absent", policy_server.port)
    with pytest.raises(ConfigError, match="pepper"):
        await build_app(settings)


async def test_short_pepper_is_a_config_error(tmp_path, policy_server):
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    with pytest.raises(ConfigError, match="pepper"):
        await build_app(make_settings(tmp_path, short, policy_server.port))


async def test_metrics_count_decisions(tmp_path, pepper_file, policy_server):
    settings = make_settings(tmp_path, pepper_file, policy_server.port, metrics=MetricsSettings(port=0))
    app = await build_app(settings)
    try:
        assert app.metrics_port > 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            await asyncio.wait_for(policy_server.subscribed.wait(), 5)
            policy_server.push(full_snapshot())
            await wait_health(ch, SERVING)
            await external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request({}))
        url = f"http://127.0.0.1:{app.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            text = await resp.text()
        assert 'tessera_authz_decisions_total{result="missing_api_key"}' in text
    finally:
        await app.stop()


# --- the process ------------------------------------------------------------------------


def _env(tmp_path, pepper: Path, policy_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update(
        TESSERA_GRPC__PORT="0",
        TESSERA_METRICS__PORT="0",
        TESSERA_POLICY__URL=f"127.0.0.1:{policy_port}",
        TESSERA_PEPPER__FILE=str(pepper),
        TESSERA_LOG__FORMAT="json",
    )
    return env


async def test_python_m_serves_and_stops_on_sigterm(tmp_path, pepper_file, policy_server):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ext_authz",
        cwd=ROOT,
        env=_env(tmp_path, pepper_file, policy_server.port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        listening = None
        async with asyncio.timeout(20):
            while listening is None:
                line = await proc.stdout.readline()
                assert line, "process exited before listening"
                with contextlib.suppress(json.JSONDecodeError):
                    event = json.loads(line)
                    if event.get("event") == "ext_authz_listening":
                        listening = event
        assert listening["port"] > 0
        assert listening["metrics_port"] > 0
        await asyncio.wait_for(policy_server.subscribed.wait(), 5)
        policy_server.push(full_snapshot())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listening['port']}") as ch:
            await wait_health(ch, SERVING)
            resp = await external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request({"x-api-key": KEY}))
            assert resp.status.code == 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("command", [[], ["check-config"]])
async def test_python_m_refuses_missing_pepper(tmp_path, policy_server, command):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ext_authz",
        *command,
        cwd=ROOT,
        env=_env(tmp_path, tmp_path / "absent", policy_server.port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"pepper" in out


async def test_python_m_check_config_ok(tmp_path, pepper_file, policy_server):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ext_authz",
        "check-config",
        cwd=ROOT,
        env=_env(tmp_path, pepper_file, policy_server.port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    assert b"config_ok" in out
