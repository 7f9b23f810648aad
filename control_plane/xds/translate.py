"""State → Envoy resources as proto3-JSON dicts (pure; ``resources.py`` types them).

Routes are chosen by the body's model (``listener.py`` explains the filter chain). There is
no default route to a backend: a request whose model is missing, unparsable or unknown is
answered by Envoy itself with an OpenAI-shaped error. ``/v1/models`` and ``/oauth/token``
go to the control plane's HTTP handlers and ``/admin/`` to its gRPC admin API, never to a
backend.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from control_plane.state import BackendState, ModelState, State
from control_plane.validation import NO_HEALTH_CHECK
from control_plane.xds.config import (
    ADMIN_CLUSTER,
    ADMIN_REST_LISTENER,
    ADS,
    CP_HTTP_CLUSTER,
    DISABLED,
    FILTER_CONFIG,
    GATEWAY_TLS_SECRET,
    INVALID,
    JSON_CT,
    JWT_FILTER,
    LISTENER_NAME,
    LUA_FILTER,
    MISSING,
    MODEL_NAMED,
    MODEL_NS,
    NOT_FOUND_STATUS,
    OTLP_CLUSTER,
    POST,
    ROUTE_NS,
    ROUTES_NAME,
    SSE_FILTER,
    SYSTEM_CA_FILE,
    TRANSCODER,
    TRANSPORT_SOCKET_MATCH,
    GatewayConfig,
    T,
)
from control_plane.xds.listener import admin_rest_listener, jwt_authn_config, listener, transcoder_config
from tessera import endpoints
from tessera.client_errors import error_json, status_of
from tessera.endpoints import Dialect, Endpoint, path_regex
from tessera.envoy_tls import internal_tls
from tessera.openapi import PATH as OPENAPI_PATH
from tessera.usage_line import token_terms

__all__ = ["GatewayConfig", "XdsResources", "cluster_name", "resources_from_state"]


@dataclass(frozen=True, slots=True)
class XdsResources:
    """Resources by type, each a name → proto3-JSON dict."""

    listeners: dict[str, dict[str, Any]]
    routes: dict[str, dict[str, Any]]
    clusters: dict[str, dict[str, Any]]
    endpoints: dict[str, dict[str, Any]]
    extension_configs: dict[str, dict[str, Any]]  # ECDS: TypedExtensionConfig by filter name
    secrets: dict[str, dict[str, Any]]  # SDS: upstream credentials (Envoy redacts them in config_dump)


def cluster_name(model: str) -> str:
    return f"model/{model}"


def _meta_match(value: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"filter": MODEL_NS, "path": [{"key": "model"}], "value": value}]


def _direct(name: str, match: dict[str, Any], code: str, dialect: Dialect = Dialect.OPENAI) -> dict[str, Any]:
    return {
        "name": name,
        "match": match,
        "direct_response": {
            "status": status_of(code),
            "body": {"inline_string": error_json(code, dialect=dialect)},
        },
        "response_headers_to_add": [{**JSON_CT, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }


def _paths(endpoints: tuple[Endpoint, ...]) -> dict[str, Any]:
    return {"safe_regex": {"regex": path_regex(endpoints)}}


def _not_found(name: str, match: dict[str, Any]) -> dict[str, Any]:
    """404 not_found, answered by Envoy (``NOT_FOUND_STATUS``, which the local reply config
    turns into a 404 in the endpoint's dialect: a plain 404 with a model named in the body is
    the unknown-model reply)."""
    return {"name": name, "match": match, "direct_response": {"status": NOT_FOUND_STATUS}}


# Per-route filter switches: a route that is not inference skips the usage filters; one the
# control plane authenticates itself skips ext_authz (and the body parse that feeds it) too.
NOT_INFERENCE: Final = {LUA_FILTER: DISABLED, SSE_FILTER: DISABLED}
SELF_AUTHENTICATED: Final = {
    "envoy.filters.http.json_to_metadata": DISABLED,
    "envoy.filters.http.ext_authz": DISABLED,
    **NOT_INFERENCE,
}


def admin_rest_routes(cfg: GatewayConfig) -> list[dict[str, Any]]:
    """The admin API as REST/JSON, its OpenAPI document first (``/admin/`` would take it)."""
    return [_admin_openapi_route(), _admin_api_route(cfg)]


def _admin_openapi_route() -> dict[str, Any]:
    """``GET /admin/v1/openapi.json`` to the control plane's HTTP handlers, with no credential
    (docs/security.md says why). That exact path and method only: anything else under /admin/
    is the API's, which authenticates every call."""
    return {
        "name": "admin_openapi",
        "match": {"path": OPENAPI_PATH, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "route": {"cluster": CP_HTTP_CLUSTER, "timeout": "5s"},
        # No RPC to transcode (on the admin REST listener the transcoder would answer 404).
        "typed_per_filter_config": {**SELF_AUTHENTICATED, TRANSCODER: DISABLED},
    }


def _admin_api_route(cfg: GatewayConfig) -> dict[str, Any]:
    """The control plane authenticates these callers itself."""
    return {
        "name": "admin_api",
        "match": {"prefix": "/admin/"},
        "route": {"cluster": ADMIN_CLUSTER, "timeout": "30s"},
        "typed_per_filter_config": {
            **SELF_AUTHENTICATED,
            # Enables the (default-off) transcoder here; Envoy wants its config again.
            TRANSCODER: {"@type": FILTER_CONFIG, "config": transcoder_config(cfg.admin_descriptor)},
        },
    }


def route_config(state: State, cfg: GatewayConfig) -> dict[str, Any]:
    """Only the endpoints of ``tessera.endpoints`` reach a backend, each only for the models whose
    kinds serve it (``POST``, the exact path after Envoy's normalisation). Everything else is a
    404 answered by Envoy, counted against no limit (no model route, so ext_authz admits nothing)."""
    # The admin REST API on the public listener only with admin_rest="public".
    admin = admin_rest_routes(cfg) if cfg.admin_rest == "public" else []
    routes: list[dict[str, Any]] = [
        *admin,
        {
            # OAuth2 client credentials: the control plane authenticates the client itself.
            "name": "oauth_token",
            "match": {"path": "/oauth/token"},
            "route": {"cluster": CP_HTTP_CLUSTER, "timeout": "5s"},
            "typed_per_filter_config": SELF_AUTHENTICATED,
        },
        {
            "name": "models_list",
            "match": {"path": "/v1/models"},
            "route": {"cluster": CP_HTTP_CLUSTER, "timeout": "5s"},
            "typed_per_filter_config": NOT_INFERENCE,
        },
    ]
    by_dialect = {d: tuple(e for e in endpoints.ALL if e.dialect is d) for d in Dialect}
    for dialect, served_here in by_dialect.items():
        for sentinel, code in ((INVALID, "invalid_json"), (MISSING, "missing_model")):
            match = {
                **_paths(served_here),
                "headers": POST,
                "dynamic_metadata": _meta_match({"string_match": {"exact": sentinel}}),
            }
            routes.append(_direct(f"{code}:{dialect.value}", match, code, dialect))
    served = [m for m in state.models if m.backends]
    # WebSocket upgrades first: GET /v1/realtime?model=NAME has no body to route on.
    routes.extend(_realtime_route(m, name) for m in served if m.realtime for name in (m.name, *m.aliases))
    routes.append(_direct("realtime_off", {"path": "/v1/realtime"}, "model_not_found"))
    routes.extend(_model_route(m, name) for m in served for name in (m.name, *m.aliases))
    names = [{"string_match": {"exact": n}} for m in served for n in (m.name, *m.aliases)]
    if names:  # (an or_match takes two or more)
        any_name = names[0] if len(names) == 1 else {"or_match": {"value_matchers": names}}
        # A model that is served, asked for an endpoint its backends do not serve.
        routes.append(
            _not_found(
                "endpoint_not_served",
                {"prefix": "/", "dynamic_metadata": _meta_match(any_name)},
            )
        )
    routes.append(
        # A model that is not registered: Envoy answers 404 model_not_found itself.
        {
            "name": "unknown_model",
            "match": {**_paths(endpoints.ALL), "headers": POST, "dynamic_metadata": _meta_match(MODEL_NAMED)},
            "direct_response": {"status": 404},
        }
    )
    for dialect, served_here in by_dialect.items():
        # Not a JSON body at all: there is no model to route on.
        routes.append(
            _direct(
                f"no_model:{dialect.value}",
                {**_paths(served_here), "headers": POST},
                "missing_model",
                dialect,
            )
        )
    routes.append(_not_found("not_found", {"prefix": "/"}))
    return {
        "name": ROUTES_NAME,
        # The client's own traceparent was read when the request came in (its trace continues);
        # the router sets the gateway's. A malformed one, which Envoy cannot continue, must not
        # reach the backend as it came.
        "request_headers_to_remove": ["traceparent"],
        "virtual_hosts": [
            {
                "name": "gateway",
                "domains": ["*"],
                "request_body_buffer_limit": cfg.max_request_bytes,
                "routes": routes,
            }
        ],
    }


DEFAULT_IDLE_TIMEOUT = 300  # seconds with no byte either way before a stream is ended


def _timeouts(m: ModelState) -> dict[str, str]:
    """Envoy times out per route, and a model is one route: it gets the longest of its
    backends' timeouts, so no backend's generations are cut short (0 = no limit wins)."""
    totals = [b.timeout_seconds for b in m.backends]
    idle = max(b.idle_timeout_seconds or DEFAULT_IDLE_TIMEOUT for b in m.backends)
    return {"timeout": f"{0 if 0 in totals else max(totals)}s", "idle_timeout": f"{idle}s"}


def _route_meta(m: ModelState, name: str) -> dict[str, Any]:
    """The served model (the access log reads ``tessera:model``) and, for the Lua filter, what
    it tells ext_authz and writes into bodies: the served model and its default max_tokens; on
    an alias route, also the name the body's model is rewritten to."""
    lua: dict[str, Any] = {
        "model": m.name,
        "default_max_tokens": token_terms(m.default_max_tokens, m.max_max_tokens)[0],
    }
    if name != m.name:
        lua["served_model"] = m.name
    return {"filter_metadata": {ROUTE_NS: {"model": m.name}, LUA_FILTER: lua}}


def _model_route(m: ModelState, name: str) -> dict[str, Any]:
    """The model's endpoints (those every one of its backends' kinds serves) to its cluster."""
    return {
        "name": f"model:{name}",
        "match": {
            **_paths(endpoints.served({b.kind for b in m.backends})),
            "headers": POST,
            "dynamic_metadata": _meta_match({"string_match": {"exact": name}}),
        },
        "metadata": _route_meta(m, name),
        "route": {"cluster": cluster_name(m.name), **_timeouts(m), "retry_policy": RETRY_POLICY},
    }


def _realtime_route(m: ModelState, name: str) -> dict[str, Any]:
    """A WebSocket upgrade to the model's backends, authenticated and admitted like any request
    (the Lua filter tells ext_authz the model from this route's metadata) and never retried once
    upgraded. The frames are not read: no body model, no SSE usage."""
    return {
        "name": f"realtime:{name}",
        "match": {
            "path": "/v1/realtime",
            "headers": [{"name": "upgrade", "string_match": {"exact": "websocket", "ignore_case": True}}],
            "query_parameters": [{"name": "model", "string_match": {"exact": name}}],
        },
        "metadata": _route_meta(m, name),
        "route": {
            "cluster": cluster_name(m.name),
            **_timeouts(m),
            "upgrade_configs": [{"upgrade_type": "websocket", "enabled": True}],
        },
        "typed_per_filter_config": {
            "envoy.filters.http.json_to_metadata": DISABLED,
            SSE_FILTER: DISABLED,
        },
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
WEIGHT_SCALE = 100  # endpoint weight = configured weight x 100 x load factor (>= 1)


def is_eds(m: ModelState) -> bool:
    """Every backend is an IP: endpoints over EDS (and load-aware weights)."""
    return all(_is_ip(b.host) for b in m.backends)


def _locality_groups(backends: tuple[BackendState, ...], load: Mapping[str, float]) -> list[dict[str, Any]]:
    # Envoy priorities must be dense from 0: rank the configured priorities.
    ranks = {p: i for i, p in enumerate(sorted({b.priority for b in backends}))}
    groups: dict[int, list[dict[str, Any]]] = {}
    for b in backends:
        weight = max(1, round(max(1, b.weight) * WEIGHT_SCALE * load.get(b.url, 1.0)))
        groups.setdefault(ranks[b.priority], []).append(
            {
                "endpoint": {"address": {"socket_address": {"address": b.host, "port_value": b.port}}},
                "load_balancing_weight": weight,
                # Which backend this is: picks its TLS settings and its credential (per endpoint).
                "metadata": {
                    "filter_metadata": {
                        ROUTE_NS: {"backend": backend_ref(b)},
                        TRANSPORT_SOCKET_MATCH: {"backend": backend_ref(b)},
                    }
                },
            }
        )
    return [{"priority": p, "lb_endpoints": eps} for p, eps in sorted(groups.items())]


# Active health checks by backend kind: the model servers that have a health endpoint. A generic
# OpenAI-compatible server may have none; it is watched by outlier detection only.
HEALTH_PATHS: dict[str, str] = {
    "vllm": "/health",
    "dynamo": "/health",
    "trtllm": "/health",
    "llamacpp": "/health",
}


def backend_health_path(b: BackendState) -> str | None:
    if b.health_path == NO_HEALTH_CHECK:
        return None
    return b.health_path or HEALTH_PATHS.get(b.kind)


def _health_path(m: ModelState) -> str | None:
    """The model's health path, when every backend has the same one (Envoy checks per cluster,
    and a model is one cluster: backends that differ are watched by outlier detection only)."""
    paths = {backend_health_path(b) for b in m.backends}
    return paths.pop() if len(paths) == 1 else None


def _resilience(m: ModelState) -> dict[str, Any]:
    """How a model's cluster survives a broken GPU server (docs/backends.md):

    - outlier detection ejects a backend after 5 consecutive 5xx or 3 connect failures, for
      15 s and longer each time, up to every backend (a model with one backend can lose it);
    - an active health check (when the kind has a health path) keeps a dead one out, and
      brings it back after one good answer;
    - no panic mode: with no healthy backend at any priority Envoy answers 503
      no_healthy_backend instead of sending traffic to ones known to be broken;
    - a retry budget (20% of active requests, at least 3) bounds retries under load.
    """
    limits = [b.max_concurrency for b in m.backends]
    # Circuit breaker: the sum of the backends' max concurrency when every one has one
    # (one cluster per model: the breaker counts the model's requests in flight).
    max_requests = sum(limits) if all(limits) else 1_000_000
    out: dict[str, Any] = {
        # Envoy's defaults eject after 5 consecutive 5xx, always enforced. (envoy-data-plane
        # cannot spell consecutive_5xx: its dict casing turns it into consecutive_5_xx.)
        "outlier_detection": {
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
            "interval": "1s",
            "base_ejection_time": "15s",
            "max_ejection_percent": 100,
        },
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_requests": max_requests,
                    "max_pending_requests": max_requests,
                    "retry_budget": {"budget_percent": {"value": 20}, "min_retry_concurrency": 3},
                }
            ]
        },
    }
    path = _health_path(m)
    if path is not None:
        out["health_checks"] = [
            {
                "timeout": "1s",
                "interval": "2s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "http_health_check": {"path": path},
            }
        ]
    return out


