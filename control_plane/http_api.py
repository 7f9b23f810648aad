"""HTTP handlers Envoy routes to: ``GET /v1/models``, ``POST /oauth/token`` and
``GET /admin/v1/openapi.json``.

``/v1/models``: ext_authz has authenticated the caller and set ``x-tenant-id`` and
``x-key-id`` (overwriting anything the client sent); the list is filtered by entitlements.

``/oauth/token`` (RFC 6749 §4.4, client credentials; ext_authz is off on that route):
``client_id`` is an API key's id, ``client_secret`` the key itself (form fields or HTTP
Basic). The answer is a short-lived ES256 JWT (tenant, key id, allowed models, ``exp``,
``aud``, ``iss``, ``kid``) that Envoy's jwt_authn verifies locally. Both read the in-memory
state only: no SQL per request. This port is reachable only by Envoy.

``/admin/v1/openapi.json``: the admin REST API's OpenAPI document, generated from the protos
(``tessera/openapi.py``) and shipped in the package; no credential (``docs/security.md``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol
from urllib.parse import unquote_plus

import jwt
from aiohttp import web

from control_plane.jwt_keys import ALGORITHM, JwtPolicy
from control_plane.state import KeyState, State, TenantState
from tessera import keys, openapi

MAX_FORM_BYTES = 8192


class StateSource(Protocol):
    @property
    def state(self) -> State | None: ...

    @property
    def signing(self) -> tuple[str, Any] | None: ...

    jwt_policy: JwtPolicy


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
        names.extend(m.aliases)  # an alias is usable exactly where its model is
    return names


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if status == 401:  # noqa: PLR2004
        headers["WWW-Authenticate"] = 'Basic realm="tessera"'
    return web.json_response(
        {"error": error, "error_description": description}, status=status, headers=headers
    )


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = raw.partition(":")
    return (unquote_plus(client_id), unquote_plus(secret)) if sep else None


class _KeysByDigest:
    """digest → key of the current state, rebuilt when the state object changes."""

    def __init__(self) -> None:
        self._state: State | None = None
        self._map: dict[bytes, KeyState] = {}

    def get(self, state: State, digest: bytes) -> KeyState | None:
        if state is not self._state:
            self._map = {k.digest: k for k in state.keys}
            self._state = state
        return self._map.get(digest)


class _Handlers:
    def __init__(self, source: StateSource, pepper: bytes) -> None:
        self.source = source
        self.pepper = pepper
        self.by_digest = _KeysByDigest()

    async def list_models(self, request: web.Request) -> web.Response:
        current = self.source.state
        if current is None:
            raise web.HTTPServiceUnavailable
        names = visible_models(
            current, request.headers.get("x-tenant-id", ""), request.headers.get("x-key-id", "")
        )
        created = {n: m.created_unix for m in current.models for n in (m.name, *m.aliases)}
        data = [{"id": n, "object": "model", "created": created[n], "owned_by": "tessera"} for n in names]
        return web.json_response({"object": "list", "data": data})

    async def token(self, request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_FORM_BYTES:
            return _oauth_error(400, "invalid_request", "request too large")
        if request.content_type != "application/x-www-form-urlencoded":
            return _oauth_error(
                400, "invalid_request", "send application/x-www-form-urlencoded (RFC 6749 §4.4.2)"
            )
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "only client_credentials is supported")
        basic = _basic_credentials(request.headers.get("Authorization", ""))
        client_id, secret = basic or (str(form.get("client_id", "")), str(form.get("client_secret", "")))
        state, signing = self.source.state, self.source.signing
        if state is None or signing is None:
            return _oauth_error(503, "temporarily_unavailable", "try again shortly")
        now = time.time()
        client = self._authenticate(state, client_id, secret, now)
        if client is None:
            return _oauth_error(401, "invalid_client", "client authentication failed")
        body = self._issue(client, signing, now)
        return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate(
        self, state: State, client_id: str, secret: str, now: float
    ) -> tuple[KeyState, TenantState] | None:
        """The key and tenant of valid client credentials (a live key of an active tenant)."""
        digest = keys.digest(self.pepper, secret)
        entry = self.by_digest.get(state, digest) if keys.parse_public_id(secret) else None
        if entry is None or not hmac.compare_digest(entry.key_id.encode(), client_id.encode()):
            return None
        if entry.revoked or (entry.expires_unix and entry.expires_unix <= now):
            return None
        tenant = next((t for t in state.tenants if t.id == entry.tenant_id), None)
        if tenant is None or tenant.suspended:
            return None
        return entry, tenant

    def _issue(
        self, client: tuple[KeyState, TenantState], signing: tuple[str, Any], now: float
    ) -> dict[str, Any]:
        entry, tenant = client
        policy = self.source.jwt_policy
        ttl = int(policy.token_ttl.total_seconds())
        if entry.expires_unix:  # a token never outlives its key
            ttl = max(1, min(ttl, int(entry.expires_unix - now)))
        kid, private_key = signing
        claims = {
            "iss": policy.issuer,
            "aud": policy.audience,
            "sub": entry.key_id,
            "key_id": entry.key_id,
            "tenant_id": entry.tenant_id,
            "models": list(entry.allowed_models or tenant.allowed_models),
            "scope": "inference",
            "iat": int(now),
            "exp": int(now) + ttl,
            "jti": secrets.token_hex(12),
        }
        encoded = jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": kid})
        return {"access_token": encoded, "token_type": "Bearer", "expires_in": ttl, "scope": "inference"}

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(status=200 if self.source.state is not None else 503)


def _openapi_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    """The committed document (shipped in the package), read once: the same bytes for everyone."""
    document = (resources.files("tessera.admin.v1") / "openapi.json").read_bytes()

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json", charset="utf-8")

    return serve


def build_http_app(source: StateSource, pepper: bytes) -> web.Application:
    handlers = _Handlers(source, pepper)
    app = web.Application(client_max_size=MAX_FORM_BYTES)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_post("/oauth/token", handlers.token)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get(openapi.PATH, _openapi_handler(), allow_head=False)
    return app
