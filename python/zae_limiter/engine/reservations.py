"""Reservations: blocks of tokens taken ahead from the shared buckets and spent locally.

With `RateLimiter(reservations=Reservations())`, a process takes a *block* of tokens from a bucket
item with one ordinary conditional write (the engine's commit: every limit of the item at once)
and serves acquires from it with one call into the core (`core.Block`) and no I/O. Nothing is
ever admitted that the shared bucket did not grant first, so the invariant of the buckets holds
summed over every process; what a process holds and does not use goes back with an unconditional
add (on `close()`, when the block's hold time ends, when its limits change). docs/design.md,
"Reservations", gives the sizing rule, the failure cases and what `available()` reports.

"Lease" names what one `acquire` yields; a reservation is a process's stock of tokens behind
many leases. A `Lease` settles through a `Reserver` exactly as through the `Engine` (the same
`commit` / `force_each`), which spends or refills the block first and writes only the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from .. import core
from ..core import units
from ..exceptions import RateLimitExceeded
from ..models import Limit, LimitStatus, Reservations
from .engine import BucketKey, Engine, Landing, Target, available_milli, bucket_input, limit_status

__all__ = ["Reserver"]

log = logging.getLogger("zae_limiter")

# A block's observed rate is smoothed over its top-ups: half the old estimate, half the new.
RATE_WEIGHT = 0.5
# Shortest interval a rate is measured over (two top-ups closer than this are one burst).
MIN_RATE_INTERVAL = 0.001
# The low watermark covers this many top-up latencies of demand: the latency is a smoothed
# estimate, and a write slower than it (a throttled retry, a conflict) must still land in time.
WATERMARK_LATENCIES = 2.0
# The least time between two passes of the sweeper over the blocks (a block given back a little
# after its hold time changes nothing; retired blocks wake it at once).
SWEEP_INTERVAL_S = 0.1


class Holding:
    """This process's block for one bucket item, with what sizing and denials need to know."""

    __slots__ = (
        "block",
        "denied_until",
        "expires_at",
        "inflight",
        "latency",
        "limits",
        "live",
        "low",
        "queued",
        "rate",
        "target",
        "topped_at",
    )

    def __init__(self, target: Target) -> None:
        self.target = target
        self.limits = target.limits
        self.block = core.Block(len(target.limits))
        self.rate = [0.0] * len(target.limits)  # millitokens per second spent from the block
        self.queued = [0] * len(target.limits)  # needs of tasks waiting for a top-up
        self.topped_at: float | None = None  # time.monotonic() of the last top-up
        self.expires_at = math.inf  # when the held tokens go back
        self.denied_until = 0.0  # the denial memory (time.monotonic())
        self.inflight: asyncio.Future[None] | None = None  # the top-up under way
        self.live = True  # False once given back for good, replaced or forgotten
        self.latency = 0.0  # seconds a top-up write takes, smoothed (see `_reserve`)
        # Per limit, the holding under which a top-up starts ahead, in the background
        # (millitokens); None until a demand was observed.
        self.low: list[int] | None = None

    def covers(self, limits: Sequence[Limit]) -> bool:
        return self.limits is limits or self.limits == limits


