"""The whole decision of ext_authz's one callout, for any transport (gRPC Check or HTTP).

Identity and entitlement (``pipeline.decide``, pure, on the current snapshot), what the request
may cost (``request_facts``), then admission by the ratelimit service's counters (batched onto
one stream, ``admissions``) when a limit applies; otherwise the request is only sent to be kept
open for the usage backstop (``Admitter.keep``: nobody waits). The transports only translate
headers in and an ``Outcome`` out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import Counter

from ext_authz.admissions import Admitter
from ext_authz.key_index import EMPTY_INDEX, KeyIndex, LimitScope
from ext_authz.pipeline import Decision, decide
from ext_authz.request_facts import BadParam, request_cost
from tessera import gateway_headers as gh
from tessera.admission.v1 import admission_pb2
from tessera.clock import Clock
from tessera.endpoints import Dialect, dialect_of
from tessera.tracing import TRACER, TraceContext, current_context

DEGRADED = Counter(
    "tessera_authz_admitted_degraded_total",
    "Requests admitted by a fail-open limit while the counters could not answer (counted later)",
)
REFUSED_DEGRADED = Counter(
    "tessera_authz_refused_degraded_total",
    "Requests refused by a fail-closed limit while the counters could not answer",
)
FAIL_CLOSED_RETRY_SECONDS: Final = 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """An allow (``decision.allowed``) with what the client and the access log get, or a denial."""

    decision: Decision
    response_headers: tuple[tuple[str, str], ...] = ()  # x-ratelimit-*, retry-after
    reserved: bool = False  # admitted by counters: the meter settles it when it ends
    admitted: admission_pb2.Admission | None = field(default=None, compare=False)
    dialect: Dialect = Dialect.OPENAI  # a denial's body is in the shape of the endpoint's API


def refusal(decision: Decision, path: str, response_headers: tuple[tuple[str, str], ...] = ()) -> Outcome:
    """A denial, answered in the error shape of the API ``path`` speaks."""
    return Outcome(decision, response_headers, dialect=dialect_of(path))


NOT_READY = Counter(
    "tessera_authz_not_ready_total", "Checks answered 503 before the first policy snapshot arrived"
)
NOT_READY_OUTCOME: Final = Outcome(Decision(code="service_unavailable"), (("retry-after", "1"),))


def jwt_key_id(payload: str | None) -> str | None:
    """The ``key_id`` claim of a JWT Envoy's jwt_authn verified (its base64url payload header)."""
    if not payload:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        return None
    value = claims.get("key_id") if isinstance(claims, dict) else None
    return value if isinstance(value, str) and value else None


