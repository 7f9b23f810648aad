"""Names shared by the xDS translators, and what they need to know about the gateway."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tessera.admin.v1 import admin_pb2

LISTENER_NAME = "tessera_gateway"
ROUTES_NAME = "tessera_routes"
EXT_AUTHZ_CLUSTER = "tessera_ext_authz"  # static, in the bootstrap (HTTP/2: gRPC Check)
EXT_AUTHZ_HTTP_CLUSTER = "tessera_ext_authz_http"  # the same endpoints over HTTP/1.1 (http_service)
AUTHZ_PATH_PREFIX = "/authz"  # http_service: ext_authz sees /authz<original path> (its http_transport)
CP_HTTP_CLUSTER = "tessera_control_plane_http"
ADMIN_CLUSTER = "tessera_admin_api"
OTLP_CLUSTER = "tessera_otlp"  # the trace collector; no endpoint when none is configured
ADMIN_REST_LISTENER = "tessera_admin_rest"  # admin_rest="internal": the admin REST API alone
# the SDS secret with the public listener's certificate (a name, not a secret)
GATEWAY_TLS_SECRET = "gateway_tls"  # noqa: S105
ADMIN_SERVICES = tuple(admin_pb2.DESCRIPTOR.services_by_name)
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
JWT_FILTER = "tessera.jwt_authn"  # its config arrives over ECDS (JWKS rotation without a listener drain)
JWT_NS = "envoy.filters.http.jwt_authn"
RATELIMIT_DOMAIN = "tessera"
MODEL_NS = "ai.gw"
ROUTE_NS = "tessera"  # route metadata: the served model; endpoint metadata: the backend ref
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"
AUTHZ_NS = "envoy.filters.http.ext_authz"
MISSING = ":missing"  # metadata sentinels; ':' can never start a model name
INVALID = ":invalid"

T = "type.googleapis.com/"
FILTER_CONFIG = T + "envoy.config.route.v3.FilterConfig"
DISABLED = {"@type": FILTER_CONFIG, "disabled": True}
LUA_FILTER = "envoy.filters.http.lua"
SSE_FILTER = "envoy.filters.http.sse_to_metadata"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ADS = {"ads": {}, "resource_api_version": "V3"}
# Inference calls are POSTs; a GET to an unknown path is a plain 404, whatever its body.
POST = [{"name": ":method", "string_match": {"exact": "POST"}}]
# A path no route serves: Envoy's direct answer, which its local reply config turns into a 404
# not_found (a plain 404 with a model named is the unknown-model reply). Never sent to a client.
NOT_FOUND_STATUS = 410
MODEL_NAMED = {"string_match": {"safe_regex": {"regex": "^[^:].*"}}}  # a name, not a sentinel
JSON_CT = {"header": {"key": "content-type", "value": "application/json"}}


SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"  # Debian/Ubuntu, and the Envoy images


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str
    port: int
    control_plane_http_host: str
    control_plane_http_port: int
    access_log_path: str | None
    max_request_bytes: int
    admin_host: str = "127.0.0.1"
    admin_port: int = 50051
    admin_descriptor: bytes = b""  # FileDescriptorSet of the admin API (REST via the transcoder)
    per_ip_requests_per_second: int = 20_000  # 0 = no per-IP guard
    per_ip_burst: int = 20_000
    xff_trusted_hops: int = 0  # proxies in front of Envoy whose X-Forwarded-For is believed
    jwt_issuer: str = "https://tessera.local"
    jwt_audience: str = "tessera-gateway"
    upstream_ca_file: str = SYSTEM_CA_FILE  # verifies https backends
    authz_transport: Literal["grpc", "http"] = "grpc"  # how Envoy calls ext_authz (its TESSERA_TRANSPORT)
    tls: bool = False  # the public listener serves TLS with the SDS secret GATEWAY_TLS_SECRET
    admin_rest: Literal["public", "internal", "off"] = "public"  # where /admin/ REST is served
    admin_rest_host: str = "127.0.0.1"  # "internal": its own listener
    admin_rest_port: int = 8081
    envoy_identity_sds: str | None = None  # set: mutual TLS to our HTTP handlers and admin API
    envoy_ca_file: str = ""
    namespace: str = "default"  # the SPIFFE IDs of our services name it
    otlp_endpoint: str = ""  # host:port of an OTLP/gRPC collector for Envoy's spans; "" = none
    trace_sampling_percent: float = 100.0  # requests whose trace is recorded (with a collector)
