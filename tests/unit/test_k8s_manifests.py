"""The Kubernetes manifests in ``k8s/`` and the bootstrap packing in ``envoy/`` (house style §2.9, §2.11).

Every file parses and every kustomization reference exists; every ``TESSERA_*`` name in ``k8s/``
is a real settings field; no secret value is committed. When ``kubectl`` is on PATH the overlays
are also built and the rendered objects checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from control_plane.settings import ControlPlaneSettings
from ext_authz.settings import ExtAuthzSettings
from ratelimit.settings import RatelimitSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
ENVOY = ROOT / "envoy"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
YAML_FILES = sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml"), ENVOY / "kustomization.yaml"])
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
def test_real_settings_fields_resolve(name):
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
def test_unknown_names_are_rejected(name):
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
def test_secret_file_names(file_name, ok):
    assert (secret_file_error(file_name) is None) is ok


# --- the files --------------------------------------------------------------------------------


def test_there_are_manifests():
    assert (K8S / "base" / "kustomization.yaml").is_file()
    assert {p.name for p in OVERLAYS} >= {"sqlite", "postgres"}


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses_into_objects(path):
    docs = load(path)
    assert docs, f"{rel(path)} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{rel(path)}: a document is not a mapping"
        assert {"apiVersion", "kind"} <= doc.keys(), f"{rel(path)}: a document lacks apiVersion/kind"


def referenced_paths(kustomization: Path) -> Iterator[tuple[str, Path]]:
    (doc,) = load(kustomization)
    here = kustomization.parent
    for key in ("resources", "components", "patchesStrategicMerge"):
        for entry in doc.get(key) or []:
            yield key, here / entry
    for patch in doc.get("patches") or []:
        if "path" in patch:
            yield "patches", here / patch["path"]
    for gen in doc.get("configMapGenerator") or []:
        for entry in [*gen.get("files", []), *gen.get("envs", [])]:
            yield "configMapGenerator", here / entry.rpartition("=")[2]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=rel)
def test_kustomization_references_exist(kustomization):
    missing = []
    for key, target in referenced_paths(kustomization):
        if "://" in str(target):
            missing.append(f"{key}: {target} is remote; keep every reference in this repository")
        elif target.is_dir():
            if not (target / "kustomization.yaml").is_file():
                missing.append(f"{key}: {rel(target.resolve())} has no kustomization.yaml")
        elif not target.is_file():
            missing.append(f"{key}: {target} does not exist")
    assert not missing, f"{rel(kustomization)}:\n" + "\n".join(missing)


def test_every_manifest_is_used():
    used = {target.resolve() for k in KUSTOMIZATIONS for _, target in referenced_paths(k)}
    orphans = [rel(p) for p in YAML_FILES if p.name != "kustomization.yaml" and p.resolve() not in used]
    assert not orphans, f"listed by no kustomization.yaml: {orphans}"


def test_base_packs_the_envoy_bootstrap():
    (base,) = load(K8S / "base" / "kustomization.yaml")
    assert "../../envoy" in base["resources"]
    (envoy,) = load(ENVOY / "kustomization.yaml")
    (gen,) = envoy["configMapGenerator"]
    assert gen["name"] == "tessera-envoy-bootstrap"
    assert gen["files"] == ["bootstrap.yaml"]


def test_every_tessera_env_name_is_a_settings_field():
    errors = sorted(
        {
            f"{rel(path)}: {error}"
            for path in YAML_FILES
            for name in ENV_NAME.findall(path.read_text())
            if (error := env_name_error(name)) is not None
        }
    )
    assert not errors, "unknown TESSERA_* settings:\n" + "\n".join(errors)


def test_secrets_dir_files_are_settings_fields():
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


def test_no_secret_values_are_committed():
    errors = []
    for path in YAML_FILES:
        for doc in load(path):
            if doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData")):
                errors.append(f"{rel(path)}: Secret {doc['metadata']['name']} carries values")
            if doc["kind"] == "Kustomization" and doc.get("secretGenerator"):
                errors.append(f"{rel(path)}: secretGenerator puts secret values in the repository")
            errors.extend(
                f"{rel(path)}: a DSN with a password: {node!r}"
                for node in walk(doc)
                if isinstance(node, str) and DSN_WITH_PASSWORD.search(node)
            )
    assert not errors, "\n".join(errors)


def test_dsn_check_can_fail():
    assert DSN_WITH_PASSWORD.search("postgresql+psycopg://tessera:hunter2@db:5432/tessera")
    assert DSN_WITH_PASSWORD.search("redis://:hunter2@redis:6379/0")
    assert not DSN_WITH_PASSWORD.search("redis://redis:6379/0")
    assert not DSN_WITH_PASSWORD.search("sqlite+aiosqlite:////data/tessera.db")
    assert not DSN_WITH_PASSWORD.search("http://127.0.0.1:9901/server_info")


def test_no_python_files():
    found = [rel(p) for folder in (K8S, ENVOY) for p in folder.rglob("*.py")]
    assert not found, f"no .py files in k8s/ or envoy/ (house style §2.11): {found}"


# --- the built overlays -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=OVERLAYS, ids=lambda p: p.name)
def built(request) -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [KUBECTL, "kustomize", str(request.param)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def test_config_maps_referenced_exist(built):
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


def test_containers_are_locked_down(built):
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


def test_grpc_services_use_native_grpc_probes(built):
    served = set()
    for where, spec in pod_specs(built):
        for c in spec["containers"]:
            if c.get("command") == ["tessera"] and c.get("args", [])[-1:] == ["serve"]:
                served.add(c["args"][0])
                assert "grpc" in c.get("readinessProbe", {}), f"{where}: readiness"
                assert "grpc" in c.get("livenessProbe", {}), f"{where}: liveness"
    assert served == {"control-plane", "ext-authz", "ratelimit"}


def test_secrets_dir_holds_only_settings_files(built):
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


def test_env_does_not_shadow_secrets(built):
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


def test_memory_counters_mean_one_ratelimit_replica(built):
    config = named(built, "ConfigMap", "tessera-config")["data"]
    replicas = named(built, "Deployment", "tessera-ratelimit")["spec"].get("replicas", 1)
    scaled = [o for o in built if o["kind"] == "HorizontalPodAutoscaler"]
    if config["TESSERA_REDIS__URL"].startswith("memory://"):
        assert replicas == 1
        assert all(o["spec"]["scaleTargetRef"]["name"] != "tessera-ratelimit" for o in scaled)
    else:
        assert replicas >= 2


def test_sqlite_means_one_control_plane(built):
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


def test_network_policies_let_only_the_named_callers_in(built):
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
    assert _ingress_sources(policies["envoy"], "http") is None  # the public gateway
