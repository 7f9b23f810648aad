"""Reads the store and publishes it: xDS to Envoy, the policy stream to the services.

``publish()`` is awaited by every admin write after its commit, so the change is
on its way to Envoy and every ext_authz/ratelimit replica before the RPC returns.
A periodic refresh also picks up writes made by other control-plane replicas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import async_sessionmaker

from control_plane.jwt_keys import JwtPolicy, ensure_keys, signer
from control_plane.load import Target
from control_plane.policy import policy_resources_from_state
from control_plane.policy_servicer import PolicyCache, PolicySnapshot
from control_plane.state import PriceState, State, load_state
from control_plane.xds.cache import SnapshotCache, XdsSnapshot
from control_plane.xds.resources import encode_all
from control_plane.xds.translate import GatewayConfig, is_eds, resources_from_state
from tessera.tls import key_matches

log = structlog.get_logger("control_plane.publisher")
PUBLISHES = Counter("tessera_publishes_total", "Snapshots published", ["result"])


class Publisher:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[Any],
        xds_cache: SnapshotCache,
        policy_cache: PolicyCache,
        *,
        pepper: bytes,
        jwt_policy: JwtPolicy,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._pepper = pepper
        self.jwt_policy = jwt_policy
        self.signing: tuple[str, Any] | None = None  # (kid, private key) that signs gateway JWTs
        self._gateway: GatewayConfig | None = None
        self._xds = xds_cache
        self._policy = policy_cache
        self._lock = asyncio.Lock()
        self._serial = 0
        self.state: State | None = None
        self._prices: tuple[PriceState | None, ...] = ()  # each model's price in effect, last published
        self.load: Mapping[str, float] = {}  # backend URL -> weight factor (control_plane.load)
        self._tls_files: tuple[Path, Path] | None = None
        self._cert: tuple[bytes, bytes] | None = None  # the listener's certificate, last published

    def configure(self, gateway: GatewayConfig, tls_files: tuple[Path, Path] | None = None) -> None:
        """What Envoy needs to know about the gateway and us; nothing is published before.
        ``tls_files``: the public listener's certificate and key, read again on each refresh."""
        self._gateway = gateway
        self._tls_files = tls_files

    def _gateway_cert(self) -> tuple[bytes, bytes] | None:
        """The listener's (certificate, key) as the files hold them now; the last good pair while
        they are unreadable or caught between a renewal's two writes."""
        if self._tls_files is None:
            return None
        cert_file, key_file = self._tls_files
        try:
            pair = cert_file.read_bytes(), key_file.read_bytes()
        except OSError as exc:
            # no traceback: the reason is enough
            log.error("gateway_certificate_unreadable", error=exc.strerror, file=exc.filename)  # noqa: TRY400
            return self._cert
        if pair != self._cert and not key_matches(pair[1], pair[0]):
            log.warning("gateway_certificate_mismatched", cert=str(cert_file))  # mid-renewal
            return self._cert
        return pair

    async def publish(self) -> None:
        if self._gateway is None:
            return  # not configured yet: the first configured publish reads the whole store
        async with self._lock:
            async with self._sessionmaker.begin() as session:
                await ensure_keys(session, self._pepper, self.jwt_policy, datetime.now(UTC))
            async with self._sessionmaker() as session:
                state = await load_state(session, self._pepper)
                if self.signing is None or self.state is None or state.jwks != self.state.jwks:
                    self.signing = await signer(session, self._pepper)
            now = time.time()
            prices = tuple(m.price_at(now) for m in state.models)
            cert = self._gateway_cert()
            if state == self.state and prices == self._prices and cert == self._cert:
                return  # nothing new (a price that just took effect counts as new)
            try:
                xds = encode_all(resources_from_state(state, self._gateway, self.load, cert))
                policy = policy_resources_from_state(state, now)
            except Exception:
                PUBLISHES.labels("failed").inc()
                log.exception("publish_failed")
                raise
            self._serial += 1
            self.state, self._prices, self._cert = state, prices, cert
            await self._xds.set(XdsSnapshot.build(self._serial, xds))
            await self._policy.set(PolicySnapshot(self._serial, policy))
            PUBLISHES.labels("ok").inc()
            log.info(
                "published",
                serial=self._serial,
                tenants=len(state.tenants),
                keys=len(state.keys),
                models=len(state.models),
                limits=len(state.limits),
            )

    def load_targets(self) -> list[Target]:
        """The backends whose weights follow their load: those of EDS (all-IP) models."""
        if self.state is None:
            return []
        return [Target(b.url, b.kind) for m in self.state.models if is_eds(m) for b in m.backends]

    async def set_load(self, factors: Mapping[str, float]) -> None:
        """Republish the endpoints with new load factors (only EDS changes reach Envoy)."""
        async with self._lock:
            self.load = dict(factors)
            if self.state is None or self._gateway is None:
                return
            xds = encode_all(resources_from_state(self.state, self._gateway, self.load, self._cert))
            self._serial += 1
            await self._xds.set(XdsSnapshot.build(self._serial, xds))
            log.info("load_weights_published", serial=self._serial, factors=self.load)

    async def refresh_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.publish()
            except Exception:
                log.warning("refresh_failed", exc_info=True)
