"""The lease an `acquire` yields: what was taken, and how to adjust, take more or give back."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, TypeVar

from .arguments import oversized
from .core import units
from .deadline import Bounded, DeadlineExceeded
from .engine.engine import Landing, Target, available_milli, limit_status, request_too_large
from .engine.slots import Hold, SlotKeeper, free
from .engine.slots import status as slot_status
from .exceptions import ValidationError
from .failures import public_errors
from .models import LimitStatus
from .validation import validate_amount, validate_name, validate_signed_amount

log = logging.getLogger("zae_limiter")

T = TypeVar("T")


class Settler(Protocol):
    """Where a lease's changes go: the engine (straight to the buckets) or a reserver (its
    blocks first; `zae_limiter.reservations`)."""

    async def commit(self, targets: Sequence[Target], amounts: Mapping[str, int]) -> None: ...

    async def force_each(
        self,
        targets: Sequence[Target],
        amounts: Sequence[Mapping[str, int]],
        landing: Landing | None = None,
    ) -> None:
        """Apply each target's amounts unchecked, reporting in `landing` which targets' changes
        landed and which were certainly refused (before any failure is raised)."""
        ...

    def settle_local(
        self, targets: Sequence[Target], amounts: Mapping[str, int], check: bool
    ) -> bool:
        """Apply the change with no I/O if it can be (True), else change nothing (False)."""
        ...

    def detach(
        self, work: Coroutine[Any, Any, None], what: str | None = None
    ) -> asyncio.Task[None]:
        """Run a write that must land as a task a caller's deadline cannot cancel."""
        ...

    def clock(self) -> int:
        """Now, in the milliseconds decisions use."""
        ...


