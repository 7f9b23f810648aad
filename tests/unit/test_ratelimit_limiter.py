"""The limiter over the memory backend with a fake clock: long windows without waiting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from ratelimit.backends import MemoryCounterBackend
from ratelimit.limiter import Hit, RateLimiter, Usage
from ratelimit.limits import snapshot_from_policy
from tessera.clock import FakeClock
from tessera.errors import StorageError
from tessera.policy.v1 import policy_pb2

NOV_30_2300 = datetime(2026, 11, 30, 23, 0, tzinfo=UTC).timestamp()


def limiter(
    clock: FakeClock, *limits: policy_pb2.Limit, model: policy_pb2.Model | None = None
) -> RateLimiter:
    resources = [policy_pb2.Resource(limit=lim) for lim in limits]
    if model is not None:
        resources.append(policy_pb2.Resource(model=model))
    return RateLimiter(MemoryCounterBackend(clock), snapshot_from_policy("v", resources), clock=clock)


def lim(kind: int, n: int, window: int, **kw) -> policy_pb2.Limit:
    return policy_pb2.Limit(
        id=f"L{kind}-{window}", tenant_id="t1", kind=kind, limit=n, window_seconds=window, **kw
    )


def hit(rid: str, max_tokens: int = 10) -> Hit:
    return Hit("t1", "k1", "m", request_id=rid, max_tokens=max_tokens)


async def test_a_monthly_token_budget_is_full_again_on_the_first_of_the_month():
    clock = FakeClock(NOV_30_2300)
    rl = limiter(clock, lim(policy_pb2.Limit.TOKENS, 25, 0))
    assert (await rl.check([hit("a")])).allowed
    assert (await rl.check([hit("b")])).allowed
    refused = await rl.check([hit("c")])
    assert not refused.allowed
    assert 3590 <= refused.retry_after <= 3600  # until midnight UTC
    assert refused.outcomes[0][0].limit.is_quota
    clock.advance(3600)  # 1 December
    assert (await rl.check([hit("c")])).allowed


async def test_requests_per_month_count_in_the_calendar_month():
    clock = FakeClock(NOV_30_2300)
    rl = limiter(clock, lim(policy_pb2.Limit.REQUESTS, 2, 0))
    assert [(await rl.check([hit(str(i))])).allowed for i in range(3)] == [True, True, False]
    clock.advance(3600)
    assert (await rl.check([hit("3")])).allowed


async def test_an_hourly_token_bucket_refills_gradually():
    clock = FakeClock()
    rl = limiter(clock, lim(policy_pb2.Limit.TOKENS, 60, 3600))
    assert (await rl.check([hit("a", 60)])).allowed
    refused = await rl.check([hit("b", 30)])
    assert not refused.allowed
    assert 1790 <= refused.retry_after <= 1800  # 30 tokens at 60/hour
    assert not refused.outcomes[0][0].limit.is_quota
    clock.advance(1800)
    assert (await rl.check([hit("b", 30)])).allowed


async def test_weighted_tokens_and_the_estimate():
    clock = FakeClock()
    weighted = lim(policy_pb2.Limit.TOKENS, 1000, 0, prompt_weight=50, completion_weight=200)
    rl = limiter(
        clock, weighted, model=policy_pb2.Model(name="m", default_max_tokens=100, max_max_tokens=200)
    )
    # The prompt: a token per byte of body (no tokenizer makes more); the completion: the admitted
    # maximum ext_authz sends (n included, so it may pass the model's cap), else the default.
    assert rl.estimate(Hit("t1", "k1", "m", body_bytes=41), rl.snapshot.model("m")) == (41, 100)
    assert rl.estimate(Hit("t1", "k1", "m", max_tokens=400), rl.snapshot.model("m")) == (0, 400)
    first = await rl.check([Hit("t1", "k1", "m", request_id="a", body_bytes=40, max_tokens=100)])
    assert first.outcomes[0][0].remaining == 1000 - (40 * 50 + 100 * 200) // 100  # 780
    await rl.settle(Usage("t1", "k1", "m", "a", prompt_tokens=10, completion_tokens=20))
    after = await rl.check([Hit("t1", "k1", "m", request_id="b", max_tokens=1)])
    assert after.outcomes[0][0].remaining == 1000 - 45 - 2  # a settled at 5 + 40, b reserves 2


async def test_a_clients_max_tokens_is_capped_by_the_model_an_admitted_maximum_is_not():
    rl = limiter(FakeClock(), model=policy_pb2.Model(name="m", default_max_tokens=100, max_max_tokens=200))
    info = rl.snapshot.model("m")
    # Envoy RLS descriptors carry max_tokens as the client wrote it: capped, min(999, 200) = 200.
    assert rl.estimate(Hit("t1", "k1", "m", max_tokens=999, from_client=True), info) == (0, 200)
    assert rl.estimate(Hit("t1", "k1", "m", max_tokens=150, from_client=True), info) == (0, 150)
    # ext_authz's admitted maximum was checked against the cap already (n included): kept.
    assert rl.estimate(Hit("t1", "k1", "m", max_tokens=999), info) == (0, 999)


async def test_without_a_default_the_platform_default_is_reserved_capped_by_the_models_maximum():
    clock = FakeClock()
    rl = limiter(clock, model=policy_pb2.Model(name="small", max_max_tokens=500))
    # DEFAULT_COMPLETION_TOKENS = 1024, capped: min(1024, 500) = 500
    assert rl.estimate(Hit("t1", "k1", "small"), rl.snapshot.model("small")) == (0, 500)
    # an unknown model: no default, no cap of its own -> 1024
    assert rl.estimate(Hit("t1", "k1", "other", body_bytes=3), rl.snapshot.model("other")) == (3, 1024)
    # prompt_bytes_per_token = 4 reserves less: ceil(41 / 4) = 11
    coarse = RateLimiter(MemoryCounterBackend(clock), rl.snapshot, clock=clock, prompt_bytes_per_token=4)
    assert coarse.estimate(Hit("t1", "k1", "small", body_bytes=41), rl.snapshot.model("small")) == (11, 500)


class CountingBackend(MemoryCounterBackend):
    """Memory counters that record each call, and can be made unreachable (a Redis outage)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.calls: list[str] = []
        self.down = False

    async def acquire(self, *args, **kwargs):
        self.calls.append("acquire")
        return await super().acquire(*args, **kwargs)

    async def acquire_many(self, calls, **kwargs):
        self.calls.append(f"acquire_many:{len(calls)}")
        if self.down:
            return [StorageError("redis unavailable", transient=True)] * len(calls)
        return await super().acquire_many(calls, **kwargs)

    async def settle_many(self, calls, **kwargs):
        self.calls.append(f"settle_many:{len(calls)}")
        if self.down:
            return StorageError("redis unavailable", transient=True)
        return await super().settle_many(calls, **kwargs)


