"""The admin REST API's OpenAPI document through the real Envoy (the session's stack, whose
admin REST API is on the gateway): served without a credential, the committed file, and what
the API really answers; its route opens no other path or method under /admin/."""

from __future__ import annotations

import http.client
import json
import urllib.parse
import uuid
from typing import Any

import jsonschema
import pytest

from tessera import codegen, openapi

pytestmark = pytest.mark.envoy


def _request(gateway: str, method: str, path: str, token: str | None = None) -> tuple[int, str, bytes]:
    """One request with ``path`` sent exactly as written (no client-side normalisation)."""
    url = urllib.parse.urlsplit(gateway)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=15)
    try:
        conn.request(method, path, headers={"authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type", ""), resp.read()
    finally:
        conn.close()


def _admin_token(stack) -> str:
    return str(json.loads((stack.root / "admin.json").read_text())["token"])


def _check(doc: dict[str, Any], schema: dict[str, Any], instance: Any, *, strict: bool) -> None:
    """``instance`` against an operation's schema, its $refs into the document's components.
    ``strict``: no property the document does not name (what a field renamed would break)."""
    components = json.loads(json.dumps(doc["components"]))
    if strict:
        for s in components["schemas"].values():
            s["additionalProperties"] = False
    jsonschema.validate(instance, {**schema, "components": components})


def test_the_document_is_served_without_a_credential_and_is_the_committed_one(stack):
    status, ctype, body = _request(stack.gateway, "GET", openapi.PATH)
    assert status == 200
    assert ctype.startswith("application/json")
    assert json.loads(body) == json.loads((codegen.ROOT / codegen.OPENAPI).read_text())


def test_a_documented_call_answers_as_documented(stack):
    _, _, raw = _request(stack.gateway, "GET", openapi.PATH)
    doc = json.loads(raw)
    op = doc["paths"]["/admin/v1/tenants"]["get"]
    assert op["operationId"] == "ListTenants"
    (page_size,) = (p["name"] for p in op["parameters"] if p["name"] == "page_size")
    # A query parameter by its documented name (the transcoder refuses unknown ones).
    status, ctype, body = _request(
        stack.gateway, "GET", f"/admin/v1/tenants?{page_size}=5", _admin_token(stack)
    )
    assert (status, ctype) == (200, "application/json")
    listed = json.loads(body)
    _check(doc, op["responses"]["200"]["content"]["application/json"]["schema"], listed, strict=True)
    assert listed["items"], "the stack has its demo tenant"
    # Every primitive field is printed, so every documented one is there.
    assert {k for t in listed["items"] for k in t} == set(
        doc["components"]["schemas"]["Tenant"]["properties"]
    )

    # An error: google.rpc.Status, as documented for every operation.
    status, _, body = _request(stack.gateway, "GET", "/admin/v1/tenants")
    assert status == 401
    error = json.loads(body)
    _check(doc, op["responses"]["default"]["content"]["application/json"]["schema"], error, strict=True)
    assert error["code"] == 16  # UNAUTHENTICATED


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/v1/openapi.jsonx"),
        ("GET", "/admin/v1/openapi.json/../tenants"),
        ("GET", "/admin/v1/openapi.json/%2e%2e/tenants"),
        ("GET", "/admin/v1/openapi.json/x"),
        ("GET", "/admin/v1/openapi.json%2F..%2Ftenants"),
        ("GET", "/admin/v1/openapi.json;/../tenants"),
        ("GET", "/admin/v1/OPENAPI.JSON"),
        ("POST", "/admin/v1/openapi.json"),
        ("PUT", "/admin/v1/openapi.json"),
        ("DELETE", "/admin/v1/openapi.json"),
    ],
)
def test_the_document_route_opens_nothing_else(stack, method, path):
    status, _, body = _request(stack.gateway, method, path)
    assert status != 200, f"{method} {path} answered without a credential"
    assert status < 500
    assert b'"openapi"' not in body
    assert b'"items"' not in body


def test_a_path_no_admin_method_has_is_a_json_404_in_the_apis_error_shape(stack):
    for path in ("/admin/v1/nothing", "/admin/v1/tenants/x/y/z", "/admin/v1/tenants/../nothing"):
        status, content_type, body = _request(stack.gateway, "GET", path, _admin_token(stack))
        assert status == 404, path
        assert content_type == "application/json", path
        assert json.loads(body)["code"] == 5, path  # google.rpc.Status, as the API's own errors


def test_a_model_name_with_a_slash_is_addressable_escaped(stack):
    """Hugging Face names (``org/model``) go in a path escaped (%2F); the gateway keeps an escaped
    slash as sent, so the admin API's {name} is the whole name."""
    name = f"org{uuid.uuid4().hex[:6]}/m1"
    stack.cli("models", "add", name, "--backend", "http://127.0.0.1:9")
    escaped = urllib.parse.quote(name, safe="")
    status, _, body = _request(stack.gateway, "GET", f"/admin/v1/models/{escaped}", _admin_token(stack))
    assert status == 200, body
    assert json.loads(body)["model"]["name"] == name
