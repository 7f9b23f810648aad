"""The endpoint allowlist (``tessera/endpoints.py``) is the one list: the routes, the Lua filter,
ext_authz's reservations, the backend kinds and the README all agree with it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from control_plane.state import BackendState, ModelState, State
from control_plane.validation import BACKEND_KINDS
from control_plane.xds.config import NOT_FOUND_STATUS
from control_plane.xds.translate import GatewayConfig, resources_from_state
from ext_authz.request_facts import request_cost
from tessera import endpoints
from tessera.client_errors import error_json
from tessera.endpoints import Dialect

ROOT = Path(__file__).resolve().parents[2]
LUA = (ROOT / "control_plane" / "xds" / "usage.lua").read_text()
CFG = GatewayConfig("127.0.0.1", 8080, "127.0.0.1", 9999, None, 1 << 20)


def _lua_table(name: str) -> set[str]:
    body = re.search(rf"local {name} = \{{(.*?)\n?\}}", LUA, re.DOTALL)
    assert body is not None, name
    return set(re.findall(r'\["([^"]+)"\]', body.group(1)))


def test_every_backend_kind_has_its_endpoints():
    assert set(endpoints.BY_KIND) == BACKEND_KINDS
    assert all(endpoints.CHAT in served for served in endpoints.BY_KIND.values())


def test_the_lua_filter_knows_the_same_endpoints():
    generating = {e.path for e in endpoints.ALL if e.generates and not e.form}
    assert _lua_table("GENERATES") == generating
    assert _lua_table("FORM") == {e.path for e in endpoints.ALL if e.form}
    assert _lua_table("ANTHROPIC") == {e.path for e in endpoints.ALL if e.dialect is Dialect.ANTHROPIC}
    assert _lua_table("ASKS_USAGE") == {endpoints.CHAT.path, endpoints.COMPLETIONS.path}


def test_the_path_regex_matches_exactly_the_paths():
    pattern = re.compile(endpoints.path_regex(endpoints.ALL))
    for e in endpoints.ALL:
        assert pattern.fullmatch(e.path)
        for near in (e.path + "/", e.path + "x", e.path.upper(), "/v1" + e.path, e.path[:-1]):
            assert not pattern.fullmatch(near), near
    assert not pattern.fullmatch("/v1/chat.completions")  # '.' is not a wildcard


def test_a_model_of_two_kinds_serves_what_both_serve():
    assert endpoints.served({"vllm", "openai-compatible"}) == (
        endpoints.CHAT,
        endpoints.COMPLETIONS,
        endpoints.EMBEDDINGS,
        endpoints.RESPONSES,
        endpoints.TRANSCRIPTIONS,
        endpoints.TRANSLATIONS,
    )
    assert endpoints.MESSAGES not in endpoints.served({"vllm", "trtllm"})


def test_model_routes_match_only_their_endpoints_and_everything_else_is_not_found():
    mixed = ModelState(
        "m",
        "public",
        (
            BackendState("http://10.0.0.1:80", "vllm", 1, 0),
            BackendState("http://10.0.0.2:80", "trtllm", 1, 0),
        ),
        0,
    )
    routes = resources_from_state(State(models=(mixed,)), CFG).routes["tessera_routes"]["virtual_hosts"][0][
        "routes"
    ]
    by_name = {r["name"]: r for r in routes}
    match = by_name["model:m"]["match"]
    assert match["safe_regex"]["regex"] == endpoints.path_regex((endpoints.CHAT, endpoints.COMPLETIONS))
    assert match["headers"] == [{"name": ":method", "string_match": {"exact": "POST"}}]
    # a served model asked for another endpoint, and any other path: Envoy's own 404 not_found
    assert by_name["endpoint_not_served"]["direct_response"]["status"] == NOT_FOUND_STATUS
    assert routes[-1]["match"] == {"prefix": "/"}
    assert routes[-1]["direct_response"]["status"] == NOT_FOUND_STATUS
    # only a listed path can be an unknown model (or a missing one)
    assert by_name["unknown_model"]["match"]["safe_regex"]["regex"] == endpoints.path_regex(endpoints.ALL)
    # nothing but the model routes and the control plane's own routes (the admin API, /v1/models,
    # /oauth/token) reaches a cluster
    clusters = {r["route"]["cluster"] for r in routes if "route" in r}
    assert clusters == {"model/m", "tessera_control_plane_http", "tessera_admin_api"}


def test_reservations_follow_the_endpoint():
    cap = 32_768
    for e in endpoints.ALL:
        cost = request_cost({}, e.path, None)
        assert getattr(cost, "max_completion_tokens", None) == (cap if e.generates else 0), e.path


def test_anthropic_errors_have_anthropics_shape():
    for code, kind in (
        ("invalid_api_key", "authentication_error"),
        ("model_not_found", "not_found_error"),
        ("rate_limit_exceeded", "rate_limit_error"),
        ("request_too_large", "request_too_large"),
        ("service_unavailable", "overloaded_error"),
        ("upstream_timeout", "api_error"),
    ):
        body = json.loads(error_json(code, dialect=Dialect.ANTHROPIC))
        assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
    assert endpoints.dialect_of("/v1/messages?beta=true") is Dialect.ANTHROPIC
    assert endpoints.dialect_of("/v1/chat/completions") is Dialect.OPENAI


def test_the_readme_lists_the_endpoints_of_every_kind():
    readme = (ROOT / "README.md").read_text()
    kinds = list(endpoints.BY_KIND)
    header = "| endpoint (`POST`) | API | " + " | ".join(f"`{k}`" for k in kinds) + " |"
    rows = [
        f"| `{e.path}` | {e.dialect.value} | "
        + " | ".join("yes" if e in endpoints.BY_KIND[k] else "" for k in kinds)
        + " |"
        for e in endpoints.ALL
    ]
    table = "\n".join([header, "|---|---|" + "---|" * len(kinds), *rows])
    assert table in readme
