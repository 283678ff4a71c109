"""Worker processes of the write-ceiling tests (imported by `spawn`ed children).

A worker runs `tasks` concurrent asyncio tasks for a fixed wall time, each in a loop: acquire
(rpm 1, tpm ESTIMATE), a short simulated call, `adjust(tpm=actual - ESTIMATE)` (up or down), and
now and then a rollback (the block raises). It keeps its own exact ledger per entity and limit,
counting a call only once it returned:

- ``checked``  what `acquire` admitted (the only consumption a limit checks);
- ``forced``   positive adjustments (forced: a bucket may go negative for them);
- ``released`` negative adjustments and rollbacks (what was given back).

The net (checked + forced - released) is what the bucket's counters must show once every worker
closed its limiter, and checked - released can never exceed what the limit allowed over the run
(see test_reservation_ceiling.py for why that bound is sound with forced adjustments).

Start and stop are synchronised through files in `sync_dir`: each worker writes
``ready-<index>`` once its limiter is ready, then waits for the test to write ``go`` (the wall
clock ms at which every worker starts). No bucket is written before that moment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from zae_limiter import (
    Limit,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    Reservations,
    StackOptions,
)

RESOURCE = "chat"
ESTIMATE = 100  # tpm taken by acquire
ACTUAL = (60, 120)  # the call's real tokens, uniform: adjust by -40 .. +20
WORK_S = 0.003  # the simulated call inside the acquire block
DENIED_PAUSE_S = (0.002, 0.01)  # a denied client comes back soon (demand stays above the limit)
ROLLBACK_SHARE = 0.05
GO_FILE = "go"


class Abort(Exception):
    """Raised inside an acquire block: the lease is given back."""


class LogCounter(logging.Handler):
    """Counts the library's warnings and errors (lost give-backs, failed rollbacks)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "not given back" in message:
            key = "give_back_lost"
        elif "rollback of" in message:
            key = "rollback_failed"
        else:
            key = f"log_{record.levelname.lower()}"
        self.counts[key] += 1
        if len(self.samples) < 5:
            self.samples.append(message[:300])


async def prepare(
    endpoint_url: str,
    table: str,
    limits: list[Limit],
    entities: list[str],
    parent: str | None = None,
) -> None:
    """Create the table, the parent (if any) and the entities, and each one's bucket item,
    full: one admitted acquire of 1 of every limit, rolled back (the give-back fills it)."""
    async with RateLimiter(
        name=table, endpoint_url=endpoint_url, stack_options=StackOptions()
    ) as limiter:
        if parent is not None:
            await limiter.create_entity(parent)
        for entity_id in entities:
            await limiter.create_entity(entity_id, parent_id=parent)
        for entity_id in [*entities, *([parent] if parent else [])]:
            try:
                async with limiter.acquire(
                    entity_id, RESOURCE, limits, {limit.name: 1 for limit in limits}
                ):
                    raise Abort
            except Abort:
                pass


def run_ceiling_worker(
    endpoint_url: str,
    table: str,
    index: int,
    entities: list[str],
    limits: list[Limit],
    tasks: int,
    seconds: float,
    settle_s: float,
    reservations: Reservations | None,
    cascade: bool,
    sync_dir: str,
) -> dict[str, Any]:
    return asyncio.run(
        ceiling_worker(
            endpoint_url, table, index, entities, limits, tasks, seconds, settle_s,
            reservations, cascade, sync_dir,
        )
    )  # fmt: skip


async def _wait_for_go(sync_dir: Path, timeout: float = 120.0) -> int:
    path = sync_dir / GO_FILE
    give_up = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > give_up:
            raise TimeoutError("the test never wrote the go file")
        await asyncio.sleep(0.005)
    return int(path.read_text())


