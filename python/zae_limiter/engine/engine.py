"""The acquire engine: decide → write → retry → give back, for any set of bucket targets.

A decision is made locally (the core) over the last known bucket states, then committed with one
conditional write per target. The conditions make a stale state harmless: if another client
changed a bucket in a way that matters, its write fails and returns the current item, and the
decision is made again on it. Only denials are confirmed with a fresh read.

`RateLimiter` uses the engine for `acquire`; a `Lease` holds the engine and its targets for
`adjust`, `consume`, `release` and the rollback. Neither knows how the other works.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import core
from ..core import units
from ..exceptions import (
    RateLimiterUnavailable,
    RateLimitExceeded,
    RequestTooLarge,
)
from ..models import Limit, LimitStatus
from ..storage.protocol import BucketItem, ConditionFailed, LimitWrite, Storage, WriteRefused
from . import expiry, quota, stored
from .cache import TTLCache

MAX_ROUNDS = 12
# Give-backs and adjustments must land: losing one leaves capacity consumed for nothing.
MAX_FORCED_ROUNDS = 48
# How long `close` waits for writes detached from calls their deadline cut short.
DRAIN_SECONDS = 10.0

log = logging.getLogger("zae_limiter")

BucketKey = tuple[str, str]
SoftObserver = Callable[[str, str, list[str], list[str]], None]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Target:
    """One entity's bucket item taking part in a decision (the entity, or its parent)."""

    entity_id: str
    resource: str
    limits: list[Limit]
    state: BucketItem | None = None
    fresh: bool = False
    shadow: bool = False
    """Every limit is soft here (`RateLimiter(shadow=True)`: a dry run of the limits)."""
    soft: tuple[bool, ...] | None = field(init=False, default=None)
    """Per limit, whether it is soft (debited, never denies); None when all are hard, so the
    usual decision pays nothing for soft limits."""
    # Per quota limit: (window start, millitokens) this target took in the window of its last
    # landed take; a give-back returns at most that, and only in that window (engine/quota.py).
    quota_spent: dict[str, tuple[int, int]] = field(default_factory=dict)
    quotas: bool = field(default=False, init=False)  # some limit is a quota
    # The concurrency caps among `limits`, moved out of them: caps are slots (`engine.slots`),
    # not token buckets, so the bucket decision and its writes never see them.
    caps: list[Limit] = field(default_factory=list)

    def __post_init__(self) -> None:
        any_soft = self.shadow
        for limit in self.limits:
            if limit.is_concurrency:
                # Soft or hard, a cap is slots: `SlotKeeper` decides it (a soft one is taken
                # past its max), never the bucket decision.
                self.caps.append(limit)
                continue
            if limit.is_quota:
                # A soft quota is written by the quota's rules too (its window, its books of
                # what was taken there); only its decision is forced (`decide`).
                self.quotas = True
            any_soft = any_soft or limit.soft
        if self.caps:  # a new list: the caller's (often a resolver's cached set) is shared
            self.limits = [limit for limit in self.limits if not limit.is_concurrency]
        if any_soft:
            self.soft = tuple(self.shadow or limit.soft for limit in self.limits)


@dataclass
class Landing:
    """Which targets of an unchecked change stand, filled in as their writes land: `landed`
    (applied, or nothing to write) and `refused` (certainly not applied). A target in neither
    failed with an unknown outcome. Filled before any failure is raised, so a caller whose call
    raised still knows which half of a cascade stands."""

    landed: list[Target] = field(default_factory=list)
    refused: list[Target] = field(default_factory=list)

    def stands(self, target: Target) -> bool:
        return any(t is target for t in self.landed)

    def refused_at(self, target: Target) -> bool:
        return any(t is target for t in self.refused)


