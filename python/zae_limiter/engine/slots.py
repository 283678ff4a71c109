"""Concurrency caps: slots taken for a lease's life, given back exactly once.

A cap (`Limit.concurrency`) is not a token bucket: nothing refills, a slot comes back when its
lease ends (or, if the lease's process died, when its entry expires `lease_ttl` after its last
renewal). The caps of one (entity, resource) live in one item of their own (`SlotStorage`): a
count of slots held per cap and one entry per holding lease. The keeper takes them with one
conditional write per entity item, the count at most `max - n` (so never more than `max` are
held, whatever the number of processes), and reaps the entries of expired holders only when it
needs their slots, on condition that each is still exactly the entry it read.

An acquire takes its slots before its buckets (a denial by a cap then costs no bucket write);
if the buckets refuse, the slots are given back. Cascade takes the parent's slots too, all or
nothing. A soft cap (`soft=True`, or every cap in shadow mode) is taken with no bound on its
count: it never denies, and a take that leaves more than `max` live slots held is reported
(`Hold.excesses`). See docs/design.md, "Concurrency caps" and "Soft limits and shadow mode".
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core import units
from ..exceptions import RateLimiterUnavailable, RateLimitExceeded
from ..models import CONCURRENCY, Limit, LimitStatus
from ..storage.protocol import SlotConflict, SlotItem, SlotStorage, SlotTake

log = logging.getLogger("zae_limiter")

MAX_ROUNDS = 12
# A denial's retry-after is the earliest expiry among the cap's holders, at most this: a live
# holder usually ends its lease long before its entry would expire (it is renewed), and a slot
# comes back the moment it does, so the hint must stay short to be worth following.
RETRY_CAP_MS = 1000
# Renewal runs this many times per lease_ttl: before half the ttl has elapsed, with a second
# chance before the entry expires if one renewal fails.
RENEWALS_PER_TTL = 3

SlotSets = Sequence[tuple[str, Sequence[Limit]]]


def has_caps(sets: SlotSets) -> bool:
    """Whether any limit of the sets is a concurrency cap (the only check an acquire without
    one pays)."""
    for _, limits in sets:
        for limit in limits:
            if limit.kind == CONCURRENCY:
                return True
    return False


def cap_names(sets: SlotSets) -> frozenset[str]:
    return frozenset(limit.name for _, limits in sets for limit in limits if limit.is_concurrency)


def wanted(caps: Sequence[Limit], amounts: Mapping[str, int]) -> dict[str, int]:
    """Slots each cap takes: `consume.get(name, 1)` (0: the cap is not taken)."""
    return {cap.name: amounts.get(cap.name, 1) for cap in caps if amounts.get(cap.name, 1) > 0}


def live(item: SlotItem | None, cap: str, now_ms: int) -> tuple[int, list[tuple[str, int, int]]]:
    """Slots of `cap` held by unexpired entries at `now_ms`, and the expired entries."""
    if item is None:
        return 0, []
    holders = item.holders.get(cap, {})
    expired = [(lid, n, x) for lid, (n, x) in sorted(holders.items()) if x <= now_ms]
    return item.held.get(cap, 0) - sum(n for _, n, _ in expired), expired


def free(cap: Limit, item: SlotItem | None, now_ms: int) -> int:
    """Slots of `cap` a take could have now (expired holders count as free: a take reaps them);
    negative when a soft cap is held past its max."""
    return cap.capacity - live(item, cap.name, now_ms)[0]


def retry_ms(cap: Limit, item: SlotItem | None, now_ms: int) -> int:
    """The cap's retry hint: the earliest expiry among its live holders, at most
    `RETRY_CAP_MS` (a holder usually ends its lease, freeing its slot, well before then)."""
    holders = item.holders.get(cap.name, {}) if item else {}
    expiries = [x for _, x in holders.values() if x > now_ms]
    return min(RETRY_CAP_MS, min(expiries) - now_ms) if expiries else RETRY_CAP_MS


def wait_ms(cap: Limit, item: SlotItem | None, n: int, now_ms: int) -> int:
    """Ms until `n` slots of `cap` may be taken: 0 if they are free now, else the retry hint
    (a slot comes back when a holder ends, which no stored instant foretells)."""
    return 0 if n <= free(cap, item, now_ms) else retry_ms(cap, item, now_ms)


def status(
    entity_id: str,
    resource: str,
    cap: Limit,
    item: SlotItem | None,
    available: int,
    n: int,
    exceeded: bool,
    now_ms: int,
) -> LimitStatus:
    """A cap's `LimitStatus`: `available` free slots (`free`), `n` requested, `reset_seconds`
    the retry hint by `item` at `now_ms` (the RateLimit field's `t`: a cap has no refill),
    `retry_after_seconds` the hint when `exceeded` denies, else 0."""
    hint = units.seconds(retry_ms(cap, item, now_ms))
    return LimitStatus(
        entity_id=entity_id,
        resource=resource,
        limit_name=cap.name,
        limit=cap,
        available=available,
        requested=n,
        exceeded=exceeded,
        retry_after_seconds=hint if exceeded else 0.0,
        reset_seconds=hint,
    )


# (entity id, resource, soft caps past their max, hard caps past it by shadow mode)
Excess = tuple[str, str, list[str], list[str]]


@dataclass
class Part:
    """One entity's share of a hold: its caps' slots and their ttl (ms); once taken, the item
    as the take left it, and the soft caps (`soft`) the take left held past their max
    (`past`)."""

    entity_id: str
    resource: str
    slots: dict[str, int]
    ttl_ms: dict[str, int]
    soft: frozenset[str] = frozenset()
    item: SlotItem | None = None
    past: tuple[str, ...] = ()


@dataclass
class Hold:
    """The slots one lease holds, under one lease id, on its entity's item and (cascade) its
    parent's. `released` is set before the release is written: no second release is sent."""

    lease_id: str
    parts: list[Part] = field(default_factory=list)
    released: bool = False

    @property
    def slots(self) -> dict[str, int]:
        """The entity's own slots per cap (the first part)."""
        return dict(self.parts[0].slots) if self.parts else {}

    @property
    def renew_every_ms(self) -> int:
        return min(t for p in self.parts for t in p.ttl_ms.values()) // RENEWALS_PER_TTL

    def excesses(self, caps: Mapping[tuple[str, str], Mapping[str, Limit]]) -> list[Excess]:
        """Per part whose take left soft caps past their max: (entity, resource, the caps soft
        themselves, the hard ones soft only by shadow mode), for `Engine.on_soft_excess`.
        `caps`: (entity id, resource) -> its caps by name."""
        found: list[Excess] = []
        for p in self.parts:
            if p.past:
                own = caps[(p.entity_id, p.resource)]
                soft = [name for name in p.past if own[name].soft]
                shadow = [name for name in p.past if not own[name].soft]
                found.append((p.entity_id, p.resource, soft, shadow))
        return found


Detach = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class SlotKeeper:
    """Takes, renews and gives back the slots of concurrency caps through `storage`."""

    def __init__(
        self,
        storage: SlotStorage,
        clock: Callable[[], int],
        detach: Detach,
        shadow: bool = False,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.detach = detach
        self.shadow = shadow
        """Every cap is taken as a soft one (`RateLimiter(shadow=True)`)."""
        # The last item seen per (entity, resource): expired holders to reap at the first try.
        self._views: dict[tuple[str, str], SlotItem | None] = {}

    async def take(self, resource: str, sets: SlotSets, amounts: Mapping[str, int]) -> Hold:
        """Take every cap's slots of every entity of `sets`, all or nothing; `RateLimitExceeded`
        naming the caps that are full."""
        return await self.take_each([(resource, sets, amounts)])

    async def take_each(
        self, groups: Sequence[tuple[str, SlotSets, Mapping[str, int]]]
    ) -> Hold:
        """`take` over several resources (`(resource, sets, amounts)` each): one hold, one
        lease id, every part taken in one round, all or nothing."""
        hold = Hold(secrets.token_hex(8))
        caps_of: dict[tuple[str, str], dict[str, Limit]] = {}
        for resource, sets, amounts in groups:
            for entity_id, limits in sets:
                caps = [limit for limit in limits if limit.is_concurrency]
                slots = wanted(caps, amounts)
                if slots:
                    ttl = {
                        c.name: (c.lease_ttl_seconds or 1) * units.MS_PER_SECOND
                        for c in caps
                        if c.name in slots
                    }
                    soft = frozenset(
                        c.name for c in caps if c.name in slots and (c.soft or self.shadow)
                    )
                    hold.parts.append(Part(entity_id, resource, slots, ttl, soft))
                    caps_of[(entity_id, resource)] = {c.name: c for c in caps}
        if not hold.parts:
            return hold
        results = await asyncio.gather(
            *(
                self._take_part(hold.lease_id, p, caps_of[(p.entity_id, p.resource)])
                for p in hold.parts
            ),
            return_exceptions=True,
        )
        denied: list[LimitStatus] = []
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, RateLimitExceeded):
                denied.extend(result.violations)
            elif isinstance(result, BaseException):
                failure = failure or result
        if denied or failure is not None:
            # All or nothing: whatever landed (or may have: an unknown outcome) is given back.
            # Releasing an entry that is not there changes nothing.
            back = self.detach(self._release(hold), "give-back of slots after a refused take")
            if failure is None or not isinstance(failure, asyncio.CancelledError):
                await asyncio.shield(back)
            if failure is not None:
                raise failure
            raise RateLimitExceeded(denied, entity_id=groups[0][1][0][0])
        return hold

    async def _take_part(self, lease_id: str, part: Part, caps: Mapping[str, Limit]) -> None:
        key = (part.entity_id, part.resource)
        view = self._views.get(key)
        fresh = False
        for _ in range(MAX_ROUNDS):
            now = self.clock()
            takes: list[SlotTake] = []
            denied: list[LimitStatus] = []
            for name, n in part.slots.items():
                cap = caps[name]
                soft = name in part.soft
                held, expired = live(view, name, now)
                if fresh and held + n > cap.capacity and not soft:
                    left = cap.capacity - held
                    denied.append(
                        status(part.entity_id, part.resource, cap, view, left, n, True, now)
                    )
                    continue
                # Expired holders are reaped only when their slots are needed (a soft cap's
                # too: it keeps the count of live holders, which reports its excess, true).
                total = view.held.get(name, 0) if view else 0
                reap = tuple(expired) if total + n > cap.capacity else ()
                expires = now + part.ttl_ms[name]
                takes.append(SlotTake(name, n, cap.capacity, expires, reap, soft))
            if denied:
                raise RateLimitExceeded(denied)
            try:
                item = await self.storage.take_slots(part.entity_id, part.resource, lease_id, takes)
            except SlotConflict as exc:
                view, fresh = exc.current, True
                self._remember(key, view)
                continue
            self._remember(key, item)
            part.item = item
            part.past = tuple(
                name
                for name in part.slots
                if name in part.soft and live(item, name, now)[0] > caps[name].capacity
            )
            return
        raise RateLimiterUnavailable(
            f"slot contention: no take landed in {MAX_ROUNDS} rounds of conflicting writes"
        )

    def _remember(self, key: tuple[str, str], item: SlotItem | None) -> None:
        if len(self._views) >= 10_000 and key not in self._views:
            self._views.clear()  # a bound, not a policy: the views only save a round
        self._views[key] = item

    async def release(self, hold: Hold) -> None:
        """Give the hold's slots back, once: a second call sends nothing."""
        if hold.released or not hold.parts:
            hold.released = True
            return
        hold.released = True
        await self._release(hold)

    async def _release(self, hold: Hold) -> None:
        results = await asyncio.gather(
            *(
                self.storage.release_slots(p.entity_id, p.resource, hold.lease_id, p.slots)
                for p in hold.parts
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def renew(self, hold: Hold) -> bool:
        """Move every entry's expiry to now + its cap's ttl; False when some entry was gone
        (reaped after it expired, or released): those slots are no longer held."""
        if hold.released or not hold.parts:
            return not hold.released
        now = self.clock()
        results = await asyncio.gather(
            *(
                self.storage.renew_slots(
                    p.entity_id,
                    p.resource,
                    hold.lease_id,
                    {c: (n, now + p.ttl_ms[c]) for c, n in p.slots.items()},
                )
                for p in hold.parts
            ),
        )
        return all(results)

    async def keep_alive(self, hold: Hold) -> None:
        """Renew the hold every ttl / RENEWALS_PER_TTL until cancelled (at the lease's end)."""
        every = max(hold.renew_every_ms, 1) / units.MS_PER_SECOND
        while not hold.released:
            await asyncio.sleep(every)
            if hold.released:
                return
            try:
                if not await self.renew(hold):
                    log.warning(
                        "lease %s lost slots of a concurrency cap (its entry expired and was "
                        "reaped before a renewal)",
                        hold.lease_id,
                    )
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next renewal may succeed before the entry expires
                log.warning("renewal of lease %s failed: %s", hold.lease_id, exc)
