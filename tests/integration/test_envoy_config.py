"""The config the control plane sends over xDS, checked by the real Envoy binary.

`envoy --mode validate` does not look at xDS-delivered resources, so this test inlines the
translated listener, routes and clusters into a static bootstrap and validates that.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from google.protobuf import json_format

from control_plane.app import ADMIN_DESCRIPTOR
from control_plane.state import BackendState, ModelState, State
from control_plane.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, encode_all
from control_plane.xds.translate import GatewayConfig, resources_from_state
from tessera.bootstrap import BootstrapParams, render_bootstrap

# xds-protos message types, registered so Any fields can be rendered to JSON.
for _module in (
    "envoy.extensions.access_loggers.file.v3.file_pb2",
    "envoy.extensions.filters.http.ext_authz.v3.ext_authz_pb2",
    "envoy.extensions.filters.http.grpc_json_transcoder.v3.transcoder_pb2",
    "envoy.extensions.filters.http.json_to_metadata.v3.json_to_metadata_pb2",
    "envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2",
    "envoy.extensions.filters.http.ratelimit.v3.rate_limit_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.http.early_header_mutation.header_mutation.v3.header_mutation_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
):
    importlib.import_module(_module)


def _register_body_size_limit() -> None:
    """xds-protos lacks BodySizeLimit: describe it (as the Envoy binary does) for json_format."""
    from google.protobuf import descriptor_pb2, descriptor_pool  # noqa: PLC0415

    fd = descriptor_pb2.FileDescriptorProto(
        name="tessera_test/body_size_limit.proto",
        package="envoy.extensions.filters.http.body_size_limit.v3",
        dependency=["google/protobuf/wrappers.proto"],
        syntax="proto3",
    )
    msg = fd.message_type.add(name="BodySizeLimit")
    msg.field.add(
        name="max_request_bytes", number=1, label=1, type=11, type_name=".google.protobuf.UInt64Value"
    )
    descriptor_pool.Default().Add(fd)


_register_body_size_limit()

ENVOY = str(Path(sys.executable).parent / "envoy")
DESCRIPTOR = ADMIN_DESCRIPTOR.read_bytes()

STATE = State(
    models=(
        ModelState("demo", "public", (BackendState("http://127.0.0.1:9000", "openai-compatible", 1, 0),), 0),
        ModelState(
            "llama",
            "restricted",
            (
                BackendState("https://vllm.example.com:443", "vllm", 3, 0),
                BackendState("http://10.0.0.9:8000", "vllm", 1, 7),
            ),
            0,
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
            BootstrapParams("n", "127.0.0.1", 0, "127.0.0.1", 1, (("127.0.0.1", 2),), "127.0.0.1", 3)
        )
    )
    (lst_any,) = res[LISTENER_TYPE].values()
    lst = listener_pb2.Listener.FromString(lst_any.value)
    hcm = http_connection_manager_pb2.HttpConnectionManager.FromString(
        lst.filter_chains[0].filters[0].typed_config.value
    )
    hcm.ClearField("rds")
    hcm.route_config.CopyFrom(
        route_pb2.RouteConfiguration.FromString(res[ROUTE_TYPE]["tessera_routes"].value)
    )
    lst.filter_chains[0].filters[0].typed_config.Pack(hcm)
    boot["static_resources"]["listeners"] = [json_format.MessageToDict(lst, preserving_proto_field_name=True)]
    for name, c_any in res[CLUSTER_TYPE].items():
        cluster = cluster_pb2.Cluster.FromString(c_any.value)
        if cluster.type == cluster_pb2.Cluster.EDS:  # inline what EDS would deliver
            cluster.type = cluster_pb2.Cluster.STATIC
            cluster.ClearField("eds_cluster_config")
            cluster.load_assignment.CopyFrom(
                endpoint_pb2.ClusterLoadAssignment.FromString(res[ENDPOINT_TYPE][name].value)
            )
        boot["static_resources"]["clusters"].append(
            json_format.MessageToDict(cluster, preserving_proto_field_name=True)
        )
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(boot))
    return path


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
                "127.0.0.1",
                0,
                "127.0.0.1",
                50052,
                (("127.0.0.1", 50061), ("n", 50062)),
                "127.0.0.1",
                50071,
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