class Engine:
    """Decisions and writes over one storage, with the last known state of each bucket."""

    def __init__(
        self,
        storage: Storage,
        clock: Callable[[], int] | None = None,
        cache_size: int = 10_000,
        shadow: bool = False,
    ) -> None:
        self.storage = storage
        self.clock = clock or wall_clock_ms
        self.shadow = shadow
        # Told of each committed change that took a soft limit past its allowance:
        # `(entity_id, resource, soft_names, shadow_names)`, the latter the limits that would
        # have denied it but for shadow mode.
        self.on_soft_excess: SoftObserver | None = None
        self.states: TTLCache[BucketKey, BucketItem | None] = TTLCache(0, cache_size)
        self._background: set[asyncio.Task[None]] = set()

    async def targets(
        self, resource: str, limit_sets: Sequence[tuple[str, list[Limit]]]
    ) -> list[Target]:
        """Targets for `(entity_id, limits)` pairs: cached states, the missing ones read at once."""
        shadow = self.shadow
        targets = [Target(eid, resource, limits, shadow=shadow) for eid, limits in limit_sets]
        await self.load(targets)
        return targets

    async def targets_each(
        self, groups: Sequence[tuple[str, Sequence[tuple[str, list[Limit]]]]]
    ) -> list[Target]:
        """`targets` for several resources (`(resource, limit sets)` each), in that order: one
        list, so that the missing states are read in one round and one decision (`commit_each`)
        covers every resource's items."""
        shadow = self.shadow
        targets = [
            Target(eid, resource, limits, shadow=shadow)
            for resource, sets in groups
            for eid, limits in sets
        ]
        await self.load(targets)
        return targets

    async def load(self, targets: Sequence[Target]) -> None:
        """Give every target its last known state: cached, or read now (all at once)."""
        missing: list[Target] = []
        for target in targets:
            if not target.limits:  # caps only: no bucket to read
                target.fresh = True
                continue
            hit, state = self.states.get((target.entity_id, target.resource))
            if hit:
                target.state = state
                target.fresh = False
            else:
                missing.append(target)
        await self.refresh(missing)

    async def refresh(self, targets: Sequence[Target]) -> None:
        """Read every target's bucket again (consistently), at once."""
        states = await asyncio.gather(
            *(self.storage.get_bucket(t.entity_id, t.resource) for t in targets)
        )
        for target, state in zip(targets, states, strict=True):
            self._learn(target, state)

    async def read(self, entity_id: str, resource: str) -> BucketItem | None:
        state = await self.storage.get_bucket(entity_id, resource)
        self.states.put((entity_id, resource), state)
        return state

    def forget(self, entity_id: str) -> None:
        """Drop every cached bucket of the entity (it was deleted or reset)."""
        self.states.drop_where(lambda key: key[0] == entity_id)

    async def commit(self, targets: Sequence[Target], amounts: Mapping[str, int]) -> None:
        """Consume `amounts` from every target, all or nothing, or raise `RateLimitExceeded`."""
        await self._apply(targets, [amounts] * len(targets), check=True)

    async def force(self, targets: Sequence[Target], amounts: Mapping[str, int]) -> None:
        """Add `amounts` (negative: give back) to every target without a check."""
        await self._apply(targets, [amounts] * len(targets), check=False)

    def settle_local(
        self, targets: Sequence[Target], amounts: Mapping[str, int], check: bool
    ) -> bool:
        """The engine holds nothing locally: every change is a write (see `Reserver`)."""
        return False

    async def commit_each(
        self, targets: Sequence[Target], amounts: Sequence[Mapping[str, int]]
    ) -> None:
        """`commit` with each target's own amounts (all or nothing over the targets)."""
        await self._apply(targets, amounts, check=True)

    async def force_each(
        self,
        targets: Sequence[Target],
        amounts: Sequence[Mapping[str, int]],
        landing: Landing | None = None,
    ) -> None:
        """`force` with each target's own amounts, reporting each target's fate in `landing`
        (then a give-back certainly refused is the caller's to count: it is not logged as
        unconfirmed)."""
        await self._apply(targets, amounts, check=False, landing=landing)

    async def _apply(
        self,
        targets: Sequence[Target],
        amounts: Sequence[Mapping[str, int]],
        check: bool,
        landing: Landing | None = None,
    ) -> None:
        deltas = [units.milli_of(each, t.limits) for t, each in zip(targets, amounts, strict=True)]
        pending = [i for i, d in enumerate(deltas) if any(d)]
        # Soft limits are decided apart from the hard ones (see `decide`); unchecked changes
        # are forced for every limit anyway.
        mixed = check and any(t.soft is not None for t in targets)
        if landing is not None:
            landing.landed.extend(t for t, d in zip(targets, deltas, strict=True) if not any(d))
        committed: list[int] = []
        # Raw outcomes per target; LimitStatus objects are only built for a denial.
        seen: dict[int, Sequence[core.Outcome]] = {}
        rounds = MAX_ROUNDS if check else MAX_FORCED_ROUNDS
        # One decision instant for every round: a writer refused because another one made the
        # bucket not full at this instant decides again on a bucket that stays not full at it
        # (consumption only moves `full_at` later), so it conflicts about once. A fresh instant
        # each round would find a fast-refilling bucket full again and race the others anew.
        # Only a denial takes a fresh instant: refill since then may cover the request.
        now = self.clock()
        current = True  # `now` was taken for this round's decision
        try:
            for round_ in range(rounds):
                if round_:
                    await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**round_)))
                # Statuses are reported for every target, but only pending ones are written.
                decide_on = sorted(set(pending) | (set() if seen else set(range(len(targets)))))
                inputs = [
                    bucket_input(limit, targets[i].state, delta, now)
                    for i in decide_on
                    for limit, delta in zip(targets[i].limits, deltas[i], strict=True)
                ]
                if mixed:
                    mask = [s for i in decide_on for s in _soft_mask(targets[i])]
                    admitted, outcomes = decide(inputs, mask, now)
                else:
                    admitted, outcomes = core.decide(inputs, now, check)
                cursor = 0
                plans: dict[int, list[LimitWrite]] = {}
                for i in decide_on:
                    target = targets[i]
                    part = outcomes[cursor : cursor + len(target.limits)]
                    cursor += len(target.limits)
                    seen[i] = part
                    plans[i] = _writes(target, part, deltas[i], now)
                if not admitted:
                    # Only a stale view of a short bucket can make a denial wrong.
                    stale = [
                        targets[i]
                        for i in pending
                        if not targets[i].fresh and any(out.exceeded for out in seen[i])
                    ]
                    if stale or not current:
                        await self.refresh(stale)
                        now, current = self.clock(), True
                        continue
                    raise RateLimitExceeded(statuses(targets, seen, deltas, now))
                results = await asyncio.gather(
                    *(self._write(targets[i], plans[i], now) for i in pending),
                    return_exceptions=True,
                )
                still: list[int] = []
                failure: BaseException | None = None
                # Every result is sorted out before a failure is raised: a write that landed
                # beside a failed one must be given back (checked) or not counted as lost.
                for i, result in zip(pending, results, strict=True):
                    if isinstance(result, ConditionFailed):
                        still.append(i)
                    elif isinstance(result, BaseException):
                        still.append(i)
                        failure = failure or result
                        if landing is not None and isinstance(result, WriteRefused):
                            landing.refused.append(targets[i])
                    else:
                        committed.append(i)
                        if landing is not None:
                            landing.landed.append(targets[i])
                pending = still
                if failure is not None:
                    raise failure
                if not pending:
                    if mixed:
                        self._report_soft(targets, seen, deltas)
                    return
                current = False
            # Storage answered every round, but other clients kept changing the buckets first.
            # No limit was shown exceeded, so this is no denial; nor is it an outage, so the
            # public error is raised directly and FAIL_OPEN does not admit it.
            raise RateLimiterUnavailable(
                f"bucket contention: no write landed in {rounds} rounds of conflicting writes"
            )
        except BaseException as exc:
            if not check:
                unknown = [
                    i for i in pending if landing is None or not landing.refused_at(targets[i])
                ]
                self._unconfirmed([targets[i] for i in unknown], [amounts[i] for i in unknown], exc)
            if committed and check:
                # Partial success of an all-or-nothing consume: give back what was taken. The
                # give-back is a task of its own, so a deadline cancelling this call (which
                # does not wait for it then) cannot cancel it and lose the tokens.
                back = self.detach(
                    self.force_each(
                        [targets[i] for i in committed],
                        [{name: -n for name, n in amounts[i].items()} for i in committed],
                    ),
                    "give-back after a partial consume",
                )
                if not isinstance(exc, asyncio.CancelledError):
                    await asyncio.shield(back)
            raise

    def _report_soft(
        self,
        targets: Sequence[Target],
        seen: Mapping[int, Sequence[core.Outcome]],
        deltas: Sequence[Sequence[int]],
    ) -> None:
        """Tell `on_soft_excess` which soft limits the change that landed took past their
        allowance (each target's outcomes are those of the decision its write carried)."""
        observer = self.on_soft_excess
        if observer is None:
            return
        for i in sorted(seen):
            target = targets[i]
            if target.soft is None:
                continue
            soft: list[str] = []
            shadow: list[str] = []
            for limit, out, delta in zip(target.limits, seen[i], deltas[i], strict=True):
                if _past(out, delta):
                    (soft if limit.soft else shadow).append(limit.name)
            if soft or shadow:
                try:
                    observer(target.entity_id, target.resource, soft, shadow)
                except Exception:  # the change landed: a failed report must not undo it
                    log.exception("reporting a soft limit excess failed")

    def _unconfirmed(
        self,
        targets: Sequence[Target],
        amounts: Sequence[Mapping[str, int]],
        exc: BaseException,
    ) -> None:
        """Count and log the give-backs among forced writes that did not certainly land. None
        is sent again: after a lost response the first copy may still land, and once the item's
        ring of write ids has rotated nothing would refuse it (docs/design.md, section 4)."""
        for target, each in zip(targets, amounts, strict=True):
            back = {name: -n for name, n in each.items() if n < 0}
            if not back:
                continue
            self.storage.ledger.give_back_unconfirmed(target.resource, back)
            log.warning(
                "give-back of %s to %s/%s not confirmed (%s): not sent again; those tokens "
                "may stay consumed until refill",
                back,
                target.entity_id,
                target.resource,
                type(exc).__name__ if isinstance(exc, asyncio.CancelledError) else exc,
            )

    def detach(
        self, work: Coroutine[Any, Any, None], what: str | None = None
    ) -> asyncio.Task[None]:
        """Run `work` as a task that outlives its caller's cancellation (a deadline): writes
        that must land once started. Kept until done; `drain` waits for the rest. A failure no
        caller waited for is logged, naming `what`."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(functools.partial(_report, what))
        return task

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Wait for the detached writes still under way (at close), at most `timeout` seconds."""
        if not self._background:
            return
        _, pending = await asyncio.wait(list(self._background), timeout=timeout)
        if pending:
            log.warning("%d detached bucket writes still under way at close", len(pending))

    async def _write(
        self, target: Target, writes: list[LimitWrite], now: int
    ) -> BucketItem | None:
        if not writes:
            # Only a quota's give-back forgiven by its window's reset: nothing to write.
            return target.state
        key = (target.entity_id, target.resource)
        expires_at: int | None = expiry.planned(target.limits, target.state, writes, now)
        if target.state is not None and target.state.expires_at == expires_at:
            # The item's expiry as the view has it already (the usual case: the expiry is on
            # an hour grid): not SET again, one clause less for the server to parse. Should
            # the stored expiry be earlier than the view's, `_outlive` below sees it in the
            # item this write returns and raises it, as after any write.
            expires_at = None
        try:
            state = await self.storage.write_bucket(
                target.entity_id,
                target.resource,
                writes,
                now,
                known_size=target.state.size if target.state else 0,
                known_ids=target.state.write_ids if target.state else (),
                expires_at=expires_at,
            )
        except ConditionFailed as exc:
            self._learn(target, exc.current)
            raise
        except BaseException:  # cancelled too: a write cut short may still land
            self.states.drop(key)
            raise
        self._learn(target, state)
        if target.quotas:
            _spent(target, writes)
        self._outlive(target, state, now)
        return state

    def _learn(self, target: Target, state: BucketItem | None) -> None:
        target.state = state
        target.fresh = True
        self.states.put((target.entity_id, target.resource), state)

    def _outlive(self, target: Target, state: BucketItem, now: int) -> None:
        """Make the item outlive its state as written: a write on a stale view (relative, so
        applied to newer tokens) may have set an expiry earlier than the state requires (see
        `zae_limiter.expiry`). The rare correction is detached: off the caller's path, and no
        deadline cuts it short."""
        due = expiry.required(target.limits, state, now)
        if state.expires_at is None or state.expires_at < due:
            self.detach(self._extend_expiry(target, due, state.size), "bucket expiry extension")

    async def _extend_expiry(self, target: Target, expires_at: int, size: int) -> None:
        await self.storage.extend_bucket_expiry(
            target.entity_id, target.resource, expires_at, known_size=size
        )


