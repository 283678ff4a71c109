"""Concurrency caps (`Limit.concurrency`) on `MemoryStorage`: slots held for a lease's life,
given back exactly once, reaped after `lease_ttl`, renewed while the lease lives, cascaded to
the parent, all or nothing with the buckets, and the failure modes.

Processes, hosts and faults are tests/reliability/test_concurrency_caps.py (moto's server)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from zae_limiter import (
    FailureMode,
    Limit,
    MemoryStorage,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    SyncRateLimiter,
    ValidationError,
    schema,
)
from zae_limiter.engine.slots import RETRY_CAP_MS
from zae_limiter.storage.protocol import RepositoryUnavailable, SlotConflict, SlotItem, SlotTake

T0 = 1_800_000_000_000
CAP = Limit.concurrency("streams", 2)
RPM = Limit.per_minute("rpm", 100)


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


async def held(store: MemoryStorage, entity: str = "e", resource: str = "r") -> dict[str, int]:
    item = await store.get_slots(entity, resource)
    return {} if item is None else dict(item.held)


async def holders(store: MemoryStorage, entity: str = "e", resource: str = "r") -> int:
    item = await store.get_slots(entity, resource)
    return 0 if item is None else sum(len(h) for h in item.holders.values())


async def test_a_cap_admits_its_max_and_denies_the_next_with_a_short_retry_hint() -> None:
    store = MemoryStorage()
    async with RateLimiter(repository=store) as lim:
        async with lim.acquire("e", "r", [CAP, RPM], {"rpm": 1}) as a:
            assert a.slots == {"streams": 1}
            assert a.consumed == {"rpm": 1}  # slots are not tokens
            async with lim.acquire("e", "r", [CAP, RPM], {"rpm": 1}):
                assert await lim.available("e", "r", [CAP, RPM]) == {"streams": 0, "rpm": 98}
                with pytest.raises(RateLimitExceeded) as info:
                    async with lim.acquire("e", "r", [CAP, RPM], {"rpm": 1}):
                        pass
        assert await lim.available("e", "r", [CAP, RPM]) == {"streams": 2, "rpm": 98}
    exc = info.value
    assert [v.limit_name for v in exc.violations] == ["streams"]
    assert exc.violations[0].available == 0 and exc.violations[0].requested == 1
    # Holders are live for 5 minutes: the hint is capped to RETRY_CAP_MS, not 5 minutes.
    assert exc.retry_after_seconds == RETRY_CAP_MS / 1000
    assert await held(store) == {"streams": 0} and await holders(store) == 0


async def test_a_cap_denial_writes_no_bucket_and_a_bucket_denial_gives_the_slots_back() -> None:
    store = MemoryStorage()
    tight = Limit.per_minute("rpm", 1)
    async with RateLimiter(repository=store) as lim:
        async with lim.acquire("e", "r", [Limit.concurrency("streams", 1), tight], {"rpm": 1}):
            with pytest.raises(RateLimitExceeded) as info:
                async with lim.acquire("e", "r", [Limit.concurrency("streams", 1), tight], {}):
                    pass
            assert [v.limit_name for v in info.value.violations] == ["streams"]
        assert await lim.available("e", "r", [tight]) == {"rpm": 0}  # the denial took none
        with pytest.raises(RateLimitExceeded) as info:
            async with lim.acquire("e", "r", [Limit.concurrency("streams", 1), tight], {"rpm": 1}):
                pass
        assert [v.limit_name for v in info.value.violations] == ["rpm"]
    assert await held(store) == {"streams": 0}  # taken, then given back: the bucket refused
    assert await holders(store) == 0


async def test_consume_names_how_many_slots_and_zero_takes_none() -> None:
    store = MemoryStorage()
    cap = Limit.concurrency("gpu", 4)
    async with RateLimiter(repository=store) as lim:
        async with lim.acquire("e", "r", [cap], {"gpu": 3}) as lease:
            assert lease.slots == {"gpu": 3}
            assert await held(store) == {"gpu": 3}
            with pytest.raises(RateLimitExceeded):
                async with lim.acquire("e", "r", [cap], {"gpu": 2}):
                    pass
            async with lim.acquire("e", "r", [cap], {"gpu": 0}) as none:
                assert none.slots == {}
        with pytest.raises(RateLimitExceeded):  # RequestTooLarge: can never fit
            async with lim.acquire("e", "r", [cap], {"gpu": 5}):
                pass
    assert await held(store) == {"gpu": 0}


async def test_exit_rollback_and_release_give_the_slots_back_exactly_once() -> None:
    store = MemoryStorage()
    cap = Limit.concurrency("streams", 3)
    async with RateLimiter(repository=store) as lim:
        # Explicit release, then the exit: once.
        async with lim.acquire("e", "r", [cap], {"streams": 2}) as lease:
            await lease.release()
            assert lease.slots == {}
            assert await held(store) == {"streams": 0}
            await lease.release(streams=2)  # again: nothing more goes back
            await lease.release()
        assert await held(store) == {"streams": 0}
        # The rollback (the block raises) after a release: once.
        with pytest.raises(RuntimeError):
            async with lim.acquire("e", "r", [cap], {"streams": 2}) as lease:
                await lease.release(streams=2)
                raise RuntimeError("boom")
        assert await held(store) == {"streams": 0}
        # The rollback alone.
        with pytest.raises(RuntimeError):
            async with lim.acquire("e", "r", [cap, RPM], {"streams": 1, "rpm": 5}) as lease:
                assert await held(store) == {"streams": 1}
                raise RuntimeError("boom")
        assert await held(store) == {"streams": 0}
        assert await lim.available("e", "r", [RPM]) == {"rpm": 100}
        # Another holder's slots are never given back by this lease's releases.
        async with lim.acquire("e", "r", [cap], {"streams": 1}):
            async with lim.acquire("e", "r", [cap], {"streams": 2}) as lease:
                await lease.release()
                await lease.release()
                assert await held(store) == {"streams": 1}
            assert await held(store) == {"streams": 1}
    assert await held(store) == {"streams": 0} and await holders(store) == 0


async def test_a_release_of_part_of_the_slots_or_an_adjust_of_a_cap_is_refused() -> None:
    cap = Limit.concurrency("streams", 3)
    async with (
        RateLimiter(repository=MemoryStorage()) as lim,
        lim.acquire("e", "r", [cap, RPM], {"streams": 2}) as lease,
    ):
        with pytest.raises(ValidationError) as info:
            await lease.release(streams=1)
        assert info.value.field == "release.streams"
        with pytest.raises(ValidationError) as info:
            await lease.adjust(streams=1)
        assert info.value.field == "consume.streams"
        assert lease.slots == {"streams": 2}


async def test_a_never_ended_lease_gives_its_slots_back_after_lease_ttl() -> None:
    """A holder that stops renewing (its process died): its entry is reaped by the next take
    that needs its slots once `lease_ttl` has passed, and not a millisecond before."""
    store = MemoryStorage()
    clock = Clock()
    cap = Limit.concurrency("streams", 1, lease_ttl=timedelta(seconds=30))
    # The dead holder: an entry written as a lease takes it, never renewed nor released.
    await store.take_slots("e", "r", "dead", [SlotTake("streams", 1, 1, T0 + 30_000)])
    async with RateLimiter(repository=store, clock=clock) as lim:
        clock.now = T0 + 29_999
        assert await lim.available("e", "r", [cap]) == {"streams": 0}
        with pytest.raises(RateLimitExceeded) as info:
            async with lim.acquire("e", "r", [cap], {}):
                pass
        assert info.value.retry_after_seconds == 0.001  # the holder's expiry is that close
        clock.now = T0 + 30_000
        assert await lim.available("e", "r", [cap]) == {"streams": 1}
        async with lim.acquire("e", "r", [cap], {}) as lease:
            assert lease.slots == {"streams": 1}
            item = await store.get_slots("e", "r")
            assert item is not None and "dead" not in item.holders["streams"]
            assert item.held == {"streams": 1}
    assert await held(store) == {"streams": 0}


async def test_a_renewed_entry_is_not_reaped() -> None:
    """The reaper's write is conditioned on the entry it read: a renewal in between (the
    holder was alive after all) makes it fail, and the holder keeps its slot."""
    store = MemoryStorage()
    clock = Clock()
    cap = Limit.concurrency("streams", 1, lease_ttl=timedelta(seconds=10))
    async with (
        RateLimiter(repository=store, clock=clock) as holder_lim,
        holder_lim.acquire("e", "r", [cap], {}) as lease,
        RateLimiter(repository=store, clock=clock) as other,
    ):
        clock.now = T0 + 10_000  # expired as the other sees it
        stale = await store.get_slots("e", "r")
        assert stale is not None
        assert await lease.renew() is True  # the holder renews first
        # The reaper works from the entry it read before the renewal: refused.
        ((lid, (n, x)),) = stale.holders["streams"].items()
        with pytest.raises(SlotConflict):
            await store.take_slots(
                "e", "r", "reaper", [SlotTake("streams", 1, 1, T0 + 20_000, ((lid, n, x),))]
            )
        with pytest.raises(RateLimitExceeded):
            async with other.acquire("e", "r", [cap], {}):
                pass
        assert lease.slots == {"streams": 1}


async def test_a_lease_renews_itself_past_lease_ttl() -> None:
    """Real time: a lease held 2.6 s with lease_ttl 1 s keeps its slot throughout (renewed
    every third of the ttl); once it ends the slot is free at once."""
    store = MemoryStorage()
    cap = Limit.concurrency("streams", 1, lease_ttl=timedelta(seconds=1))
    async with RateLimiter(repository=store) as lim, RateLimiter(repository=store) as other:
        async with lim.acquire("e", "r", [cap], {}) as lease:
            first = await store.get_slots("e", "r")
            assert first is not None
            for _ in range(4):
                await asyncio.sleep(0.65)
                with pytest.raises(RateLimitExceeded):
                    async with other.acquire("e", "r", [cap], {}):
                        pass
            later = await store.get_slots("e", "r")
            assert later is not None
            (x0,) = [x for _, x in first.holders["streams"].values()]
            (x1,) = [x for _, x in later.holders["streams"].values()]
            assert x1 - x0 >= 2000  # renewed at least twice past the first expiry
            assert lease.slots == {"streams": 1}
        async with other.acquire("e", "r", [cap], {}) as taken:
            assert taken.slots == {"streams": 1}
        await asyncio.sleep(0.5)  # no renewal of the ended lease comes back
    assert await held(store) == {"streams": 0} and await holders(store) == 0


async def test_renew_reports_slots_lost_to_a_reaper() -> None:
    store = MemoryStorage()
    clock = Clock()
    cap = Limit.concurrency("streams", 1, lease_ttl=timedelta(seconds=5))
    async with RateLimiter(repository=store, clock=clock) as lim:
        async with lim.acquire("e", "r", [cap], {}) as stalled:
            clock.now = T0 + 5_000
            async with lim.acquire("e", "r", [cap], {}) as taker:
                assert taker.slots == {"streams": 1}
                assert await stalled.renew() is False  # its entry was reaped
                assert await held(store) == {"streams": 1}
            # The stalled lease's end gives back nothing: its entry is gone.
        assert await held(store) == {"streams": 0}


async def test_cascade_caps_the_parent_total_all_or_nothing() -> None:
    store = MemoryStorage()
    project = Limit.concurrency("streams", 3)
    async with RateLimiter(repository=store) as lim:
        await lim.create_entity("proj")
        await lim.create_entity("k1", parent_id="proj")
        await lim.create_entity("k2", parent_id="proj")
        await lim.set_limits("proj", [project], "r")
        per_key = [Limit.concurrency("streams", 2)]
        async with (
            lim.acquire("k1", "r", per_key, {}, cascade=True, use_stored_limits=True),
            lim.acquire("k1", "r", per_key, {}, cascade=True, use_stored_limits=True),
        ):
            with pytest.raises(RateLimitExceeded) as own:  # k1's own cap
                async with lim.acquire(
                    "k1", "r", per_key, {}, cascade=True, use_stored_limits=True
                ):
                    pass
            assert {v.entity_id for v in own.value.violations} == {"k1"}
            async with lim.acquire("k2", "r", per_key, {}, cascade=True, use_stored_limits=True):
                assert await held(store, "proj") == {"streams": 3}
                with pytest.raises(RateLimitExceeded) as parent:
                    async with lim.acquire(
                        "k2", "r", per_key, {}, cascade=True, use_stored_limits=True
                    ):
                        pass
                assert {v.entity_id for v in parent.value.violations} == {"proj"}
                # The requester is k2: the project's cap reaches it as an anonymous shared limit.
                assert parent.value.entity_id == "k2"
                body = parent.value.client_dict()
                assert body["limits"] == [
                    {"limit_name": "streams", "shared": True, "exceeded": True,
                     "retry_after_seconds": parent.value.retry_after_seconds}
                ]  # fmt: skip
                # All or nothing: k2's own slot was given back when the parent refused.
                assert await held(store, "k2") == {"streams": 1}
    for entity in ("proj", "k1", "k2"):
        assert await held(store, entity) == {"streams": 0}
        assert await holders(store, entity) == 0


class DownForSlots(MemoryStorage):
    """A store whose slot writes fail as an unreachable DynamoDB's would."""

    async def take_slots(self, *args: object, **kwargs: object) -> SlotItem:
        raise RepositoryUnavailable("DynamoDB unreachable")


