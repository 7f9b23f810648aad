"""Subscriber side of the policy stream (``tessera.policy.v1``), shared by ext_authz and ratelimit.

It gathers the messages of one version (a full snapshot, ``reset``, or a delta), hands
them to the service's ``on_update`` as one ``PolicyUpdate`` (the service applies it to
its own compiled snapshot and swaps the result in), then acks the version. It keeps no
resource map itself: at a million keys a second copy of every resource as a protobuf
message would cost more memory than the service's whole compiled index.
``on_update`` runs in a worker thread (it compiles, then swaps with one assignment).
If ``on_update`` raises, the old snapshot stays, the version is not acked, and the stream is
dropped so the next one starts from a full snapshot (never a delta on a version we lack).
Reconnects forever with backoff capped at ``reconnect_max_seconds``; while
disconnected the service keeps serving its last snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from prometheus_client import Counter, Gauge

from tessera.grpc_server import RunningServer
from tessera.policy.v1 import policy_pb2, policy_pb2_grpc
from tessera.settings import IdentitySettings, PolicySettings
from tessera.tls import grpc_channel

log = structlog.get_logger("tessera.policy")

POLICY_CONNECTED = Gauge("tessera_policy_connected", "1 while the policy stream is connected")
POLICY_UPDATES = Counter("tessera_policy_updates_total", "Policy versions applied", ["result"])


def resource_key(resource: policy_pb2.Resource) -> str:
    """``<kind>/<id>``; an API key secret is named by its hex digest, so a subscriber can
    drop a deleted key from a digest-keyed index without keeping a name map."""
    kind = resource.WhichOneof("kind")
    if kind == "api_key":
        return f"api_key/{resource.api_key.digest.hex()}"
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
    """One complete version: ``reset`` = a full snapshot (drop everything held before).

    It holds the version's messages and yields their resources lazily: a service that
    compiles them as it goes never has a wrapper object alive per resource (upb's wrapper
    cache keeps the memory of its largest size; at a million keys that is ~200 MB).
    """

    version: str
    reset: bool
    messages: Sequence[policy_pb2.StreamPolicyResponse]

    @property
    def upserts(self) -> Iterator[policy_pb2.Resource]:
        for msg in self.messages:
            yield from msg.upserts

    @property
    def deletes(self) -> Iterator[str]:
        for msg in self.messages:
            yield from msg.deletes


def apply_update(
    resources: Mapping[str, policy_pb2.Resource], update: PolicyUpdate
) -> dict[str, policy_pb2.Resource]:
    """The resource map after ``update`` (a new dict): for services with few resources."""
    out = {} if update.reset else dict(resources)
    for name in update.deletes:
        out.pop(name, None)
    for res in update.upserts:
        out[resource_key(res)] = res
    return out


OnUpdate = Callable[[PolicyUpdate], None]


class PolicySubscriber:
    def __init__(
        self,
        settings: PolicySettings,
        *,
        service: str,
        on_update: OnUpdate,
        identity: IdentitySettings | None = None,
    ) -> None:
        self._settings = settings
        self._identity = identity  # mutual TLS to the control plane when it names one
        self._service = service
        self._on_update = on_update
        self._node_id = settings.node_id or f"{service}-{socket.gethostname()}-{os.getpid()}"
        self.version = ""
        self.ready = asyncio.Event()

    async def run(self) -> None:
        delay = 0.05
        while True:
            try:
                # a channel per connection: a renewed certificate is used from the next one on
                async with grpc_channel(self._settings.url, self._identity, "control-plane") as channel:
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

        messages: list[policy_pb2.StreamPolicyResponse] = []
        reset = False
        applied = False
        call = stub.Stream(requests())
        async for msg in call:
            POLICY_CONNECTED.set(1)
            if msg.reset:
                messages, reset = [], True
            elif not reset and not applied:
                # A delta on a version this subscriber never had: start over from a snapshot.
                log.error("policy_delta_before_snapshot", version=msg.version)
                call.cancel()
                return applied
            messages.append(msg)
            if not msg.complete:
                continue
            update = PolicyUpdate(version=msg.version, reset=reset, messages=messages)
            messages, reset = [], False
            try:
                # Compiling a large snapshot takes seconds: do it off the event loop, so the
                # service keeps answering from its current snapshot meanwhile. The swap at the
                # end is one attribute assignment, atomic for the readers on the loop.
                await asyncio.to_thread(self._on_update, update)
            except Exception as exc:
                # Keep the old snapshot, and drop the stream: later deltas would build on a
                # version we never applied. The reconnect starts again from a full snapshot.
                POLICY_UPDATES.labels("rejected").inc()
                log.error("policy_update_rejected", version=msg.version, error=str(exc))  # noqa: TRY400
                call.cancel()
                return applied
            self.version = msg.version
            POLICY_UPDATES.labels("applied").inc()
            log.info(
                "policy_applied",
                version=msg.version,
                reset=update.reset,
                upserts=sum(len(m.upserts) for m in update.messages),
                deletes=sum(len(m.deletes) for m in update.messages),
            )
            if update.reset:
                del update
                await asyncio.to_thread(release_free_memory)
            self.ready.set()
            applied = True
            acks.put_nowait(msg.version)
        return applied


def release_free_memory() -> None:
    """Hand the heap freed by a full snapshot (its parsed messages, the service's build lists)
    back to the OS; glibc keeps it otherwise, and a worker's RSS would stay at its peak."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def follow_policy(
    settings: PolicySettings,
    *,
    service: str,
    on_update: OnUpdate,
    server: RunningServer,
    identity: IdentitySettings | None = None,
) -> tuple[PolicySubscriber, tuple[asyncio.Task[None], ...]]:
    """Subscribe, and report SERVING on ``server`` once the first full snapshot is applied.

    Readiness depends on the snapshot only, never on Redis or SQL (ARCHITECTURE §3).
    """
    subscriber = PolicySubscriber(settings, service=service, on_update=on_update, identity=identity)

    async def serve_when_ready() -> None:
        await subscriber.ready.wait()
        await server.set_serving(True)
        log.info("serving", subscriber=service, policy_version=subscriber.version)

    tasks = (
        asyncio.create_task(subscriber.run(), name=f"{service}-policy"),
        asyncio.create_task(serve_when_ready(), name=f"{service}-ready"),
    )
    return subscriber, tasks
