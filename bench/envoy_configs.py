"""Static Envoy bootstraps for the reference paths (a)-(c1), as plain dicts written as JSON.

(a) ``upstream``: answers every request itself with ``direct_response`` 200 and a small
    OpenAI-like body. The ``buffer`` filter reads the request body first: without it Envoy
    answers before the body has arrived and closes every connection (no keep-alive).
(b) ``plain_proxy``: an HTTP proxy to (a), the gateway's HCM basics (``use_remote_address``),
    no callouts.
(c1) ``authz_proxy``: (b) plus ONE ``ext_authz`` callout (gRPC ``grpc_service`` or HTTP
    ``http_service``) to a no-op Python service of ``bench.noop_services`` - the floor any
    design with one Python callout per request pays on that transport.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

T = "type.googleapis.com/"
HOST = "127.0.0.1"

UPSTREAM_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "tok0 tok1 tok2 tok3"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
    },
    separators=(",", ":"),
)


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": HOST, "port_value": port}}


def _cluster(name: str, port: int, *, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}],
        },
    }
    if http2:  # gRPC services
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _bootstrap(
    port: int,
    route: dict[str, Any],
    filters: list[dict[str, Any]],
    clusters: list[dict[str, Any]],
    admin_port: int = 0,
) -> dict[str, Any]:
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "AUTO",
        "use_remote_address": True,
        "route_config": {
            "name": "bench",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
        },
        "http_filters": [
            *filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    bootstrap: dict[str, Any] = {
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": _address(port),
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        }
    }
    if admin_port:  # for the callout counts in /stats
        bootstrap["admin"] = {"address": _address(admin_port)}
    return bootstrap


def upstream(port: int) -> dict[str, Any]:
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }
    buffer = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": T + "envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 1 << 20,
        },
    }
    return _bootstrap(port, route, [buffer], [])


def _proxy_route() -> dict[str, Any]:
    return {"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "15s"}}


def plain_proxy(port: int, upstream_port: int) -> dict[str, Any]:
    return _bootstrap(port, _proxy_route(), [], [_cluster("upstream", upstream_port)])


def authz_proxy(
    port: int, upstream_port: int, authz_port: int, transport: str, admin_port: int = 0
) -> dict[str, Any]:
    """(b) plus ONE ext_authz callout to a no-op Python service, over ``grpc`` or ``http``."""
    ext_authz: dict[str, Any] = {
        "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": False,
        "status_on_error": {"code": 503},
    }
    if transport == "grpc":
        ext_authz["grpc_service"] = {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "0.5s"}
        authz_cluster = _cluster("authz", authz_port, http2=True)
    elif transport == "http":
        ext_authz["http_service"] = {
            "server_uri": {"uri": f"http://{HOST}:{authz_port}", "cluster": "authz_http", "timeout": "1s"},
            "authorization_response": {"allowed_upstream_headers": {"patterns": [{"exact": "x-tenant-id"}]}},
        }
        authz_cluster = _cluster("authz_http", authz_port)
    else:
        msg = f"unknown ext_authz transport {transport!r}"
        raise ValueError(msg)
    filters = [{"name": "envoy.filters.http.ext_authz", "typed_config": ext_authz}]
    clusters = [_cluster("upstream", upstream_port), authz_cluster]
    return _bootstrap(port, _proxy_route(), filters, clusters, admin_port)


def write(config: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(config, indent=1))
    return path