async def test_an_outage_follows_the_failure_mode() -> None:
    store = DownForSlots()
    async with (
        RateLimiter(repository=store, failure_mode=FailureMode.FAIL_OPEN) as lim,
        lim.acquire("e", "r", [CAP, RPM], {"rpm": 1}) as lease,
    ):
        assert lease.fail_open is True and lease.slots == {}
    async with RateLimiter(repository=store) as lim:
        with pytest.raises(RateLimiterUnavailable):
            async with lim.acquire("e", "r", [CAP, RPM], {"rpm": 1}):
                pass
        assert await lim.available("e", "r", [RPM]) == {"rpm": 100}  # no bucket was taken


async def test_many_tasks_never_hold_more_than_the_cap() -> None:
    store = MemoryStorage()
    cap = Limit.concurrency("streams", 3)
    in_flight = peak = admitted = denials = 0

    async def task(lim: RateLimiter) -> None:
        nonlocal in_flight, peak, admitted, denials
        while True:
            try:
                async with lim.acquire("e", "r", [cap], {}):
                    in_flight += 1
                    peak = max(peak, in_flight)
                    await asyncio.sleep(0.01)
                    in_flight -= 1
                    admitted += 1
                    return
            except RateLimitExceeded:
                denials += 1
                await asyncio.sleep(0.005)

    async with RateLimiter(repository=store) as a, RateLimiter(repository=store) as b:
        await asyncio.gather(*(task(a if i % 2 else b) for i in range(20)))
    assert admitted == 20 and denials > 0
    assert peak == 3
    assert await held(store) == {"streams": 0}


