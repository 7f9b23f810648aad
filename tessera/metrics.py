"""Prometheus /metrics for every process, on its own port."""

from __future__ import annotations

from prometheus_client import start_http_server

from tessera.settings import MetricsSettings


def serve_metrics(settings: MetricsSettings) -> int:
    """Start the /metrics HTTP server in a daemon thread; returns the bound port (0 if off)."""
    if not settings.enabled:
        return 0
    server, _thread = start_http_server(settings.port, addr=settings.host)
    return int(server.server_port)
