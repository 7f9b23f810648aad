"""ext_authz's one settings object, built once in ``main``.

Env: ``TESSERA_GRPC__PORT``, ``TESSERA_METRICS__PORT``, ``TESSERA_LOG__LEVEL``,
``TESSERA_POLICY__URL``, ``TESSERA_PEPPER__FILE``, ``TESSERA_ADMISSION__URL`` (the ratelimit
service; empty = no counting) and the other fragment fields.
There is no database setting: ext_authz never opens the SQL store.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from tessera.errors import ConfigError
from tessera.settings import (
    SETTINGS_CONFIG,
    AdmissionSettings,
    GrpcSettings,
    LogSettings,
    MetricsSettings,
    PepperSettings,
    PolicySettings,
)


class ExtAuthzSettings(BaseSettings):
    model_config = SETTINGS_CONFIG

    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    pepper: PepperSettings = Field(default_factory=PepperSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    workers: int = Field(default=1, ge=1, le=64, description="processes sharing the gRPC port (SO_REUSEPORT)")


def check_settings(settings: ExtAuthzSettings) -> None:
    """Cross-field rules; a violation is a startup error."""
    if settings.workers > 1 and settings.grpc.port == 0:
        msg = "workers > 1 needs a fixed gRPC port (TESSERA_GRPC__PORT) for the workers to share"
        raise ConfigError(msg)
