"""Compiling policy limits and choosing the ones that apply to a request (pure)."""

from __future__ import annotations

import pytest

from ratelimit.limits import EMPTY_SNAPSHOT, snapshot_from_policy
from tessera.errors import InvalidArgumentError
from tessera.policy.v1 import policy_pb2

REQUESTS = policy_pb2.Limit.REQUESTS


def limit(limit_id: str, tenant: str = "t1", key: str = "", model: str = "", **kw) -> policy_pb2.Resource:
    kw.setdefault("kind", REQUESTS)
    kw.setdefault("window_seconds", 60)
    kw.setdefault("limit", 10)
    return policy_pb2.Resource(
        limit=policy_pb2.Limit(id=limit_id, tenant_id=tenant, key_id=key, model=model, **kw)
    )


def ids(limits) -> set[str]:
    return {lim.id for lim in limits}


@pytest.fixture
def snapshot():
    return snapshot_from_policy(
        "v1",
        [
            limit("tenant-wide"),
            limit("key-a", key="a"),
            limit("key-b", key="b"),
            limit("model-x", model="x"),
            limit("key-a-model-x", key="a", model="x"),
            limit("other-tenant", tenant="t2"),
            policy_pb2.Resource(tenant=policy_pb2.Tenant(id="t1", name="one")),
            policy_pb2.Resource(model=policy_pb2.Model(name="x")),
        ],
    )


def test_compile_keeps_limits_and_models(snapshot):
    assert snapshot.version == "v1"
    assert snapshot.size == 6
    assert set(snapshot.by_tenant) == {"t1", "t2"}


def test_compiled_fields_and_counter_key():
    snap = snapshot_from_policy(
        "v",
        [
            limit("L1", key="k9", model="m", window_seconds=3600, limit=7, shadow=True, fail_closed=True),
            limit("L2"),
        ],
    )
    (l1,) = snap.applicable("t1", "k9", "m")[1:]
    assert (l1.id, l1.tenant_id, l1.key_id, l1.model) == ("L1", "t1", "k9", "m")
    assert (l1.window_seconds, l1.limit, l1.shadow, l1.fail_closed) == (3600, 7, True, True)
    assert l1.counter_key == "{t1}:L1:k9"
    assert snap.applicable("t1", "", "")[0].counter_key == "{t1}:L2"


@pytest.mark.parametrize(
    ("key", "model", "expected"),
    [
        ("a", "x", {"tenant-wide", "key-a", "model-x", "key-a-model-x"}),
        ("a", "y", {"tenant-wide", "key-a"}),
        ("a", "", {"tenant-wide", "key-a"}),
        ("b", "x", {"tenant-wide", "key-b", "model-x"}),
        ("c", "x", {"tenant-wide", "model-x"}),
        ("c", "", {"tenant-wide"}),
        ("", "x", {"tenant-wide", "model-x"}),
        ("", "", {"tenant-wide"}),
    ],
)
def test_applicable_scoping(snapshot, key, model, expected):
    found = snapshot.applicable("t1", key, model)
    assert ids(found) == expected
    assert len(found) == len(expected)  # no limit twice


def test_other_and_unknown_tenants(snapshot):
    assert ids(snapshot.applicable("t2", "a", "x")) == {"other-tenant"}
    assert snapshot.applicable("nobody", "a", "x") == ()
    assert EMPTY_SNAPSHOT.applicable("t1", "a", "x") == ()


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (policy_pb2.Limit.REQUESTS, "requests"),
        (policy_pb2.Limit.TOKENS, "tokens"),
        (policy_pb2.Limit.SPEND, "spend"),
        (policy_pb2.Limit.CONCURRENCY, "concurrency"),
    ],
)
def test_every_kind_compiles(kind, name):
    (compiled,) = snapshot_from_policy("v", [limit("L", kind=kind, completion_weight=250)]).applicable(
        "t1", "", ""
    )
    assert compiled.kind == name
    assert (compiled.prompt_weight, compiled.completion_weight) == (100, 250)
    assert compiled.window_seconds == (0 if name == "concurrency" else 60)


@pytest.mark.parametrize("kind", [0, 99])
def test_unknown_kinds_are_skipped(kind):
    snap = snapshot_from_policy("v", [limit("L", kind=kind)])
    assert snap.size == 0
    assert snap.applicable("t1", "", "") == ()


def test_month_windows_and_quota_kinds():
    snap = snapshot_from_policy(
        "v",
        [
            limit("month", window_seconds=0),
            limit("spend", kind=policy_pb2.Limit.SPEND),
            limit("rate", kind=policy_pb2.Limit.TOKENS),
            limit("slots", kind=policy_pb2.Limit.CONCURRENCY, window_seconds=0),
        ],
    )
    quota = {lim.id: lim.is_quota for lim in snap.applicable("t1", "", "")}
    assert quota == {"month": True, "spend": True, "rate": False, "slots": False}


def test_models_carry_max_tokens_and_prices():
    snap = snapshot_from_policy(
        "v",
        [
            policy_pb2.Resource(
                model=policy_pb2.Model(
                    name="m",
                    default_max_tokens=64,
                    max_max_tokens=512,
                    input_micros=3,
                    output_micros=9,
                    currency="USD",
                )
            ),
            policy_pb2.Resource(model=policy_pb2.Model(name="free")),
        ],
    )
    assert (snap.model("m").default_max_tokens, snap.model("m").output_micros, snap.model("m").priced) == (
        64,
        9,
        True,
    )
    assert not snap.model("free").priced
    assert snap.model("unknown") == snap.model("free")


@pytest.mark.parametrize(
    ("resource", "field"),
    [
        (limit("L", tenant=""), "limit/L.tenant_id"),
        (limit(""), "limit.id"),
    ],
)
def test_invalid_limit_rejects_the_version(resource, field):
    with pytest.raises(InvalidArgumentError) as info:
        snapshot_from_policy("v", [limit("ok"), resource])
    assert info.value.field == field


def test_zero_limit_is_valid():
    snap = snapshot_from_policy("v", [limit("L", limit=0)])
    assert snap.applicable("t1", "", "")[0].limit == 0


def test_snapshot_is_immutable(snapshot):
    with pytest.raises(AttributeError):
        snapshot.version = "v2"
