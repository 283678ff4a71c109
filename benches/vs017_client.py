"""One client of benches/bench_vs017.py, run as a subprocess by either library's interpreter.

`python vs017_client.py LIB ENDPOINT TABLE ENTITY ACQUIRES START` with LIB `here` (this
repository's zae_limiter) or `0.17` (zae-limiter 0.17, from its own venv: same package name, so
never in the same interpreter). The loop is the same on both: acquire rpm 1 + tpm 100 of two
per-minute limits far from exhausted, then adjust tpm +20 inside the lease. After a warm-up
(connection, table and version reads, the first write of the bucket) the client waits until the
wall-clock instant START, so that the clients of one run load the server together, then prints
one JSON line: acquires, process CPU seconds and wall seconds of the timed loop, and the
DynamoDB calls it made when the library counts them.

Only the public API of each release is used; 0.17's was read from its code (its `Repository`
constructor takes `_skip_deprecation_warning` and `create_table()` makes the table without a
CloudFormation stack).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

WARMUP = 5
# DynamoDB operations of the timed loop, counted where each library hands them to botocore: its
# client (both), and this library's own transport for the bucket calls (transport.py).
CALLS: dict[str, int] = {}


def _count_calls() -> None:
    from aiobotocore.client import AioBaseClient

    make_api_call = AioBaseClient._make_api_call

    async def counted(self: Any, operation_name: str, api_params: Any) -> Any:
        CALLS[operation_name] = CALLS.get(operation_name, 0) + 1
        return await make_api_call(self, operation_name, api_params)

    AioBaseClient._make_api_call = counted  # type: ignore[method-assign]
    try:  # this library's bucket calls leave botocore below its client (transport.py)
        from zae_limiter.storage.dynamodb.transport import LeanTransport
    except ImportError:  # 0.17
        return
    lean_send = LeanTransport.send

    async def lean_counted(self: Any, operation: str, kwargs: Any) -> Any:
        name = "".join(part.title() for part in operation.split("_"))
        CALLS[name] = CALLS.get(name, 0) + 1
        return await lean_send(self, operation, kwargs)

    LeanTransport.send = lean_counted  # type: ignore[method-assign]
CONSUME = {"rpm": 1, "tpm": 100}
EXTRA = 20


def _wait_until(start: float) -> None:
    delay = start - time.time()
    if delay > 0:
        time.sleep(delay)


async def _timed(acquire_once: Any, acquires: int, start: float) -> dict[str, Any]:
    for _ in range(WARMUP):
        await acquire_once()
    CALLS.clear()
    _wait_until(start)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(acquires):
        await acquire_once()
    return {
        "acquires": acquires,
        "cpu": time.process_time() - cpu0,
        "wall": time.perf_counter() - wall0,
        "calls": dict(CALLS),
    }


async def run_here(endpoint: str, table: str, entity: str, acquires: int,
                   start: float) -> dict[str, Any]:
    from zae_limiter import Limit, RateLimiter, StackOptions

    limits = [Limit.per_minute("rpm", 10**7), Limit.per_minute("tpm", 10**9)]
    async with RateLimiter(name=table, endpoint_url=endpoint, stack_options=StackOptions()) as lim:

        async def once() -> None:
            async with lim.acquire(entity, "llm", limits, CONSUME) as lease:
                await lease.adjust(tpm=EXTRA)

        return await _timed(once, acquires, start)


async def run_017(endpoint: str, table: str, entity: str, acquires: int,
                  start: float) -> dict[str, Any]:
    from zae_limiter import Limit, RateLimiter, Repository

    repo = Repository(name=table, endpoint_url=endpoint, region="us-east-1",
                      _skip_deprecation_warning=True)
    try:
        await repo.create_table()
    except Exception as exc:  # another client made it first
        if "ResourceInUse" not in repr(exc):
            raise
    limiter = RateLimiter(repository=repo)
    limits = [Limit.per_minute("rpm", 10**7), Limit.per_minute("tpm", 10**9)]

    async def once() -> None:
        async with limiter.acquire(entity, "llm", CONSUME, limits=limits) as lease:
            await lease.adjust(tpm=EXTRA)

    try:
        return await _timed(once, acquires, start)
    finally:
        await repo.close()


def main() -> None:
    lib, endpoint, table, entity, acquires, start = sys.argv[1:7]
    _count_calls()
    run = run_here if lib == "here" else run_017
    result = asyncio.run(run(endpoint, table, entity, int(acquires), float(start)))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
