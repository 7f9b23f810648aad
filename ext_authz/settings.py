"""ext_authz's one settings object, built once in ``main``.

Env: ``TESSERA_TRANSPORT`` (``grpc``: Envoy's ``Authorization/Check``; ``http``: Envoy's
``http_service``, HTTP/1.1, with ``GET /healthz`` for probes), ``TESSERA_GRPC__HOST`` and
``TESSERA_GRPC__PORT`` (the service's address, whichever the transport), ``TESSERA_GRPC_SERVER``
(``aio``: grpc.aio; ``sync``: grpcio's sync server with ``TESSERA_GRPC_SERVER_THREADS`` threads),
``TESSERA_METRICS__PORT``, ``TESSERA_LOG__LEVEL``, ``TESSERA_POLICY__URL``,
``TESSERA_PEPPER__FILE``, ``TESSERA_ADMISSION__URL`` (the ratelimit service; empty = no
counting) and the other fragment fields.
There is no database setting: ext_authz never opens the SQL store.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings

from tessera.errors import ConfigError
from tessera.settings import (
    SETTINGS_CONFIG,
    AdmissionSettings,
    GrpcSettings,
    IdentitySettings,
    LogSettings,
    MetricsSettings,
    PepperSettings,
    PolicySettings,
    TracingSettings,
)


class ExtAuthzSettings(BaseSettings):
    model_config = SETTINGS_CONFIG

    # The Envoy gateway's ext_authz filter must use the same (TESSERA_GATEWAY__AUTHZ_TRANSPORT).
    transport: Literal["grpc", "http"] = "grpc"
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)  # the listen address for either transport
    # The gRPC transport's server: grpc.aio, or grpcio's sync server (its threads take the calls,
    # each Check's decision runs on the event loop with the admission stream; a thread waits
    # while its Check's admission does, so at most ``grpc_server_threads`` are in flight per
    # process). Measured the same CPU per request at c16, worse tails (docs/benchmarks.md).
    grpc_server: Literal["aio", "sync"] = "aio"
    grpc_server_threads: int = Field(default=64, ge=1, le=1024)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    pepper: PepperSettings = Field(default_factory=PepperSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)  # mutual TLS to ratelimit when set
    workers: int = Field(default=1, ge=1, le=64, description="processes sharing the port (SO_REUSEPORT)")


def check_settings(settings: ExtAuthzSettings) -> None:
    """Cross-field rules; a violation is a startup error."""
    if settings.workers > 1 and settings.grpc.port == 0:
        msg = "workers > 1 needs a fixed port (TESSERA_GRPC__PORT) for the workers to share"
        raise ConfigError(msg)
