"""A tiny ``tessera.policy.v1.PolicyService`` that serves one full snapshot of N API keys.

``python -m bench.policy_server --keys N --port P --pepper-file F --state-dir D``

It builds the snapshot before it listens (one tenant plus N ``ApiKey`` resources, keys from
``bench.keygen``), pre-serialised into ``StreamPolicyResponse`` messages of at most ~3.5 MB
(the protocol's limit is 4 MB): ``reset=True`` on the first, ``complete=True`` on the last.
Then it writes ``D/ready.json``. On a stream it sends the snapshot and waits for the ack of
that version; ``D/stream.json`` records when the first message went out and when the ack
(sent by the subscriber only after the snapshot is compiled and swapped in) came back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from bench.keygen import TENANT_ID, api_key, public_id
from tessera.keys import digest, display_prefix, load_pepper
from tessera.policy.v1 import policy_pb2

VERSION = "bench-1"
MAX_MESSAGE_BYTES = 3_500_000  # under gRPC's default 4 MB receive limit, framing included


def build_snapshot(n: int, pepper: bytes) -> list[bytes]:
    """The snapshot as serialised StreamPolicyResponse messages."""
    tenant = policy_pb2.Resource(tenant=policy_pb2.Tenant(id=TENANT_ID, name="bench"))
    messages: list[bytes] = []
    batch: list[policy_pb2.Resource] = [tenant]
    size = tenant.ByteSize()

    def flush(*, last: bool) -> None:
        nonlocal batch, size
        msg = policy_pb2.StreamPolicyResponse(
            version=VERSION, reset=not messages, complete=last, upserts=batch
        )
        messages.append(msg.SerializeToString())
        batch, size = [], 0

    for i in range(n):
        key = api_key(i)
        res = policy_pb2.Resource(
            api_key=policy_pb2.ApiKey(
                id=public_id(i),
                key_id=f"k-{i}",
                tenant_id=TENANT_ID,
                digest=digest(pepper, key),
                prefix=display_prefix(key),
            )
        )
        item = res.ByteSize() + 4  # field tag + length prefix
        if size + item > MAX_MESSAGE_BYTES:
            flush(last=False)
        batch.append(res)
        size += item
    flush(last=True)
    return messages


class Snapshot:
    def __init__(self, messages: list[bytes], state_dir: Path) -> None:
        self.messages = messages
        self.state_dir = state_dir

    async def stream(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
        del context
        first = await anext(requests)
        sent_at = time.time()
        for msg in self.messages:
            yield msg
        last_sent = time.time()
        async for req in requests:  # acks; then keep the stream open, like the control plane
            if req.ack_version == VERSION:
                record = {
                    "node_id": first.node_id,
                    "first_sent_unix": sent_at,
                    "last_sent_unix": last_sent,
                    "acked_unix": time.time(),
                    "messages": len(self.messages),
                    "bytes": sum(len(m) for m in self.messages),
                }
                (self.state_dir / "stream.json").write_text(json.dumps(record))


async def serve(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir)
    started = time.perf_counter()
    messages = build_snapshot(args.keys, load_pepper(Path(args.pepper_file)))
    snapshot = Snapshot(messages, state_dir)
    handler = grpc.method_handlers_generic_handler(
        "tessera.policy.v1.PolicyService",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(
                snapshot.stream,
                request_deserializer=policy_pb2.StreamPolicyRequest.FromString,
                response_serializer=lambda b: b,  # already serialised
            )
        },
    )
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 << 20)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    ready = {
        "keys": args.keys,
        "messages": len(messages),
        "bytes": sum(len(m) for m in messages),
        "build_seconds": time.perf_counter() - started,
    }
    (state_dir / "ready.json").write_text(json.dumps(ready))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.policy_server")
    parser.add_argument("--keys", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pepper-file", required=True)
    parser.add_argument("--state-dir", required=True)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
