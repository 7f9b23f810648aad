"""The admin REST API as an OpenAPI 3 document, derived from the admin protos' descriptors.

Dev-only: ``tessera.codegen`` writes it to ``tessera/admin/v1/openapi.json`` (checked current by
``make lint``) and the control plane serves that file. It must describe what Envoy's
grpc_json_transcoder really accepts and answers, as ``control_plane/xds/listener.py`` configures
it, so it follows the transcoder's rules rather than grpc-gateway's: proto field names
(``preserve_proto_field_names``), 64-bit integers as decimal strings, enums by name; path
variables from the ``google.api.http`` templates, ``body: "*"`` as the JSON body, and every
other field of a bodiless call as a query parameter. Errors are ``google.rpc.Status`` as JSON
(``convert_grpc_status``). Any proto construct this module does not map is an error, not a guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pb2

F = descriptor_pb2.FieldDescriptorProto
PACKAGE = "tessera.admin.v1"
PATH = "/admin/v1/openapi.json"  # where the control plane serves the document
SECURITY = "adminToken"
ERROR = "Status"

_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
_INT32 = {"type": "integer", "format": "int32"}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT64: _INT64,
    F.TYPE_SINT64: _INT64,
    F.TYPE_SFIXED64: _INT64,
    F.TYPE_UINT64: _UINT64,
    F.TYPE_FIXED64: _UINT64,
    F.TYPE_INT32: _INT32,
    F.TYPE_SINT32: _INT32,
    F.TYPE_SFIXED32: _INT32,
    F.TYPE_UINT32: _UINT32,
    F.TYPE_FIXED32: _UINT32,
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte"},
}
WELL_KNOWN: dict[str, dict[str, Any]] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
}
# What the transcoder answers for a gRPC error (convert_grpc_status), and for its own refusals.
STATUS_SCHEMA = {
    "type": "object",
    "description": "The gRPC status of a failed call (google.rpc.Status as JSON); the HTTP status "
    "follows the gRPC code (UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, "
    "INVALID_ARGUMENT and FAILED_PRECONDITION 400, ALREADY_EXISTS 409).",
    "properties": {
        "code": {"type": "integer", "format": "int32", "description": "gRPC status code"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object"}},
    },
}


class UnsupportedProtoError(ValueError):
    """A proto construct without a mapping here: extend this module, do not guess."""


def _text(comment: str) -> str:
    """A proto comment as Markdown: lines of a paragraph joined, paragraphs kept."""
    paragraphs = re.split(r"\n\s*\n", comment.strip())
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


class _Proto:
    """Message and enum types by full name; for the main file, each message's location path
    and the comments by location path."""

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto], main: str) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.paths: dict[str, tuple[int, ...]] = {}
        self.comments: dict[tuple[int, ...], str] = {}
        for f in files:
            scope = f".{f.package}" if f.package else ""
            self._index(scope, f.message_type, f.enum_type, (4,) if f.name == main else None)
            if f.name == main:
                for loc in f.source_code_info.location:
                    text = _text(loc.leading_comments or loc.trailing_comments)
                    if text:
                        self.comments[tuple(loc.path)] = text

    def _index(
        self,
        scope: str,
        messages: Iterable[descriptor_pb2.DescriptorProto],
        enums: Iterable[descriptor_pb2.EnumDescriptorProto],
        path: tuple[int, ...] | None,
    ) -> None:
        for e in enums:
            self.enums[f"{scope}.{e.name}"] = e
        for i, m in enumerate(messages):
            name = f"{scope}.{m.name}"
            self.messages[name] = m
            here = (*path, i) if path is not None else None
            if here is not None:
                self.paths[name] = here
            self._index(name, m.nested_type, m.enum_type, (*here, 3) if here is not None else None)


class _Schemas:
    """``components/schemas``: every message a document refers to, by its name in the package."""

    def __init__(self, proto: _Proto) -> None:
        self.proto = proto
        self.schemas: dict[str, dict[str, Any]] = {}

    def ref(self, type_name: str) -> dict[str, Any]:
        name = type_name.removeprefix(f".{PACKAGE}.")
        if name not in self.schemas:
            self.schemas[name] = {}  # reserved first: a message may refer to itself
            self.schemas[name] = self.object(type_name)
        return {"$ref": f"#/components/schemas/{name}"}

    def object(self, type_name: str, *, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        """A message as a JSON object; ``skip``: fields bound elsewhere (the path)."""
        fields = self.proto.messages[type_name].field
        properties = {
            f.name: self.described(type_name, f, self.field(f)) for f in fields if f.name not in skip
        }
        return {"type": "object", "properties": properties}

    def comment(self, type_name: str, field: descriptor_pb2.FieldDescriptorProto) -> str | None:
        """The field's comment in the proto (a description), if it has one."""
        where = self.proto.paths.get(type_name)
        if where is None:
            return None
        index = list(self.proto.messages[type_name].field).index(field)
        return self.proto.comments.get((*where, 2, index))

    def described(
        self, type_name: str, field: descriptor_pb2.FieldDescriptorProto, schema: dict[str, Any]
    ) -> dict[str, Any]:
        comment = self.comment(type_name, field)
        return {**schema, "description": comment} if comment else schema

    def field(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        entry = self.proto.messages.get(field.type_name)
        if entry is not None and entry.options.map_entry:
            return {"type": "object", "additionalProperties": self.field(entry.field[1])}
        one = self.single(field)
        return {"type": "array", "items": one} if field.label == F.LABEL_REPEATED else one

    def single(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if field.type in SCALARS:
            return dict(SCALARS[field.type])
        if field.type == F.TYPE_ENUM:
            return {"type": "string", "enum": [v.name for v in self.proto.enums[field.type_name].value]}
        if field.type_name in WELL_KNOWN:
            return dict(WELL_KNOWN[field.type_name])
        if field.type_name.startswith(f".{PACKAGE}."):
            return self.ref(field.type_name)
        msg = f"field {field.name}: no JSON mapping for {field.type_name}"
        raise UnsupportedProtoError(msg)


def _operation(
    schemas: _Schemas, service: str, method: descriptor_pb2.MethodDescriptorProto, rule: Any, doc: str | None
) -> tuple[str, str, dict[str, Any]]:
    verb = rule.WhichOneof("pattern")
    if verb == "custom" or rule.additional_bindings or rule.body not in {"", "*"} or rule.response_body:
        msg = f"{method.name}: only get/post/put/patch/delete with body '' or '*' are mapped"
        raise UnsupportedProtoError(msg)
    template = getattr(rule, verb)
    bound = re.findall(r"\{([^}]*)\}", template)
    if any(not re.fullmatch(r"\w+", v) for v in bound):
        msg = f"{method.name}: path variable in {template!r} is not a plain field name"
        raise UnsupportedProtoError(msg)
    request = schemas.proto.messages[method.input_type]
    fields = {f.name: f for f in request.field}
    params = [_param(schemas, method.input_type, fields[v], "path", schemas.single(fields[v])) for v in bound]
    op: dict[str, Any] = {"operationId": method.name, "tags": [service]}
    if doc:
        op["description"] = doc
    if rule.body == "*":  # an empty body is an empty message
        body = schemas.object(method.input_type, skip=frozenset(bound))
        op["requestBody"] = {"content": _json(body)}
    else:  # the transcoder takes every other field from the query string
        for f in request.field:
            if f.name in bound:
                continue
            if f.type == F.TYPE_MESSAGE and f.type_name not in WELL_KNOWN:
                msg = f"{method.name}: message field {f.name} as a query parameter is not mapped"
                raise UnsupportedProtoError(msg)
            params.append(_param(schemas, method.input_type, f, "query", schemas.field(f)))
    if params:
        op["parameters"] = params
    op["responses"] = {
        "200": {"description": "OK", "content": _json(schemas.ref(method.output_type))},
        "default": {"description": "An error", "content": _json({"$ref": f"#/components/schemas/{ERROR}"})},
    }
    return template, verb, op


def _param(
    schemas: _Schemas,
    type_name: str,
    field: descriptor_pb2.FieldDescriptorProto,
    where: str,
    schema: dict[str, Any],
) -> dict[str, Any]:
    param: dict[str, Any] = {"name": field.name, "in": where}
    if where == "path":
        param["required"] = True
    if comment := schemas.comment(type_name, field):
        param["description"] = comment
    return {**param, "schema": schema}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def document(descriptor_set: bytes, main: str = "tessera/admin/v1/admin.proto") -> dict[str, Any]:
    """The document for the services of ``main`` in a descriptor set (with imports and, for
    descriptions, source info)."""
    from google.api import annotations_pb2  # noqa: PLC0415 - dev-only; registers the http option

    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file
    proto = _Proto(files, main)
    (admin,) = (f for f in files if f.name == main)
    schemas = _Schemas(proto)
    paths: dict[str, dict[str, Any]] = {
        PATH: {
            "get": {
                "operationId": "GetOpenApiDocument",
                "tags": ["OpenApi"],
                "description": "This document. No credential needed: it describes the API's shape only.",
                "security": [],
                "responses": {"200": {"description": "OK", "content": _json({"type": "object"})}},
            }
        }
    }
    for s, service in enumerate(admin.service):
        for m, method in enumerate(service.method):
            if not method.options.HasExtension(annotations_pb2.http):
                continue
            rule = method.options.Extensions[annotations_pb2.http]
            template, verb, op = _operation(
                schemas, service.name, method, rule, proto.comments.get((6, s, 2, m))
            )
            if verb in paths.setdefault(template, {}):
                msg = f"{method.name}: {verb.upper()} {template} is another RPC's already"
                raise UnsupportedProtoError(msg)
            paths[template][verb] = op
    version = admin.package.rsplit(".", 1)[-1]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Tessera admin API",
            "version": version,
            "description": proto.comments.get((12,), ""),
        },
        "tags": [*({"name": service.name} for service in admin.service), {"name": "OpenApi"}],
        "paths": paths,
        "components": {
            "schemas": {**dict(sorted(schemas.schemas.items())), ERROR: STATUS_SCHEMA},
            "securitySchemes": {
                SECURITY: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin key (tadm_…) of a principal, or the local credential "
                    "of `tessera up` (admin.json in its data directory).",
                }
            },
        },
        "security": [{SECURITY: []}],
    }


def render(descriptor_set: bytes) -> str:
    """The document as committed: stable key order, two-space indent, a final newline."""
    return json.dumps(document(descriptor_set), indent=2, ensure_ascii=False) + "\n"