def _spent(target: Target, writes: Sequence[LimitWrite]) -> None:
    """Book the quota takes and give-backs of a landed write in `target.quota_spent`: a take in
    a new window starts its books again (what was taken before is forgiven by the reset)."""
    for w in writes:
        if w.window is None or not w.delta_milli:
            continue
        window, amount = target.quota_spent.get(w.limit_name, (w.window, 0))
        if window != w.window:
            window, amount = w.window, 0
        target.quota_spent[w.limit_name] = (window, max(amount + w.delta_milli, 0))


def _report(what: str | None, task: asyncio.Task[None]) -> None:
    """Retrieve a detached task's outcome (asyncio warns about unretrieved ones) and log a
    failure when it was a write that must land."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and what is not None:
        log.warning("%s failed: %s", what, exc)


def decide(
    inputs: Sequence[core.BucketInput], soft: Sequence[bool], now_ms: int
) -> tuple[bool, Sequence[core.Outcome]]:
    """`core.decide` (checked) where the buckets marked `soft` never deny: the hard ones are
    decided all or nothing, the soft ones forced (they may go into debt). Forced outcomes carry
    the forced write rules, which bound no "still holds delta": the soft writes stay exact
    beside the checked ones in the same item write (docs/design.md, "Concurrent writers").
    A soft bucket's outcome is never `exceeded`: whether the change takes it past its
    allowance is `_past`."""
    hard_in = [b for b, s in zip(inputs, soft, strict=True) if not s]
    soft_in = [b for b, s in zip(inputs, soft, strict=True) if s]
    admitted, hard_out = core.decide(hard_in, now_ms, True) if hard_in else (True, [])
    _, soft_out = core.decide(soft_in, now_ms, False)
    hard_it, soft_it = iter(hard_out), iter(soft_out)
    return admitted, [next(soft_it) if s else next(hard_it) for s in soft]


def _soft_mask(target: Target) -> tuple[bool, ...]:
    return target.soft or (False,) * len(target.limits)


def _past(outcome: core.Outcome, delta: int) -> bool:
    """Whether a forced `delta` takes a bucket past its allowance: it held less than `delta`
    (exactly the check a hard bucket would have failed)."""
    return delta > 0 and outcome.available_milli < delta


def bucket_input(
    limit: Limit, state: BucketItem | None, delta: int, now_ms: int
) -> core.BucketInput:
    """The core's view of one limit's bucket at `now_ms`, with `delta` millitokens to apply."""
    s = state.limits.get(limit.name) if state else None
    if limit.kind == "quota":
        return quota.bucket_input(limit, s, delta, now_ms)
    return (
        limit.burst_milli,
        limit.refill_amount_milli,
        limit.refill_period_ms,
        stored.full_at(limit, s, now_ms),
        delta,
    )


def available_milli(limit: Limit, state: BucketItem | None, now_ms: int) -> int:
    """Millitokens `limit`'s bucket in `state` holds at `now_ms` (negative: in debt)."""
    s = state.limits.get(limit.name) if state else None
    if limit.kind == "quota":
        return quota.available(limit, s, now_ms)
    return stored.available(limit, s, now_ms)


