"""State → Envoy resources as proto3-JSON dicts (pure; ``resources.py`` types them).

Request path (decode order): json_to_metadata (body ``model`` → ``ai.gw:model``;
it clears the route cache, so the route is chosen by model) → ext_authz →
ratelimit → router. There is no default route to a backend: a request whose
model is missing, unparsable or unknown is answered by Envoy itself with an
OpenAI-shaped error. ``/v1/models`` is answered by the control plane's HTTP
handler, never by a backend.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from typing import Any

from control_plane.state import BackendState, ModelState, State
from tessera.admin.v1 import admin_pb2
from tessera.openai_errors import error_body, error_json

LISTENER_NAME = "tessera_gateway"
ROUTES_NAME = "tessera_routes"
EXT_AUTHZ_CLUSTER = "tessera_ext_authz"  # static, in the bootstrap
RATELIMIT_CLUSTER = "tessera_ratelimit"  # static, in the bootstrap
CP_HTTP_CLUSTER = "tessera_control_plane_http"
ADMIN_CLUSTER = "tessera_admin_api"
ADMIN_SERVICES = tuple(admin_pb2.DESCRIPTOR.services_by_name)
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
JWT_FILTER = "tessera.jwt_authn"  # its config arrives over ECDS (JWKS rotation without a listener drain)
JWT_NS = "envoy.filters.http.jwt_authn"
RATELIMIT_DOMAIN = "tessera"
MODEL_NS = "ai.gw"
AUTHZ_NS = "envoy.filters.http.ext_authz"
MISSING = ":missing"  # metadata sentinels; ':' can never start a model name
INVALID = ":invalid"

T = "type.googleapis.com/"
FILTER_CONFIG = T + "envoy.config.route.v3.FilterConfig"
DISABLED = {"@type": FILTER_CONFIG, "disabled": True}
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ADS = {"ads": {}, "resource_api_version": "V3"}
# Inference calls are POSTs; a GET to an unknown path is a plain 404, whatever its body.
POST = [{"name": ":method", "string_match": {"exact": "POST"}}]
MODEL_NAMED = {"string_match": {"safe_regex": {"regex": "^[^:].*"}}}  # a name, not a sentinel
JSON_CT = {"header": {"key": "content-type", "value": "application/json"}}


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


@dataclass(frozen=True, slots=True)
class XdsResources:
    """Resources by type, each a name → proto3-JSON dict."""

    listeners: dict[str, dict[str, Any]]
    routes: dict[str, dict[str, Any]]
    clusters: dict[str, dict[str, Any]]
    endpoints: dict[str, dict[str, Any]]
    extension_configs: dict[str, dict[str, Any]]  # ECDS: TypedExtensionConfig by filter name


def cluster_name(model: str) -> str:
    return f"model/{model}"


def _meta_match(value: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"filter": MODEL_NS, "path": [{"key": "model"}], "value": value}]


def _status_filter(code: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": code, "runtime_key": f"tessera.lr.{code}"}}
        }
    }


def _mapper(flt: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    return {
        "filter": flt,
        "body_format_override": {"json_format": body, "content_type": "application/json"},
    }


def _local_reply_config() -> dict[str, Any]:
    """Envoy's own replies (no route, 413, 429, 503, 504) in OpenAI's error shape."""
    model_known = {
        "metadata_filter": {
            "matcher": {
                "filter": MODEL_NS,
                "path": [{"key": "model"}],
                "value": MODEL_NAMED,
            }
        }
    }
    unknown_model = error_body(
        "model_not_found",
        message="The model `%DYNAMIC_METADATA(ai.gw:model)%` does not exist or you do not have access to it.",
        param="model",
    )
    return {
        "mappers": [
            _mapper({"and_filter": {"filters": [_status_filter(404), model_known]}}, unknown_model),
            _mapper(_status_filter(404), error_body("not_found")),
            _mapper(_status_filter(413), error_body("request_too_large")),
            _mapper(_status_filter(429), error_body("rate_limit_exceeded")),
            _mapper(
                {
                    "and_filter": {
                        "filters": [_status_filter(503), {"response_flag_filter": {"flags": ["UAEX"]}}]
                    }
                },
                error_body("service_unavailable"),
            ),
            _mapper(_status_filter(503), error_body("no_healthy_backend")),
            _mapper(_status_filter(504), error_body("upstream_timeout")),
        ]
    }


def _access_log(path: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "log_format": {
                    "json_format": {
                        "time": "%START_TIME%",
                        "request_id": "%REQ(X-REQUEST-ID)%",
                        "method": "%REQ(:METHOD)%",
                        "path": "%REQ(:PATH)%",
                        "status": "%RESPONSE_CODE%",
                        "flags": "%RESPONSE_FLAGS%",
                        "tenant_id": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:tenant_id)%",
                        "key_id": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:key_id)%",
                        "model": "%DYNAMIC_METADATA(ai.gw:model)%",
                        "upstream": "%UPSTREAM_HOST%",
                        "duration_ms": "%DURATION%",
                        "bytes_received": "%BYTES_RECEIVED%",
                        "bytes_sent": "%BYTES_SENT%",
                    }
                },
            },
        }
    ]


def _transcoder(descriptor: bytes) -> dict[str, Any]:
    """REST/JSON for the admin API under /admin/. Off by default; only the admin route enables it."""
    return {"name": TRANSCODER, "disabled": True, "typed_config": _transcoder_config(descriptor)}


def _transcoder_config(descriptor: bytes) -> dict[str, Any]:
    return {
        "@type": T + "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        "proto_descriptor_bin": base64.b64encode(descriptor).decode(),
        "services": [f"tessera.admin.v1.{name}" for name in ADMIN_SERVICES],
        "print_options": {"always_print_primitive_fields": True, "preserve_proto_field_names": True},
        "convert_grpc_status": True,
        # Keep the /admin/ route (and its cluster) after transcoding.
        "match_incoming_request_route": True,
        "request_validation_options": {
            "reject_unknown_method": True,
            "reject_unknown_query_parameters": True,
        },
    }


def _per_ip_guard(cfg: GatewayConfig) -> list[dict[str, Any]]:
    """A token bucket per client IP, before any body buffering or callout (ARCHITECTURE §2.1).

    The client IP is the TCP peer (``use_remote_address``), or the X-Forwarded-For entry
    ``xff_trusted_hops`` from the right; buckets are an LRU of ``max_dynamic_descriptors``.
    """
    if cfg.per_ip_requests_per_second <= 0:
        return []
    bucket = {
        "max_tokens": max(cfg.per_ip_burst, 1),
        "tokens_per_fill": cfg.per_ip_requests_per_second,
        "fill_interval": "1s",
    }
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    return [
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": T + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "per_ip",
                # Requests matching no descriptor (none: every request has a peer) share this.
                "token_bucket": {
                    "max_tokens": 1_000_000,
                    "tokens_per_fill": 1_000_000,
                    "fill_interval": "1s",
                },
                "filter_enabled": {**always, "runtime_key": "tessera.per_ip.enabled"},
                "filter_enforced": {**always, "runtime_key": "tessera.per_ip.enforced"},
                "rate_limits": [{"actions": [{"remote_address": {}}]}],
                "descriptors": [{"entries": [{"key": "remote_address"}], "token_bucket": bucket}],
                "max_dynamic_descriptors": 100_000,
            },
        }
    ]


JWT_AUTHN_TYPE = T + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"


def jwt_authn_config(state: State, cfg: GatewayConfig) -> dict[str, Any]:
    """Verifies Tessera's own JWTs locally. Anything else (an API key, a bad or foreign JWT)
    passes through untouched and unverified, and ext_authz decides: a JWT that fails here is
    not an API key, so it is refused there."""
    provider = {
        "issuer": cfg.jwt_issuer,
        "audiences": [cfg.jwt_audience],
        "local_jwks": {"inline_string": state.jwks},
        "forward": False,  # a verified token is removed before anything else sees it
        "payload_in_metadata": "jwt_payload",
        "clock_skew_seconds": 30,
    }
    either = {
        "requires_any": {"requirements": [{"provider_name": "tessera"}, {"allow_missing_or_failed": {}}]}
    }
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": JWT_AUTHN_TYPE,
            "providers": {"tessera": provider},
            "rules": [{"match": {"prefix": "/v1/"}, "requires": either}],
        },
    }


def _body_size_limit(cfg: GatewayConfig) -> dict[str, Any]:
    """413 for a body over the limit, before anything buffers it or authenticates the caller:
    a Content-Length over the limit is refused at once, a streamed body as soon as it crosses it."""
    return {
        "name": "envoy.filters.http.body_size_limit",
        "typed_config": {
            "@type": T + "envoy.extensions.filters.http.body_size_limit.v3.BodySizeLimit",
            "max_request_bytes": cfg.max_request_bytes,
        },
    }


def _http_filters(cfg: GatewayConfig) -> list[dict[str, Any]]:
    kv = {"metadata_namespace": MODEL_NS, "key": "model"}
    return [
        *_per_ip_guard(cfg),
        _body_size_limit(cfg),
        {"name": JWT_FILTER, "config_discovery": {"config_source": ADS, "type_urls": [JWT_AUTHN_TYPE]}},
        {
            "name": "envoy.filters.http.json_to_metadata",
            "typed_config": {
                "@type": T + "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
                "request_rules": {
                    "rules": [
                        {
                            "selectors": [{"key": "model"}],
                            "on_present": {**kv, "type": "STRING"},
                            "on_missing": {**kv, "value": MISSING},
                            "on_error": {**kv, "value": INVALID},
                        }
                    ],
                    "allow_content_types_regex": {"regex": "^application/json(;.*)?$"},
                },
            },
        },
        {
            "name": "envoy.filters.http.ext_authz",
            "typed_config": {
                "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": EXT_AUTHZ_CLUSTER}, "timeout": "0.5s"},
                # Fail closed: failure_mode_allow would forward the raw key upstream.
                "failure_mode_allow": False,
                "status_on_error": {"code": 503},
                "metadata_context_namespaces": [MODEL_NS, JWT_NS],
            },
        },
        {
            "name": "envoy.filters.http.ratelimit",
            "typed_config": {
                "@type": T + "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": RATELIMIT_DOMAIN,
                "timeout": "0.25s",
                # An unreachable ratelimit service lets traffic through (ARCHITECTURE §7).
                "failure_mode_deny": False,
                "rate_limit_service": {
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": RATELIMIT_CLUSTER}},
                },
                # Filter-level (not route-level) so later hits_addend settings are honoured.
                "rate_limits": [
                    {
                        "actions": [
                            _authz_descriptor("tenant_id"),
                            _authz_descriptor("key_id"),
                            {
                                "metadata": {
                                    "descriptor_key": "model",
                                    "metadata_key": {"key": MODEL_NS, "path": [{"key": "model"}]},
                                    "default_value": MISSING,
                                }
                            },
                        ]
                    }
                ],
            },
        },
        _transcoder(cfg.admin_descriptor),
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _authz_descriptor(key: str) -> dict[str, Any]:
    return {"metadata": {"descriptor_key": key, "metadata_key": {"key": AUTHZ_NS, "path": [{"key": key}]}}}


def listener(cfg: GatewayConfig) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": "gateway",
        "codec_type": "AUTO",
        # The client address is the peer, or X-Forwarded-For only from configured trusted hops.
        "use_remote_address": True,
        "xff_num_trusted_hops": cfg.xff_trusted_hops,
        # Envoy mints every request id: a client-sent x-request-id is dropped before
        # the connection manager looks at it, so nobody can pick a ledger row's id.
        "early_header_mutation_extensions": [
            {
                "name": "tessera.drop_client_request_id",
                "typed_config": {
                    "@type": T
                    + "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    "mutations": [{"remove": "x-request-id"}],
                },
            }
        ],
        "rds": {"route_config_name": ROUTES_NAME, "config_source": ADS},
        # Long generations: no overall request timeout; idle streams end after 5 minutes.
        "request_timeout": "0s",
        "stream_idle_timeout": "300s",
        "http_filters": _http_filters(cfg),
        "local_reply_config": _local_reply_config(),
    }
    if cfg.access_log_path:
        hcm["access_log"] = _access_log(cfg.access_log_path)
    return {
        "name": LISTENER_NAME,
        "address": {"socket_address": {"address": cfg.host, "port_value": cfg.port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def _direct(name: str, match: dict[str, Any], code: str) -> dict[str, Any]:
    from tessera.openai_errors import status_of  # noqa: PLC0415 - keep the module header short

    return {
        "name": name,
        "match": match,
        "direct_response": {"status": status_of(code), "body": {"inline_string": error_json(code)}},
        "response_headers_to_add": [{**JSON_CT, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }


def route_config(state: State, cfg: GatewayConfig) -> dict[str, Any]:
    no_ratelimit = {"envoy.filters.http.ratelimit": DISABLED}
    routes: list[dict[str, Any]] = [
        {
            # The admin API as REST/JSON. The control plane authenticates these callers itself.
            "name": "admin_api",
            "match": {"prefix": "/admin/"},
            "route": {"cluster": ADMIN_CLUSTER, "timeout": "30s"},
            "typed_per_filter_config": {
                "envoy.filters.http.json_to_metadata": DISABLED,
                "envoy.filters.http.ext_authz": DISABLED,
                "envoy.filters.http.ratelimit": DISABLED,
                # Enables the (default-off) transcoder here; Envoy wants its config again.
                TRANSCODER: {"@type": FILTER_CONFIG, "config": _transcoder_config(cfg.admin_descriptor)},
            },
        },
        {
            # OAuth2 client credentials: the control plane authenticates the client itself.
            "name": "oauth_token",
            "match": {"path": "/oauth/token"},
            "route": {"cluster": CP_HTTP_CLUSTER, "timeout": "5s"},
            "typed_per_filter_config": {
                "envoy.filters.http.json_to_metadata": DISABLED,
                "envoy.filters.http.ext_authz": DISABLED,
                "envoy.filters.http.ratelimit": DISABLED,
            },
        },
        {
            "name": "models_list",
            "match": {"path": "/v1/models"},
            "route": {"cluster": CP_HTTP_CLUSTER, "timeout": "5s"},
            "typed_per_filter_config": no_ratelimit,
        },
        _direct(
            "invalid_json",
            {
                "prefix": "/v1/",
                "headers": POST,
                "dynamic_metadata": _meta_match({"string_match": {"exact": INVALID}}),
            },
            "invalid_json",
        ),
        _direct(
            "missing_model",
            {
                "prefix": "/v1/",
                "headers": POST,
                "dynamic_metadata": _meta_match({"string_match": {"exact": MISSING}}),
            },
            "missing_model",
        ),
    ]
    routes.extend(
        {
            "name": f"model:{m.name}",
            "match": {"prefix": "/v1/", "dynamic_metadata": _meta_match({"string_match": {"exact": m.name}})},
            # No overall timeout: a long generation is never cut; idle streams end after 5 min.
            "route": {"cluster": cluster_name(m.name), "timeout": "0s", "idle_timeout": "300s"},
        }
        for m in state.models
        if m.backends
    )
    routes.extend(
        [
            # A model that is not registered: Envoy answers 404 model_not_found itself.
            {
                "name": "unknown_model",
                "match": {"prefix": "/v1/", "dynamic_metadata": _meta_match(MODEL_NAMED)},
                "direct_response": {"status": 404},
            },
            # Not a JSON body at all: there is no model to route on.
            _direct("no_model", {"prefix": "/v1/", "headers": POST}, "missing_model"),
            {"name": "not_found", "match": {"prefix": "/"}, "direct_response": {"status": 404}},
        ]
    )
    return {
        "name": ROUTES_NAME,
        "virtual_hosts": [
            {
                "name": "gateway",
                "domains": ["*"],
                "request_body_buffer_limit": cfg.max_request_bytes,
                "routes": routes,
            }
        ],
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _locality_groups(backends: tuple[BackendState, ...]) -> list[dict[str, Any]]:
    # Envoy priorities must be dense from 0: rank the configured priorities.
    ranks = {p: i for i, p in enumerate(sorted({b.priority for b in backends}))}
    groups: dict[int, list[dict[str, Any]]] = {}
    for b in backends:
        groups.setdefault(ranks[b.priority], []).append(
            {
                "endpoint": {"address": {"socket_address": {"address": b.host, "port_value": b.port}}},
                "load_balancing_weight": max(1, b.weight),
            }
        )
    return [{"priority": p, "lb_endpoints": eps} for p, eps in sorted(groups.items())]


def model_cluster(m: ModelState) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's cluster, and its ClusterLoadAssignment when served over EDS."""
    name = cluster_name(m.name)
    cla = {"cluster_name": name, "endpoints": _locality_groups(m.backends)}
    cluster: dict[str, Any] = {
        "name": name,
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
    }
    if all(_is_ip(b.host) for b in m.backends):
        cluster |= {"type": "EDS", "eds_cluster_config": {"eds_config": ADS}}
        eds: dict[str, Any] | None = cla
    else:
        cluster |= {"type": "STRICT_DNS", "load_assignment": cla}
        eds = None
    tls_hosts = [b.host for b in m.backends if b.scheme == "https"]
    if tls_hosts:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": tls_hosts[0],
            },
        }
    return cluster, eds


