"""Sequential ``Authorization/Check`` calls against ext_authz; prints latency as JSON.

``python -m bench.check_client --target HOST:PORT --keys N --count C``

Runs in its own process (never inside ext_authz's). Each call carries
``authorization: Bearer <key>`` for a key that exists in the snapshot (random indices below
N, fixed seed), so every Check should allow. One call in flight at a time: this measures
the per-Check latency seen by a caller (client gRPC stack included), not throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from bench.keygen import api_key
from bench.load import percentile

WARMUP = 1000


def check_request(key: str) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = "POST"
    http.path = "/v1/chat/completions"
    http.host = "127.0.0.1"
    http.headers.update(
        {
            ":method": "POST",
            ":path": "/v1/chat/completions",
            "content-type": "application/json",
            "authorization": f"Bearer {key}",
            "x-request-id": "bench",
        }
    )
    return req


async def run(target: str, n_keys: int, count: int) -> dict[str, float]:
    rng = random.Random(7)  # noqa: S311 - sampling, not security
    requests = [check_request(api_key(rng.randrange(n_keys))) for _ in range(count)]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for i in range(WARMUP):
            await stub.Check(requests[i % len(requests)])
        latencies: list[float] = []
        allowed = 0
        for i in range(count):
            req = requests[i % len(requests)]
            t0 = time.perf_counter_ns()
            resp = await stub.Check(req)
            latencies.append((time.perf_counter_ns() - t0) / 1000)
            allowed += resp.status.code == 0
    latencies.sort()
    return {
        "count": count,
        "allowed": allowed,
        "p50_us": percentile(latencies, 50),
        "p90_us": percentile(latencies, 90),
        "p99_us": percentile(latencies, 99),
        "mean_us": sum(latencies) / len(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.check_client")
    parser.add_argument("--target", required=True)
    parser.add_argument("--keys", type=int, required=True)
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.target, args.keys, args.count))))


if __name__ == "__main__":
    main()