class Authorizer:
    def __init__(self, pepper: bytes, clock: Clock, admitter: Admitter | None) -> None:
        self._pepper = pepper
        self._clock = clock
        self._admitter = admitter
        self.index = EMPTY_INDEX
        self.ready = False  # until the first snapshot: Checks are answered 503, not judged

    @property
    def admitting(self) -> bool:
        """Whether admissions reach the counters now (the admission stream is open)."""
        return self._admitter is not None and self._admitter.connected

    def abandon(self, outcome: Outcome) -> None:
        """The caller gave up before this outcome reached it: the request will not run, so what
        its admission took is given back."""
        if self._admitter is not None and outcome.admitted is not None:
            self._admitter.abandon(outcome.admitted)

    def swap_index(self, index: KeyIndex) -> None:
        """Install a new snapshot: one assignment, so a Check sees the old or the new one."""
        self.index = index
        self.ready = True

    async def authorize(  # noqa: PLR0911 - one return per outcome
        self, headers: Mapping[str, str], path: str, parent: TraceContext | None = None
    ) -> Outcome:
        """The decision on one request. ``parent``: the trace context its admission's span
        continues (else the current span's: the gRPC Check's)."""
        index = self.index
        if not self.ready:
            # No policy snapshot yet (just started): every key would look unknown. A 401 would
            # tell a client its valid key is bad; this is an outage of ours: 503, fail closed.
            NOT_READY.inc()
            return NOT_READY_OUTCOME
        model = headers.get(gh.MODEL) or None
        decision = decide(
            headers,
            model,
            index,
            pepper=self._pepper,
            now=self._clock.now(),
            jwt_key_id=jwt_key_id(headers.get(gh.JWT_PAYLOAD)),
        )
        if not decision.allowed or model is None:  # no model: not an inference route, nothing to admit
            return Outcome(decision) if decision.allowed else refusal(decision, path)
        cost = request_cost(headers, path, index.model_tokens.get(model))
        if isinstance(cost, BadParam):
            return refusal(_bad_param(decision, cost), path)
        if self._admitter is None:
            return Outcome(decision)
        scopes = index.limits_for(decision.tenant_id, decision.key_id, model)
        # the Envoy's node, which its usage lines name: with it the admission is kept open until
        # the request is billed (the usage backstop, ratelimit/backstop.py)
        node = headers.get(gh.NODE, "")
        admission = admission_pb2.Admission(
            request_id=headers.get("x-request-id", ""),
            tenant_id=decision.tenant_id,
            key_id=decision.key_id,
            model=model,
            body_bytes=cost.body_bytes,
            max_completion_tokens=cost.max_completion_tokens,
            node=node,
        )
        if not scopes:
            if node:  # nothing to count or wait for: sent only to be kept open until billed
                self._admitter.keep(admission)
            return Outcome(decision)
        try:
            verdict = await self._admit(admission, parent)
        except asyncio.CancelledError:
            # Envoy gave up on this Check: the request will not run, give back what it got.
            self._admitter.abandon(admission)
            raise
        if verdict is None:
            return self._degraded(decision, scopes, admission, path)
        headers_out = tuple((h.key, h.value) for h in verdict.headers)
        if not verdict.allowed:
            refused = Decision(
                code=verdict.code or "rate_limit_exceeded",
                tenant_id=decision.tenant_id,
                key_id=decision.key_id,
                key_prefix=decision.key_prefix,
            )
            retry = ("retry-after", str(max(1, verdict.retry_after_seconds)))
            return refusal(refused, path, (*headers_out, retry))
        return Outcome(decision, headers_out, reserved=verdict.reserved, admitted=admission)

    async def _admit(
        self, admission: admission_pb2.Admission, parent: TraceContext | None
    ) -> admission_pb2.Verdict | None:
        """The admission's verdict (its batch's future: nothing else waits on it), in a span of
        its own when tracing."""
        assert self._admitter is not None  # noqa: S101 - only called with an admitter
        if not TRACER.enabled:
            return await self._admitter.admit(admission)
        attributes = {"tessera.tenant_id": admission.tenant_id, "gen_ai.request.model": admission.model}
        # not made current: the HTTP transport finishes this coroutine in another context
        span = TRACER.start("ratelimit admission", parent or current_context(), attributes=attributes)
        try:
            verdict = await self._admitter.admit(admission)
        except BaseException as exc:
            TRACER.end(span, type(exc).__name__)
            raise
        if span is not None:
            span.attributes["tessera.verdict"] = (
                "none" if verdict is None else "allowed" if verdict.allowed else "refused"
            )
            TRACER.end(span)
        return verdict

    def _degraded(
        self,
        decision: Decision,
        scopes: tuple[LimitScope, ...],
        admission: admission_pb2.Admission,
        path: str,
    ) -> Outcome:
        """No verdict in time: a fail-closed limit refuses; else admitted, and counted later."""
        assert self._admitter is not None  # noqa: S101 - only called with an admitter
        if any(s.fail_closed and not s.shadow for s in scopes):
            REFUSED_DEGRADED.inc()
            self._admitter.abandon(admission)  # in case its admission lands late
            refused = Decision(
                code="rate_limit_exceeded",
                tenant_id=decision.tenant_id,
                key_id=decision.key_id,
                key_prefix=decision.key_prefix,
            )
            return refusal(refused, path, (("retry-after", str(FAIL_CLOSED_RETRY_SECONDS)),))
        DEGRADED.inc()
        self._admitter.force(admission)
        return Outcome(decision, reserved=True, admitted=admission)


def _bad_param(decision: Decision, bad: BadParam) -> Decision:
    return Decision(
        code=bad.code,
        message=bad.message,
        param=bad.param,
        tenant_id=decision.tenant_id,
        key_id=decision.key_id,
        key_prefix=decision.key_prefix,
    )
