"""Subscriber side of the policy stream (``tessera.policy.v1``), shared by ext_authz and ratelimit.

It keeps the resource map of the last complete version, applies a full snapshot
(``reset``) or a delta, hands the result to the service's ``on_update`` (which
compiles its own immutable snapshot and swaps it in), then acks the version.
``on_update`` runs in a worker thread (it compiles, then swaps with one assignment).
If ``on_update`` raises, the old snapshot stays, the version is not acked, and the stream is
dropped so the next one starts from a full snapshot (never a delta on a version we lack).
Reconnects forever with backoff capped at ``reconnect_max_seconds``; while
disconnected the service keeps serving its last snapshot.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from prometheus_client import Counter, Gauge

from tessera.grpc_server import RunningServer
from tessera.policy.v1 import policy_pb2, policy_pb2_grpc
from tessera.settings import PolicySettings

log = structlog.get_logger("tessera.policy")

POLICY_CONNECTED = Gauge("tessera_policy_connected", "1 while the policy stream is connected")
POLICY_UPDATES = Counter("tessera_policy_updates_total", "Policy versions applied", ["result"])


def resource_key(resource: policy_pb2.Resource) -> str:
    kind = resource.WhichOneof("kind")
    if kind == "api_key":
        return f"api_key/{resource.api_key.id}"
    if kind == "tenant":
        return f"tenant/{resource.tenant.id}"
    if kind == "model":
        return f"model/{resource.model.name}"
    if kind == "limit":
        return f"limit/{resource.limit.id}"
    msg = f"unknown resource kind {kind!r}"
    raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class PolicyUpdate:
    version: str
    resources: Mapping[str, policy_pb2.Resource]


OnUpdate = Callable[[PolicyUpdate], None]


class PolicySubscriber:
    def __init__(self, settings: PolicySettings, *, service: str, on_update: OnUpdate) -> None:
        self._settings = settings
        self._service = service
        self._on_update = on_update
        self._node_id = settings.node_id or f"{service}-{socket.gethostname()}-{os.getpid()}"
        self._resources: dict[str, policy_pb2.Resource] = {}
        self.version = ""
        self.ready = asyncio.Event()

    async def run(self) -> None:
        delay = 0.05
        while True:
            try:
                async with grpc.aio.insecure_channel(self._settings.url) as channel:
                    stub = policy_pb2_grpc.PolicyServiceStub(channel)
                    if await self._consume(stub):
                        delay = 0.05  # the stream worked: start the backoff afresh
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("policy_stream_lost", code=exc.code().name, url=self._settings.url)
            except Exception:
                log.exception("policy_stream_error")
            POLICY_CONNECTED.set(0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._settings.reconnect_max_seconds)

    async def _consume(self, stub: Any) -> bool:
        """Follow one stream until it ends; True if at least one version was applied."""
        acks: asyncio.Queue[str] = asyncio.Queue()

        async def requests() -> AsyncIterator[policy_pb2.StreamPolicyRequest]:
            yield policy_pb2.StreamPolicyRequest(node_id=self._node_id, service=self._service)
            while True:
                version = await acks.get()
                yield policy_pb2.StreamPolicyRequest(
                    node_id=self._node_id, service=self._service, ack_version=version
                )

        pending: dict[str, policy_pb2.Resource] | None = None
        applied = False
        call = stub.Stream(requests())
        async for msg in call:
            POLICY_CONNECTED.set(1)
            if msg.reset:
                pending = {}
            elif pending is None:
                pending = dict(self._resources)
            for deleted in msg.deletes:
                pending.pop(deleted, None)
            for res in msg.upserts:
                pending[resource_key(res)] = res
            if not msg.complete:
                continue
            try:
                # Compiling a large snapshot takes seconds: do it off the event loop, so the
                # service keeps answering from its current snapshot meanwhile. The swap at the
                # end is one attribute assignment, atomic for the readers on the loop.
                await asyncio.to_thread(self._on_update, PolicyUpdate(version=msg.version, resources=pending))
            except Exception as exc:
                # Keep the old snapshot, and drop the stream: later deltas would build on a
                # version we never applied. The reconnect starts again from a full snapshot.
                POLICY_UPDATES.labels("rejected").inc()
                log.error("policy_update_rejected", version=msg.version, error=str(exc))  # noqa: TRY400
                call.cancel()
                return applied
            self._resources, pending = pending, None
            self.version = msg.version
            POLICY_UPDATES.labels("applied").inc()
            log.info("policy_applied", version=msg.version, resources=len(self._resources))
            self.ready.set()
            applied = True
            acks.put_nowait(msg.version)
        return applied


def follow_policy(
    settings: PolicySettings, *, service: str, on_update: OnUpdate, server: RunningServer
) -> tuple[PolicySubscriber, tuple[asyncio.Task[None], ...]]:
    """Subscribe, and report SERVING on ``server`` once the first full snapshot is applied.

    Readiness depends on the snapshot only, never on Redis or SQL (ARCHITECTURE §3).
    """
    subscriber = PolicySubscriber(settings, service=service, on_update=on_update)

    async def serve_when_ready() -> None:
        await subscriber.ready.wait()
        await server.set_serving(True)
        log.info("serving", subscriber=service, policy_version=subscriber.version)

    tasks = (
        asyncio.create_task(subscriber.run(), name=f"{service}-policy"),
        asyncio.create_task(serve_when_ready(), name=f"{service}-ready"),
    )
    return subscriber, tasks
