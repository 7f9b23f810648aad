"""SQLAlchemy 2 models: the control plane's store (ARCHITECTURE §5)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from control_plane.db.base import Base


def utcnow() -> datetime:
    return datetime.now(UTC)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    plan: Mapped[str | None] = mapped_column(String(63))
    allowed_models: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Plan(Base):
    """Named default limits and a scheduling priority."""

    __tablename__ = "plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    limits: Mapped[list[dict[str, object]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Principal(Base):
    """A human or service account of the admin API."""

    __tablename__ = "principals"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(32), default="human")
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    bindings: Mapped[list[RoleBinding]] = relationship(
        back_populates="principal", cascade="all, delete-orphan", order_by="RoleBinding.id", lazy="selectin"
    )
    credentials: Mapped[list[AdminCredential]] = relationship(
        back_populates="principal", order_by="AdminCredential.created_at", lazy="selectin"
    )


class RoleBinding(Base):
    __tablename__ = "role_bindings"
    __table_args__ = (UniqueConstraint("principal_id", "role", "tenant_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"), index=True)
    role: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"), index=True)

    principal: Mapped[Principal] = relationship(back_populates="bindings")


class AdminCredential(Base):
    """An admin key (``tadm_…``) of a principal, stored as HMAC-SHA256(pepper, key)."""

    __tablename__ = "admin_credentials"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(32))
    digest: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    principal: Mapped[Principal] = relationship(back_populates="credentials", lazy="joined")


class AuditEvent(Base):
    """Append-only (database triggers refuse UPDATE and DELETE)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor_id: Mapped[str] = mapped_column(String(32), index=True)
    actor_name: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(128))
    tenant_id: Mapped[str | None] = mapped_column(String(32), index=True)
    request_id: Mapped[str] = mapped_column(String(128), default="")
    before: Mapped[str] = mapped_column(Text, default="")
    after: Mapped[str] = mapped_column(Text, default="")


