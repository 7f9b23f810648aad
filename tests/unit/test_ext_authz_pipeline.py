"""ext_authz decision rules on plain values (no I/O, FakeClock)."""

from __future__ import annotations

import base64
import json

import pytest

from ext_authz.authorize import jwt_key_id
from ext_authz.key_index import EMPTY_INDEX, KeyIndex, LimitScope, ModelTokens, key_index_from_policy
from ext_authz.pipeline import SUSPENDED_MESSAGE, credential_from_headers, decide
from ext_authz.request_facts import BadParam, Cost, request_cost
from tessera.clock import FakeClock
from tessera.errors import InvalidArgumentError
from tessera.keys import digest, display_prefix, mint_key
from tessera.policy.v1 import policy_pb2

PEPPER = b"p" * 32
KEY = mint_key().key
OTHER_KEY = mint_key().key


def api_key(key: str, *, secret_id: str = "s1", key_id: str = "k1", tenant: str = "t1", **kw):  # noqa: S107
    return policy_pb2.Resource(
        api_key=policy_pb2.ApiKey(
            id=secret_id,
            key_id=key_id,
            tenant_id=tenant,
            digest=digest(PEPPER, key),
            prefix=display_prefix(key),
            **kw,
        )
    )


def tenant(tid: str = "t1", **kw):
    return policy_pb2.Resource(tenant=policy_pb2.Tenant(id=tid, name=tid, **kw))


def model(name: str, *, restricted: bool = False):
    return policy_pb2.Resource(model=policy_pb2.Model(name=name, restricted=restricted))


def index_of(*resources: policy_pb2.Resource) -> KeyIndex:
    return key_index_from_policy(resources, version="v1")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def index():
    return index_of(
        api_key(KEY),
        tenant(),
        model("public-a"),
        model("public-b"),
        model("secret-m", restricted=True),
    )


def run(index, clock, *, headers=None, model=None, key=KEY):
    if headers is None:
        headers = {"authorization": f"Bearer {key}"}
    return decide(headers, model, index, pepper=PEPPER, now=clock.now())


# --- credentials ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": f"Bearer {KEY}"},
        {"authorization": f"bearer {KEY}"},
        {"authorization": f"BEARER {KEY}"},
        {"authorization": f"  Bearer   {KEY}  "},
        {"x-api-key": KEY},
        {"authorization": "Basic dXNlcjpwYXNz", "x-api-key": KEY},
    ],
)
def test_credential_forms_allow(index, clock, headers):
    d = run(index, clock, headers=headers)
    assert d.allowed
    assert (d.tenant_id, d.key_id, d.key_prefix) == ("t1", "k1", display_prefix(KEY))


def test_bearer_wins_over_x_api_key():
    assert credential_from_headers({"authorization": "Bearer a", "x-api-key": "b"}) == "a"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": ""},
        {"authorization": "Bearer "},
        {"authorization": "Basic abc"},
        {"x-api-key": ""},
    ],
)
def test_missing_key(index, clock, headers):
    d = run(index, clock, headers=headers)
    assert not d.allowed
    assert d.code == "missing_api_key"


@pytest.mark.parametrize("bad", ["sk-abc", "tsk_short_x", KEY + "x", KEY.upper(), "Bearer"])
def test_malformed_key_is_invalid_and_not_logged(index, clock, bad):
    d = run(index, clock, headers={"x-api-key": bad})
    assert d.code == "invalid_api_key"
    assert d.message is None
    assert d.key_prefix == ""  # nothing of a foreign credential is kept


def test_unknown_key(index, clock):
    d = run(index, clock, key=OTHER_KEY)
    assert d.code == "invalid_api_key"
    assert d.key_prefix == display_prefix(OTHER_KEY)
    assert d.tenant_id == ""


def test_wrong_pepper_is_unknown(index, clock):
    d = decide({"x-api-key": KEY}, None, index, pepper=b"q" * 32, now=clock.now())
    assert d.code == "invalid_api_key"


def test_empty_index_refuses(clock):
    assert run(EMPTY_INDEX, clock).code == "invalid_api_key"


# --- key and tenant state ---------------------------------------------------------------


