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

    async def commit_each(
        self, targets: Sequence[Target], amounts: Sequence[Mapping[str, int]]
    ) -> None:
        """`commit` with each target's own amounts (a lease over several resources)."""
        ...

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
        also: Mapping[str, Mapping[str, int]] | None = None,
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
        # A lease over several resources (`acquire(..., also=)`): per other resource, the limit
        # names its amounts may name. None for one resource, whose operations pay nothing for
        # the others: `consume` is then `consumed` of every target.
        self._also: dict[str, set[str]] | None = None
        if also is not None:
            self._also = {resource: set() for resource in also}
            primary = self._targets[0].resource if self._targets else None
            for i, target in enumerate(self._targets):
                if target.resource != primary:
                    self._books[i] = dict(also[target.resource])
                    names = self._also[target.resource]
                    if not names:  # the entity's own target comes first: its limits count
                        names.update(limit.name for limit in target.limits)
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
    def also_consumed(self) -> dict[str, dict[str, int]]:
        """`consumed` of each other resource of the acquire (`also=`): net tokens this lease
        holds per limit in the entity's own bucket of that resource. Empty for a lease of one
        resource."""
        if self._also is None:
            return {}
        found: dict[str, dict[str, int]] = {resource: {} for resource in self._also}
        seen: set[str] = set()
        for target, books in zip(self._targets, self._books, strict=True):
            if target.resource in found and target.resource not in seen:
                seen.add(target.resource)  # the entity's own target: its parent's comes after
                found[target.resource] = dict(books)
        return found

    @property
    def entity_id(self) -> str | None:
        """The entity that acquired; None for a fail-open or bypassed lease (it holds no bucket)."""
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
        part = next(
            (
                p
                for p in hold.parts
                if p.entity_id == target.entity_id and p.resource == target.resource
            ),
            None,
        )
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

    def _amounts(
        self,
        amounts: Mapping[str, object],
        signed: bool,
        prefix: str = "consume",
        names: set[str] | None = None,
    ) -> dict[str, int]:
        own = self._limit_names if names is None else names
        result: dict[str, int] = {}
        for name, amount in amounts.items():
            field = f"{prefix}.{name}"
            validate_name(name, field=field)
            if not self._noop and name not in own:
                raise ValidationError(field, name, "not one of this lease's limits")
            value = (validate_signed_amount if signed else validate_amount)(amount, field)
            if value:
                result[name] = value
        return result

    def _also_shape(self, also: object) -> dict[str, Mapping[str, object]]:
        """`also=` of a lease operation, its shape checked: other resources of this lease
        only, each with a mapping (fields `also`, `also.<resource>`)."""
        if not isinstance(also, Mapping):
            raise ValidationError("also", also, "must be a mapping of resource to amounts")
        for resource, amounts in also.items():
            field = f"also.{resource}"
            if self._also is None or resource not in self._also:
                raise ValidationError(field, resource, "not one of this lease's other resources")
            if not isinstance(amounts, Mapping):
                raise ValidationError(field, amounts, "must be a mapping of limit name to amount")
        return dict(also)

    def _also_amounts(self, also: object, signed: bool) -> dict[str, dict[str, int]]:
        """The amounts of `also=` in a lease operation: each resource's own limits only
        (fields `also.<resource>.<limit>`)."""
        shape = self._also_shape(also)
        names = self._also or {}  # every resource of `shape` is one of them
        return {r: self._amounts(a, signed, f"also.{r}", names[r]) for r, a in shape.items()}

    def _held_back_also(self, gives: Mapping[str, Mapping[str, int]]) -> None:
        """`_held_back` for each other resource, against the entity's books of it."""
        if self._noop:
            return
        held_now = self.also_consumed
        for resource, each in gives.items():
            for name, amount in each.items():
                held = held_now[resource].get(name, 0)
                if amount > held:
                    raise ValidationError(
                        f"also.{resource}.{name}",
                        -amount,
                        f"gives back more than this lease holds ({held})",
                    )

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

    async def adjust(
        self, *, also: Mapping[str, Mapping[str, int]] | int | None = None, **amounts: int
    ) -> None:
        """Consume more (positive) or give back (negative) without a check: buckets may go
        negative, e.g. to reconcile an LLM call's real token count with its estimate. A give-back
        beyond what the lease holds is a `ValidationError` (nothing changes).

        The keyword amounts are the acquire's own resource's; `also={resource: {limit: n}}`
        adjusts the other resources of an `acquire(..., also=)`, every item in one round.
        A limit named `also` is still adjusted by `also=<int>` (a mapping names resources),
        which is why `also` admits an int: `adjust(**deltas)` of a `dict[str, int]` type-checks."""
        if also is not None and not isinstance(also, Mapping):
            amounts, also = {**amounts, "also": also}, None
        deltas = self._amounts(amounts, signed=True)
        if also is None:
            self._held_back("adjust", {k: -v for k, v in deltas.items() if v < 0})
            if deltas and not self._noop:
                await self._force(self._each(deltas), "adjust")
            return
        extra = self._also_amounts(also, signed=True)
        self._held_back("adjust", {k: -v for k, v in deltas.items() if v < 0})
        self._held_back_also({r: {k: -v for k, v in d.items() if v < 0} for r, d in extra.items()})
        if (deltas or any(extra.values())) and not self._noop:
            await self._force(self._each(deltas, extra), "adjust")

    async def consume(
        self, *, also: Mapping[str, Mapping[str, int]] | int | None = None, **amounts: int
    ) -> None:
        """Take more, checked like `acquire`: raises `RateLimitExceeded` and takes nothing if any
        limit (or the parent's, with cascade) cannot cover it. At the deadline it raises
        `RateLimiterUnavailable` and the lease does not count the tokens; a write already sent
        may still land then, charging the bucket for tokens nobody holds (under-admission
        until refill, never over-admission). A partial cascade is given back.

        `also={resource: {limit: n}}` takes from the other resources of an
        `acquire(..., also=)` too, all or nothing with the keyword amounts."""
        if also is not None and not isinstance(also, Mapping):
            amounts, also = {**amounts, "also": also}, None
        if self._also is not None or also is not None:
            await self._consume_each(self._amounts(amounts, signed=False), also)
            return
        deltas = self._amounts(amounts, signed=False)
        if deltas and not self._noop:
            # In shadow mode no limit refuses, not even a request larger than its burst.
            sets = [(t.entity_id, t.limits) for t in self._targets if not t.shadow]
            if (too := oversized(sets, deltas)) is not None:
                raise request_too_large(self._targets, deltas, self._settler.clock(), too[2])
            if not self._settler.settle_local(self._targets, deltas, check=True):
                await self._commit(deltas)
        self._add(deltas)

    async def _consume_each(
        self, deltas: dict[str, int], also: Mapping[str, Mapping[str, int]] | None
    ) -> None:
        """`consume` of a lease over several resources: each target takes its resource's
        amounts, in one checked decision (straight to the buckets: never from blocks)."""
        extra = {} if also is None else self._also_amounts(also, signed=False)
        if self._noop or not (deltas or any(extra.values())):
            return
        each = self._each(deltas, extra)
        primary = self._targets[0].resource
        asks = {primary: ("consume", deltas)}
        asks.update((r, (f"also.{r}", d)) for r, d in extra.items())
        for resource, (field, amounts) in asks.items():
            # In shadow mode no limit refuses, not even a request larger than its burst.
            mine = [t for t in self._targets if t.resource == resource]
            sets = [(t.entity_id, t.limits) for t in mine if not t.shadow]
            if (too := oversized(sets, amounts, field)) is not None:
                raise request_too_large(mine, amounts, self._settler.clock(), too[2])
        await self._commit_each(each)
        self._add_each(each)

    @public_errors
    async def _commit_each(self, each: Sequence[Mapping[str, int]]) -> None:
        async with Bounded(self._deadline):
            await self._settler.commit_each(self._targets, each)

    @public_errors
    async def _commit(self, deltas: Mapping[str, int]) -> None:
        """A checked take written within the deadline (at the deadline: unavailable)."""
        async with Bounded(self._deadline):
            await self._settler.commit(self._targets, deltas)

    @property
    def slots(self) -> dict[str, int]:
        """Slots of concurrency caps this lease holds (its entity's, of the acquire's own
        resource), until it ends or releases them."""
        if self._slots is None or self._slots[1].released:
            return {}
        if self._also is not None:
            return self._slots_in(self._targets[0].resource)
        return self._slots[1].slots

    def _slots_in(self, resource: str) -> dict[str, int]:
        """The entity's own slots of `resource` (a lease over several resources)."""
        if self._slots is None:
            return {}
        entity_id = self.entity_id
        for part in self._slots[1].parts:
            if part.entity_id == entity_id and part.resource == resource:
                return dict(part.slots)
        return {}

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

    async def release(
        self, *, also: Mapping[str, Mapping[str, int]] | int | None = None, **amounts: int
    ) -> None:
        """Give tokens back early, at most what the lease holds; a bucket never refills past its
        burst.

        Slots of concurrency caps are given back together: `release()` with no arguments, or
        naming a cap with the slots it holds (another amount is a `ValidationError`), gives
        back every slot of the lease (its parent's too); the lease's tokens stay.

        `also={resource: {limit: n}}` gives back to the other resources of an
        `acquire(..., also=)`; naming a cap of one of them gives back every slot too."""
        if also is not None and not isinstance(also, Mapping):
            amounts, also = {**amounts, "also": also}, None
        if also is not None or self._also is not None:
            await self._release_each(amounts, also)
            return
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

    async def _release_each(
        self, amounts: Mapping[str, int], also: Mapping[str, Mapping[str, int]] | None
    ) -> None:
        """`release` of a lease over several resources: the slots of every resource go back
        together (as for one), the tokens of each resource to its own items, in one round."""
        raw = {} if also is None else self._also_shape(also)
        extra: dict[str, dict[str, int]] = {}
        if self._slots is not None:
            primary = self._targets[0].resource
            named = [("release", primary, list(amounts))]
            named += [(f"also.{r}", r, list(d)) for r, d in raw.items()]
            held = {r: self._slots_in(r) for _, r, _ in named}
            caps = [(f, r, n) for f, r, names in named for n in names if n in held[r]]
            if (not amounts and not any(raw.values())) or caps:
                for field, resource, name in caps:
                    asked = amounts[name] if field == "release" else raw[resource][name]
                    if asked != held[resource][name]:
                        raise ValidationError(
                            f"{field}.{name}",
                            asked,
                            f"slots are released together: all {held[resource][name]} or none",
                        )
                amounts = {n: a for n, a in amounts.items() if n not in held[primary]}
                raw = {r: {n: a for n, a in d.items() if n not in held[r]} for r, d in raw.items()}
                await self._end_slots()
        extra = self._also_amounts(raw, signed=False) if raw else {}
        deltas = self._amounts(amounts, signed=False)
        self._held_back("release", deltas)
        self._held_back_also(extra)
        if (deltas or any(extra.values())) and not self._noop:
            negative = {r: {k: -v for k, v in d.items()} for r, d in extra.items()}
            await self._force(self._each({k: -v for k, v in deltas.items()}, negative), "release")

    async def _rollback(self) -> None:
        each = [{k: -v for k, v in books.items() if v > 0} for books in self._books]
        if any(each) and not self._noop:
            await self._force(each, "rollback")

    def _each(
        self,
        deltas: Mapping[str, int],
        also: Mapping[str, Mapping[str, int]] | None = None,
    ) -> list[dict[str, int]]:
        """`deltas` for every target, a give-back cut to what that target holds: after a
        change that landed on one item only, the other holds less, and giving it more would
        add capacity this lease never took there. Over several resources `deltas` are the
        acquire's own resource's and `also` the others' (a resource not named: nothing)."""
        if self._also is None:
            return [_cut(books, deltas) for books in self._books]
        primary = self._targets[0].resource if self._targets else None
        extra = also or {}
        return [
            _cut(books, deltas if target.resource == primary else extra.get(target.resource, {}))
            for target, books in zip(self._targets, self._books, strict=True)
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


def _cut(books: Mapping[str, int], deltas: Mapping[str, int]) -> dict[str, int]:
    """`deltas` for one target: a give-back at most what its books hold."""
    return {
        name: max(n, -books.get(name, 0)) if n < 0 else n
        for name, n in deltas.items()
        if n > 0 or books.get(name, 0) > 0
    }


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
        """`Lease.consumed`: net tokens held per limit in the entity's own bucket."""
        return self._lease.consumed

    def statuses(self) -> list[LimitStatus]:
        """`Lease.statuses`: each limit as the acquire left it (no I/O)."""
        return self._lease.statuses()

    @property
    def also_consumed(self) -> dict[str, dict[str, int]]:
        """`Lease.also_consumed`: `consumed` of each other resource of the acquire (`also=`)."""
        return self._lease.also_consumed

    @property
    def entity_id(self) -> str | None:
        """`Lease.entity_id`: the entity that acquired."""
        return self._lease.entity_id

    @property
    def fail_open(self) -> bool:
        """`Lease.fail_open`: True when FAIL_OPEN admitted without a bucket."""
        return self._lease.fail_open

    @property
    def bypassed(self) -> bool:
        """`Lease.bypassed`: True when a kill switch bypassed the limits."""
        return self._lease.bypassed

    def adjust(
        self, *, also: Mapping[str, Mapping[str, int]] | int | None = None, **amounts: int
    ) -> None:
        """`Lease.adjust`, blocking."""
        self._run(self._lease.adjust(also=also, **amounts))

    def consume(
        self, *, also: Mapping[str, Mapping[str, int]] | int | None = None, **amounts: int
    ) -> None:
        """`Lease.consume`, blocking."""
        self._run(self._lease.consume(also=also, **amounts))

    def release(
        self, *, also: Mapping[str, Mapping[str, int]] | int | None = None, **amounts: int
    ) -> None:
        """`Lease.release`, blocking."""
        self._run(self._lease.release(also=also, **amounts))

    @property
    def slots(self) -> dict[str, int]:
        """`Lease.slots`: slots of concurrency caps this lease holds."""
        return self._lease.slots

    def renew(self) -> bool:
        """`Lease.renew`, blocking."""
        result: bool = self._run(self._lease.renew())
        return result

    def __repr__(self) -> str:
        return repr(self._lease)
