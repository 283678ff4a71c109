"""Conditional-write conflicts per acquire on a hot bucket, against concurrency.

The hot-bucket workload of tests/reliability/test_hot_bucket.py (per-day limits far from
exhausted; acquire rpm 1 + tpm 100, then adjust tpm +20) at 1, 4, 16 and 64 tasks, in 1 and in 3
processes, with the bucket full and half full. moto's throughput says nothing about DynamoDB's,
so the figures are counts: conflicts, UpdateItem and GetItem calls per acquire (an acquire plus
its adjust is two writes when nothing conflicts), and denials, which must be zero. `pytest
benches/bench_contention.py -s` prints the table (3 processes at 16 tasks only);
`--benchmark-enable` runs every case at 5x the acquires.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))
from reliability_workers import (
    hot_worker,
    prepare_hot,
    run_hot_worker,
)

TABLE = "hotbench"
ENTITY = "tenant"
TASKS = (1, 4, 16, 64)
# In CI's fast mode (a smoke run: the figures come from the timed mode) the bucket is full only,
# one process runs at 1 and 16 tasks, and the spawned 3-process case (seconds of start-up) at 16.
CI_FILLS = ("full",)
CI_TASKS = (1, 16)
CI_TASKS_3_PROCESSES = (16,)


def _run(endpoint_url: str, processes: int, tasks: int, acquires: int) -> dict[str, int]:
    attempts = max(1, acquires // (processes * tasks))
    if processes == 1:
        results = [asyncio.run(hot_worker(endpoint_url, TABLE, ENTITY, tasks, attempts))]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
            futures = [
                pool.submit(run_hot_worker, endpoint_url, TABLE, ENTITY, tasks, attempts)
                for _ in range(processes)
            ]
            results = [f.result(timeout=600) for f in futures]
    total: dict[str, int] = {}
    for r in results:
        for key, value in r.items():
            total[key] = total.get(key, 0) + value
    return total


def test_conflicts_per_acquire(
    moto_server: Any, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    timed = bool(request.config.getoption("benchmark_enable", default=False))
    acquires = 320 if timed else 64
    rows = []
    for fill in ("full", "half") if timed else CI_FILLS:
        for processes in (1, 3):
            ci_tasks = CI_TASKS if processes == 1 else CI_TASKS_3_PROCESSES
            for tasks in TASKS if timed else ci_tasks:
                moto_server.reset()
                asyncio.run(prepare_hot(moto_server.endpoint_url, TABLE, ENTITY, fill))
                ops = _run(moto_server.endpoint_url, processes, tasks, acquires)
                rows.append((fill, processes, tasks, ops))
    with capsys.disabled():
        print("\nHot bucket: conditional-write conflicts per acquire (acquire + adjust)")
        print(f"{'bucket':6} {'procs':>5} {'tasks':>5} {'acquires':>8} {'conflicts/acq':>13} "
              f"{'UpdateItem/acq':>14} {'GetItem/acq':>11} {'denied':>6}")
        for fill, processes, tasks, ops in rows:
            n = ops["acquire"]
            print(f"{fill:6} {processes:>5} {tasks:>5} {n:>8} {ops['conflicts'] / n:>13.2f} "
                  f"{ops['update_calls'] / n:>14.2f} {ops['get_calls'] / n:>11.2f} "
                  f"{ops.get('denied', 0):>6}")
    for _, _, _, ops in rows:
        assert ops.get("denied", 0) == ops.get("unavailable", 0) == 0, ops
        assert ops["admitted"] == ops["acquire"]
