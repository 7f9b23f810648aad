"""ext_authz's one settings object, built once in ``main``.

Env: ``TESSERA_GRPC__PORT``, ``TESSERA_METRICS__PORT``, ``TESSERA_LOG__LEVEL``,
``TESSERA_POLICY__URL``, ``TESSERA_PEPPER__FILE`` (and the other fragment fields).
There is no database setting: ext_authz never opens the SQL store.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from tessera.settings import (
    SETTINGS_CONFIG,
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
