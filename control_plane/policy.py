"""State → policy-stream resources (pure)."""

from __future__ import annotations

from control_plane.state import State
from tessera.policy.v1 import policy_pb2
from tessera.policy_client import resource_key

_KINDS = {
    "requests": policy_pb2.Limit.REQUESTS,
    "tokens": policy_pb2.Limit.TOKENS,
    "spend": policy_pb2.Limit.SPEND,
    "concurrency": policy_pb2.Limit.CONCURRENCY,
}


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
    return {resource_key(r): r for r in out}
