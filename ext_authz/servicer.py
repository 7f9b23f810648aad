"""``envoy.service.auth.v3.Authorization/Check``: the only module that sees Envoy protos.

It reads headers and the ``ai.gw`` model out of the CheckRequest, asks the pure
pipeline for a Decision against the current KeyIndex, and turns the Decision
into a CheckResponse. Allow and deny are always responses (a denial is never a
gRPC error); a cancelled call returns nothing, so Envoy fails closed.

Hot path: no I/O. Denial responses with a fixed body are built once at import;
an allow response depends only on (tenant_id, key_id) and is built once per
key per index, so the cache is bounded by the keys in the current snapshot.
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from prometheus_client import Counter

from ext_authz.key_index import EMPTY_INDEX, KeyIndex
from ext_authz.pipeline import SUSPENDED_MESSAGE, Decision, decide
from tessera.clock import Clock
from tessera.log_sampling import LogSampler
from tessera.openai_errors import error_json, status_of

log = structlog.get_logger("ext_authz")

DECISIONS = Counter("tessera_authz_decisions", "ext_authz decisions", ["result"])

MODEL_NAMESPACE: Final = "ai.gw"
ROUTE_NAMESPACE: Final = "tessera"
JWT_NAMESPACE: Final = "envoy.filters.http.jwt_authn"  # only ever written by Envoy after verification
JWT_PAYLOAD_KEY: Final = "jwt_payload"
HEADERS_TO_REMOVE: Final = ("authorization", "x-api-key")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# google.rpc.Code values
_RPC_OK: Final = 0
_RPC_NOT_FOUND: Final = 5
_RPC_UNAUTHENTICATED: Final = 16
_DENY_CODES: Final = (
    "missing_api_key",
    "invalid_api_key",
    "api_key_revoked",
    "api_key_expired",
    "model_not_found",
)

_ALLOW_COUNT = DECISIONS.labels("allow")
ALLOW_CACHE_MAX: Final = 65_536
_DENY_COUNT = {code: DECISIONS.labels(code) for code in _DENY_CODES}


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
    # Envoy puts this in namespace envoy.filters.http.ext_authz for ratelimit and the access log.
    fields = resp.dynamic_metadata.fields
    fields["tenant_id"].string_value = tenant_id
    fields["key_id"].string_value = key_id
    return resp


def deny_response(code: str, message: str | None = None, param: str | None = None) -> Any:
    http_status = status_of(code)
    resp = external_auth_pb2.CheckResponse()
    resp.status.code = _RPC_UNAUTHENTICATED if http_status == 401 else _RPC_NOT_FOUND  # noqa: PLR2004
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


def _string_field(metadata: Any, namespace: str, key: str) -> str | None:
    meta = metadata.filter_metadata.get(namespace)
    if meta is None:
        return None
    value = meta.fields.get(key)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    return str(value.string_value)


def model_of(attributes: Any) -> str | None:
    """The model the request is for: the served model named by its route (an alias resolved,
    or ``/v1/realtime``'s ``?model=``), else the body's model as Envoy read it (an unknown
    model has no route of its own), else None."""
    served = _string_field(attributes.route_metadata_context, ROUTE_NAMESPACE, "model")
    if served is not None:
        return served
    return _string_field(attributes.metadata_context, MODEL_NAMESPACE, "model")


def jwt_key_id_of(attributes: Any) -> str | None:
    """The ``key_id`` claim of a JWT that Envoy's jwt_authn verified (its ``payload_in_metadata``)."""
    meta = attributes.metadata_context.filter_metadata.get(JWT_NAMESPACE)
    if meta is None:
        return None
    payload = meta.fields.get(JWT_PAYLOAD_KEY)
    if payload is None or payload.WhichOneof("kind") != "struct_value":
        return None
    value = payload.struct_value.fields.get("key_id")
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    return str(value.string_value) or None


class ExtAuthzServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, pepper: bytes, clock: Clock) -> None:
        self._pepper = pepper
        self._clock = clock
        self._index = EMPTY_INDEX
        self._allow_cache: dict[tuple[str, str, int], Any] = {}
        self._log_sampler = LogSampler(clock=clock)

    @property
    def index(self) -> KeyIndex:
        return self._index

    def swap_index(self, index: KeyIndex) -> None:
        """Install a new snapshot: one assignment, so a Check sees the old or the new one."""
        self._index = index
        # Cached allow responses depend only on (tenant_id, key_id), so they are never stale;
        # dropping them keeps the cache bounded by the keys of the current snapshot.
        self._allow_cache = {}

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: ARG002 - gRPC's signature
        attributes = request.attributes
        headers = attributes.request.http.headers
        decision = decide(
            headers,
            model_of(attributes),
            self._index,
            pepper=self._pepper,
            now=self._clock.now(),
            jwt_key_id=jwt_key_id_of(attributes),
        )
        if decision.allowed:
            _ALLOW_COUNT.inc()
            ident = (decision.tenant_id, decision.key_id, decision.priority)
            resp = self._allow_cache.get(ident)
            if resp is None:
                if len(self._allow_cache) >= ALLOW_CACHE_MAX:  # bounded, whatever the key count
                    self._allow_cache.clear()
                resp = self._allow_cache[ident] = allow_response(*ident)
            return resp
        return self._deny(decision, headers.get("x-request-id", ""))

    def _deny(self, decision: Decision, request_id: str) -> Any:
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
        resp = _FIXED_DENIALS.get((code, decision.message))
        if resp is None:
            resp = deny_response(code, decision.message, decision.param)
        return resp
