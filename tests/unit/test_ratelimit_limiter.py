"""The limiter over the memory backend with a fake clock: long windows without waiting."""

from __future__ import annotations

from datetime import UTC, datetime

from ratelimit.backends import MemoryCounterBackend
from ratelimit.limiter import Hit, RateLimiter, Usage
from ratelimit.limits import snapshot_from_policy
from tessera.clock import FakeClock
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
