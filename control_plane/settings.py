"""Control-plane settings, built once in ``__main__``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from control_plane.usage.telemetry import DEFAULT_LABEL_VALUES
from tessera.settings import (
    SETTINGS_CONFIG,
    AdmissionSettings,
    DatabaseSettings,
    GrpcSettings,
    IdentitySettings,
    LogSettings,
    MetricsSettings,
    PepperSettings,
    TracingSettings,
)


class HttpSettings(BaseModel):
    """The control plane's HTTP handlers Envoy routes to (``/v1/models``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)


class GatewaySettings(BaseModel):
    """What the control plane tells Envoy over xDS about the gateway listener."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    # Address Envoy uses to reach this control plane's HTTP handlers.
    control_plane_http_host: str = "127.0.0.1"
    control_plane_http_port: int = Field(default=0, ge=0, le=65535, description="0 = http.port")
    # Address Envoy uses to reach the admin gRPC API (REST under /admin/); 0 = admin.port.
    admin_api_host: str = "127.0.0.1"
    admin_api_port: int = Field(default=0, ge=0, le=65535)
    access_log_path: Path | None = None
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    # Per-client-IP guard in front of authentication (Envoy local_ratelimit); 0 disables it.
    per_ip_requests_per_second: int = Field(default=20_000, ge=0)
    per_ip_burst: int = Field(default=20_000, ge=1)
    xff_trusted_hops: int = Field(default=0, ge=0, le=10)
    # CA bundle (a path on the Envoy host) that https backends' certificates must chain to.
    upstream_ca_file: str = "/etc/ssl/certs/ca-certificates.crt"
    # How Envoy calls ext_authz: gRPC Check, or HTTP/1.1 (http_service); ext_authz must serve
    # the same (its TESSERA_TRANSPORT).
    authz_transport: Literal["grpc", "http"] = "grpc"
    # TLS on the public listener: the certificate and key files (PEM), read again when they
    # change and delivered to Envoy over SDS; unset = plain HTTP.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # The admin REST API (gRPC-JSON transcoding): on the public listener, on a listener of its
    # own at admin_rest_host:admin_rest_port, or nowhere (the gRPC admin API stays).
    admin_rest: Literal["public", "internal", "off"] = "internal"
    admin_rest_host: str = "127.0.0.1"
    admin_rest_port: int = Field(default=8081, ge=1, le=65535)
    # Envoy's workload identity: the SDS file it reads its certificate from, and the CA (paths on
    # the Envoy host). Set: Envoy reaches the control plane's HTTP handlers and admin API over
    # mutual TLS (tessera/envoy_tls.py).
    envoy_identity_sds: str | None = None
    envoy_ca_file: str = "/etc/tessera/identity/ca.crt"

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            msg = "gateway TLS needs tls_cert_file and tls_key_file together"
            raise ValueError(msg)
        return self


class JwtSettings(BaseModel):
    """Gateway JWTs from ``POST /oauth/token`` (OAuth2 client credentials)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    issuer: str = "https://tessera.local"
    audience: str = "tessera-gateway"  # never the admin API's: admin callers use admin keys
    token_ttl_seconds: int = Field(default=900, ge=10, le=86400)
    rotate_after_seconds: int = Field(default=86400, ge=1)
    publish_lead_seconds: int = Field(default=30, ge=0, description="in the JWKS this long before signing")


