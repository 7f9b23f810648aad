"""No-op decision services for path (c): the cheapest possible Python callouts.

``python -m bench.noop_services authz --port N``: ``Authorization/Check`` always answers OK.
``python -m bench.noop_services ratelimit --port N``: ``ShouldRateLimit`` always answers OK.

Both are one-process ``grpc.aio`` servers on xds-protos (upb) stubs, like the real services,
and return one prebuilt response: what is left is the gRPC + asyncio cost per call, i.e.
the floor under any Python ext_authz/ratelimit.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

_ALLOW = external_auth_pb2.CheckResponse()
_ALLOW.status.code = 0  # google.rpc.Code.OK
_ALLOW.ok_response.SetInParent()
_UNDER_LIMIT = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


class NoopAuthz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002
        return _ALLOW


class NoopRateLimit(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002
        return _UNDER_LIMIT


async def serve(kind: str, port: int) -> None:
    server = grpc.aio.server()
    if kind == "authz":
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthz(), server)
    else:
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(NoopRateLimit(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    print(f"noop {kind} listening on {port}", flush=True)
    await stopping.wait()
    await server.stop(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.noop_services")
    parser.add_argument("kind", choices=["authz", "ratelimit"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port))


if __name__ == "__main__":
    main()
