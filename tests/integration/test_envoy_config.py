"""The config the control plane sends over xDS, checked by the real Envoy binary.

`envoy --mode validate` does not look at xDS-delivered resources, so this test inlines the
translated listener, routes and clusters into a static bootstrap and validates that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret

from control_plane.app import ADMIN_DESCRIPTOR
from control_plane.state import BackendState, ModelState, State
from control_plane.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
    encode_all,
)
from control_plane.xds.translate import GatewayConfig, resources_from_state
from tessera.bootstrap import BootstrapParams, render_bootstrap
from tests.conftest import envoy_identity

ENVOY = str(Path(sys.executable).parent / "envoy")
DESCRIPTOR = ADMIN_DESCRIPTOR.read_bytes()

STATE = State(
    models=(
        ModelState("demo", "public", (BackendState("http://127.0.0.1:9000", "openai-compatible", 1, 0),), 0),
        ModelState(
            "llama",
            "restricted",
            (
                BackendState("https://vllm.example.com:443", "vllm", 3, 0, id=1, credential="Bearer sk-one"),
                BackendState("http://10.0.0.9:8000", "vllm", 1, 7, id=2),
                BackendState(
                    "https://10.0.0.10:8443",
                    "dynamo",
                    1,
                    7,
                    id=3,
                    credential="k2",
                    credential_header="api-key",
                    sni="dynamo.internal",
                    timeout_seconds=600,
                    idle_timeout_seconds=900,
                ),
            ),
            0,
            aliases=("gpt-4o",),
            realtime=True,
        ),
    )
)


def _static_bootstrap(tmp_path: Path) -> Path:
    cfg = GatewayConfig(
        "127.0.0.1",
        18080,
        "127.0.0.1",
        9999,
        str(tmp_path / "access.log"),
        16 << 20,
        "127.0.0.1",
        50051,
        DESCRIPTOR,
    )
    res = encode_all(resources_from_state(STATE, cfg))
    boot = yaml.safe_load(
        render_bootstrap(
            BootstrapParams(
                "n",
                str(tmp_path / "admin.sock"),
                "127.0.0.1",
                0,
                "127.0.0.1",
                1,
                (("127.0.0.1", 2),),
                *envoy_identity(tmp_path / "identity"),
            )
        )
    )
    # Rendered back to JSON with envoy-data-plane, which knows every 1.40 type we use.
    (lst_any,) = res[LISTENER_TYPE].values()
    lst = Listener.parse(lst_any.value).to_dict()
    hcm = lst["filterChains"][0]["filters"][0]["typedConfig"]
    del hcm["rds"]
    hcm["routeConfig"] = RouteConfiguration.parse(res[ROUTE_TYPE]["tessera_routes"].value).to_dict()
    boot["static_resources"]["listeners"] = [lst]
    for name, c_any in res[CLUSTER_TYPE].items():
        cluster = Cluster.parse(c_any.value).to_dict()
        if cluster.get("type") == "EDS":  # inline what EDS would deliver
            cluster["type"] = "STATIC"
            del cluster["edsClusterConfig"]
            cluster["loadAssignment"] = ClusterLoadAssignment.parse(res[ENDPOINT_TYPE][name].value).to_dict()
        boot["static_resources"]["clusters"].append(cluster)
    # Envoy 1.40's validate mode crashes (SIGSEGV) on a credential_injector secret over ADS:
    # inline the SDS secrets as static ones (a running Envoy takes them over ADS: the e2e tests).
    _drop_sds_config(boot)
    boot["static_resources"]["secrets"] = [Secret.parse(a.value).to_dict() for a in res[SECRET_TYPE].values()]
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(boot))
    return path


def _drop_sds_config(node: object) -> None:
    if isinstance(node, dict):
        node.pop("sdsConfig", None)
        for value in node.values():
            _drop_sds_config(value)
    elif isinstance(node, list):
        for value in node:
            _drop_sds_config(value)


@pytest.mark.envoy
def test_translated_config_passes_envoy_validation(tmp_path):
    path = _static_bootstrap(tmp_path)
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout + result.stderr


@pytest.mark.envoy
def test_rendered_bootstrap_passes_envoy_validation(tmp_path):
    path = tmp_path / "envoy.yaml"
    path.write_text(
        render_bootstrap(
            BootstrapParams(
                "n",
                str(tmp_path / "admin.sock"),
                "127.0.0.1",
                9902,
                "127.0.0.1",
                50052,
                (("127.0.0.1", 50061), ("n", 50062)),
                *envoy_identity(tmp_path / "identity"),
            )
        )
    )
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
