"""What each backend needs to be reached, through real Envoy: its own upstream credential (sealed
at rest, delivered over SDS, injected per endpoint), its own TLS trust and server name; model
aliases; /v1/realtime WebSocket upgrades."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.test_gateway import eventually, http
from tests.e2e.test_routing import served_by, wait_routed
from tests.upstream import Upstream

pytestmark = pytest.mark.envoy


def _unique(prefix: str) -> str:
    return f"{prefix}{time.monotonic_ns()}"


def _chat_body(model: str) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    ).encode()


def test_each_backend_gets_its_own_credential_and_never_the_callers_key(stack, upstreams, tmp_path):
    model = _unique("cred")
    bearer, header, bare = Upstream(model, "bearer"), Upstream(model, "header"), Upstream(model, "bare")
    upstreams += [bearer, header, bare]
    (tmp_path / "one").write_text("sk-upstream-one\n")
    (tmp_path / "two").write_text("upstream-two")
    stack.cli("models", "add", model, "--backend", bearer.url, "--credential-file", str(tmp_path / "one"))
    stack.cli(
        "models", "add-backend", model, "--backend", header.url,
        "--credential-file", str(tmp_path / "two"), "--credential-header", "api-key",
    )  # fmt: skip
    shown = stack.cli_json("models", "add-backend", model, "--backend", bare.url)
    # Admin answers say a credential is set and where it goes, never what it is.
    backends = {b["url"]: b for b in shown["model"]["backends"]}
    assert backends[bearer.url]["has_credential"] is True
    assert backends[header.url]["credential_header"] == "api-key"
    assert backends[bare.url].get("has_credential", False) is False
    assert "sk-upstream-one" not in json.dumps(shown)
    assert "sk-upstream-one" not in stack.cli("models", "show", model).stdout

    counts = served_by(stack, model, stack.demo_key, 30, threads=3)
    assert set(counts) == {"bearer", "header", "bare"}, counts  # every request answered, by each
    for seen in bearer.requests():
        assert seen["headers"]["authorization"] == "Bearer sk-upstream-one"
        assert "x-tessera-backend" not in seen["headers"]  # the routing mark never leaves Envoy
    for seen in header.requests():
        assert seen["headers"]["api-key"] == "upstream-two"
        assert "authorization" not in seen["headers"]  # the caller's key is never forwarded
    for seen in bare.requests():
        assert "authorization" not in seen["headers"]
        assert "api-key" not in seen["headers"]

    # Rotating a credential reaches Envoy without a restart; clearing it stops sending one.
    (tmp_path / "one").write_text("sk-upstream-rotated")
    stack.cli(
        "models", "update-backend", model, "--backend", bearer.url, "--credential-file", str(tmp_path / "one")
    )

    def rotated() -> None:
        served_by(stack, model, stack.demo_key, 3, threads=1)
        assert bearer.requests()[-1]["headers"]["authorization"] == "Bearer sk-upstream-rotated"

    eventually(rotated, timeout=5)
    stack.cli("models", "update-backend", model, "--backend", bearer.url, "--clear-credential")

    def cleared() -> None:
        served_by(stack, model, stack.demo_key, 3, threads=1)
        assert "authorization" not in bearer.requests()[-1]["headers"], bearer.requests()[-1]["headers"].get(
            "authorization"
        )

    eventually(cleared, timeout=5)


def test_bad_backend_options_are_refused_and_change_nothing(stack, tmp_path):
    model = _unique("badopt")
    stack.cli("models", "add", model, "--backend", "http://127.0.0.1:9")
    (tmp_path / "multi").write_text("line one\nline two")
    (tmp_path / "pem").write_text("not a certificate")
    cases = [
        ("--credential-file", str(tmp_path / "multi")),  # would split into two header lines
        ("--credential-header", "x-tenant-id"),  # a header Tessera sets itself
        ("--ca-bundle", str(tmp_path / "pem")),
        ("--health-path", "no-slash"),
        ("--timeout", "99999999"),
    ]
    before = stack.cli_json("models", "show", model)
    for flag, value in cases:
        result = stack.cli(
            "models", "add-backend", model, "--backend", "http://127.0.0.1:10", flag, value, check=False
        )
        assert result.returncode != 0, (flag, result.stdout)
        assert "INVALID_ARGUMENT" in result.stderr or "invalid" in result.stderr.lower(), result.stderr
    # TLS options on a plain http backend are refused too.
    result = stack.cli(
        "models", "add-backend", model, "--backend", "http://127.0.0.1:11", "--sni", "a.b", check=False
    )
    assert result.returncode != 0
    assert stack.cli_json("models", "show", model) == before


def _cert(
    subject: str, issuer: tuple[x509.Certificate, Any] | None, *, ca: bool
) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _write_pem(path: Path, cert: x509.Certificate, key: Any | None = None) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return str(path)


def test_https_backend_with_its_own_ca_and_server_name(stack, upstreams, tmp_path):
    ca = _cert("Tessera test CA", None, ca=True)
    other_ca = _cert("Some other CA", None, ca=True)
    server = _cert("gpu.internal", ca, ca=False)
    cert_file = _write_pem(tmp_path / "server.pem", *server)
    ca_file = _write_pem(tmp_path / "ca.pem", ca[0])
    other_ca_file = _write_pem(tmp_path / "other-ca.pem", other_ca[0])
    model, wrong_ca, wrong_name = _unique("tls"), _unique("tlsca"), _unique("tlsname")
    upstream = Upstream(model, "tls", tls=(cert_file, str(tmp_path / "server.key"), ca_file))
    upstreams.append(upstream)
    assert upstream.url.startswith("https://127.0.0.1:")

    stack.cli(
        "models", "add", model, "--backend", upstream.url, "--ca-bundle", ca_file, "--sni", "gpu.internal"
    )
    client = stack.client(stack.demo_key)
    wait_routed(client, model)
    assert served_by(stack, model, stack.demo_key, 4, threads=2) == {"tls": 4}
    assert upstream.requests()[-1]["model"] == model

    # The same server, trusted through another CA or checked against another name: refused.
    stack.cli(
        "models",
        "add",
        wrong_ca,
        "--backend",
        upstream.url,
        "--ca-bundle",
        other_ca_file,
        "--sni",
        "gpu.internal",
    )
    stack.cli(
        "models",
        "add",
        wrong_name,
        "--backend",
        upstream.url,
        "--ca-bundle",
        ca_file,
        "--sni",
        "cpu.internal",
    )
    seen = len(upstream.requests())
    for bad in (wrong_ca, wrong_name):

        def refused(name: str = bad) -> None:
            status, _, raw = http(
                "POST",
                f"{stack.gateway}/v1/chat/completions",
                _chat_body(name),
                {"authorization": f"Bearer {stack.demo_key}", "content-type": "application/json"},
            )
            assert status == 503, (status, raw)
            assert json.loads(raw)["error"]["type"], raw  # an OpenAI-shaped error, not a bare 503

        eventually(refused, timeout=5)
    assert len(upstream.requests()) == seen  # no request reached it over an unverified connection


def test_an_alias_is_its_model_for_routing_entitlement_limits_and_listing(stack, upstreams):
    model, alias = _unique("served"), _unique("alias")
    upstream = Upstream(model, "aliased")
    upstreams.append(upstream)
    stack.cli("models", "add", model, "--backend", upstream.url, "--visibility", "restricted")
    shown = stack.cli_json("models", "update", model, "--alias", alias)
    assert shown["model"]["aliases"] == [alias]
    entitled, other = _unique("ent"), _unique("other")
    stack.cli("tenants", "create", entitled, "--allow-model", model)
    stack.cli("tenants", "create", other)
    key, other_key = stack.new_key(entitled), stack.new_key(other)
    client = stack.client(key)
    wait_routed(client, alias)

    resp = client.chat.completions.create(
        model=alias, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert resp.choices[0].message.content
    assert upstream.requests()[-1]["model"] == model  # the backend is asked for its own name
    assert {model, alias} <= {m.id for m in client.models.list()}

    with pytest.raises(openai.NotFoundError) as denied:
        stack.client(other_key).chat.completions.create(
            model=alias, messages=[{"role": "user", "content": "x"}]
        )
    assert denied.value.code == "model_not_found"
    assert not {model, alias} & {m.id for m in stack.client(other_key).models.list()}

    # A limit on the model counts the calls made through its alias.
    stack.cli(
        "limits",
        "create",
        "--tenant",
        entitled,
        "--model",
        model,
        "--kind",
        "requests",
        "--window",
        "minute",
        "--limit",
        "3",
    )

    def limited() -> None:
        for _ in range(5):
            try:
                client.chat.completions.create(
                    model=alias, messages=[{"role": "user", "content": "x"}], max_tokens=1
                )
            except openai.RateLimitError:
                return
        raise AssertionError("five calls through the alias, none refused by the model's limit of 3")

    eventually(limited, timeout=5)

    # An alias is one namespace with model names.
    clash = stack.cli("models", "update", _unique("x"), "--alias", model, check=False)
    assert clash.returncode != 0
    taken = stack.cli("models", "add", alias, "--backend", upstream.url, check=False)
    assert taken.returncode != 0
    assert "ALREADY_EXISTS" in taken.stderr or "already" in taken.stderr.lower(), taken.stderr


async def _realtime(stack, model: str, key: str | None) -> tuple[int, list[dict[str, Any]]]:
    """Open /v1/realtime?model=…, say hello, read the answers: (status, events)."""
    url = f"ws://127.0.0.1:{stack.port}/v1/realtime?model={model}"
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(
                url, headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=5)
            ) as ws:
                created = await ws.receive_json(timeout=5)
                await ws.send_str('{"type":"response.create"}')
                done = await ws.receive_json(timeout=5)
                return 101, [created, done]
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status, []


def test_realtime_websockets_pass_through_only_where_enabled_and_entitled(stack, upstreams):
    model, off = _unique("rt"), _unique("rtoff")
    upstream = Upstream(model, "realtime")
    upstreams.append(upstream)
    stack.cli("models", "add", model, "--backend", upstream.url, "--visibility", "restricted")
    stack.cli("models", "add", off, "--backend", upstream.url)
    stack.cli("models", "update", model, "--realtime", "on")
    entitled, other = _unique("rtent"), _unique("rtother")
    stack.cli("tenants", "create", entitled, "--allow-model", model)
    stack.cli("tenants", "create", other)
    key, other_key = stack.new_key(entitled), stack.new_key(other)

    def upgraded() -> None:
        status, events = asyncio.run(_realtime(stack, model, key))
        assert status == 101
        assert events[0] == {"type": "session.created", "session": {"model": model}, "upstream": "realtime"}
        assert events[1] == {"type": "response.done", "echo": '{"type":"response.create"}'}

    eventually(upgraded, timeout=5)
    upgrade = [r for r in upstream.requests() if r["path"] == "/v1/realtime"][-1]
    assert "authorization" not in upgrade["headers"]  # the caller's key stays at the gateway
    assert upgrade["headers"]["x-tenant-id"]  # identity set by Tessera

    assert asyncio.run(_realtime(stack, model, None))[0] == 401
    assert asyncio.run(_realtime(stack, model, "tsk_wrong"))[0] == 401
    assert asyncio.run(_realtime(stack, model, other_key))[0] == 404  # not entitled to the model
    assert asyncio.run(_realtime(stack, off, key))[0] == 404  # realtime not enabled for it
    stack.cli("models", "update", model, "--realtime", "off")
    eventually(lambda: _assert_status(asyncio.run(_realtime(stack, model, key))[0], 404), timeout=5)


def _assert_status(got: int, want: int) -> None:
    assert got == want


def test_realtime_sessions_count_against_request_limits(stack, upstreams):
    model = _unique("rtlim")
    upstream = Upstream(model, "realtime-limited")
    upstreams.append(upstream)
    stack.cli("models", "add", model, "--backend", upstream.url)
    stack.cli("models", "update", model, "--realtime", "on")
    tenant = _unique("rtlim")
    stack.cli("tenants", "create", tenant)
    key = stack.new_key(tenant)
    eventually(lambda: _assert_status(asyncio.run(_realtime(stack, model, key))[0], 101), timeout=5)
    stack.cli("limits", "create", "--tenant", tenant, "--model", model, "--kind", "requests",
              "--window", "minute", "--limit", "2")  # fmt: skip

    def refused() -> None:
        statuses = [asyncio.run(_realtime(stack, model, key))[0] for _ in range(3)]
        assert 429 in statuses, statuses

    eventually(refused, timeout=5)
