"""vLLM-named Prometheus metrics, in a registry of the app's own (several apps share a process)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

# The demo pretends each in-flight request fills this share of the KV cache.
_KV_SHARE_PER_REQUEST = 0.01


class UpstreamMetrics:
    def __init__(self, models: Sequence[str]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels,
            registry=self.registry,
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels,
            registry=self.registry,
        )
        self.kv_cache = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            labels,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=self.registry
        )
        self._in_flight: dict[str, int] = {}
        self._models = tuple(models)
        self.broken = False  # /metrics answers 500 (a scrape that fails)
        for model in models:
            for metric in (
                self.running,
                self.waiting,
                self.kv_cache,
                self.prompt_tokens,
                self.generation_tokens,
            ):
                metric.labels(model_name=model)
            self._in_flight[model] = 0

    @contextmanager
    def track(self, model: str) -> Iterator[None]:
        """Count one request as running for the duration of the block."""
        self._set_in_flight(model, +1)
        try:
            yield
        finally:
            self._set_in_flight(model, -1)

    def _set_in_flight(self, model: str, delta: int) -> None:
        count = self._in_flight.get(model, 0) + delta
        self._in_flight[model] = count
        self.running.labels(model_name=model).set(count)
        self.kv_cache.labels(model_name=model).set(min(1.0, count * _KV_SHARE_PER_REQUEST))

    def pretend_waiting(self, count: int) -> None:
        """Report ``count`` queued requests for every model (the demo never queues for real)."""
        for model in self._models:
            self.waiting.labels(model_name=model).set(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