def counted(clock: FakeClock, *limits: policy_pb2.Limit) -> tuple[RateLimiter, CountingBackend]:
    backend = CountingBackend(clock)
    snapshot = snapshot_from_policy("v", [policy_pb2.Resource(limit=lim) for lim in limits])
    return RateLimiter(backend, snapshot, clock=clock), backend


async def test_admit_decides_each_request_of_a_batch_with_one_backend_call():
    clock = FakeClock()
    rl, backend = counted(clock, lim(policy_pb2.Limit.REQUESTS, 2, 60))
    verdicts = await rl.admit(
        [
            Hit("t1", "k1", "m", request_id="a"),
            Hit("t1", "k1", "m", request_id="b"),
            Hit("t2", "k1", "m", request_id="x"),  # no limit applies to t2: admitted, uncounted
            Hit("t1", "k1", "m", request_id="c"),  # the third of 2 a minute, decided in order
        ]
    )
    assert backend.calls == ["acquire_many:3"]  # one call for the three that count
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert [v.outcomes[0][0].remaining if v.outcomes[0] else None for v in verdicts] == [1, 0, None, 0]
    assert not any(v.reserved for v in verdicts)  # a request limit holds nothing to settle
    assert verdicts[3].retry_after > 0


async def test_a_forced_admission_counts_once_whatever_the_counters_say():
    clock = FakeClock()
    rl, _ = counted(clock, lim(policy_pb2.Limit.REQUESTS, 2, 60))
    (a,) = await rl.admit([Hit("t1", "k1", "m", request_id="a")])
    assert a.allowed
    # ext_authz gave up waiting for a's verdict and admitted it fail-open: the repeat is not
    # counted a second time (a already holds 1 of 2), so b still fits.
    (again,) = await rl.admit([Hit("t1", "k1", "m", request_id="a", forced=True)])
    assert again.allowed
    (b,) = await rl.admit([Hit("t1", "k1", "m", request_id="b")])
    assert (b.allowed, b.outcomes[0][0].remaining) == (True, 0)
    # A forced request never seen before is counted even over the limit, and is not refused.
    (c,) = await rl.admit([Hit("t1", "k1", "m", request_id="c", forced=True)])
    assert c.allowed
    assert c.outcomes[0][0].over  # as an unforced call would have seen it
    # The window now holds 3 hits (a, b, c) of 2: the next request is refused.
    (d,) = await rl.admit([Hit("t1", "k1", "m", request_id="d")])
    assert not d.allowed


