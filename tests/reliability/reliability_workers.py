"""Worker processes of the contention tests (imported by `spawn`ed children).

Each worker runs `tasks` concurrent asyncio tasks, each doing `attempts` operations on one
entity's bucket (and its parent's with cascade), and returns its own exact ledger: every token it
was admitted, took later, gave back or rolled back, counted only when the call returned.

With `reserve=True` the worker's limiter has `Reservations()`: acquires are served from blocks
taken from the shared bucket, leases settle against the blocks first, and what a block still
holds goes back when its hold time ends and at `close()`. The ledger counts what the callers
were given, as without reservations; the worker also reports what its blocks held when it closed
and every give-back the limiter logged as failed (none may fail here: there is no fault).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from typing import Any

from zae_limiter import (
    Limit,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    Reservations,
    StackOptions,
)

FROZEN_MS = 1_800_000_000_000
RESOURCE = "shared"


class Abort(Exception):
    """Raised inside an acquire block: the lease must be given back exactly."""


GIVE_BACK_FAILED = "reserved tokens not given back"


class GiveBackFailures(logging.Handler):
    """Collects the limiter's warnings that reserved tokens could not be given back."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(GIVE_BACK_FAILED):
            self.records.append(record)


def run_worker(
    endpoint_url: str,
    table: str,
    entity_id: str,
    limit: Limit,
    tasks: int,
    attempts: int,
    cascade: bool,
    seed: int,
    mix: str,
    frozen: bool,
    reserve: bool = False,
    pace: float = 0.0,
    hold_seconds: float | None = None,
) -> dict[str, Any]:
    return asyncio.run(
        _worker(
            endpoint_url,
            table,
            entity_id,
            limit,
            tasks,
            attempts,
            cascade,
            seed,
            mix,
            frozen,
            reserve,
            pace,
            hold_seconds,
        )
    )


async def _worker(
    endpoint_url: str,
    table: str,
    entity_id: str,
    limit: Limit,
    tasks: int,
    attempts: int,
    cascade: bool,
    seed: int,
    mix: str,
    frozen: bool,
    reserve: bool = False,
    pace: float = 0.0,
    hold_seconds: float | None = None,
) -> dict[str, Any]:
    """`pace`: seconds a task waits after a denial before its next attempt (denials that a
    reservation's denial memory answers locally take no time at all). `hold_seconds`: the
    reservations' hold time (default: `Reservations()`'s)."""
    rng = random.Random(seed)
    ops: Counter[str] = Counter()
    # Tokens, as far as this process knows for certain (a call counts once it returned).
    ledger = {"consumed": 0, "released": 0, "checked": 0}
    clock = (lambda: FROZEN_MS) if frozen else None
    failures = GiveBackFailures()
    logging.getLogger("zae_limiter").addHandler(failures)
    limiter = RateLimiter(
        name=table,
        endpoint_url=endpoint_url,
        clock=clock,
        reservations=(
            None
            if not reserve
            else Reservations()
            if hold_seconds is None
            else Reservations(hold_seconds=hold_seconds)
        ),
    )
    async with limiter:

        async def task() -> None:
            # Each task rolls back its first admitted acquire, so every run has rollbacks to
            # check whatever the random draws; later ones roll back at random.
            rolled_back_once = False
            for _ in range(attempts):
                amount = 1 if mix == "count" else rng.randint(1, 3)
                action = rng.random()
                ops["acquire"] += 1
                try:
                    async with limiter.acquire(
                        entity_id, RESOURCE, [limit], {limit.name: amount}, cascade=cascade
                    ) as lease:
                        ops["admitted"] += 1
                        ledger["consumed"] += amount
                        ledger["checked"] += amount
                        if mix == "full":
                            # A task's first admission adjusts up (then rolls back), so every
                            # run has lease operations whatever the draws at any size.
                            step = action if rolled_back_once else 0.1
                            await _mixed(lease, limit.name, step, ops, ledger)
                        if action > 0.8 or not rolled_back_once:
                            rolled_back_once = True
                            net = lease.consumed[limit.name]
                            ops["rolled_back"] += 1
                            ledger["released"] += max(net, 0)
                            ledger["consumed"] += max(-net, 0)
                            raise Abort
                except RateLimitExceeded:
                    ops["denied"] += 1
                    if pace:
                        await asyncio.sleep(pace)
                except RateLimiterUnavailable:
                    ops["unavailable"] += 1
                except Abort:
                    pass

        started_ms = time.time_ns() // 1_000_000
        await asyncio.gather(*(task() for _ in range(tasks)))
        ended_ms = time.time_ns() // 1_000_000
        # What the blocks still hold goes back when the limiter closes (the `async with` ends).
        held_at_close = sum(n for held in limiter.reserved().values() for n in held.values())
    logging.getLogger("zae_limiter").removeHandler(failures)
    ops["update_calls"] = limiter.ledger.calls["UpdateItem"]
    ops["get_calls"] = limiter.ledger.calls["GetItem"]
    return {
        "entity_id": entity_id,
        "ops": dict(ops),
        **ledger,
        "started_ms": started_ms,
        "ended_ms": ended_ms,
        "held_at_close": held_at_close,
        "held_after_close": limiter.reserved(),
        "give_back_failures": [r.getMessage() for r in failures.records],
    }


