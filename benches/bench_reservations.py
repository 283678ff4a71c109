"""Reservations: DynamoDB calls per acquire and client CPU per acquire, with and without.

Counted against moto's server, whose throughput says nothing about DynamoDB's, so the figures
are counts (calls per acquire, which are stable) and the client's own CPU time
(`time.process_time`, compared as ratios within one run):

- a hot entity: 8 tasks doing acquire(rpm 1, tpm 100) + adjust(tpm +20) on per-day limits far
  from exhausted, with and without reservations;
- a flood of denials on an exhausted limit (one token a second), with and without;
- client CPU per warm acquire + exit (2 limits) through the public async API: reserved, with
  the native core and with the pure-Python reference (a child process with
  `ZAE_LIMITER_NATIVE=0`), and unreserved.

`pytest benches/bench_reservations.py -s` prints the tables; `--benchmark-enable` runs longer.
The call counts are asserted (they are what the design promises); CPU figures are reported only.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import statistics
import time
import timeit
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from zae_limiter import (
    BACKEND,
    Limit,
    RateLimiter,
    RateLimitExceeded,
    Reservations,
    StackOptions,
)
from zae_limiter import _native as native
from zae_limiter import bucket as reference

TABLE = "resbench"
HOT = [Limit.per_day("rpm", 10**7), Limit.per_day("tpm", 10**9)]
TWO = [Limit.per_minute("rpm", 10**6), Limit.per_minute("tpm", 10**9)]


def _limiter(endpoint_url: str, reserve: bool) -> RateLimiter:
    return RateLimiter(
        name=TABLE,
        endpoint_url=endpoint_url,
        stack_options=StackOptions(),
        reservations=Reservations() if reserve else None,
    )


async def hot(endpoint_url: str, reserve: bool, tasks: int, per_task: int) -> dict[str, float]:
    async with _limiter(endpoint_url, reserve) as limiter:
        limiter.ledger.reset()
        admitted = 0

        async def task() -> None:
            nonlocal admitted
            for _ in range(per_task):
                async with limiter.acquire(
                    "tenant", "llm", HOT, {"rpm": 1, "tpm": 100}
                ) as lease:
                    await lease.adjust(tpm=20)
                    admitted += 1

        await asyncio.gather(*(task() for _ in range(tasks)))
        calls = sum(limiter.ledger.calls.values())
    return {"acquires": tasks * per_task, "admitted": admitted, "calls": calls}


async def flood(endpoint_url: str, reserve: bool, seconds: float) -> dict[str, float]:
    limits = [Limit.per_minute("rpm", 60)]  # one token a second
    async with _limiter(endpoint_url, reserve) as limiter:
        for _ in range(60):
            async with limiter.acquire("flooded", "llm", limits, {"rpm": 1}):
                pass
        limiter.ledger.reset()
        counts = {"acquires": 0, "admitted": 0, "denied": 0}
        deadline = time.monotonic() + seconds

        async def task() -> None:
            while time.monotonic() < deadline:
                counts["acquires"] += 1
                try:
                    async with limiter.acquire("flooded", "llm", limits, {"rpm": 1}):
                        counts["admitted"] += 1
                except RateLimitExceeded as exc:
                    assert exc.retry_after_seconds is not None and exc.retry_after_seconds > 0
                    counts["denied"] += 1
                await asyncio.sleep(0.0005)

        await asyncio.gather(*(task() for _ in range(8)))
        calls = sum(limiter.ledger.calls.values())
    return {**counts, "calls": calls}


async def cpu_per_acquire(endpoint_url: str, reserve: bool, n: int, repeats: int) -> float:
    """Median over `repeats` of the client CPU (µs) of one warm acquire + exit, 2 limits."""
    async with _limiter(endpoint_url, reserve) as limiter:
        for _ in range(max(20, n // 10)):  # warm: the table, the bucket, the blocks' sizes
            async with limiter.acquire("cpu", "llm", TWO, {"rpm": 1, "tpm": 100}):
                pass
        gc.collect()
        samples = []
        for _ in range(repeats):
            started = time.process_time()
            for _ in range(n):
                async with limiter.acquire("cpu", "llm", TWO, {"rpm": 1, "tpm": 100}):
                    pass
            samples.append((time.process_time() - started) / n * 1e6)
    return statistics.median(samples)


def _cpu_in_child(endpoint_url: str, n: int, repeats: int) -> tuple[str, float]:
    from zae_limiter import BACKEND as child_backend

    return child_backend, asyncio.run(cpu_per_acquire(endpoint_url, True, n, repeats))


def _python_backend_cpu(endpoint_url: str, n: int, repeats: int) -> tuple[str, float]:
    """The same measurement in a child process whose core is the pure-Python reference."""
    saved = os.environ.get("ZAE_LIMITER_NATIVE")
    os.environ["ZAE_LIMITER_NATIVE"] = "0"
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            return pool.submit(_cpu_in_child, endpoint_url, n, repeats).result(timeout=600)
    finally:
        if saved is None:
            os.environ.pop("ZAE_LIMITER_NATIVE", None)
        else:
            os.environ["ZAE_LIMITER_NATIVE"] = saved


def test_calls_per_acquire(
    moto_server: Any, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    timed = bool(request.config.getoption("benchmark_enable", default=False))
    url = moto_server.endpoint_url
    rows: list[tuple[str, str, dict[str, float]]] = []
    for reserve in (False, True):
        moto_server.reset()
        per_task = (250 if reserve else 12) * (4 if timed else 1)
        rows.append(("hot entity", _on(reserve), asyncio.run(hot(url, reserve, 8, per_task))))
        moto_server.reset()
        seconds = (0.5 if reserve is False else 2.5) * (2 if timed else 1)
        rows.append(("denial flood", _on(reserve), asyncio.run(flood(url, reserve, seconds))))
    with capsys.disabled():
        print("\nDynamoDB calls per acquire (hot: acquire + adjust, 8 tasks; flood: 8 tasks)")
        print(f"{'workload':13} {'reserve':>7} {'acquires':>8} {'admitted':>8} {'calls':>6} "
              f"{'calls/acquire':>13}")
        for name, on, r in rows:
            print(f"{name:13} {on:>7} {r['acquires']:>8.0f} {r['admitted']:>8.0f} "
                  f"{r['calls']:>6.0f} {r['calls'] / r['acquires']:>13.4f}")
    by = {(name, on): r for name, on, r in rows}
    hot_on, flood_on = by["hot entity", "on"], by["denial flood", "on"]
    assert hot_on["admitted"] == hot_on["acquires"]
    assert hot_on["calls"] / hot_on["acquires"] <= 0.05
    assert by["hot entity", "off"]["calls"] / by["hot entity", "off"]["acquires"] >= 1.0
    assert flood_on["denied"] > 0
    assert flood_on["calls"] / flood_on["acquires"] <= 0.01
    assert by["denial flood", "off"]["calls"] / by["denial flood", "off"]["acquires"] >= 0.5


def test_cpu_per_acquire(
    moto_server: Any, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    timed = bool(request.config.getoption("benchmark_enable", default=False))
    url = moto_server.endpoint_url
    moto_server.reset()
    n, repeats = (20_000, 7) if timed else (5_000, 5)
    reserved = asyncio.run(cpu_per_acquire(url, True, n, repeats))
    unreserved = asyncio.run(cpu_per_acquire(url, False, 40 if not timed else 200, repeats))
    backend, python_reserved = _python_backend_cpu(url, n, repeats)
    decision = {impl.__name__: _local_decision_ns(impl) for impl in (native, reference)}
    with capsys.disabled():
        print("\nClient CPU per warm acquire + exit, 2 limits, public async API (median, µs)")
        print(f"  reserved, {BACKEND} core:        {reserved:9.1f}")
        print(f"  reserved, {backend} core:        {python_reserved:9.1f}"
              f"   ({python_reserved / reserved:.2f}x the native)")
        print(f"  unreserved ({BACKEND} core):     {unreserved:9.1f}"
              f"   ({unreserved / reserved:.0f}x the reserved)")
        nat, ref = decision["zae_limiter._native"], decision["zae_limiter.bucket"]
        print(f"  the local decision alone (Block.take, 2 limits): native {nat:.0f} ns, "
              f"python {ref:.0f} ns ({ref / nat:.0f}x)")
    assert backend == "python"
    assert reserved > 0 and unreserved > 0


def _local_decision_ns(impl: Any) -> float:
    block = impl.Block(2)
    block.add([10**15, 10**15])
    amounts = [1_000, 100_000]
    runs = timeit.repeat(lambda: block.take(amounts), number=20_000, repeat=5)
    return min(runs) / 20_000 * 1e9


def _on(reserve: bool) -> str:
    return "on" if reserve else "off"
