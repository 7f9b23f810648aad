"""The gateway listener: its HTTP connection manager and filter chain (pure, proto3-JSON dicts).

Decode order: local_ratelimit (per client IP) → body_size_limit → jwt_authn (ECDS) →
json_to_metadata (body ``model`` → ``ai.gw:model``; it clears the route cache, so the
route is chosen by model; ``max_tokens`` for reservations; on the way back, a JSON answer's
usage) → ext_authz → ratelimit (reserve; settle at stream end) → lua (asks a stream for
usage; on the way back records the status and strips the usage chunk the client did not
ask for) → sse_to_metadata (a stream's usage, read before lua strips it) →
grpc_json_transcoder (admin routes only) → router. Envoy's own replies are rewritten into
OpenAI's error shape.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from control_plane.state import State
from control_plane.xds.config import (
    ADMIN_SERVICES,
    ADS,
    AUTHZ_NS,
    EXT_AUTHZ_CLUSTER,
    HCM,
    INVALID,
    JWT_FILTER,
    JWT_NS,
    LISTENER_NAME,
    LUA_FILTER,
    MISSING,
    MODEL_NAMED,
    MODEL_NS,
    RATELIMIT_CLUSTER,
    RATELIMIT_DOMAIN,
    ROUTE_NS,
    ROUTES_NAME,
    SSE_FILTER,
    TRANSCODER,
    GatewayConfig,
    T,
)
from tessera import usage_line
from tessera.openai_errors import error_body

USAGE_NS = "ai.gw.usage"
RATELIMIT_NS = "envoy.filters.http.ratelimit"  # where Envoy keeps the ratelimit answer's metadata
JSON_CONTENT = {"regex": "^application/json(;.*)?$"}  # aiohttp and others add "; charset=utf-8"
REALTIME_OFF = "Realtime is not enabled for this model, or you do not have access to it."
PER_IP_STATUS = 423  # the per-IP guard's refusal (Envoy never sends it otherwise), rewritten to 429
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
                    error_body("model_not_found", message=REALTIME_OFF, param="model"),
                ),
                "status_code": 404,
            },
            _mapper(_status_filter(413), error_body("request_too_large")),
            # The per-IP guard answers 423 so that it can be told apart here (a mapper cannot
            # see headers added to a local reply); the ratelimit service's own 429s keep the
            # OpenAI body it wrote (rate_limit_exceeded or insufficient_quota).
            {**_mapper(_status_filter(PER_IP_STATUS), error_body("rate_limit_exceeded")), "status_code": 429},
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
                # The usage line (tessera/usage_line.py): the billing record the meter ingests.
                "log_format": {"json_format": usage_line.ENVOY_FORMAT},
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
                        },
                        # What the ratelimit service reserves (descriptor values are strings).
                        *(
                            {
                                "selectors": [{"key": field}],
                                "on_present": {
                                    "metadata_namespace": MODEL_NS,
                                    "key": field,
                                    "type": "STRING",
                                },
                            }
                            for field in ("max_tokens", "max_completion_tokens")
                        ),
                    ],
                    "allow_content_types_regex": JSON_CONTENT,
                },
                # Usage of a JSON (non-stream) answer; SSE answers: sse_to_metadata below.
                "response_rules": {"rules": _usage_rules(), "allow_content_types_regex": JSON_CONTENT},
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
                # The served model (an alias resolved; /v1/realtime's ?model=) from the route.
                "route_metadata_context_namespaces": [ROUTE_NS],
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
                # Filter-level (route-level rate_limits ignore hits_addend). One descriptor at
                # request time (count, reserve); one at stream end (settle the real usage).
                # Envoy makes the stream-done call for every request it asked about, refused,
                # failed or cut ones included, unless a descriptor entry is missing
                # (docs/usage-and-limits.md).
                "rate_limits": [
                    {
                        "actions": [
                            *_identity(),
                            _header_entry("x-request-id", "request_id"),
                            _meta_entry(MODEL_NS, "max_tokens"),
                            _meta_entry(MODEL_NS, "max_completion_tokens"),
                            _header_entry("content-length", "body_bytes", optional=True),
                        ]
                    },
                    {
                        "apply_on_stream_done": True,
                        "actions": [
                            {"generic_key": {"descriptor_key": "phase", "descriptor_value": "settle"}},
                            # Only for a request that reserved: no metadata, no descriptor, no call.
                            {
                                "metadata": {
                                    "descriptor_key": "reserved",
                                    "metadata_key": {"key": RATELIMIT_NS, "path": [{"key": "reserved"}]},
                                }
                            },
                            *_identity(),
                            _header_entry("x-request-id", "request_id"),
                            *(
                                _meta_entry(USAGE_NS, k)
                                for k in ("prompt_tokens", "completion_tokens", "cached_tokens")
                            ),
                            _meta_entry(MODEL_NS, "status"),
                        ],
                    },
                ],
            },
        },
        {
            "name": LUA_FILTER,
            "typed_config": {
                "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": USAGE_LUA},
            },
        },
        {
            "name": SSE_FILTER,
            "typed_config": {
                "@type": T + "envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
                "response_rules": {
                    "max_event_size": 65536,
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
            "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _authz_descriptor(key: str) -> dict[str, Any]:
    return {"metadata": {"descriptor_key": key, "metadata_key": {"key": AUTHZ_NS, "path": [{"key": key}]}}}


def _identity() -> list[dict[str, Any]]:
    """tenant_id, key_id (from ext_authz), model: without them no descriptor is sent. The
    model is the served one, from the route (an alias counts as its model)."""
    model = {"key": ROUTE_NS, "path": [{"key": "model"}]}
    return [
        _authz_descriptor("tenant_id"),
        _authz_descriptor("key_id"),
        {
            "metadata": {
                "descriptor_key": "model",
                "metadata_key": model,
                "default_value": MISSING,
                "source": "ROUTE_ENTRY",
            }
        },
    ]


def _meta_entry(namespace: str, key: str) -> dict[str, Any]:
    """An optional descriptor entry from string metadata (left out when absent)."""
    return {
        "metadata": {
            "descriptor_key": key,
            "metadata_key": {"key": namespace, "path": [{"key": key}]},
            "skip_if_absent": True,
        }
    }


def _header_entry(header: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"header_name": header, "descriptor_key": key}
    if optional:
        entry["skip_if_absent"] = True
    return {"request_headers": entry}


def _usage_rules() -> list[dict[str, Any]]:
    """usage.{prompt,completion}_tokens and prompt_tokens_details.cached_tokens → ai.gw.usage,
    as strings (they feed ratelimit descriptors, and the access log reads them either way)."""
    paths = {
        "prompt_tokens": ["usage", "prompt_tokens"],
        "completion_tokens": ["usage", "completion_tokens"],
        "cached_tokens": ["usage", "prompt_tokens_details", "cached_tokens"],
    }
    return [
        {
            "selectors": [{"key": k} for k in path],
            "on_present": {"metadata_namespace": USAGE_NS, "key": key, "type": "STRING"},
        }
        for key, path in paths.items()
    ]


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
    return {
        "name": LISTENER_NAME,
        "address": {"socket_address": {"address": cfg.host, "port_value": cfg.port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