def test_revoked(clock):
    idx = index_of(api_key(KEY, revoked=True), tenant())
    d = run(idx, clock)
    assert (d.code, d.tenant_id, d.key_id) == ("api_key_revoked", "t1", "k1")


def test_revoked_wins_over_expired(clock):
    idx = index_of(api_key(KEY, revoked=True, expire_time_unix=1), tenant())
    assert run(idx, clock).code == "api_key_revoked"


def test_expiry(clock):
    expires = int(clock.now()) + 10
    idx = index_of(api_key(KEY, expire_time_unix=expires), tenant())
    assert run(idx, clock).allowed
    clock.advance(9.5)
    assert run(idx, clock).allowed
    clock.advance(0.5)  # now == expiry
    assert run(idx, clock).code == "api_key_expired"


def test_zero_expiry_is_never(clock):
    idx = index_of(api_key(KEY, expire_time_unix=0), tenant())
    clock.advance(10 * 365 * 86400)
    assert run(idx, clock).allowed


def test_suspended_tenant(clock):
    idx = index_of(api_key(KEY), tenant(suspended=True))
    d = run(idx, clock)
    assert (d.code, d.message, d.tenant_id) == ("invalid_api_key", SUSPENDED_MESSAGE, "t1")


def test_missing_tenant(clock):
    idx = index_of(api_key(KEY, tenant="gone"), tenant())
    d = run(idx, clock)
    assert (d.code, d.message) == ("invalid_api_key", None)


# --- model entitlement ------------------------------------------------------------------


@pytest.mark.parametrize("m", [None, "", ":missing", ":invalid", "public-a", "not-in-registry"])
def test_unrestricted_tenant_and_key(index, clock, m):
    assert run(index, clock, model=m).allowed


def test_restricted_model_needs_tenant_entitlement(index, clock):
    d = run(index, clock, model="secret-m")
    assert d.code == "model_not_found"
    assert d.param == "model"
    assert d.message == "The model `secret-m` does not exist or you do not have access to it."
    idx = index_of(
        api_key(KEY), tenant(allowed_models=["secret-m", "public-a"]), model("secret-m", restricted=True)
    )
    assert run(idx, clock, model="secret-m").allowed


def test_tenant_allow_list(clock):
    idx = index_of(api_key(KEY), tenant(allowed_models=["public-a"]), model("public-a"), model("public-b"))
    assert run(idx, clock, model="public-a").allowed
    assert run(idx, clock, model="public-b").code == "model_not_found"
    assert run(idx, clock, model="not-in-registry").code == "model_not_found"
    assert run(idx, clock, model=None).allowed  # e.g. GET /v1/models
    assert run(idx, clock, model=":missing").allowed


def test_key_allow_list(clock):
    idx = index_of(api_key(KEY, allowed_models=["public-b"]), tenant(), model("public-a"), model("public-b"))
    assert run(idx, clock, model="public-b").allowed
    d = run(idx, clock, model="public-a")
    assert (d.code, d.tenant_id, d.key_id) == ("model_not_found", "t1", "k1")


def test_key_allow_list_does_not_grant_restricted(clock):
    idx = index_of(api_key(KEY, allowed_models=["secret-m"]), tenant(), model("secret-m", restricted=True))
    assert run(idx, clock, model="secret-m").code == "model_not_found"


def test_both_lists_must_allow(clock):
    idx = index_of(
        api_key(KEY, allowed_models=["public-a", "public-b"]),
        tenant(allowed_models=["public-b"]),
    )
    assert run(idx, clock, model="public-b").allowed
    assert run(idx, clock, model="public-a").code == "model_not_found"


def test_key_state_checked_before_model(clock):
    idx = index_of(api_key(KEY, revoked=True), tenant(allowed_models=["x"]))
    assert run(idx, clock, model="y").code == "api_key_revoked"


# --- compile ----------------------------------------------------------------------------


def test_compile_indexes_everything(index):
    assert index.version == "v1"
    entry = index.key(digest(PEPPER, KEY))
    assert (entry.key_id, entry.tenant_id, entry.revoked, entry.expire_time_unix) == ("k1", "t1", False, 0)
    assert len(index) == 1
    assert index.key(digest(PEPPER, OTHER_KEY)) is None
    assert index.tenants["t1"].allowed_models == frozenset()
    assert index.public_models == {"public-a", "public-b"}
    assert index.restricted_models == {"secret-m"}


