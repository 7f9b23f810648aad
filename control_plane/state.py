"""The store as one immutable value, loaded in one read transaction.

Everything the control plane publishes (policy stream, xDS, ``/v1/models``) is a
pure function of a ``State``; equal states publish nothing new.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import structlog
from cryptography.fernet import InvalidToken
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import sealing
from control_plane.db.models import ApiKey, Backend, JwtSigningKey, Limit, Model, Plan, Tenant
from control_plane.db.repositories import all_rows

log = structlog.get_logger("control_plane.state")


@dataclass(frozen=True, slots=True)
class BackendState:
    url: str
    kind: str
    weight: int
    priority: int
    max_concurrency: int = 0  # requests in flight this backend takes; 0 = no limit
    id: int = 0
    # The header value Envoy sends (unsealed; never logged: it stays out of repr).
    credential: str | None = field(default=None, repr=False)
    credential_header: str = "authorization"
    ca_bundle: str | None = None  # PEM; None = the gateway's CA file
    sni: str | None = None
    health_path: str | None = None  # None = the kind's default; "none" = no active check
    timeout_seconds: int = 0  # 0 = no limit
    idle_timeout_seconds: int = 0  # 0 = the default (300 s)

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True, slots=True)
class PriceState:
    effective_unix: int
    input_micros: int  # per 1M tokens
    output_micros: int
    cached_micros: int
    currency: str


@dataclass(frozen=True, slots=True)
class ModelState:
    name: str
    visibility: str
    backends: tuple[BackendState, ...]
    created_unix: int
    default_max_tokens: int = 0
    max_max_tokens: int = 0
    prices: tuple[PriceState, ...] = ()  # oldest first
    aliases: tuple[str, ...] = ()
    realtime: bool = False

    def price_at(self, now: float) -> PriceState | None:
        """The price in effect at ``now``: the latest that is not in the future."""
        current = None
        for p in self.prices:
            if p.effective_unix <= now:
                current = p
        return current


@dataclass(frozen=True, slots=True)
class TenantState:
    id: str
    name: str
    suspended: bool  # suspended or deleted: every key refused
    allowed_models: tuple[str, ...]
    plan: str = ""


@dataclass(frozen=True, slots=True)
class PlanState:
    name: str
    priority: int
    limits: tuple[tuple[str, str, int], ...]  # (kind, window, limit)


@dataclass(frozen=True, slots=True)
class KeyState:
    id: str
    key_id: str
    tenant_id: str
    digest: bytes
    prefix: str
    revoked: bool
    expires_unix: int
    allowed_models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LimitState:
    id: str
    tenant_id: str
    key_id: str
    model: str
    kind: str
    window_seconds: int
    limit: int
    shadow: bool
    fail_closed: bool
    prompt_weight: int = 100
    completion_weight: int = 100


@dataclass(frozen=True, slots=True)
class State:
    tenants: tuple[TenantState, ...] = ()
    keys: tuple[KeyState, ...] = ()
    models: tuple[ModelState, ...] = ()
    limits: tuple[LimitState, ...] = ()
    plans: tuple[PlanState, ...] = ()
    jwks: str = '{"keys":[]}'  # JSON Web Key Set of the published signing keys


def unix(dt: datetime | None) -> int:
    if dt is None:
        return 0
    if dt.tzinfo is None:  # SQLite returns naive datetimes; we only ever store UTC
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def _secret_expiry(expires_at: datetime | None, grace_until: datetime | None) -> int:
    """When the gateway stops accepting a secret: its key's expiry or, once rotated out, its grace end."""
    ends = [unix(t) for t in (expires_at, grace_until) if t is not None]
    return max(1, min(ends)) if ends else 0


def _credential(b: Backend, pepper: bytes) -> str | None:
    """The header value for the backend's credential: "Bearer <secret>" for authorization."""
    if b.credential_sealed is None:
        return None
    try:
        secret = sealing.unseal(pepper, sealing.UPSTREAM_CREDENTIAL, b.credential_sealed)
    except InvalidToken:
        log.error("upstream_credential_unreadable", backend_id=b.id, hint="sealed with another pepper")  # noqa: TRY400
        return None
    return secret if b.credential_header else f"Bearer {secret}"


def _backend(b: Backend, pepper: bytes) -> BackendState:
    return BackendState(
        b.url,
        b.kind,
        b.weight,
        b.priority,
        b.max_concurrency or 0,
        id=b.id,
        credential=_credential(b, pepper),
        credential_header=b.credential_header or "authorization",
        ca_bundle=b.ca_bundle,
        sni=b.sni,
        health_path=b.health_path,
        timeout_seconds=b.timeout_seconds or 0,
        idle_timeout_seconds=b.idle_timeout_seconds or 0,
    )


async def load_state(session: AsyncSession, pepper: bytes) -> State:
    tenants = await all_rows(session, Tenant)
    keys = await all_rows(session, ApiKey)
    models = await all_rows(session, Model)
    limits = await all_rows(session, Limit)
    plans = (await session.scalars(select(Plan).order_by(Plan.name))).all()
    signing = (await session.scalars(select(JwtSigningKey).order_by(JwtSigningKey.created_at))).all()
    return State(
        jwks=json.dumps({"keys": [k.public_jwk for k in signing]}, sort_keys=True, separators=(",", ":")),
        plans=tuple(
            PlanState(
                p.name,
                p.priority,
                tuple((str(x["kind"]), str(x["window"]), int(str(x["limit"]))) for x in p.limits),
            )
            for p in plans
        ),
        tenants=tuple(
            sorted(
                (
                    TenantState(t.id, t.name, t.status != "active", tuple(t.allowed_models), t.plan or "")
                    for t in tenants
                ),
                key=lambda t: t.id,
            )
        ),
        keys=tuple(
            sorted(
                (
                    KeyState(
                        id=k.id,
                        key_id=k.key_id,
                        tenant_id=k.tenant_id,
                        digest=k.digest,
                        prefix=k.prefix,
                        revoked=k.revoked_at is not None,
                        expires_unix=_secret_expiry(k.expires_at, k.grace_until),
                        allowed_models=tuple(k.allowed_models),
                    )
                    for k in keys
                ),
                key=lambda k: k.id,
            )
        ),
        models=tuple(
            sorted(
                (
                    ModelState(
                        name=m.name,
                        visibility=m.visibility,
                        backends=tuple(_backend(b, pepper) for b in m.backends),
                        created_unix=unix(m.created_at),
                        default_max_tokens=m.default_max_tokens or 0,
                        max_max_tokens=m.max_max_tokens or 0,
                        prices=tuple(
                            PriceState(
                                unix(p.effective_at),
                                p.input_micros,
                                p.output_micros,
                                p.cached_micros,
                                p.currency,
                            )
                            for p in m.prices
                        ),
                        aliases=tuple(a.alias for a in m.aliases),
                        realtime=m.realtime,
                    )
                    for m in models
                ),
                key=lambda m: m.name,
            )
        ),
        limits=tuple(
            sorted(
                (
                    LimitState(
                        id=lim.id,
                        tenant_id=lim.tenant_id,
                        key_id=lim.key_id or "",
                        model=lim.model or "",
                        kind=lim.kind,
                        window_seconds=lim.window_seconds,
                        limit=lim.limit,
                        shadow=lim.shadow,
                        fail_closed=lim.fail_closed,
                        prompt_weight=lim.prompt_weight,
                        completion_weight=lim.completion_weight,
                    )
                    for lim in limits
                ),
                key=lambda lim: lim.id,
            )
        ),
    )
