"""The usage backstop, ratelimit's side: which admissions are kept open, and what closes them.
Real limiter and in-process stores, a fake clock; the gRPC surfaces are exercised end to end in
tests/e2e (test_metering.py, test_zero_trust.py)."""

from __future__ import annotations

from typing import Any

from ratelimit.admission import AdmissionServicer, decide_batch
from ratelimit.backends import MemoryCounterBackend
from ratelimit.backends.open_admissions import MemoryOpenAdmissions, RedisOpenAdmissions
from ratelimit.backstop import KEEP_FAILED, Backstop
from ratelimit.limiter import RateLimiter
from ratelimit.limits import snapshot_from_policy
from tessera.admission.v1 import admission_pb2
from tessera.clock import FakeClock
from tessera.policy.v1 import policy_pb2

T0 = 1_800_000_000.0


class AbortedError(Exception):
    pass


class Context:
    async def abort(self, code: Any, message: str) -> None:
        raise AbortedError(code, message)


def _setup(limit: int = 2) -> tuple[RateLimiter, Backstop, MemoryOpenAdmissions, FakeClock]:
    clock = FakeClock(T0)
    snapshot = snapshot_from_policy(
        "v",
        [
            policy_pb2.Resource(
                limit=policy_pb2.Limit(
                    id="L1",
                    tenant_id="limited",
                    kind=policy_pb2.Limit.REQUESTS,
                    limit=limit,
                    window_seconds=60,
                )
            )
        ],
    )
    store = MemoryOpenAdmissions()
    backstop = Backstop(store, after_seconds=30, hold_seconds=10, clock=clock)
    return RateLimiter(MemoryCounterBackend(clock), snapshot, clock=clock), backstop, store, clock


def _admission(
    rid: str, tenant: str = "limited", *, node: str = "gw-1", forced: bool = False, keep_only: bool = False
) -> Any:
    return admission_pb2.Admission(
        request_id=rid, tenant_id=tenant, key_id="k", model="m", body_bytes=100,
        max_completion_tokens=16, node=node, forced=forced, keep_only=keep_only,
    )  # fmt: skip


async def _batch(limiter: RateLimiter, backstop: Backstop, *admissions: Any) -> list[bool]:
    reply = await decide_batch(limiter, admission_pb2.AdmitBatch(batch=1, admissions=admissions), backstop)
    await backstop.flushed()
    return [v.allowed for v in reply.verdicts]


async def test_admitted_requests_with_a_node_are_kept_open_refused_and_nodeless_ones_are_not():
    limiter, backstop, store, clock = _setup(limit=2)
    allowed = await _batch(
        limiter,
        backstop,
        _admission("a"),
        _admission("b"),
        _admission("refused"),  # the limit of 2 is used up
        _admission("no-node", "free", node=""),  # no node: its line is the only record
        _admission("unlimited", "free", keep_only=True),  # no limit applies: kept open only
    )
    assert allowed == [True, True, False, True, True]
    assert {r.request_id for r in await store.claim_overdue(T0 + 29, 10, 100)} == set()  # not due yet
    overdue = await backstop.claim_overdue(100)
    assert overdue == []  # the clock has not moved
    clock.advance(30)
    overdue = await backstop.claim_overdue(100)
    assert {r.request_id for r in overdue} == {"a", "b", "unlimited"}
    got = {r.request_id: r for r in overdue}["a"]
    assert (got.node, got.tenant_id, got.body_bytes, got.max_completion_tokens, got.admitted_at) == (
        "gw-1", "limited", 100, 16, T0,
    )  # fmt: skip


async def test_settle_closes_the_admissions_it_names_and_only_those():
    limiter, backstop, _, clock = _setup(limit=10)
    await _batch(limiter, backstop, *(_admission(r) for r in ("a", "b", "c")))
    servicer = AdmissionServicer(limiter, backstop)
    await servicer.Settle(admission_pb2.SettleBatch(closed=["a", "c", "never-admitted"]), Context())
    clock.advance(31)
    assert [r.request_id for r in await backstop.claim_overdue(100)] == ["b"]


async def test_a_store_that_cannot_be_reached_costs_no_verdict_and_is_counted():
    limiter, _, _, clock = _setup()
    unreachable = RedisOpenAdmissions("redis://127.0.0.1:1/0")  # nothing listens there
    backstop = Backstop(unreachable, clock=clock)
    before = KEEP_FAILED._value.get()
    try:
        assert await _batch(limiter, backstop, _admission("a")) == [True]
    finally:
        await unreachable.aclose()
    assert KEEP_FAILED._value.get() == before + 1


async def test_a_keep_only_admission_is_never_counted_even_where_this_snapshot_has_a_limit():
    """ext_authz saw no limit (its snapshot was a moment behind): counting it here would hold a
    reservation that nobody settles, as its line is not marked reserved."""
    limiter, backstop, _, _ = _setup(limit=1)
    assert (
        await _batch(limiter, backstop, *(_admission(f"k{i}", keep_only=True) for i in range(3)))
        == [True] * 3
    )
    assert await _batch(limiter, backstop, _admission("counted")) == [True]  # the limit of 1 untouched
    assert await _batch(limiter, backstop, _admission("over")) == [False]
