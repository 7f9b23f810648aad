"""Typed Envoy resources: proto3-JSON dicts → envoy-data-plane messages → ``Any``.

envoy-data-plane carries Envoy 1.40's schema (xds-protos lags), so a field name
typo or a wrong type fails here, in the control plane, not in Envoy's NACK.
"""

from __future__ import annotations

import hashlib
from typing import Any

# Importing these registers their messages for Any "@type" resolution.
import envoy_data_plane.envoy.extensions.access_loggers.file.v3
import envoy_data_plane.envoy.extensions.common.matching.v3
import envoy_data_plane.envoy.extensions.content_parsers.json.v3
import envoy_data_plane.envoy.extensions.filters.http.composite.v3
import envoy_data_plane.envoy.extensions.filters.http.credential_injector.v3
import envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3
import envoy_data_plane.envoy.extensions.filters.http.grpc_json_transcoder.v3
import envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3
import envoy_data_plane.envoy.extensions.filters.http.json_to_metadata.v3
import envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3
import envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3
import envoy_data_plane.envoy.extensions.filters.http.lua.v3
import envoy_data_plane.envoy.extensions.filters.http.ratelimit.v3
import envoy_data_plane.envoy.extensions.filters.http.router.v3
import envoy_data_plane.envoy.extensions.filters.http.sse_to_metadata.v3
import envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3
import envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3
import envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3
import envoy_data_plane.envoy.extensions.http.injected_credentials.generic.v3
import envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3
import envoy_data_plane.envoy.extensions.retry.priority.previous_priorities.v3
import envoy_data_plane.envoy.extensions.transport_sockets.tls.v3
import envoy_data_plane.envoy.extensions.upstreams.http.v3
import envoy_data_plane.envoy.type.matcher.v3  # noqa: F401
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import TypedExtensionConfig
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from google.protobuf import any_pb2

from control_plane.xds import extra_types  # noqa: F401 - registers BodySizeLimit
from control_plane.xds.translate import XdsResources

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
EXTENSION_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"  # ECDS
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105 - SDS

_CLASSES: dict[str, Any] = {
    LISTENER_TYPE: Listener,
    ROUTE_TYPE: RouteConfiguration,
    CLUSTER_TYPE: Cluster,
    ENDPOINT_TYPE: ClusterLoadAssignment,
    EXTENSION_TYPE: TypedExtensionConfig,
    SECRET_TYPE: Secret,
}


def encode(type_url: str, resource: dict[str, Any]) -> any_pb2.Any:
    message = _CLASSES[type_url].from_dict(resource)
    return any_pb2.Any(type_url=type_url, value=bytes(message))


def encode_all(res: XdsResources) -> dict[str, dict[str, any_pb2.Any]]:
    by_type = {
        LISTENER_TYPE: res.listeners,
        ROUTE_TYPE: res.routes,
        CLUSTER_TYPE: res.clusters,
        ENDPOINT_TYPE: res.endpoints,
        EXTENSION_TYPE: res.extension_configs,
        SECRET_TYPE: res.secrets,
    }
    return {t: {name: encode(t, r) for name, r in items.items()} for t, items in by_type.items()}


def type_version(resources: dict[str, any_pb2.Any]) -> str:
    """A version that changes exactly when the type's resources change."""
    h = hashlib.sha256()
    for name in sorted(resources):
        h.update(name.encode())
        h.update(resources[name].value)
    return h.hexdigest()[:16]
