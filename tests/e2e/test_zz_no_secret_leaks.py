"""No secret is written or shown anywhere it should not be (ARCHITECTURE §8).

Named to sort last among the e2e tests: it runs on the shared stack after the others, so the
logs, the database and Envoy's state it searches hold everything the session did.

The secrets are minted here: an API key (used, rotated with a grace, its successor used, then
revoked and used again), a principal's admin key (used), wrong keys of both kinds, plus the
pepper and the local admin token. ``pepper`` and ``admin.json`` hold their secret by design, and
``tessera up`` prints the demo key once (the "Demo key" line and the curl line) by design.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import openai
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin.v1 import admin_pb2_grpc
from tessera.probe import fetch
from tests.e2e.test_gateway import upstream_requests

pytestmark = pytest.mark.envoy

BY_DESIGN = {"pepper", "admin.json"}
FLUSH_TIMEOUT = 15.0


def _http(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> str:
    if url.startswith("http+unix:"):  # Envoy's admin socket
        status, text = fetch(url, method, timeout=30)
        return f"HTTP {status}: {text.decode('utf-8', 'replace')}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read().decode('utf-8', 'replace')}"


def _wrong_key(kind: str) -> str:
    public = base64.b32encode(secrets.token_bytes(10)).decode().lower()[:12]
    return f"{kind}_{public}_{secrets.token_urlsafe(32)}"


def _needles(secret: str) -> list[str]:
    """The secret, and for a Tessera key its secret part alone (a prefix may be shown, never this)."""
    parts = secret.split("_", 2)
    if len(parts) == 3 and parts[0] in {"tsk", "tadm"} and len(parts[2]) >= 40:
        return [secret, parts[2]]
    return [secret]


class Admin:
    """gRPC calls with a bearer token; every response and error is kept for the search."""

    def __init__(self, channel: grpc.Channel, seen: dict[str, str]) -> None:
        self.stubs = {
            m.name: getattr(getattr(admin_pb2_grpc, f"{s.name}Stub")(channel), m.name)
            for s in pb.DESCRIPTOR.services_by_name.values()
            for m in s.methods
        }
        self.seen = seen

    def __call__(self, rpc: str, request: Message, token: str | None) -> Message | None:
        metadata = [("authorization", f"Bearer {token}")] if token is not None else []
        where = f"gRPC {rpc} {len(self.seen)}"
        try:
            resp = self.stubs[rpc](request, metadata=metadata, timeout=15)
        except grpc.RpcError as exc:
            self.seen[f"{where} error"] = f"{exc.code().name}: {exc.details()}"
            return None
        shown = type(resp)()
        shown.CopyFrom(resp)
        if "key" in shown.DESCRIPTOR.fields_by_name:
            shown.ClearField("key")  # the one field that shows a new secret, once, by design
        self.seen[where] = json_format.MessageToJson(shown, preserving_proto_field_name=True)
        return resp


def _chat(stack, key: str, seen: dict[str, str], where: str) -> bool:
    try:
        resp = stack.client(key).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "leak probe"}], max_tokens=3
        )
    except openai.APIStatusError as exc:
        seen[f"gateway error ({where})"] = f"{exc.status_code} {exc.message} {exc.response.text}"
        return False
    seen[f"gateway response ({where})"] = resp.model_dump_json()
    return True


def _chat_until(stack, key: str, seen: dict[str, str], where: str, *, accepted: bool) -> bool:
    """Changes reach the gateway within a second: ask until the answer is the expected one."""
    deadline = time.monotonic() + 3
    while _chat(stack, key, seen, where) != accepted:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _flush_access_log(stack, seen: dict[str, str]) -> None:
    """Envoy buffers its file access log (flushed every ~10 s): reopen_logs, then wait for a marker."""
    marker = uuid.uuid4().hex
    seen["gateway probe"] = _http("GET", f"{stack.gateway}/v1/models?leak_probe={marker}")
    access_log = stack.root / "logs" / "access.log"
    envoy_admin = stack.endpoints()["envoy_admin"]
    deadline = time.monotonic() + FLUSH_TIMEOUT
    while time.monotonic() < deadline:
        _http("POST", f"{envoy_admin}/reopen_logs")
        if access_log.exists() and marker in access_log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    pytest.fail(f"Envoy's access log {access_log} did not show the probe request within {FLUSH_TIMEOUT}s")


def _every_page(admin: Admin, rpc: str, make, token: str) -> None:
    page = ""
    while True:
        resp = admin(rpc, make(page_size=500, page_token=page), token)
        assert resp is not None, rpc
        page = resp.next_page_token
        if not page:
            return


@dataclass
class Minted:
    watched: dict[str, str] = field(default_factory=dict)  # what -> secret
    admin_key_works: bool = False
    upstream_credential_sent: bool = False


def _api_key_lifecycle(stack, admin: Admin, platform: str, tenant_id: str, m: Minted) -> None:
    """An API key: used, rotated with a grace (both secrets used), revoked, both refused; wrong keys."""
    seen = admin.seen
    created = admin("CreateApiKey", pb.CreateApiKeyRequest(tenant=tenant_id, name="leak"), platform)
    assert created is not None
    m.watched["API key"] = first = created.key
    assert _chat_until(stack, first, seen, "api key", accepted=True)
    rotated = admin("RotateApiKey", pb.RotateApiKeyRequest(id=created.id, grace="60s"), platform)
    assert rotated is not None
    m.watched["rotated API key"] = second = rotated.key
    assert _chat_until(stack, second, seen, "rotated key", accepted=True)
    assert _chat(stack, first, seen, "old key in grace")
    admin("GetApiKey", pb.GetApiKeyRequest(id=created.id), platform)
    seen[f"REST GetApiKey {created.id}"] = _http(
        "GET", f"{stack.gateway}/admin/v1/keys/{created.id}", {"authorization": f"Bearer {platform}"}
    )
    assert admin("RevokeApiKey", pb.RevokeApiKeyRequest(id=created.id), platform) is not None
    assert _chat_until(stack, second, seen, "revoked key", accepted=False)
    assert not _chat(stack, first, seen, "revoked old key")
    # Wrong keys at the gateway: one well-formed, one not ours at all.
    m.watched["wrong API key"] = wrong = _wrong_key("tsk")
    m.watched["foreign API key"] = foreign = f"sk-{secrets.token_urlsafe(32)}"
    assert not _chat(stack, wrong, seen, "wrong key")
    assert not _chat(stack, foreign, seen, "foreign key")


def _admin_key_lifecycle(stack, admin: Admin, platform: str, tenant_id: str, m: Minted) -> None:
    """A principal's admin key used over gRPC and REST, then disabled and used again; wrong ones."""
    seen = admin.seen
    principal = admin(
        "CreatePrincipal",
        pb.CreatePrincipalRequest(
            name=f"leak-{uuid.uuid4().hex[:8]}",
            bindings=[pb.RoleBinding(role="tenant-admin", tenant_id=tenant_id)],
        ),
        platform,
    )
    assert principal is not None
    m.watched["principal admin key"] = key = principal.key
    m.admin_key_works = admin("WhoAmI", pb.WhoAmIRequest(), key) is not None
    bearer = {"authorization": f"Bearer {key}"}
    seen["REST whoami (admin key)"] = _http("GET", f"{stack.gateway}/admin/v1/whoami", bearer)
    seen["REST keys (admin key)"] = _http("GET", f"{stack.gateway}/admin/v1/keys", bearer)
    admin("GetPrincipal", pb.GetPrincipalRequest(principal=principal.principal.id), platform)
    m.watched["wrong admin key"] = wrong = _wrong_key("tadm")
    m.watched["garbage admin token"] = garbage = "garbage-" + secrets.token_hex(16)
    for token in (wrong, garbage):
        admin("ListTenants", pb.ListTenantsRequest(), token)
        seen[f"REST tenants ({token[:8]})"] = _http(
            "GET", f"{stack.gateway}/admin/v1/tenants", {"authorization": f"Bearer {token}"}
        )
    admin("DisablePrincipal", pb.DisablePrincipalRequest(principal=principal.principal.id), platform)
    admin("WhoAmI", pb.WhoAmIRequest(), key)
    seen["REST whoami (disabled admin key)"] = _http("GET", f"{stack.gateway}/admin/v1/whoami", bearer)


