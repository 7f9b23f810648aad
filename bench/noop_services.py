"""No-op ext_authz services for path (c1): the cheapest possible Python callout, per transport.

``python -m bench.noop_services authz --port N``: gRPC ``Authorization/Check`` always answers OK.
A one-process ``grpc.aio`` server on xds-protos (upb) stubs, like the real service, returning
one prebuilt response: what is left is the gRPC + asyncio cost per call.

``python -m bench.noop_services authz-sync --port N``: the same on grpcio's sync server (a pool of
``SYNC_THREADS`` threads, like ext_authz with ``TESSERA_GRPC_SERVER=sync``).

``python -m bench.noop_services authz-http --port N``: Envoy's HTTP ext_authz (``http_service``)
always answered ``200 OK`` with ``x-tenant-id: t1``. An ``asyncio.Protocol`` parsing with
``httptools`` on ``uvloop`` (each falls back to the stdlib when not importable: a minimal
parser, the default loop), keep-alive: what is left is the HTTP/1.1 + event-loop cost per call.

Either is the floor under any design with one Python callout per request on that transport.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

SYNC_THREADS = 64  # ext_authz's TESSERA_GRPC_SERVER_THREADS default
_HTTP_ALLOW = b"HTTP/1.1 200 OK\r\nx-tenant-id: t1\r\ncontent-length: 0\r\n\r\n"


def _allow() -> Any:
    from envoy.service.auth.v3 import external_auth_pb2  # noqa: PLC0415

    allow = external_auth_pb2.CheckResponse()
    allow.status.code = 0  # google.rpc.Code.OK
    allow.ok_response.SetInParent()
    return allow


def _grpc_server() -> Any:
    import grpc  # noqa: PLC0415
    from envoy.service.auth.v3 import external_auth_pb2_grpc  # noqa: PLC0415

    allow = _allow()

    class NoopAuthz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
        async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002
            return allow

    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthz(), server)
    return server


def serve_sync(port: int) -> None:
    """grpcio's sync server until SIGTERM/SIGINT."""
    import threading  # noqa: PLC0415
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    import grpc  # noqa: PLC0415
    from envoy.service.auth.v3 import external_auth_pb2_grpc  # noqa: PLC0415

    allow = _allow()

    class NoopAuthz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
        def Check(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002
            return allow

    server = grpc.server(ThreadPoolExecutor(max_workers=SYNC_THREADS))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthz(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    print(f"noop authz-sync (grpcio sync server, {SYNC_THREADS} threads) listening on {port}", flush=True)
    stopping.wait()
    server.stop(0.5).wait()


class _HttptoolsAuthz(asyncio.Protocol):
    """One connection: every complete request gets the prebuilt 200 (Envoy does not pipeline)."""

    def __init__(self) -> None:
        import httptools  # noqa: PLC0415

        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._error = httptools.HttpParserError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self._error:
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        if self.transport is not None:
            self.transport.write(_HTTP_ALLOW)


class _PlainAuthz(asyncio.Protocol):
    """Fallback without httptools: requests without bodies (what ext_authz sends), end at CRLFCRLF."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            self.buf = self.buf[end + 4 :]
            if self.transport is not None:
                self.transport.write(_HTTP_ALLOW)


def _http_protocol() -> type[asyncio.Protocol]:
    try:
        import httptools  # noqa: F401, PLC0415
    except ImportError:
        return _PlainAuthz
    return _HttptoolsAuthz


async def serve(kind: str, port: int) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    if kind == "authz":
        server = _grpc_server()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print(f"noop {kind} (grpc.aio) listening on {port}", flush=True)
        await stopping.wait()
        await server.stop(0.5)
        return
    protocol = _http_protocol()
    http = await loop.create_server(protocol, "127.0.0.1", port, reuse_address=True)
    print(f"noop {kind} ({protocol.__name__}, {type(loop).__module__}) listening on {port}", flush=True)
    await stopping.wait()
    http.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.noop_services")
    parser.add_argument("kind", choices=["authz", "authz-sync", "authz-http"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.kind == "authz":  # grpc.aio on the default loop, like the real gRPC services
        asyncio.run(serve(args.kind, args.port))
        return
    if args.kind == "authz-sync":
        serve_sync(args.port)
        return
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        asyncio.run(serve(args.kind, args.port))
    else:
        uvloop.run(serve(args.kind, args.port))


if __name__ == "__main__":
    main()