class SinkSettings(BaseModel):
    """Where billing events go (control_plane/usage/delivery.py). ``secret``: for
    ``standard-webhooks`` the signing secret (``whsec_`` + base64); for the others a bearer token
    sent as ``Authorization`` (empty = none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    url: str
    format: Literal["standard-webhooks", "cloudevents", "stripe", "lago"] = "standard-webhooks"
    secret: SecretStr = SecretStr("")
    batch_size: int = Field(default=100, ge=1, le=1000)
    kinds: tuple[str, ...] = ()  # event kinds it takes; empty = every kind its format carries


class BillingSettings(BaseModel):
    """Usage ledger, invoices and billing export (control_plane/usage/)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sinks: tuple[SinkSettings, ...] = ()
    delivery_interval_seconds: float = Field(default=1.0, gt=0)
    max_backoff_seconds: float = Field(default=300.0, gt=0)
    raw_retention_days: int = Field(default=90, ge=1, description="ledger rows; rollups are kept")
    invoice_grace_seconds: int = Field(default=3 * 86400, ge=0, description="after a month ends")
    outbox_retention_days: int = Field(default=7, ge=1, description="delivered events; undelivered stay")


class MeterSettings(BaseModel):
    """``tessera meter``: one per Envoy (beside it: the same file system)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    log_path: Path | None = None  # the Envoy's usage log (gateway.access_log_path on one machine)
    node: str = ""  # default for lines that name none (Envoy puts its ENVOY_NODE_ID in each line)
    poll_seconds: float = Field(default=0.5, gt=0, description="ledger batches: larger cost less per line")
    settle_poll_seconds: float = Field(
        default=0.1, gt=0, description="how often admitted requests' lines are read for settlement"
    )
    backstop_poll_seconds: float = Field(
        default=5.0, gt=0, description="how often admitted requests whose lines never came are claimed"
    )
    # Rotate the log at this size once read (0 = off: an outside logrotate + /reopen_logs).
    rotate_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Envoy's admin, where /reopen_logs is: its unix socket (unix:/path), or http://host:port
    envoy_admin: str = "unix:/var/run/envoy/admin.sock"
    metric_label_values: int = Field(
        default=DEFAULT_LABEL_VALUES,
        ge=1,
        description="distinct tenants (and models) the GenAI metrics name; the rest: _other",
    )


class ControlPlaneSettings(BaseSettings):
    model_config = SETTINGS_CONFIG

    admin: GrpcSettings = GrpcSettings(port=50051)
    xds: GrpcSettings = GrpcSettings(port=50052)
    # the policy stream (ext_authz and ratelimit subscribe), apart from ADS: mutual TLS with
    # ``identity`` set, each subscriber served by what its certificate says it is
    policy_server: GrpcSettings = GrpcSettings(port=50053)
    http: HttpSettings = HttpSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    tracing: TracingSettings = TracingSettings()  # the gateway's (Envoy's) too
    database: DatabaseSettings = DatabaseSettings()
    pepper: PepperSettings = PepperSettings()
    gateway: GatewaySettings = GatewaySettings()
    jwt: JwtSettings = JwtSettings()
    billing: BillingSettings = BillingSettings()
    meter: MeterSettings = MeterSettings()
    # The meter settles reservations here (the ratelimit service); "" = it does not settle.
    admission: AdmissionSettings = AdmissionSettings()
    # This process's workload identity (the control plane's for the policy stream; the meter's
    # towards the ratelimit service): mutual TLS when set.
    identity: IdentitySettings = IdentitySettings()
    # Local platform-admin credential (admin.json); principals and roles arrive with the admin issue.
    admin_token: SecretStr = SecretStr("")
    refresh_seconds: float = Field(default=5.0, gt=0, description="periodic re-read of the store")
    # Declarative resources (Plan, Tenant, Model, Limit, Principal documents) in a directory,
    # e.g. a mounted ConfigMap: watched, and each change applied atomically (control_plane.resources).
    config_dir: Path | None = None
    config_dir_poll_seconds: float = Field(default=0.5, gt=0, description="how often config_dir is read")
    # The same documents as custom resources (k8s/crds/) in this namespace, reconciled with
    # status conditions (control_plane.resources.kube); "" = off. Needs the in-cluster API.
    kube_namespace: str = ""
    load_scrape_seconds: float = Field(
        default=2.0, ge=0, description="scrape backends' /metrics for load-aware weights (0 = off)"
    )
