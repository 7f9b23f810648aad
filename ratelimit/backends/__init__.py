"""Counter backends, chosen once by URL scheme in ``make_backend`` (the only such branch)."""

from __future__ import annotations

from ratelimit.backends.base import (
    BUDGET,
    EXACT_LOG_MAX,
    LOG,
    LOG_BUCKETS,
    SLOTS,
    AcquireCall,
    Acquisition,
    CounterBackend,
    CounterRequest,
    CounterState,
    SettleCall,
    Settlement,
    counter_key,
)
from ratelimit.backends.memory import MemoryCounterBackend
from ratelimit.backends.redis import RedisCounterBackend
from ratelimit.backends.redis_url import SCHEMES as REDIS_SCHEMES
from tessera.clock import SYSTEM_CLOCK, Clock
from tessera.errors import ConfigError
from tessera.settings import redact_url

__all__ = [
    "BUDGET",
    "EXACT_LOG_MAX",
    "LOG",
    "LOG_BUCKETS",
    "SLOTS",
    "AcquireCall",
    "Acquisition",
    "CounterBackend",
    "CounterRequest",
    "CounterState",
    "MemoryCounterBackend",
    "RedisCounterBackend",
    "SettleCall",
    "Settlement",
    "counter_key",
    "is_memory_url",
    "make_backend",
]


def _scheme(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else ""


def is_memory_url(url: str) -> bool:
    return _scheme(url) == "memory"


def make_backend(url: str, *, clock: Clock = SYSTEM_CLOCK) -> CounterBackend:
    """``memory://`` (one process) or Redis (``ratelimit/backends/redis_url.py``); nothing connects yet."""
    scheme = _scheme(url)
    if scheme == "memory":
        return MemoryCounterBackend(clock)
    if scheme in REDIS_SCHEMES:
        return RedisCounterBackend(url)
    msg = (
        f"unsupported counter URL {redact_url(url)!r}: use memory://, redis://, rediss://, unix://,"
        " redis+cluster:// or redis+sentinel://"
    )
    raise ConfigError(msg)