class ApiKey(Base):
    """One row per secret. ``key_id`` is the logical key (stable across rotation)."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("key_id", "rotation_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public id inside the key
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    prefix: Mapped[str] = mapped_column(String(32))
    digest: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    allowed_models: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rotated_from: Mapped[str | None] = mapped_column(String(32))
    grace_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # +1 per rotation
    rotation_id: Mapped[str | None] = mapped_column(String(64))  # idempotency key of the rotation
    created_by: Mapped[str | None] = mapped_column(String(32))  # principal id


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    visibility: Mapped[str] = mapped_column(String(16), default="public")
    default_max_tokens: Mapped[int | None] = mapped_column(Integer)
    max_max_tokens: Mapped[int | None] = mapped_column(Integer)
    realtime: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    backends: Mapped[list[Backend]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="Backend.id", lazy="selectin"
    )
    aliases: Mapped[list[ModelAlias]] = relationship(
        cascade="all, delete-orphan", order_by="ModelAlias.alias", lazy="selectin"
    )
    prices: Mapped[list[ModelPrice]] = relationship(
        cascade="all, delete-orphan", order_by="ModelPrice.effective_at", lazy="selectin"
    )


class ModelPrice(Base):
    """Effective-dated price per 1M tokens, integer micro-units of ``currency``."""

    __tablename__ = "model_prices"
    __table_args__ = (UniqueConstraint("model_id", "effective_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    effective_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    input_micros: Mapped[int] = mapped_column(BigInteger)
    output_micros: Mapped[int] = mapped_column(BigInteger)
    cached_micros: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Backend(Base):
    __tablename__ = "backends"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(32), default="openai-compatible")
    weight: Mapped[int] = mapped_column(Integer, default=1)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    credential_sealed: Mapped[str | None] = mapped_column(Text)  # control_plane.sealing, never plain
    credential_header: Mapped[str | None] = mapped_column(String(64))
    ca_bundle: Mapped[str | None] = mapped_column(Text)
    sni: Mapped[str | None] = mapped_column(String(253))
    health_path: Mapped[str | None] = mapped_column(String(256))
    timeout_seconds: Mapped[int | None] = mapped_column(Integer)
    idle_timeout_seconds: Mapped[int | None] = mapped_column(Integer)

    model: Mapped[Model] = relationship(back_populates="backends")


class ModelAlias(Base):
    """Another name for a model; one namespace with model names (checked on write)."""

    __tablename__ = "model_aliases"

    alias: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)


class Limit(Base):
    __tablename__ = "limits"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    window_seconds: Mapped[int] = mapped_column(Integer)
    limit: Mapped[int] = mapped_column(BigInteger)
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    fail_closed: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt_weight: Mapped[int] = mapped_column(Integer, default=100, server_default="100")
    completion_weight: Mapped[int] = mapped_column(Integer, default=100, server_default="100")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JwtSigningKey(Base):
    """A key the control plane signs gateway JWTs with (OAuth2 client credentials).

    Life: published (in the JWKS, not signing yet) → active (signing) → retired (still in the
    JWKS until every token it signed has expired) → gone from the JWKS.
    """

    __tablename__ = "jwt_signing_keys"

    kid: Mapped[str] = mapped_column(String(32), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(16), default="ES256")
    private_pem: Mapped[str] = mapped_column(Text)
    public_jwk: Mapped[dict[str, object]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    unpublish_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# --- usage, billing (control_plane/usage/) ----------------------------------------------------

_BIGID = BigInteger().with_variant(Integer, "sqlite")


class UsageRecord(Base):
    """The ledger: one row per request an Envoy completed, refusals and errors included.

    Keyed by (Envoy node, request id): Envoy mints the id, and the meter inserts a line at most
    once whatever it re-reads. Money is ``cost_picos`` = tokens x price in micros per 1M tokens
    (1e-12 of the currency unit): exact integers, rounded to micros only when summed.
    """

    __tablename__ = "usage_records"
    __table_args__ = (
        UniqueConstraint("node", "request_id"),
        Index("ix_usage_records_tenant_time", "tenant_id", "time"),
    )

    id: Mapped[int] = mapped_column(_BIGID, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str] = mapped_column(String(64))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    tenant_id: Mapped[str | None] = mapped_column(String(32))
    key_id: Mapped[str | None] = mapped_column(String(32))
    principal: Mapped[str | None] = mapped_column(String(256))
    model_requested: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(128))  # served (an alias resolved)
    backend: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    # billed by the usage backstop: admitted, and its line never reached the meter (Envoy died,
    # or its log was lost); usage estimated, status 0 (what the client got is unknown)
    backstop: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    streamed: Mapped[bool] = mapped_column(Boolean, default=False)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    ttfb_ms: Mapped[int | None] = mapped_column(Integer)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    price_id: Mapped[int | None] = mapped_column(ForeignKey("model_prices.id", ondelete="SET NULL"))
    cost_picos: Mapped[int] = mapped_column(BigInteger, default=0)
    currency: Mapped[str | None] = mapped_column(String(3))
    unpriced: Mapped[bool] = mapped_column(Boolean, default=False)
    invoice_id: Mapped[str | None] = mapped_column(String(32), index=True)
    trace_id: Mapped[str | None] = mapped_column(String(32))  # W3C: the request's spans


class UsageRollup(Base):
    """Usage summed per hour and per day by tenant, key and model (kept after raw rows expire)."""

    __tablename__ = "usage_rollups"

    period: Mapped[str] = mapped_column(String(4), primary_key=True)  # hour | day
    bucket: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "" = none
    model: Mapped[str] = mapped_column(String(128), primary_key=True)  # "" = none
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)  # "" = unpriced
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_picos: Mapped[int] = mapped_column(BigInteger, default=0)
    unpriced_requests: Mapped[int] = mapped_column(BigInteger, default=0)


class MeterCheckpoint(Base):
    """How far the meter has read each usage log file of an Envoy node (by device and inode, so a
    rotated file is still recognised); written in the same transaction as the rows it read."""

    __tablename__ = "meter_checkpoints"

    node: Mapped[str] = mapped_column(String(128), primary_key=True)
    file_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger, default=0)
    path: Mapped[str] = mapped_column(String(1024))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Invoice(Base):
    """A tenant's month (UTC) in one currency: open until closed after the grace period, then
    immutable. Usage that arrives after close goes on the next invoice as adjustment lines."""

    __tablename__ = "invoices"
    __table_args__ = (UniqueConstraint("tenant_id", "period_start", "currency"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32), index=True)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    period_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(8), default="closed")
    total_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    closed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    lines: Mapped[list[InvoiceLine]] = relationship(
        cascade="all, delete-orphan", order_by="InvoiceLine.id", lazy="selectin"
    )


class InvoiceLine(Base):
    __tablename__ = "invoice_lines"

    id: Mapped[int] = mapped_column(_BIGID, primary_key=True, autoincrement=True)
    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(12))  # usage | adjustment
    model: Mapped[str] = mapped_column(String(128))
    usage_month: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # whose usage it bills
    price_from: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # None = unpriced
    input_micros: Mapped[int] = mapped_column(BigInteger, default=0)  # unit prices per 1M tokens
    output_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    amount_micros: Mapped[int] = mapped_column(BigInteger, default=0)


class OutboxEvent(Base):
    """A billing event to deliver: its id is stable (derived from what it describes), so a
    receiver deduplicates retries and re-deliveries by it."""

    __tablename__ = "outbox_events"

    seq: Mapped[int] = mapped_column(_BIGID, primary_key=True, autoincrement=True)  # delivery order
    id: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(32))  # usage.recorded | invoice.closed | budget.threshold
    tenant_id: Mapped[str | None] = mapped_column(String(32), index=True)
    payload: Mapped[dict[str, object]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class OutboxDelivery(Base):
    """One sink's progress with one event: retried with backoff until acknowledged."""

    __tablename__ = "outbox_deliveries"

    event_id: Mapped[str] = mapped_column(
        ForeignKey("outbox_events.id", ondelete="CASCADE"), primary_key=True
    )
    sink: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(512))


class AppliedResource(Base):
    """Tessera's applied-by marker: a resource a declarative apply created or took over, and
    which manager applied it (``tessera apply``, the config directory, the Kubernetes
    controller). Prune deletes only resources listed here under its own manager; imperative
    ones are never listed. ``target`` is the resource's id in its table (a Limit's id; the
    name for the other kinds)."""

    __tablename__ = "applied_resources"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    manager: Mapped[str] = mapped_column(String(63))
    target: Mapped[str] = mapped_column(String(128))
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
