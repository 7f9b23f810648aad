"""HTTP handlers Envoy routes to: ``GET /v1/models`` answered from the registry.

Envoy's ext_authz has already authenticated the caller and set ``x-tenant-id``
and ``x-key-id`` (overwriting anything the client sent); this port is reachable
only by Envoy. The list is filtered by the caller's entitlements.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from control_plane.state import State

StateSource = Callable[[], State | None]


def visible_models(state: State, tenant_id: str, key_id: str) -> list[str]:
    tenant = next((t for t in state.tenants if t.id == tenant_id), None)
    if tenant is None or tenant.suspended:
        return []
    key_scopes: set[str] = set()
    for k in state.keys:
        if k.key_id == key_id and k.allowed_models:
            key_scopes.update(k.allowed_models)
    names = []
    for m in state.models:
        if not m.backends:
            continue
        if tenant.allowed_models:
            if m.name not in tenant.allowed_models:
                continue
        elif m.visibility != "public":
            continue
        if key_scopes and m.name not in key_scopes:
            continue
        names.append(m.name)
    return names


def build_http_app(state: StateSource) -> web.Application:
    async def list_models(request: web.Request) -> web.Response:
        current = state()
        if current is None:
            raise web.HTTPServiceUnavailable
        names = visible_models(
            current, request.headers.get("x-tenant-id", ""), request.headers.get("x-key-id", "")
        )
        created = {m.name: m.created_unix for m in current.models}
        data = [{"id": n, "object": "model", "created": created[n], "owned_by": "tessera"} for n in names]
        return web.json_response({"object": "list", "data": data})

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(status=200 if state() is not None else 503)

    app = web.Application()
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    return app