def wait_ms(
    limits: Sequence[Limit], state: BucketItem | None, deltas: Sequence[int], now_ms: int
) -> int | None:
    """Ms until every limit holds its delta (0 if it does now; None: never): token buckets by
    the core, quotas until their next window when short now."""
    plain = [
        bucket_input(limit, state, delta, now_ms)
        for limit, delta in zip(limits, deltas, strict=True)
        if limit.kind != "quota"
    ]
    longest = core.time_until_available(plain, now_ms) if plain else 0
    for limit, delta in zip(limits, deltas, strict=True):
        if longest is None:
            break
        if limit.kind == "quota":
            s = state.limits.get(limit.name) if state else None
            wait = quota.wait_ms(limit, s, delta, now_ms)
            longest = None if wait is None else max(longest, wait)
    return longest


def request_too_large(
    targets: Sequence[Target], amounts: Mapping[str, int], now_ms: int, field: str
) -> RequestTooLarge:
    """`RequestTooLarge` for `amounts` over the targets' last known states (no I/O)."""
    deltas = [units.milli_of(amounts, t.limits) for t in targets]
    inputs = [
        bucket_input(limit, t.state, delta, now_ms)
        for t, ds in zip(targets, deltas, strict=True)
        for limit, delta in zip(t.limits, ds, strict=True)
    ]
    if any(t.soft is not None for t in targets):
        _, outcomes = decide(inputs, [s for t in targets for s in _soft_mask(t)], now_ms)
    else:
        _, outcomes = core.decide(inputs, now_ms, True)
    seen: dict[int, Sequence[core.Outcome]] = {}
    cursor = 0
    for i, t in enumerate(targets):
        seen[i] = outcomes[cursor : cursor + len(t.limits)]
        cursor += len(t.limits)
    name = field.rpartition(".")[2]
    found = statuses(targets, seen, deltas, now_ms)
    # A concurrency cap asked for more slots than it has (it is no bucket: no decision above);
    # a soft one takes them anyway.
    found += [
        limit_status(t, cap, units.to_milli(cap.capacity), units.to_milli(n), True, None)
        for t in targets
        for cap in t.caps
        if (n := amounts.get(cap.name, 1)) > cap.capacity and not (cap.soft or t.shadow)
    ]
    return RequestTooLarge(found, field, amounts.get(name))