# Fallback: a connect failure, a reset, a 5xx or a 429 before the answer starts is retried on
# another backend, next priority first once this one has been tried (a started stream is
# never retried: its first bytes are with the client).
RETRY_POLICY: dict[str, Any] = {
    "retry_on": "5xx,reset,connect-failure,refused-stream,retriable-status-codes",
    "retriable_status_codes": [429],
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 3,
    "retry_priority": {
        "name": "envoy.retry_priorities.previous_priorities",
        "typed_config": {
            "@type": T + "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
            "update_frequency": 1,
        },
    },
}


def backend_ref(b: BackendState) -> str:
    return f"b{b.id}"


def secret_name(b: BackendState) -> str:
    return f"backend-credential/{b.id}"


def _upstream_tls(b: BackendState, ca_file: str) -> dict[str, Any]:
    """TLS to one https backend: SNI, and its certificate checked against its CA bundle (or the
    gateway's CA file) and its server name."""
    server = b.sni or b.host
    trusted = {"inline_string": b.ca_bundle} if b.ca_bundle else {"filename": ca_file}
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": server,
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": trusted,
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": server}}],
                }
            },
        },
    }


def _credential_filters(m: ModelState) -> list[dict[str, Any]]:
    """Upstream filters that give each backend its own credential. The host is chosen before
    upstream filters run: the first marks the request with the chosen endpoint's backend ref
    (endpoint metadata), a matcher runs credential_injector with that backend's SDS secret, and
    the mark is removed before the request leaves. The secret itself only ever travels over
    SDS; Envoy redacts it in /config_dump."""
    marker = "x-tessera-backend"
    matchers = [
        {
            "predicate": {
                "single_predicate": {
                    "input": {
                        "name": "backend",
                        "typed_config": {
                            "@type": T + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                            "header_name": marker,
                        },
                    },
                    "value_match": {"exact": backend_ref(b)},
                }
            },
            "on_match": {
                "action": {
                    "name": "inject",
                    "typed_config": {
                        "@type": T + "envoy.extensions.filters.http.composite.v3.ExecuteFilterAction",
                        "typed_config": {
                            "name": "envoy.filters.http.credential_injector",
                            "typed_config": {
                                "@type": T
                                + "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                                "overwrite": True,
                                "credential": {
                                    "name": "envoy.http.injected_credentials.generic",
                                    "typed_config": {
                                        "@type": T
                                        + "envoy.extensions.http.injected_credentials.generic.v3.Generic",
                                        "credential": {"name": secret_name(b), "sds_config": ADS},
                                        "header": b.credential_header,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        }
        for b in m.backends
        if b.credential
    ]
    if not matchers:
        return []
    mutation = T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
    return [
        {
            "name": "tessera.mark_backend",
            "typed_config": {
                "@type": mutation,
                "mutations": {
                    "request_mutations": [
                        {
                            "append": {
                                "header": {
                                    "key": marker,
                                    "value": f"%UPSTREAM_METADATA({ROUTE_NS}:backend)%",
                                },
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                            }
                        }
                    ]
                },
            },
        },
        {
            "name": "tessera.upstream_credential",
            "typed_config": {
                "@type": T + "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
                "extension_config": {
                    "name": "envoy.filters.http.composite",
                    "typed_config": {"@type": T + "envoy.extensions.filters.http.composite.v3.Composite"},
                },
                "xds_matcher": {"matcher_list": {"matchers": matchers}},
            },
        },
        {
            "name": "tessera.unmark_backend",
            "typed_config": {"@type": mutation, "mutations": {"request_mutations": [{"remove": marker}]}},
        },
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
        },
    ]


def model_cluster(
    m: ModelState, load: Mapping[str, float] | None = None, *, ca_file: str = SYSTEM_CA_FILE
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's cluster, and its ClusterLoadAssignment when served over EDS. ``load``
    (backend URL -> factor) scales EDS weights only (see ``control_plane.load``)."""
    name = cluster_name(m.name)
    eds_model = is_eds(m)
    cla = {"cluster_name": name, "endpoints": _locality_groups(m.backends, (load or {}) if eds_model else {})}
    cluster: dict[str, Any] = {
        "name": name,
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        **_resilience(m),
    }
    if eds_model:
        cluster |= {"type": "EDS", "eds_cluster_config": {"eds_config": ADS}}
        eds: dict[str, Any] | None = cla
    else:
        cluster |= {"type": "STRICT_DNS", "load_assignment": cla}
        eds = None
    tls = [
        {
            "name": backend_ref(b),
            "match": {"backend": backend_ref(b)},
            "transport_socket": _upstream_tls(b, ca_file),
        }
        for b in m.backends
        if b.scheme == "https"
    ]
    if tls:  # per endpoint: http backends of the same model stay plain
        cluster["transport_socket_matches"] = tls
    filters = _credential_filters(m)
    if filters:
        cluster["typed_extension_protocol_options"] = {
            HTTP_OPTIONS: {
                "@type": T + HTTP_OPTIONS,
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": filters,
            }
        }
    return cluster, eds


def _secrets(state: State) -> dict[str, dict[str, Any]]:
    return {
        secret_name(b): {
            "name": secret_name(b),
            "generic_secret": {"secret": {"inline_string": b.credential}},
        }
        for m in state.models
        for b in m.backends
        if b.credential
    }


def _gateway_secret(cert_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    return {
        "name": GATEWAY_TLS_SECRET,
        "tls_certificate": {
            "certificate_chain": {"inline_string": cert_pem.decode()},
            "private_key": {"inline_string": key_pem.decode()},
        },
    }


def _control_plane_cluster(
    cfg: GatewayConfig, name: str, host: str, port: int, *, h2: bool
) -> dict[str, Any]:
    """A cluster to the control plane (its HTTP handlers, its admin API): STRICT_DNS (in
    Kubernetes the Service name, locally an IP), mutual TLS when Envoy has an identity."""
    addr = {"socket_address": {"address": host, "port_value": port}}
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr}}]}],
        },
    }
    if h2:
        cluster["typed_extension_protocol_options"] = {
            HTTP_OPTIONS: {"@type": T + HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}
        }
    if cfg.envoy_identity_sds:
        alpn = ("h2",) if h2 else ("http/1.1",)
        cluster["transport_socket"] = internal_tls(
            cfg.envoy_identity_sds, cfg.envoy_ca_file, "control-plane", cfg.namespace, alpn=alpn
        )
    return cluster


def otlp_cluster(endpoint: str) -> dict[str, Any]:
    """The trace collector (OTLP over gRPC, plaintext as collectors serve it), or a cluster with
    no endpoint when there is none: the tracer needs one, and samples nothing then."""
    cluster: dict[str, Any] = {
        "name": OTLP_CLUSTER,
        "type": "STRICT_DNS" if endpoint else "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            HTTP_OPTIONS: {"@type": T + HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}
        },
        "load_assignment": {"cluster_name": OTLP_CLUSTER},
    }
    if endpoint:
        host, _, port = endpoint.rpartition(":")
        addr = {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [{"endpoint": {"address": addr}}]}]
    return cluster


def resources_from_state(
    state: State,
    cfg: GatewayConfig,
    load: Mapping[str, float] | None = None,
    gateway_cert: tuple[bytes, bytes] | None = None,
) -> XdsResources:
    """Everything Envoy is sent; ``gateway_cert`` (certificate, key PEM) for a TLS listener."""
    clusters = {
        CP_HTTP_CLUSTER: _control_plane_cluster(
            cfg, CP_HTTP_CLUSTER, cfg.control_plane_http_host, cfg.control_plane_http_port, h2=False
        ),
        ADMIN_CLUSTER: _control_plane_cluster(cfg, ADMIN_CLUSTER, cfg.admin_host, cfg.admin_port, h2=True),
        OTLP_CLUSTER: otlp_cluster(cfg.otlp_endpoint),
    }
    endpoints: dict[str, dict[str, Any]] = {}
    for m in state.models:
        if not m.backends:
            continue
        cluster, cla = model_cluster(m, load, ca_file=cfg.upstream_ca_file)
        clusters[cluster["name"]] = cluster
        if cla is not None:
            endpoints[cla["cluster_name"]] = cla
    listeners = {LISTENER_NAME: listener(cfg)}
    if cfg.admin_rest == "internal":
        listeners[ADMIN_REST_LISTENER] = admin_rest_listener(cfg, admin_rest_routes(cfg))
    secrets = _secrets(state)
    if cfg.tls:
        if gateway_cert is None:
            msg = "the gateway listener serves TLS but no certificate was read"
            raise ValueError(msg)
        secrets[GATEWAY_TLS_SECRET] = _gateway_secret(*gateway_cert)
    return XdsResources(
        listeners=listeners,
        routes={ROUTES_NAME: route_config(state, cfg)},
        clusters=clusters,
        endpoints=endpoints,
        extension_configs={JWT_FILTER: jwt_authn_config(state, cfg)},
        secrets=secrets,
    )
