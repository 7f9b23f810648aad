"""The ratelimit service's one settings object (env ``TESSERA_*``, ``__`` nesting)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from ratelimit.backends import is_memory_url
from tessera.errors import ConfigError
from tessera.settings import (
    SETTINGS_CONFIG,
    GrpcSettings,
    IdentitySettings,
    ListenSettings,
    LogSettings,
    MetricsSettings,
    PolicySettings,
    RedisSettings,
    TracingSettings,
)


class RatelimitSettings(BaseSettings):
    model_config = SETTINGS_CONFIG

    grpc: GrpcSettings = GrpcSettings()
    # ext_authz's admission streams (length-prefixed tessera.admission.v1 frames over TCP)
    admission_stream: ListenSettings = ListenSettings()
    metrics: MetricsSettings = MetricsSettings()
    identity: IdentitySettings = IdentitySettings()  # mutual TLS on the admission stream when set
    log: LogSettings = LogSettings()
    tracing: TracingSettings = TracingSettings()
    policy: PolicySettings = PolicySettings()
    redis: RedisSettings = RedisSettings()
    workers: int = Field(default=1, ge=1, description="processes sharing the gRPC port (SO_REUSEPORT)")
    reservation_lease_seconds: float = Field(
        default=900.0,
        gt=0,
        description="a token/spend reservation or concurrency slot not settled by then is released",
    )
    backstop_enabled: bool = Field(
        default=True,
        description="keep admitted requests open for the usage backstop (off where no meter runs)",
    )
    backstop_after_seconds: float = Field(
        default=3600.0,
        gt=0,
        description=(
            "an admitted request whose usage line has not been billed by then is billed as estimated"
            " (the usage backstop): longer than the longest request plus the meter's lag"
        ),
    )
    backstop_hold_seconds: float = Field(
        default=60.0, gt=0, description="a meter's claim on overdue admissions lasts this long"
    )
    prompt_bytes_per_token: int = Field(
        default=1,
        ge=1,
        le=8,
        description=(
            "the prompt is reserved as body bytes / this: 1 bounds any tokenizer (a budget is never"
            " overshot by more than one request); a larger value reserves less and weakens that bound"
        ),
    )


def check_settings(settings: RatelimitSettings) -> None:
    """Cross-field rules; a violation is a startup error."""
    if settings.workers > 1:
        if is_memory_url(settings.redis.url.get_secret_value()):
            msg = (
                f"workers={settings.workers} with memory:// counters: each process would count "
                "separately; use one worker or a redis:// URL (TESSERA_REDIS__URL)"
            )
            raise ConfigError(msg)
        if settings.grpc.port == 0 or settings.admission_stream.port == 0:
            msg = (
                "workers > 1 needs fixed ports (TESSERA_GRPC__PORT, TESSERA_ADMISSION_STREAM__PORT)"
                " for the workers to share"
            )
            raise ConfigError(msg)