async def _mixed(
    lease: Any, name: str, action: float, ops: Counter[str], ledger: dict[str, int]
) -> None:
    """adjust up and down, take more (checked), release early."""
    if action < 0.2:
        await lease.adjust(**{name: 2})
        ops["adjust_up"] += 1
        ledger["consumed"] += 2
    elif action < 0.35 and lease.consumed[name] >= 2:
        await lease.adjust(**{name: -1})
        ops["adjust_down"] += 1
        ledger["released"] += 1
    elif action < 0.5:
        try:
            await lease.consume(**{name: 1})
        except RateLimitExceeded:
            ops["consume_denied"] += 1
        else:
            ops["consume"] += 1
            ledger["consumed"] += 1
            ledger["checked"] += 1
    elif action < 0.6 and lease.consumed[name] >= 2:
        await lease.release(**{name: 1})
        ops["release"] += 1
        ledger["released"] += 1


# The hot-bucket workload of an LLM gateway's big tenant: limits far from exhausted, so every
# denial would be a false one (see test_hot_bucket.py).
HOT_LIMITS = (Limit.per_day("rpm", 10**7), Limit.per_day("tpm", 10**9))
HOT_ESTIMATE = 100
HOT_EXTRA = 20


async def prepare_hot(endpoint_url: str, table: str, entity_id: str, fill: str) -> None:
    """Create the table and the entity; `fill="half"` consumes half of both limits first."""
    async with RateLimiter(
        name=table, endpoint_url=endpoint_url, stack_options=StackOptions()
    ) as limiter:
        await limiter.create_entity(entity_id)
        if fill == "half":
            async with limiter.acquire(
                entity_id, RESOURCE, list(HOT_LIMITS), {"rpm": 1, "tpm": 1}
            ) as lease:
                await lease.adjust(rpm=10**7 // 2, tpm=10**9 // 2)


def run_hot_worker(endpoint_url: str, table: str, entity_id: str, tasks: int,
                   attempts: int) -> dict[str, Any]:
    return asyncio.run(hot_worker(endpoint_url, table, entity_id, tasks, attempts))


async def hot_worker(endpoint_url: str, table: str, entity_id: str, tasks: int,
                     attempts: int) -> dict[str, Any]:
    """`tasks` concurrent tasks, each `attempts` times: acquire(rpm 1, tpm 100), adjust(tpm +20)."""
    ops: Counter[str] = Counter()
    async with RateLimiter(name=table, endpoint_url=endpoint_url) as limiter:

        async def task() -> None:
            for _ in range(attempts):
                ops["acquire"] += 1
                try:
                    async with limiter.acquire(
                        entity_id, RESOURCE, list(HOT_LIMITS), {"rpm": 1, "tpm": HOT_ESTIMATE}
                    ) as lease:
                        ops["admitted"] += 1
                        await lease.adjust(tpm=HOT_EXTRA)
                        ops["adjusted"] += 1
                except RateLimitExceeded as exc:
                    ops["denied"] += 1
                    ops["denied_with_violation"] += int(bool(exc.violations))
                except RateLimiterUnavailable:
                    ops["unavailable"] += 1

        await asyncio.gather(*(task() for _ in range(tasks)))
        ops["conflicts"] = limiter.ledger.conflicts
        ops["update_calls"] = limiter.ledger.calls["UpdateItem"]
        ops["get_calls"] = limiter.ledger.calls["GetItem"]
    return dict(ops)
