"""Concurrency caps across processes, against moto's server (and through the fault proxy).

- 3 processes x 8 tasks hold leases of 50-200 ms against a cap of 5: a counter shared by every
  process (incremented inside the lease, decremented before its end) never sees more than 5,
  and every task is admitted in the end (retrying after denials);
- a process holding 3 slots is SIGKILLed: its slots are free again within lease_ttl + 2 s
  (lease_ttl 3 s here), and not before its last renewal's entry expired;
- under lost responses, resets and delays past the read timeout on the slot writes (takes and
  releases), no slot is doubled or lost: the count always equals the sum of the entries, the
  shared counter never exceeds the cap, and once every lease has ended (and any entry left by
  an unknown outcome has expired) the whole cap is free.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time

import pytest
from concurrency_workers import RESOURCE, cap_limit, hold_worker, kill_target
from fault_proxy import FaultProxy
from figures import Figures

from zae_limiter import (
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    StackOptions,
    schema,
)
from zae_limiter.storage.dynamodb.client import RetryPolicy
from zae_limiter.storage.dynamodb.repository import Repository
from zae_limiter.storage.protocol import SlotItem

pytestmark = pytest.mark.integration

TABLE = "caps"


async def make_table(endpoint_url: str) -> None:
    async with RateLimiter(name=TABLE, endpoint_url=endpoint_url, stack_options=StackOptions()):
        pass


async def slot_item(endpoint_url: str, entity_id: str) -> SlotItem | None:
    repo = Repository(schema.table_name(TABLE), None, endpoint_url)
    try:
        return await repo.get_slots(entity_id, RESOURCE)
    finally:
        await repo.close()


def consistent(item: SlotItem | None) -> bool:
    """The count of every cap equals the sum of its entries (nothing doubled, nothing lost)."""
    if item is None:
        return True
    caps = set(item.held) | set(item.holders)
    return all(
        item.held.get(c, 0) == sum(n for n, _ in item.holders.get(c, {}).values()) for c in caps
    )


def run_holders(
    endpoint_url: str, entity_id: str, processes: int, tasks: int, rounds: int, cap: int
) -> tuple[list[dict[str, int]], int]:
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    peak = ctx.Value("i", 0)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=hold_worker,
            args=(
                endpoint_url,
                TABLE,
                entity_id,
                cap,
                tasks,
                rounds,
                100 + i,
                counter,
                peak,
                results,
            ),
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert counter.value == 0
    return out, int(peak.value)


async def test_three_processes_never_hold_more_than_the_cap(
    endpoint_url: str, figures: Figures
) -> None:
    await make_table(endpoint_url)
    processes, tasks, cap = 3, 8, 5
    results, peak = run_holders(endpoint_url, "k", processes, tasks, 1, cap)
    admitted = sum(r["admitted"] for r in results)
    over = sum(r["over"] for r in results)
    figures.add(
        clients=processes * tasks,
        processes=processes,
        operations=admitted + sum(r["denied"] for r in results),
        admitted=admitted,
        over_admissions=over,
    )
    assert over == 0 and peak <= cap, f"{peak} leases in flight at once, cap {cap}"
    assert peak >= 2  # the tasks did overlap: the cap was what kept them at bay
    assert admitted == processes * tasks  # every task got in eventually
    assert sum(r["denied"] for r in results) > 0
    item = await slot_item(endpoint_url, "k")
    assert item is not None and item.held == {"inflight": 0} and consistent(item)


async def test_a_killed_holder_gives_its_slots_back_within_lease_ttl(
    endpoint_url: str,
) -> None:
    await make_table(endpoint_url)
    ttl, cap = 3, 5
    limit = cap_limit(cap, ttl)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=kill_target, args=(endpoint_url, TABLE, "k", cap, ttl, 3, ready))
    proc.start()
    try:
        assert ready.wait(60), "the holder never took its slots"
        async with RateLimiter(name=TABLE, endpoint_url=endpoint_url) as limiter:
            # Held across two renewals (every ttl/3): still 3 slots taken after the first ttl.
            await asyncio.sleep(ttl + 0.5)
            assert await limiter.available("k", RESOURCE, [limit]) == {"inflight": 2}
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            proc.join(10)
            with pytest.raises(RateLimitExceeded):
                async with limiter.acquire("k", RESOURCE, [limit], {"inflight": 5}):
                    pass
            while True:
                try:
                    async with limiter.acquire("k", RESOURCE, [limit], {"inflight": 5}) as lease:
                        assert lease.slots == {"inflight": 5}
                        break
                except RateLimitExceeded as exc:
                    assert time.monotonic() - killed < ttl + 2, "the slots did not come back"
                    assert exc.retry_after_seconds is not None
                    assert exc.retry_after_seconds <= 1.0
                    await asyncio.sleep(0.1)
            freed = time.monotonic() - killed
    finally:
        if proc.is_alive():
            proc.kill()
    # Not before the entry of the last renewal (at most ttl/3 before the kill) expired.
    assert ttl * 2 / 3 - 0.3 <= freed <= ttl + 2, freed
    item = await slot_item(endpoint_url, "k")
    assert item is not None and item.held == {"inflight": 0} and consistent(item)


POLICY = RetryPolicy(
    max_attempts=4, base_delay=0.02, max_delay=0.1, connect_timeout=0.4, read_timeout=0.4
)


@pytest.mark.parametrize("kind", ["cut", "reset", "delay"])
async def test_faults_on_takes_and_releases_lose_or_double_no_slot(
    proxy: FaultProxy, figures: Figures, kind: str
) -> None:
    await make_table(proxy.endpoint_url)
    ttl, cap, tasks, rounds = 2, 3, 5, 4
    limit = cap_limit(cap, ttl)
    in_flight = peak = admitted = unavailable = 0

    async def task(limiter: RateLimiter, seed: int) -> None:
        nonlocal in_flight, peak, admitted, unavailable
        for _ in range(rounds):
            while True:
                try:
                    async with limiter.acquire("k", RESOURCE, [limit], {}):
                        in_flight += 1
                        peak = max(peak, in_flight)
                        await asyncio.sleep(0.02 + 0.01 * (seed % 3))
                        in_flight -= 1
                    admitted += 1
                    break
                except RateLimitExceeded:
                    await asyncio.sleep(0.05)
                except RateLimiterUnavailable:
                    unavailable += 1
                    await asyncio.sleep(0.05)

    # Every slot write (takes, releases and renewals name the slot item's key).
    proxy.inject(
        kind,
        ops={"UpdateItem"},
        probability=0.3,
        delay=POLICY.read_timeout + 0.2,
        match=schema.SLOTS_PREFIX.encode(),
    )
    async with RateLimiter(
        name=TABLE, endpoint_url=proxy.endpoint_url, retry=POLICY, deadline=3.0
    ) as limiter:
        await asyncio.gather(*(task(limiter, i) for i in range(tasks)))
    proxy.clear()
    injected = proxy.stats.injected[kind]
    figures.add(operations=tasks * rounds, admitted=admitted)
    assert injected > 0, "no fault met a slot write"
    assert peak <= cap
    assert admitted == tasks * rounds
    await asyncio.sleep(POLICY.read_timeout + 0.5)  # late copies land (or are refused)
    upstream = f"http://{proxy.upstream[0]}:{proxy.upstream[1]}"
    item = await slot_item(upstream, "k")
    assert item is not None and consistent(item), item
    # Entries an unknown outcome left behind hold their slots until they expire, no longer:
    # then the whole cap can be taken (nothing lost for good, nothing counted twice).
    await asyncio.sleep(ttl + 0.3)
    async with (
        RateLimiter(name=TABLE, endpoint_url=upstream) as limiter,
        limiter.acquire("k", RESOURCE, [limit], {"inflight": cap}) as lease,
    ):
        assert lease.slots == {"inflight": cap}
    item = await slot_item(upstream, "k")
    assert item is not None and item.held == {"inflight": 0} and consistent(item)
    assert item.holders.get("inflight", {}) == {}
