"""Declarative resources: the five kinds, their documents and their CustomResourceDefinitions.

A document is ``{apiVersion: tessera.dev/v1alpha1, kind, metadata: {name}, spec}``; a kind's
``spec`` is one admin API message (``PlanSpec``, ``TenantSpec``, ``ModelSpec``, ``LimitSpec``,
``PrincipalSpec`` in ``proto/tessera/admin/v1/admin.proto``), in proto-JSON field names
(lowerCamelCase). The protos are the one schema: documents are parsed by them, and the CRDs'
structural schemas are generated from them (:func:`crd`, written by ``tessera.codegen``).

Used by the control plane (applying documents), the CLI (``tessera get``) and codegen; imports
only the generated messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tessera.admin.v1 import admin_pb2 as pb

GROUP = "tessera.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
MAX_NAME = 128


@dataclass(frozen=True, slots=True)
class Kind:
    name: str  # Plan
    plural: str  # plans
    spec: type[Message]  # pb.PlanSpec


# In dependency order: an apply creates and updates in this order and deletes in reverse.
KINDS = (
    Kind("Plan", "plans", pb.PlanSpec),
    Kind("Tenant", "tenants", pb.TenantSpec),
    Kind("Model", "models", pb.ModelSpec),
    Kind("Limit", "limits", pb.LimitSpec),
    Kind("Principal", "principals", pb.PrincipalSpec),
)
BY_NAME = {k.name: k for k in KINDS}
ORDER = {k.name: i for i, k in enumerate(KINDS)}

# Fields of shared messages that never appear in a document: secrets (write-only) and
# output-only flags. A document naming one is rejected; exports and CRDs leave them out.
NOT_IN_DOCUMENTS: dict[str, frozenset[str]] = {
    "tessera.admin.v1.Backend": frozenset({"credential", "has_credential"}),
}


def kind_of(word: str) -> Kind | None:
    """``Tenant``, ``tenant``, ``tenants`` → the Tenant kind (for ``tessera get KIND``)."""
    low = word.lower()
    return next((k for k in KINDS if low in {k.name.lower(), k.plural}), None)


class SpecError(ValueError):
    """A spec that does not parse as its kind's message (the message says which field)."""


def _forbidden(data: Any, desc: Any, path: str) -> str | None:
    """The first document field that must not be there (a secret or an output), as a path."""
    if not isinstance(data, dict):
        return None
    banned = NOT_IN_DOCUMENTS.get(desc.full_name, frozenset())
    for key, value in data.items():
        field = desc.fields_by_camelcase_name.get(key) or desc.fields_by_name.get(key)
        if field is None:
            continue  # unknown: the parser names it
        where = f"{path}.{field.camelcase_name}"
        if field.name in banned:
            return where
        if field.message_type is not None:
            items = value if field.is_repeated and isinstance(value, list) else [value]
            for i, item in enumerate(items):
                sub = f"{where}[{i}]" if field.is_repeated else where
                if not isinstance(item, dict):  # nothing but a mapping can hide a field
                    raise SpecError(f"{sub}: must be a mapping")
                if found := _forbidden(item, field.message_type, sub):
                    return found
    return None


_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field")
_NO_FIELD = re.compile(r'has no field named "([^"]{1,64})"')


def _parse_problem(exc: json_format.ParseError) -> str:
    """protobuf's message names the field, then echoes the value: keep the field only (a value
    may be a secret)."""
    text = str(exc)
    if m := _NO_FIELD.search(text):
        return f"unknown field {m.group(1)!r}"
    if names := _FAILED_FIELD.findall(text):
        return f"field {'.'.join(names)!r}: wrong type or value"
    return "does not parse"


def parse_spec(kind: Kind, data: Any) -> Message:
    """The spec message; unknown fields, wrong types and secrets are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError("spec: must be a mapping")
    if where := _forbidden(data, kind.spec.DESCRIPTOR, "spec"):
        msg = f"{where}: documents hold no secrets or output fields (set credentials imperatively)"
        raise SpecError(msg)
    try:
        return json_format.ParseDict(data, kind.spec())
    except json_format.ParseError as exc:
        raise SpecError(f"spec: {_parse_problem(exc)}") from None


def _ints(value: Any, desc: Any) -> Any:
    """proto-JSON writes 64-bit integers as strings; a document (and a CRD) has integers."""
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        field = desc.fields_by_camelcase_name[key]
        if field.message_type is not None:
            out[key] = (
                [_ints(x, field.message_type) for x in item]
                if field.is_repeated
                else _ints(item, field.message_type)
            )
        elif field.type in _INT64:
            out[key] = [int(x) for x in item] if field.is_repeated else int(item)
        else:
            out[key] = item
    return out


_INT64 = frozenset(
    {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
     FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
)  # fmt: skip


def spec_dict(spec: Message) -> dict[str, Any]:
    """The spec as a document writes it: lowerCamelCase, defaults left out, integers as numbers."""
    return _ints(json_format.MessageToDict(spec), spec.DESCRIPTOR)  # type: ignore[no-any-return]


def document(kind: Kind, name: str, spec: Message) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind.name, "metadata": {"name": name}, "spec": spec_dict(spec)}


# --- CustomResourceDefinitions ----------------------------------------------------------------

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    FieldDescriptor.TYPE_INT64: {"type": "integer", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "integer", "format": "int64", "minimum": 0},
}


def schema_of(desc: Any) -> dict[str, Any]:
    """A structural OpenAPI v3 schema of a message (every field typed, nothing left open)."""
    banned = NOT_IN_DOCUMENTS.get(desc.full_name, frozenset())
    props: dict[str, Any] = {}
    for field in desc.fields:
        if field.name in banned:
            continue
        if field.message_type is not None:
            item = schema_of(field.message_type)
        elif field.type in _SCALARS:
            item = dict(_SCALARS[field.type])
        else:  # a new field type in a spec message must be mapped here first
            msg = f"{desc.full_name}.{field.name}: no schema for field type {field.type}"
            raise TypeError(msg)
        props[field.camelcase_name] = {"type": "array", "items": item} if field.is_repeated else item
    return {"type": "object", "properties": props}


_CONDITION = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string"},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
    },
}


def crd(kind: Kind, spec: Any = None) -> dict[str, Any]:
    """The kind's CustomResourceDefinition (apiextensions.k8s.io/v1, namespaced, status
    subresource); ``spec``: the spec message's descriptor (default the imported one's)."""
    schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": schema_of(spec or kind.spec.DESCRIPTOR),
            "status": {
                "type": "object",
                "properties": {
                    "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
                    "conditions": {
                        "type": "array",
                        "items": _CONDITION,
                        "x-kubernetes-list-type": "map",
                        "x-kubernetes-list-map-keys": ["type"],
                    },
                },
            },
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.name,
                "listKind": f"{kind.name}List",
                "plural": kind.plural,
                "singular": kind.name.lower(),
                "categories": ["tessera"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {
                            "name": "Reason",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }
