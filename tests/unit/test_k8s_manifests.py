"""The Kubernetes manifests in ``k8s/`` and the bootstrap packing in ``envoy/`` (house style §2.9, §2.11).

Every file parses and every kustomization reference exists; every ``TESSERA_*`` name in ``k8s/``
is a real settings field; no secret value is committed. When ``kubectl`` is on PATH the overlays
and the examples are also built, every rendered object is validated against the Kubernetes
OpenAPI schemas (``kubernetes-validate``, offline, strict: an unknown field fails) or, for
cert-manager's and the Prometheus Operator's kinds, against a JSON schema of the fields used here;
and the rendered objects are checked: workload identities (issue 14), probes, the Envoy pod,
NetworkPolicies, what the PodMonitors scrape and the Grafana dashboard (issue 16); the image from
each overlay's ``images:`` entry, the meter in both overlays (under SQLite, on the control plane's
volume and node), the HPAs, and the GitOps example's resources ConfigMap (issue 18).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs installed (types-jsonschema)
import kubernetes_validate  # type: ignore[import-untyped]  # not typed
import pytest
import yaml
from pydantic import BaseModel

from control_plane.settings import ControlPlaneSettings
from ext_authz.settings import ExtAuthzSettings
from ratelimit.settings import RatelimitSettings
from tessera.identity import server_name, spiffe_id
from tessera.k8s_secrets import K8S_IDENTITIES, secret_name
from tests.resource_schemas import crd_schemas

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
ENVOY = ROOT / "envoy"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
EXAMPLES = sorted(p.parent for p in (K8S / "examples").glob("*/kustomization.yaml"))


def git_ignored(folder: Path) -> set[Path]:
    """Files under ``folder`` that git ignores (generated ones, such as an example's secrets.yaml)."""
    if shutil.which("git") is None:
        return set()
    out = subprocess.run(  # noqa: PLW1510 - no output (not a checkout) means nothing is ignored
        ["git", "-C", str(ROOT), "ls-files", "-oi", "--exclude-standard", "--", str(folder)],
        capture_output=True,
        text=True,
    ).stdout
    return {(ROOT / line).resolve() for line in out.splitlines()}


IGNORED = git_ignored(K8S)
YAML_FILES = sorted(
    p
    for p in [*K8S.rglob("*.yaml"), *K8S.rglob("*.yml"), ENVOY / "kustomization.yaml"]
    if p.resolve() not in IGNORED
)
KUSTOMIZATIONS = [p for p in YAML_FILES if p.name == "kustomization.yaml"]

SETTINGS: tuple[type[BaseModel], ...] = (ControlPlaneSettings, ExtAuthzSettings, RatelimitSettings)
PREFIX = "TESSERA_"
SECRETS_DIR = "/var/run/secrets/tessera"
ENV_NAME = re.compile(r"\bTESSERA_[A-Z0-9_]+")
# scheme://user:password@host (user may be empty, as in redis://:pw@host)
DSN_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:[^@\s/]+@")
KUBECTL = shutil.which("kubectl")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def walk(node: Any) -> Iterator[Any]:
    """Every dict, list and scalar in a parsed YAML document, depth first."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


# --- settings paths ---------------------------------------------------------------------------


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside a field annotation (``X``, ``X | None``), or None for a scalar."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = model_of(arg)
            if found is not None:
                return found
    return None


def resolves(model: type[BaseModel], path: list[str], *, leaf_may_be_model: bool) -> bool:
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    nested = model_of(field.annotation)
    if len(path) == 1:
        return leaf_may_be_model or nested is None
    return nested is not None and resolves(nested, path[1:], leaf_may_be_model=leaf_may_be_model)


def env_name_error(name: str) -> str | None:
    """None when ``TESSERA_A__B`` is field ``a.b`` of some service's settings, else why not."""
    if not name.startswith(PREFIX):
        return f"{name}: does not start with {PREFIX}"
    path = name.removeprefix(PREFIX).lower().split("__")
    if any(resolves(cls, path, leaf_may_be_model=False) for cls in SETTINGS):
        return None
    names = ", ".join(cls.__name__ for cls in SETTINGS)
    return f"{name}: no field {'.'.join(path)} (a scalar) in any of {names}"


def secret_file_error(file_name: str) -> str | None:
    """None when a secrets_dir file name is one pydantic-settings' default source reads.

    The default ``SecretsSettingsSource`` looks up ``tessera_<field>`` (case-insensitively) for
    each top-level field only; it does not split on ``__``, so a nested model is one JSON file.
    """
    lowered = file_name.lower()
    if not lowered.startswith(PREFIX.lower()):
        return f"{file_name}: a secrets_dir file must be named {PREFIX.lower()}<field>"
    field = lowered.removeprefix(PREFIX.lower())
    if "__" in field:
        return (
            f"{file_name}: the default secrets source does not split on '__'; name the file after the "
            f"top-level field ({PREFIX.lower()}{field.split('__')[0]}) and put JSON in it"
        )
    if any(resolves(cls, [field], leaf_may_be_model=True) for cls in SETTINGS):
        return None
    return f"{file_name}: no top-level settings field {field!r}"


@pytest.mark.parametrize(
    "name",
    [
        "TESSERA_DATABASE__URL",
        "TESSERA_REDIS__URL",
        "TESSERA_GRPC__PORT",
        "TESSERA_POLICY__URL",
        "TESSERA_PEPPER__FILE",
        "TESSERA_GATEWAY__CONTROL_PLANE_HTTP_HOST",
        "TESSERA_ADMIN_TOKEN",
        "TESSERA_WORKERS",
    ],
)
def test_real_settings_fields_resolve(name: str) -> None:
    assert env_name_error(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "TESSERA_DATABSE__URL",  # typo in the model
        "TESSERA_DATABASE__URI",  # typo in the field
        "TESSERA_DATABASE_URL",  # single underscore: not nested
        "TESSERA_DATABASE",  # a model, not a value
        "TESSERA_GRPC__PORT__X",  # too deep
        "TESSERA_LOG___LEVEL",
        "TESSERA_DATA_DIR",  # the CLI's own, no service reads it
    ],
)
def test_unknown_names_are_rejected(name: str) -> None:
    assert env_name_error(name) is not None


@pytest.mark.parametrize(
    ("file_name", "ok"),
    [
        ("tessera_database", True),
        ("tessera_admin_token", True),
        ("TESSERA_REDIS", True),
        ("TESSERA_DATABASE__URL", False),
        ("tessera_databse", False),
        ("database", False),
    ],
)
def test_secret_file_names(file_name: str, ok: bool) -> None:
    assert (secret_file_error(file_name) is None) is ok


# --- the files --------------------------------------------------------------------------------


def test_there_are_manifests() -> None:
    assert (K8S / "base" / "kustomization.yaml").is_file()
    assert {p.name for p in OVERLAYS} >= {"sqlite", "postgres"}


def referenced_paths(kustomization: Path) -> Iterator[tuple[str, Path]]:
    (doc,) = load(kustomization)
    here = kustomization.parent
    for key in ("resources", "components", "patchesStrategicMerge", "configurations"):
        for entry in doc.get(key) or []:
            yield key, here / entry
    for patch in doc.get("patches") or []:
        if "path" in patch:
            yield "patches", here / patch["path"]
    for gen in doc.get("configMapGenerator") or []:
        for entry in [*gen.get("files", []), *gen.get("envs", [])]:
            yield "configMapGenerator", here / entry.rpartition("=")[2]


# Kustomize transformer configurations (``configurations:``): YAML, but not Kubernetes objects.
TRANSFORMER_CONFIGS = sorted(
    {t.resolve() for k in KUSTOMIZATIONS for key, t in referenced_paths(k) if key == "configurations"}
)
TRANSFORMER_KEYS = {"varReference", "nameReference", "namespace", "commonLabels", "images"}


@pytest.mark.parametrize("path", [p for p in YAML_FILES if p.resolve() not in TRANSFORMER_CONFIGS], ids=rel)
def test_yaml_parses_into_objects(path: Path) -> None:
    docs = load(path)
    assert docs, f"{rel(path)} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{rel(path)}: a document is not a mapping"
        assert {"apiVersion", "kind"} <= doc.keys(), f"{rel(path)}: a document lacks apiVersion/kind"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=rel)
def test_kustomization_references_exist(kustomization: Path) -> None:
    """Every reference exists, except a generated file that git ignores (an example's secrets.yaml)."""
    missing = []
    for key, target in referenced_paths(kustomization):
        if "://" in str(target):
            missing.append(f"{key}: {target} is remote; keep every reference in this repository")
        elif target.is_dir():
            if not (target / "kustomization.yaml").is_file():
                missing.append(f"{key}: {rel(target.resolve())} has no kustomization.yaml")
        elif not target.is_file() and not is_ignored(target):
            missing.append(f"{key}: {target} does not exist (and is not a git-ignored generated file)")
    assert not missing, f"{rel(kustomization)}:\n" + "\n".join(missing)


def is_ignored(path: Path) -> bool:
    if shutil.which("git") is None:
        return False
    return (
        subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(path)], check=False).returncode == 0
    )


@pytest.mark.parametrize("path", TRANSFORMER_CONFIGS, ids=rel)
def test_transformer_configurations(path: Path) -> None:
    (doc,) = load(path)
    assert isinstance(doc, dict)
    assert doc.keys() <= TRANSFORMER_KEYS, f"{rel(path)}: {doc.keys() - TRANSFORMER_KEYS}"


def test_every_manifest_is_used() -> None:
    used = {target.resolve() for k in KUSTOMIZATIONS for _, target in referenced_paths(k)}
    orphans = [rel(p) for p in YAML_FILES if p.name != "kustomization.yaml" and p.resolve() not in used]
    assert not orphans, f"listed by no kustomization.yaml: {orphans}"


def test_base_packs_the_envoy_bootstrap() -> None:
    (base,) = load(K8S / "base" / "kustomization.yaml")
    assert "../../envoy" in base["resources"]
    (envoy,) = load(ENVOY / "kustomization.yaml")
    (gen,) = envoy["configMapGenerator"]
    assert gen["name"] == "tessera-envoy-bootstrap"
    assert gen["files"] == ["bootstrap.yaml"]


def test_every_tessera_env_name_is_a_settings_field() -> None:
    errors = sorted(
        {
            f"{rel(path)}: {error}"
            for path in YAML_FILES
            for name in ENV_NAME.findall(path.read_text())
            if (error := env_name_error(name)) is not None
        }
    )
    assert not errors, "unknown TESSERA_* settings:\n" + "\n".join(errors)


def test_secrets_dir_files_are_settings_fields() -> None:
    errors = [
        f"{rel(path)}: {error}"
        for path in YAML_FILES
        for doc in load(path)
        for node in walk(doc)
        if isinstance(node, dict) and isinstance(node.get("secret"), dict)
        for item in node["secret"].get("items") or []
        if item["path"].lower().startswith(PREFIX.lower()) or "__" in item["path"]
        if (error := secret_file_error(item["path"])) is not None
    ]
    assert not errors, "\n".join(errors)


def test_no_secret_values_are_committed() -> None:
    errors = []
    for path in YAML_FILES:
        for doc in load(path):
            if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                errors.append(f"{rel(path)}: Secret {doc['metadata']['name']} carries values")
            if doc.get("kind") == "Kustomization" and doc.get("secretGenerator"):
                errors.append(f"{rel(path)}: secretGenerator puts secret values in the repository")
            errors.extend(
                f"{rel(path)}: a DSN with a password: {node!r}"
                for node in walk(doc)
                if isinstance(node, str) and DSN_WITH_PASSWORD.search(node)
            )
    assert not errors, "\n".join(errors)


def test_dsn_check_can_fail() -> None:
    assert DSN_WITH_PASSWORD.search("postgresql+psycopg://tessera:hunter2@db:5432/tessera")
    assert DSN_WITH_PASSWORD.search("redis://:hunter2@redis:6379/0")
    assert not DSN_WITH_PASSWORD.search("redis://redis:6379/0")
    assert not DSN_WITH_PASSWORD.search("sqlite+aiosqlite:////data/tessera.db")
    assert not DSN_WITH_PASSWORD.search("http://127.0.0.1:9901/server_info")


def test_no_python_files() -> None:
    found = [rel(p) for folder in (K8S, ENVOY) for p in folder.rglob("*.py")]
    assert not found, f"no .py files in k8s/ or envoy/ (house style §2.11): {found}"


# --- the built overlays -----------------------------------------------------------------------

IDENTITY_DIR = "/etc/tessera/identity"
IDENTITY_FILES = {
    "TESSERA_IDENTITY__CERT_FILE": "tls.crt",
    "TESSERA_IDENTITY__KEY_FILE": "tls.key",
    "TESSERA_IDENTITY__CA_FILE": "ca.crt",
}
GATEWAY_TLS_DIR = "/etc/tessera/gateway-tls"
GATEWAY_TLS_SECRET = "tessera-gateway-tls"
SERVED = {
    "control-plane": "tessera-control-plane",
    "ext-authz": "tessera-ext-authz",
    "ratelimit": "tessera-ratelimit",
}
IDENTITY_USAGES = {"server auth", "client auth", "digital signature", "key encipherment"}
ADMIN_SOCKET = "/var/run/envoy/admin.sock"
STATS_PORT = 9902
VARIANTS = [*OVERLAYS, *EXAMPLES]


def identity_uri(component: str, namespace: str) -> str:
    """Every workload identity's SPIFFE ID (Envoy's names its node: every pod shares one)."""
    return spiffe_id(component, namespace, K8S_IDENTITIES[component])


def stand_in_secrets(namespace: str = "default") -> str:
    """What ``tessera identity k8s-secrets`` writes, less the keys: a kubernetes.io/tls Secret each."""
    return yaml.safe_dump_all(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": secret_name(component), "namespace": namespace},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "", "tls.key": "", "ca.crt": ""},
        }
        for component in K8S_IDENTITIES
    )


# Generated files an example lists (git-ignored), and the stand-in a test build uses.
STAND_INS = {"secrets.yaml": stand_in_secrets}


def kustomize(folder: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    result = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda p: p.name)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every overlay, and every example (a copy of k8s/ with stand-ins for its generated files)."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    folder: Path = request.param
    if folder in EXAMPLES:
        copy_root = tmp_path_factory.mktemp(folder.name)
        shutil.copytree(K8S, copy_root / "k8s", ignore=shutil.ignore_patterns(*STAND_INS))
        shutil.copytree(ENVOY, copy_root / "envoy")
        folder = copy_root / folder.relative_to(ROOT)
        for _, target in referenced_paths(folder / "kustomization.yaml"):
            if not target.exists():
                assert target.name in STAND_INS, f"no stand-in for the generated {target.name}"
                target.write_text(STAND_INS[target.name]())
    return kustomize(folder)


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(spec) if c["name"] == name]
    return found


def runs_as(c: dict[str, Any]) -> str | None:
    """The identity a container presents: a service (``tessera X serve``), the meter, Envoy; or None."""
    command, args = c.get("command", []), c.get("args", [])
    if command == ["tessera"] and args[-1:] == ["serve"]:
        return str(args[0])
    if command == ["tessera", "meter"]:
        return "meter"
    if command == ["envoy"]:
        return "envoy"
    return None


def mounted(spec: dict[str, Any], c: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mountPath -> (the volumeMount, its volume)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in c.get("volumeMounts", [])}


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def test_config_maps_referenced_exist(built: list[dict[str, Any]]) -> None:
    config_maps = {o["metadata"]["name"] for o in built if o["kind"] == "ConfigMap"}
    refs = {
        node[key]["name"]
        for _, spec in pod_specs(built)
        for node in walk(spec)
        if isinstance(node, dict)
        for key in ("configMapRef", "configMap")
        if isinstance(node.get(key), dict)
    }
    assert refs
    assert refs <= config_maps
    assert any(name.startswith("tessera-envoy-bootstrap-") for name in refs), "hash suffix not applied"


def test_every_volume_mount_has_its_volume(built: list[dict[str, Any]]) -> None:
    for where, spec in pod_specs(built):
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in containers(spec):
            missing = {m["name"] for m in c.get("volumeMounts", [])} - volumes
            assert not missing, f"{where}/{c['name']}: {missing}"


def test_containers_are_locked_down(built: list[dict[str, Any]]) -> None:
    errors = []
    for where, spec in pod_specs(built):
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            errors.append(f"{where}: runAsNonRoot")
        for c in containers(spec):
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{where}/{c['name']}: readOnlyRootFilesystem, no privilege escalation")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                errors.append(f"{where}/{c['name']}: drop ALL capabilities")
            if not {"requests", "limits"} <= c.get("resources", {}).keys():
                errors.append(f"{where}/{c['name']}: resource requests and limits")
    assert not errors, "\n".join(errors)


# --- schemas ----------------------------------------------------------------------------------

# The Kubernetes version whose OpenAPI schemas (shipped in kubernetes-validate, no network)
# every object is checked against: the oldest these manifests claim. Strict: unknown fields fail.
K8S_VERSION = "1.30"

# cert-manager's kinds are CRDs, not in those schemas: a JSON schema of the fields used here,
# after cert-manager.io/v1's CRD (names, types, enums), closed like the strict schemas. A field
# the CRD has but these manifests do not use fails too: add it here from the CRD when you use it.
_GO_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_CERT_MANAGER_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]  # fmt: skip


def _closed(properties: dict[str, Any], required: tuple[str, ...] = (), **more: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(required),
        **more,
    }


def _cert_manager_kind(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _crd_kind("cert-manager.io/v1", kind, spec)


def _crd_kind(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    metadata = _closed(
        {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": _STRING_MAP,
            "annotations": _STRING_MAP,
        },
        ("name",),
    )
    return _closed(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": metadata,
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


CERT_MANAGER_SCHEMAS: dict[str, dict[str, Any]] = {
    "Certificate": _cert_manager_kind(
        "Certificate",
        _closed(
            {
                "secretName": {"type": "string", "minLength": 1},
                "issuerRef": _closed(
                    {"group": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"}},
                    ("name",),
                ),
                "commonName": {"type": "string", "maxLength": 64},
                "isCA": {"type": "boolean"},
                "dnsNames": _NAMES,
                "uris": _NAMES,
                "duration": _GO_DURATION,
                "renewBefore": _GO_DURATION,
                "privateKey": _closed(
                    {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    }
                ),
                "usages": {"type": "array", "items": {"enum": _CERT_MANAGER_USAGES}},
            },
            ("issuerRef", "secretName"),
        ),
    ),
    "Issuer": _cert_manager_kind(
        "Issuer",
        # exactly one issuer type
        _closed(
            {"selfSigned": _closed({}), "ca": _closed({"secretName": {"type": "string"}}, ("secretName",))},
            minProperties=1,
            maxProperties=1,
        ),
    ),
}

# The Prometheus Operator's kinds (monitoring.coreos.com/v1's CRDs, the same way): the fields used
# in k8s/components/observability.
_PROM_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_RELABEL_ACTIONS = [
    "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap", "LabelMap",
    "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase", "uppercase", "Uppercase",
    "keepequal", "KeepEqual", "dropequal", "DropEqual",
]  # fmt: skip
_RELABELINGS = {
    "type": "array",
    "items": _closed(
        {
            "action": {"enum": _RELABEL_ACTIONS},
            "sourceLabels": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
            },
            "separator": {"type": "string"},
            "regex": {"type": "string"},
            "modulus": {"type": "integer"},
            "targetLabel": {"type": "string"},
            "replacement": {"type": "string"},
        }
    ),
}
MONITORING_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": _crd_kind(
        "monitoring.coreos.com/v1",
        "PodMonitor",
        _closed(
            {
                "selector": _closed({"matchLabels": _STRING_MAP}),
                "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": _NAMES}),
                "jobLabel": {"type": "string"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "items": _closed(
                        {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _PROM_DURATION,
                            "scrapeTimeout": _PROM_DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": _RELABELINGS,
                            "metricRelabelings": _RELABELINGS,
                        }
                    ),
                },
            },
            ("selector",),
        ),
    ),
    "PrometheusRule": _crd_kind(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _closed(
            {
                "groups": {
                    "type": "array",
                    "items": _closed(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _PROM_DURATION,
                            "rules": {
                                "type": "array",
                                "items": _closed(
                                    {
                                        "alert": {"type": "string", "minLength": 1},
                                        "record": {"type": "string", "minLength": 1},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": _PROM_DURATION,
                                        "keep_firing_for": _PROM_DURATION,
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                    ("expr",),
                                    # one of record and alert
                                    oneOf=[{"required": ["alert"]}, {"required": ["record"]}],
                                ),
                            },
                        },
                        ("name",),
                    ),
                }
            }
        ),
    ),
}
CRD_SCHEMAS = {
    "cert-manager.io": CERT_MANAGER_SCHEMAS,
    "monitoring.coreos.com": MONITORING_SCHEMAS,
    "tessera.dev": crd_schemas(),  # Tessera's own kinds: the committed CRDs' schemas, closed
}


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Why ``doc`` does not match its kind's schema; empty when it does."""
    where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    group = str(doc.get("apiVersion", "")).partition("/")[0]
    if group in CRD_SCHEMAS:
        schema = CRD_SCHEMAS[group].get(str(doc.get("kind")))
        if schema is None:
            return [f"{where}: no schema for this {group} kind (add one to CRD_SCHEMAS)"]
        found = jsonschema.Draft202012Validator(schema).iter_errors(doc)
        return [f"{where}: {'.'.join(map(str, e.absolute_path)) or '(object)'}: {e.message}" for e in found]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.path)) or '(object)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]
    return []


def test_every_rendered_object_matches_its_schema(built: list[dict[str, Any]]) -> None:
    errors = [error for doc in built for error in schema_errors(doc)]
    assert not errors, "\n".join(errors)


def test_cert_manager_schemas_are_schemas() -> None:
    for schema in CERT_MANAGER_SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_monitoring_schemas_are_schemas() -> None:
    for schema in MONITORING_SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def _doc(path: str, kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in load(K8S / path) if d["kind"] == kind and name in (None, d["metadata"]["name"]))


def _rename(node: dict[str, Any], old: str, new: str) -> None:
    node[new] = node.pop(old)


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = doc["spec"]["template"]["spec"]["containers"][0]
    return first


DEPLOYMENT = ("base/ext-authz-deployment.yaml", "Deployment", None)
SERVICE = ("base/envoy-service.yaml", "Service", None)
POLICY = ("base/network-policies.yaml", "NetworkPolicy", None)
CERTIFICATE = ("components/cert-manager/identities.yaml", "Certificate", None)
CA_ISSUER = ("components/cert-manager/issuers.yaml", "Issuer", "tessera-ca")
POD_MONITOR = ("components/observability/pod-monitors.yaml", "PodMonitor", "tessera-meter")
RULE = ("components/observability/prometheus-rule.yaml", "PrometheusRule", None)


# (source file, kind, name or None for the first) and how it is broken
@pytest.mark.parametrize(
    ("source", "breaks"),
    [
        pytest.param(
            DEPLOYMENT, lambda d: _rename(_container(d), "volumeMounts", "volumeMount"), id="volumeMount"
        ),
        pytest.param(
            DEPLOYMENT,
            lambda d: _rename(_container(d)["readinessProbe"]["httpGet"], "path", "paht"),
            id="paht",
        ),
        pytest.param(SERVICE, lambda d: d["spec"]["ports"][0].update(port="443"), id="port-as-text"),
        pytest.param(POLICY, lambda d: _rename(d["spec"], "podSelector", "podSelecter"), id="podSelecter"),
        pytest.param(CERTIFICATE, lambda d: _rename(d["spec"], "dnsNames", "dnsName"), id="dnsName"),
        pytest.param(
            CERTIFICATE, lambda d: d["spec"]["privateKey"].update(algorithm="EC"), id="algorithm-EC"
        ),
        pytest.param(CERTIFICATE, lambda d: d["spec"].update(usages=["server-auth"]), id="usage-server-auth"),
        pytest.param(CERTIFICATE, lambda d: d["spec"].pop("issuerRef"), id="no-issuerRef"),
        pytest.param(CA_ISSUER, lambda d: d["spec"].update(selfSigned={}), id="two-issuer-types"),
        pytest.param(
            SERVICE, lambda d: d.update(apiVersion="example.com/v1", kind="Widget"), id="unknown-kind"
        ),
        pytest.param(
            POD_MONITOR,
            lambda d: _rename(d["spec"], "podMetricsEndpoints", "podMetricEndpoints"),
            id="podMetric",
        ),
        pytest.param(
            POD_MONITOR, lambda d: d["spec"]["podMetricsEndpoints"][0].update(port=9090), id="port-as-number"
        ),
        pytest.param(
            RULE, lambda d: d["spec"]["groups"][0]["rules"][0].update(record="x"), id="alert-and-record"
        ),
        pytest.param(
            RULE, lambda d: d["spec"]["groups"][0]["rules"][0].update({"for": "5 min"}), id="for-5-min"
        ),
        pytest.param(
            RULE,
            lambda d: d.update(apiVersion="monitoring.coreos.com/v1", kind="AlertRule"),
            id="unknown-crd-kind",
        ),
    ],
)
def test_schema_validation_rejects_a_broken_object(
    source: tuple[str, str, str | None], breaks: Callable[[dict[str, Any]], object]
) -> None:
    doc = _doc(*source)
    assert not schema_errors(doc), "the unbroken object must pass for the broken one to mean anything"
    broken = copy.deepcopy(doc)
    breaks(broken)
    assert schema_errors(broken), "accepted"


# --- workload identities (issue 14) -----------------------------------------------------------


def test_every_identity_is_mounted_with_its_settings(built: list[dict[str, Any]]) -> None:
    """Each service, the meter and Envoy mount their own identity Secret read-only at
    /etc/tessera/identity; the Python ones are told the files and the pod's namespace. No other
    container mounts one, and the shared ConfigMap names none (it reaches every container)."""
    seen = set()
    for where, spec in pod_specs(built):
        for c in containers(spec):
            component, at = runs_as(c), mounted(spec, c)
            if component is None:
                assert IDENTITY_DIR not in at, f"{where}/{c['name']}: mounts an identity it does not use"
                continue
            seen.add(component)
            assert IDENTITY_DIR in at, f"{where}/{c['name']}: no identity"
            mount, volume = at[IDENTITY_DIR]
            assert mount.get("readOnly") is True
            secret = volume.get("secret", {}).get("secretName")
            assert secret == secret_name(component), f"{where}/{c['name']}: {secret}"
            if component == "envoy":
                continue  # Envoy reads its files through the SDS file (test_envoy_pod)
            env = env_of(c)
            for name, file in IDENTITY_FILES.items():
                assert env.get(name, {}).get("value") == f"{IDENTITY_DIR}/{file}", f"{where}/{c['name']}"
            assert env.get("TESSERA_IDENTITY__NAMESPACE", {}).get("valueFrom") == {
                "fieldRef": {"fieldPath": "metadata.namespace"}
            }, f"{where}/{c['name']}: TESSERA_IDENTITY__NAMESPACE from the downward API"
    assert seen >= {*SERVED, "envoy"}
    config = named(built, "ConfigMap", "tessera-config")["data"]
    assert not [k for k in config if k.startswith("TESSERA_IDENTITY__")]


def test_every_mounted_certificate_has_a_source(built: list[dict[str, Any]]) -> None:
    """cert-manager issues every identity (the operator's too) and the gateway certificate; or,
    without cert-manager, a plain Secret exists for every identity mounted (the gateway's is the
    operator's own: `kubectl create secret tls`)."""
    referenced = {
        v["secret"]["secretName"]
        for _, spec in pod_specs(built)
        for v in spec.get("volumes", [])
        if "secret" in v and v["secret"]["secretName"].startswith(("tessera-identity-", GATEWAY_TLS_SECRET))
    }
    assert GATEWAY_TLS_SECRET in referenced
    issued = {o["spec"]["secretName"] for o in built if o["kind"] == "Certificate"}
    secrets = {o["metadata"]["name"]: o for o in built if o["kind"] == "Secret"}
    if issued:
        assert referenced <= issued
        assert {secret_name(c) for c in K8S_IDENTITIES} <= issued
        assert not issued & secrets.keys(), "a Secret that cert-manager also writes"
    else:
        assert not [o for o in built if o["apiVersion"].startswith("cert-manager.io/")]
        assert referenced - {GATEWAY_TLS_SECRET} <= secrets.keys()
        assert all(secrets[name]["type"] == "kubernetes.io/tls" for name in referenced - {GATEWAY_TLS_SECRET})


