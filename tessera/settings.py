"""Settings fragments shared by the services.

Each service composes these ``BaseModel``s into one ``BaseSettings`` (env prefix
``TESSERA_``, ``__`` nesting), built once in its ``main``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

SECRETS_DIR = Path("/var/run/secrets/tessera")

SETTINGS_CONFIG = SettingsConfigDict(
    env_prefix="TESSERA_",
    env_nested_delimiter="__",
    # Kubernetes mounts secrets here; elsewhere (tests, `tessera up`) there is none.
    secrets_dir=SECRETS_DIR if SECRETS_DIR.is_dir() else None,
    extra="ignore",
)


class _Fragment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GrpcSettings(_Fragment):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0 = ephemeral (tests)")
    grace_seconds: float = 2.0


class MetricsSettings(_Fragment):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics; 0 = ephemeral")
    enabled: bool = True


class LogSettings(_Fragment):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"


class TracingSettings(_Fragment):
    otlp_endpoint: str = Field(
        default="",
        pattern=r"^$|^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$",
        description="host:port of an OTLP/gRPC collector; '' = no export",
    )
    sampling_percent: float = Field(
        default=100.0, ge=0, le=100, description="share of traces started here (Envoy: each request)"
    )


class PolicySettings(_Fragment):
    """Where a data-plane service subscribes to the control plane's policy stream."""

    url: str = "127.0.0.1:50052"
    node_id: str = ""
    reconnect_max_seconds: float = 1.0


class AdmissionSettings(_Fragment):
    """Where ext_authz admits requests and the meter settles them: the ratelimit service's
    ``tessera.admission.v1``: ``url`` its gRPC address (Settle), ``stream_url`` its admission
    stream (ext_authz; "" = no counters: every request is admitted uncounted)."""

    url: str = ""
    stream_url: str = ""
    timeout_seconds: float = Field(
        default=0.2, gt=0, description="an admission not answered by then follows each limit's fail mode"
    )
    reconnect_max_seconds: float = 1.0


class ListenSettings(_Fragment):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0 = ephemeral (tests)")


class IdentitySettings(_Fragment):
    """This process's workload identity (``tessera/identity.py``): its certificate and key, the CA
    its peers' certificates must chain to, and the namespace its peers' SPIFFE IDs name. Set by
    ``tessera up``; unset (no files), the internal surfaces that take it stay plaintext."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    namespace: str = "default"

    @model_validator(mode="after")
    def _all_or_none(self) -> IdentitySettings:
        # half an identity would leave a service plaintext, or its clients unable to connect
        given = [f is not None for f in (self.cert_file, self.key_file, self.ca_file)]
        if any(given) and not all(given):
            msg = "an identity needs cert_file, key_file and ca_file together"
            raise ValueError(msg)
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def files(self) -> tuple[Path, Path, Path]:
        """(certificate, key, CA); an error for no identity."""
        if self.cert_file is None or self.key_file is None or self.ca_file is None:
            msg = "an identity needs its certificate, key and CA files"
            raise ValueError(msg)
        return self.cert_file, self.key_file, self.ca_file


class PepperSettings(_Fragment):
    file: Path = Path("pepper")


class DatabaseSettings(_Fragment):
    url: SecretStr = SecretStr("sqlite+aiosqlite:///tessera.db")


class RedisSettings(_Fragment):
    url: SecretStr = SecretStr("memory://")


def redact_url(url: str) -> str:
    """A DSN safe to log: the password (if any) replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