class Reserver:
    """Blocks of one limiter, per bucket item; settles leases against them (see module doc)."""

    def __init__(self, engine: Engine, policy: Reservations) -> None:
        self.engine = engine
        self.policy = policy
        self.holdings: dict[BucketKey, Holding] = {}
        self._retired: list[Holding] = []  # replaced blocks still holding tokens
        self._sweeper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # retired blocks are waiting to go back, or closing
        self._closing = False
        # Times a take found its blocks short and waited for a top-up (the first take of an
        # item, a demand above what the watermark foresaw, a bucket running low).
        self.waits = 0
        # Top-ups ahead that failed: one whose outcome is unknown may have landed, its tokens
        # then consumed in the bucket and never in a block (at most one block each; refill
        # brings them back): under-admission, counted.
        self.failed_ahead = 0

    # -- the hot path -----------------------------------------------------------------------

    async def acquire(
        self,
        resource: str,
        limit_sets: Sequence[tuple[str, list[Limit]]],
        amounts: Mapping[str, int],
    ) -> list[Target]:
        """Take `amounts` from the blocks of every entity (a parent's too), reserving as needed;
        raises `RateLimitExceeded` when the shared buckets cannot cover it."""
        if _has_quota(limit_sets):
            # Never from blocks: a block reserved in one window could be spent in the next,
            # which would then admit beyond its quota. Every such acquire is a write.
            targets = await self.engine.targets(resource, limit_sets)
            await self.engine.commit(targets, amounts)
            return targets
        holdings = [self._holding(eid, resource, limits) for eid, limits in limit_sets]
        if _soft(holdings):
            # Soft limits are not served from blocks: a block holds only what a checked write
            # granted, and a soft limit must be debited past that. Straight to the buckets, so
            # the lease settles through the engine too (no holding has these targets).
            targets = await self.engine.targets(resource, limit_sets)
            await self.engine.commit(targets, amounts)
            return targets
        return [h.target for h in await self._take(holdings, amounts)]

    @property
    def sweeping(self) -> bool:
        """A give-back of blocks whose hold ended is under way in the background."""
        return self._sweeper is not None and not self._sweeper.done()

    def take_local(
        self,
        resource: str,
        limit_sets: Sequence[tuple[str, list[Limit]]],
        amounts: Mapping[str, int],
    ) -> list[Target] | None:
        """`acquire` when the blocks cover it, with no I/O and no await; None otherwise (then
        `acquire` reserves)."""
        if _has_quota(limit_sets):
            return None
        holdings = [self._holding(eid, resource, limits) for eid, limits in limit_sets]
        if _soft(holdings):
            return None
        needs = [self._needs(h, amounts) for h in holdings]
        if self._spend(holdings, needs):
            self._ahead(holdings, needs)
            return [h.target for h in holdings]
        return None

    @staticmethod
    def _needs(holding: Holding, amounts: Mapping[str, int]) -> list[int]:
        return units.milli_of(amounts, holding.limits)

    @staticmethod
    def _spend(holdings: Sequence[Holding], needs: list[list[int]]) -> bool:
        if len(holdings) == 1:
            return holdings[0].block.take(needs[0])
        return core.take_all([h.block for h in holdings], needs)

    def _holding(self, entity_id: str, resource: str, limits: list[Limit]) -> Holding:
        key = (entity_id, resource)
        holding = self.holdings.get(key)
        if holding is not None and holding.covers(limits):
            return holding
        if holding is not None:
            # Its limits changed: what it holds goes back; the new block starts empty.
            self._retire([holding])
            del self.holdings[key]
        holding = Holding(Target(entity_id, resource, list(limits)))
        if holding.target.soft is None:
            self.holdings[key] = holding
        # else never kept, so never reserved for, topped up or given back: see `acquire`.
        return holding

    async def _take(
        self, holdings: Sequence[Holding], amounts: Mapping[str, int]
    ) -> Sequence[Holding]:
        """Spend `amounts` from the blocks (topping them up as needed); the blocks spent from."""
        needs = [self._needs(h, amounts) for h in holdings]
        while True:
            if self._spend(holdings, needs):
                self._ahead(holdings, needs)
                return holdings
            self.waits += 1
            await self._top_up(holdings, needs)
            if not all(h.live for h in holdings):
                # Given back, replaced or forgotten while this task waited: a block no longer
                # in `holdings` would never be given back, so take the current ones.
                holdings = [
                    self._holding(h.target.entity_id, h.target.resource, h.limits) for h in holdings
                ]

    # -- Settler: what a lease asks -----------------------------------------------------------

    def clock(self) -> int:
        return self.engine.clock()

    def detach(
        self, work: Coroutine[Any, Any, None], what: str | None = None
    ) -> asyncio.Task[None]:
        return self.engine.detach(work, what)

    def settle_local(
        self, targets: Sequence[Target], amounts: Mapping[str, int], check: bool
    ) -> bool:
        """Settle a lease's change against its blocks alone, with no I/O: True when they cover
        it (then it is done), False when it needs `commit`/`force_each` (nothing changed)."""
        holdings = self._holdings_of(targets)
        if holdings is None:
            return False
        if check:
            return self._spend(holdings, [self._needs(h, amounts) for h in holdings])
        signed = [self._needs(h, amounts) for h in holdings]
        takes = [[max(a, 0) for a in s] for s in signed]
        if any(any(t) for t in takes) and not self._spend(holdings, takes):
            return False
        for h, s in zip(holdings, signed, strict=True):
            back = [max(-a, 0) for a in s]
            if any(back):
                h.block.add(back)
        return True

    async def commit(self, targets: Sequence[Target], amounts: Mapping[str, int]) -> None:
        holdings = self._holdings_of(targets)
        if holdings is None:
            await self.engine.commit(targets, amounts)
        else:
            await self._take(holdings, amounts)

    async def commit_each(
        self, targets: Sequence[Target], amounts: Sequence[Mapping[str, int]]
    ) -> None:
        """Each target's own amounts, checked: straight to the buckets. Only a lease over
        several resources asks this, and such a lease is never served from blocks (its
        targets are the engine's, not a holding's)."""
        await self.engine.commit_each(targets, amounts)

    async def force_each(
        self,
        targets: Sequence[Target],
        amounts: Sequence[Mapping[str, int]],
        landing: Landing | None = None,
    ) -> None:
        """Forced amounts (each target's own) settle against the blocks: a take spends what the
        block holds, a give-back refills it; only what no block covers is written. `landing`
        reports each target's fate: landed (covered by its block, or its write landed) or
        refused (its write certainly did not apply).
        If a write fails, what the block covered of that target's take goes back into it (a
        landed target's stays spent: its take stands), and the give-backs still go in: the
        lease counts a give-back as made whatever happens to the write (it never makes one
        twice), and none of it was written for an item whose block takes it."""
        rest_targets: list[Target] = []
        rests: list[dict[str, int]] = []
        spent: list[tuple[Holding, list[int]]] = []
        backs: list[tuple[Holding, list[int]]] = []
        settled: list[Target] = []  # nothing left to write
        for target, each in zip(targets, amounts, strict=True):
            holding = self.holdings.get((target.entity_id, target.resource))
            if holding is None or holding.target is not target:
                rest_targets.append(target)
                rests.append(dict(each))
                continue
            signed = units.milli_of(each, holding.limits)
            back = [max(-a, 0) for a in signed]
            if any(back):
                backs.append((holding, back))
            take = [max(a, 0) for a in signed]
            rest = holding.block.take_up_to(take) if any(take) else take
            if any(take):
                spent.append((holding, [t - r for t, r in zip(take, rest, strict=True)]))
            if any(rest):
                rest_targets.append(target)
                rests.append(
                    {
                        lim.name: units.tokens_up(r)
                        for lim, r in zip(holding.limits, rest, strict=True)
                        if r
                    }
                )
            else:
                settled.append(target)
        written = Landing()
        try:
            if rest_targets:
                await self.engine.force_each(rest_targets, rests, written)
        except BaseException:
            sent = {id(t) for t in rest_targets}
            for holding, covered in spent:  # adding back is always possible
                if id(holding.target) in sent and not written.stands(holding.target):
                    holding.block.add(covered)
            for holding, back in backs:
                holding.block.add(back)
            if landing is not None:
                landing.landed.extend(settled + written.landed)
                # A give-back went into the target's block, not the refused write: it was made.
                into_blocks = {id(holding.target) for holding, _ in backs}
                landing.refused.extend(t for t in written.refused if id(t) not in into_blocks)
            raise
        # Give-backs last: once in a block they may be spent, and could not be undone.
        for holding, back in backs:
            holding.block.add(back)
        if landing is not None:
            landing.landed.extend(settled + written.landed)

    def _holdings_of(self, targets: Sequence[Target]) -> list[Holding] | None:
        holdings: list[Holding] = []
        for target in targets:
            holding = self.holdings.get((target.entity_id, target.resource))
            if holding is None or holding.target is not target:
                return None
            holdings.append(holding)
        return holdings

    # -- reserving --------------------------------------------------------------------------

    def _ahead(self, holdings: Sequence[Holding], needs: list[list[int]]) -> None:
        """Start a top-up in the background for each block a take left under its low watermark
        (one more request like this one would dip into the demand expected while a write is
        under way), so that the blocks are refilled before a take finds them short."""
        low: list[Holding] = []
        units: list[list[int]] = []
        # Plain loops: this runs on every acquire a block serves (a few µs in all).
        for h, need in zip(holdings, needs):  # noqa: B905 (one need per holding)
            mark = h.low
            if mark is None or h.inflight is not None:
                continue
            for x, n, m in zip(h.block.held, need, mark):  # noqa: B905 (one per limit)
                if x - n < m:
                    low.append(h)
                    units.append(need)
                    break
        if low and not self._closing:
            flight = self.engine.detach(self._flight(low, units, True))
            for h in low:
                h.inflight = flight

    async def _top_up(self, holdings: Sequence[Holding], needs: list[list[int]]) -> None:
        """Refill the blocks that cannot cover `needs` (one write per item), or wait for the
        top-up already under way for one of them (then the caller tries its blocks again)."""
        busy = [h.inflight for h in holdings if h.inflight is not None]
        if busy:
            for h, need in zip(holdings, needs, strict=True):
                h.queued = [q + n for q, n in zip(h.queued, need, strict=True)]
            try:
                await asyncio.wait(busy)
            finally:
                for h, need in zip(holdings, needs, strict=True):
                    h.queued = [q - n for q, n in zip(h.queued, need, strict=True)]
            return
        # The reservation is a task of its own: a caller whose deadline passes stops waiting,
        # but a write already sent still lands its tokens in the blocks instead of losing them.
        flight = self.engine.detach(self._flight(holdings, needs))
        for h in holdings:
            h.inflight = flight
        await asyncio.shield(flight)

    async def _flight(
        self, holdings: Sequence[Holding], needs: list[list[int]], ahead: bool = False
    ) -> None:
        try:
            await self._reserve(holdings, needs, ahead)
        except Exception as exc:
            if not ahead:
                raise
            # No one waits for a top-up ahead: a take that finds its block short starts its
            # own, and meets the outage or the denial then.
            self.failed_ahead += 1
            log.debug("top-up ahead of demand not made: %s", exc)
        finally:
            for h in holdings:
                h.inflight = None
            self._unfilled(holdings)

    def _unfilled(self, holdings: Sequence[Holding]) -> None:
        """Let a block that a top-up left empty and unscheduled go: the sweeper forgets it
        once its denial memory (if any) ends. Otherwise a key whose first top-up failed (an
        outage, a denial) would keep its empty block for good, one per key ever seen."""
        now = time.monotonic()
        expiring = False
        for h in holdings:
            if h.expires_at == math.inf and h.inflight is None and not any(h.block.held):
                h.expires_at = max(now, h.denied_until)
                expiring = True
        if expiring and not self._closing:
            self._arm()  # not woken: at most one scan per `SWEEP_INTERVAL_S`, whatever the churn

    async def _reserve(
        self, holdings: Sequence[Holding], needs: list[list[int]], ahead: bool = False
    ) -> None:
        now = time.monotonic()
        if any(h.denied_until > now for h in holdings):
            if ahead:
                return
            raise self._remembered_denial(holdings, needs, now)
        targets = [h.target for h in holdings]
        await self.engine.load(targets)
        now_ms = self.engine.clock()
        # Ahead, `needs` are those of the take that found the block low: nothing is short yet.
        shorts = [
            [0] * len(need) if ahead else _short(h, need)
            for h, need in zip(holdings, needs, strict=True)
        ]
        goals = [
            self._goal(h, need, short, now, now_ms, ahead)
            for h, need, short in zip(holdings, needs, shorts, strict=True)
        ]
        if ahead and not all(map(_worth, holdings, goals, needs)):
            # The bucket can spare less than a request for a block under its watermark: the
            # take that finds it short reserves exactly what it needs then.
            return
        started = time.monotonic()
        try:
            try:
                await self.engine.commit_each(
                    targets, [_tokens(h, g) for h, g in zip(holdings, goals, strict=True)]
                )
            except RateLimitExceeded:
                if goals == shorts or ahead:
                    raise
                # The stale view promised more than is left: take just what is needed (the states
                # are fresh now).
                goals = shorts
                await self.engine.commit_each(
                    targets, [_tokens(h, g) for h, g in zip(holdings, goals, strict=True)]
                )
        except RateLimitExceeded as exc:
            if ahead or not any(
                any(_short(h, need)) for h, need in zip(holdings, needs, strict=True)
            ):
                # Ahead: no request was refused, the watermark asked for more than the bucket
                # could spare. Otherwise a lease gave tokens back into the blocks while the
                # buckets were asked: they cover the request now; the caller takes again.
                return
            raise self._denied(holdings, needs, shorts, exc) from None
        took = time.monotonic() - started
        for h in holdings:
            # Up at once with a slower write, down by halves: a watermark sized on a fast write
            # just before a slow one would let the block run dry.
            h.latency = max(took, (h.latency + took) / 2)
        expires = time.monotonic() + self.policy.hold_seconds
        for h, goal in zip(holdings, goals, strict=True):
            if any(goal):
                h.block.add(goal)
                h.expires_at = expires
        # A block that stopped being live during the write goes back with what it got.
        self._retire([h for h in holdings if not h.live])
        self._arm()

    def _goal(
        self,
        holding: Holding,
        need: list[int],
        short: list[int],
        now: float,
        now_ms: int,
        ahead: bool = False,
    ) -> list[int]:
        """Millitokens to reserve per limit: at least the shortfall; up to the low watermark
        plus the observed demand over the horizon, `max_share` of the burst, and half of what
        else the bucket holds. Sets the block's low watermark for the next top-up ahead."""
        spent = holding.block.take_spent()
        if holding.topped_at is not None:
            elapsed = max(now - holding.topped_at, MIN_RATE_INTERVAL)
            holding.rate = [
                s / elapsed if r == 0 else RATE_WEIGHT * r + (1 - RATE_WEIGHT) * s / elapsed
                for r, s in zip(holding.rate, spent, strict=True)
            ]
        holding.topped_at = now
        policy = self.policy
        # What is spent while a top-up is under way: refilling once a request would leave less
        # keeps the block from running dry at a steady demand (see `_ahead`).
        marks = [_whole(rate * WATERMARK_LATENCIES * holding.latency) for rate in holding.rate]
        caps = [_whole(limit.burst_milli * policy.max_share, down=True) for limit in holding.limits]
        wanted = [
            min(cap, max(n + q, n + mark + _whole(rate * policy.horizon_seconds)))
            for n, q, mark, rate, cap in zip(
                need, holding.queued, marks, holding.rate, caps, strict=True
            )
        ]
        if any(holding.rate):
            # At most half the block: each top-up ahead then brings at least the other half,
            # so a hot item costs a bounded number of writes however slow they are.
            holding.low = [min(m, w // 2) for m, w in zip(marks, wanted, strict=True)]
        if not any(short) and not ahead:
            return short
        held = holding.block.held
        goal: list[int] = []
        for i, limit in enumerate(holding.limits):
            extra = max(0, wanted[i] - held[i] - short[i])
            if extra:
                left = available_milli(limit, holding.target.state, now_ms) - short[i]
                # The block never ends up holding more than the bucket keeps for the others:
                # what it still holds after this take (all of it, ahead) counts.
                rest = held[i] if ahead else max(0, held[i] + short[i] - need[i])
                extra = min(extra, _whole(max(0, left - rest) / 2, down=True))
            goal.append(short[i] + extra)
        return goal

    def _denied(
        self,
        holdings: Sequence[Holding],
        needs: list[list[int]],
        shorts: list[list[int]],
        exc: RateLimitExceeded,
    ) -> RateLimitExceeded:
        """The shared buckets refused even the shortfall: remember it until they could grant
        a block again (bounded), and report the request against buckets and blocks together."""
        memory = self.policy.denial_memory_seconds
        wait = exc.retry_after_seconds
        if memory and wait is not None:
            now_ms = self.engine.clock()
            block = [
                bucket_input(limit, h.target.state, max(s, b), now_ms)
                for h, short in zip(holdings, shorts, strict=True)
                for limit, s, b in zip(h.limits, short, self._block_size(h), strict=True)
            ]
            refill_ms = core.time_until_available(block, now_ms)
            wait = min(
                memory, max(wait, math.inf if refill_ms is None else units.seconds(refill_ms))
            )
            until = time.monotonic() + wait
            # Only the items that refused: a child's own bucket is not short because its
            # parent's was.
            refused = {v.entity_id for v in exc.violations}
            for h in holdings:
                if h.target.entity_id in refused:
                    h.denied_until = until
        # A client that waits the retry-after it is told finds the memory over.
        return self._denial(holdings, needs, wait)

    def _block_size(self, holding: Holding) -> list[int]:
        """The block the observed demand asks for, per limit (what a denial waits for)."""
        return [
            min(
                _whole(rate * self.policy.horizon_seconds),
                _whole(limit.burst_milli * self.policy.max_share, down=True),
            )
            for rate, limit in zip(holding.rate, holding.limits, strict=True)
        ]

    def _remembered_denial(
        self, holdings: Sequence[Holding], needs: list[list[int]], now: float
    ) -> RateLimitExceeded:
        until = max(h.denied_until for h in holdings)
        return self._denial(holdings, needs, until - now)

    def _denial(
        self, holdings: Sequence[Holding], needs: list[list[int]], wait: float | None
    ) -> RateLimitExceeded:
        """`RateLimitExceeded` for a request, from the cached states: what the bucket and the
        block hold together, and `wait` (at least the bucket's own wait) for each violation."""
        now_ms = self.engine.clock()
        inputs = [
            bucket_input(limit, h.target.state, short, now_ms)
            for h, need in zip(holdings, needs, strict=True)
            for limit, short in zip(h.limits, _short(h, need), strict=True)
        ]
        _, outcomes = core.decide(inputs, now_ms, True)
        cursor = 0
        statuses: list[LimitStatus] = []
        shown = any(out.exceeded for out in outcomes)
        for h, need in zip(holdings, needs, strict=True):
            held = h.block.held
            for i, limit in enumerate(h.limits):
                out = outcomes[cursor]
                cursor += 1
                exceeded = bool(out.exceeded) or (not shown and need[i] > held[i])
                own = None if out.retry_after_ms is None else units.seconds(out.retry_after_ms)
                retry = (
                    0.0 if not exceeded else None if own is None or wait is None else max(own, wait)
                )
                statuses.append(
                    limit_status(
                        h.target, limit, out.available_milli + held[i], need[i], exceeded, retry
                    )
                )
        return RateLimitExceeded(statuses)

    # -- giving back ------------------------------------------------------------------------

    def _arm(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Give back what sits unused past its hold time, and retired blocks at once; forget
        empty expired blocks. Ends when nothing is held (`_arm` starts it again)."""
        while not self._closing:
            self._wake.clear()
            if self._retired:
                retired, self._retired = self._retired, []
                await self._give_back(retired)
            now = time.monotonic()
            due = [h for h in self.holdings.values() if h.expires_at <= now]
            if due:
                await self._give_back(due)
                for h in due:
                    key = (h.target.entity_id, h.target.resource)
                    idle = h.inflight is None and h.expires_at == math.inf
                    if idle and self.holdings.get(key) is h:
                        h.live = False
                        del self.holdings[key]
            deadlines = [h.expires_at for h in self.holdings.values() if h.expires_at < math.inf]
            if not deadlines and not self._retired:
                return
            # Each pass scans every block: under churn (keys failing their first top-up one
            # after another), a pass per change would cost O(blocks) each time.
            wait = max(SWEEP_INTERVAL_S, min(deadlines) - time.monotonic()) if deadlines else 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _retire(self, holdings: Sequence[Holding]) -> None:
        if not holdings:
            return
        for h in holdings:
            h.live = False
        self._retired.extend(holdings)
        self._arm()
        self._wake.set()

    async def _give_back(self, holdings: Sequence[Holding]) -> None:
        targets: list[Target] = []
        amounts: list[dict[str, int]] = []
        for h in holdings:
            h.expires_at = math.inf
            held = h.block.drain()
            if any(held):
                targets.append(h.target)
                amounts.append(
                    {
                        lim.name: -units.tokens_down(x)
                        for lim, x in zip(h.limits, held, strict=True)
                        if x
                    }
                )
        if not targets:
            return
        try:
            await self.engine.force_each(targets, amounts)
        except BaseException as exc:
            # An unknown outcome may have landed: putting the tokens back could spend them twice.
            lost = ", ".join(
                f"{t.entity_id}/{t.resource} {a}" for t, a in zip(targets, amounts, strict=True)
            )
            log.warning(
                "reserved tokens not given back (%s): %s; they return with refill",
                type(exc).__name__ if isinstance(exc, asyncio.CancelledError) else exc,
                lost,
            )
            if not isinstance(exc, Exception):
                raise

    def forget(self, entity_id: str) -> None:
        """Drop the entity's blocks without giving back (its items were deleted)."""
        for key in [k for k in self.holdings if k[0] == entity_id]:
            self.holdings.pop(key).live = False

    async def close(self) -> None:
        """Give back everything held. A give-back already under way is awaited, not cancelled:
        its block is drained, so cancelling it would lose the tokens."""
        self._closing = True
        try:
            # A top-up under way (its caller may have stopped waiting at its deadline) lands
            # its tokens in a block: wait for it, or they would be reserved for good.
            flights = {h.inflight for h in self.holdings.values() if h.inflight is not None}
            if flights:
                await asyncio.wait(flights)
            sweeper, self._sweeper = self._sweeper, None
            if sweeper is not None:
                self._wake.set()
                await sweeper
            holdings = list(self.holdings.values()) + self._retired
            self.holdings.clear()
            self._retired = []
            await self._give_back(holdings)
        finally:
            self._closing = False

    def held(self) -> dict[BucketKey, dict[str, int]]:
        """Whole tokens held per bucket item and limit (for operators and tests)."""
        return {
            key: {
                lim.name: units.tokens_down(x)
                for lim, x in zip(h.limits, h.block.held, strict=True)
            }
            for key, h in self.holdings.items()
            if any(h.block.held)
        }


def _soft(holdings: Sequence[Holding]) -> bool:
    # A plain loop, not `any()` over a generator: this runs on every acquire a block serves.
    for h in holdings:  # noqa: SIM110
        if h.target.soft is not None:
            return True
    return False


def _has_quota(limit_sets: Sequence[tuple[str, list[Limit]]]) -> bool:
    return any(limit.kind == "quota" for _, limits in limit_sets for limit in limits)


def _worth(holding: Holding, goal: list[int], need: list[int]) -> bool:
    """Whether a top-up ahead of `goal` lifts every limit under its watermark by a request."""
    low = holding.low or [0] * len(goal)
    return all(
        g >= n or x - n >= m for g, n, x, m in zip(goal, need, holding.block.held, low, strict=True)
    )


def _short(holding: Holding, need: list[int]) -> list[int]:
    """Millitokens the block lacks for `need`, per limit."""
    return [max(0, n - h) for n, h in zip(need, holding.block.held, strict=True)]


def _whole(milli: float, down: bool = False) -> int:
    """Millitokens rounded to whole tokens (blocks only ever hold whole tokens)."""
    # Rounding the millitokens first changes nothing: floor(floor(x)/n) = floor(x/n), and so
    # for ceil.
    whole = units.tokens_down(math.floor(milli)) if down else units.tokens_up(math.ceil(milli))
    return units.to_milli(whole)


def _tokens(holding: Holding, milli: list[int]) -> dict[str, int]:
    return {
        limit.name: units.tokens_up(m) for limit, m in zip(holding.limits, milli, strict=True) if m
    }
