"""The gateway listener: its HTTP connection manager and filter chain (pure, proto3-JSON dicts).

Decode order: local_ratelimit (per client IP) → body_size_limit → jwt_authn (ECDS) →
json_to_metadata (body ``model`` → ``ai.gw:model``; it clears the route cache, so the route
is chosen by model; on the way back, a JSON answer's usage) → lua (the facts ext_authz
decides on as ``x-tessera-*`` headers, the model's default max_tokens written into the body,
a stream asked for usage; on the way back records the status and strips the usage chunk the
client did not ask for) → ext_authz (the one Python callout: identity, entitlement and
admission by the ratelimit service's counters) → sse_to_metadata (a stream's usage, read
before lua strips it) → grpc_json_transcoder (admin routes only) → router. Settlement is off
the request path (the meter reads the usage log). Envoy's own replies are rewritten into
OpenAI's error shape.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Final

from control_plane.state import State
from control_plane.xds.config import (
    ADMIN_REST_LISTENER,
    ADMIN_SERVICES,
    ADS,
    AUTHZ_NS,
    AUTHZ_PATH_PREFIX,
    EXT_AUTHZ_CLUSTER,
    EXT_AUTHZ_HTTP_CLUSTER,
    GATEWAY_TLS_SECRET,
    HCM,
    INVALID,
    JWT_FILTER,
    LISTENER_NAME,
    LUA_FILTER,
    MISSING,
    MODEL_NAMED,
    MODEL_NS,
    NOT_FOUND_STATUS,
    OTLP_CLUSTER,
    ROUTE_NS,
    ROUTES_NAME,
    SSE_FILTER,
    TRANSCODER,
    GatewayConfig,
    T,
)
from tessera import gateway_headers, usage_line
from tessera.client_errors import body_in
from tessera.endpoints import ALL, Dialect, path_regex
from tessera.envoy_tls import DOWNSTREAM_TLS

ROUTER = "envoy.extensions.filters.http.router.v3.Router"
USAGE_NS = "ai.gw.usage"
JSON_CONTENT = {"regex": "^application/json(;.*)?$"}  # aiohttp and others add "; charset=utf-8"
REALTIME_OFF = "Realtime is not enabled for this model, or you do not have access to it."
PER_IP_STATUS = 423  # the per-IP guard's refusal (Envoy never sends it otherwise), rewritten to 429
ANTHROPIC_PATHS = path_regex(tuple(e for e in ALL if e.dialect is Dialect.ANTHROPIC))
USAGE_LUA = (Path(__file__).parent / "usage.lua").read_text()


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
    """Envoy's own replies (no route, 413, 429, 503, 504) in the error shape of the endpoint's API:
    Anthropic's on its endpoints, OpenAI's everywhere else."""
    anthropic = {
        "header_filter": {
            "header": {
                "name": ":path",
                "string_match": {"safe_regex": {"regex": f"{ANTHROPIC_PATHS}(?:\\?.*)?"}},
            }
        }
    }
    admin = {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": "/admin/"}}}}
    mappers = [_with([admin], m) for m in ADMIN_MAPPERS]
    for dialect, only in ((Dialect.ANTHROPIC, [anthropic]), (Dialect.OPENAI, [])):
        mappers += [_with(only, m) for m in _mappers(dialect)]
    return {"mappers": mappers}


# The admin REST API's errors are google.rpc.Status JSON (what the transcoder makes of a gRPC
# error); its own refusals (a body that is not JSON, a path no method has) and an unreachable
# admin API come in the same shape, never as text. (gRPC codes: 3 INVALID_ARGUMENT, 5 NOT_FOUND,
# 14 UNAVAILABLE.)
ADMIN_MAPPERS: Final = [
    _mapper(_status_filter(400), {"code": 3, "message": "%LOCAL_REPLY_BODY%"}),
    _mapper(_status_filter(404), {"code": 5, "message": "%LOCAL_REPLY_BODY%"}),
    {**_mapper(_status_filter(NOT_FOUND_STATUS), {"code": 5, "message": "Not found."}), "status_code": 404},
    _mapper(_status_filter(503), {"code": 14, "message": "The admin API is unavailable."}),
]


def _with(extra: list[dict[str, Any]], mapper: dict[str, Any]) -> dict[str, Any]:
    """``mapper`` applying only where every filter in ``extra`` also matches."""
    if not extra:
        return mapper
    return {**mapper, "filter": {"and_filter": {"filters": [mapper["filter"], *extra]}}}


def _mappers(dialect: Dialect) -> list[dict[str, Any]]:
    def body(code: str, message: str | None = None, param: str | None = None) -> dict[str, Any]:
        return body_in(dialect, code, message, param)

    model_known = {
        "metadata_filter": {
            "matcher": {
                "filter": MODEL_NS,
                "path": [{"key": "model"}],
                "value": MODEL_NAMED,
            },
            "match_if_key_not_found": False,  # (Envoy's default matches a request with no model)
        }
    }
    unknown_model = body(
        "model_not_found",
        message="The model `%DYNAMIC_METADATA(ai.gw:model)%` does not exist or you do not have access to it.",
        param="model",
    )
    return [
        _mapper({"and_filter": {"filters": [_status_filter(404), model_known]}}, unknown_model),
        _mapper(_status_filter(404), body("not_found")),
        # A path no route serves (translate.NOT_FOUND_STATUS, so that a model named in its body
        # does not make it the unknown-model reply above).
        {**_mapper(_status_filter(NOT_FOUND_STATUS), body("not_found")), "status_code": 404},
        # Envoy refuses a WebSocket upgrade on a route that does not enable it (a model
        # without realtime, or no such model) with a bare 403.
        {
            **_mapper(
                {
                    "and_filter": {
                        "filters": [
                            _status_filter(403),
                            {"header_filter": {"header": {"name": "upgrade", "present_match": True}}},
                        ]
                    }
                },
                body("model_not_found", message=REALTIME_OFF, param="model"),
            ),
            "status_code": 404,
        },
        _mapper(_status_filter(413), body("request_too_large")),
        # The per-IP guard answers 423 so that it can be told apart here (a mapper cannot
        # see headers added to a local reply); the ratelimit service's own 429s keep the
        # body it wrote (rate_limit_exceeded or insufficient_quota).
        {**_mapper(_status_filter(PER_IP_STATUS), body("rate_limit_exceeded")), "status_code": 429},
        _mapper(
            {"and_filter": {"filters": [_status_filter(503), {"response_flag_filter": {"flags": ["UAEX"]}}]}},
            body("service_unavailable"),
        ),
        _mapper(_status_filter(503), body("no_healthy_backend")),
        _mapper(_status_filter(504), body("upstream_timeout")),
    ]


def _access_log(path: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                # The usage line (tessera/usage_line.py): the billing record the meter ingests.
                # A value Envoy does not have is left out (the meter reads it as null): most of a
                # line's usage fields are another API's.
                "log_format": {"json_format": usage_line.ENVOY_FORMAT, "omit_empty_values": True},
            },
        }
    ]


def _transcoder(descriptor: bytes) -> dict[str, Any]:
    """REST/JSON for the admin API under /admin/. Off by default; only the admin route enables it."""
    return {"name": TRANSCODER, "disabled": True, "typed_config": transcoder_config(descriptor)}


def transcoder_config(descriptor: bytes) -> dict[str, Any]:
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
                "status": {"code": PER_IP_STATUS},
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
        # ext_authz reads the verified claims from this header (over gRPC and HTTP alike); a
        # client-sent copy was removed before any filter ran.
        "forward_payload_header": gateway_headers.JWT_PAYLOAD,
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
            # every path: endpoints are not all under /v1/ (vLLM's /tokenize); a token that is not
            # one of ours (an admin token) passes untouched
            "rules": [{"match": {"prefix": "/"}, "requires": either}],
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


AUTHZ_TIMEOUT = "0.5s"
# Set by ext_authz on every allow; a client's copy never reaches a backend.
IDENTITY_HEADERS = ("x-tenant-id", "x-key-id", "x-gateway-inference-fairness-id", "x-tessera-priority")
RATELIMIT_HEADERS = {"prefix": "x-ratelimit-"}  # x-ratelimit-{limit,remaining,reset}-{requests,tokens}
AUTHZ_METADATA = ("tenant_id", "key_id", "reserved")  # envoy.filters.http.ext_authz, as gRPC's Struct


def _exact(*names: str) -> list[dict[str, str]]:
    return [{"exact": name} for name in names]


def _ext_authz(cfg: GatewayConfig) -> dict[str, Any]:
    """The one Python callout, over gRPC (Check) or HTTP/1.1 (http_service): the same decision.

    Over HTTP ext_authz answers with plain headers, and these lists say what each is for:
    identity headers replace the client's upstream, ``x-envoy-auth-headers-to-remove`` strips
    the credentials and facts, headers named ``tenant_id``/``key_id``/``reserved`` become the
    same dynamic metadata as over gRPC, ``x-ratelimit-*`` go to the client on an allow (they
    are appended: a backend's own copies stay), and a denial's status, body and listed headers
    go to the client. A 5xx from ext_authz is an error: ``status_on_error``, never a pass.
    """
    config: dict[str, Any] = {
        "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        # Fail closed: failure_mode_allow would forward the raw key upstream.
        "failure_mode_allow": False,
        "status_on_error": {"code": 503},
        # Only what the decision reads: the credentials, the request id (the reservation's
        # name) and the facts the Lua filter put in x-tessera-* headers. (Over HTTP Envoy also
        # sends host, content-length and authorization, whatever the list.)
        "allowed_headers": {
            "patterns": [
                *_exact(*gateway_headers.CREDENTIALS, "x-request-id"),
                {"prefix": "x-tessera-"},
            ]
        },
    }
    if cfg.authz_transport == "http":
        config["http_service"] = {
            "server_uri": {
                "uri": f"http://{EXT_AUTHZ_HTTP_CLUSTER}",
                "cluster": EXT_AUTHZ_HTTP_CLUSTER,
                "timeout": AUTHZ_TIMEOUT,
            },
            "path_prefix": AUTHZ_PATH_PREFIX,
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": _exact(*IDENTITY_HEADERS)},
                "allowed_client_headers_on_success": {"patterns": [RATELIMIT_HEADERS]},
                "allowed_client_headers": {
                    "patterns": [
                        *_exact("content-type", "retry-after", "www-authenticate"),
                        RATELIMIT_HEADERS,
                    ]
                },
                "dynamic_metadata_from_headers": {"patterns": _exact(*AUTHZ_METADATA)},
            },
        }
    else:
        config["grpc_service"] = {"envoy_grpc": {"cluster_name": EXT_AUTHZ_CLUSTER}, "timeout": AUTHZ_TIMEOUT}
    return {"name": "envoy.filters.http.ext_authz", "typed_config": config}


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
                        },
                    ],
                    "allow_content_types_regex": JSON_CONTENT,
                },
                # Usage of a JSON (non-stream) answer; SSE answers: sse_to_metadata below.
                "response_rules": {"rules": _usage_rules(), "allow_content_types_regex": JSON_CONTENT},
            },
        },
        {
            "name": LUA_FILTER,
            "typed_config": {
                "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": USAGE_LUA},
            },
        },
        _ext_authz(cfg),
        {
            "name": SSE_FILTER,
            "typed_config": {
                "@type": T + "envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
                "response_rules": {
                    # a Responses stream's response.completed repeats the whole output: 32k tokens fit
                    "max_event_size": 1 << 20,
                    "content_parser": {
                        "name": "envoy.content_parsers.json",
                        "typed_config": {
                            "@type": T + "envoy.extensions.content_parsers.json.v3.JsonContentParser",
                            "rules": [{"rule": rule} for rule in _usage_rules()],
                        },
                    },
                },
            },
        },
        _transcoder(cfg.admin_descriptor),
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": T + ROUTER},
        },
    ]


# Where each API puts its usage (JSON answers, and the SSE events that carry it) → ai.gw.usage,
# each API's fields under keys of their own (the meter reads the request's endpoint's:
# tessera.usage_line). An event whose usage is null writes nothing; a later event's value
# replaces an earlier one's (a stream's last word is its total).
USAGE_PATHS: Final[dict[str, tuple[tuple[str, ...], ...]]] = {
    # chat, completions, embeddings, score; rerank reports only total_tokens
    "prompt_tokens": (("usage", "prompt_tokens"),),
    "completion_tokens": (("usage", "completion_tokens"),),
    "cached_tokens": (("usage", "prompt_tokens_details", "cached_tokens"),),
    "total_tokens": (("usage", "total_tokens"),),
    # the Responses API (JSON; a stream's response.completed), audio, Anthropic's Messages (JSON;
    # a stream's message_start has the input, its message_delta the output: message_start's
    # output count is not the answer's, so it is not read)
    "input_tokens": (
        ("usage", "input_tokens"),
        ("response", "usage", "input_tokens"),
        ("message", "usage", "input_tokens"),
    ),
    "output_tokens": (("usage", "output_tokens"), ("response", "usage", "output_tokens")),
    "input_cached_tokens": (
        ("usage", "input_tokens_details", "cached_tokens"),
        ("response", "usage", "input_tokens_details", "cached_tokens"),
    ),
    "cache_read_tokens": (
        ("usage", "cache_read_input_tokens"),
        ("message", "usage", "cache_read_input_tokens"),
    ),
    "cache_write_tokens": (
        ("usage", "cache_creation_input_tokens"),
        ("message", "usage", "cache_creation_input_tokens"),
    ),
}


def _usage_rules() -> list[dict[str, Any]]:
    """``USAGE_PATHS`` as json_to_metadata rules, the values as strings (the usage line reads them)."""
    return [
        {
            "selectors": [{"key": k} for k in path],
            "on_present": {"metadata_namespace": USAGE_NS, "key": key, "type": "STRING"},
        }
        for key, paths in USAGE_PATHS.items()
        for path in paths
    ]


def listener(cfg: GatewayConfig) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": "gateway",
        "codec_type": "AUTO",
        # The client address is the peer, or X-Forwarded-For only from configured trusted hops.
        "use_remote_address": True,
        # Routes match the path a backend will read, and only an exact endpoint path
        # (tessera/endpoints.py) reaches one: dot-segments resolved (RFC 3986) and slashes merged,
        # then matched; the backend gets that path. An escaped slash (%2F, %5C) is kept as sent
        # (Envoy's default), so a path with one is no endpoint's, and an admin path may carry a
        # model name with a slash.
        "normalize_path": True,
        "merge_slashes": True,
        "xff_num_trusted_hops": cfg.xff_trusted_hops,
        # Envoy mints every request id: a client-sent x-request-id is dropped before
        # the connection manager looks at it, so nobody can pick a ledger row's id. The
        # x-tessera-* facts ext_authz decides on are only ever set by the gateway itself, and
        # so are the identity headers (ext_authz replaces them on every allow; a client's copy
        # must not survive a path that skips it, nor an allow over HTTP that omits one).
        "early_header_mutation_extensions": [
            {
                "name": "tessera.drop_client_request_id",
                "typed_config": {
                    "@type": T
                    + "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    "mutations": [
                        {"remove": name}
                        for name in ("x-request-id", *gateway_headers.SET_BY_GATEWAY, *IDENTITY_HEADERS)
                    ],
                },
            }
        ],
        # The client gets it back (x-request-id): the id its ledger row and usage event carry.
        "always_set_request_id_in_response": True,
        "rds": {"route_config_name": ROUTES_NAME, "config_source": ADS},
        # Long generations: no overall request timeout; idle streams end after 5 minutes.
        "request_timeout": "0s",
        "stream_idle_timeout": "300s",
        "http_filters": _http_filters(cfg),
        "local_reply_config": _local_reply_config(),
    }
    if cfg.access_log_path:
        hcm["access_log"] = _access_log(cfg.access_log_path)
    hcm["tracing"] = tracing(cfg)
    return _listener(LISTENER_NAME, cfg.host, cfg.port, hcm, tls=cfg.tls)


def tracing(cfg: GatewayConfig) -> dict[str, Any]:
    """Envoy's OpenTelemetry tracer. Always on: each request continues the client's W3C trace
    context (or starts one), and ext_authz and the backend get a ``traceparent`` whose parent is
    the gateway's span. Without a collector nothing is sampled (the cluster has no endpoint) and
    nothing that only an exported span would show is configured: a request pays for ids and a
    header. With one, the backend's parent is a span of its own (the router's call to the model
    server), and the request's span names the tenant and the model."""
    config: dict[str, Any] = {
        "random_sampling": {"value": cfg.trace_sampling_percent if cfg.otlp_endpoint else 0.0},
        # a client's x-client-trace-id would force its request sampled: recording is ours to pick
        "client_sampling": {"value": 0},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": T + "envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
                "service_name": "tessera-gateway",
            },
        },
    }
    if cfg.otlp_endpoint:
        config["spawn_upstream_span"] = True
        config["custom_tags"] = [
            _metadata_tag("tessera.tenant_id", "request", AUTHZ_NS, "tenant_id"),
            _metadata_tag("gen_ai.request.model", "route", ROUTE_NS, "model"),
        ]
    return config


