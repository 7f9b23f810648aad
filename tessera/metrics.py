"""Prometheus /metrics for every process, on its own port, and ``GET /healthz`` beside it: 200
once the process serves, 503 before and while it drains. Plain HTTP: kubelet's probes and
Prometheus cannot present a workload certificate, and neither page holds a secret."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from tessera.errors import ConfigError
from tessera.settings import MetricsSettings

_serving = threading.Event()


def set_ready(serving: bool) -> None:
    """What /healthz answers: the process's servers call this as their health changes."""
    if serving:
        _serving.set()
    else:
        _serving.clear()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """Scrapes and probes are not worth a log line each."""


def _app() -> Any:
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/healthz":
            status = "200 OK" if _serving.is_set() else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain")])
            return [b"serving\n" if _serving.is_set() else b"not serving\n"]
        return metrics(environ, start_response)

    return app


class LabelCap:
    """At most ``limit`` distinct values of one label (the first seen); any later value is
    reported as ``OTHER``, so names chosen by clients or tenants cannot grow the series count
    without bound."""

    OTHER = "_other"

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return self.OTHER


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
    """Start the /metrics and /healthz HTTP server in a daemon thread (port 0 when disabled)."""
    if not settings.enabled:
        return MetricsServer(port=0)
    try:
        server = make_server(settings.host, settings.port, _app(), ThreadingWSGIServer, handler_class=_Quiet)
    except OSError as exc:
        msg = f"cannot serve metrics on {settings.host}:{settings.port}: {exc.strerror}"
        raise ConfigError(msg) from exc
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return MetricsServer(port=int(server.server_port), _server=server)