async def test_settle_many_replaces_held_reservations_and_ignores_the_rest():
    clock = FakeClock()
    rl, backend = counted(clock, lim(policy_pb2.Limit.TOKENS, 100, 0))
    # each reserves 0 prompt + 30 completion tokens: 100 - 30 - 30 = 40 left
    a, b = await rl.admit([hit("a", 30), hit("b", 30)])
    assert (a.reserved, b.reserved) == (True, True)
    assert b.outcomes[0][0].remaining == 40
    backend.calls.clear()
    settled = await rl.settle_many(
        [
            Usage("t1", "k1", "m", "a", prompt_tokens=5, completion_tokens=5),  # 30 -> 10: 20 back
            Usage("t1", "k1", "m", "b", status=503),  # failed: all 30 back
            Usage("t1", "k1", "m", "never", prompt_tokens=50, completion_tokens=50),  # held nothing
            Usage("t2", "k1", "m", "other-tenant", prompt_tokens=1, completion_tokens=1),  # no limit
        ]
    )
    assert backend.calls == ["settle_many:3"]  # one backend call; t2 has no limit to settle
    assert settled == 3
    (probe,) = await rl.admit([hit("p", 1)])
    assert probe.outcomes[0][0].remaining == 100 - 10 - 1  # a's real 10, p's 1; "never" charged nothing
    # Settling a again (a repeat) changes nothing.
    await rl.settle_many([Usage("t1", "k1", "m", "a", prompt_tokens=40, completion_tokens=40)])
    (probe2,) = await rl.admit([hit("p2", 1)])
    assert probe2.outcomes[0][0].remaining == 100 - 10 - 1 - 1


async def test_a_settlement_that_arrives_before_its_admission_settles_it_when_it_arrives():
    """ext_authz admitted the request fail-open and its admission waits for the stream to come
    back; meanwhile the request ran and the meter settled it (nothing held: no-op)."""
    clock = FakeClock()
    rl = limiter(clock, lim(policy_pb2.Limit.TOKENS, 100, 0))
    await rl.settle(Usage("t1", "k1", "m", "a", prompt_tokens=3, completion_tokens=4))
    (a,) = await rl.admit([Hit("t1", "k1", "m", request_id="a", max_tokens=60, forced=True)])
    assert a.reserved
    (probe,) = await rl.admit([hit("p", 1)])
    assert probe.outcomes[0][0].remaining == 100 - 7 - 1  # a at its real 7, not its 60 held
    # the same admission sent once more (its acknowledgement was lost): neither counted nor settled again
    (again,) = await rl.admit([Hit("t1", "k1", "m", request_id="a", max_tokens=60, forced=True)])
    assert again.allowed
    (probe2,) = await rl.admit([hit("p2", 1)])
    assert probe2.outcomes[0][0].remaining == 100 - 7 - 1 - 1


