"""State → policy-stream resources (pure)."""

from __future__ import annotations

from control_plane.state import ModelState, State
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
            seconds = 0 if kind == "concurrency" else WINDOWS.get(window)
            if seconds is None or (t.id, kind, seconds) in explicit:
                continue
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


def _model(m: ModelState, now: float) -> policy_pb2.Model:
    msg = policy_pb2.Model(
        name=m.name,
        restricted=m.visibility == "restricted",
        default_max_tokens=m.default_max_tokens,
        max_max_tokens=m.max_max_tokens,
    )
    price = m.price_at(now)
    if price is not None:
        msg.input_micros = price.input_micros
        msg.output_micros = price.output_micros
        msg.cached_micros = price.cached_micros
        msg.currency = price.currency
    return msg


def policy_resources_from_state(state: State, now: float) -> dict[str, policy_pb2.Resource]:
    """``now`` picks each model's price in effect (a publish after a price's effective time
    carries it: the 5 s refresh republishes)."""
    priority = {p.name: p.priority for p in state.plans}
    out: list[policy_pb2.Resource] = []
    out.extend(
        policy_pb2.Resource(
            tenant=policy_pb2.Tenant(
                id=t.id,
                name=t.name,
                suspended=t.suspended,
                allowed_models=t.allowed_models,
                priority=priority.get(t.plan, 0),
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
    out.extend(policy_pb2.Resource(model=_model(m, now)) for m in state.models)
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
                prompt_weight=lim.prompt_weight,
                completion_weight=lim.completion_weight,
            )
        )
        for lim in state.limits
    )
    out.extend(policy_pb2.Resource(limit=lim) for lim in _plan_limits(state))
    return {resource_key(r): r for r in out}
