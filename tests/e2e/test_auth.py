"""Authentication at the gateway: API keys and JWTs, entitlements, abuse resistance.

One stack with two ext_authz replicas of two worker processes each, so revocation is
checked against every process that answers Check.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterator

import jwt
import openai
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.jwt_keys import signer
from tessera.keys import load_pepper
from tests.e2e.conftest import Stack, start_stack, stop_stack
from tests.e2e.test_gateway import eventually, http, upstream_requests

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def rs(tmp_path_factory) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("replicated"),
        "--ext-authz-replicas",
        "2",
        "--ext-authz-workers",
        "2",
        # Signing keys rotate every few seconds here, so rotation is exercised while we test.
        env_extra={"TESSERA_JWT__ROTATE_AFTER_SECONDS": "3", "TESSERA_JWT__PUBLISH_LEAD_SECONDS": "1"},
    )
    stack.cli(
        "models",
        "add",
        "secret-model",
        "--backend",
        stack.endpoints()["demo_upstream"],
        "--visibility",
        "restricted",
    )
    yield stack
    stop_stack(stack)


def new_key(stack: Stack) -> dict[str, str]:
    tenant = f"a{uuid.uuid4().hex[:10]}"
    stack.cli("tenants", "create", tenant)
    return stack.cli_json("keys", "create", "--tenant", tenant)


def chat(client: openai.OpenAI, model: str = "demo") -> None:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1)


def token_for(stack: Stack, key: dict[str, str]) -> dict[str, object]:
    body = urllib.parse.urlencode(
        {"grant_type": "client_credentials", "client_id": key["id"], "client_secret": key["key"]}
    ).encode()
    status, headers, raw = http(
        "POST", f"{stack.gateway}/oauth/token", body, {"content-type": "application/x-www-form-urlencoded"}
    )
    assert status == 200, raw
    assert headers["cache-control"] == "no-store"
    return json.loads(raw)


def check_on_every_worker(stack: Stack, port: int, key: str, connections: int = 24) -> set[str]:
    """Check the key over many fresh connections (SO_REUSEPORT spreads them over the workers)."""
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    headers={"authorization": f"Bearer {key}"}
                )
            )
        )
    )
    codes = set()
    for _ in range(connections):
        # as an Envoy node would: ext_authz answers nobody else
        envoy = stack.identity("envoy", node="e2e")
        with stack.channel(
            f"127.0.0.1:{port}", envoy, "ext-authz", **{"grpc.use_local_subchannel_pool": 1}
        ) as ch:
            resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(request, timeout=5)
        codes.add(json.loads(resp.denied_response.body)["error"]["code"] if resp.status.code else "allowed")
    return codes


def test_revocation_reaches_every_replica_and_worker_within_a_second(rs):
    key = new_key(rs)
    ports = [int(a.rsplit(":", 1)[1]) for a in rs.endpoints()["ext_authz_replicas"]]
    assert len(ports) == 2
    eventually(lambda: chat(rs.client(key["key"])))
    assert all(check_on_every_worker(rs, p, key["key"]) == {"allowed"} for p in ports)
    rs.cli("keys", "revoke", key["id"])
    time.sleep(1.0)
    for port in ports:
        assert check_on_every_worker(rs, port, key["key"]) == {"api_key_revoked"}
    with pytest.raises(openai.AuthenticationError) as err:
        chat(rs.client(key["key"]))
    assert err.value.code == "api_key_revoked"


def test_jwt_from_client_credentials_works_with_the_openai_client(rs):
    key = new_key(rs)
    eventually(lambda: chat(rs.client(key["key"])))
    tok = token_for(rs, key)
    assert tok["token_type"] == "Bearer"
    assert 0 < int(tok["expires_in"]) <= 900
    claims = jwt.decode(str(tok["access_token"]), options={"verify_signature": False})
    assert claims["key_id"] == key["id"]
    assert claims["aud"] == "tessera-gateway"
    assert jwt.get_unverified_header(str(tok["access_token"]))["alg"] == "ES256"
    chat(rs.client(str(tok["access_token"])))
    headers = upstream_requests(rs)[-1]["headers"]
    assert "authorization" not in headers
    assert headers["x-key-id"] == key["id"]


def test_token_endpoint_answers_rfc6749_errors(rs):
    key = new_key(rs)
    form = {"content-type": "application/x-www-form-urlencoded"}
    cases = [
        (
            {"grant_type": "password", "client_id": key["id"], "client_secret": key["key"]},
            400,
            "unsupported_grant_type",
        ),
        (
            {"grant_type": "client_credentials", "client_id": key["id"], "client_secret": "nope"},
            401,
            "invalid_client",
        ),
        (
            {"grant_type": "client_credentials", "client_id": "other", "client_secret": key["key"]},
            401,
            "invalid_client",
        ),
    ]
    for fields, status, error in cases:
        got, _, body = http(
            "POST", f"{rs.gateway}/oauth/token", urllib.parse.urlencode(fields).encode(), form
        )
        assert (got, json.loads(body)["error"]) == (status, error)
        assert key["key"] not in body.decode()
    got, _, body = http(
        "POST",
        f"{rs.gateway}/oauth/token",
        b'{"grant_type": "client_credentials"}',
        {"content-type": "application/json"},
    )
    assert (got, json.loads(body)["error"]) == (400, "invalid_request")
    basic = base64.b64encode(f"{key['id']}:{key['key']}".encode()).decode()
    got, _, body = http(
        "POST",
        f"{rs.gateway}/oauth/token",
        b"grant_type=client_credentials",
        {**form, "authorization": f"Basic {basic}"},
    )
    assert got == 200, body


def _sign(stack: Stack, claims: dict[str, object], **headers: str) -> str:
    """Sign with the control plane's own active key (read from its store with the pepper)."""

    async def active() -> tuple[str, object]:
        engine = make_engine(f"sqlite+aiosqlite:///{stack.root / 'tessera.db'}")
        try:
            async with make_sessionmaker(engine)() as s:
                got = await signer(s, load_pepper(stack.root / "pepper"))
        finally:
            await engine.dispose()
        assert got is not None
        return got

    kid, key = asyncio.run(active())
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, **headers})