async def test_an_early_settlement_outlives_a_counter_outage_until_its_admission_is_counted():
    clock = FakeClock()
    rl, backend = counted(clock, lim(policy_pb2.Limit.TOKENS, 100, 0))
    await rl.settle(Usage("t1", "k1", "m", "a", prompt_tokens=3, completion_tokens=4))
    backend.down = True
    (a,) = await rl.admit([Hit("t1", "k1", "m", request_id="a", max_tokens=60, forced=True)])
    assert a.degraded  # admitted, counted later
    backend.down = False
    (probe,) = await rl.admit([hit("p", 1)])  # the backlog is counted first, then settled
    (again,) = await rl.admit([hit("p2", 1)])
    assert again.outcomes[0][0].remaining == 100 - 7 - 1 - 1, probe


async def test_a_backend_that_raises_keeps_the_fail_open_backlog():
    clock = FakeClock()
    rl, backend = counted(clock, lim(policy_pb2.Limit.REQUESTS, 5, 60))
    backend.down = True
    await rl.admit([Hit("t1", "k1", "m", request_id="a")])  # fail-open: counted later
    backend.down = False
    backend.acquire_many = _raising  # a client bug, not a StorageError
    with pytest.raises(RuntimeError):
        await rl.admit([Hit("t1", "k1", "m", request_id="b")])
    del backend.acquire_many
    (c,) = await rl.admit([Hit("t1", "k1", "m", request_id="c")])
    assert c.outcomes[0][0].remaining == 5 - 2  # a (from the backlog) and c; b never ran


async def _raising(*_args, **_kwargs):
    raise RuntimeError("boom")


async def test_an_admission_refused_after_its_early_settlement_keeps_it_for_the_forced_copy():
    clock = FakeClock()
    rl = limiter(clock, lim(policy_pb2.Limit.TOKENS, 50, 0))
    await rl.settle(Usage("t1", "k1", "m", "a", prompt_tokens=5, completion_tokens=5))
    (a,) = await rl.admit([Hit("t1", "k1", "m", request_id="a", max_tokens=60)])  # late, over the budget
    assert not a.allowed
    # ext_authz had admitted it fail-open: its forced copy counts it at its real usage
    (forced,) = await rl.admit([Hit("t1", "k1", "m", request_id="a", max_tokens=60, forced=True)])
    assert forced.reserved
    (probe,) = await rl.admit([hit("p", 1)])
    assert probe.outcomes[0][0].remaining == 50 - 10 - 1


async def test_a_settle_after_the_lease_ended_the_reservation_changes_nothing():
    clock = FakeClock()
    rl = limiter(clock, lim(policy_pb2.Limit.TOKENS, 100, 0))
    (a,) = await rl.admit([hit("a", 60)])
    assert a.outcomes[0][0].remaining == 40
    clock.advance(901)  # the lease (900 s) ends: a stays charged its 60 (never free)
    (b,) = await rl.admit([hit("b", 1)])
    assert b.outcomes[0][0].remaining == 39
    await rl.settle(Usage("t1", "k1", "m", "a", prompt_tokens=10, completion_tokens=10))  # too late
    (c,) = await rl.admit([hit("c", 1)])
    assert c.outcomes[0][0].remaining == 38  # a's late settlement changed nothing


