"""A hot bucket: many writers on limits far from exhausted must never be denied.

The workload of a big tenant behind an LLM gateway: per-day limits (10^7 requests, 10^9 tokens)
that refill faster than they are consumed, so the bucket sits at (or near) full, and each task
does acquire(rpm 1, tpm 100) + adjust(tpm +20). Every denial here would be a false one. The
forced adjustments must all land: the bucket's consumed counters equal the books to the token.
Requests are serialized by the embedded server, as DynamoDB applies each item write atomically.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
from figures import Figures, Size
from reliability_workers import (
    HOT_ESTIMATE,
    HOT_EXTRA,
    RESOURCE,
    hot_worker,
    prepare_hot,
    run_hot_worker,
)

from zae_limiter.storage.dynamodb.repository import Repository

pytestmark = pytest.mark.integration

TABLE = "hot"
ENTITY = "tenant"


async def consumed(endpoint_url: str) -> dict[str, int]:
    repo = Repository(TABLE, None, endpoint_url)
    try:
        bucket = await repo.get_bucket(ENTITY, RESOURCE)
    finally:
        await repo.close()
    if bucket is None:
        return {}
    return {name: s.consumed_milli - s.released_milli for name, s in bucket.limits.items()}


def check(results: list[dict[str, Any]], before: dict[str, int], after: dict[str, int],
          figures: Figures, processes: int, tasks: int) -> None:
    ops: dict[str, int] = {}
    for r in results:
        for key, value in r.items():
            ops[key] = ops.get(key, 0) + value
    figures.add(clients=processes * tasks, processes=processes, operations=ops["acquire"],
                admitted=ops.get("admitted", 0), denied=ops.get("denied", 0))
    assert ops.get("denied", 0) == 0, f"false denials under contention: {ops}"
    assert ops.get("unavailable", 0) == 0, ops
    assert ops["admitted"] == ops["adjusted"] == ops["acquire"]
    # every acquire and every forced adjust landed exactly once
    assert after["rpm"] - before.get("rpm", 0) == ops["admitted"] * 1000
    per_acquire = (HOT_ESTIMATE + HOT_EXTRA) * 1000
    assert after["tpm"] - before.get("tpm", 0) == ops["admitted"] * per_acquire


@pytest.mark.parametrize("fill", ["full", "half"])
@pytest.mark.parametrize("tasks", [4, 16, 64])
async def test_one_process_hot_bucket_has_no_false_denial(
    endpoint_url: str, size: Size, figures: Figures, tasks: int, fill: str
) -> None:
    await prepare_hot(endpoint_url, TABLE, ENTITY, fill)
    before = await consumed(endpoint_url)
    per_task = max(1, size.hot_acquires // tasks)
    result = await hot_worker(endpoint_url, TABLE, ENTITY, tasks, per_task)
    check([result], before, await consumed(endpoint_url), figures, 1, tasks)


@pytest.mark.parametrize("fill", ["full", "half"])
async def test_three_processes_hot_bucket_has_no_false_denial(
    endpoint_url: str, size: Size, figures: Figures, fill: str
) -> None:
    processes, tasks = 3, 16
    await prepare_hot(endpoint_url, TABLE, ENTITY, fill)
    before = await consumed(endpoint_url)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        futures = [
            pool.submit(run_hot_worker, endpoint_url, TABLE, ENTITY, tasks,
                        max(1, size.hot_acquires // (processes * tasks)))
            for _ in range(processes)
        ]
        results = [f.result(timeout=300) for f in futures]
    check(results, before, await consumed(endpoint_url), figures, processes, tasks)
