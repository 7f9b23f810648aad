"""Readiness probes used by the supervisor (and tests): gRPC health and HTTP status."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.settings import IdentitySettings
from tessera.tls import grpc_channel


async def grpc_serving(
    target: str,
    service: str = "",
    timeout: float = 0.5,
    *,
    identity: IdentitySettings | None = None,
    peer: str = "",
) -> bool:
    """Whether ``target`` reports SERVING; over mutual TLS to ``peer`` with ``identity``."""
    try:
        async with grpc_channel(target, identity, peer) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError:
        return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def _fetch(url: str, method: str, timeout: float) -> tuple[int, bytes]:
    """(status, body); an HTTP error is its status with no body, no answer at all is 0."""
    req = urllib.request.Request(url, method=method)  # noqa: S310 - loopback URLs we built
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (urllib.error.URLError, OSError):
        return 0, b""


async def http_status(url: str, *, expect: int, timeout: float = 0.5) -> bool:
    status, _ = await asyncio.to_thread(_fetch, url, "GET", timeout)
    return status == expect


async def http_post(url: str, timeout: float = 5.0) -> int:
    status, _ = await asyncio.to_thread(_fetch, url, "POST", timeout)
    return status


async def active_requests(envoy_admin: str, stat_prefix: str = "gateway") -> int:
    """Requests in flight on an Envoy's HTTP listener (``stat_prefix``), from its admin stats."""
    url = f"{envoy_admin}/stats?filter=^http\\.{stat_prefix}\\.downstream_rq_active$&format=json"
    status, body = await asyncio.to_thread(_fetch, url, "GET", 2.0)
    if status != 200:  # noqa: PLR2004
        return 0
    stats = json.loads(body).get("stats", [])
    return sum(int(s.get("value", 0)) for s in stats)