def statuses(
    targets: Sequence[Target],
    seen: Mapping[int, Sequence[core.Outcome]],
    deltas: Sequence[Sequence[int]],
    now_ms: int,
) -> list[LimitStatus]:
    """One `LimitStatus` per limit of every target that was decided on at `now_ms`."""
    return [
        _status(targets[i], limit, out, delta, soft, now_ms)
        for i in sorted(seen)
        for limit, out, delta, soft in zip(
            targets[i].limits, seen[i], deltas[i], _soft_mask(targets[i]), strict=True
        )
    ]


def _status(
    target: Target, limit: Limit, outcome: core.Outcome, delta: int, soft: bool, now_ms: int
) -> LimitStatus:
    if soft:
        # Past its allowance or not, a soft limit makes no request wait.
        past = _past(outcome, delta)
        return limit_status(target, limit, outcome.available_milli, delta, past, 0.0, now_ms)
    retry_ms = outcome.retry_after_ms
    if limit.kind == "quota" and outcome.exceeded:
        # The core's wait is its imagined refill's; a quota waits for its next window.
        s = target.state.limits.get(limit.name) if target.state else None
        retry_ms = quota.retry_ms(limit, s, delta, now_ms)
    return limit_status(
        target, limit, outcome.available_milli, delta, bool(outcome.exceeded),
        None if retry_ms is None else units.seconds(retry_ms), now_ms,
    )


