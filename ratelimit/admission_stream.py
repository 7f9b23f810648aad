"""The admission stream's server: ``AdmitBatch`` frames in, ``VerdictBatch`` frames out.

ext_authz keeps one connection per process open (``tessera/frames.py`` framing, messages of
``tessera.admission.v1``). Batches of one connection are decided in the order they arrive (a
forced admission always follows the admission it repeats), each with one counter call for the
whole batch. It is the hot path's second hop, so it is a plain ``asyncio.Protocol``: a gRPC
stream cost about 200 µs of CPU per message here, this a few tens (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from typing import Any

import structlog

from ratelimit.admission import decide_batch
from ratelimit.backstop import Backstop
from ratelimit.limiter import RateLimiter
from tessera.admission.v1 import admission_pb2
from tessera.errors import ConfigError, InvalidArgumentError
from tessera.frames import Frames, frame
from tessera.tls import peer_spiffe_id

log = structlog.get_logger("ratelimit.admission_stream")


class _Connection(asyncio.Protocol):
    def __init__(
        self, limiter: RateLimiter, allowed: frozenset[str] | None, backstop: Backstop | None
    ) -> None:
        self._limiter = limiter
        self._backstop = backstop
        self._allowed = allowed  # the SPIFFE IDs that may admit (None: plaintext, no identities)
        self._frames = Frames()
        self._pending: deque[bytes] = deque()
        self._transport: asyncio.Transport | None = None
        self._worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - a stream server's
        if self._allowed is not None:
            peer = peer_spiffe_id(transport)  # the handshake verified its chain to our CA
            if peer not in self._allowed:
                log.warning("admission_stream_refused", peer=peer, reason="identity not allowed")
                transport.abort()
                return
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return  # refused
        try:
            self._pending.extend(self._frames.feed(data))
        except InvalidArgumentError as exc:
            log.warning("admission_stream_refused", error=str(exc))
            if self._transport is not None:
                self._transport.close()
            return
        if self._pending and (self._worker is None or self._worker.done()):
            self._worker = asyncio.get_running_loop().create_task(self._work())

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio.Protocol
        self._transport = None

    async def _work(self) -> None:
        while self._pending and self._transport is not None:
            batch = admission_pb2.AdmitBatch.FromString(self._pending.popleft())
            reply = await decide_batch(self._limiter, batch, self._backstop)
            if self._transport is not None:
                self._transport.write(frame(reply.SerializeToString()))


async def start_admission_stream(
    limiter: RateLimiter,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    tls: ssl.SSLContext | None = None,
    allowed: frozenset[str] | None = None,
    backstop: Backstop | None = None,
) -> Any:
    """Listen for ext_authz's admission streams; a taken port is a startup error. With ``tls``
    (mutual: a client certificate from the platform CA is required) only the SPIFFE IDs in
    ``allowed`` may admit; anyone else is cut off before a byte is read."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(
            lambda: _Connection(limiter, allowed if tls is not None else None, backstop),
            host,
            port,
            reuse_port=reuse_port or None,
            ssl=tls,
        )
    except OSError as exc:
        msg = f"admission stream port {host}:{port}: {exc.strerror}"
        raise ConfigError(msg) from exc
