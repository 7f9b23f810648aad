"""Zero trust inside (issue 14), tried on a real `tessera up` stack as someone with network access
to its ports would: an anonymous plaintext client, a client with a certificate from another CA,
and a client with a valid certificate of the wrong identity, against every internal port. Each
is refused (the handshake fails, or PERMISSION_DENIED), gets no data, and moves no counter."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2 as core_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.admission.v1 import admission_pb2, admission_pb2_grpc
from tessera.identity import Authority, spiffe_id
from tessera.policy.v1 import policy_pb2, policy_pb2_grpc
from tessera.settings import IdentitySettings
from tessera.tls import client_context, grpc_channel
from tests.e2e.conftest import Stack
from tests.e2e.test_admission import post, tenant

pytestmark = pytest.mark.envoy

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
ONE_TOKEN = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
Outcome = str  # "answered", a gRPC status name, or "refused" (no TLS session)


def _check_request(key: str) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path="/v1/chat/completions", headers={"authorization": f"Bearer {key}"}
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


async def _outcome(call: Awaitable[Any]) -> Outcome:
    try:
        await asyncio.wait_for(call, 5)
    except grpc.aio.AioRpcError as exc:
        return "refused" if exc.code() == grpc.StatusCode.UNAVAILABLE else exc.code().name
    return "answered"


async def _first_of(method: Any, first: Any) -> None:
    """Open a bidirectional stream that sends ``first`` (and stays open) and read one answer;
    a refusal raises its status (the request iterator keeps a refused write from masking it)."""
    done = asyncio.Event()

    async def requests() -> AsyncIterator[Any]:
        yield first
        await done.wait()

    call = method(requests())
    try:
        answer = await call.read()
        if answer is grpc.aio.EOF:  # ended without an answer: its status says why
            code = await call.code()
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "no answer")
    finally:
        done.set()
        call.cancel()


def _calls(
    ep: dict[str, Any], key: str, token: str, node: str
) -> dict[str, Callable[[grpc.aio.Channel], Any]]:
    """Each internal gRPC surface: (its address, the component serving it, one call)."""

    def check(ch: grpc.aio.Channel) -> Any:
        return external_auth_pb2_grpc.AuthorizationStub(ch).Check(_check_request(key))

    def ads(ch: grpc.aio.Channel) -> Any:
        stream = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources
        names = [f"backend-credential/{i}" for i in range(1, 20)]
        req = discovery_pb2.DiscoveryRequest(
            node=core_pb2.Node(id=node), type_url=CLUSTER_TYPE, resource_names=names
        )
        return _first_of(stream, req)

    def policy(ch: grpc.aio.Channel) -> Any:
        stream = policy_pb2_grpc.PolicyServiceStub(ch).Stream
        return _first_of(stream, policy_pb2.StreamPolicyRequest(node_id="probe", service="ext_authz"))

    def admin(ch: grpc.aio.Channel) -> Any:
        stub = admin_pb2_grpc.TenantServiceStub(ch)
        return stub.ListTenants(
            admin_pb2.ListTenantsRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )

    def rls(ch: grpc.aio.Channel) -> Any:
        return rls_pb2_grpc.RateLimitServiceStub(ch).ShouldRateLimit(
            rls_pb2.RateLimitRequest(domain="tessera")
        )

    def backstop(ch: grpc.aio.Channel) -> Any:
        return admission_pb2_grpc.UsageBackstopStub(ch).ClaimOverdue(admission_pb2.ClaimOverdueRequest(max=1))

    calls = {"ext_authz": check, "xds": ads, "policy": policy, "admin": admin, "ratelimit": rls,
             "backstop": backstop}  # fmt: skip
    if ep["ext_authz_transport"] == "http":
        del calls["ext_authz"]  # HTTP/1.1 there: _authz_over_http
    return calls


def _authz_over_http(ep: dict[str, Any], key: str, who: IdentitySettings | None) -> Outcome:
    """ext_authz's HTTP transport, asked what Envoy would ask (an HTTP status, or refused)."""
    url = f"https://{ep['ext_authz']}/authz/v1/chat/completions"
    if who is None:  # anonymous: plaintext
        return _https_get(urllib.request.Request(url.replace("https:", "http:"), method="POST"), None)  # noqa: S310 - loopback
    request = urllib.request.Request(url, method="POST", headers={"authorization": f"Bearer {key}"})
    return _https_get(request, client_context(who))


# surface -> (endpoints.json entry, the component whose identity serves it)
SURFACES = {
    "ext_authz": ("ext_authz", "ext-authz"),
    "xds": ("xds", "control-plane"),
    "policy": ("policy", "control-plane"),
    "admin": ("admin", "control-plane"),
    "ratelimit": ("ratelimit", "ratelimit"),
    "backstop": ("ratelimit", "ratelimit"),
}


async def _sweep(
    ep: dict[str, Any], calls: dict[str, Callable[[grpc.aio.Channel], Any]], who: IdentitySettings | None
) -> dict[str, Outcome]:
    out = {}
    for surface, call in calls.items():
        entry, server = SURFACES[surface]
        for _ in range(10):
            async with grpc_channel(ep[entry], who, server) as channel:
                out[surface] = await _outcome(call(channel))
            # grpcio's client reports a stream the server refused before reading its first
            # message as INTERNAL now and then (the write lost the race): ask again
            if out[surface] != "INTERNAL":
                break
    return out


