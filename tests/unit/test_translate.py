"""The xDS translation: routing by model, no default route, OpenAI-shaped local replies."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from control_plane.state import BackendState, ModelState, State
from control_plane.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, encode_all, type_version
from control_plane.xds.translate import GatewayConfig, cluster_name, resources_from_state

CFG = GatewayConfig("127.0.0.1", 8080, "127.0.0.1", 9999, None, 1 << 20)


def model(name: str, *backends: BackendState, visibility: str = "public") -> ModelState:
    return ModelState(name, visibility, backends, 0)


def b(url: str, weight: int = 1, priority: int = 0, id_: int = 0) -> BackendState:
    return BackendState(url, "openai-compatible", weight, priority, id=id_)


def routes(state: State) -> list[dict]:
    return resources_from_state(state, CFG).routes["tessera_routes"]["virtual_hosts"][0]["routes"]


def test_each_model_routes_by_body_model_and_nothing_routes_by_default():
    rs = routes(State(models=(model("a", b("http://127.0.0.1:1")), model("b", b("http://127.0.0.1:2")))))
    routed = [r for r in rs if "route" in r]
    by_model = {
        r["match"]["dynamic_metadata"][0]["value"]["string_match"]["exact"]: r["route"]["cluster"]
        for r in routed
        if "dynamic_metadata" in r["match"]
    }
    assert by_model == {"a": cluster_name("a"), "b": cluster_name("b")}
    # Only the admin API, the token endpoint and /v1/models go anywhere else: to the control
    # plane, never to a backend.
    others = [r for r in routed if "dynamic_metadata" not in r["match"]]
    assert [(r["match"], r["route"]["cluster"]) for r in others] == [
        (
            {
                "path": "/admin/v1/openapi.json",
                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
            },
            "tessera_control_plane_http",
        ),
        ({"prefix": "/admin/"}, "tessera_admin_api"),
        ({"path": "/oauth/token"}, "tessera_control_plane_http"),
        ({"path": "/v1/models"}, "tessera_control_plane_http"),
    ]
    # The catch-alls are direct responses.
    assert all("direct_response" in r for r in rs if r not in routed)
    assert rs[-1]["match"] == {"prefix": "/"}


def test_model_routes_have_no_overall_timeout():
    (r,) = [r for r in routes(State(models=(model("a", b("http://127.0.0.1:1")),))) if r["name"] == "model:a"]
    assert r["route"]["timeout"] == "0s"


def test_models_without_backends_get_no_route():
    assert not [r for r in routes(State(models=(model("ghost"),))) if r["name"] == "model:ghost"]


def test_error_routes_answer_in_the_shape_of_the_endpoints_api():
    rs = {r["name"]: r for r in routes(State())}
    for name, code in [
        ("invalid_json", "invalid_json"),
        ("missing_model", "missing_model"),
        ("no_model", "missing_model"),
    ]:
        body = json.loads(rs[f"{name}:openai"]["direct_response"]["body"]["inline_string"])
        assert body["error"]["code"] == code
        assert rs[f"{name}:openai"]["direct_response"]["status"] == 400
        anthropic = json.loads(rs[f"{name}:anthropic"]["direct_response"]["body"]["inline_string"])
        assert anthropic["type"] == "error"
        assert anthropic["error"]["type"] == "invalid_request_error"
        assert rs[f"{name}:anthropic"]["match"]["safe_regex"]["regex"] == "(?:/v1/messages)"


def test_priorities_are_dense_and_weights_kept():
    res = resources_from_state(
        State(models=(model("m", b("http://10.0.0.1:80", 3, 10), b("http://10.0.0.2:80", 1, 20)),)), CFG
    )
    cla = res.endpoints[cluster_name("m")]
    assert [(g["priority"], g["lb_endpoints"][0]["load_balancing_weight"]) for g in cla["endpoints"]] == [
        (0, 300),  # configured weight x 100, so load factors can scale it finely
        (1, 100),
    ]
    assert res.clusters[cluster_name("m")]["type"] == "EDS"


def test_load_factors_scale_ip_backends_only():
    ips = model("m", b("http://10.0.0.1:80", 2), b("http://10.0.0.2:80", 2))
    names = model("n", b("http://gpu.example.com:80", 2))
    load = {"http://10.0.0.1:80": 0.2, "http://gpu.example.com:80": 0.2}
    res = resources_from_state(State(models=(ips, names)), CFG, load)
    weights = [
        e["load_balancing_weight"] for e in res.endpoints[cluster_name("m")]["endpoints"][0]["lb_endpoints"]
    ]
    assert weights == [40, 200]  # the loaded backend at a fifth of its share; the other unchanged
    dns = res.clusters[cluster_name("n")]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert dns[0]["load_balancing_weight"] == 200  # a DNS backend keeps its weight (no cluster churn)


def test_load_factor_from_metrics():
    from control_plane.load import load_factor, parse_metrics  # noqa: PLC0415

    text = (
        "# HELP vllm:num_requests_waiting queued\n"
        'vllm:num_requests_waiting{model_name="a"} 6.0\n'
        'vllm:num_requests_waiting{model_name="b"} 2.0\n'
        'vllm:kv_cache_usage_perc{model_name="a"} 0.2\n'
    )
    samples = parse_metrics(text)
    assert samples["vllm:num_requests_waiting"] == 8.0  # summed over models
    assert load_factor("vllm", samples) == 0.2  # a queue of 8: a fifth
    assert load_factor("vllm", parse_metrics('vllm:num_requests_waiting{m="a"} 0\n')) == 1.0
    assert (
        load_factor("vllm", parse_metrics("vllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0.97\n"))
        == 0.5
    )
    assert load_factor("llamacpp", parse_metrics("llamacpp:requests_deferred 2\n")) == 0.5
    assert load_factor("vllm", parse_metrics("something_else 3\n")) == 1.0  # unreadable: neutral
    assert load_factor("vllm", parse_metrics("vllm:num_requests_waiting 10000\n")) == 0.05  # floor


def _tls_by_backend(cluster: dict) -> dict[str, dict]:
    return {
        m["match"]["backend"]: m["transport_socket"]["typed_config"]
        for m in cluster["transport_socket_matches"]
    }


def test_hostnames_use_dns_and_https_gets_sni():
    res = resources_from_state(State(models=(model("m", b("https://vllm.example.com:443", id_=4)),)), CFG)
    cluster = res.clusters[cluster_name("m")]
    assert cluster["type"] == "STRICT_DNS"
    assert "transport_socket" not in cluster  # TLS is per endpoint, by its backend
    tls = _tls_by_backend(cluster)["b4"]
    assert tls["sni"] == "vllm.example.com"
    # the server's certificate is checked: the CA bundle and the backend's host name
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"]["filename"] == CFG.upstream_ca_file
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "vllm.example.com"}}
    ]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == {"backend": "b4"}
    assert cluster_name("m") not in res.endpoints


def test_each_https_backend_gets_its_own_ca_and_server_name_and_http_ones_stay_plain():
    own = replace(b("https://10.0.0.2:8443", id_=2), ca_bundle="PEM", sni="gpu.internal")
    plain = b("http://10.0.0.3:8000", id_=3)
    res = resources_from_state(State(models=(model("m", own, plain),)), CFG)
    tls = _tls_by_backend(res.clusters[cluster_name("m")])
    assert set(tls) == {"b2"}  # the http backend matches no TLS socket: plain text
    assert tls["b2"]["sni"] == "gpu.internal"
    validation = tls["b2"]["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"inline_string": "PEM"}
    assert validation["match_typed_subject_alt_names"][0]["matcher"] == {"exact": "gpu.internal"}


def test_credentials_go_over_sds_and_are_injected_per_backend():
    keyed = replace(b("http://10.0.0.2:8000", id_=2), credential="Bearer sk-secret")
    header = replace(b("http://10.0.0.4:8000", id_=4), credential="k4", credential_header="api-key")
    bare = b("http://10.0.0.3:8000", id_=3)
    res = resources_from_state(State(models=(model("m", keyed, bare, header), model("n", bare))), CFG)
    assert res.secrets == {
        "backend-credential/2": {
            "name": "backend-credential/2",
            "generic_secret": {"secret": {"inline_string": "Bearer sk-secret"}},
        },
        "backend-credential/4": {
            "name": "backend-credential/4",
            "generic_secret": {"secret": {"inline_string": "k4"}},
        },
    }
    # The secret appears nowhere else: clusters, routes and listeners only name it.
    others = json.dumps([res.clusters, res.routes, res.listeners, res.endpoints])
    assert "sk-secret" not in others
    options = res.clusters[cluster_name("m")]["typed_extension_protocol_options"]
    filters = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    assert [f["name"] for f in filters] == [
        "tessera.mark_backend",
        "tessera.upstream_credential",
        "tessera.unmark_backend",
        "envoy.filters.http.upstream_codec",
    ]
    matchers = filters[1]["typed_config"]["xds_matcher"]["matcher_list"]["matchers"]
    injected = {
        m["predicate"]["single_predicate"]["value_match"]["exact"]: m["on_match"]["action"]["typed_config"][
            "typed_config"
        ]["typed_config"]["credential"]["typed_config"]
        for m in matchers
    }
    assert injected == {
        "b2": {
            "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
            "credential": {
                "name": "backend-credential/2",
                "sds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            "header": "authorization",
        },
        "b4": {
            "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
            "credential": {
                "name": "backend-credential/4",
                "sds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            "header": "api-key",
        },
    }
    # A model with no credential keeps Envoy's default upstream chain.
    assert "typed_extension_protocol_options" not in res.clusters[cluster_name("n")]
    encode_all(res)  # every type is known to envoy-data-plane


def test_aliases_route_to_their_model_and_rename_it():
    state = State(models=(replace(model("llama-3-70b", b("http://10.0.0.1:80")), aliases=("gpt-4o",)),))
    rs = {r["name"]: r for r in routes(state)}
    assert rs["model:gpt-4o"]["route"]["cluster"] == rs["model:llama-3-70b"]["route"]["cluster"]
    # The Lua filter tells ext_authz the served model (x-tessera-model) and writes the model's
    # default max_tokens into bodies naming none: no default registered -> the platform's,
    # DEFAULT_COMPLETION_TOKENS = 1024 (below the platform cap of 32768).
    assert rs["model:gpt-4o"]["metadata"]["filter_metadata"] == {
        "tessera": {"model": "llama-3-70b"},  # the access log's served model
        "envoy.filters.http.lua": {
            "model": "llama-3-70b",
            "default_max_tokens": 1024,
            "served_model": "llama-3-70b",  # on an alias route only: the Lua filter renames the body
        },
    }
    assert rs["model:llama-3-70b"]["metadata"]["filter_metadata"] == {
        "tessera": {"model": "llama-3-70b"},
        "envoy.filters.http.lua": {"model": "llama-3-70b", "default_max_tokens": 1024},
    }


def test_model_routes_tell_the_lua_filter_the_model_and_its_default_max_tokens():
    own = replace(model("own", b("http://10.0.0.1:80")), default_max_tokens=300, max_max_tokens=4000)
    # A default above the model's cap is capped: min(5000, 2000) = 2000.
    capped = replace(model("capped", b("http://10.0.0.2:80")), default_max_tokens=5000, max_max_tokens=2000)
    # No default, a cap below the platform's default: min(1024, 512) = 512.
    small = replace(model("small", b("http://10.0.0.3:80")), max_max_tokens=512)
    rs = {r["name"]: r for r in routes(State(models=(own, capped, small)))}
    lua = {name: rs[f"model:{name}"]["metadata"]["filter_metadata"]["envoy.filters.http.lua"] for name in
           ("own", "capped", "small")}  # fmt: skip
    assert lua == {
        "own": {"model": "own", "default_max_tokens": 300},
        "capped": {"model": "capped", "default_max_tokens": 2000},
        "small": {"model": "small", "default_max_tokens": 512},
    }


def test_realtime_routes_only_for_enabled_models_by_query_model():
    on = replace(model("rt", b("http://10.0.0.1:80")), realtime=True, aliases=("rt-alias",))
    off = model("plain", b("http://10.0.0.2:80"))
    rs = routes(State(models=(on, off)))
    realtime = [r for r in rs if r["name"].startswith("realtime:")]
    assert [r["match"]["query_parameters"][0]["string_match"]["exact"] for r in realtime] == [
        "rt",
        "rt-alias",
    ]
    for r in realtime:
        assert r["match"]["path"] == "/v1/realtime"
        assert r["route"]["upgrade_configs"] == [{"upgrade_type": "websocket", "enabled": True}]
        assert r["route"]["cluster"] == cluster_name("rt")
        assert r["metadata"]["filter_metadata"]["tessera"] == {"model": "rt"}
        # The Lua filter runs here too: it tells ext_authz the served model (x-tessera-model).
        assert "envoy.filters.http.lua" not in r["typed_per_filter_config"]
        assert r["metadata"]["filter_metadata"]["envoy.filters.http.lua"]["model"] == "rt"
    # Any other /v1/realtime (a model without realtime, no upgrade) is refused before a backend.
    (off_route,) = [r for r in rs if r["name"] == "realtime_off"]
    assert off_route["direct_response"]["status"] == 404
    assert rs.index(off_route) > max(rs.index(r) for r in realtime)


def test_route_timeouts_are_the_longest_of_the_backends():
    short = replace(b("http://10.0.0.1:80"), timeout_seconds=30, idle_timeout_seconds=60)
    long_ = replace(b("http://10.0.0.2:80"), timeout_seconds=600)
    rs = {r["name"]: r for r in routes(State(models=(model("m", short, long_),)))}
    assert (rs["model:m"]["route"]["timeout"], rs["model:m"]["route"]["idle_timeout"]) == ("600s", "300s")
    unlimited = b("http://10.0.0.3:80")  # 0: no limit wins
    rs = {r["name"]: r for r in routes(State(models=(model("m", short, unlimited),)))}
    assert rs["model:m"]["route"]["timeout"] == "0s"


def test_health_path_override_and_none():
    vllm = BackendState("http://10.0.0.1:80", "vllm", 1, 0)
    custom = replace(vllm, health_path="/ready")
    res = resources_from_state(
        State(models=(model("a", vllm), model("b", custom), model("c", custom, vllm))), CFG
    )
    assert res.clusters[cluster_name("a")]["health_checks"][0]["http_health_check"]["path"] == "/health"
    assert res.clusters[cluster_name("b")]["health_checks"][0]["http_health_check"]["path"] == "/ready"
    assert "health_checks" not in res.clusters[cluster_name("c")]  # they differ: outlier detection only
    off = replace(vllm, health_path="none")
    assert (
        "health_checks"
        not in resources_from_state(State(models=(model("d", off),)), CFG).clusters[cluster_name("d")]
    )


def test_local_replies_cover_the_documented_statuses():
    hcm = resources_from_state(State(), CFG).listeners["tessera_gateway"]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    # the admin REST API's first, in its own (google.rpc.Status) shape
    admin = [
        m for m in hcm["local_reply_config"]["mappers"] if "code" in m["body_format_override"]["json_format"]
    ]
    assert {m["body_format_override"]["json_format"]["code"] for m in admin} == {3, 5, 14}
    mappers = hcm["local_reply_config"]["mappers"][len(admin) :]
    codes = {m["body_format_override"]["json_format"]["error"].get("code") for m in mappers}
    assert {
        "model_not_found",
        "request_too_large",
        "rate_limit_exceeded",
        "no_healthy_backend",
        "upstream_timeout",
    } <= codes
    # Anthropic's endpoints get every one of them in Anthropic's shape, first
    anthropic = [m for m in mappers if m["body_format_override"]["json_format"].get("type") == "error"]
    assert len(anthropic) == len(mappers) // 2
    assert mappers[: len(anthropic)] == anthropic
    assert hcm["use_remote_address"] is True
    ext_authz = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")
    assert ext_authz["typed_config"]["failure_mode_allow"] is False


def test_type_versions_change_only_with_content():
    one = encode_all(resources_from_state(State(models=(model("a", b("http://127.0.0.1:1")),)), CFG))
    same = encode_all(resources_from_state(State(models=(model("a", b("http://127.0.0.1:1")),)), CFG))
    moved = encode_all(resources_from_state(State(models=(model("a", b("http://127.0.0.1:2")),)), CFG))
    assert type_version(one[ENDPOINT_TYPE]) == type_version(same[ENDPOINT_TYPE])
    assert type_version(one[ENDPOINT_TYPE]) != type_version(moved[ENDPOINT_TYPE])
    assert type_version(one[CLUSTER_TYPE]) == type_version(moved[CLUSTER_TYPE])


def test_circuit_breaker_is_the_sum_of_the_backends_max_concurrency():
    def breaker(*backends: BackendState) -> int:
        cluster = resources_from_state(State(models=(model("m", *backends),)), CFG).clusters[
            cluster_name("m")
        ]
        return cluster["circuit_breakers"]["thresholds"][0]["max_requests"]

    limited = [BackendState(f"http://10.0.0.{i}:80", "vllm", 1, 0, 8) for i in (1, 2)]
    assert breaker(*limited) == 16
    assert breaker(limited[0], b("http://10.0.0.3:80")) == 1_000_000  # one backend without a limit


# --- issue 14: TLS at the gateway, the admin REST API's place, mutual TLS to the control plane ---


def test_a_tls_gateway_serves_its_sds_certificate_with_h2_and_http11_by_alpn():
    cfg = replace(CFG, tls=True)
    res = resources_from_state(State(), cfg, gateway_cert=(b"CERT", b"KEY"))
    (chain,) = res.listeners["tessera_gateway"]["filter_chains"]
    common = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    (sds,) = common["tls_certificate_sds_secret_configs"]
    assert sds["name"] == "gateway_tls"
    assert "ads" in sds["sds_config"]  # over ADS: rotated without a listener drain
    cert = res.secrets["gateway_tls"]["tls_certificate"]
    assert cert["certificate_chain"]["inline_string"] == "CERT"
    assert cert["private_key"]["inline_string"] == "KEY"
    # plain HTTP without it, and no certificate is no TLS listener at all
    plain = resources_from_state(State(), CFG).listeners["tessera_gateway"]["filter_chains"][0]
    assert "transport_socket" not in plain
    with pytest.raises(ValueError, match="no certificate"):
        resources_from_state(State(), cfg)


def test_the_admin_rest_api_is_public_internal_or_nowhere():
    def admin_routes(listener_routes: list[dict]) -> list[dict]:
        return [r for r in listener_routes if r.get("match", {}).get("prefix") == "/admin/"]

    public = resources_from_state(State(), replace(CFG, admin_rest="public"))
    assert len(admin_routes(public.routes["tessera_routes"]["virtual_hosts"][0]["routes"])) == 1
    assert public.listeners.keys() == {"tessera_gateway"}

    internal = resources_from_state(State(), replace(CFG, admin_rest="internal", admin_rest_port=8081))
    assert admin_routes(internal.routes["tessera_routes"]["virtual_hosts"][0]["routes"]) == []
    own = internal.listeners["tessera_admin_rest"]
    assert own["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8081}
    hcm = own["filter_chains"][0]["filters"][0]["typed_config"]
    openapi_route, route = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert openapi_route["route"]["cluster"] == "tessera_control_plane_http"
    assert route["route"]["cluster"] == "tessera_admin_api"

    off = resources_from_state(State(), replace(CFG, admin_rest="off"))
    assert admin_routes(off.routes["tessera_routes"]["virtual_hosts"][0]["routes"]) == []
    assert off.listeners.keys() == {"tessera_gateway"}


def test_envoy_reaches_the_control_plane_over_mutual_tls_pinning_its_identity():
    cfg = replace(CFG, envoy_identity_sds="/run/envoy-sds.json", envoy_ca_file="/ca.pem", namespace="prod")
    clusters = resources_from_state(State(), cfg).clusters
    for name, alpn in (("tessera_admin_api", ["h2"]), ("tessera_control_plane_http", ["http/1.1"])):
        tls = clusters[name]["transport_socket"]["typed_config"]
        common = tls["common_tls_context"]
        assert common["alpn_protocols"] == alpn
        (mine,) = common["tls_certificate_sds_secret_configs"]
        assert mine["sds_config"]["path_config_source"]["path"] == "/run/envoy-sds.json"
        assert common["validation_context"]["trusted_ca"] == {"filename": "/ca.pem"}
        (san,) = common["validation_context"]["match_typed_subject_alt_names"]
        assert san == {
            "san_type": "URI",
            "matcher": {"exact": "spiffe://tessera.local/ns/prod/control-plane"},
        }
        assert tls["sni"] == "control-plane.prod.tessera.local"
    assert "transport_socket" not in resources_from_state(State(), CFG).clusters["tessera_admin_api"]


def _tracing(cfg: GatewayConfig) -> tuple[dict, dict]:
    res = resources_from_state(State(), cfg)
    hcm = res.listeners["tessera_gateway"]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["tracing"], res.clusters["tessera_otlp"]


def test_without_a_collector_the_tracer_continues_traces_and_samples_nothing():
    tracing, cluster = _tracing(CFG)
    assert tracing["random_sampling"] == {"value": 0.0}
    assert tracing["client_sampling"] == {"value": 0}  # x-client-trace-id cannot force a span
    assert "spawn_upstream_span" not in tracing  # no span that nobody will see
    assert "custom_tags" not in tracing
    assert "endpoints" not in cluster["load_assignment"]
    # the client's traceparent is read on the way in and never forwarded as it came
    assert resources_from_state(State(), CFG).routes["tessera_routes"]["request_headers_to_remove"] == [
        "traceparent"
    ]


def test_with_a_collector_envoy_exports_to_it_at_the_configured_share():
    tracing, cluster = _tracing(
        replace(CFG, otlp_endpoint="otel-collector.monitoring:4317", trace_sampling_percent=5)
    )
    assert tracing["random_sampling"] == {"value": 5}
    assert tracing["client_sampling"] == {"value": 0}
    assert tracing["spawn_upstream_span"] is True  # the backend's parent: the gateway's call to it
    assert {t["tag"] for t in tracing["custom_tags"]} == {"tessera.tenant_id", "gen_ai.request.model"}
    assert tracing["provider"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "tessera_otlp"
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "otel-collector.monitoring",
        "port_value": 4317,
    }
    assert cluster["type"] == "STRICT_DNS"
    # the admin REST listener's calls are traced the same way
    internal = resources_from_state(State(), replace(CFG, admin_rest="internal", otlp_endpoint="c:4317"))
    rest = internal.listeners["tessera_admin_rest"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert rest["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"
