"""State → policy-stream resources (pure)."""

from __future__ import annotations

from control_plane.state import State
from control_plane.validation import WINDOWS
from tessera.policy.v1 import policy_pb2
from tessera.policy_client import resource_key

_KINDS = {
    "requests": policy_pb2.Limit.REQUESTS,
    "tokens": policy_pb2.Limit.TOKENS,
    "spend": policy_pb2.Limit.SPEND,
    "concurrency": policy_pb2.Limit.CONCURRENCY,
}


def _plan_limits(state: State) -> list[policy_pb2.Limit]:
    """Each tenant's plan defaults, except where an explicit tenant-wide limit of the same
    kind and window replaces them."""
    plans = {p.name: p for p in state.plans}
    explicit = {(x.tenant_id, x.kind, x.window_seconds) for x in state.limits if not x.key_id and not x.model}
    out = []
    for t in state.tenants:
        plan = plans.get(t.plan)
        if plan is None:
            continue
        for kind, window, limit in plan.limits:
            seconds = WINDOWS.get(window)
            if seconds is None or (t.id, kind, seconds) in explicit:
                continue  # calendar-month windows arrive with the rate-limit issue
            out.append(
                policy_pb2.Limit(
                    id=f"plan.{plan.name}.{t.id}.{kind}.{window}",
                    tenant_id=t.id,
                    kind=_KINDS.get(kind, policy_pb2.Limit.KIND_UNSPECIFIED),
                    window_seconds=seconds,
                    limit=limit,
                )
            )
    return out


def policy_resources_from_state(state: State) -> dict[str, policy_pb2.Resource]:
    out: list[policy_pb2.Resource] = []
    out.extend(
        policy_pb2.Resource(
            tenant=policy_pb2.Tenant(
                id=t.id, name=t.name, suspended=t.suspended, allowed_models=t.allowed_models
            )
        )
        for t in state.tenants
    )
    out.extend(
        policy_pb2.Resource(
            api_key=policy_pb2.ApiKey(
                id=k.id,
                key_id=k.key_id,
                tenant_id=k.tenant_id,
                digest=k.digest,
                prefix=k.prefix,
                revoked=k.revoked,
                expire_time_unix=k.expires_unix,
                allowed_models=k.allowed_models,
            )
        )
        for k in state.keys
    )
    out.extend(
        policy_pb2.Resource(model=policy_pb2.Model(name=m.name, restricted=m.visibility == "restricted"))
        for m in state.models
    )
    out.extend(
        policy_pb2.Resource(
            limit=policy_pb2.Limit(
                id=lim.id,
                tenant_id=lim.tenant_id,
                key_id=lim.key_id,
                model=lim.model,
                kind=_KINDS.get(lim.kind, policy_pb2.Limit.KIND_UNSPECIFIED),
                window_seconds=lim.window_seconds,
                limit=lim.limit,
                shadow=lim.shadow,
                fail_closed=lim.fail_closed,
            )
        )
        for lim in state.limits
    )
    out.extend(policy_pb2.Resource(limit=lim) for lim in _plan_limits(state))
    return {resource_key(r): r for r in out}
