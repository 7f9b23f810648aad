"""Declarative documents and their CustomResourceDefinitions (tessera/resources.py,
control_plane/resources/documents.py): one schema, the protos; the committed CRDs and every
example document checked against it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from control_plane.resources.documents import parse_files
from tessera import resources
from tessera.admin.v1 import admin_pb2 as pb
from tessera.errors import InvalidArgumentError
from tests.resource_schemas import crd_schemas

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "k8s" / "crds"
EXAMPLES = ROOT / "docs" / "examples" / "resources"
EXAMPLE_FILES = [
    *sorted(EXAMPLES.glob("*.yaml")),
    *sorted((ROOT / "k8s" / "examples").glob("*/resources.yaml")),
]
K8S_VERSION = "1.30"


def crd_on_disk(kind: resources.Kind) -> dict[str, Any]:
    return yaml.safe_load((CRDS / f"{kind.plural}.yaml").read_text())


@pytest.mark.parametrize("kind", resources.KINDS, ids=lambda k: k.name)
def test_each_crd_is_a_valid_apiextensions_v1_object(kind):
    doc = crd_on_disk(kind)
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["metadata"]["name"] == f"{kind.plural}.tessera.dev"
    assert doc["spec"]["versions"][0]["subresources"] == {"status": {}}


def _structural(schema: dict[str, Any], path: str) -> None:
    """Kubernetes' structural-schema rules as far as these schemas use them: every node has a
    type, objects list their properties, arrays their items."""
    assert "type" in schema, f"{path}: no type"
    if schema["type"] == "object" and path != "metadata":
        for name, sub in schema.get("properties", {}).items():
            _structural(sub, f"{path}.{name}")
    if schema["type"] == "array":
        _structural(schema["items"], f"{path}[]")


@pytest.mark.parametrize("kind", resources.KINDS, ids=lambda k: k.name)
def test_each_crd_schema_is_structural_and_has_exactly_the_protos_fields(kind):
    schema = crd_on_disk(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    _structural(schema, "")
    spec = schema["properties"]["spec"]["properties"]
    assert set(spec) == {f.camelcase_name for f in kind.spec.DESCRIPTOR.fields}
    if kind.name == "Model":
        backend = spec["backends"]["items"]["properties"]
        assert "credential" not in backend  # a secret is no document field
        assert "hasCredential" not in backend
        assert "url" in backend
        assert spec["prices"]["items"]["properties"]["inputMicros"] == {
            "type": "integer",
            "format": "int64",
            "minimum": 0,
        }


def test_the_committed_crds_are_what_the_protos_generate():
    for kind in resources.KINDS:
        assert crd_on_disk(kind) == resources.crd(kind), f"k8s/crds/{kind.plural}.yaml is stale: run codegen"


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.relative_to(ROOT)}#{i}", doc)
        for path in EXAMPLE_FILES
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()), 1)
        if doc is not None
    ]


@pytest.mark.parametrize(("where", "doc"), example_documents(), ids=[w for w, _ in example_documents()])
def test_every_example_document_fits_its_crd_and_parses_as_its_spec(where, doc):
    kind = resources.BY_NAME[doc["kind"]]
    jsonschema.validate(doc, crd_schemas()[kind.name])
    spec = resources.parse_spec(kind, doc["spec"])
    assert resources.spec_dict(spec) == doc["spec"], f"{where}: not in the form documents are written"


def test_the_examples_cover_every_kind():
    assert {d["kind"] for _, d in example_documents()} == set(resources.BY_NAME)


def test_a_spec_round_trips_with_integers_as_numbers():
    spec = resources.parse_spec(
        resources.BY_NAME["Limit"], {"tenant": "a", "kind": "tokens", "window": "day", "limit": 2**40}
    )
    assert resources.spec_dict(spec) == {"tenant": "a", "kind": "tokens", "window": "day", "limit": 2**40}
    price = resources.parse_spec(
        resources.BY_NAME["Model"], {"prices": [{"effectiveTime": "2026-01-01", "inputMicros": "7"}]}
    )
    assert isinstance(price, pb.ModelSpec)
    assert resources.spec_dict(price)["prices"][0]["inputMicros"] == 7


@pytest.mark.parametrize(
    ("kind", "spec", "says"),
    [
        ("Model", {"backends": [{"url": "http://h:1", "credential": "sk-1"}]}, "spec.backends[0].credential"),
        ("Model", {"backends": [{"url": "http://h:1", "hasCredential": True}]}, "hasCredential"),
        ("Tenant", {"plann": "x"}, "plann"),
        ("Tenant", {"allowedModels": "one"}, "allowedModels"),
        ("Plan", {"priority": "high"}, "priority"),
        ("Limit", [], "mapping"),
    ],
)
def test_a_bad_spec_names_the_field(kind, spec, says):
    with pytest.raises(resources.SpecError) as err:
        resources.parse_spec(resources.BY_NAME[kind], spec)
    assert says in str(err.value)
    assert "sk-1" not in str(err.value)


def test_every_problem_of_a_set_is_reported_at_once_with_its_place():
    bad = (
        "apiVersion: tessera.dev/v1alpha1\nkind: Tenant\nmetadata: {name: a}\nspec: {x: 1}\n---\n"
        "apiVersion: tessera.dev/v1alpha1\nkind: Nope\nmetadata: {name: b}\n"
    )
    with pytest.raises(InvalidArgumentError) as err:
        parse_files([("one.yaml", bad), ("two.yaml", ": :")])
    message = str(err.value)
    assert "one.yaml#1:" in message
    assert "one.yaml#2: kind" in message
    assert "two.yaml: not YAML" in message


def test_an_alias_bomb_is_refused_before_it_expands():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(20)
    )
    with pytest.raises(InvalidArgumentError, match="aliases"):
        parse_files([("bomb.yaml", bomb)])


def test_kind_names_are_found_by_name_or_plural():
    assert resources.kind_of("tenants") is resources.BY_NAME["Tenant"]
    assert resources.kind_of("Limit") is resources.BY_NAME["Limit"]
    assert resources.kind_of("apikeys") is None
