"""Stored state carries over from the 1.x layout (tokens at an anchor, `tk#`/`lr#`).

Items as the previous release wrote them are read compatibly, converted on their next write or
by `zae-limiter migrate` to 1.2.0, and give the same `available()` and the same decisions at the
instant of the conversion: no bucket reset to full, no token minted. A converted limit leaves a
fence that a 1.x client reads as exhausted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from zae_limiter import Limit, RateLimiter, RateLimitExceeded, StackOptions, schema
from zae_limiter.ops import migrations as mig
from zae_limiter.ops.migrations import v1_2_0

T0 = 1_800_000_000_000
RPM = Limit.per_minute("rpm", 100)
TPD = Limit.per_day("tpd", 600)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def legacy_item(entity_id: str, limit: Limit, tokens: int, anchor: int) -> dict[str, Any]:
    """A bucket item of one limit exactly as release 1.0 wrote it."""
    name = limit.name
    return {
        schema.PK: {"S": schema.entity_pk(entity_id)},
        schema.SK: {"S": schema.bucket_sk("llm")},
        "entity_id": {"S": entity_id},
        "resource": {"S": "llm"},
        f"tk#{name}": {"N": str(tokens)},
        f"lr#{name}": {"N": str(anchor)},
        f"cn#{name}": {"N": str(limit.burst_milli - tokens)},
        f"lm#{name}": {"S": limit.encode()},
        "ts": {"N": str(anchor)},
        "w0": {"S": "old-write"},
    }


def legacy_available(limit: Limit, tokens: int, anchor: int, now: int) -> int:
    """Release 1.0's reading: whole refill quanta since the anchor (none before it)."""
    step_ms = limit.refill_period_ms // _gcd(limit.refill_amount_milli, limit.refill_period_ms)
    step_milli = limit.refill_amount_milli * step_ms // limit.refill_period_ms
    quanta = (now - anchor) // step_ms if now > anchor else 0
    return min(limit.burst_milli, tokens + quanta * step_milli)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


# (limit, tokens, anchor): half-full, an anchor in the future (1.0's epoch rule), in debt,
# long full.
CASES = [
    (RPM, 50_000, T0 - 1_234),
    (RPM, 3_000, T0 + 400),
    (TPD, -250_000, T0 - 7_777_777),
    (RPM, 100_000, T0 - 10**9),
]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def limiter(endpoint_url: str, clock: Clock) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(
        name="upg", endpoint_url=endpoint_url, stack_options=StackOptions(), clock=clock
    ) as lim:
        for i, (limit, tokens, anchor) in enumerate(CASES):
            await lim.repository.call(
                "put_item",
                TableName=lim.repository.table_name,
                Item=legacy_item(f"k{i}", limit, tokens, anchor),
            )
        # as a table of release 1.0 says
        await lim.repository.set_version_record(schema_version="1.1.0", min_client_version="0.0.0")
        yield lim


async def observe(lim: RateLimiter, i: int) -> list[Any]:
    """available(), then the decisions of a fixed sequence of acquires, with their retry-after."""
    limit = CASES[i][0]
    out: list[Any] = [await lim.available(f"k{i}", "llm", [limit])]
    for amount in (1, 40, 60, 2):
        try:
            async with lim.acquire(f"k{i}", "llm", [limit], {limit.name: amount}):
                out.append(("ok", amount))
        except RateLimitExceeded as exc:
            out.append(("denied", amount, exc.retry_after_seconds))
    out.append(await lim.available(f"k{i}", "llm", [limit]))
    return out