def test_compile_is_immutable(index):
    with pytest.raises(TypeError):
        index.tenants["t2"] = index.tenants["t1"]  # type: ignore[index]


def test_compile_rejects_bad_digest():
    bad = policy_pb2.Resource(api_key=policy_pb2.ApiKey(id="s", key_id="k", tenant_id="t", digest=b"short"))
    with pytest.raises(InvalidArgumentError, match="digest"):
        key_index_from_policy([bad])


def test_compile_rejects_duplicate_digest():
    with pytest.raises(InvalidArgumentError, match="same digest"):
        index_of(api_key(KEY, secret_id="a"), api_key(KEY, secret_id="b"))


def test_compile_rejects_a_delete_that_is_not_a_digest():
    with pytest.raises(InvalidArgumentError, match="hex digest"):
        key_index_from_policy([], ["api_key/s1"], previous=index_of(api_key(KEY)))


def test_compile_keeps_each_limits_scope_and_fail_mode_and_models_token_terms():
    lims = [
        policy_pb2.Resource(limit=policy_pb2.Limit(id="l1", tenant_id="t1")),
        policy_pb2.Resource(limit=policy_pb2.Limit(id="l2", tenant_id="t1", key_id="k2", fail_closed=True)),
        policy_pb2.Resource(limit=policy_pb2.Limit(id="l3", tenant_id="t1", model="m", shadow=True)),
        policy_pb2.Resource(limit=policy_pb2.Limit(id="l4", tenant_id="t2")),
    ]
    m = policy_pb2.Resource(model=policy_pb2.Model(name="m", default_max_tokens=64, max_max_tokens=512))
    idx = key_index_from_policy([*lims, m])
    assert len(idx) == 0  # limits are no keys
    assert idx.limits["l2"] == LimitScope("l2", "t1", "k2", "", fail_closed=True, shadow=False)
    # Whom each applies to: key "" / model "" = any.
    assert [s.limit_id for s in idx.limits_for("t1", "k1", "m")] == ["l1", "l3"]
    assert [s.limit_id for s in idx.limits_for("t1", "k2", "other")] == ["l1", "l2"]
    assert idx.limits_for("t3", "k1", "m") == ()  # no limit: nothing to admit
    assert idx.model_tokens["m"] == ModelTokens(default=64, cap=512)
    # Deltas replace and delete limits (and a model's terms go with it).
    changed = key_index_from_policy(
        [policy_pb2.Resource(limit=policy_pb2.Limit(id="l1", tenant_id="t1", model="x"))],
        ["limit/l3", "model/m"],
        previous=idx,
    )
    assert [s.limit_id for s in changed.limits_for("t1", "k1", "m")] == []
    assert [s.limit_id for s in changed.limits_for("t1", "k1", "x")] == ["l1"]
    assert "m" not in changed.model_tokens
    assert [s.limit_id for s in idx.limits_for("t1", "k1", "m")] == ["l1", "l3"]  # the old is untouched


# --- what a request may cost (the facts the gateway's Lua filter put in headers) ------------


def facts(path: str = "/v1/chat/completions", tokens: ModelTokens | None = None, **headers: str):
    return request_cost({f"x-tessera-{k.replace('_', '-')}": v for k, v in headers.items()}, path, tokens)


def test_the_cost_is_the_body_size_and_max_tokens_times_the_choices():
    assert facts(body_bytes="321", max_tokens="20") == Cost(321, 20)
    assert facts(max_tokens="20", n="3") == Cost(0, 60)  # 20 x 3
    assert facts(max_tokens="20", n="2", best_of="5") == Cost(0, 100)  # 20 x max(2, 5)
    # both names given: the larger bounds what the backend may generate
    assert facts(max_tokens="20", max_completion_tokens="30") == Cost(0, 30)
    # none given (the gateway writes the default into chat/completions bodies, so this is
    # another endpoint, which may generate up to): the model's cap
    assert facts(tokens=ModelTokens(default=64, cap=512)) == Cost(0, 512)
    assert facts() == Cost(0, 32_768)  # no cap of its own: the platform's
    assert facts("/v1/embeddings", ModelTokens(cap=512)) == Cost(0, 0)  # generates nothing
    assert facts(body_bytes="junk", max_tokens="1") == Cost(0, 1)  # never a client's: 0, not an error