async def _sleep_until_ms(at_ms: int) -> None:
    while (left := at_ms - time.time_ns() // 1_000_000) > 0:
        await asyncio.sleep(left / 1000)


async def ceiling_worker(
    endpoint_url: str,
    table: str,
    index: int,
    entities: list[str],
    limits: list[Limit],
    tasks: int,
    seconds: float,
    settle_s: float,
    reservations: Reservations | None,
    cascade: bool,
    sync_dir: str,
) -> dict[str, Any]:
    """`tasks` tasks (task i on entities[i % len(entities)]) from the go time for `seconds`;
    then `settle_s` idle seconds, then close (giving back what the blocks hold)."""
    logs = LogCounter()
    library_log = logging.getLogger("zae_limiter")
    library_log.addHandler(logs)
    ops: Counter[str] = Counter()
    names = [limit.name for limit in limits]
    # per entity, per limit: checked / forced / released tokens
    ledger: dict[str, dict[str, Counter[str]]] = {
        eid: {name: Counter() for name in names} for eid in entities
    }
    acquires: Counter[str] = Counter()  # admitted and standing acquires, per entity
    latencies: list[float] = []  # seconds from calling acquire to admitted / denied / error
    last_admitted_ms = 0  # when the last admitted acquire returned (its tokens were granted)
    limiter = RateLimiter(
        name=table,
        endpoint_url=endpoint_url,
        reservations=reservations,
    )
    sync = Path(sync_dir)
    try:
        async with limiter:
            for eid in entities:  # warm the entity cache (reads only, before the go)
                await limiter.get_entity(eid)
            ready_ms = time.time_ns() // 1_000_000
            (sync / f"ready-{index}.tmp").write_text(str(ready_ms))
            os.replace(sync / f"ready-{index}.tmp", sync / f"ready-{index}")
            go_ms = await _wait_for_go(sync)
            await _sleep_until_ms(go_ms)
            deadline = go_ms / 1000 + seconds

            async def task(i: int) -> None:
                nonlocal last_admitted_ms
                rng = random.Random(index * 10_000 + i)
                entity_id = entities[i % len(entities)]
                books = ledger[entity_id]
                while time.time() < deadline:
                    ops["acquire"] += 1
                    called = time.monotonic()
                    actual = rng.randint(*ACTUAL)
                    roll_back = rng.random() < ROLLBACK_SHARE
                    pause = 0.0
                    try:
                        async with limiter.acquire(
                            entity_id,
                            RESOURCE,
                            limits,
                            {"rpm": 1, "tpm": ESTIMATE},
                            cascade=cascade,
                        ) as lease:
                            latencies.append(time.monotonic() - called)
                            last_admitted_ms = max(last_admitted_ms, time.time_ns() // 1_000_000)
                            ops["admitted"] += 1
                            books["rpm"]["checked"] += 1
                            books["tpm"]["checked"] += ESTIMATE
                            await asyncio.sleep(WORK_S)
                            delta = actual - ESTIMATE
                            if delta:
                                try:
                                    await lease.adjust(tpm=delta)
                                except RateLimiterUnavailable:
                                    # Throttled past the retries: not applied (with reservations
                                    # the block's part may have been, see the report).
                                    ops["adjust_unavailable"] += 1
                                else:
                                    ops["adjusted"] += 1
                                    books["tpm"]["forced" if delta > 0 else "released"] += abs(
                                        delta
                                    )
                            if roll_back:
                                for name, net in lease.consumed.items():
                                    if net > 0:
                                        books[name]["released"] += net
                                    elif net < 0:
                                        books[name]["forced"] += -net
                                raise Abort
                    except RateLimitExceeded:
                        latencies.append(time.monotonic() - called)
                        ops["denied"] += 1
                        pause = rng.uniform(*DENIED_PAUSE_S)
                    except RateLimiterUnavailable:
                        latencies.append(time.monotonic() - called)
                        ops["unavailable"] += 1
                        pause = rng.uniform(*DENIED_PAUSE_S)
                    except Abort:
                        ops["rolled_back"] += 1
                    else:
                        ops["kept"] += 1
                        acquires[entity_id] += 1
                    await asyncio.sleep(pause)

            started_ms = time.time_ns() // 1_000_000
            await asyncio.gather(*(task(i) for i in range(tasks)))
            ended_ms = time.time_ns() // 1_000_000
            reserved_at_end = limiter.reserved()
            await asyncio.sleep(settle_s)
            reserved_before_close = limiter.reserved()
            calls = dict(limiter.ledger.calls)
            conflicts = limiter.ledger.conflicts
        reserved_after_close = limiter.reserved()
        closed_ms = time.time_ns() // 1_000_000
    finally:
        library_log.removeHandler(logs)
    return {
        "index": index,
        "ops": dict(ops),
        "ledger": {
            eid: {name: dict(books) for name, books in per.items()} for eid, per in ledger.items()
        },
        "kept": dict(acquires),
        "ready_ms": ready_ms,
        "go_ms": go_ms,
        "started_ms": started_ms,
        "ended_ms": ended_ms,
        "last_admitted_ms": last_admitted_ms,
        "latency_ms": _percentiles(latencies),
        "closed_ms": closed_ms,
        "reserved_at_end": _plain(reserved_at_end),
        "reserved_before_close": _plain(reserved_before_close),
        "reserved_after_close": _plain(reserved_after_close),
        "calls": calls,
        "conflicts": conflicts,
        "logs": dict(logs.counts),
        "log_samples": logs.samples,
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    at = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    result = {
        k: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)
        for k, q in at.items()
    }
    result["max"] = round(ordered[-1] * 1000, 1)
    return result


def _plain(held: dict[tuple[str, str], dict[str, int]]) -> dict[str, dict[str, int]]:
    return {f"{eid}/{resource}": dict(tokens) for (eid, resource), tokens in held.items()}