def _metadata_tag(tag: str, kind: str, namespace: str, key: str) -> dict[str, Any]:
    return {
        "tag": tag,
        "metadata": {"kind": {kind: {}}, "metadata_key": {"key": namespace, "path": [{"key": key}]}},
    }


def _listener(name: str, host: str, port: int, hcm: dict[str, Any], *, tls: bool) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if tls:
        # The certificate arrives over SDS (rotation keeps open connections); HTTP/2 or HTTP/1.1
        # by ALPN, the connection manager's codec follows it.
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": DOWNSTREAM_TLS,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificate_sds_secret_configs": [{"name": GATEWAY_TLS_SECRET, "sds_config": ADS}],
                },
            },
        }
    return {
        "name": name,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [chain],
    }


def admin_rest_listener(cfg: GatewayConfig, routes: list[dict[str, Any]]) -> dict[str, Any]:
    """``admin_rest="internal"``: the admin REST API on a listener of its own (not the public
    one), with the gateway's TLS when it has it. The control plane authenticates each call.
    ``routes`` are the gateway's admin routes: of their filter switches only the transcoder's
    applies here (it is the one filter before the router)."""
    transcoder = {"name": TRANSCODER, "typed_config": transcoder_config(cfg.admin_descriptor)}
    hcm = {
        "@type": HCM,
        "stat_prefix": "admin_rest",
        "codec_type": "AUTO",
        "always_set_request_id_in_response": True,
        "normalize_path": True,
        "merge_slashes": True,
        "local_reply_config": {"mappers": ADMIN_MAPPERS},
        "route_config": {
            "name": "tessera_admin_rest",
            "virtual_hosts": [
                {
                    "name": "admin",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": r["match"],
                            "route": r["route"],
                            "typed_per_filter_config": {TRANSCODER: r["typed_per_filter_config"][TRANSCODER]},
                        }
                        for r in routes
                    ],
                }
            ],
        },
        "tracing": tracing(cfg),
        "http_filters": [
            transcoder,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": T + ROUTER}},
        ],
    }
    return _listener(ADMIN_REST_LISTENER, cfg.admin_rest_host, cfg.admin_rest_port, hcm, tls=cfg.tls)