def limit_status(
    target: Target,
    limit: Limit,
    available_milli: int,
    requested_milli: int,
    exceeded: bool,
    retry_after_seconds: float | None,
    now_ms: int | None = None,
) -> LimitStatus:
    """The `LimitStatus` of one limit of `target`, from the millitokens decided with: the one
    place where a status's tokens are rounded (down: never show a token that is not there).
    A quota's status says when its window resets (`reset_seconds`) when `now_ms` is given."""
    reset = None
    if now_ms is not None and limit.kind == "quota":
        s = target.state.limits.get(limit.name) if target.state else None
        reset = units.seconds(quota.reset_ms(limit, s, now_ms))
    return LimitStatus(
        entity_id=target.entity_id,
        resource=target.resource,
        limit_name=limit.name,
        limit=limit,
        available=units.tokens_down(available_milli),
        requested=units.tokens_down(requested_milli),
        exceeded=exceeded,
        retry_after_seconds=retry_after_seconds,
        reset_seconds=reset,
    )


def _writes(
    target: Target, outcomes: Sequence[core.Outcome], deltas: Sequence[int], now_ms: int
) -> list[LimitWrite]:
    writes: list[LimitWrite] = []
    for limit, out, delta in zip(target.limits, outcomes, deltas, strict=True):
        if out.write_mode == core.WRITE_NONE:
            continue
        prior = target.state.limits.get(limit.name) if target.state else None
        if target.quotas and limit.kind == "quota":
            spent = target.quota_spent.get(limit.name)
            part = quota.write(limit, prior, out, delta, now_ms, spent)
            if part is not None:
                writes.append(part)
            continue
        encoded = limit.encode()
        definition = None if prior is not None and prior.definition == encoded else encoded
        mode, value, lo, hi = out.write_mode, out.write_value, out.cond_lo, out.cond_hi
        legacy = None
        if prior is not None and stored.replaces(limit, prior):
            # The decision was made on the state converted to this limit's ticks: the write
            # replaces the stored state, on condition that it is still exactly what was read.
            assert out.new_full_at is not None
            mode, value, lo, hi = core.WRITE_ABSOLUTE, out.new_full_at, prior.full_at, prior.full_at
            legacy = prior.legacy
        writes.append(
            LimitWrite(
                limit_name=limit.name,
                mode=mode,
                value=value,
                cond_lo=lo,
                cond_hi=hi,
                delta_milli=delta,
                definition=definition,
                create=prior is None,
                legacy=legacy,
                fence=None if legacy is None else stored.fence(limit, now_ms),
            )
        )
    return writes
