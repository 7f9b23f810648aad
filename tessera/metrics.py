"""Prometheus /metrics for every process, on its own port."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import start_http_server

from tessera.errors import ConfigError
from tessera.settings import MetricsSettings


@dataclass
class MetricsServer:
    port: int
    _server: Any = None

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve_metrics(settings: MetricsSettings) -> MetricsServer:
    """Start the /metrics HTTP server in a daemon thread (port 0 when disabled)."""
    if not settings.enabled:
        return MetricsServer(port=0)
    try:
        server, _thread = start_http_server(settings.port, addr=settings.host)
    except OSError as exc:
        msg = f"cannot serve metrics on {settings.host}:{settings.port}: {exc.strerror}"
        raise ConfigError(msg) from exc
    return MetricsServer(port=int(server.server_port), _server=server)
