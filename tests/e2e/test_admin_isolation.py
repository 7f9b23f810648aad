"""Tenant isolation and RBAC of the admin API, over both of its transports.

Every test runs twice: over gRPC straight to the control plane, and over REST/JSON through
Envoy's grpc_json_transcoder (``{gateway}/admin/v1/...``, routes read from the proto's
``google.api.http`` annotations). Both answer with one normalized outcome, so one table of
expectations covers both. Resources of another tenant must be NOT_FOUND (exactly like missing
ones), a role too weak must be PERMISSION_DENIED, and a refused call must change nothing.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.api import annotations_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import MethodDescriptor

from tessera.admin.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.envoy

OK = "OK"
UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"
NOT_FOUND = "NOT_FOUND"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
ALREADY_EXISTS = "ALREADY_EXISTS"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
KNOWN = {
    OK,
    UNAUTHENTICATED,
    PERMISSION_DENIED,
    NOT_FOUND,
    INVALID_ARGUMENT,
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
}
# gRPC status -> HTTP status, as Envoy's transcoder (convert_grpc_status) must answer.
HTTP_STATUS = {
    UNAUTHENTICATED: 401,
    PERMISSION_DENIED: 403,
    NOT_FOUND: 404,
    INVALID_ARGUMENT: 400,
    ALREADY_EXISTS: 409,
    FAILED_PRECONDITION: 400,
}
GRPC_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
METHODS: dict[str, tuple[str, MethodDescriptor]] = {
    m.name: (service.name, m)
    for service in admin_pb2.DESCRIPTOR.services_by_name.values()
    for m in service.methods
}
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class Result:
    outcome: str  # OK, a gRPC status name from KNOWN, or "other: ..."
    body: dict[str, Any]  # the response as proto3 JSON (proto field names); {} on error
    message: str = ""
    http_status: int | None = None  # REST only


def _outcome(name: str) -> str:
    return name if name in KNOWN else f"other: {name}"


class GrpcTransport:
    name = "grpc"

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel

    def call(
        self, rpc: str, request: dict[str, Any], token: str | None, headers: dict[str, str] | None = None
    ) -> Result:
        service, method = METHODS[rpc]
        stub = getattr(admin_pb2_grpc, f"{service}Stub")(self._channel)
        msg = json_format.ParseDict(request, getattr(admin_pb2, method.input_type.name)())
        metadata = [(k.lower(), v) for k, v in (headers or {}).items()]
        if token is not None:
            metadata.append(("authorization", f"Bearer {token}"))
        try:
            resp = getattr(stub, rpc)(msg, metadata=metadata, timeout=15)
        except grpc.RpcError as exc:
            return Result(_outcome(exc.code().name), {}, exc.details() or "")
        body = json_format.MessageToDict(
            resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        return Result(OK, body)


class RestTransport:
    name = "rest"

    def __init__(self, gateway: str) -> None:
        self._gateway = gateway

    def call(
        self, rpc: str, request: dict[str, Any], token: str | None, headers: dict[str, str] | None = None
    ) -> Result:
        _, method = METHODS[rpc]
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        assert verb is not None, f"{rpc} has no google.api.http rule"
        fields = dict(request)

        def fill(m: re.Match[str]) -> str:
            return urllib.parse.quote(str(fields.pop(m.group(1), "")), safe="")

        path = re.sub(r"\{(\w+)\}", fill, getattr(rule, verb))
        data = None
        hdrs = dict(headers or {})
        if rule.body == "*":
            data = json.dumps(fields).encode()
            hdrs["content-type"] = "application/json"
        elif fields:
            path += "?" + urllib.parse.urlencode(fields, doseq=True)
        if token is not None:
            hdrs["authorization"] = f"Bearer {token}"
        req = urllib.request.Request(  # noqa: S310 - a fixed http:// gateway URL
            self._gateway + path, data=data, method=verb.upper(), headers=hdrs
        )
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310
                return Result(OK, json.loads(resp.read()), http_status=resp.status)
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            err = json.loads(raw)
            name = GRPC_CODE_NAMES[int(err["code"])]
            message = str(err.get("message", ""))
        except (ValueError, KeyError, TypeError):
            return Result(f"other: HTTP {status} {raw[:200]!r}", {}, http_status=status)
        if name in HTTP_STATUS and HTTP_STATUS[name] != status:
            return Result(f"other: {name} answered as HTTP {status}", {}, message, status)
        return Result(_outcome(name), {}, message, status)


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str


@dataclass(frozen=True)
class Key:
    id: str
    key: str


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    token: str


@dataclass(frozen=True)
class World:
    platform: str
    a: Tenant
    b: Tenant
    key_a: Key
    key_b: Key
    admin_a: Person
    viewer_a: Person
    admin_b: Person
    revoked: Person  # a tenant-admin of A whose principal was disabled (its admin key revoked)
    limit_a: str
    limit_b: str


def _uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def grpc_transport(stack) -> Iterator[GrpcTransport]:
    with stack.admin_channel() as channel:
        yield GrpcTransport(channel)


@pytest.fixture(scope="module")
def rest_transport(stack) -> RestTransport:
    return RestTransport(stack.gateway)


@pytest.fixture(params=["grpc", "rest"])
def transport(request) -> GrpcTransport | RestTransport:
    return request.getfixturevalue(f"{request.param}_transport")


def _ok(
    t: GrpcTransport | RestTransport,
    rpc: str,
    request: dict[str, Any],
    token: str,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    res = t.call(rpc, request, token, headers)
    assert res.outcome == OK, f"{rpc}({request}) as setup: {res.outcome} {res.message}"
    return res.body


@pytest.fixture(scope="module")
def world(stack, grpc_transport) -> World:
    platform = json.loads((stack.root / "admin.json").read_text())["token"]
    g = grpc_transport

    def tenant() -> Tenant:
        body = _ok(g, "CreateTenant", {"name": _uniq("iso")}, platform)["tenant"]
        return Tenant(body["id"], body["name"])

    def key(t: Tenant) -> Key:
        body = _ok(g, "CreateApiKey", {"tenant": t.id, "name": "iso"}, platform)
        return Key(body["id"], body["key"])

    def person(role: str, t: Tenant) -> Person:
        name = _uniq(role)
        body = _ok(
            g, "CreatePrincipal", {"name": name, "bindings": [{"role": role, "tenant_id": t.id}]}, platform
        )
        assert body["key"].startswith("tadm_")
        return Person(body["principal"]["id"], name, body["key"])

    def limit(t: Tenant) -> str:
        req = {"tenant": t.id, "kind": "requests", "window": "day", "limit": "1000000"}
        return str(_ok(g, "CreateLimit", req, platform)["limit"]["id"])

    a, b = tenant(), tenant()
    revoked = person("tenant-admin", a)
    _ok(g, "DisablePrincipal", {"principal": revoked.id}, platform)
    return World(
        platform=platform,
        a=a,
        b=b,
        key_a=key(a),
        key_b=key(b),
        admin_a=person("tenant-admin", a),
        viewer_a=person("tenant-viewer", a),
        admin_b=person("tenant-admin", b),
        revoked=revoked,
        limit_a=limit(a),
        limit_b=limit(b),
    )


def _all(t: GrpcTransport, rpc: str, token: str, **request: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    page = ""
    while True:
        body = _ok(t, rpc, {**request, "page_size": 500, "page_token": page}, token)
        items += body["items"]
        page = body["next_page_token"]
        if not page:
            return items


def snapshot(t: GrpcTransport, w: World) -> dict[str, Any]:
    """Everything a refused call might have changed, as the platform admin sees it."""
    return {
        "tenants": _all(t, "ListTenants", w.platform),
        "principals": _all(t, "ListPrincipals", w.platform),
        "keys": _all(t, "ListApiKeys", w.platform),
        "limits": _all(t, "ListLimits", w.platform),
        "plans": _all(t, "ListPlans", w.platform),
        "models": _all(t, "ListModels", w.platform),
        "audit": len(_all(t, "ListAuditEvents", w.platform)),
    }


def test_a_principal_admin_key_authenticates(transport, world):
    for person, role in [(world.admin_a, "tenant-admin"), (world.viewer_a, "tenant-viewer")]:
        res = transport.call("WhoAmI", {}, person.token)
        assert res.outcome == OK, res
        assert res.body["principal"]["id"] == person.id
        assert res.body["principal"]["bindings"] == [{"role": role, "tenant_id": world.a.id}]


Case = Callable[[World], tuple[str, dict[str, Any]]]

# Tenant-admin of A against tenant B's resources: all NOT_FOUND, like missing ones.
FOREIGN: dict[str, Case] = {
    "get-tenant-by-id": lambda w: ("GetTenant", {"tenant": w.b.id}),
    "get-tenant-by-name": lambda w: ("GetTenant", {"tenant": w.b.name}),
    "update-tenant": lambda w: ("UpdateTenant", {"tenant": w.b.id, "update_mask": ["plan"], "plan": ""}),
    "suspend-tenant": lambda w: ("SuspendTenant", {"tenant": w.b.id, "reason": "x"}),
    "resume-tenant": lambda w: ("ResumeTenant", {"tenant": w.b.id}),
    "delete-tenant": lambda w: ("DeleteTenant", {"tenant": w.b.id}),
    "get-key": lambda w: ("GetApiKey", {"id": w.key_b.id}),
    "revoke-key": lambda w: ("RevokeApiKey", {"id": w.key_b.id}),
    "rotate-key": lambda w: ("RotateApiKey", {"id": w.key_b.id, "grace": "60s"}),
    "create-key-by-id": lambda w: ("CreateApiKey", {"tenant": w.b.id, "name": "x"}),
    "create-key-by-name": lambda w: ("CreateApiKey", {"tenant": w.b.name}),
    "list-keys": lambda w: ("ListApiKeys", {"tenant": w.b.id}),
    "list-principals": lambda w: ("ListPrincipals", {"tenant": w.b.id}),
    "get-principal": lambda w: ("GetPrincipal", {"principal": w.admin_b.id}),
    "get-principal-by-name": lambda w: ("GetPrincipal", {"principal": w.admin_b.name}),
    "disable-principal": lambda w: ("DisablePrincipal", {"principal": w.admin_b.id}),
    "unbind-principal": lambda w: (
        "RemoveRoleBinding",
        {"principal": w.admin_b.id, "binding": {"role": "tenant-admin", "tenant_id": w.b.id}},
    ),
    "list-audit": lambda w: ("ListAuditEvents", {"tenant": w.b.id}),
    "list-limits": lambda w: ("ListLimits", {"tenant": w.b.id}),
    "query-usage": lambda w: ("QueryUsage", {"tenant": w.b.id, "group_by": "key"}),
    "list-invoices": lambda w: ("ListInvoices", {"tenant": w.b.id}),
    "preview-invoice": lambda w: ("PreviewInvoice", {"tenant": w.b.name}),
    "create-limit": lambda w: (
        "CreateLimit",
        {"tenant": w.b.id, "kind": "requests", "window": "minute", "limit": "5"},
    ),
}


@pytest.mark.parametrize("case", FOREIGN.values(), ids=FOREIGN.keys())
def test_tenant_admin_cannot_reach_another_tenant(transport, grpc_transport, world, case):
    rpc, request = case(world)
    before = snapshot(grpc_transport, world)
    res = transport.call(rpc, request, world.admin_a.token)
    assert res.outcome == NOT_FOUND, (rpc, request, res)
    assert world.b.id not in res.message or world.b.id in json.dumps(request)
    assert snapshot(grpc_transport, world) == before


def test_other_tenants_are_indistinguishable_from_missing_ones(transport, world):
    token = world.admin_a.token
    for rpc, field, real in [
        ("GetTenant", "tenant", world.b.name),
        ("GetTenant", "tenant", world.b.id),
        ("GetApiKey", "id", world.key_b.id),
        ("GetPrincipal", "principal", world.admin_b.id),
    ]:
        fake = real[:-4] + "zzzz"
        there, missing = transport.call(rpc, {field: real}, token), transport.call(rpc, {field: fake}, token)
        assert (there.outcome, missing.outcome) == (NOT_FOUND, NOT_FOUND), (rpc, there, missing)
        assert there.message.replace(real, "X") == missing.message.replace(fake, "X")
        assert there.http_status == missing.http_status


def test_tenant_admin_lists_only_its_own_tenant(transport, world):
    token = world.admin_a.token
    tenants = _ok(transport, "ListTenants", {}, token)["items"]
    assert [t["id"] for t in tenants] == [world.a.id]

    keys = _ok(transport, "ListApiKeys", {}, token)["items"]
    assert world.key_a.id in {k["id"] for k in keys}
    assert {k["tenant_id"] for k in keys} == {world.a.id}

    principals = _ok(transport, "ListPrincipals", {}, token)["items"]
    ids = {p["id"] for p in principals}
    assert {world.admin_a.id, world.viewer_a.id} <= ids
    assert world.admin_b.id not in ids
    assert world.b.id not in json.dumps(principals)

    limits = _ok(transport, "ListLimits", {}, token)["items"]
    assert [x["id"] for x in limits] == [world.limit_a]

    events = _ok(transport, "ListAuditEvents", {"page_size": 500}, token)["items"]
    assert events, "tenant A has audit events (its creation, its key, its principals)"
    assert {e["tenant_id"] for e in events} == {world.a.id}
    dumped = json.dumps(events)
    assert world.b.id not in dumped
    assert world.key_b.id not in dumped
    assert world.admin_b.id not in dumped

    me = _ok(transport, "WhoAmI", {}, token)["principal"]
    assert me["id"] == world.admin_a.id
    assert me["bindings"] == [{"role": "tenant-admin", "tenant_id": world.a.id}]


def test_tenant_viewer_reads_its_tenant(transport, world):
    token = world.viewer_a.token
    assert _ok(transport, "GetTenant", {"tenant": world.a.name}, token)["tenant"]["id"] == world.a.id
    keys = _ok(transport, "ListApiKeys", {}, token)["items"]
    assert world.key_a.id in {k["id"] for k in keys}
    assert {k["tenant_id"] for k in keys} == {world.a.id}
    assert _ok(transport, "GetApiKey", {"id": world.key_a.id}, token)["api_key"]["tenant_id"] == world.a.id
    assert _ok(transport, "ListAuditEvents", {"tenant": world.a.id}, token)["items"]
    assert world.key_a.key not in json.dumps(keys)
    assert "rows" in _ok(transport, "QueryUsage", {"tenant": world.a.id}, token)
    draft = _ok(transport, "PreviewInvoice", {"tenant": world.a.id}, token)["invoice"]
    assert (draft["tenant_id"], draft["status"]) == (world.a.id, "open")
    assert _ok(transport, "ListInvoices", {"tenant": world.a.id}, token)["items"] == []
    # ... and nothing of tenant B.
    assert transport.call("GetTenant", {"tenant": world.b.id}, token).outcome == NOT_FOUND
    assert transport.call("GetApiKey", {"id": world.key_b.id}, token).outcome == NOT_FOUND


VIEWER_WRITES: dict[str, Case] = {
    "create-key": lambda w: ("CreateApiKey", {"tenant": w.a.id, "name": "v"}),
    "revoke-key": lambda w: ("RevokeApiKey", {"id": w.key_a.id}),
    "rotate-key": lambda w: ("RotateApiKey", {"id": w.key_a.id, "grace": "60s"}),
    "create-principal": lambda w: (
        "CreatePrincipal",
        {"name": _uniq("v"), "bindings": [{"role": "tenant-viewer", "tenant_id": w.a.id}]},
    ),
    "promote-itself": lambda w: (
        "AddRoleBinding",
        {"principal": w.viewer_a.id, "binding": {"role": "tenant-admin", "tenant_id": w.a.id}},
    ),
    "disable-admin": lambda w: ("DisablePrincipal", {"principal": w.admin_a.id}),
    "unbind-admin": lambda w: (
        "RemoveRoleBinding",
        {"principal": w.admin_a.id, "binding": {"role": "tenant-admin", "tenant_id": w.a.id}},
    ),
    "suspend-tenant": lambda w: ("SuspendTenant", {"tenant": w.a.id}),
    "create-limit": lambda w: (
        "CreateLimit",
        {"tenant": w.a.id, "kind": "requests", "window": "minute", "limit": "5"},
    ),
    "close-invoices": lambda _w: ("CloseDueInvoices", {}),
}


@pytest.mark.parametrize("case", VIEWER_WRITES.values(), ids=VIEWER_WRITES.keys())
def test_tenant_viewer_cannot_write(transport, grpc_transport, world, case):
    rpc, request = case(world)
    before = snapshot(grpc_transport, world)
    res = transport.call(rpc, request, world.viewer_a.token)
    assert res.outcome == PERMISSION_DENIED, (rpc, request, res)
    assert snapshot(grpc_transport, world) == before


CREDENTIALS: dict[str, Callable[[World], str | None]] = {
    "none": lambda _w: None,
    "empty": lambda _w: "",
    "garbage": lambda _w: "garbage",
    "well-formed-unknown": lambda _w: "tadm_aaaaaaaaaaaa_" + "A" * 43,
    "gateway-api-key": lambda w: w.key_a.key,
    "revoked": lambda w: w.revoked.token,
    "platform-token-with-suffix": lambda w: w.platform + "x",
}


@pytest.mark.parametrize("credential", CREDENTIALS.values(), ids=CREDENTIALS.keys())
def test_bad_credentials_are_unauthenticated(transport, grpc_transport, world, credential):
    token = credential(world)
    before = snapshot(grpc_transport, world)
    for rpc, request in [
        ("ListTenants", {}),
        ("WhoAmI", {}),
        ("GetTenant", {"tenant": world.a.id}),
        ("ListApiKeys", {"tenant": world.a.id}),
        ("CreateApiKey", {"tenant": world.a.id}),
        ("RevokeApiKey", {"id": world.key_a.id}),
        ("CreateTenant", {"name": _uniq("unauth")}),
    ]:
        res = transport.call(rpc, request, token)
        assert res.outcome == UNAUTHENTICATED, (rpc, res)
        if transport.name == "rest":
            assert res.http_status == 401
        if token:
            assert token not in res.message
    assert snapshot(grpc_transport, world) == before


def _new_principal(*bindings: dict[str, str]) -> tuple[str, dict[str, Any]]:
    return "CreatePrincipal", {"name": _uniq("esc"), "bindings": list(bindings)}


PLATFORM_ADMIN = {"role": "platform-admin"}

# Tenant-admin of A trying to get more than it holds. (expected outcomes, request)
ESCALATIONS: dict[str, tuple[set[str], Case]] = {
    "create-platform-admin": ({PERMISSION_DENIED}, lambda _w: _new_principal(PLATFORM_ADMIN)),
    "create-platform-admin-next-to-own-role": (
        {PERMISSION_DENIED},
        lambda w: _new_principal({"role": "tenant-admin", "tenant_id": w.a.id}, PLATFORM_ADMIN),
    ),
    "create-admin-of-b": (
        {NOT_FOUND, PERMISSION_DENIED},
        lambda w: _new_principal({"role": "tenant-admin", "tenant_id": w.b.id}),
    ),
    "create-viewer-of-b-next-to-own-role": (
        {NOT_FOUND, PERMISSION_DENIED},
        lambda w: _new_principal(
            {"role": "tenant-viewer", "tenant_id": w.a.id}, {"role": "tenant-viewer", "tenant_id": w.b.id}
        ),
    ),
    "bind-itself-platform-admin": (
        {PERMISSION_DENIED},
        lambda w: ("AddRoleBinding", {"principal": w.admin_a.id, "binding": PLATFORM_ADMIN}),
    ),
    "bind-itself-admin-of-b": (
        {NOT_FOUND, PERMISSION_DENIED},
        lambda w: (
            "AddRoleBinding",
            {"principal": w.admin_a.id, "binding": {"role": "tenant-admin", "tenant_id": w.b.id}},
        ),
    ),
    "bind-viewer-platform-admin": (
        {PERMISSION_DENIED},
        lambda w: ("AddRoleBinding", {"principal": w.viewer_a.id, "binding": PLATFORM_ADMIN}),
    ),
    "bind-admin-of-b-to-a": (
        {NOT_FOUND, PERMISSION_DENIED},
        lambda w: (
            "AddRoleBinding",
            {"principal": w.admin_b.id, "binding": {"role": "tenant-viewer", "tenant_id": w.a.id}},
        ),
    ),
    "create-key-in-b": ({NOT_FOUND}, lambda w: ("CreateApiKey", {"tenant": w.b.id, "name": "esc"})),
    "change-own-plan-or-models": (
        {PERMISSION_DENIED},
        lambda w: (
            "UpdateTenant",
            {"tenant": w.a.id, "update_mask": ["allowed_models"], "allowed_models": ["demo"]},
        ),
    ),
    "suspend-own-tenant": ({PERMISSION_DENIED}, lambda w: ("SuspendTenant", {"tenant": w.a.id})),
    "delete-own-tenant": ({PERMISSION_DENIED}, lambda w: ("DeleteTenant", {"tenant": w.a.id})),
    "create-own-limit": (
        {PERMISSION_DENIED},
        lambda w: ("CreateLimit", {"tenant": w.a.id, "kind": "requests", "window": "minute", "limit": "9"}),
    ),
    "create-tenant": ({PERMISSION_DENIED}, lambda _w: ("CreateTenant", {"name": _uniq("esc")})),
    "create-plan": ({PERMISSION_DENIED}, lambda _w: ("CreatePlan", {"name": _uniq("esc")})),
    "update-plan-of-others": (
        {PERMISSION_DENIED, NOT_FOUND},
        lambda _w: ("UpdatePlan", {"plan": "no-such-plan", "update_mask": ["priority"], "priority": 9}),
    ),
    "add-model": (
        {PERMISSION_DENIED},
        lambda _w: ("AddModel", {"name": _uniq("esc"), "backend": {"url": "http://127.0.0.1:9"}}),
    ),
    "replace-demo-backends": (
        {PERMISSION_DENIED},
        lambda _w: (
            "AddModel",
            {"name": "demo", "backend": {"url": "http://127.0.0.1:9"}, "replace_backends": True},
        ),
    ),
}


@pytest.mark.parametrize("case", ESCALATIONS.values(), ids=ESCALATIONS.keys())
def test_escalation_is_refused_and_changes_nothing(transport, grpc_transport, world, case):
    expected, make = case
    rpc, request = make(world)
    before = snapshot(grpc_transport, world)
    res = transport.call(rpc, request, world.admin_a.token)
    assert res.outcome in expected, (rpc, request, res)
    assert snapshot(grpc_transport, world) == before
    me = _ok(transport, "WhoAmI", {}, world.admin_a.token)["principal"]
    assert me["bindings"] == [{"role": "tenant-admin", "tenant_id": world.a.id}]


def test_tenant_admin_manages_its_keys_and_its_audit_trail_shows_it(transport, world):
    token, me = world.admin_a.token, world.admin_a
    # Over REST, Envoy mints the request id: one a client sends must not reach the audit log.
    client_rid = f"client-chosen-{uuid.uuid4()}"
    hdrs = {"x-request-id": client_rid} if transport.name == "rest" else None
    created = _ok(transport, "CreateApiKey", {"tenant": world.a.name, "name": "own"}, token, hdrs)
    key_id, first = created["id"], created["key"]
    assert first.startswith(f"tsk_{key_id}_")
    assert created["api_key"]["tenant_id"] == world.a.id
    assert created["api_key"]["owner"] == me.id

    rotated = _ok(transport, "RotateApiKey", {"id": key_id, "grace": "60s"}, token, hdrs)
    second = rotated["key"]
    assert second.startswith(f"tsk_{rotated['secret_id']}_")
    assert second != first
    previous = rotated["api_key"]["previous_prefix"]
    assert previous
    assert first.startswith(previous)

    revoked = _ok(transport, "RevokeApiKey", {"id": key_id}, token, hdrs)
    assert revoked["api_key"]["status"] == "revoked"

    # A principal with a tenant role on its own tenant: a legitimate grant.
    new = _ok(
        transport,
        "CreatePrincipal",
        {"name": _uniq("grant"), "bindings": [{"role": "tenant-viewer", "tenant_id": world.a.id}]},
        token,
        hdrs,
    )
    assert new["key"].startswith("tadm_")
    whoami = _ok(transport, "WhoAmI", {}, new["key"])["principal"]
    assert whoami["bindings"] == [{"role": "tenant-viewer", "tenant_id": world.a.id}]

    events = _ok(
        transport, "ListAuditEvents", {"tenant": world.a.id, "actor": me.id, "page_size": 500}, token
    )["items"]
    mine = {e["action"]: e for e in events if e["target_id"] == key_id}
    assert set(mine) == {"api_key.create", "api_key.rotate", "api_key.revoke"}, events
    for action, e in mine.items():
        assert e["actor"] == me.id, action
        assert e["actor_name"] == me.name
        assert e["tenant_id"] == world.a.id
        assert e["target_type"] == "api_key"
        assert e["request_id"], action
        if transport.name == "rest":
            assert UUID_RE.match(e["request_id"]), e["request_id"]  # minted by Envoy
        dumped = json.dumps(e)
        for secret in (first, second):
            assert secret not in dumped, f"{action} audit event holds a secret"
            assert secret.split("_", 2)[2][8:] not in dumped
        assert json.loads(e["after"])["id"] == key_id
        if action != "api_key.create":
            assert json.loads(e["before"])["id"] == key_id
    assert json.loads(mine["api_key.revoke"]["after"])["status"] == "revoked"
    grants = [e for e in events if e["target_id"] == new["principal"]["id"]]
    assert [e["action"] for e in grants] == ["principal.create"]
    assert new["key"] not in json.dumps(grants)
    assert all(e["request_id"] != client_rid for e in events)
