"""``envoy.service.auth.v3.Authorization/Check``: the only module that sees Envoy protos.

It hands the CheckRequest's headers to the ``Authorizer`` (identity, entitlement, cost,
admission) and turns its ``Outcome`` into a CheckResponse. Allow and deny are always responses
(a denial is never a gRPC error); a cancelled call returns nothing, so Envoy fails closed.

Hot path: no I/O but the batched admission. Denial responses with a fixed body are built once
at import; an allow without limit headers depends only on (tenant_id, key_id, priority) and is
built once per key per index, so the cache is bounded by the keys in the current snapshot.
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from prometheus_client import Counter

from ext_authz.authorize import Authorizer, Outcome
from ext_authz.key_index import KeyIndex
from ext_authz.pipeline import SUSPENDED_MESSAGE, Decision
from tessera import gateway_headers
from tessera.clock import Clock
from tessera.log_sampling import LogSampler
from tessera.openai_errors import ERRORS, error_json, status_of

log = structlog.get_logger("ext_authz")

DECISIONS = Counter("tessera_authz_decisions", "ext_authz decisions", ["result"])

HEADERS_TO_REMOVE: Final = (*gateway_headers.CREDENTIALS, *gateway_headers.SET_BY_GATEWAY)
RESERVED_KEY: Final = "reserved"  # dynamic metadata: the meter settles this request at its end
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# google.rpc.Code values
_RPC_OK: Final = 0
_RPC_INVALID_ARGUMENT: Final = 3
_RPC_NOT_FOUND: Final = 5
_RPC_RESOURCE_EXHAUSTED: Final = 8
_RPC_UNAUTHENTICATED: Final = 16
_RPC_CODES: Final = {400: _RPC_INVALID_ARGUMENT, 401: _RPC_UNAUTHENTICATED, 404: _RPC_NOT_FOUND,
                     429: _RPC_RESOURCE_EXHAUSTED}  # fmt: skip

_ATTRIBUTED: Final = (400, 429)  # refusals of an authenticated caller's request
_ALLOW_COUNT = DECISIONS.labels("allow")
ALLOW_CACHE_MAX: Final = 65_536
_DENY_COUNT = {code: DECISIONS.labels(code) for code in ERRORS}


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


FAIRNESS_HEADER: Final = "x-gateway-inference-fairness-id"  # Gateway API Inference Extension / llm-d
PRIORITY_HEADER: Final = "x-tessera-priority"  # the plan's priority, for schedulers that take a hint


def allow_response(tenant_id: str, key_id: str, priority: int = 0) -> Any:
    """Identity and scheduling headers, always ours (they overwrite anything the client sent)."""
    resp = external_auth_pb2.CheckResponse()
    resp.status.code = _RPC_OK
    ok = resp.ok_response
    ok.headers.extend(
        (
            _header("x-tenant-id", tenant_id),
            _header("x-key-id", key_id),
            _header(FAIRNESS_HEADER, tenant_id),
            _header(PRIORITY_HEADER, str(priority)),
        )
    )
    ok.headers_to_remove.extend(HEADERS_TO_REMOVE)
    # Envoy puts this in namespace envoy.filters.http.ext_authz for the access log.
    fields = resp.dynamic_metadata.fields
    fields["tenant_id"].string_value = tenant_id
    fields["key_id"].string_value = key_id
    return resp


def deny_response(code: str, message: str | None = None, param: str | None = None) -> Any:
    http_status = status_of(code)
    resp = external_auth_pb2.CheckResponse()
    resp.status.code = _RPC_CODES.get(http_status, _RPC_NOT_FOUND)
    denied = resp.denied_response
    denied.status.code = http_status  # envoy.type.v3.StatusCode values are the HTTP codes
    denied.body = error_json(code, message, param)
    denied.headers.append(_header("content-type", "application/json"))
    if http_status == 401:  # noqa: PLR2004
        denied.headers.append(_header("www-authenticate", "Bearer"))
    return resp


_FIXED_DENIALS: Final = {
    (code, message): deny_response(code, message)
    for code, message in (
        ("missing_api_key", None),
        ("invalid_api_key", None),
        ("invalid_api_key", SUSPENDED_MESSAGE),
        ("api_key_revoked", None),
        ("api_key_expired", None),
    )
}


class ExtAuthzServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, authorizer: Authorizer, clock: Clock) -> None:
        self._authorizer = authorizer
        self._allow_cache: dict[tuple[str, str, int], Any] = {}
        self._cached_index: KeyIndex | None = None
        self._log_sampler = LogSampler(clock=clock)

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: ARG002 - gRPC's signature
        http = request.attributes.request.http
        headers = http.headers
        outcome = await self._authorizer.authorize(headers, http.path)
        decision = outcome.decision
        if not decision.allowed:
            return self._deny(outcome, headers.get("x-request-id", ""))
        _ALLOW_COUNT.inc()
        if self._cached_index is not self._authorizer.index:
            # Cached allows depend only on (tenant_id, key_id, priority), so they are never
            # stale; dropping them per snapshot keeps the cache bounded by its keys.
            self._cached_index = self._authorizer.index
            self._allow_cache = {}
        ident = (decision.tenant_id, decision.key_id, decision.priority)
        resp = self._allow_cache.get(ident)
        if resp is None:
            if len(self._allow_cache) >= ALLOW_CACHE_MAX:  # bounded, whatever the key count
                self._allow_cache.clear()
            resp = self._allow_cache[ident] = allow_response(*ident)
        if not outcome.response_headers and not outcome.reserved:
            return resp
        fresh = external_auth_pb2.CheckResponse()
        fresh.CopyFrom(resp)
        fresh.ok_response.response_headers_to_add.extend(_header(k, v) for k, v in outcome.response_headers)
        if outcome.reserved:
            fresh.dynamic_metadata.fields[RESERVED_KEY].string_value = "1"
        return fresh

    def _deny(self, outcome: Outcome, request_id: str) -> Any:
        decision: Decision = outcome.decision
        code = decision.code
        _DENY_COUNT[code].inc()
        suppressed = self._log_sampler.admit()
        if suppressed is not None:  # a flood of bad keys must not become a flood of log lines
            log.info(
                "authz_denied",
                code=code,
                key_prefix=decision.key_prefix,
                tenant_id=decision.tenant_id,
                request_id=request_id,
                suppressed=suppressed,
            )
        attributed = decision.tenant_id and status_of(code) in _ATTRIBUTED
        if not attributed:
            resp = _FIXED_DENIALS.get((code, decision.message))
            if resp is not None:
                return resp
        resp = deny_response(code, decision.message, decision.param)
        resp.denied_response.headers.extend(_header(k, v) for k, v in outcome.response_headers)
        if attributed:  # an authenticated tenant's refusal: its usage line (a ledger row) says so
            fields = resp.dynamic_metadata.fields
            fields["tenant_id"].string_value = decision.tenant_id
            fields["key_id"].string_value = decision.key_id
        return resp