def _cp_http_cluster(cfg: GatewayConfig) -> dict[str, Any]:
    addr = {
        "socket_address": {"address": cfg.control_plane_http_host, "port_value": cfg.control_plane_http_port}
    }
    return {
        "name": CP_HTTP_CLUSTER,
        # STRICT_DNS: in Kubernetes this is the control-plane Service name, locally an IP.
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": CP_HTTP_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr}}]}],
        },
    }


def _admin_cluster(cfg: GatewayConfig) -> dict[str, Any]:
    addr = {"socket_address": {"address": cfg.admin_host, "port_value": cfg.admin_port}}
    return {
        "name": ADMIN_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr}}]}],
        },
    }


def resources_from_state(state: State, cfg: GatewayConfig) -> XdsResources:
    clusters = {CP_HTTP_CLUSTER: _cp_http_cluster(cfg), ADMIN_CLUSTER: _admin_cluster(cfg)}
    endpoints: dict[str, dict[str, Any]] = {}
    for m in state.models:
        if not m.backends:
            continue
        cluster, cla = model_cluster(m)
        clusters[cluster["name"]] = cluster
        if cla is not None:
            endpoints[cla["cluster_name"]] = cla
    return XdsResources(
        listeners={LISTENER_NAME: listener(cfg)},
        routes={ROUTES_NAME: route_config(state, cfg)},
        clusters=clusters,
        endpoints=endpoints,
        extension_configs={JWT_FILTER: jwt_authn_config(state, cfg)},
    )