class Lease:
    """Consumption held by one `acquire` block.

    The consumption is already committed (visible to every client) when the block starts. On a
    normal exit it stands; if the block raises, everything the lease took is given back.
    """

    def __init__(
        self,
        settler: Settler,
        targets: Sequence[Target],
        consumed: Mapping[str, int],
        *,
        fail_open: bool = False,
        bypassed: bool = False,
        deadline: float | None = None,
        slots: tuple[SlotKeeper, Hold] | None = None,
    ) -> None:
        self._settler = settler
        # Concurrency caps' slots (`engine.slots`), renewed in the background until the end.
        self._slots = slots
        self._renewal: asyncio.Task[None] | None = None
        if slots is not None and slots[1].parts:
            self._renewal = asyncio.get_running_loop().create_task(slots[0].keep_alive(slots[1]))
        self._deadline = deadline
        self._targets = list(targets)
        # The books, per target (the entity's bucket item, then its parent's with cascade): a
        # cascade change may land on one item and fail on the other, and a rollback must then
        # give back to each exactly what it holds.
        self._books: list[dict[str, int]] = [dict(consumed) for _ in self._targets]
        self._limit_names = {limit.name for limit in targets[0].limits} if targets else set()
        self.fail_open = fail_open
        """True when DynamoDB was unreachable and FAIL_OPEN admitted without a bucket."""
        self.bypassed = bypassed
        """True when a kill switch bypassed the limits (docs/limits.md, "Kill switch"): nothing
        was taken, and the lease's calls change nothing."""
        # Both kinds of lease hold no bucket: their calls are no-ops.
        self._noop = fail_open or bypassed

    @property
    def consumed(self) -> dict[str, int]:
        """Net tokens this lease holds per limit (after adjustments and releases) in the
        entity's own bucket. A take counts once its write is known to have landed (an `adjust`
        that went on past its deadline, when it lands); a give-back counts at once, whatever
        happens to its write. With cascade the parent's books are kept apart: a change that
        landed on one item only is counted on that one."""
        return dict(self._books[0]) if self._books else {}

    @property
    def entity_id(self) -> str | None:
        return self._targets[0].entity_id if self._targets else None

    def statuses(self) -> list[LimitStatus]:
        """Every limit of this lease (the parent's too, with cascade) as the acquire left it,
        with no I/O: `available` is what the bucket holds now by the state its last write
        returned, `requested` what this lease holds. With reservations it is the shared bucket
        as of the block's last top-up, the blocks counted as used: what `available()` reports.
        Empty for a fail-open or bypassed lease (no bucket was seen). A soft limit (every limit
        in shadow mode) in debt is `exceeded`: past its allowance, which denied nothing.

        A concurrency cap the lease took slots of follows its entity's buckets: `available` the
        free slots by the item its take returned (negative: a soft cap held past its max,
        then `exceeded`), `requested` the slots the lease holds, `reset_seconds` the cap's
        retry hint."""
        now = self._settler.clock()
        result: list[LimitStatus] = []
        for target, books in zip(self._targets, self._books, strict=True):
            soft = target.soft
            for i, limit in enumerate(target.limits):
                available = available_milli(limit, target.state, now)
                result.append(
                    limit_status(
                        target,
                        limit,
                        available,
                        units.to_milli(books.get(limit.name, 0)),
                        soft is not None and soft[i] and available < 0,
                        0.0,
                        now,
                    )
                )
            if target.caps and self._slots is not None:
                result += self._cap_statuses(target, self._slots[1], now)
        return result

    @staticmethod
    def _cap_statuses(target: Target, hold: Hold, now: int) -> list[LimitStatus]:
        part = next((p for p in hold.parts if p.entity_id == target.entity_id), None)
        if part is None:  # no slot taken there: the item was never seen
            return []
        found: list[LimitStatus] = []
        for cap in target.caps:
            n = 0 if hold.released else part.slots.get(cap.name, 0)
            # Once released, this lease's own slots are free again in the item it saw.
            available = free(cap, part.item, now) + part.slots.get(cap.name, 0) - n
            exceeded = cap.name in part.soft and available < 0
            found.append(
                slot_status(
                    target.entity_id, target.resource, cap, part.item, available, n, exceeded, now
                )
            )
        return found

    def _amounts(self, amounts: Mapping[str, object], signed: bool) -> dict[str, int]:
        result: dict[str, int] = {}
        for name, amount in amounts.items():
            field = f"consume.{name}"
            validate_name(name, field=field)
            if not self._noop and name not in self._limit_names:
                raise ValidationError(field, name, "not one of this lease's limits")
            value = (validate_signed_amount if signed else validate_amount)(amount, field)
            if value:
                result[name] = value
        return result

    def _held_back(self, field: str, gives: Mapping[str, int]) -> None:
        """A lease gives back at most what it holds: its net consumption of a limit never goes
        below zero, or it would add capacity it never took (to its parent's bucket too)."""
        if self._noop:  # nothing was taken; the call changes nothing
            return
        held_now = self.consumed
        for name, amount in gives.items():
            held = held_now.get(name, 0)
            if amount > held:
                raise ValidationError(
                    f"{field}.{name}", -amount, f"gives back more than this lease holds ({held})"
                )

    async def adjust(self, **amounts: int) -> None:
        """Consume more (positive) or give back (negative) without a check: buckets may go
        negative, e.g. to reconcile an LLM call's real token count with its estimate. A give-back
        beyond what the lease holds is a `ValidationError` (nothing changes)."""
        deltas = self._amounts(amounts, signed=True)
        self._held_back("adjust", {k: -v for k, v in deltas.items() if v < 0})
        if deltas and not self._noop:
            await self._force(self._each(deltas), "adjust")

    async def consume(self, **amounts: int) -> None:
        """Take more, checked like `acquire`: raises `RateLimitExceeded` and takes nothing if any
        limit (or the parent's, with cascade) cannot cover it. At the deadline it raises
        `RateLimiterUnavailable` and the lease does not count the tokens; a write already sent
        may still land then, charging the bucket for tokens nobody holds (under-admission
        until refill, never over-admission). A partial cascade is given back."""
        deltas = self._amounts(amounts, signed=False)
        if deltas and not self._noop:
            # In shadow mode no limit refuses, not even a request larger than its burst.
            sets = [(t.entity_id, t.limits) for t in self._targets if not t.shadow]
            if (too := oversized(sets, deltas)) is not None:
                raise request_too_large(self._targets, deltas, self._settler.clock(), too[2])
            if not self._settler.settle_local(self._targets, deltas, check=True):
                await self._commit(deltas)
        self._add(deltas)

    @public_errors
    async def _commit(self, deltas: Mapping[str, int]) -> None:
        """A checked take written within the deadline (at the deadline: unavailable)."""
        async with Bounded(self._deadline):
            await self._settler.commit(self._targets, deltas)

    @property
    def slots(self) -> dict[str, int]:
        """Slots of concurrency caps this lease holds (its entity's), until it ends or
        releases them."""
        if self._slots is None or self._slots[1].released:
            return {}
        return self._slots[1].slots

    async def renew(self) -> bool:
        """Renew the lease's slots now: each entry expires `lease_ttl` from now. The lease
        renews itself in the background (every third of the shortest `lease_ttl`); this is for
        a caller that knows it was stalled. False when some slots were lost (the lease outlived
        its `lease_ttl` without a renewal and another client reaped them)."""
        if self._slots is None:
            return True
        return await self._renew()

    @public_errors
    async def _renew(self) -> bool:
        assert self._slots is not None
        async with Bounded(self._deadline):
            return await self._slots[0].renew(self._slots[1])

    async def _end_slots(self) -> None:
        """Stop the renewals and give the slots back (once: later calls send nothing). The
        give-back is detached: a deadline cannot cut it short and lose the slots until their
        expiry."""
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        if self._slots is None or self._slots[1].released:
            return
        keeper, hold = self._slots
        back = self._settler.detach(keeper.release(hold), "give-back of a lease's slots")
        async with Bounded(self._deadline):
            await _landed(back)

    async def release(self, **amounts: int) -> None:
        """Give tokens back early, at most what the lease holds; a bucket never refills past its
        burst.

        Slots of concurrency caps are given back together: `release()` with no arguments, or
        naming a cap with the slots it holds (another amount is a `ValidationError`), gives
        back every slot of the lease (its parent's too); the lease's tokens stay."""
        taken = self._slots[1].slots if self._slots is not None else {}
        if self._slots is not None and (not amounts or any(n in taken for n in amounts)):
            # After the slots went back, naming a cap again changes nothing (exactly once).
            held = taken
            for name in [n for n in amounts if n in held]:
                if amounts[name] != held[name]:
                    raise ValidationError(
                        f"release.{name}",
                        amounts[name],
                        f"slots are released together: all {held[name]} or none",
                    )
            amounts = {n: a for n, a in amounts.items() if n not in held}
            await self._end_slots()
        deltas = self._amounts(amounts, signed=False)
        self._held_back("release", deltas)
        if deltas and not self._noop:
            await self._force(self._each({k: -v for k, v in deltas.items()}), "release")

    async def _rollback(self) -> None:
        each = [{k: -v for k, v in books.items() if v > 0} for books in self._books]
        if any(each) and not self._noop:
            await self._force(each, "rollback")

    def _each(self, deltas: Mapping[str, int]) -> list[dict[str, int]]:
        """`deltas` for every target, a give-back cut to what that target holds: after a
        change that landed on one item only, the other holds less, and giving it more would
        add capacity this lease never took there."""
        return [
            {
                name: max(n, -books.get(name, 0)) if n < 0 else n
                for name, n in deltas.items()
                if n > 0 or books.get(name, 0) > 0
            }
            for books in self._books
        ]

    async def _force(self, each: Sequence[Mapping[str, int]], what: str) -> None:
        """An unchecked change (each target's own amounts), which must land: at the deadline
        the call returns and the write goes on in the background (retrying it would apply it
        twice); only a failure within the deadline raises.

        The books follow what landed, target by target, and err toward under-admission where
        the outcome is unknown: what the change gives back leaves them before the write and
        returns only if the write there was certainly refused (a give-back that may have landed
        is never given again, by this lease or its rollback: it could then land twice and mint
        tokens); what it takes enters a target's books once its write there is known to have
        landed (a rollback never gives back a take that did not land, and always the half of a
        cascade that did)."""
        if self._noop:
            return
        first = each[0] if each else {}
        if all(e == first for e in each) and self._settler.settle_local(
            self._targets, first, check=False
        ):
            self._add_each(each)
            return
        takes = [{name: n for name, n in e.items() if n > 0} for e in each]
        gives = [{name: n for name, n in e.items() if n < 0} for e in each]
        self._add_each(gives)
        landing = Landing()
        write = self._settler.detach(self._settler.force_each(self._targets, each, landing))
        try:
            async with Bounded(self._deadline):
                await _landed(write)
        except DeadlineExceeded as exc:
            log.warning("%s %s of %r goes on past its deadline: %s", what, list(each), self, exc)
            write.add_done_callback(
                functools.partial(self._landed_late, takes, gives, landing, what, repr(self))
            )
            return
        except BaseException:
            self._settle_books(takes, gives, landing)
            raise
        self._settle_books(takes, gives, landing)

    def _landed_late(
        self,
        takes: Sequence[Mapping[str, int]],
        gives: Sequence[Mapping[str, int]],
        landing: Landing,
        what: str,
        lease: str,
        write: asyncio.Task[None],
    ) -> None:
        if write.cancelled():
            return
        self._settle_books(takes, gives, landing)
        exc = write.exception()
        if exc is not None:
            log.error("%s of %s, which went on past its deadline, failed: %s", what, lease, exc)

    def _settle_books(
        self,
        takes: Sequence[Mapping[str, int]],
        gives: Sequence[Mapping[str, int]],
        landing: Landing,
    ) -> None:
        """Takes enter the books of the targets where they landed; give-backs certainly refused
        return to them (they left before the write)."""
        settled: list[dict[str, int]] = []
        for target, take, give in zip(self._targets, takes, gives, strict=True):
            if landing.stands(target):
                settled.append(dict(take))
            elif landing.refused_at(target):
                settled.append({name: -n for name, n in give.items()})
            else:
                settled.append({})
        self._add_each(settled)

    def _add(self, deltas: Mapping[str, int]) -> None:
        self._add_each([deltas] * len(self._books))

    def _add_each(self, each: Sequence[Mapping[str, int]]) -> None:
        if self._noop:  # nothing was taken from any bucket, so nothing is held
            return
        for books, deltas in zip(self._books, each, strict=True):
            for name, value in deltas.items():
                books[name] = books.get(name, 0) + value

    def __repr__(self) -> str:
        return f"Lease(entity_id={self.entity_id!r}, consumed={self.consumed!r})"


