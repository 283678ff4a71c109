"""Contention: several processes × many tasks on one bucket, and on one parent through cascade.

Every worker returns the exact ledger of what it was admitted, took, gave back and rolled back.
Afterwards the bucket item itself is read: its `cn`/`rl` counters (millitokens ever consumed /
released) must equal the workers' sums to the token (no lost and no doubled update, every
rollback undone exactly), its tokens must equal burst minus the net (no drift between state and
counters), and what was admitted must fit in what was allowed (no over-admission). With a frozen
injected clock nothing refills, so the books balance exactly; with the real clock the bound is
burst + refill over the elapsed window.

Every test runs twice (one more runs with reservations only, blocks still held at close):
`direct` (each acquire writes the bucket) and `reserved` (the workers'
limiters have `Reservations()`: blocks are taken from the bucket with one conditional write,
acquires and lease calls are served from them, and what is left goes back at hold expiry and at
`close()`). With reservations the bucket's gross counters also count every block taken (`cn`)
and every block given back (`rl`), so they exceed the books by the same amount (or fall short of
them by the same amount, when tokens given back into a block were spent from it again): only
the net (`cn` - `rl`) is compared with the books there, and it must be exact once every worker
has closed its limiter. The tokens, the over-admission bounds and everything else are the same.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from figures import Figures, Size
from reliability_workers import FROZEN_MS, RESOURCE, run_worker

from zae_limiter import (
    FailureMode,
    Limit,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    Reservations,
    StackOptions,
)
from zae_limiter.engine import quota as quota_state
from zae_limiter.engine import stored as stored_state
from zae_limiter.engine.engine import MAX_ROUNDS
from zae_limiter.storage.dynamodb.repository import Repository
from zae_limiter.storage.protocol import ConditionFailed

pytestmark = pytest.mark.integration

TABLE = "contention"
OPS = ("acquire", "adjust_up", "adjust_down", "consume", "consume_denied", "release")
MODES = {"direct": False, "reserved": True}


def run_workers(
    endpoint_url: str,
    entity_ids: list[str],
    limit: Limit,
    size: Size,
    cascade: bool,
    mix: str,
    frozen: bool = True,
    attempts: int | None = None,
    reserve: bool = False,
    pace: float = 0.0,
    hold_seconds: float | None = None,
) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(size.processes, mp_context=ctx) as pool:
        futures = [
            pool.submit(
                run_worker,
                endpoint_url,
                TABLE,
                entity_ids[i % len(entity_ids)],
                limit,
                size.tasks,
                attempts or size.attempts,
                cascade,
                1000 + i,
                mix,
                frozen,
                reserve,
                pace,
                hold_seconds,
            )
            for i in range(size.processes)
        ]
        results = [f.result(timeout=300) for f in futures]
    for result in results:
        # Every block went back when its worker closed: nothing held, no give-back failed.
        assert result["held_after_close"] == {}, "a closed limiter still holds reserved tokens"
        assert result["give_back_failures"] == [], "reserved tokens were not given back"
        if not reserve:
            assert result["held_at_close"] == 0
    return results


async def counters(
    endpoint_url: str, entity_id: str, limit: Limit, missing_ok: bool = False
) -> dict[str, int]:
    """The bucket item as stored, in millitokens (read directly, not through a limiter).
    `missing_ok`: an item never written reads as a full bucket with zero counters."""
    repo = Repository(TABLE, None, endpoint_url)
    try:
        bucket = await repo.get_bucket(entity_id, RESOURCE)
    finally:
        await repo.close()
    if bucket is None and missing_ok:
        return {"cn": 0, "rl": 0, "tk": limit.burst_milli}
    assert bucket is not None, f"no bucket for {entity_id}"
    state = bucket.limits[limit.name]
    return {
        "cn": state.consumed_milli,
        "rl": state.released_milli,
        # what the bucket holds at the frozen clock (the frozen suites' only instant)
        "tk": (quota_state if limit.is_quota else stored_state).available(
            limit, state, FROZEN_MS
        ),
    }


def totals(results: list[dict[str, Any]]) -> dict[str, int]:
    out = {"consumed": 0, "released": 0, "checked": 0}
    for r in results:
        for key in out:
            out[key] += r[key]
    return out


def count(results: list[dict[str, Any]], *names: str) -> int:
    return sum(r["ops"].get(name, 0) for r in results for name in names)


def check_ledger(
    figures: Figures,
    books: dict[str, int],
    stored: dict[str, int],
    cascade: bool = False,
    reserve: bool = False,
) -> int:
    """Assert the stored counters match the books to the token; returns the net kept.

    Without cascade the gross counters equal the books. With cascade, an acquire whose write
    to one entity landed while the other's was refused gives the first back itself, so both
    gross counters may exceed the books by the same amount: the net is still exact.

    With reservations the gross counters are not the books' at all: `cn` grows by every block
    taken (not by each acquire), `rl` by every block given back, and a lease's give-backs and
    rollbacks go into the block without a write (tokens that a later acquire spends again from
    the block without a write either). So `cn` and `rl` may both lie above or both below the
    books, by the same amount: only the net is checked, and it is exact because every block was
    given back when its worker closed (`run_workers` checks that none failed).
    """
    extra_cn = stored["cn"] - books["consumed"] * 1000
    extra_rl = stored["rl"] - books["released"] * 1000
    net_error = extra_cn - extra_rl  # > 0: consumption doubled (or a give-back lost)
    figures.add(
        ledger_checks=1,
        doubled_updates=max(0, net_error) // 1000,
        lost_updates=max(0, -net_error) // 1000,
    )
    if reserve:
        figures.add(reserved_gross_over_books=extra_cn // 1000)
    else:
        figures.add(cascade_partial_give_backs=extra_cn // 1000)
    assert extra_cn == extra_rl, "net consumption lost or doubled"
    if not reserve:
        # Gross checks, only meaningful when every token the books saw was written.
        assert extra_cn >= 0, "consumption lost"
        if not cascade:
            assert extra_cn == 0, "consumption given back that the books never saw"
    return books["consumed"] - books["released"]


def record(
    figures: Figures, size: Size, results: list[dict[str, Any]], reserve: bool = False
) -> None:
    figures.add(
        clients=size.processes * size.tasks,
        processes=size.processes,
        operations=count(results, *OPS) + count(results, "rolled_back"),
        admitted=count(results, "admitted"),
        denied=count(results, "denied"),
        rolled_back=count(results, "rolled_back"),
    )
    # DynamoDB calls per mode: reservations should need far fewer writes per operation.
    prefix = "reserved" if reserve else "direct"
    figures.add(
        **{
            f"{prefix}_operations": count(results, *OPS) + count(results, "rolled_back"),
            f"{prefix}_update_calls": count(results, "update_calls"),
            f"{prefix}_get_calls": count(results, "get_calls"),
        }
    )
    if reserve:
        figures.add(
            reserved_tokens_given_back_at_close=sum(r["held_at_close"] for r in results),
        )


async def setup(endpoint_url: str, children: list[str] | None = None) -> None:
    async with RateLimiter(
        name=TABLE, endpoint_url=endpoint_url, stack_options=StackOptions()
    ) as limiter:
        await limiter.create_entity("proj")
        for child in children or []:
            await limiter.create_entity(child, parent_id="proj")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mix", ["count", "full"])
async def test_one_bucket_exact_ledger(
    endpoint_url: str, size: Size, figures: Figures, mix: str, mode: str
) -> None:
    """All processes on one bucket. `count`: 1 token per acquire, with rollbacks, so the burst
    is the exact ceiling. `full`: acquire 1-3, adjust up and down, consume more, release early,
    roll back."""
    reserve = MODES[mode]
    total = size.processes * size.tasks * size.attempts
    burst = max(10, total // 3)
    limit = Limit.per_hour("tok", burst)
    await setup(endpoint_url)
    results = run_workers(
        endpoint_url, ["proj"], limit, size, cascade=False, mix=mix, reserve=reserve
    )
    record(figures, size, results, reserve)
    books = totals(results)
    stored = await counters(endpoint_url, "proj", limit)

    assert count(results, "unavailable") == 0, "contention must resolve, not give up"
    assert count(results, "acquire") == total
    assert count(results, "denied") > 0, "the workload must exhaust the bucket"
    assert count(results, "rolled_back") > 0
    kept = check_ledger(figures, books, stored, reserve=reserve)
    # Frozen clock: the tokens are exactly the burst minus the net consumption.
    assert stored["tk"] == (burst - kept) * 1000
    if mix == "count":
        # Only checked consumption, one token at a time: never more than the burst kept.
        over = max(0, kept - burst)
        assert stored["tk"] >= 0
    else:
        # Forced adjustments may overdraw; checked takes still never exceed what existed.
        over = max(0, books["checked"] - (burst + books["released"]))
        assert count(results, "adjust_up", "adjust_down", "consume", "release") > 0
    figures.add(over_admissions=over)
    assert over == 0, f"over-admission of {over} tokens"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mix", ["count", "full"])
async def test_one_quota_exact_ledger(
    endpoint_url: str, size: Size, figures: Figures, mix: str, mode: str
) -> None:
    """All processes on one quota (`count`: a monthly cron quota in Paris; `full`: a session
    quota): its window's amount is the exact ceiling, window-conditioned writes make stale views
    harmless, and the counters are the books. With reservations a quota is never served from a
    block, so even the gross counters are the books there."""
    reserve = MODES[mode]
    total = size.processes * size.tasks * size.attempts
    amount = max(10, total // 3)
    if mix == "count":
        limit = Limit.quota("tok", amount, cron="0 0 1 * *", tz="Europe/Paris")
    else:
        limit = Limit.quota("tok", amount, reset_after=timedelta(hours=5))
    await setup(endpoint_url)
    results = run_workers(
        endpoint_url, ["proj"], limit, size, cascade=False, mix=mix, reserve=reserve
    )
    record(figures, size, results, reserve)
    books = totals(results)
    stored = await counters(endpoint_url, "proj", limit)

    assert count(results, "unavailable") == 0, "contention must resolve, not give up"
    assert count(results, "denied") > 0, "the workload must exhaust the quota"
    assert count(results, "rolled_back") > 0
    assert all(r["held_at_close"] == 0 for r in results), "a quota was served from a block"
    kept = check_ledger(figures, books, stored)
    assert stored["tk"] == (amount - kept) * 1000
    if mix == "count":
        over = max(0, kept - amount)
    else:
        over = max(0, books["checked"] - (amount + books["released"]))
    figures.add(over_admissions=over, quota_runs=1)
    assert over == 0, f"the quota admitted {over} tokens over its amount"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mix", ["count", "full"])
async def test_one_parent_through_cascade_exact_ledger(
    endpoint_url: str, size: Size, figures: Figures, mix: str, mode: str
) -> None:
    """One child per process, one shared parent: each child's bucket holds exactly its own
    process's books, and the parent's holds the sum."""
    reserve = MODES[mode]
    total = size.processes * size.tasks * size.attempts
    burst = max(10, total // 3)
    limit = Limit.per_hour("tok", burst)
    children = [f"key-{i}" for i in range(size.processes)]
    await setup(endpoint_url, children)
    results = run_workers(
        endpoint_url, children, limit, size, cascade=True, mix=mix, reserve=reserve
    )
    record(figures, size, results, reserve)

    assert count(results, "unavailable") == 0
    assert count(results, "denied") > 0
    for result in results:
        # A worker whose every acquire met an exhausted parent never wrote its child's item
        # (with reservations a late starter can find the parent drained by the others' blocks
        # and their consumption): then its books must be empty too, which check_ledger checks.
        child = await counters(
            endpoint_url, result["entity_id"], limit, missing_ok=not result["ops"].get("admitted")
        )
        child_kept = check_ledger(figures, totals([result]), child, cascade=True, reserve=reserve)
        assert child["tk"] == (burst - child_kept) * 1000
    books = totals(results)
    parent = await counters(endpoint_url, "proj", limit)
    kept = check_ledger(figures, books, parent, cascade=True, reserve=reserve)
    assert parent["tk"] == (burst - kept) * 1000
    if mix == "count":
        over = max(0, kept - burst)
    else:
        over = max(0, books["checked"] - (burst + books["released"]))
    figures.add(over_admissions=over)
    assert over == 0, f"the parent admitted {over} tokens over its burst"


async def test_reserved_blocks_go_back_exactly_at_close(
    endpoint_url: str, size: Size, figures: Figures
) -> None:
    """Reservations only, the `full` mix on a parent and one child per process whose bursts are
    far from exhausted, with a hold time longer than the run: the workers still hold blocks
    (their child's and the shared parent's) when they close their limiters, and `close()` gives
    them back. Afterwards every bucket's net is exactly its books, and its tokens are exactly the
    burst minus that net."""
    total = size.processes * size.tasks * size.attempts
    burst = 50 * total
    limit = Limit.per_hour("tok", burst)
    children = [f"key-{i}" for i in range(size.processes)]
    await setup(endpoint_url, children)
    results = run_workers(
        endpoint_url,
        children,
        limit,
        size,
        cascade=True,
        mix="full",
        reserve=True,
        hold_seconds=120.0,
    )
    record(figures, size, results, reserve=True)

    assert count(results, "unavailable") == 0
    # At most 6 tokens an operation plus a block of 10% per process: far below the burst.
    assert count(results, "denied") == 0
    # Nothing expires during the run: what the blocks hold goes back at close only.
    assert sum(r["held_at_close"] for r in results) > 0, "the workers must close holding blocks"
    for result in results:
        child = await counters(endpoint_url, result["entity_id"], limit)
        child_kept = check_ledger(figures, totals([result]), child, cascade=True, reserve=True)
        assert child["tk"] == (burst - child_kept) * 1000
    parent = await counters(endpoint_url, "proj", limit)
    kept = check_ledger(figures, totals(results), parent, cascade=True, reserve=True)
    assert parent["tk"] == (burst - kept) * 1000


@pytest.mark.parametrize("mode", MODES)
async def test_moving_clock_admits_at_most_burst_plus_refill(
    endpoint_url: str, size: Size, figures: Figures, mode: str
) -> None:
    """Real time: 5 tokens burst, 2 tokens/s, demand well above refill. Whatever was kept fits
    in burst + refill over the workers' window; the counters stay exact. (With reservations a
    block of this burst is never more than the shortfall: 10% of 5 tokens rounds down to 0. The
    denial memory answers most denials locally, in no time, so the tasks pause 80 ms after a
    denial there; without, they pause as well: the run lasts long enough for refill to matter.)"""
    reserve = MODES[mode]
    limit = Limit.custom("tok", 5, 2, 1)
    await setup(endpoint_url)
    results = run_workers(
        endpoint_url,
        ["proj"],
        limit,
        size,
        cascade=False,
        mix="count",
        frozen=False,
        # Long enough that refill matters even though a write at full defers refill to the next
        # epoch boundary (500 ms here): at least 24 attempts a task, with a pause after each
        # denial, so the run lasts seconds at every size and on any machine.
        attempts=max(24, size.attempts * 4),
        reserve=reserve,
        pace=0.08,
    )
    record(figures, size, results, reserve)
    books = totals(results)
    stored = await counters(endpoint_url, "proj", limit)
    assert count(results, "unavailable") == 0, "contention must end in admit or deny"
    kept = check_ledger(figures, books, stored, reserve=reserve)
    # The bucket comes to exist full at its first write (after the first worker started) and
    # gains refill_amount per refill_period from then on.
    started_ms = min(r["started_ms"] for r in results)
    ended_ms = max(r["ended_ms"] for r in results)
    elapsed_ms = ended_ms - started_ms
    allowed = limit.burst + elapsed_ms * limit.refill_amount // (limit.refill_period_seconds * 1000)
    over = max(0, kept - allowed)
    figures.add(over_admissions=over)
    assert over == 0, f"kept {kept} tokens, allowed {allowed} over {elapsed_ms} ms"
    assert kept > limit.burst, "the window must be long enough for refill to matter"
    assert count(results, "denied") > 0


@pytest.mark.parametrize("reservations", MODES)
@pytest.mark.parametrize("mode", [FailureMode.FAIL_OPEN, FailureMode.FAIL_CLOSED])
async def test_endless_conflicts_are_no_denial_and_not_admitted(
    endpoint_url: str, figures: Figures, mode: FailureMode, reservations: str
) -> None:
    """Other clients win every round (each write's condition fails with a bucket that still
    looks admissible): after MAX_ROUNDS the acquire gives up. No limit was exceeded, so it is no
    `RateLimitExceeded`; DynamoDB answered every call, so it is no outage either: FAIL_OPEN must
    not admit it. `RateLimiterUnavailable` says so, and nothing is written. With reservations
    the refused write is the reserve of a block (the first acquire's block was exactly its one
    token, so the second must reserve): the same holds, and the block stays empty."""
    limit = Limit.per_hour("tok", 50)
    rounds = 0
    async with RateLimiter(
        name=TABLE,
        endpoint_url=endpoint_url,
        stack_options=StackOptions(),
        failure_mode=mode,
        clock=lambda: FROZEN_MS,
        reservations=Reservations() if MODES[reservations] else None,
    ) as limiter:
        async with limiter.acquire("proj", RESOURCE, [limit], {"tok": 1}):
            pass
        assert limiter.reserved() == {}
        real_write = limiter.repository.write_bucket

        async def always_conflict(entity_id: str, resource: str, *args: Any, **kw: Any) -> Any:
            nonlocal rounds
            rounds += 1
            raise ConditionFailed(await limiter.repository.get_bucket(entity_id, resource))

        limiter.repository.write_bucket = always_conflict  # type: ignore[method-assign]
        with pytest.raises(RateLimiterUnavailable, match="contention") as raised:
            async with limiter.acquire("proj", RESOURCE, [limit], {"tok": 1}):
                pytest.fail("admitted without winning a write")
        assert not isinstance(raised.value, RateLimitExceeded)
        limiter.repository.write_bucket = real_write  # type: ignore[method-assign]
        assert limiter.reserved() == {}
    assert rounds == MAX_ROUNDS
    stored = await counters(endpoint_url, "proj", limit)
    assert stored["cn"] == 1000
    figures.add(operations=2, admitted=1, denied=1, ledger_checks=1)


async def test_a_concurrency_cap_never_over_admits(
    endpoint_url: str, size: Size, figures: Figures
) -> None:
    """Every process's tasks take leases of one concurrency cap (size.attempts each, retrying
    after denials) and hold them a few ms: a counter shared by the processes, incremented
    inside each lease, never exceeds the cap, every lease is admitted in the end, and the
    cap's count is back to zero, equal to its (absent) entries."""
    from concurrency_workers import RESOURCE as CAP_RESOURCE
    from concurrency_workers import hold_worker

    await setup(endpoint_url)
    # Fewer slots than one process's tasks: the cap fills even if the spawned processes do not
    # overlap, and more so when they do.
    cap = max(1, size.tasks - 1)
    ctx = multiprocessing.get_context("spawn")
    counter, peak, results = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Queue()
    procs = [
        ctx.Process(
            target=hold_worker,
            args=(endpoint_url, TABLE, "proj", cap, size.tasks, size.attempts, 500 + i,
                  counter, peak, results, (0.02, 0.05)),
        )
        for i in range(size.processes)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    admitted = sum(r["admitted"] for r in out)
    over = sum(r["over"] for r in out)
    figures.add(
        clients=size.processes * size.tasks,
        processes=size.processes,
        operations=admitted + sum(r["denied"] for r in out),
        admitted=admitted,
        over_admissions=over,
    )
    assert over == 0 and peak.value <= cap, f"{peak.value} in flight, cap {cap}"
    assert admitted == size.processes * size.tasks * size.attempts
    assert sum(r["denied"] for r in out) > 0, "the workload must fill the cap"
    repo = Repository(TABLE, None, endpoint_url)
    try:
        item = await repo.get_slots("proj", CAP_RESOURCE)
    finally:
        await repo.close()
    assert item is not None and item.held == {"inflight": 0}
    assert item.holders.get("inflight", {}) == {}
