"""DynamoDB cost per operation: calls and capacity units, counted against moto's server.

Latency against moto says nothing about DynamoDB, so the figures that matter here are the
stable ones: how many calls each operation makes and what DynamoDB would bill for them (computed
from item sizes by AWS's rules). `pytest benches -s` prints the report; pytest-benchmark
records the same figures in `extra_info` of the warm-acquire benchmark.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from zae_limiter import Limit, RateLimiter, StackOptions

FROZEN_MS = 1_800_000_000_000
LIMITS = [Limit.per_minute("rpm", 10_000), Limit.per_minute("tpm", 1_000_000)]
MANY = [Limit.per_minute(f"limit{i}", 10_000) for i in range(10)]


async def _cost(limiter: RateLimiter, op: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    limiter.ledger.reset()
    await op()
    snapshot: dict[str, Any] = limiter.ledger.snapshot()
    return snapshot


async def _report(endpoint_url: str) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    async with RateLimiter(
        name="bench",
        endpoint_url=endpoint_url,
        stack_options=StackOptions(),
        clock=lambda: FROZEN_MS,
    ) as limiter:
        await limiter.create_entity("proj")
        await limiter.create_entity("key", parent_id="proj")

        async def acquire(limits: list[Limit], cascade: bool = False) -> None:
            async with limiter.acquire(
                "key", "llm", limits, {lim.name: 1 for lim in limits}, cascade=cascade
            ):
                pass

        async def adjust() -> None:
            async with limiter.acquire("key", "llm", LIMITS, {"rpm": 1}, cascade=True) as lease:
                limiter.ledger.reset()
                await lease.adjust(tpm=100)

        async def rollback() -> None:
            try:
                async with limiter.acquire("key", "llm", LIMITS, {"rpm": 1}) as lease:
                    limiter.ledger.reset()
                    raise RuntimeError(lease)
            except RuntimeError:
                pass

        rows.append(("cold acquire, 2 limits", await _cost(limiter, lambda: acquire(LIMITS))))
        rows.append(("warm acquire, 2 limits", await _cost(limiter, lambda: acquire(LIMITS))))
        await acquire(MANY)
        rows.append(("warm acquire, 10 limits", await _cost(limiter, lambda: acquire(MANY))))
        await acquire(LIMITS, cascade=True)
        rows.append(
            ("warm acquire, cascade", await _cost(limiter, lambda: acquire(LIMITS, cascade=True)))
        )
        await adjust()
        rows.append(("adjust (cascade: 2 entities)", dict(limiter.ledger.snapshot())))
        await rollback()
        rows.append(("rollback (1 entity)", dict(limiter.ledger.snapshot())))
        rows.append(
            ("available()", await _cost(limiter, lambda: limiter.available("key", "llm", LIMITS)))
        )
    return rows


def test_cost_report(endpoint_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = asyncio.run(_report(endpoint_url))
    with capsys.disabled():
        print("\nDynamoDB cost per operation (capacity by AWS's item-size rules)")
        print(f"{'operation':32} {'calls':>5} {'RCU':>5} {'WCU':>5}  detail")
        for name, cost in rows:
            detail = ", ".join(f"{op} {n}" for op, n in sorted(cost["calls"].items()))
            print(
                f"{name:32} {cost['total_calls']:>5} {cost['read_units']:>5g} "
                f"{cost['write_units']:>5g}  {detail}"
            )
    by_name = dict(rows)
    assert by_name["warm acquire, 10 limits"]["total_calls"] == 1
    assert by_name["warm acquire, 10 limits"]["write_units"] <= 1
    assert by_name["cold acquire, 2 limits"]["total_calls"] <= 2


def test_bench_warm_acquire(endpoint_url: str, benchmark: Any) -> None:
    """Wall time of one warm acquire against moto (loopback HTTP; not DynamoDB's latency)."""

    async def setup() -> RateLimiter:
        limiter = RateLimiter(
            name="bench",
            endpoint_url=endpoint_url,
            stack_options=StackOptions(),
            clock=lambda: FROZEN_MS,
        )
        async with limiter.acquire("key", "llm", LIMITS, {"rpm": 1}):
            pass
        return limiter

    loop = asyncio.new_event_loop()
    try:
        limiter = loop.run_until_complete(setup())

        async def once() -> None:
            async with limiter.acquire("key", "llm", LIMITS, {"rpm": 1}):
                pass

        limiter.ledger.reset()
        rounds = 0

        def run() -> None:
            nonlocal rounds
            rounds += 1
            loop.run_until_complete(once())

        benchmark.pedantic(run, rounds=20, iterations=1)
        benchmark.extra_info["dynamodb_calls_per_acquire"] = limiter.ledger.total_calls / rounds
        benchmark.extra_info["wcu_per_acquire"] = limiter.ledger.write_units / rounds
        assert limiter.ledger.total_calls == rounds
        loop.run_until_complete(limiter.close())
    finally:
        loop.close()
