"""Policy ``Limit`` and ``Model`` resources → an immutable snapshot. Pure.

A limit applies to (tenant T, key K, model M) when its tenant is T, its key is empty or K,
and its model is empty or M. Models carry what reservations need: default and maximum
``max_tokens`` and the price in effect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from ratelimit.backends.base import counter_key
from tessera.errors import InvalidArgumentError
from tessera.policy.v1 import policy_pb2

Scope = tuple[str, str]  # (key_id, model); "" is "any"
_ANY: Scope = ("", "")


REQUESTS: Final = "requests"
TOKENS: Final = "tokens"
SPEND: Final = "spend"
CONCURRENCY: Final = "concurrency"
_KINDS: Final = {
    policy_pb2.Limit.REQUESTS: REQUESTS,
    policy_pb2.Limit.TOKENS: TOKENS,
    policy_pb2.Limit.SPEND: SPEND,
    policy_pb2.Limit.CONCURRENCY: CONCURRENCY,
}


@dataclass(frozen=True, slots=True)
class RequestLimit:
    """One limit of any kind (the name is historical: request limits came first)."""

    id: str
    tenant_id: str
    key_id: str
    model: str
    window_seconds: int  # 0: the calendar month (UTC); unused for concurrency
    limit: int
    shadow: bool
    fail_closed: bool
    counter_key: str
    """Tenant, limit id and (for key-scoped limits) key id; never the limit value, so
    changing ``limit`` keeps the count."""
    kind: str = REQUESTS
    prompt_weight: int = 100  # tokens: percent
    completion_weight: int = 100

    @property
    def is_quota(self) -> bool:
        """Spend, or anything per calendar month: exhausting it is insufficient_quota, not a rate."""
        return self.kind == SPEND or (self.kind != CONCURRENCY and self.window_seconds == 0)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    default_max_tokens: int = 0
    max_max_tokens: int = 0
    input_micros: int = 0  # per 1M tokens
    output_micros: int = 0
    cached_micros: int = 0
    priced: bool = False


NO_MODEL_INFO = ModelInfo()


@dataclass(frozen=True, slots=True)
class LimitSnapshot:
    version: str = ""
    by_tenant: Mapping[str, Mapping[Scope, tuple[RequestLimit, ...]]] = field(default_factory=dict)
    """Plain dicts typed read-only: never mutated after compile (cheaper lookups than a proxy)."""
    size: int = 0
    models: Mapping[str, ModelInfo] = field(default_factory=dict)

    def model(self, name: str) -> ModelInfo:
        return self.models.get(name, NO_MODEL_INFO)

    def applicable(self, tenant_id: str, key_id: str, model: str) -> tuple[RequestLimit, ...]:
        scopes = self.by_tenant.get(tenant_id)
        if scopes is None:
            return ()
        found = scopes.get(_ANY, ())
        if key_id:
            found += scopes.get((key_id, ""), ())
            if model:
                found += scopes.get((key_id, model), ())
        if model:
            found += scopes.get(("", model), ())
        return found


EMPTY_SNAPSHOT = LimitSnapshot()


def request_limit_from_proto(msg: policy_pb2.Limit) -> RequestLimit:
    where = f"limit/{msg.id}"
    if not msg.id:
        raise InvalidArgumentError("limit.id", "must not be empty")
    if not msg.tenant_id:
        raise InvalidArgumentError(f"{where}.tenant_id", "must not be empty")
    kind = _KINDS[msg.kind]
    return RequestLimit(
        id=msg.id,
        tenant_id=msg.tenant_id,
        key_id=msg.key_id,
        model=msg.model,
        window_seconds=0 if kind == CONCURRENCY else msg.window_seconds,
        limit=msg.limit,
        shadow=msg.shadow,
        fail_closed=msg.fail_closed,
        counter_key=counter_key(msg.tenant_id, msg.id, msg.key_id),
        kind=kind,
        prompt_weight=msg.prompt_weight or 100,
        completion_weight=msg.completion_weight or 100,
    )


def _model_info(msg: policy_pb2.Model) -> ModelInfo:
    return ModelInfo(
        default_max_tokens=msg.default_max_tokens,
        max_max_tokens=msg.max_max_tokens,
        input_micros=msg.input_micros,
        output_micros=msg.output_micros,
        cached_micros=msg.cached_micros,
        priced=bool(msg.currency),
    )


def snapshot_from_policy(version: str, resources: Iterable[policy_pb2.Resource]) -> LimitSnapshot:
    """Compile every limit and model; an invalid limit rejects the whole version (the old stays)."""
    grouped: dict[str, dict[Scope, list[RequestLimit]]] = {}
    models: dict[str, ModelInfo] = {}
    size = 0
    for resource in resources:
        kind = resource.WhichOneof("kind")
        if kind == "model":
            models[resource.model.name] = _model_info(resource.model)
            continue
        if kind != "limit" or resource.limit.kind not in _KINDS:
            continue  # a kind this version does not know (a newer control plane) is skipped
        limit = request_limit_from_proto(resource.limit)
        grouped.setdefault(limit.tenant_id, {}).setdefault((limit.key_id, limit.model), []).append(limit)
        size += 1
    by_tenant = {
        tenant: {scope: tuple(sorted(items, key=lambda x: x.id)) for scope, items in scopes.items()}
        for tenant, scopes in grouped.items()
    }
    return LimitSnapshot(version=version, by_tenant=by_tenant, size=size, models=models)