async def test_the_old_layout_reads_as_it_did(limiter: RateLimiter) -> None:
    for i, (limit, tokens, anchor) in enumerate(CASES):
        got = await limiter.available(f"k{i}", "llm", [limit])
        assert got == {limit.name: legacy_available(limit, tokens, anchor, T0) // 1000}


async def test_migration_and_lazy_conversion_decide_alike(
    limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same sequence on items converted by their first write and on items converted by the
    migration, at the same instant: identical books; the stored balance is the 1.x balance."""
    lazy = [await observe(limiter, i) for i in range(len(CASES))]
    # Put the 1.x items back and convert them with the migration instead.
    for i, (limit, tokens, anchor) in enumerate(CASES):
        await limiter.repository.call(
            "put_item",
            TableName=limiter.repository.table_name,
            Item=legacy_item(f"k{i}", limit, tokens, anchor),
        )
    monkeypatch.setattr(v1_2_0, "_now_ms", lambda: T0)
    report = await mig.apply(limiter.repository, "1.2.0")
    assert [s.to_version for s in report.applied] == ["1.2.0"]
    record = await limiter.repository.get_version_record()
    assert record is not None and record["schema_version"] == "1.2.0"
    assert record["min_client_version"] == v1_2_0.MIN_CLIENT_VERSION
    for i, (limit, tokens, _anchor) in enumerate(CASES):
        (bucket,) = await limiter.repository.list_buckets(f"k{i}")
        state = bucket.limits[limit.name]
        assert state.legacy is None and state.full_at is not None
        assert state.consumed_milli == limit.burst_milli - tokens  # counters untouched
    migrated = [await observe(limiter, i) for i in range(len(CASES))]
    assert migrated == lazy
    # Before the first acquire, available() was the 1.x balance: nothing reset, nothing minted.
    for i, (limit, tokens, anchor) in enumerate(CASES):
        assert lazy[i][0] == {limit.name: legacy_available(limit, tokens, anchor, T0) // 1000}


async def test_a_converted_limit_fences_off_1x_clients(limiter: RateLimiter) -> None:
    async with limiter.acquire("k0", "llm", [RPM], {"rpm": 1}):
        pass
    (raw,) = await limiter.repository.bucket_items("k0", "llm")
    assert "fa#rpm" in raw
    tokens, anchor = int(raw["tk#rpm"]["N"]), int(raw["lr#rpm"]["N"])
    # What a 1.x client reads there: a debt that a century of refill does not repay, within
    # signed 64-bit so that its arithmetic neither overflows nor wraps.
    century = T0 + 100 * 365 * 86_400_000
    assert legacy_available(RPM, tokens, anchor, century) < 0
    assert -(2**63) < tokens < 0 and 0 < anchor < 2**63


async def test_rollback_restores_the_old_layout_with_its_balance(
    limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(v1_2_0, "_now_ms", lambda: T0)
    await mig.apply(limiter.repository, "1.2.0")
    before = [await limiter.available(f"k{i}", "llm", [c[0]]) for i, c in enumerate(CASES)]
    await mig.apply(limiter.repository, "1.1.0")
    record = await limiter.repository.get_version_record()
    assert record is not None and record["min_client_version"] == "0.0.0"
    for i, (limit, _, _) in enumerate(CASES):
        (raw,) = await limiter.repository.bucket_items(f"k{i}", "llm")
        assert f"fa#{limit.name}" not in raw
        tokens, anchor = int(raw[f"tk#{limit.name}"]["N"]), int(raw[f"lr#{limit.name}"]["N"])
        assert legacy_available(limit, tokens, anchor, T0) // 1000 == before[i][limit.name]


async def test_an_edited_limit_keeps_the_balance_and_refills_at_its_new_rate(
    limiter: RateLimiter, clock: Clock
) -> None:
    """`fa#` is in the ticks of the definition it was written with: a caller with another rate
    reads the balance the bucket holds now, and its write replaces the state under an exact
    condition (once), so a later reader with either definition agrees."""
    old, new = Limit.per_minute("rpm", 10), Limit.per_minute("rpm", 30)
    async with limiter.acquire("edit", "llm", [old], {"rpm": 6}):
        pass
    assert await limiter.available("edit", "llm", [new]) == {"rpm": 4}
    async with limiter.acquire("edit", "llm", [new], {"rpm": 1}):
        pass
    (bucket,) = await limiter.repository.list_buckets("edit")
    assert bucket.limits["rpm"].definition == new.encode()
    clock.now += 2_000  # one token at 30 per minute
    assert await limiter.available("edit", "llm", [new]) == {"rpm": 4}
    clock.now += 58_000
    assert await limiter.available("edit", "llm", [new]) == {"rpm": 30}
