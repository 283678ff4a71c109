"""A lease gives back at most what it holds (net consumption never below zero): giving back
more would add capacity taken from nowhere, to the parent's bucket too with cascade. On
`MemoryStorage` (the storage contract shows it behaves as DynamoDB does)."""

from __future__ import annotations

import pytest

from zae_limiter import Limit, MemoryStorage, RateLimiter, ValidationError

T0 = 1_800_000_000_000
LIMITS = [Limit.per_minute("tok", 100)]


async def test_a_lease_cannot_give_back_what_it_never_took() -> None:
    async with RateLimiter(name="bounds", repository=MemoryStorage(),
                           clock=lambda: T0) as limiter:
        await limiter.create_entity("proj")
        await limiter.create_entity("key", parent_id="proj")
        async with limiter.acquire("proj", "r", LIMITS, {"tok": 50}):
            pass  # the project's bucket: 50 left
        async with limiter.acquire("key", "r", LIMITS, {"tok": 0}, cascade=True) as lease:
            with pytest.raises(ValidationError) as info:
                await lease.adjust(tok=-10)
            assert info.value.field == "adjust.tok"
            with pytest.raises(ValidationError) as info:
                await lease.release(tok=1)
            assert info.value.field == "release.tok"
            assert lease.consumed == {"tok": 0}
        assert await limiter.available("proj", "r", LIMITS) == {"tok": 50}  # nothing minted
        async with limiter.acquire("key", "r", LIMITS, {"tok": 30}, cascade=True) as lease:
            await lease.adjust(tok=-20)  # within what it holds
            await lease.release(tok=10)
            assert lease.consumed == {"tok": 0}
            with pytest.raises(ValidationError):
                await lease.adjust(tok=-1)
            await lease.adjust(tok=5)
            await lease.adjust(tok=-5)
        assert await limiter.available("proj", "r", LIMITS) == {"tok": 50}
        assert await limiter.available("key", "r", LIMITS) == {"tok": 100}
