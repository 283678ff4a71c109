"""Many processes × many tasks on one bucket (and one parent through cascade): exact ledger."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from concurrency_worker import FROZEN_MS, run_worker
from zae_limiter import Limit, RateLimiter, StackOptions

pytestmark = pytest.mark.integration

PROCESSES = 3
TASKS = 4
ATTEMPTS = 8


def run_all(endpoint_url: str, entity_ids: list[str], limit: Limit,
            cascade: bool, adjust: bool) -> list[dict[str, int]]:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(PROCESSES, mp_context=ctx) as pool:
        futures = [
            pool.submit(run_worker, endpoint_url, "conc", entity_ids[i % len(entity_ids)], limit,
                        TASKS, ATTEMPTS, cascade, i, adjust)
            for i in range(PROCESSES)
        ]
        return [f.result(timeout=300) for f in futures]


async def test_processes_share_one_bucket_exactly(endpoint_url: str) -> None:
    limit = Limit.per_hour("tok", 60)
    async with RateLimiter(name="conc", endpoint_url=endpoint_url, stack_options=StackOptions(),
                           clock=lambda: FROZEN_MS) as limiter:
        await limiter.create_entity("k1")
        results = run_all(endpoint_url, ["k1"], limit, cascade=False, adjust=False)
        kept = sum(r["kept"] for r in results)
        admitted = sum(r["admitted"] for r in results)
        denied = sum(r["denied"] for r in results)
        left = (await limiter.available("k1", "shared", [limit]))["tok"]
    # No lost update and every rollback undone: what is left is exactly capacity minus kept.
    assert left == 60 - kept
    # No over-admission: without adjust (which may overdraw) the bucket can never go below zero.
    assert left >= 0
    assert admitted + denied == PROCESSES * TASKS * ATTEMPTS
    assert denied > 0, "the workload must exhaust the bucket to test over-admission"


async def test_processes_share_one_parent_through_cascade(endpoint_url: str) -> None:
    limit = Limit.per_hour("tok", 40)
    async with RateLimiter(name="conc", endpoint_url=endpoint_url, stack_options=StackOptions(),
                           clock=lambda: FROZEN_MS) as limiter:
        await limiter.create_entity("proj")
        children = ["a", "b", "c"]
        for child in children:
            await limiter.create_entity(child, parent_id="proj")
        results = run_all(endpoint_url, children, limit, cascade=True, adjust=True)
        kept = sum(r["kept"] for r in results)
        parent_left = (await limiter.available("proj", "shared", [limit]))["tok"]
        child_left = [(await limiter.available(c, "shared", [limit]))["tok"] for c in children]
    assert parent_left == 40 - kept
    # Each child's own bucket saw exactly its own share of what the parent saw.
    assert sum(40 - left for left in child_left) == kept
    assert sum(r["denied"] for r in results) > 0
