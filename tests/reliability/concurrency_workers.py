"""Worker processes of the concurrency-cap tests (started with the `spawn` context).

`hold_worker`: `tasks` asyncio tasks, each taking `rounds` leases of one cap in turn and
retrying after each denial (the hint, at most 0.1 s) until admitted. Inside a lease a task
increments a counter shared by every process (`multiprocessing.Value`, under its lock), records
the peak, holds the lease for a random 50-200 ms, then decrements the counter before leaving
the block: the counter is how many leases are inside their block at once, seen from outside
the limiter. `kill_target`: takes `slots` slots and waits to be killed.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta
from typing import Any

from zae_limiter import Limit, RateLimiter, RateLimiterUnavailable, RateLimitExceeded

RESOURCE = "streams"


def cap_limit(max_in_flight: int, ttl_seconds: int = 300) -> Limit:
    return Limit.concurrency("inflight", max_in_flight, lease_ttl=timedelta(seconds=ttl_seconds))


def hold_worker(
    endpoint_url: str,
    table: str,
    entity_id: str,
    max_in_flight: int,
    tasks: int,
    rounds: int,
    seed: int,
    counter: Any,
    peak: Any,
    results: Any,
    hold: tuple[float, float] = (0.05, 0.2),
) -> None:
    results.put(
        asyncio.run(
            _hold(
                endpoint_url,
                table,
                entity_id,
                max_in_flight,
                tasks,
                rounds,
                seed,
                counter,
                peak,
                hold,
            )
        )
    )


async def _hold(
    endpoint_url: str,
    table: str,
    entity_id: str,
    max_in_flight: int,
    tasks: int,
    rounds: int,
    seed: int,
    counter: Any,
    peak: Any,
    hold: tuple[float, float],
) -> dict[str, int]:
    rng = random.Random(seed)
    limit = cap_limit(max_in_flight)
    stats = {"admitted": 0, "denied": 0, "unavailable": 0, "over": 0}

    async def task(limiter: RateLimiter) -> None:
        for _ in range(rounds):
            while True:
                try:
                    async with limiter.acquire(entity_id, RESOURCE, [limit], {}):
                        with counter.get_lock():
                            counter.value += 1
                            if counter.value > max_in_flight:
                                stats["over"] += 1
                            peak.value = max(peak.value, counter.value)
                        try:
                            await asyncio.sleep(rng.uniform(*hold))
                        finally:
                            with counter.get_lock():
                                counter.value -= 1
                    stats["admitted"] += 1
                    break
                except RateLimitExceeded as exc:
                    stats["denied"] += 1
                    wait = min(exc.retry_after_seconds or 0.1, 0.1)
                    await asyncio.sleep(rng.uniform(0.5, 1.0) * wait)
                except RateLimiterUnavailable:
                    stats["unavailable"] += 1
                    await asyncio.sleep(0.05)

    async with RateLimiter(name=table, endpoint_url=endpoint_url, deadline=30.0) as limiter:
        await asyncio.gather(*(task(limiter) for _ in range(tasks)))
    return stats


def kill_target(
    endpoint_url: str,
    table: str,
    entity_id: str,
    max_in_flight: int,
    ttl: int,
    slots: int,
    ready: Any,
) -> None:
    asyncio.run(_kill_target(endpoint_url, table, entity_id, max_in_flight, ttl, slots, ready))


async def _kill_target(
    endpoint_url: str,
    table: str,
    entity_id: str,
    max_in_flight: int,
    ttl: int,
    slots: int,
    ready: Any,
) -> None:
    limit = cap_limit(max_in_flight, ttl)
    async with (
        RateLimiter(name=table, endpoint_url=endpoint_url, deadline=30.0) as limiter,
        limiter.acquire(entity_id, RESOURCE, [limit], {limit.name: slots}),
    ):
        ready.set()
        # Renewing in the background until the SIGKILL; never leaves the block.
        while True:
            await asyncio.sleep(1)
            time.time()
