"""Policy ``Limit`` resources → an immutable snapshot; the limits that apply to a request. Pure.

A limit applies to (tenant T, key K, model M) when its tenant is T, its key is empty or K,
and its model is empty or M. Only ``REQUESTS`` limits are compiled today; other kinds are
left for the token and spend descriptors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ratelimit.backends.base import counter_key
from tessera.errors import InvalidArgumentError
from tessera.policy.v1 import policy_pb2

Scope = tuple[str, str]  # (key_id, model); "" is "any"
_ANY: Scope = ("", "")


@dataclass(frozen=True, slots=True)
class RequestLimit:
    id: str
    tenant_id: str
    key_id: str
    model: str
    window_seconds: int
    limit: int
    shadow: bool
    fail_closed: bool
    counter_key: str
    """Tenant, limit id and (for key-scoped limits) key id; never the limit value, so
    changing ``limit`` keeps the count."""


@dataclass(frozen=True, slots=True)
class LimitSnapshot:
    version: str = ""
    by_tenant: Mapping[str, Mapping[Scope, tuple[RequestLimit, ...]]] = field(default_factory=dict)
    """Plain dicts typed read-only: never mutated after compile (cheaper lookups than a proxy)."""
    size: int = 0

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
    if msg.window_seconds < 1:
        raise InvalidArgumentError(f"{where}.window_seconds", "must be at least 1")
    return RequestLimit(
        id=msg.id,
        tenant_id=msg.tenant_id,
        key_id=msg.key_id,
        model=msg.model,
        window_seconds=msg.window_seconds,
        limit=msg.limit,
        shadow=msg.shadow,
        fail_closed=msg.fail_closed,
        counter_key=counter_key(msg.tenant_id, msg.id, msg.key_id),
    )


def snapshot_from_policy(version: str, resources: Iterable[policy_pb2.Resource]) -> LimitSnapshot:
    """Compile every REQUESTS limit; an invalid one rejects the whole version (the old stays)."""
    grouped: dict[str, dict[Scope, list[RequestLimit]]] = {}
    size = 0
    for resource in resources:
        if resource.WhichOneof("kind") != "limit" or resource.limit.kind != policy_pb2.Limit.REQUESTS:
            continue
        limit = request_limit_from_proto(resource.limit)
        grouped.setdefault(limit.tenant_id, {}).setdefault((limit.key_id, limit.model), []).append(limit)
        size += 1
    by_tenant = {
        tenant: {scope: tuple(sorted(items, key=lambda x: x.id)) for scope, items in scopes.items()}
        for tenant, scopes in grouped.items()
    }
    return LimitSnapshot(version=version, by_tenant=by_tenant, size=size)
