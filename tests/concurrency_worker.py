"""Worker processes for the multi-process tests (imported by `spawn`ed children)."""

from __future__ import annotations

import asyncio
import random

from zae_limiter import Limit, RateLimiter, RateLimitExceeded

FROZEN_MS = 1_800_000_000_000


class Abort(Exception):
    pass


def run_worker(endpoint_url: str, table: str, entity_id: str, limit: Limit, tasks: int,
               attempts: int, cascade: bool, seed: int, adjust: bool = True) -> dict[str, int]:
    """Hammer one bucket; return this process's ledger of what it was admitted and kept."""
    return asyncio.run(_worker(endpoint_url, table, entity_id, limit, tasks, attempts, cascade,
                               seed, adjust))


async def _worker(endpoint_url: str, table: str, entity_id: str, limit: Limit, tasks: int,
                  attempts: int, cascade: bool, seed: int, adjust: bool) -> dict[str, int]:
    rng = random.Random(seed)
    ledger = {"admitted": 0, "denied": 0, "rolled_back": 0, "kept": 0}
    # A frozen clock: no refill, so the ledger must balance to the token.
    async with RateLimiter(name=table, endpoint_url=endpoint_url,
                           clock=lambda: FROZEN_MS) as limiter:

        async def task() -> None:
            for _ in range(attempts):
                amount = rng.randint(1, 3)
                action = rng.random()
                try:
                    async with limiter.acquire(entity_id, "shared", [limit], {"tok": amount},
                                               cascade=cascade) as lease:
                        ledger["admitted"] += 1
                        if adjust and action < 0.2:
                            await lease.adjust(tok=1)
                        if action > 0.85:
                            raise Abort
                        ledger["kept"] += lease.consumed["tok"]
                except RateLimitExceeded:
                    ledger["denied"] += 1
                except Abort:
                    ledger["rolled_back"] += 1

        await asyncio.gather(*(task() for _ in range(tasks)))
    return ledger