def test_forged_expired_wrong_audience_and_alg_none_jwts_are_refused(rs):
    key = new_key(rs)
    eventually(lambda: chat(rs.client(key["key"])))
    good = str(token_for(rs, key)["access_token"])
    claims = jwt.decode(good, options={"verify_signature": False})
    now = int(time.time())
    head, payload, sig = good.split(".")
    forged_payload = (
        base64.urlsafe_b64encode(json.dumps({**claims, "tenant_id": "evil"}).encode()).rstrip(b"=").decode()
    )
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    bad = {
        "forged": f"{head}.{forged_payload}.{sig}",
        "bad signature": f"{head}.{payload}.{sig[::-1]}",
        "expired": _sign(rs, {**claims, "iat": now - 3600, "exp": now - 600}),
        "wrong audience": _sign(rs, {**claims, "aud": "tessera-admin"}),
        "wrong issuer": _sign(rs, {**claims, "iss": "https://evil.example"}),
        "alg none": f"{none_header}.{payload}.",
    }
    for name, token in bad.items():
        with pytest.raises(openai.AuthenticationError) as err:
            chat(rs.client(token))
        assert err.value.code == "invalid_api_key", name
    chat(rs.client(_sign(rs, {**claims, "exp": now + 60})))  # the control: a good signature passes


def test_jwt_of_a_revoked_key_is_refused_within_a_second(rs):
    key = new_key(rs)
    eventually(lambda: chat(rs.client(key["key"])))
    client = rs.client(str(token_for(rs, key)["access_token"]))
    chat(client)
    rs.cli("keys", "revoke", key["id"])

    def refused() -> None:
        with pytest.raises(openai.AuthenticationError) as err:
            chat(client)
        assert err.value.code == "api_key_revoked"

    eventually(refused, timeout=1.0)


def test_entitlement_refusal_is_identical_to_an_unknown_model(rs):
    key = new_key(rs)
    auth = {"authorization": f"Bearer {key['key']}", "content-type": "application/json"}
    eventually(lambda: chat(rs.client(key["key"])))

    def ask(model: str) -> tuple[int, dict[str, str], str]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]}).encode()
        status, headers, raw = http("POST", f"{rs.gateway}/v1/chat/completions", body, auth)
        volatile = {"date", "x-request-id", "content-length"}
        return (
            status,
            {k: v for k, v in headers.items() if k not in volatile},
            raw.decode().replace(model, "MODEL"),
        )

    forbidden, unknown = ask("secret-model"), ask("no-such-model-xyz")
    assert forbidden[0] == unknown[0] == 404
    assert forbidden == unknown


def test_text_plain_or_duplicate_model_keys_cannot_reach_a_forbidden_model(rs):
    key = new_key(rs)
    eventually(lambda: chat(rs.client(key["key"])))
    auth = {"authorization": f"Bearer {key['key']}"}
    url = f"{rs.gateway}/v1/chat/completions"
    sneaky = [
        (b'{"model": "secret-model", "messages": []}', "text/plain"),
        (b'{"model": "demo", "model": "secret-model", "messages": []}', "application/json"),
        (b'{"model": "secret-model", "model": "demo", "messages": []}', "application/json"),
    ]
    before = len(upstream_requests(rs))
    for body, content_type in sneaky:
        status, _, raw = http("POST", url, body, {**auth, "content-type": content_type})
        assert status in {400, 404} or (status == 400 and b"demo" in raw), (body, status, raw)
    reached = upstream_requests(rs)[before:]
    assert all(r["model"] != "secret-model" for r in reached), reached


def test_oversized_body_is_413_before_authentication(rs):
    with socket.create_connection(("127.0.0.1", rs.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (17 << 20)
        )
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413")
    assert '"code":"request_too_large"' in head


def test_control_plane_down_decisions_continue_from_the_snapshot(rs):
    key = new_key(rs)
    client = rs.client(key["key"])
    eventually(lambda: chat(client))
    pid = rs.endpoints()["pids"]["control-plane"]
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    os.kill(pid, signal.SIGSTOP)  # unreachable, not restarted: the worst case for freshness
    try:
        chat(client)
        with pytest.raises(openai.AuthenticationError):
            chat(rs.client("tsk_" + "a" * 12 + "_" + "b" * 43))
    finally:
        os.kill(pid, signal.SIGCONT)


def test_signing_keys_rotate_without_restarting_envoy(rs):
    key = new_key(rs)
    eventually(lambda: chat(rs.client(key["key"])))
    envoy_pid = rs.endpoints()["pids"]["envoy"]
    first = str(token_for(rs, key)["access_token"])
    first_kid = jwt.get_unverified_header(first)["kid"]

    def rotated() -> str:
        token = str(token_for(rs, key)["access_token"])
        assert jwt.get_unverified_header(token)["kid"] != first_kid
        return token

    second = eventually(rotated, timeout=20, interval=0.5)
    chat(rs.client(second))  # the new key was published before it signed
    chat(rs.client(first))  # the old key stays published until its tokens expire
    assert rs.endpoints()["pids"]["envoy"] == envoy_pid
