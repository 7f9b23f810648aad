"""The admin REST API's OpenAPI document (tessera/openapi.py → tessera/admin/v1/openapi.json):
current, valid OpenAPI 3, one operation per ``google.api.http`` rule, the transcoder's JSON
mapping, and the Envoy routes that serve it without opening anything else under /admin/."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, timestamp_pb2
from openapi_spec_validator import validate

from control_plane.state import State
from control_plane.xds.listener import transcoder_config
from control_plane.xds.translate import resources_from_state
from tessera import codegen, openapi
from tessera.admin.v1 import admin_pb2
from tests.unit.test_translate import CFG

COMMITTED = codegen.ROOT / codegen.OPENAPI
DOC: dict[str, Any] = json.loads(COMMITTED.read_text())
RULES = {
    method.name: method.GetOptions().Extensions[annotations_pb2.http]
    for service in admin_pb2.DESCRIPTOR.services_by_name.values()
    for method in service.methods
    if method.GetOptions().HasExtension(annotations_pb2.http)
}
VERBS = ("get", "put", "post", "delete", "patch")


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, verb, op) for path, item in doc["paths"].items() for verb, op in item.items()]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_committed_document_is_what_codegen_makes(tmp_path: Path):
    codegen._generate(tmp_path)
    assert (tmp_path / codegen.OPENAPI).read_text() == COMMITTED.read_text()


def test_it_is_valid_openapi_3_and_every_ref_resolves():
    validate(DOC)
    assert DOC["openapi"].startswith("3.")
    for ref in _refs(DOC):
        node: Any = DOC
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert node, ref


def test_every_http_rule_is_exactly_one_operation():
    ops = {op["operationId"]: (path, verb) for path, verb, op in _operations(DOC)}
    assert len(ops) == len(_operations(DOC)), "operationIds are unique"
    for name, rule in RULES.items():
        verb = rule.WhichOneof("pattern")
        assert ops.pop(name) == (getattr(rule, verb), verb)
    assert ops == {"GetOpenApiDocument": (openapi.PATH, "get")}  # and nothing else
    assert len(RULES) > 40  # the annotations were read at all


def test_fields_are_path_parameters_query_parameters_or_the_body():
    for path, verb, op in _operations(DOC):
        if path == openapi.PATH:
            continue
        rule = RULES[op["operationId"]]
        request = admin_pb2.DESCRIPTOR.services_by_name[op["tags"][0]].methods_by_name[op["operationId"]]
        fields = {f.name for f in request.input_type.fields}
        params = op.get("parameters", [])
        in_path = {p["name"] for p in params if p["in"] == "path"}
        assert in_path == set(re.findall(r"\{(\w+)\}", path))
        assert all(p["required"] for p in params if p["in"] == "path")
        rest = {p["name"] for p in params if p["in"] == "query"}
        if rule.body == "*":
            assert rest == set()
            rest = set(op["requestBody"]["content"]["application/json"]["schema"]["properties"])
        else:
            assert "requestBody" not in op, f"{verb} {path}"
        assert in_path | rest == fields, op["operationId"]
        assert in_path.isdisjoint(rest)


def test_json_follows_what_the_transcoder_prints():
    # preserve_proto_field_names: proto names, not lowerCamelCase json_name.
    assert transcoder_config(b"")["print_options"]["preserve_proto_field_names"] is True
    schemas = DOC["components"]["schemas"]
    assert "allowed_models" in schemas["Tenant"]["properties"]
    allowed = schemas["Tenant"]["properties"]["allowed_models"]
    assert (allowed["type"], allowed["items"]) == ("array", {"type": "string"})
    # 64-bit integers are strings; 32-bit ones numbers.
    assert schemas["PlanLimit"]["properties"]["limit"]["type"] == "string"
    assert schemas["Plan"]["properties"]["priority"]["type"] == "integer"
    assert schemas["Plan"]["properties"]["limits"]["items"] == {"$ref": "#/components/schemas/PlanLimit"}
    # Errors: google.rpc.Status as JSON; a bearer admin token everywhere but this document.
    for _, _, op in _operations(DOC):
        if op["operationId"] != "GetOpenApiDocument":
            assert op["responses"]["default"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Status"
            }
    assert set(schemas["Status"]["properties"]) == {"code", "message", "details"}
    assert DOC["security"] == [{"adminToken": []}]
    assert DOC["components"]["securitySchemes"]["adminToken"] == {
        **DOC["components"]["securitySchemes"]["adminToken"],
        "type": "http",
        "scheme": "bearer",
    }
    assert DOC["paths"][openapi.PATH]["get"]["security"] == []
    # The protos' comments become descriptions.
    assert schemas["Tenant"]["properties"]["id"]["description"] == "immutable, minted by Tessera"


def _admin_set() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString((codegen.ROOT / codegen.DESCRIPTOR_SET).read_bytes())


def _admin_file(fds: descriptor_pb2.FileDescriptorSet) -> descriptor_pb2.FileDescriptorProto:
    return next(f for f in fds.file if f.name == "tessera/admin/v1/admin.proto")


def test_well_known_types_enums_and_int64_map_as_the_transcoder_prints_them():
    fds = _admin_set()
    timestamp = fds.file.add()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp)
    admin = _admin_file(fds)
    admin.dependency.append(timestamp.name)
    admin.enum_type.add(name="Colour").value.add(name="RED", number=0)
    tenant = next(m for m in admin.message_type if m.name == "Tenant")
    f = descriptor_pb2.FieldDescriptorProto
    tenant.field.add(name="seen", number=90, type=f.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp")
    tenant.field.add(name="colour", number=91, type=f.TYPE_ENUM, type_name=".tessera.admin.v1.Colour")
    tenant.field.add(name="offset", number=92, type=f.TYPE_INT64)
    props = openapi.document(fds.SerializeToString())["components"]["schemas"]["Tenant"]["properties"]
    assert props["seen"] == {"type": "string", "format": "date-time"}
    assert props["colour"] == {"type": "string", "enum": ["RED"]}
    assert props["offset"]["type"] == "string"


@pytest.mark.parametrize(
    "change",
    [
        lambda rule: setattr(rule, "body", "tenant"),  # a field as the body
        lambda rule: rule.additional_bindings.add(get="/admin/v1/t"),
        lambda rule: setattr(rule, "patch", "/admin/v1/tenants/{tenant=things/*}"),
    ],
)
def test_what_it_does_not_map_is_an_error_not_a_guess(change):
    fds = _admin_set()
    (method,) = (m for s in _admin_file(fds).service for m in s.method if m.name == "UpdateTenant")
    change(method.options.Extensions[annotations_pb2.http])
    with pytest.raises(openapi.UnsupportedProtoError):
        openapi.document(fds.SerializeToString())


def _routes(listener_or_routes: dict[str, Any]) -> list[dict[str, Any]]:
    return listener_or_routes["virtual_hosts"][0]["routes"]


def test_envoy_serves_it_before_the_admin_api_for_get_of_that_path_only():
    public = resources_from_state(State(), replace(CFG, admin_rest="public"))
    first, second = _routes(public.routes["tessera_routes"])[:2]
    assert first["match"] == {
        "path": "/admin/v1/openapi.json",
        "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
    }
    assert first["route"]["cluster"] == "tessera_control_plane_http"
    switches = first["typed_per_filter_config"]
    assert switches["envoy.filters.http.ext_authz"]["disabled"] is True
    assert second["match"] == {"prefix": "/admin/"}

    internal = resources_from_state(State(), replace(CFG, admin_rest="internal"))
    assert not [r for r in _routes(internal.routes["tessera_routes"]) if "/admin/" in json.dumps(r["match"])]
    hcm = internal.listeners["tessera_admin_rest"]["filter_chains"][0]["filters"][0]["typed_config"]
    own_first, own_second = _routes(hcm["route_config"])
    assert own_first["match"] == first["match"]
    assert own_first["route"] == first["route"]
    # The listener's transcoder would answer 404 for a path that is no RPC: off on this route only.
    assert own_first["typed_per_filter_config"] == {
        "envoy.filters.http.grpc_json_transcoder": switches["envoy.filters.http.grpc_json_transcoder"]
    }
    assert own_first["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]["disabled"] is True
    assert own_second["match"] == {"prefix": "/admin/"}
    assert "disabled" not in own_second["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]
