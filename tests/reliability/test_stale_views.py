"""Two clients, one bucket, one client's view stale: each condition of a bucket write matters.

Every case is deterministic: two `RateLimiter`s on one moto table share a frozen clock that the
test moves. A client decides on the bucket as its own last write or read left it, so the other
client's writes make that view stale. In each case the stale client's write, were it applied
without one of its conditions (docs/design.md, "Concurrent writers"), would admit a token the
bucket does not hold; with the condition it is refused, the client decides again on the item it
gets back, and exactly what an exact token bucket allows is admitted, which the case asserts.
`scripts/mutation_check.py` removes each condition in turn and checks that these cases fail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from zae_limiter import Limit, RateLimiter, RateLimitExceeded, StackOptions

pytestmark = pytest.mark.integration

T0 = 1_800_000_000_000
LIMIT = Limit.per_minute("tok", 10)  # burst 10, one token of refill every 6 s
RESOURCE = "api"

Clients = tuple[RateLimiter, RateLimiter, list[int]]


@pytest.fixture
async def clients(endpoint_url: str) -> AsyncIterator[Clients]:
    """Clients A and B on one table, and the clock they share (`now[0]`, in ms)."""
    now = [T0]
    async with (
        RateLimiter(
            name="stale",
            endpoint_url=endpoint_url,
            stack_options=StackOptions(),
            clock=lambda: now[0],
        ) as a,
        RateLimiter(name="stale", endpoint_url=endpoint_url, clock=lambda: now[0]) as b,
    ):
        yield a, b, now


async def take(limiter: RateLimiter, tokens: int = 1) -> bool:
    """One acquire of `tokens`, kept: True if admitted, False if denied."""
    try:
        async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": tokens}):
            return True
    except RateLimitExceeded:
        return False


async def drain(limiter: RateLimiter) -> int:
    """One-token acquires until one is denied: how many were admitted."""
    for admitted in range(2 * LIMIT.burst):
        if not await take(limiter):
            return admitted
    raise AssertionError(f"{2 * LIMIT.burst} tokens admitted from a bucket of {LIMIT.burst}")


async def test_a_stale_view_short_of_full_does_not_overfill_the_bucket(clients: Clients) -> None:
    """The lower bound of a relative write (`cond_lo`, "not full at my now"). B last saw 1
    token; A gave 8 back (an unconditional add) and refill made the bucket full, with one token
    of refill over the burst. B's view is not full, so B writes relatively; applied to the full
    bucket, that write would keep the token over the burst. It is refused, and B's write at
    full is absolute: 11 tokens in all (10, plus 2 of refill, less the 1 a full bucket cannot
    hold)."""
    a, b, now = clients
    async with a.acquire("k", RESOURCE, [LIMIT], {"tok": 8}) as lease:
        assert await take(b)  # B reads 2 tokens and takes one: its view is 1
        await lease.release(tok=8)  # 9 stored; B does not know
    now[0] += 12_000  # 2 tokens of refill: 11, of which a bucket of 10 holds 10
    assert await take(b)  # B's view: 1 + 2 = 3 tokens, not full
    drained = await drain(b)
    assert drained == 9
    assert 1 + 1 + drained == 11
    assert await a.available("k", RESOURCE, [LIMIT]) == {"tok": 0}


async def test_a_stale_view_of_enough_tokens_does_not_overdraw_the_bucket(
    clients: Clients,
) -> None:
    """The upper bound of a relative write (`cond_hi`, "enough tokens"). A last saw 5 tokens; B
    took 4 of them.
    A's write of 5 would overdraw the bucket by 4: it is refused and A, deciding on the 1 token
    the bucket holds, is denied. 10 tokens in all."""
    a, b, _ = clients
    assert await take(a, 5)  # A creates the bucket: its view is 5
    assert await take(b, 4)  # B reads 5 and takes 4: 1 stored
    assert not await take(a, 5)
    assert await drain(a) == 1
    assert await b.available("k", RESOURCE, [LIMIT]) == {"tok": 0}


async def test_a_stale_anchor_does_not_refill_the_bucket_twice(clients: Clients) -> None:
    """The bound of a write at full (`cond_hi`, "full at my now"). Both clients' views date from
    a minute ago, so both see the bucket full after a minute of refill. A takes all 10: the
    bucket is full again only a minute from now. B's view is full; its absolute write would
    overwrite A's and refill the bucket a second time. It is refused and B is denied: 20
    tokens in the minute in all (the burst and a minute of refill)."""
    a, b, now = clients
    assert await take(a, 9)  # A creates the bucket: its view is 1
    assert await take(b)  # B reads 1 and takes it: its view is 0, anchored at T0
    now[0] += 60_000  # a minute: 10 tokens of refill, full again
    assert await take(a, 10)  # A's view is full: it writes 0, anchored at now
    assert not await take(b)  # B's view, anchored at T0, is full too
    assert await drain(b) == 0
    assert await a.available("k", RESOURCE, [LIMIT]) == {"tok": 0}


async def test_a_stale_view_of_no_bucket_does_not_create_it_again(clients: Clients) -> None:
    """The create condition (`attribute_not_exists` of the state). B read the bucket before it
    existed, so its view is a full bucket that nobody wrote; A then created it and took all 10.
    B's create would overwrite A's: it is refused and B is denied. 10 tokens in all."""
    a, b, _ = clients
    assert await b.available("k", RESOURCE, [LIMIT]) == {"tok": 10}  # no bucket yet
    assert await take(a, 10)
    assert not await take(b)
    assert await drain(b) == 0
    assert await a.available("k", RESOURCE, [LIMIT]) == {"tok": 0}
