"""Publisher side of the policy stream (``tessera.policy.v1.PolicyService``).

On subscribe: the full resource map in chunks of at most ``CHUNK_BYTES`` (first
``reset=True``, last ``complete=True``); then, for every newer snapshot, one
delta message with the upserts and deletes against what this stream last got.
Subscribers ack versions; acks are logged and counted, never waited on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from prometheus_client import Counter, Gauge

from tessera.identity import spiffe_id
from tessera.policy.v1 import policy_pb2, policy_pb2_grpc

log = structlog.get_logger("control_plane.policy")

CHUNK_BYTES = 4 * 1024 * 1024 - 64 * 1024  # headroom under gRPC's 4 MB default
POLICY_STREAMS = Gauge("tessera_policy_streams", "Open policy streams")
POLICY_ACKS = Counter("tessera_policy_acks_total", "Policy versions acked by subscribers")


# What each subscriber reads; it gets only these kinds (ratelimit never holds API keys).
SUBSCRIBED_KINDS: Final = {
    "ext_authz": frozenset({"api_key", "tenant", "model", "limit"}),  # limits: scopes and fail modes
    "ratelimit": frozenset({"limit", "model"}),
}


@dataclass(frozen=True)
class PolicySnapshot:
    serial: int
    resources: Mapping[str, policy_pb2.Resource]
    _views: dict[str, Mapping[str, policy_pb2.Resource]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def version(self) -> str:
        return str(self.serial)

    def view(self, service: str) -> Mapping[str, policy_pb2.Resource]:
        """The resources ``service`` subscribes to (all of them for an unknown service);
        computed once per snapshot and shared by every stream of that service."""
        kinds = SUBSCRIBED_KINDS.get(service)
        if kinds is None:
            return self.resources
        view = self._views.get(service)
        if view is None:
            view = self._views[service] = {
                k: r for k, r in self.resources.items() if k.partition("/")[0] in kinds
            }
        return view


class PolicyCache:
    def __init__(self) -> None:
        self._snapshot: PolicySnapshot | None = None
        self._changed = asyncio.Condition()

    @property
    def snapshot(self) -> PolicySnapshot | None:
        return self._snapshot

    async def set(self, snapshot: PolicySnapshot) -> None:
        async with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()

    async def wait_newer(self, serial: int) -> PolicySnapshot:
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._snapshot is not None and self._snapshot.serial > serial
            )
            assert self._snapshot is not None  # noqa: S101 - guaranteed by the predicate
            return self._snapshot


def full_snapshot_messages(snap: PolicySnapshot, service: str = "") -> list[policy_pb2.StreamPolicyResponse]:
    msgs: list[policy_pb2.StreamPolicyResponse] = []
    current = policy_pb2.StreamPolicyResponse(version=snap.version, reset=True)
    size = 0
    for res in snap.view(service).values():
        n = res.ByteSize() + 8
        if size + n > CHUNK_BYTES and current.upserts:
            msgs.append(current)
            current = policy_pb2.StreamPolicyResponse(version=snap.version)
            size = 0
        current.upserts.append(res)
        size += n
    current.complete = True
    msgs.append(current)
    return msgs


def delta_message(
    old: Mapping[str, policy_pb2.Resource], new: PolicySnapshot, service: str = ""
) -> policy_pb2.StreamPolicyResponse:
    resources = new.view(service)
    upserts = [r for k, r in resources.items() if old.get(k) != r]
    deletes = [k for k in old if k not in resources]
    return policy_pb2.StreamPolicyResponse(
        version=new.version, complete=True, upserts=upserts, deletes=deletes
    )


def subscribers(namespace: str) -> dict[str, str]:
    """SPIFFE ID -> the subscriber it is, under mutual TLS (tessera/identity.py names)."""
    return {spiffe_id("ext-authz", namespace): "ext_authz", spiffe_id("ratelimit", namespace): "ratelimit"}


class PolicyServiceServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, cache: PolicyCache, by_identity: Mapping[str, str] | None = None) -> None:
        self._cache = cache
        # Under mutual TLS a subscriber is what its certificate says, whatever its hello claims
        # (ratelimit never receives key digests); None: plaintext, the hello's claim decides.
        self._by_identity = by_identity

    async def Stream(
        self, request_iterator: AsyncIterator[policy_pb2.StreamPolicyRequest], context: Any
    ) -> AsyncIterator[policy_pb2.StreamPolicyResponse]:
        first = await anext(request_iterator, None)
        if first is None:
            return
        node, service = first.node_id, first.service
        if self._by_identity is not None:
            peer = (context.auth_context().get("peer_spiffe_id") or [b""])[0].decode()
            service = self._by_identity.get(peer, "")
            if not service:  # the server's allow list stops these first; never everything
                return
        log.info("policy_subscribed", node=node, subscriber=service)

        async def read_acks() -> None:
            async for req in request_iterator:
                if req.ack_version:
                    POLICY_ACKS.inc()
                    log.debug("policy_acked", node=node, version=req.ack_version)

        acks = asyncio.create_task(read_acks())
        POLICY_STREAMS.inc()
        try:
            snap = await self._cache.wait_newer(-1)
            for msg in full_snapshot_messages(snap, service):
                yield msg
            sent = snap.view(service)
            while True:
                snap = await self._cache.wait_newer(snap.serial)
                yield delta_message(sent, snap, service)
                sent = snap.view(service)
        finally:
            POLICY_STREAMS.dec()
            acks.cancel()
            log.info("policy_unsubscribed", node=node, subscriber=service)