@pytest.mark.parametrize(
    ("headers", "code", "param"),
    [
        ({"max_tokens": "513"}, "integer_above_max_value", "max_tokens"),
        ({"max_completion_tokens": "513"}, "integer_above_max_value", "max_completion_tokens"),
        ({"max_tokens": '"10"'}, "invalid_value", "max_tokens"),
        ({"max_tokens": "10.5"}, "invalid_value", "max_tokens"),
        ({"max_tokens": "false"}, "invalid_value", "max_tokens"),
        ({"max_tokens": "0"}, "invalid_value", "max_tokens"),
        ({"n": "0"}, "invalid_value", "n"),
        ({"n": "129"}, "integer_above_max_value", "n"),
        ({"best_of": "-1"}, "invalid_value", "best_of"),
    ],
)
def test_a_parameter_out_of_its_bounds_is_named(headers, code, param):
    bad = facts(tokens=ModelTokens(default=64, cap=512), **headers)
    assert isinstance(bad, BadParam)
    assert (bad.code, bad.param) == (code, param)


def test_integral_json_numbers_and_null_are_accepted():
    capped = ModelTokens(cap=512)
    assert facts(tokens=capped, max_tokens="512") == Cost(0, 512)  # at the cap
    assert facts(tokens=capped, max_tokens="1e2") == Cost(0, 100)
    assert facts(tokens=capped, max_tokens="100.0") == Cost(0, 100)
    assert facts(tokens=capped, max_tokens="null", max_completion_tokens="7") == Cost(0, 7)


def test_the_jwt_payload_header_yields_its_key_id_claim():
    def b64(value) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    assert jwt_key_id(b64({"sub": "svc", "key_id": "k1"})) == "k1"
    assert jwt_key_id(b64({"key_id": "k-\u00e9" * 3})) == "k-\u00e9" * 3  # any padding length
    for bad in (None, "", "!!!", b64(["k1"]), b64({"key_id": 7}), b64({"key_id": ""}), b64({"sub": "s"})):
        assert jwt_key_id(bad) is None


def test_deltas_upsert_and_delete_every_kind():
    d1, d2 = digest(PEPPER, KEY), digest(PEPPER, OTHER_KEY)
    first = index_of(api_key(KEY), api_key(OTHER_KEY, secret_id="s2", key_id="k2"), tenant(), model("m"))
    second = key_index_from_policy(
        [
            api_key(OTHER_KEY, secret_id="s2", key_id="k2", revoked=True),
            tenant("t2"),
            model("m", restricted=True),
        ],
        version="2",
        previous=first,
    )
    assert second.key(d2).revoked
    assert not first.key(d2).revoked  # the old index is untouched
    assert second.key(d1) == first.key(d1)
    assert set(second.tenants) == {"t1", "t2"}
    assert (second.public_models, second.restricted_models) == (frozenset(), {"m"})
    third = key_index_from_policy(
        [], [f"api_key/{d1.hex()}", "tenant/t1", "model/m"], version="3", previous=second
    )
    assert third.key(d1) is None
    assert third.key_for_id("k1") is None
    assert len(third) == 1
    assert set(third.tenants) == {"t2"}
    assert not third.public_models
    assert not third.restricted_models
    # a full snapshot (previous=None) replaces everything
    fresh = key_index_from_policy([api_key(KEY)], version="4")
    assert fresh.key(d1) is not None
    assert fresh.key(d2) is None
    assert len(fresh) == 1


def test_deltas_on_an_index_without_keys_keep_its_tenants(clock):
    first = index_of(tenant())  # no keys yet: the index is empty but not blank
    second = key_index_from_policy([api_key(KEY)], previous=first)
    assert run(second, clock).allowed


