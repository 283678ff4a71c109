"""DynamoDB calls and capacity units per operation: the cost targets, counted (not timed).

Capacity is computed from item sizes by AWS's rules (moto's own figures are not DynamoDB's).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from zae_limiter import Limit, RateLimiter, StackOptions

pytestmark = pytest.mark.integration

LIMITS = [Limit.per_minute("rpm", 1_000), Limit.per_minute("tpm", 100_000)]
MANY = [Limit.per_minute(f"l{i}", 1_000) for i in range(8)]


@pytest.fixture
async def limiter(endpoint_url: str) -> AsyncIterator[RateLimiter]:
    # A frozen clock: refill between calls would make denials depend on the machine's speed.
    async with RateLimiter(
        name="cost",
        endpoint_url=endpoint_url,
        stack_options=StackOptions(),
        clock=lambda: 1_800_000_000_000,
    ) as lim:
        await lim.create_entity("proj")
        await lim.create_entity("key", parent_id="proj")
        yield lim


async def measure(limiter: RateLimiter, coro: object) -> dict[str, object]:
    limiter.ledger.reset()
    await coro  # type: ignore[misc]
    return dict(limiter.ledger.snapshot())


async def acquire(
    limiter: RateLimiter, limits: list[Limit], consume: dict[str, int], cascade: bool = False
) -> None:
    async with limiter.acquire("key", "llm", limits, consume, cascade=cascade):
        pass


async def test_cold_then_warm_acquire(limiter: RateLimiter) -> None:
    cold = await measure(limiter, acquire(limiter, LIMITS, {"rpm": 1, "tpm": 100}))
    assert cold["calls"] == {"GetItem": 1, "UpdateItem": 1}
    warm = await measure(limiter, acquire(limiter, LIMITS, {"rpm": 1, "tpm": 100}))
    assert warm["calls"] == {"UpdateItem": 1}
    assert warm["write_units"] == 1


async def test_warm_acquire_of_many_limits_is_one_call_and_one_wcu(limiter: RateLimiter) -> None:
    consume = {limit.name: 1 for limit in MANY}
    await acquire(limiter, MANY, consume)
    warm = await measure(limiter, acquire(limiter, MANY, consume))
    assert warm["total_calls"] == 1
    assert warm["write_units"] == 1


async def test_warm_cascade_is_one_round_of_two_writes(limiter: RateLimiter) -> None:
    await acquire(limiter, LIMITS, {"rpm": 1}, cascade=True)
    warm = await measure(limiter, acquire(limiter, LIMITS, {"rpm": 1, "tpm": 10}, cascade=True))
    assert warm["calls"] == {"UpdateItem": 2}
    assert warm["write_units"] == 2


async def test_exit_costs_nothing_and_adjust_or_rollback_one_call_per_entity(
    limiter: RateLimiter,
) -> None:
    await acquire(limiter, LIMITS, {"rpm": 1}, cascade=True)
    async with limiter.acquire("key", "llm", LIMITS, {"rpm": 1}, cascade=True) as lease:
        limiter.ledger.reset()
        await lease.adjust(tpm=250)
        assert limiter.ledger.snapshot()["calls"] == {"UpdateItem": 2}
        limiter.ledger.reset()
    assert limiter.ledger.total_calls == 0
    with pytest.raises(RuntimeError):
        async with limiter.acquire("key", "llm", LIMITS, {"rpm": 1}) as lease:
            limiter.ledger.reset()
            raise RuntimeError
    assert limiter.ledger.snapshot()["calls"] == {"UpdateItem": 1}


async def test_available_is_one_read(limiter: RateLimiter) -> None:
    await acquire(limiter, LIMITS, {"rpm": 1})
    cost = await measure(limiter, limiter.available("key", "llm", LIMITS))
    assert cost["calls"] == {"GetItem": 1}
    assert cost["read_units"] == 1.0


async def test_denial_from_a_fresh_state_costs_no_write(limiter: RateLimiter) -> None:
    from zae_limiter import RateLimitExceeded

    await acquire(limiter, LIMITS, {"rpm": 1_000})
    limiter.ledger.reset()
    with pytest.raises(RateLimitExceeded):
        await acquire(limiter, LIMITS, {"rpm": 1})
    # The cached state says "denied"; one consistent read confirms it, nothing is written.
    assert limiter.ledger.snapshot()["calls"] == {"GetItem": 1}



async def test_an_acquire_of_two_resources_is_one_round_of_one_write_per_item(
    limiter: RateLimiter,
) -> None:
    """`also=`: one write per bucket item (2 resources, x2 with cascade), all sent in one
    round (every write in flight before the first returns); cold, the items are read in one
    round first; adjust over both is one write per item too."""
    in_flight = peak = 0
    write = limiter.repository.write_bucket

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await write(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            in_flight -= 1

    limiter.repository.write_bucket = counted  # type: ignore[method-assign]
    cold = await measure(
        limiter, acquire_also(limiter, "fresh", {"rpm": 1}, {"all": {"tpm": 1}}, False)
    )
    assert cold["calls"] == {"GetItem": 2, "UpdateItem": 2}
    for cascade, items in ((False, 2), (True, 4)):
        await acquire_also(limiter, "key", {"rpm": 1}, {"all": {"tpm": 1}}, cascade)
        limiter.ledger.reset()
        peak = 0
        async with limiter.acquire(
            "key", "llm", LIMITS, {"rpm": 1, "tpm": 10}, cascade=cascade,
            also={"all": {"tpm": 10}},
        ) as lease:
            warm = dict(limiter.ledger.snapshot())
            limiter.ledger.reset()
            await lease.adjust(tpm=5, also={"all": {"tpm": 5}})
            adjusted = dict(limiter.ledger.snapshot())
        assert warm["calls"] == {"UpdateItem": items}
        assert warm["write_units"] == items
        assert peak == items, "the writes were not sent in one round"
        assert adjusted["calls"] == {"UpdateItem": items}


async def acquire_also(
    limiter: RateLimiter,
    entity_id: str,
    consume: dict[str, int],
    also: dict[str, dict[str, int]],
    cascade: bool,
) -> None:
    async with limiter.acquire(entity_id, "llm", LIMITS, consume, cascade=cascade, also=also):
        pass
