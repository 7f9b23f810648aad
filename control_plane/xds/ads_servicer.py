"""Aggregated Discovery Service (state of the world) over one gRPC stream per Envoy.

Per stream and type it remembers what was sent (version + nonce) and the names
Envoy asked for (RDS/EDS are by name, LDS/CDS wildcard). A request carrying
``error_detail`` is a NACK: it is logged and Envoy keeps its last good config.
Every snapshot change is pushed to every open stream; unchanged types are not
re-sent.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from prometheus_client import Counter, Gauge

from control_plane.xds.cache import SnapshotCache, XdsSnapshot
from control_plane.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    EXTENSION_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
)
from tessera.errors import PermissionDeniedError

log = structlog.get_logger("control_plane.xds")

WILDCARD_TYPES = {LISTENER_TYPE, CLUSTER_TYPE}
ADS_STREAMS = Gauge("tessera_xds_streams", "Open ADS streams")
XDS_PUSHES = Counter("tessera_xds_pushes_total", "DiscoveryResponses sent", ["type"])
XDS_NACKS = Counter("tessera_xds_nacks_total", "DiscoveryRequests that NACKed a version", ["type"])


@dataclass
class _TypeState:
    names: frozenset[str] = frozenset()
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    nonce: str = ""


@dataclass
class _Stream:
    node: str = ""
    certified_node: str | None = None  # under mutual TLS: the node its certificate names
    types: dict[str, _TypeState] = field(default_factory=dict)


class AggregatedDiscoveryServiceServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, cache: SnapshotCache, envoy_prefix: str | None = None) -> None:
        self._cache = cache
        self._nonces = itertools.count(1)
        # Under mutual TLS: the SPIFFE ID prefix of Envoy nodes (``…/envoy/``); a stream's node
        # must be the one its certificate names. None: plaintext, the node is what it says.
        self._envoy_prefix = envoy_prefix

    def _certified_node(self, context: Any) -> str | None:
        """The node the caller's certificate names (mutual TLS), else None (anyone)."""
        if self._envoy_prefix is None:
            return None
        peer: bytes = (context.auth_context().get("peer_spiffe_id") or [b""])[0]
        return peer.decode().removeprefix(self._envoy_prefix)  # the allow list admitted only Envoy IDs

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = _Stream(certified_node=self._certified_node(context))
        inbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    inbox.put_nowait(req)
            finally:
                inbox.put_nowait(None)

        reader = asyncio.create_task(read())
        ADS_STREAMS.inc()
        try:
            async for resp in self._serve(stream, inbox):
                yield resp
        finally:
            ADS_STREAMS.dec()
            reader.cancel()
            log.info("xds_stream_closed", node=stream.node)

    async def _serve(
        self, stream: _Stream, inbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None]
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        serial = -1
        get_req: asyncio.Task[discovery_pb2.DiscoveryRequest | None] = asyncio.create_task(inbox.get())
        get_snap: asyncio.Task[XdsSnapshot] = asyncio.create_task(self._cache.wait_newer(serial))
        try:
            while True:
                done, _ = await asyncio.wait({get_req, get_snap}, return_when=asyncio.FIRST_COMPLETED)
                if get_req in done:
                    req = get_req.result()
                    if req is None:
                        return
                    self._on_request(stream, req)
                    get_req = asyncio.create_task(inbox.get())
                if get_snap in done:
                    serial = get_snap.result().serial
                    get_snap = asyncio.create_task(self._cache.wait_newer(serial))
                snapshot = self._cache.snapshot
                if snapshot is None:
                    continue
                for resp in self._pending(stream, snapshot):
                    yield resp
        finally:
            get_req.cancel()
            get_snap.cancel()

    def _on_request(self, stream: _Stream, req: discovery_pb2.DiscoveryRequest) -> None:
        node = req.node.id or stream.node
        if stream.certified_node is not None and node != stream.certified_node:
            # Every node's config (and its secrets) goes only to the node its certificate names.
            log.warning("rpc_refused", rpc="ADS", node=node or None, certified=stream.certified_node)
            msg = f"this certificate is node {stream.certified_node!r}, not {node!r}"
            raise PermissionDeniedError(msg)
        stream.node = node
        ts = stream.types.setdefault(req.type_url, _TypeState())
        if req.HasField("error_detail"):
            XDS_NACKS.labels(req.type_url.rsplit(".", 1)[-1]).inc()
            log.error(
                "xds_nack",
                node=stream.node,
                type_url=req.type_url,
                rejected_version=ts.sent_version,
                error_detail=req.error_detail.message,
            )
            # Keep sent_version: Envoy keeps its last good config; resend only on change.
        if req.response_nonce and req.response_nonce != ts.nonce:
            return  # stale request for an older response; the newer one is in flight
        if req.type_url not in WILDCARD_TYPES:
            ts.names = frozenset(req.resource_names)
        if not req.response_nonce:
            # First request for this type on this stream (or a reconnect): send everything.
            ts.sent_version = None

    def _pending(self, stream: _Stream, snap: XdsSnapshot) -> list[discovery_pb2.DiscoveryResponse]:
        out = []
        cds = stream.types.get(CLUSTER_TYPE)
        if cds is not None and cds.sent_version != snap.versions.get(CLUSTER_TYPE, ""):
            # A changed cluster warms until it gets its endpoints (and its secrets) again, even
            # unchanged ones: send them after the clusters, or it never leaves warming.
            for dependent in (ENDPOINT_TYPE, SECRET_TYPE):
                if (ts := stream.types.get(dependent)) is not None:
                    ts.sent_version = None
        # CDS before EDS and SDS, LDS before ECDS and RDS (Envoy's own ordering expectations).
        for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE, SECRET_TYPE, LISTENER_TYPE, EXTENSION_TYPE, ROUTE_TYPE):
            ts = stream.types.get(type_url)
            if ts is None:
                continue
            version = snap.versions.get(type_url, "")
            if ts.sent_version == version and ts.sent_names == ts.names:
                continue
            resources = snap.resources.get(type_url, {})
            if type_url in WILDCARD_TYPES:
                chosen = list(resources.values())
            else:
                chosen = [resources[n] for n in sorted(ts.names) if n in resources]
            ts.nonce = str(next(self._nonces))
            ts.sent_version = version
            ts.sent_names = ts.names
            XDS_PUSHES.labels(type_url.rsplit(".", 1)[-1]).inc()
            log.debug("xds_push", node=stream.node, type_url=type_url, version=version, count=len(chosen))
            out.append(
                discovery_pb2.DiscoveryResponse(
                    version_info=version, resources=chosen, type_url=type_url, nonce=ts.nonce
                )
            )
        return out