async def test_requests_admitted_fail_open_during_an_outage_are_counted_once_it_ends():
    clock = FakeClock()
    rl, backend = counted(clock, lim(policy_pb2.Limit.TOKENS, 100, 0))
    backend.down = True
    a, b = await rl.admit([hit("a", 30), hit("b", 30)])
    assert (a.allowed, a.degraded, a.reserved) == (True, True, True)  # fail-open: admitted, to settle
    assert b.allowed
    # a ends while the counters are still down: its settle fails (the meter retries it).
    with pytest.raises(StorageError):
        await rl.settle_many([Usage("t1", "k1", "m", "a", prompt_tokens=5, completion_tokens=5)])
    backend.down = False
    # The first call that reaches the counters counts a and b first: 100 - 30 - 30 - 1 = 39.
    (probe,) = await rl.admit([hit("p", 1)])
    assert probe.outcomes[0][0].remaining == 39
    # a's settle, retried, now finds its reservation held and replaces it (30 -> 10).
    await rl.settle_many([Usage("t1", "k1", "m", "a", prompt_tokens=5, completion_tokens=5)])
    (probe2,) = await rl.admit([hit("p2", 1)])
    assert probe2.outcomes[0][0].remaining == 100 - 10 - 30 - 1 - 1
    # Counted once: nothing is replayed again.
    (probe3,) = await rl.admit([hit("p3", 1)])
    assert probe3.outcomes[0][0].remaining == 100 - 10 - 30 - 1 - 1 - 1


async def test_a_slot_taken_fail_open_during_an_outage_is_free_after_its_settle():
    clock = FakeClock()
    rl, backend = counted(clock, lim(policy_pb2.Limit.CONCURRENCY, 1, 0))
    backend.down = True
    (a,) = await rl.admit([hit("a")])
    assert (a.allowed, a.degraded) == (True, True)
    backend.down = False
    # The settle is the first call to reach the counters: a is counted first, then freed, so
    # the tenant's one slot is not held for the lease.
    await rl.settle_many([Usage("t1", "k1", "m", "a", prompt_tokens=1, completion_tokens=1)])
    (b,) = await rl.admit([hit("b")])
    assert (b.allowed, b.degraded) == (True, False)
    (c,) = await rl.admit([hit("c")])
    assert not c.allowed  # b holds the one slot: counting works again


async def test_a_fail_closed_limit_refuses_during_an_outage_and_counts_nothing_later():
    clock = FakeClock()
    rl, backend = counted(clock, lim(policy_pb2.Limit.REQUESTS, 2, 60, fail_closed=True))
    backend.down = True
    (a,) = await rl.admit([hit("a")])
    assert not a.allowed
    backend.down = False
    x, y, z = await rl.admit([hit("x"), hit("y"), hit("z")])
    assert [v.allowed for v in (x, y, z)] == [True, True, False]  # the refused one took nothing


def _outcomes(outcome: str) -> float:
    labels = {"tenant": "t1", "kind": "requests", "outcome": outcome}
    return REGISTRY.get_sample_value("tessera_limit_outcomes_total", labels) or 0.0


async def test_limit_outcomes_tell_a_refusal_from_an_outage_and_ignore_a_shadow_limits_near_miss():
    """What the budget alert reads: a counter outage under a fail-closed limit is not the
    tenant running out, and a shadow limit's near miss is nobody's problem yet."""
    names = ("over_limit", "fail_closed", "near_limit", "shadow_over_limit")
    before = {name: _outcomes(name) for name in names}
    rl, backend = counted(FakeClock(), lim(policy_pb2.Limit.REQUESTS, 2, 60, fail_closed=True))
    backend.down = True
    await rl.admit([hit("a")])
    backend.down = False
    await rl.admit([hit("x"), hit("y"), hit("z")])  # y leaves 0 of 2 (near); z is refused
    shadow, _ = counted(FakeClock(), lim(policy_pb2.Limit.REQUESTS, 2, 60, shadow=True))
    await shadow.admit([hit("p"), hit("q"), hit("r")])
    delta = {name: _outcomes(name) - before[name] for name in names}
    assert delta == {"over_limit": 1, "fail_closed": 1, "near_limit": 1, "shadow_over_limit": 1}
