"""``envoy.service.auth.v3.Authorization/Check``: the only module that sees Envoy protos.

It hands the CheckRequest's headers to the ``Authorizer`` (identity, entitlement, cost,
admission) and turns its ``Outcome`` into a CheckResponse. Allow and deny are always responses
(a denial is never a gRPC error); a cancelled call returns nothing, so Envoy fails closed.

Hot path: no I/O but the batched admission; what is cached and counted: ``ext_authz.answers``.
"""

from __future__ import annotations

from typing import Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from ext_authz.answers import (
    FAIRNESS_HEADER,
    HEADERS_TO_REMOVE,
    PRIORITY_HEADER,
    RESERVED_KEY,
    Answers,
    names_tenant,
)
from ext_authz.authorize import Authorizer, Outcome
from tessera.client_errors import error_json, status_of
from tessera.clock import Clock
from tessera.endpoints import Dialect

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# google.rpc.Code values
_RPC_OK: Final = 0
_RPC_INVALID_ARGUMENT: Final = 3
_RPC_NOT_FOUND: Final = 5
_RPC_RESOURCE_EXHAUSTED: Final = 8
_RPC_UNAUTHENTICATED: Final = 16
_RPC_CODES: Final = {400: _RPC_INVALID_ARGUMENT, 401: _RPC_UNAUTHENTICATED, 404: _RPC_NOT_FOUND,
                     429: _RPC_RESOURCE_EXHAUSTED}  # fmt: skip


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def _past_deadline(context: Any) -> bool:
    """grpc.aio: whether the call's deadline (Envoy's ext_authz timeout) has passed. None: the
    sync server's threads, which keep the deadline themselves (``ext_authz/sync_grpc.py``)."""
    left = context.time_remaining() if context is not None else None
    return left is not None and left <= 0


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


def deny_response(
    code: str, message: str | None = None, dialect: Dialect = Dialect.OPENAI, param: str | None = None
) -> Any:
    http_status = status_of(code)
    resp = external_auth_pb2.CheckResponse()
    resp.status.code = _RPC_CODES.get(http_status, _RPC_NOT_FOUND)
    denied = resp.denied_response
    denied.status.code = http_status  # envoy.type.v3.StatusCode values are the HTTP codes
    denied.body = error_json(code, message, param, dialect)
    denied.headers.append(_header("content-type", "application/json"))
    if http_status == 401:  # noqa: PLR2004
        denied.headers.append(_header("www-authenticate", "Bearer"))
    return resp


class ExtAuthzServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, authorizer: Authorizer, clock: Clock) -> None:
        self._authorizer = authorizer
        self._answers: Answers[Any, Any] = Answers(
            authorizer, clock, allow=allow_response, deny=deny_response
        )

    async def Check(self, request: Any, context: Any) -> Any:
        http = request.attributes.request.http
        headers = http.headers
        outcome = await self._authorizer.authorize(headers, http.path)
        if outcome.admitted is not None and _past_deadline(context):
            # Envoy's timeout passed while the admission was answered: its answer would reach
            # nobody and the request will not run; give back what it took
            self._authorizer.abandon(outcome)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if not outcome.decision.allowed:
            return self._deny(outcome, headers.get("x-request-id", ""))
        resp = self._answers.allowed(outcome.decision)
        if not outcome.response_headers and not outcome.reserved:
            return resp
        fresh = external_auth_pb2.CheckResponse()
        fresh.CopyFrom(resp)
        fresh.ok_response.response_headers_to_add.extend(_header(k, v) for k, v in outcome.response_headers)
        if outcome.reserved:
            fresh.dynamic_metadata.fields[RESERVED_KEY].string_value = "1"
        return fresh

    def _deny(self, outcome: Outcome, request_id: str) -> Any:
        resp = self._answers.refused(outcome, request_id)
        if resp is not None:
            return resp
        decision = outcome.decision
        resp = deny_response(decision.code, decision.message, outcome.dialect, decision.param)
        resp.denied_response.headers.extend(_header(k, v) for k, v in outcome.response_headers)
        if names_tenant(decision):  # an authenticated tenant's refusal: its usage line says so
            fields = resp.dynamic_metadata.fields
            fields["tenant_id"].string_value = decision.tenant_id
            fields["key_id"].string_value = decision.key_id
        return resp