def _upstream_credential(stack, admin: Admin, platform: str, m: Minted) -> None:
    """A backend credential set, rotated, read back over gRPC and REST, and used by Envoy."""
    name = f"leak-{uuid.uuid4().hex[:8]}"
    url = stack.endpoints()["demo_upstream"]
    m.watched["upstream credential"] = first = f"sk-upstream-{secrets.token_urlsafe(24)}"
    backend = pb.Backend(url=url, credential=first)
    assert admin("AddModel", pb.AddModelRequest(name=name, backend=backend), platform) is not None
    admin("GetModel", pb.GetModelRequest(name=name), platform)
    m.watched["rotated upstream credential"] = second = f"sk-upstream-{secrets.token_urlsafe(24)}"
    update = pb.UpdateBackendRequest(name=name, url=url, update_mask=["credential"], credential=second)
    assert admin("UpdateBackend", update, platform) is not None
    admin.seen[f"REST model {name}"] = _http(
        "GET", f"{stack.gateway}/admin/v1/models/{name}", {"authorization": f"Bearer {platform}"}
    )
    # Envoy sends it: the demo upstream (which serves only "demo", so it answers 404) records
    # the header. What the upstream recorded is the upstream's business and is not searched.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(openai.APIStatusError):
            stack.client(stack.demo_key).chat.completions.create(
                model=name, messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
        seen = upstream_requests(stack)
        if seen and seen[-1]["model"] == name:
            m.upstream_credential_sent = seen[-1]["headers"].get("authorization") == f"Bearer {second}"
            if m.upstream_credential_sent:
                return
        time.sleep(0.1)


def _read_everything(stack, admin: Admin, platform: str) -> None:
    """Every list of the admin API (all pages) over gRPC, and over REST."""
    for rpc, make in [
        ("ListTenants", pb.ListTenantsRequest),
        ("ListApiKeys", pb.ListApiKeysRequest),
        ("ListPrincipals", pb.ListPrincipalsRequest),
        ("ListAuditEvents", pb.ListAuditEventsRequest),
        ("ListModels", pb.ListModelsRequest),
        ("ListPlans", pb.ListPlansRequest),
        ("ListLimits", pb.ListLimitsRequest),
    ]:
        _every_page(admin, rpc, make, platform)
    admin("WhoAmI", pb.WhoAmIRequest(), platform)
    auth = {"authorization": f"Bearer {platform}"}
    for path in ["tenants", "keys", "principals", "audit?page_size=500", "models", "plans", "limits"]:
        admin.seen[f"REST /admin/v1/{path}"] = _http("GET", f"{stack.gateway}/admin/v1/{path}", auth)


def test_no_secret_leaks_anywhere(stack):
    platform = json.loads((stack.root / "admin.json").read_text())["token"]
    m = Minted(
        {
            "local admin token": platform,
            "pepper": (stack.root / "pepper").read_text().strip(),
            "demo key": stack.demo_key,
        }
    )
    found: dict[str, str] = {}  # where -> text to search
    with stack.admin_channel() as channel:
        admin = Admin(channel, found)
        tenant = admin("CreateTenant", pb.CreateTenantRequest(name=f"leak-{uuid.uuid4().hex[:8]}"), platform)
        assert tenant is not None
        _api_key_lifecycle(stack, admin, platform, tenant.tenant.id, m)
        _admin_key_lifecycle(stack, admin, platform, tenant.tenant.id, m)
        _upstream_credential(stack, admin, platform, m)
        _read_everything(stack, admin, platform)

    _flush_access_log(stack, found)
    found["Envoy config_dump"] = _http("GET", f"{stack.endpoints()['envoy_admin']}/config_dump?include_eds")
    for name, url in stack.endpoints()["metrics"].items():  # every process's Prometheus page
        found[f"{name} metrics"] = _http("GET", url)
    found["`tessera up` output"] = "".join(
        line for line in stack.output if not line.startswith(("Demo key (shown once):", "curl "))
    )
    for path in sorted(Path(stack.root).rglob("*")):
        if path.is_file() and path.name not in BY_DESIGN:
            found[str(path.relative_to(stack.root))] = path.read_bytes().decode("latin-1")

    assert all(m.watched.values())
    assert {"logs/access.log", "logs/control-plane.log", "tessera.db", "run/envoy.yaml"} <= set(found)
    assert "gen_ai_client_token_usage_bucket" in found["meter metrics"]  # the pages really were read
    assert '"configs"' in found["Envoy config_dump"], found["Envoy config_dump"][:300]
    leaks = [
        f"{name} in {where}"
        for name, secret in m.watched.items()
        for where, text in found.items()
        if any(needle in text for needle in _needles(secret))
    ]
    assert not leaks, "secrets leaked:\n  " + "\n  ".join(leaks)
    assert m.admin_key_works, {k: v for k, v in found.items() if "WhoAmI" in k}
    assert m.upstream_credential_sent  # the secret searched for really went through Envoy