def check_certificates(objects: list[dict[str, Any]], namespace: str) -> None:
    """The cert-manager wiring: self-signed Issuer → CA Certificate → CA Issuer → one Certificate
    per identity, each naming ``namespace`` as tessera.identity would (SPIFFE ID, server name)."""
    issuers = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Issuer"}
    by_secret = {o["spec"]["secretName"]: o for o in objects if o["kind"] == "Certificate"}
    for obj in [*issuers.values(), *by_secret.values()]:
        assert obj["metadata"].get("namespace") == namespace, obj["metadata"]["name"]
    assert "$(" not in yaml.safe_dump(list(by_secret.values())), "an unresolved kustomize var"
    for component in K8S_IDENTITIES:
        spec = by_secret[secret_name(component)]["spec"]
        uri = identity_uri(component, namespace)
        assert spec["uris"] == [uri], component
        assert spec["dnsNames"][0] == server_name(uri), component
        if component in SERVED:
            service = SERVED[component]
            wanted = {service, f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"}
            assert wanted <= set(spec["dnsNames"]), component
        assert (spec["duration"], spec["renewBefore"]) == ("24h", "12h"), component
        assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
        assert set(spec["usages"]) == IDENTITY_USAGES, component
        assert not spec.get("isCA")
        ref = spec["issuerRef"]
        assert ref.get("group", "cert-manager.io") == "cert-manager.io"
        assert ref.get("kind", "Issuer") == "Issuer"
        ca_issuer = issuers[ref["name"]]["spec"]
        ca = by_secret[ca_issuer["ca"]["secretName"]]["spec"]
        assert ca["isCA"] is True
        assert ca["privateKey"]["rotationPolicy"] == "Never", "a new CA key orphans every ca.crt out there"
        assert "selfSigned" in issuers[ca["issuerRef"]["name"]]["spec"]
    gateway = by_secret[GATEWAY_TLS_SECRET]["spec"]
    assert gateway["dnsNames"]
    assert "server auth" in gateway["usages"]


def test_certificates(built: list[dict[str, Any]]) -> None:
    if not [o for o in built if o["kind"] == "Certificate"]:
        pytest.skip("no cert-manager here (plain Secrets)")
    check_certificates(built, named(built, "ConfigMap", "tessera-config")["metadata"]["namespace"])


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_certificates_follow_a_namespace_set_above_the_overlay(overlay: Path, tmp_path: Path) -> None:
    """An overlay of the operator's own sets `namespace:`; the SPIFFE IDs and DNS names follow."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "tessera-prod",
        "resources": [os.path.relpath(overlay, tmp_path)],  # kustomize refuses absolute paths
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    objects = kustomize(tmp_path)
    check_certificates(objects, "tessera-prod")
    assert ".default." not in yaml.safe_dump_all(objects)


def test_plain_secrets_command_writes_what_the_pods_mount(tmp_path: Path) -> None:
    """`tessera identity k8s-secrets` (k8s/README.md) writes one kubernetes.io/tls Secret per
    identity, named as the Deployments mount them, with the SPIFFE ID and server name in it."""
    from cryptography import x509  # noqa: PLC0415

    out = tmp_path / "secrets.yaml"
    cli = "import sys; from tessera.cli import main; sys.exit(main())"
    args = ["--data-dir", str(tmp_path / "data"), "identity", "k8s-secrets", "--namespace", "tessera-prod"]
    result = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [sys.executable, "-c", cli, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    if "invalid choice: 'identity'" in result.stderr:
        pytest.skip("`tessera identity k8s-secrets` is not there yet")
    assert result.returncode == 0, result.stderr
    secrets = {d["metadata"]["name"]: d for d in load(out)}
    assert secrets.keys() == {secret_name(c) for c in K8S_IDENTITIES}
    for component in K8S_IDENTITIES:
        secret = secrets[secret_name(component)]
        assert secret["type"] == "kubernetes.io/tls"
        assert secret["metadata"].get("namespace") == "tessera-prod"
        assert secret["data"].keys() == {"tls.crt", "tls.key", "ca.crt"}
        assert not schema_errors(secret)
        cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uri = identity_uri(component, "tessera-prod")
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
        assert server_name(uri) in sans.get_values_for_type(x509.DNSName)


def test_no_grpc_probes(built: list[dict[str, Any]]) -> None:
    """kubelet's gRPC probes cannot present a client certificate, and every gRPC port wants one:
    each service is probed on GET /healthz on its metrics port (plain HTTP) instead."""
    metrics_port = int(named(built, "ConfigMap", "tessera-config")["data"]["TESSERA_METRICS__PORT"])
    probed = set()
    for where, spec in pod_specs(built):
        for c in containers(spec):
            probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}
            assert not [k for k, probe in probes.items() if "grpc" in probe], f"{where}/{c['name']}"
            if runs_as(c) not in {*SERVED, "meter"}:
                continue
            probed.add(runs_as(c))
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["metrics"] == metrics_port
            # the meter is never a reason to take its gateway out of the Service: not probed ready
            expected = {"startupProbe", "livenessProbe"} | (
                {"readinessProbe"} if runs_as(c) in SERVED else set()
            )
            assert probes.keys() == expected, f"{where}/{c['name']}"
            for kind, probe in probes.items():
                assert probe["httpGet"] == {"path": "/healthz", "port": "metrics"}, f"{where}: {kind}"
    assert probed - {"meter"} == SERVED.keys()


def test_envoy_pod(built: list[dict[str, Any]]) -> None:
    """The init container renders the bootstrap with the node `gateway`, the pod's namespace, its
    identity directory, the admin socket and the stats listener (no admin port, no ratelimit);
    the bootstrap and its SDS file land where Envoy (and the control plane) look; the admin
    socket is shared with the meter only; the stats listener is scraped and probed."""
    template = named(built, "Deployment", "tessera-envoy")["spec"]["template"]
    spec = template["spec"]
    init, envoy = container(spec, "render-bootstrap"), container(spec, "envoy")
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in init["args"])
    assert not flags.keys() & {"admin", "ratelimit"}
    assert flags["node-id"] == "gateway"
    assert flags["namespace"] == "$(POD_NAMESPACE)"
    assert env_of(init)["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert flags["identity-dir"] == IDENTITY_DIR
    assert flags["admin-socket"] == ADMIN_SOCKET
    assert flags["stats"] == f"0.0.0.0:{STATS_PORT}"

    # envoy.yaml and identity-sds.json (beside it) reach Envoy; the control plane names the latter
    out = PurePosixPath(flags["out"])
    assert envoy["args"][envoy["args"].index("-c") + 1] == str(out)
    assert mounted(spec, init)[str(out.parent)][1]["name"] == mounted(spec, envoy)[str(out.parent)][1]["name"]
    cp_spec = named(built, "Deployment", "tessera-control-plane")["spec"]["template"]["spec"]
    cp_env = env_of(container(cp_spec, "control-plane"))
    assert cp_env["TESSERA_GATEWAY__ENVOY_IDENTITY_SDS"]["value"] == str(out.parent / "identity-sds.json")

    # the admin socket: an emptyDir in Envoy's container and the meter's, nowhere else
    socket_dir = str(PurePosixPath(ADMIN_SOCKET).parent)
    _, volume = mounted(spec, envoy)[socket_dir]
    assert "emptyDir" in volume
    sharing = {c["name"] for c in containers(spec) if socket_dir in mounted(spec, c)}
    assert sharing <= {"envoy", "meter"}
    for c in containers(spec):
        if runs_as(c) == "meter":
            assert mounted(spec, c)[socket_dir][1]["name"] == volume["name"]
            assert env_of(c)["TESSERA_METER__ENVOY_ADMIN"]["value"] == f"unix:{ADMIN_SOCKET}"

    # the stats listener: scraped, and Envoy's liveness
    assert {p["name"]: p["containerPort"] for p in envoy["ports"]}["stats"] == STATS_PORT
    assert envoy["livenessProbe"]["httpGet"] == {"path": "/ready", "port": "stats"}
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(STATS_PORT)
    assert annotations["prometheus.io/path"] == "/stats/prometheus"


def test_envoy_admin_is_off_the_network(built: list[dict[str, Any]]) -> None:
    text = yaml.safe_dump_all(built)
    assert "9901" not in text, "Envoy's admin is a unix socket now"
    assert "127.0.0.1:9901" not in text


def test_gateway_tls(built: list[dict[str, Any]]) -> None:
    """The control plane reads the public listener's certificate from tessera-gateway-tls; the
    Service fronts the HTTPS listener; admin REST stays off the public listener."""
    config = named(built, "ConfigMap", "tessera-config")["data"]
    assert config["TESSERA_GATEWAY__ADMIN_REST"] == "internal"
    spec = named(built, "Deployment", "tessera-control-plane")["spec"]["template"]["spec"]
    cp = container(spec, "control-plane")
    mount, volume = mounted(spec, cp)[GATEWAY_TLS_DIR]
    assert mount.get("readOnly") is True
    assert volume["secret"]["secretName"] == GATEWAY_TLS_SECRET
    env = env_of(cp)
    assert env["TESSERA_GATEWAY__TLS_CERT_FILE"]["value"] == f"{GATEWAY_TLS_DIR}/tls.crt"
    assert env["TESSERA_GATEWAY__TLS_KEY_FILE"]["value"] == f"{GATEWAY_TLS_DIR}/tls.key"
    envoy = container(named(built, "Deployment", "tessera-envoy")["spec"]["template"]["spec"], "envoy")
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert ports["https"] == int(config["TESSERA_GATEWAY__PORT"])
    (port,) = named(built, "Service", "tessera-gateway")["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (443, "https")


def test_secrets_dir_holds_only_settings_files(built: list[dict[str, Any]]) -> None:
    errors = []
    for where, spec in pod_specs(built):
        mounted = {
            m["name"]
            for c in containers(spec)
            for m in c.get("volumeMounts", [])
            if m["mountPath"] == SECRETS_DIR
        }
        for volume in spec.get("volumes", []):
            if volume["name"] not in mounted:
                continue
            sources = volume.get("projected", {}).get("sources") or [volume]
            items = [item for s in sources for item in s.get("secret", {}).get("items") or [None]]
            if None in items:
                errors.append(f"{where}: list the secret's items, so every file name is checked")
            errors.extend(
                f"{where}: {error}"
                for item in items
                if item is not None and (error := secret_file_error(item["path"])) is not None
            )
    assert not errors, "\n".join(errors)


def test_env_does_not_shadow_secrets(built: list[dict[str, Any]]) -> None:
    """Env beats the secrets dir: a ConfigMap value would silently replace the mounted Secret."""
    config = named(built, "ConfigMap", "tessera-config")["data"]
    for where, spec in pod_specs(built):
        secret_fields = {
            item["path"].lower().removeprefix(PREFIX.lower())
            for volume in spec.get("volumes", [])
            for s in volume.get("projected", {}).get("sources") or [volume]
            for item in s.get("secret", {}).get("items") or []
            if item["path"].lower().startswith(PREFIX.lower())
        }
        env = {e["name"] for c in containers(spec) for e in c.get("env", [])} | config.keys()
        shadowed = [n for n in env if n.removeprefix(PREFIX).lower().split("__")[0] in secret_fields]
        assert not shadowed, f"{where}: {shadowed} override the secrets dir"


def test_memory_counters_mean_one_ratelimit_replica(built: list[dict[str, Any]]) -> None:
    """memory:// counters are one process's: one replica, no HPA. Shared (Redis) counters: the
    base's HPA scales ratelimit, from two replicas."""
    config = named(built, "ConfigMap", "tessera-config")["data"]
    replicas = named(built, "Deployment", "tessera-ratelimit")["spec"].get("replicas", 1)
    scaling = [
        o
        for o in built
        if o["kind"] == "HorizontalPodAutoscaler"
        and o["spec"]["scaleTargetRef"]["name"] == "tessera-ratelimit"
    ]
    if config["TESSERA_REDIS__URL"].startswith("memory://"):
        assert replicas == 1
        assert not scaling
    else:
        (hpa,) = scaling
        assert hpa["spec"]["minReplicas"] >= 2


def test_sqlite_means_one_control_plane(built: list[dict[str, Any]]) -> None:
    config = named(built, "ConfigMap", "tessera-config")["data"]
    deployment = named(built, "Deployment", "tessera-control-plane")["spec"]
    if config.get("TESSERA_DATABASE__URL", "").startswith("sqlite"):
        assert deployment["replicas"] == 1
        assert deployment["strategy"]["type"] == "Recreate"
    else:
        assert "TESSERA_DATABASE__URL" not in config
        assert any(o["kind"] == "Job" for o in built), "a migration Job"


def _component(selector_or_meta: dict[str, Any]) -> str:
    labels = selector_or_meta.get("matchLabels") or selector_or_meta.get("labels") or {}
    return str(labels["app.kubernetes.io/component"])


def _ingress_sources(policy: dict[str, Any], port: str) -> set[str] | None:
    """The components allowed to reach ``port`` (None: anyone, a rule with no ``from``)."""
    sources: set[str] = set()
    for rule in policy["spec"].get("ingress", []):
        if port not in [p["port"] for p in rule.get("ports", [])]:
            continue
        if "from" not in rule:
            return None
        sources |= {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"]
        }
    return sources


def test_network_policies_let_only_the_named_callers_in(built: list[dict[str, Any]]) -> None:
    """Every Tessera pod is selected by a NetworkPolicy; internal ports take only their callers
    (issue 14); every port a policy names is a port of the pods it selects."""
    policies = {_component(o["spec"]["podSelector"]): o for o in built if o["kind"] == "NetworkPolicy"}
    for name, spec in pod_specs(built):
        if name.startswith("Job/"):
            continue
        component = _component(
            named(built, "Deployment", name.split("/", 1)[1])["spec"]["template"]["metadata"]
        )
        assert component in policies, f"{name} has no NetworkPolicy"
        ports = {p["name"] for c in containers(spec) for p in c.get("ports", [])}
        named_ports = {p["port"] for r in policies[component]["spec"]["ingress"] for p in r.get("ports", [])}
        assert named_ports - {"metrics"} <= ports, f"{name}: {named_ports - ports}"
    assert _ingress_sources(policies["ext-authz"], "grpc") == {"envoy"}
    assert _ingress_sources(policies["ratelimit"], "admission") == {"ext-authz"}
    assert _ingress_sources(policies["ratelimit"], "grpc") == {"ext-authz", "envoy"}
    assert _ingress_sources(policies["control-plane"], "policy-grpc") == {"ext-authz", "ratelimit"}
    assert _ingress_sources(policies["control-plane"], "xds-grpc") == {"envoy"}
    assert _ingress_sources(policies["envoy"], "https") is None  # the public gateway
    assert _ingress_sources(policies["envoy"], "stats") is None  # scrapers


def test_the_meter_is_a_native_sidecar_that_outlives_envoy(built: list[dict[str, Any]]) -> None:
    """Stopped only after Envoy has exited (Kubernetes' sidecar order), so that its SIGTERM
    comes once every usage line is written; it then reads the log to its end and exits."""
    for where, spec in pod_specs(built):
        meters = [c for c in containers(spec) if runs_as(c) == "meter"]
        assert not [c for c in spec["containers"] if runs_as(c) == "meter"], where
        for meter in meters:
            assert meter.get("restartPolicy") == "Always", where


def test_the_usage_backstop_bills_under_the_node_the_meter_reads_or_is_off(
    built: list[dict[str, Any]],
) -> None:
    """Envoy's lines and its admissions (x-tessera-node, from the same ENVOY_NODE_ID) name its
    pod; the meter beside it must read them under that name, or a line arriving after its
    backstop bill would be billed again. Where no meter runs, nothing would close or bill the
    admissions kept open: the backstop is off there."""
    config = {}
    for o in built:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "tessera-config":
            config = o.get("data", {})
    metered = False
    for where, spec in pod_specs(built):
        envoys = [c for c in containers(spec) if runs_as(c) == "envoy"]
        meters = [c for c in containers(spec) if runs_as(c) == "meter"]
        if not envoys:
            continue
        (envoy,) = envoys
        assert env_of(envoy)["ENVOY_NODE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        for meter in meters:
            metered = True
            assert "--node=$(POD_NAME)" in meter["args"], where
            assert env_of(meter)["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    if not metered:
        assert config.get("TESSERA_BACKSTOP_ENABLED") == "false"


# --- observability (issue 16) -----------------------------------------------------------------

OBSERVABILITY = K8S / "components" / "observability"
DASHBOARD = OBSERVABILITY / "dashboards" / "tessera.json"
DASHBOARD_CONFIG_MAP = "tessera-grafana-dashboard"
# What each process serves its metrics on; every one is scraped under job tessera-<process>.
METRICS_PATHS = {
    "control-plane": "/metrics",
    "ext-authz": "/metrics",
    "ratelimit": "/metrics",
    "meter": "/metrics",
    "envoy": "/stats/prometheus",
}
PROMETHEUS_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _job(endpoint: dict[str, Any]) -> str:
    (job,) = [r["replacement"] for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
    return str(job)


def test_every_process_is_scraped_once_on_its_metrics_port(built: list[dict[str, Any]]) -> None:
    """Each PodMonitor endpoint names a port, in the pods it selects, of the process its job names,
    and that process's metrics path; every process that runs is scraped by exactly one. A
    PodMonitor finds nothing only where its process does not run (the meter, without
    components/meter)."""
    deployments = [o for o in built if o["kind"] == "Deployment"]
    running = {runs_as(c) for o in deployments for c in containers(o["spec"]["template"]["spec"])}
    scraped: dict[str, int] = dict.fromkeys(METRICS_PATHS.keys() & running, 0)
    errors = []
    for monitor in (o for o in built if o["kind"] == "PodMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            process = _job(endpoint).removeprefix("tessera-")
            where = f"PodMonitor/{monitor['metadata']['name']} port {endpoint['port']}"
            found = {
                runs_as(c)
                for o in deployments
                if selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
                for c in containers(o["spec"]["template"]["spec"])
                if endpoint["port"] in {p["name"] for p in c.get("ports", [])}
            }
            if found - {process} or (not found and process in running):
                errors.append(f"{where}: scrapes {sorted(map(str, found))}, its job names {process}")
            if endpoint.get("path") != METRICS_PATHS.get(process):
                errors.append(
                    f"{where}: path {endpoint.get('path')}, {process} serves {METRICS_PATHS.get(process)}"
                )
            if found == {process}:
                scraped[process] += 1
    errors.extend(f"{p} is scraped {n} times" for p, n in scraped.items() if n != 1)
    assert not errors, "\n".join(errors)


def test_pods_carry_prometheus_annotations_naming_a_metrics_port(built: list[dict[str, Any]]) -> None:
    """prometheus.io/* on every pod template: a container's metrics port and its path (in the
    Envoy pod, Envoy's stats: the meter beside it is found by its PodMonitor only)."""
    for obj in (o for o in built if o["kind"] == "Deployment"):
        template = obj["spec"]["template"]
        annotations = template["metadata"].get("annotations", {})
        where = f"Deployment/{obj['metadata']['name']}"
        assert annotations.get("prometheus.io/scrape") == "true", where
        port = int(annotations["prometheus.io/port"])
        (c,) = [
            c
            for c in containers(template["spec"])
            if port in {p["containerPort"] for p in c.get("ports", [])}
        ]
        assert annotations["prometheus.io/path"] == METRICS_PATHS[str(runs_as(c))], where


def test_the_alert_rules_and_dashboard_are_deployed_as_written(built: list[dict[str, Any]]) -> None:
    """The PrometheusRule renders unchanged (no kustomize var touched its templates); the dashboard
    is one ConfigMap with no hash suffix, labelled for Grafana's sidecar, holding the JSON file."""
    (source,) = load(OBSERVABILITY / "prometheus-rule.yaml")
    assert named(built, "PrometheusRule", "tessera")["spec"] == source["spec"]
    config_map = named(built, "ConfigMap", DASHBOARD_CONFIG_MAP)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["tessera.json"]) == json.loads(DASHBOARD.read_text())


def test_the_dashboard() -> None:
    """Grafana JSON (schema 39): a Prometheus data source variable that every panel and query
    uses, tenant and model variables from the meter's labels, and rates over $__rate_interval."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for name, label in (("tenant", "tenant"), ("model", "gen_ai_request_model")):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == PROMETHEUS_DATASOURCE
        assert variable["definition"] == f"label_values(gen_ai_client_token_usage_count, {label})"
        assert (variable["includeAll"], variable["allValue"]) == (True, ".*")
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    errors = []
    for panel in panels:
        if panel["type"] == "row":
            continue
        title = panel["title"]
        if panel["type"] not in {"timeseries", "stat"} or panel["datasource"] != PROMETHEUS_DATASOURCE:
            errors.append(f"{title}: a timeseries or stat on the datasource variable")
        targets = panel.get("targets") or []
        if not targets or len({t["refId"] for t in targets}) != len(targets):
            errors.append(f"{title}: targets with distinct refIds")
        for target in targets:
            expr = target.get("expr", "")
            if target.get("datasource") != PROMETHEUS_DATASOURCE or not expr:
                errors.append(f"{title} [{target['refId']}]: an expr on the datasource variable")
            if re.search(r"\[\d+[smhdwy]\]", expr):
                errors.append(f"{title} [{target['refId']}]: a fixed range; use [$__rate_interval]")
    assert not errors, "\n".join(errors)


# --- issue 18: the image, metering everywhere, probes, autoscaling, declarative resources -------

PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE_NAME = "tessera"  # what every manifest says; each overlay's `images:` entry renames it
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
GITOPS = K8S / "examples" / "gitops"
RESOURCES_DIR = "/etc/tessera/resources"
RESOURCES_CONFIG_MAP = "tessera-resources"
RESOURCES_API_VERSION = "tessera.dev/v1alpha1"
RESOURCE_KINDS = {"Plan", "Model", "Tenant", "Limit", "Principal"}
SQLITE_URL = re.compile(r"^sqlite(\+\w+)?:///(?P<path>.+)$")
HOSTNAME = "kubernetes.io/hostname"


def rendered_image(folder: Path) -> str:
    """What the ``images:`` entries along ``folder``'s chain of resources make of ``tessera``."""
    (doc,) = load(folder / "kustomization.yaml")
    inner = {rendered_image(folder / r) for r in doc.get("resources") or [] if (folder / r).is_dir()}
    (image,) = inner or {IMAGE_NAME}
    name, _, tag = image.partition(":")
    for entry in doc.get("images") or []:
        if entry["name"] == name:
            name, tag = entry.get("newName", name), str(entry.get("newTag", tag))
    return f"{name}:{tag}" if tag else name


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_overlay_names_the_image(overlay: Path) -> None:
    """One `images:` entry for `tessera`, with a registry name and the tag `make image` builds:
    the project's version."""
    (doc,) = load(overlay / "kustomization.yaml")
    (entry,) = [e for e in doc.get("images") or [] if e["name"] == IMAGE_NAME]
    assert entry.keys() == {"name", "newName", "newTag"}
    assert "/" in entry["newName"], "a registry (localhost/ for a local build), not a bare name"
    assert entry["newTag"] == PROJECT_VERSION, "a quoted string, the version in pyproject.toml"


def test_every_container_runs_the_image_from_the_images_entry(
    built: list[dict[str, Any]], request: pytest.FixtureRequest
) -> None:
    """Every container (init containers and native sidecars too) runs what the overlay's
    `images:` entry names: no bare `tessera` is left after the build."""
    expected = rendered_image(request.node.callspec.params["built"])
    assert expected.partition(":")[0] != IMAGE_NAME, "no images: entry renames the bare image"
    wrong = [
        f"{where}/{c['name']}: {c['image']}"
        for where, spec in pod_specs(built)
        for c in containers(spec)
        if c["image"] != expected
    ]
    assert not wrong, f"expected {expected}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_an_overlay_on_top_repoints_the_image(overlay: Path, tmp_path: Path) -> None:
    """k8s/README.md: in an overlay of yours, the name to re-point is the overlay's newName."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    name = rendered_image(overlay).partition(":")[0]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(overlay, tmp_path)],
        "images": [{"name": name, "newName": "registry.example.com/team/tessera", "newTag": "1.2.3"}],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    images = {c["image"] for _, spec in pod_specs(kustomize(tmp_path)) for c in containers(spec)}
    assert images == {"registry.example.com/team/tessera:1.2.3"}


def native_sidecars(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]


def long_running(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers that keep running: native sidecars and the pod's containers."""
    return [*native_sidecars(spec), *spec["containers"]]


def probe_errors(where: str, spec: dict[str, Any], *, served: bool) -> list[str]:
    """Why the probes of a pod spec fall short (``served``: a Deployment's pod, not a Job's)."""
    errors = []
    sidecars = {c["name"] for c in native_sidecars(spec)}
    for c in containers(spec):
        name = f"{where}/{c['name']}"
        probes = {k: c[k] for k in PROBES if k in c}
        if c in spec.get("initContainers", []) and c["name"] not in sidecars:
            if probes:  # Kubernetes refuses probes on an init container that runs to completion
                errors.append(f"{name}: probes on an init container that runs to completion")
            continue
        if not served:
            continue
        if "livenessProbe" not in probes:
            errors.append(f"{name}: no liveness probe")
        # a native sidecar's readiness is its pod's: the meter must not take Envoy out of service
        if ("readinessProbe" in probes) == (c["name"] in sidecars):
            errors.append(f"{name}: a readiness probe on every container but the native sidecars")
        ports = {p["containerPort"] for p in c.get("ports", [])} | {p.get("name") for p in c.get("ports", [])}
        for kind, probe in probes.items():
            handlers = [h for h in ("httpGet", "tcpSocket", "grpc", "exec") if h in probe]
            if len(handlers) != 1:
                errors.append(f"{name}: {kind} has {handlers or 'no'} handlers")
            elif handlers[0] != "exec" and probe[handlers[0]]["port"] not in ports:
                errors.append(
                    f"{name}: {kind} probes port {probe[handlers[0]]['port']!r}, not one of its ports"
                )
    return errors


def test_every_long_running_container_is_probed_on_its_own_ports(built: list[dict[str, Any]]) -> None:
    """Every container of a Deployment and every native sidecar has a liveness probe; every one
    but the native sidecars (the meter) a readiness probe too; each probe's port is one of that
    container's own ports (a named port resolves in its container only). Init containers that
    run to completion have none."""
    errors = [
        error
        for obj in built
        if obj["kind"] in ("Deployment", "Job")
        for error in probe_errors(
            f"{obj['kind']}/{obj['metadata']['name']}",
            obj["spec"]["template"]["spec"],
            served=obj["kind"] == "Deployment",
        )
    ]
    assert not errors, "\n".join(errors)


def test_the_probe_check_can_fail() -> None:
    http = {"httpGet": {"path": "/healthz", "port": "metrics"}}
    ports = [{"name": "metrics", "containerPort": 9090}]
    ok: dict[str, Any] = {"name": "ok", "ports": ports, "readinessProbe": http, "livenessProbe": http}
    assert not probe_errors("ok", {"containers": [ok]}, served=True)
    broken: list[dict[str, Any]] = [
        {"containers": [{**ok, "livenessProbe": {"httpGet": {"path": "/", "port": "metric"}}}]},
        {"containers": [{**ok, "readinessProbe": {"tcpSocket": {"port": 9091}}}]},
        {"containers": [{k: v for k, v in ok.items() if k != "readinessProbe"}]},
        {"containers": [ok], "initContainers": [{**ok, "name": "sidecar", "restartPolicy": "Always"}]},
        {"containers": [ok], "initContainers": [{"name": "init", "startupProbe": http}]},
    ]
    for spec in broken:
        assert probe_errors("broken", spec, served=True), spec


def test_every_hpa_scales_a_deployment_that_requests_its_resource(built: list[dict[str, Any]]) -> None:
    """autoscaling/v2; the target is a Deployment of the build that leaves `replicas` to the HPA
    (every apply would reset it otherwise); a Resource metric is a share of the requests, so
    every running container of the target (native sidecars too) requests that resource."""
    deployments = {o["metadata"]["name"]: o for o in built if o["kind"] == "Deployment"}
    hpas = [o for o in built if o["kind"] == "HorizontalPodAutoscaler"]
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} >= {"tessera-envoy", "tessera-ext-authz"}
    errors = []
    for hpa in hpas:
        where = f"HorizontalPodAutoscaler/{hpa['metadata']['name']}"
        spec, ref = hpa["spec"], hpa["spec"]["scaleTargetRef"]
        if hpa["apiVersion"] != "autoscaling/v2" or (ref["apiVersion"], ref["kind"]) != (
            "apps/v1",
            "Deployment",
        ):
            errors.append(f"{where}: autoscaling/v2 of an apps/v1 Deployment")
            continue
        if not 1 <= spec.get("minReplicas", 1) <= spec["maxReplicas"]:
            errors.append(f"{where}: minReplicas <= maxReplicas")
        target = deployments.get(ref["name"])
        if target is None:
            errors.append(f"{where}: no Deployment {ref['name']} in the build")
            continue
        if "replicas" in target["spec"]:
            errors.append(f"{where}: Deployment/{ref['name']} sets replicas; leave them to the HPA")
        for metric in spec["metrics"]:
            if metric["type"] != "Resource":
                continue
            resource = metric["resource"]["name"]
            errors.extend(
                f"{where}: {ref['name']}/{c['name']} requests no {resource}"
                for c in long_running(target["spec"]["template"]["spec"])
                if resource not in c.get("resources", {}).get("requests", {})
            )
    assert not errors, "\n".join(errors)


def test_base_scales_ratelimit_on_cpu() -> None:
    (base,) = load(K8S / "base" / "kustomization.yaml")
    assert "ratelimit-hpa.yaml" in base["resources"]
    (hpa,) = load(K8S / "base" / "ratelimit-hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tessera-ratelimit"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    (deployment,) = load(K8S / "base" / "ratelimit-deployment.yaml")
    assert _container(deployment)["resources"]["requests"]["cpu"]


def test_every_envoy_is_metered_from_its_usage_log(built: list[dict[str, Any]]) -> None:
    """The meter runs beside every Envoy in every overlay (the sqlite one too): one native sidecar
    reading the file Envoy's usage log goes to (TESSERA_GATEWAY__ACCESS_LOG_PATH, sent to Envoy
    by the control plane) in the emptyDir Envoy writes it in; the usage backstop stays on."""
    config = named(built, "ConfigMap", "tessera-config")["data"]
    log_path = PurePosixPath(config["TESSERA_GATEWAY__ACCESS_LOG_PATH"])
    spec = named(built, "Deployment", "tessera-envoy")["spec"]["template"]["spec"]
    (meter,) = [c for c in containers(spec) if runs_as(c) == "meter"]
    assert meter in native_sidecars(spec)
    assert f"--log={log_path}" in meter["args"]
    _, volume = mounted(spec, container(spec, "envoy"))[str(log_path.parent)]
    assert "emptyDir" in volume
    assert mounted(spec, meter)[str(log_path.parent)][1]["name"] == volume["name"]
    assert config.get("TESSERA_BACKSTOP_ENABLED", "true") != "false"


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert selector.keys() == {"matchLabels"}, "matchLabels only here"
    return bool(selector["matchLabels"].items() <= labels.items())


def test_the_meter_writes_into_the_control_planes_store(built: list[dict[str, Any]]) -> None:
    """The ledger is in the control plane's store. PostgreSQL: the meter's secrets dir holds the
    DSN file from the same Secret as the control plane's. SQLite: the meter mounts the control
    plane's PVC where the URL's file is. The claim is ReadWriteOnce (one node) and SQLite locks
    only between processes of one host, so every pod mounting it has a required pod affinity
    (kubernetes.io/hostname) selecting exactly the pods that mount it, itself included (the first
    goes anywhere, the rest follow it); no minAvailable budget covers them (draining their node
    must evict them all before any can start elsewhere)."""
    config = named(built, "ConfigMap", "tessera-config")["data"]
    cp_spec = named(built, "Deployment", "tessera-control-plane")["spec"]["template"]["spec"]
    envoy_spec = named(built, "Deployment", "tessera-envoy")["spec"]["template"]["spec"]
    cp = container(cp_spec, "control-plane")
    (meter,) = [c for c in containers(envoy_spec) if runs_as(c) == "meter"]
    assert "TESSERA_DATABASE__URL" not in env_of(meter), (
        "the URL comes from tessera-config, as the control plane's"
    )
    assert {"configMapRef": {"name": "tessera-config"}} in meter["envFrom"]

    found = SQLITE_URL.match(config.get("TESSERA_DATABASE__URL", ""))
    if found is None:

        def dsn_source(spec: dict[str, Any], c: dict[str, Any]) -> set[tuple[str, str]]:
            _, volume = mounted(spec, c)[SECRETS_DIR]
            return {
                (s["secret"]["name"], item["key"])
                for s in volume["projected"]["sources"]
                for item in s["secret"]["items"]
                if item["path"] == "tessera_database"
            }

        assert dsn_source(envoy_spec, meter) == dsn_source(cp_spec, cp) != set()
        return

    path = PurePosixPath(found["path"])
    assert path.is_absolute(), "a relative SQLite path is not on the volume"
    claims = {
        mounted(spec, c)[str(path.parent)][1]["persistentVolumeClaim"]["claimName"]
        for spec, c in ((cp_spec, cp), (envoy_spec, meter))
    }
    (claim,) = claims
    assert named(built, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]

    templates = {o["metadata"]["name"]: o["spec"]["template"] for o in built if o["kind"] == "Deployment"}
    sharing = set()
    for name, template in templates.items():
        spec = template["spec"]
        volumes = {
            v["name"]
            for v in spec.get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim
        }
        users = {
            c["name"] for c in containers(spec) if {m["name"] for m in c.get("volumeMounts", [])} & volumes
        }
        if users:
            sharing.add(name)
            assert users <= {"control-plane", "migrate", "meter"}, f"{name}: {users} mount the SQLite volume"
    assert sharing == {"tessera-control-plane", "tessera-envoy"}
    for name in sharing:
        terms = templates[name]["spec"]["affinity"]["podAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert any(
            term["topologyKey"] == HOSTNAME
            and {n for n, t in templates.items() if _matches(term["labelSelector"], t["metadata"]["labels"])}
            == sharing
            for term in terms
        ), f"{name}: no required affinity to the pods that share {claim}, on one node"
    for pdb in (o for o in built if o["kind"] == "PodDisruptionBudget"):
        if any(_matches(pdb["spec"]["selector"], templates[n]["metadata"]["labels"]) for n in sharing):
            assert "minAvailable" not in pdb["spec"], f"PodDisruptionBudget/{pdb['metadata']['name']}"


def test_no_config_map_or_secret_is_mounted_with_sub_path(built: list[dict[str, Any]]) -> None:
    """kubelet never updates a subPath mount: a renewed certificate or an edited ConfigMap would
    never arrive in the container."""
    errors = []
    for where, spec in pod_specs(built):
        for c in containers(spec):
            for mount, volume in mounted(spec, c).values():
                refreshed = volume.keys() & {"configMap", "secret", "projected"}
                if refreshed and mount.keys() & {"subPath", "subPathExpr"}:
                    errors.append(f"{where}/{c['name']}: {mount['mountPath']}")
    assert not errors, "\n".join(errors)


def test_gitops_example_mounts_the_resources_config_map() -> None:
    """k8s/examples/gitops: the ConfigMap tessera-resources (generated from resources.yaml, a
    stable name so that an edit is updated in place, not a rollout) is mounted as a directory,
    read-only and without subPath, where TESSERA_CONFIG_DIR points, in the control plane only;
    every document in it is a Tessera resource of one of the five kinds."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    objects = kustomize(GITOPS)
    spec = named(objects, "Deployment", "tessera-control-plane")["spec"]["template"]["spec"]
    cp = container(spec, "control-plane")
    config_dir = env_of(cp)["TESSERA_CONFIG_DIR"]["value"]
    assert config_dir == RESOURCES_DIR
    mount, volume = mounted(spec, cp)[config_dir]
    assert not mount.keys() & {"subPath", "subPathExpr"}
    assert mount.get("readOnly") is True
    assert volume["configMap"]["name"] == RESOURCES_CONFIG_MAP
    assert "items" not in volume["configMap"], "every file of the ConfigMap"
    assert cp["securityContext"]["readOnlyRootFilesystem"] is True
    assert "TESSERA_CONFIG_DIR" not in named(objects, "ConfigMap", "tessera-config")["data"]
    readers = [
        f"{where}/{c['name']}"
        for where, s in pod_specs(objects)
        for c in containers(s)
        if "TESSERA_CONFIG_DIR" in env_of(c) or RESOURCES_DIR in mounted(s, c)
    ]
    assert readers == ["Deployment/tessera-control-plane/control-plane"]

    config_map = named(objects, "ConfigMap", RESOURCES_CONFIG_MAP)
    assert config_map["data"].keys() == {"resources.yaml"}
    documents = list(yaml.safe_load_all(config_map["data"]["resources.yaml"]))
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in documents]
    for doc in documents:
        assert isinstance(doc, dict), doc
        assert doc["apiVersion"] == RESOURCES_API_VERSION
        assert doc["kind"] in RESOURCE_KINDS
        assert doc["metadata"]["name"]
        assert isinstance(doc["spec"], dict)
    assert len(set(names)) == len(names)
    assert {kind for kind, _ in names} == RESOURCE_KINDS, "the example shows every kind"
