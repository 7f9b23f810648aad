"""Load-aware weights: scrape every backend's Prometheus ``/metrics``, turn queue depth and
KV-cache pressure into a weight factor, and republish the endpoints when a factor moves.

No per-request callout: Envoy keeps balancing by weight on its own; this only changes the
weights every few seconds. A backend whose metrics cannot be read keeps a neutral factor
(1.0): a scrape failure must never starve a healthy server. Only EDS clusters (backends
given by IP) are re-weighted: a weight there is an endpoint update, while a DNS-named
backend's weight lives in the cluster, whose change would drain its connections.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
import structlog
from prometheus_client import Counter, Gauge

log = structlog.get_logger("control_plane.load")

LOAD_FACTOR = Gauge(
    "tessera_backend_load_factor", "Weight factor from the backend's own metrics", ["backend"]
)
SCRAPE_FAILURES = Counter(
    "tessera_backend_scrape_failures_total", "Backend /metrics scrapes that failed", ["backend"]
)


@dataclass(frozen=True, slots=True)
class Names:
    """A server kind's metric names: requests queued, requests running, KV-cache use (0..1)."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_cache: tuple[str, ...] = ()


_VLLM: Final = Names(
    ("vllm:num_requests_waiting",),
    ("vllm:num_requests_running",),
    ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
)
METRIC_NAMES: Final[dict[str, Names]] = {
    "vllm": _VLLM,
    "openai-compatible": _VLLM,  # many OpenAI-compatible servers are vLLM; others read as neutral
    "llamacpp": Names(("llamacpp:requests_deferred",), ("llamacpp:requests_processing",)),
    "dynamo": Names(("dynamo_frontend_queued_requests",), ("dynamo_frontend_inflight_requests",)),
    "trtllm": Names(("trtllm_num_requests_waiting",), ("trtllm_num_requests_running",)),
}
QUEUE_SCALE: Final = 2.0  # a queue of 2 halves the weight, 8 leaves a fifth
KV_FULL: Final = 0.95
MIN_FACTOR: Final = 0.05
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → the sum of each metric's samples (over labels)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


def load_factor(kind: str, samples: Mapping[str, float]) -> float:
    """1.0 for an idle or unknown server, lower as its queue grows or its KV cache fills."""
    names = METRIC_NAMES.get(kind, _VLLM)
    waiting = next((samples[n] for n in names.waiting if n in samples), None)
    if waiting is None:
        return 1.0  # not a server we can read: neutral
    factor = 1.0 / (1.0 + max(0.0, waiting) / QUEUE_SCALE)
    kv = next((samples[n] for n in names.kv_cache if n in samples), 0.0)
    if kv >= KV_FULL:
        factor = min(factor, 0.5)
    return max(MIN_FACTOR, round(factor, 2))


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # scheme://host:port
    kind: str


class LoadWatcher:
    """Every ``interval`` seconds: scrape every target, then ``apply`` the factors if any moved."""

    def __init__(
        self,
        targets: Callable[[], list[Target]],
        apply: Callable[[Mapping[str, float]], Awaitable[None]],
        *,
        interval: float,
        timeout: float = 1.0,
    ) -> None:
        self._targets = targets
        self._apply = apply
        self._interval = interval
        self._timeout = timeout
        self.factors: dict[str, float] = {}

    async def run_forever(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                try:
                    await self.scrape_once(http)
                except Exception:
                    log.warning("load_scrape_round_failed", exc_info=True)
                await asyncio.sleep(self._interval)

    async def scrape_once(self, http: aiohttp.ClientSession) -> None:
        targets = {t.url: t for t in self._targets()}
        results = await asyncio.gather(*(self._scrape(http, t) for t in targets.values()))
        factors = dict(zip(targets, results, strict=True))
        for url, f in factors.items():
            LOAD_FACTOR.labels(url).set(f)
        if factors != self.factors:
            await self._apply(factors)
            self.factors = factors  # only once applied: a failed republish is retried next round

    async def _scrape(self, http: aiohttp.ClientSession, target: Target) -> float:
        try:
            async with http.get(f"{target.url}/metrics") as resp:
                if resp.status != 200:  # noqa: PLR2004
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                return load_factor(target.kind, parse_metrics(await resp.text()))
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
            SCRAPE_FAILURES.labels(target.url).inc()
            log.debug("load_scrape_failed", backend=target.url, error=str(exc))
            return 1.0