def test_the_sync_lease_holds_renews_and_releases() -> None:
    store = MemoryStorage()
    with SyncRateLimiter(repository=store) as lim:
        with lim.acquire("e", "r", [CAP], {}) as lease:
            assert lease.slots == {"streams": 1}
            assert lease.renew() is True
            assert lim.available("e", "r", [CAP]) == {"streams": 1}
            lease.release()
            assert lease.slots == {}
            assert lim.available("e", "r", [CAP]) == {"streams": 2}
        assert lim.available("e", "r", [CAP]) == {"streams": 2}


async def test_an_acquire_without_a_cap_writes_no_slot_item() -> None:
    store = MemoryStorage()
    async with (
        RateLimiter(repository=store) as lim,
        lim.acquire("e", "r", [RPM], {"rpm": 1}) as lease,
    ):
        assert lease.slots == {}
        assert await lease.renew() is True
    keys = [i[schema.SK]["S"] for i in await store.export_items()]
    assert not any(k.startswith(schema.SLOTS_PREFIX) for k in keys)
    assert schema.bucket_sk("r") in keys


async def test_time_until_available_waits_for_a_full_caps_hint_and_a_quotas_window() -> None:
    clock = Clock()  # T0 is on the hour
    cap = Limit.concurrency("streams", 1, lease_ttl=timedelta(seconds=30))
    hourly = Limit.quota("hourly", 2, cron="0 * * * *")
    async with RateLimiter(repository=MemoryStorage(), clock=clock) as lim:
        assert await lim.time_until_available("e", "r", [cap, hourly], {"hourly": 2}) == 0.0
        async with lim.acquire("e", "r", [cap, hourly], {"hourly": 2}):
            # Full: the retry hint, at most 1 s though the holder's entry lives 30 s more.
            assert await lim.time_until_available("e", "r", [cap], {"streams": 1}) == 1.0
            assert await lim.time_until_available("e", "r", [cap], {}) == 1.0  # 1, as acquire
            assert await lim.time_until_available("e", "r", [cap], {"streams": 0}) == 0.0
            clock.now += 29_750  # the holder's entry expires in 250 ms (no renewal since)
            assert await lim.time_until_available("e", "r", [cap], {"streams": 1}) == 0.25
            # The quota cannot cover 1 before the next hour: the longer wait is the answer.
            both = await lim.time_until_available("e", "r", [cap, hourly], {"hourly": 1})
            assert both == (3_600_000 - 29_750) / 1000
            assert await lim.time_until_available("e", "r", [hourly], {"hourly": 0}) == 0.0
        # Released: the cap covers it now; the quota still waits for its window.
        assert await lim.time_until_available("e", "r", [cap], {"streams": 1}) == 0.0
        clock.now = T0 + 3_600_000
        assert await lim.time_until_available("e", "r", [cap, hourly], {"hourly": 2}) == 0.0
