"""The committed CRDs' schemas (k8s/crds/), closed: an unknown field is an error (the API server
would drop it silently), for checking documents and rendered objects."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CRDS = Path(__file__).resolve().parents[1] / "k8s" / "crds"


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    if out.get("type") == "object" and "properties" in out:
        out["additionalProperties"] = False
        out["properties"] = {k: closed(v) for k, v in out["properties"].items()}
    if out.get("type") == "array":
        out["items"] = closed(out["items"])
    return out


def crd_schemas() -> dict[str, dict[str, Any]]:
    """Kind → its object's closed schema (``metadata`` any object, as the API server has it)."""
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") != "CustomResourceDefinition":
            continue
        schema = closed(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}
        out[doc["spec"]["names"]["kind"]] = schema
    return out
