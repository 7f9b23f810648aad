"""What both transports answer an ``Outcome`` with, apart from its wire form.

The gRPC ``Check`` and the HTTP server build their messages differently, but the policy is one:
an allow without limit headers depends only on (tenant_id, key_id, priority) and is built once
per key per snapshot (so the cache is bounded by the snapshot's keys); the denials with a fixed
body are built once; every decision is counted; denials are logged, sampled; and a refusal of an
authenticated caller's request (400, 429) names its tenant in the metadata, so its usage line
(a ledger row) does. Each transport passes its own builders to ``Answers``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Generic, TypeVar

import structlog
from prometheus_client import Counter

from ext_authz.authorize import Authorizer, Outcome
from ext_authz.key_index import KeyIndex
from ext_authz.pipeline import SUSPENDED_MESSAGE, Decision
from tessera import gateway_headers
from tessera.client_errors import ERRORS, status_of
from tessera.clock import Clock
from tessera.endpoints import Dialect
from tessera.log_sampling import LogSampler

log = structlog.get_logger("ext_authz")

DECISIONS = Counter("tessera_authz_decisions", "ext_authz decisions", ["result"])
HEADERS_TO_REMOVE: Final = (*gateway_headers.CREDENTIALS, *gateway_headers.SET_BY_GATEWAY)
RESERVED_KEY: Final = "reserved"  # metadata: the meter settles this request at its end
FAIRNESS_HEADER: Final = "x-gateway-inference-fairness-id"  # Gateway API Inference Extension / llm-d
PRIORITY_HEADER: Final = "x-tessera-priority"  # the plan's priority, for schedulers that take a hint
ALLOW_CACHE_MAX: Final = 65_536
FIXED_DENIALS: Final = (
    ("missing_api_key", None),
    ("invalid_api_key", None),
    ("invalid_api_key", SUSPENDED_MESSAGE),
    ("api_key_revoked", None),
    ("api_key_expired", None),
)
_NAMES_TENANT: Final = (400, 429)  # refusals of an authenticated caller's request
_ALLOW_COUNT = DECISIONS.labels("allow")
_DENY_COUNT = {code: DECISIONS.labels(code) for code in ERRORS}

A = TypeVar("A")  # a transport's allow
D = TypeVar("D")  # ... and denial


def names_tenant(decision: Decision) -> bool:
    """A refusal whose usage line carries the tenant (and key) in its metadata."""
    return bool(decision.tenant_id) and status_of(decision.code) in _NAMES_TENANT


class Answers(Generic[A, D]):
    """``allow(tenant_id, key_id, priority)`` and ``deny(code, message, dialect)`` build a transport's
    message; the results of both are kept where they can be (see the module docstring)."""

    def __init__(
        self,
        authorizer: Authorizer,
        clock: Clock,
        *,
        allow: Callable[[str, str, int], A],
        deny: Callable[[str, str | None, Dialect], D],
    ) -> None:
        self._authorizer = authorizer
        self._build_allow = allow
        self._fixed = {
            (code, message, dialect): deny(code, message, dialect)
            for code, message in FIXED_DENIALS
            for dialect in Dialect
        }
        self._allow_cache: dict[tuple[str, str, int], A] = {}
        self._cached_index: KeyIndex | None = None
        self._log_sampler = LogSampler(clock=clock)

    def allowed(self, decision: Decision) -> A:
        """The cached allow for this caller (count it)."""
        _ALLOW_COUNT.inc()
        if self._cached_index is not self._authorizer.index:
            self._cached_index = self._authorizer.index
            self._allow_cache = {}
        ident = (decision.tenant_id, decision.key_id, decision.priority)
        answer = self._allow_cache.get(ident)
        if answer is None:
            if len(self._allow_cache) >= ALLOW_CACHE_MAX:  # bounded, whatever the key count
                self._allow_cache.clear()
            answer = self._allow_cache[ident] = self._build_allow(*ident)
        return answer

    def refused(self, outcome: Outcome, request_id: str) -> D | None:
        """Count and log (sampled) a denial; its prebuilt answer, or None: the transport builds
        it with ``outcome.response_headers`` and, when ``names_tenant``, the tenant's metadata."""
        decision = outcome.decision
        _DENY_COUNT[decision.code].inc()
        suppressed = self._log_sampler.admit()
        if suppressed is not None:  # a flood of bad keys must not become a flood of log lines
            log.info(
                "authz_denied",
                code=decision.code,
                key_prefix=decision.key_prefix,
                tenant_id=decision.tenant_id,
                request_id=request_id,
                suppressed=suppressed,
            )
        if outcome.response_headers or names_tenant(decision):
            return None
        return self._fixed.get((decision.code, decision.message, outcome.dialect))