def _https_get(url: str | urllib.request.Request, context: ssl.SSLContext | None) -> Outcome:
    """An HTTP status, or "refused" (no TLS session, or no connection at all)."""
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:  # noqa: S310 - loopback
            return f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError):
        return "refused"


def test_every_internal_port_refuses_strangers_other_cas_and_wrong_identities(stack: Stack, tmp_path: Path):
    _, key = tenant(stack, ["--kind", "requests", "--window", "minute", "--limit", "2"])
    ep = stack.endpoints()
    token = json.loads((stack.root / "admin.json").read_text())["token"]  # a valid bearer token
    node = ep["envoy_node"]
    calls = _calls(ep, key, token, node)
    strangers: dict[str, IdentitySettings | None] = {
        "anonymous": None,
        # the real Envoy's SPIFFE ID, from a CA of its own
        "another CA": Authority(tmp_path / "other").ensure("envoy", spiffe_id("envoy", node=node)),
    }
    for who, identity in strangers.items():
        seen = asyncio.run(_sweep(ep, calls, identity))
        assert seen == dict.fromkeys(calls, "refused"), who
    # Valid certificates from the stack's CA, each for a component that may not make the call
    wrong = {
        "ext_authz": stack.identity("meter"),  # Check: Envoy nodes only
        "xds": stack.identity("ext-authz"),  # ADS: Envoy nodes only
        "policy": stack.identity("meter"),  # the policy stream: ext_authz and ratelimit only
        "admin": stack.identity("ext-authz"),  # the admin API: operators and Envoy only
        "ratelimit": stack.identity("meter"),  # RLS: nobody (Settle: ext_authz and the meter)
        "backstop": stack.identity("ext-authz"),  # ClaimOverdue (the usage backstop): meters only
    }
    for surface, identity in wrong.items():
        if surface not in calls:
            continue  # ext_authz over HTTP: below
        seen = asyncio.run(_sweep(ep, {surface: calls[surface]}, identity))
        assert seen == {surface: "PERMISSION_DENIED"}, surface
    # ...and the same calls by the identities that may make them are answered (the test can fail)
    right = {
        "ext_authz": stack.identity("envoy", node="e2e"),
        "xds": stack.identity("envoy", node=node),
        "policy": stack.identity("ext-authz"),
        "admin": stack.identity("operator"),
        "backstop": stack.identity("meter"),
    }
    for surface, identity in right.items():
        if surface not in calls:
            continue
        seen = asyncio.run(_sweep(ep, {surface: calls[surface]}, identity))
        assert seen == {surface: "answered"}, surface

    if ep["ext_authz_transport"] == "http":
        for who, identity in strangers.items():
            assert _authz_over_http(ep, key, identity) == "refused", who
        assert _authz_over_http(ep, key, stack.identity("meter")) == "HTTP 403"
        assert _authz_over_http(ep, key, stack.identity("envoy", node="e2e")) == "HTTP 200"

    # The control plane's HTTP handlers (Envoy routes /v1/models and /oauth/token there)
    models = ep["control_plane_http"] + "/v1/models"
    assert _https_get(models.replace("https:", "http:"), None) == "refused"
    other = client_context(strangers["another CA"])  # type: ignore[arg-type]
    assert _https_get(models, other) == "refused"
    assert _https_get(models, client_context(stack.identity("meter"))) == "HTTP 403"

    # Nothing above spent the tenant's budget: its two requests of the minute are still its own
    codes = [post(stack, key, ONE_TOKEN)[0] for _ in range(3)]
    assert codes == [200, 200, 429]


def test_an_envoy_identity_gets_only_its_own_nodes_config(stack: Stack):
    """ADS serves a stream as the node its certificate names: another node's certificate that
    claims this node's id gets PERMISSION_DENIED, and no resource."""
    ep = stack.endpoints()
    node = ep["envoy_node"]
    ads = _calls(ep, "k", "t", node)["xds"]
    seen = asyncio.run(_sweep(ep, {"xds": ads}, stack.identity("envoy", node="impostor")))
    assert seen == {"xds": "PERMISSION_DENIED"}
    logs = (stack.root / "logs" / "control-plane.log").read_text()
    assert '"certified": "impostor"' in logs


def test_envoy_admin_is_a_socket_only_its_user_can_open(stack: Stack):
    """Envoy's admin interface (POST /quitquitquit, /drain_listeners…) listens on no port: a unix
    socket, mode 0600, which another local user cannot open; the supervisor still drains
    through it (SIGHUP in test_supervisor)."""
    socket_path = Path(stack.root / "run" / "envoy-admin.sock")
    mode = socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    if os.geteuid() != 0:
        pytest.skip("runuser needs root to act as another user")
    # Even with the data dir opened up, the socket itself refuses user nobody
    opened: list[Path] = []
    for parent in [socket_path.parent, *socket_path.parent.parents]:
        if parent == Path("/"):
            break
        if not stat.S_IMODE(parent.stat().st_mode) & 0o001:
            opened.append(parent)
    try:
        for p in opened:
            p.chmod(p.stat().st_mode | 0o001)
        probe = (
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "s.sendall(b'POST /quitquitquit HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100))"
        )
        result = subprocess.run(
            ["runuser", "-u", "nobody", "--", "python3", "-c", probe, str(socket_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        for p in opened:
            p.chmod(p.stat().st_mode & ~0o001)
    assert result.returncode != 0
    assert "PermissionError" in result.stderr
    assert post(stack, stack.demo_key, ONE_TOKEN)[0] == 200  # Envoy still serves