@public_errors
async def _landed(write: asyncio.Task[None]) -> None:
    """Wait for `write`; its failure leaves as a public error. The deadline stays outside: a
    wait cut short by it is no failure of the write, which goes on."""
    await asyncio.shield(write)


class LeaseScope:
    """The `async with` of `acquire`: admits on entry, yields the lease; if the block raises,
    gives back everything the lease holds, then re-raises.

    A plain class rather than `contextlib.asynccontextmanager`: acquiring is the hot path, and an
    async generator per call costs more than the decision itself when it is served locally.
    """

    __slots__ = ("_admit", "_lease")

    def __init__(self, admit: Callable[[], Awaitable[Lease]]) -> None:
        self._admit = admit
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        if self._lease is not None:
            raise RuntimeError("an acquire can be entered only once")
        self._lease = await self._admit()
        return self._lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self._lease is not None:
            try:
                await self._lease._rollback()
            except Exception:  # the caller's exception matters more than a failed give-back
                # Its give-back left the books first: it may have landed and is never resent.
                log.exception("rollback of %r failed; its give-back may not land", self._lease)
        if self._lease is not None and self._lease._slots is not None:
            try:
                await self._lease._end_slots()
            except Exception:  # the slots come back at their expiry (lease_ttl) at worst
                log.exception("give-back of %r's slots failed; they expire later", self._lease)


class SyncLease:
    """`Lease` for `SyncRateLimiter`: the same methods, blocking."""

    def __init__(self, lease: Lease, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
        self._lease = lease
        self._run = run

    @property
    def consumed(self) -> dict[str, int]:
        return self._lease.consumed

    def statuses(self) -> list[LimitStatus]:
        return self._lease.statuses()

    @property
    def entity_id(self) -> str | None:
        return self._lease.entity_id

    @property
    def fail_open(self) -> bool:
        return self._lease.fail_open

    @property
    def bypassed(self) -> bool:
        return self._lease.bypassed

    def adjust(self, **amounts: int) -> None:
        self._run(self._lease.adjust(**amounts))

    def consume(self, **amounts: int) -> None:
        self._run(self._lease.consume(**amounts))

    def release(self, **amounts: int) -> None:
        self._run(self._lease.release(**amounts))

    @property
    def slots(self) -> dict[str, int]:
        return self._lease.slots

    def renew(self) -> bool:
        result: bool = self._run(self._lease.renew())
        return result

    def __repr__(self) -> str:
        return repr(self._lease)