def test_overlay_compaction_keeps_every_key(monkeypatch):
    import ext_authz.key_index as ki  # noqa: PLC0415

    monkeypatch.setattr(ki, "COMPACT_AT", 4)
    keys = [mint_key().key for _ in range(12)]
    idx = index_of(*(api_key(k, secret_id=f"s{i}", key_id=f"k{i}") for i, k in enumerate(keys[:6])))
    for i, k in enumerate(keys[6:], start=6):
        idx = key_index_from_policy([api_key(k, secret_id=f"s{i}", key_id=f"k{i}")], previous=idx)
    idx = key_index_from_policy([], [f"api_key/{digest(PEPPER, keys[0]).hex()}"], previous=idx)
    idx = key_index_from_policy([api_key(keys[1], secret_id="s1", key_id="k1", revoked=True)], previous=idx)
    assert len(idx) == 11
    assert idx.key(digest(PEPPER, keys[0])) is None
    assert idx.key(digest(PEPPER, keys[1])).revoked
    assert [idx.key(digest(PEPPER, k)).key_id for k in keys[2:]] == [f"k{i}" for i in range(2, 12)]
    assert idx.key_for_id("k11").key_id == "k11"


def test_key_for_id_prefers_a_usable_secret_across_table_and_overlay():
    old, new = mint_key().key, mint_key().key
    base = index_of(api_key(old, secret_id="s1", expire_time_unix=100), tenant())
    rotated = key_index_from_policy([api_key(new, secret_id="s2")], previous=base)
    assert rotated.key_for_id("k1").expire_time_unix == 0  # never expires beats 100
    revoked = key_index_from_policy([api_key(new, secret_id="s2", revoked=True)], previous=rotated)
    assert revoked.key_for_id("k1").expire_time_unix == 100  # not revoked beats revoked


def test_many_keys_are_each_found():
    keys = [mint_key().key for _ in range(2000)]
    idx = index_of(
        *(
            api_key(
                k,
                secret_id=f"s{i}",
                key_id=f"k{i}",
                tenant=f"t{i % 7}",
                expire_time_unix=i,
                revoked=i % 3 == 0,
            )
            for i, k in enumerate(keys)
        )
    )
    for i, k in enumerate(keys):
        e = idx.key(digest(PEPPER, k))
        assert (e.key_id, e.tenant_id, e.expire_time_unix, e.revoked) == (f"k{i}", f"t{i % 7}", i, i % 3 == 0)
        assert idx.key_for_id(f"k{i}") == e


def test_a_verified_jwt_is_checked_against_the_snapshot_by_key_id():
    from ext_authz.key_index import key_index_from_policy  # noqa: PLC0415
    from tessera.policy.v1 import policy_pb2  # noqa: PLC0415

    def index(*, revoked: bool = False, suspended: bool = False):
        resources = [
            policy_pb2.Resource(tenant=policy_pb2.Tenant(id="t1", suspended=suspended)),
            policy_pb2.Resource(
                api_key=policy_pb2.ApiKey(
                    id="s1", key_id="k1", tenant_id="t1", digest=b"x" * 32, revoked=revoked
                )
            ),
        ]
        return key_index_from_policy(resources)

    ok = decide({}, "m", index(), pepper=b"p" * 32, now=0, jwt_key_id="k1")
    assert (ok.allowed, ok.tenant_id, ok.key_id) == (True, "t1", "k1")
    assert (
        decide({}, "m", index(revoked=True), pepper=b"p" * 32, now=0, jwt_key_id="k1").code
        == "api_key_revoked"
    )
    assert (
        decide({}, "m", index(suspended=True), pepper=b"p" * 32, now=0, jwt_key_id="k1").code
        == "invalid_api_key"
    )
    assert decide({}, "m", index(), pepper=b"p" * 32, now=0, jwt_key_id="nope").code == "invalid_api_key"


def test_an_allowed_decision_carries_the_plans_priority_to_the_headers(clock):
    from ext_authz.servicer import allow_response  # noqa: PLC0415

    idx = index_of(api_key(KEY), tenant(priority=7))
    decision = run(idx, clock)
    assert (decision.allowed, decision.priority) == (True, 7)
    headers = {
        h.header.key: h.header.value
        for h in allow_response("t1", "k1", decision.priority).ok_response.headers
    }
    assert headers["x-gateway-inference-fairness-id"] == "t1"
    assert headers["x-tessera-priority"] == "7"
