"""Readiness probes used by the supervisor (and tests): gRPC health and HTTP status; HTTP to
a unix socket too (Envoy's admin), named ``http+unix://<socket path, %-encoded>/<path>``."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import urllib.error
import urllib.request
from urllib.parse import quote, unquote, urlsplit

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


UNIX_SCHEME = "http+unix"


def unix_url(socket_path: str) -> str:
    """The base URL of an HTTP server on a unix socket (append the path)."""
    return f"{UNIX_SCHEME}://{quote(socket_path, safe='')}"


def http_base(address: str) -> str:
    """An HTTP base URL from ``http://host:port`` or ``unix:/path/to.sock`` (a unix socket)."""
    if address.startswith("unix:"):
        return unix_url(address.removeprefix("unix:"))
    return address


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _fetch_unix(url: str, method: str, timeout: float) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = _UnixConnection(unquote(parts.netloc), timeout)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""))
        resp = conn.getresponse()
        body = resp.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()
    return resp.status, body if resp.status < 400 else b""  # noqa: PLR2004


def fetch(
    url: str,
    method: str = "GET",
    timeout: float = 2.0,
    ca_file: str | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """(status, body); an HTTP error is its status with no body, no answer at all is 0. An https
    URL's certificate must chain to ``ca_file`` (else the system's CAs), or ``context`` decides."""
    if url.startswith(UNIX_SCHEME + "://"):
        return _fetch_unix(url, method, timeout)
    req = urllib.request.Request(url, method=method)  # noqa: S310 - loopback URLs we built
    if context is None and url.startswith("https:"):
        context = ssl.create_default_context(cafile=ca_file)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:  # noqa: S310
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (urllib.error.URLError, OSError):
        return 0, b""


async def http_status(
    url: str,
    *,
    expect: int,
    timeout: float = 0.5,
    ca_file: str | None = None,
    context: ssl.SSLContext | None = None,
) -> bool:
    status, _ = await asyncio.to_thread(fetch, url, "GET", timeout, ca_file, context)
    return status == expect


async def http_post(url: str, timeout: float = 5.0) -> int:
    status, _ = await asyncio.to_thread(fetch, url, "POST", timeout)
    return status


async def active_requests(envoy_admin: str, stat_prefix: str = "gateway") -> int:
    """Requests in flight on an Envoy's HTTP listener (``stat_prefix``), from its admin stats."""
    url = f"{envoy_admin}/stats?filter=^http\\.{stat_prefix}\\.downstream_rq_active$&format=json"
    status, body = await asyncio.to_thread(fetch, url, "GET", 2.0)
    if status != 200:  # noqa: PLR2004
        return 0
    stats = json.loads(body).get("stats", [])
    return sum(int(s.get("value", 0)) for s in stats)
