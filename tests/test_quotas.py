"""Quotas (issue 23): a balance restored in one lump when its window opens, cron windows in a
zone (DST-correct), session windows, retry-after to the next window, all-or-nothing with token
buckets, cascade, stored limits, debt, forgiven give-backs, expiry, the RateLimit fields, the
usage counters. Logic on `MemoryStorage`; every decision test runs on both cores."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from zae_limiter import (
    Limit,
    MemoryStorage,
    RateLimiter,
    RateLimitExceeded,
    Reservations,
    ValidationError,
    core,
    schema,
)
from zae_limiter.aggregator import snapshots
from zae_limiter.core import bucket as reference
from zae_limiter.core import calendar
from zae_limiter.http import fields

PARIS = "Europe/Paris"
NEW_YORK = "America/New_York"
HOUR_MS = 3_600_000


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def utc(*args: int) -> int:
    return ms(datetime(*args, tzinfo=UTC))  # type: ignore[misc]


def local(zone: str, *args: int) -> int:
    """Epoch ms of a wall-clock time in `zone` (first occurrence)."""
    return ms(datetime(*args, tzinfo=ZoneInfo(zone)))  # type: ignore[misc]


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, delta_ms: int) -> None:
        self.now += delta_ms


@pytest.fixture(params=["native", "python"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The core the engine decides with: the one `zae_limiter.core` picked (native unless the
    environment says otherwise) or the pure-Python reference, swapped in for this test."""
    if request.param == "python":
        for name in ("decide", "available", "time_until_available", "full_at_of"):
            monkeypatch.setattr(core, name, getattr(reference, name))
    elif os.environ.get("ZAE_LIMITER_NATIVE", "").strip() != "0":
        assert core.BACKEND == "native"
    yield request.param


@pytest.fixture
def clock() -> Clock:
    return Clock(ms(datetime(2026, 1, 15, 12, tzinfo=UTC)))


@pytest.fixture
def store() -> MemoryStorage:
    return MemoryStorage("ZAEL-quota")


@pytest.fixture
async def limiter(
    backend: str, store: MemoryStorage, clock: Clock
) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(name="quota", repository=store, clock=clock) as lim:
        yield lim


async def take(lim: RateLimiter, limits: list[Limit], entity: str = "e", **amounts: int) -> None:
    async with lim.acquire(entity, "r", limits, amounts):
        pass


async def denied(
    lim: RateLimiter, limits: list[Limit], entity: str = "e", **amounts: int
) -> RateLimitExceeded:
    with pytest.raises(RateLimitExceeded) as info:
        await take(lim, limits, entity, **amounts)
    return info.value


# -- cron windows in a zone ----------------------------------------------------------------------


async def test_monthly_quota_in_paris_admits_its_amount_and_resets_at_local_midnight(
    limiter: RateLimiter, clock: Clock
) -> None:
    monthly = Limit.quota("monthly", 10, cron="0 0 1 * *", tz=PARIS)
    for _ in range(10):
        await take(limiter, [monthly], monthly=1)
    boundary = local(PARIS, 2026, 2, 1)  # 2026-01-31T23:00Z
    exc = await denied(limiter, [monthly], monthly=1)
    assert exc.retry_after_seconds == (boundary - clock.now) / 1000
    # Nothing drips back in between.
    clock.now = boundary - 1
    assert await limiter.available("e", "r", [monthly]) == {"monthly": 0}
    assert (await denied(limiter, [monthly], monthly=1)).retry_after_seconds == 0.001
    # At Paris midnight (still January in UTC) the whole amount is back at once.
    clock.now = boundary
    assert datetime.fromtimestamp(boundary / 1000, UTC).month == 1
    assert await limiter.available("e", "r", [monthly]) == {"monthly": 10}
    await take(limiter, [monthly], monthly=10)
    exc = await denied(limiter, [monthly], monthly=1)
    assert exc.retry_after_seconds == (local(PARIS, 2026, 3, 1) - boundary) / 1000
    assert await limiter.time_until_available("e", "r", [monthly], {"monthly": 1}) == (
        (local(PARIS, 2026, 3, 1) - boundary) / 1000
    )


@pytest.mark.parametrize(
    ("day", "hours"),
    [((2026, 3, 8), 23), ((2026, 11, 1), 25)],
    ids=["spring-forward", "fall-back"],
)
async def test_daily_quota_at_new_york_midnight_spans_the_dst_day(
    limiter: RateLimiter, clock: Clock, day: tuple[int, int, int], hours: int
) -> None:
    daily = Limit.quota("daily", 3, cron="0 0 * * *", tz=NEW_YORK)
    start = local(NEW_YORK, *day)
    assert calendar.window_at("0 0 * * *", NEW_YORK, start) == (start, start + hours * HOUR_MS)
    clock.now = start + 30 * 60_000
    await take(limiter, [daily], daily=3)
    exc = await denied(limiter, [daily], daily=1)
    assert exc.retry_after_seconds == hours * 3600 - 1800
    clock.now = start + hours * HOUR_MS - 1
    await denied(limiter, [daily], daily=1)
    clock.now = start + hours * HOUR_MS
    await take(limiter, [daily], daily=3)


# -- session windows -----------------------------------------------------------------------------


async def test_session_window_opens_at_first_use_and_restarts_after_idle(
    limiter: RateLimiter, clock: Clock
) -> None:
    session = Limit.quota("session", 3, reset_after=timedelta(hours=5))
    clock.advance(7 * HOUR_MS)  # idle: no window is open before the first use
    assert await limiter.available("e", "r", [session]) == {"session": 3}
    opened = clock.now
    await take(limiter, [session], session=2)
    clock.advance(HOUR_MS)
    await take(limiter, [session], session=1)
    exc = await denied(limiter, [session], session=1)
    assert exc.retry_after_seconds == 4 * 3600
    # The window ends 5 h after the first use; an idle gap after it opens nothing.
    clock.now = opened + 5 * HOUR_MS + 2 * HOUR_MS
    assert await limiter.available("e", "r", [session]) == {"session": 3}
    reopened = clock.now
    await take(limiter, [session], session=3)
    exc = await denied(limiter, [session], session=1)
    assert exc.retry_after_seconds == 5 * 3600  # from the new first use, not the old end
    clock.now = reopened + 5 * HOUR_MS
    await take(limiter, [session], session=3)


# -- with token buckets, cascade, stored limits --------------------------------------------------


async def test_quota_and_token_bucket_are_all_or_nothing(limiter: RateLimiter) -> None:
    quota = Limit.quota("q", 5, reset_after=timedelta(hours=1))
    rpm = Limit.per_minute("rpm", 2)
    await take(limiter, [quota, rpm], q=1, rpm=1)
    await take(limiter, [quota, rpm], q=1, rpm=1)
    exc = await denied(limiter, [quota, rpm], q=1, rpm=1)  # the bucket is short
    assert [s.limit_name for s in exc.violations] == ["rpm"]
    assert await limiter.available("e", "r", [quota, rpm]) == {"q": 3, "rpm": 0}
    await take(limiter, [quota], q=3)
    exc = await denied(limiter, [quota, rpm], q=1)
    assert [s.limit_name for s in exc.violations] == ["q"]
    assert exc.retry_after_seconds == 3600.0


async def test_cascade_to_a_parent_quota(limiter: RateLimiter, clock: Clock) -> None:
    await limiter.create_entity("proj")
    await limiter.create_entity("key-a", parent_id="proj")
    await limiter.create_entity("key-b", parent_id="proj")
    monthly = Limit.quota("monthly", 5, cron="0 0 1 * *", tz=PARIS)
    async with limiter.acquire("key-a", "r", [monthly], {"monthly": 3}, cascade=True):
        pass
    with pytest.raises(RateLimitExceeded) as info:
        async with limiter.acquire("key-b", "r", [monthly], {"monthly": 3}, cascade=True):
            pass
    assert [(v.entity_id, v.limit_name) for v in info.value.violations] == [("proj", "monthly")]
    assert info.value.retry_after_seconds == (local(PARIS, 2026, 2, 1) - clock.now) / 1000
    # All or nothing: key-b's own quota was not touched by the denial.
    assert await limiter.available("key-b", "r", [monthly]) == {"monthly": 5}
    assert await limiter.available("proj", "r", [monthly]) == {"monthly": 2}


async def test_stored_quota_is_served_from_its_text_form(limiter: RateLimiter) -> None:
    stored = Limit.parse("session:2/quota,reset_after=5h")
    await limiter.set_limits("e", [stored], resource="r")
    async with limiter.acquire("e", "r", None, {"session": 2}, use_stored_limits=True):
        pass
    with pytest.raises(RateLimitExceeded) as info:
        async with limiter.acquire("e", "r", None, {"session": 1}, use_stored_limits=True):
            pass
    assert info.value.retry_after_seconds == 5 * 3600


async def test_more_than_the_quota_is_too_large_not_a_wait(limiter: RateLimiter) -> None:
    quota = Limit.quota("q", 5, reset_after=timedelta(hours=1))
    exc = await denied(limiter, [quota], q=6)
    assert exc.retry_after_seconds is None
    assert await limiter.time_until_available("e", "r", [quota], {"q": 5}) == 0.0


# -- debt and give-backs -------------------------------------------------------------------------


async def test_adjust_goes_into_debt_within_the_window_and_the_reset_forgives_it(
    limiter: RateLimiter, clock: Clock
) -> None:
    monthly = Limit.quota("monthly", 10, cron="0 0 1 * *", tz=PARIS)
    async with limiter.acquire("e", "r", [monthly], {"monthly": 8}) as lease:
        await lease.adjust(monthly=5)
    assert await limiter.available("e", "r", [monthly]) == {"monthly": -3}
    exc = await denied(limiter, [monthly], monthly=1)
    assert exc.retry_after_seconds == (local(PARIS, 2026, 2, 1) - clock.now) / 1000
    clock.now = local(PARIS, 2026, 2, 1)
    assert await limiter.available("e", "r", [monthly]) == {"monthly": 10}


async def test_a_give_back_within_the_window_restores_what_was_taken(
    limiter: RateLimiter,
) -> None:
    quota = Limit.quota("q", 10, reset_after=timedelta(hours=1))
    with pytest.raises(RuntimeError):
        async with limiter.acquire("e", "r", [quota], {"q": 6}):
            raise RuntimeError("the call failed")
    assert await limiter.available("e", "r", [quota]) == {"q": 10}


async def test_a_late_give_back_across_the_reset_mints_nothing(
    limiter: RateLimiter, clock: Clock, store: MemoryStorage
) -> None:
    monthly = Limit.quota("monthly", 10, cron="0 0 1 * *", tz=PARIS)
    with pytest.raises(RuntimeError):
        async with limiter.acquire("e", "r", [monthly], {"monthly": 6}) as lease:
            clock.now = local(PARIS, 2026, 2, 1) + 1000  # the window resets meanwhile
            await take(limiter, [monthly], monthly=4)  # another caller, in the new window
            await lease.adjust(monthly=2)  # charged to the window it lands in
            assert await limiter.available("e", "r", [monthly]) == {"monthly": 4}
            raise RuntimeError("the call failed")
    # The rollback gives back 8: the 6 taken in January are forgiven by the reset, the 2
    # taken in February go back. Minting would show 10 (6 + 4 - 2 back in February: -2 used).
    assert await limiter.available("e", "r", [monthly]) == {"monthly": 6}
    state = (await store.get_bucket("e", "r"))
    assert state is not None
    counters = state.limits["monthly"]
    assert (counters.consumed_milli, counters.released_milli) == (12_000, 2_000)


# -- statuses, fields, expiry, reservations, usage counters --------------------------------------


async def test_ratelimit_fields_of_a_quota_say_its_window_and_reset(
    limiter: RateLimiter, clock: Clock
) -> None:
    session = Limit.quota("session", 5, reset_after=timedelta(hours=5))
    async with limiter.acquire("e", "r", [session], {"session": 2}) as lease:
        clock.advance(HOUR_MS)
        statuses = lease.statuses()
    assert statuses[0].reset_seconds == 4 * 3600
    assert fields.policy_field(statuses, {}) == '"session";q=5;w=18000'
    assert fields.ratelimit_field(statuses) == '"session";r=3;t=14400'


async def test_the_item_outlives_the_window_and_not_much_more(
    limiter: RateLimiter, store: MemoryStorage, clock: Clock
) -> None:
    monthly = Limit.quota("monthly", 10, cron="0 0 1 * *", tz=PARIS)
    await take(limiter, [monthly], monthly=1)
    item = await store.get_bucket("e", "r")
    assert item is not None and item.expires_at is not None
    end_s = local(PARIS, 2026, 2, 1) // 1000
    assert end_s < item.expires_at <= end_s + 2 * 3600


async def test_reservations_never_serve_a_quota_from_a_block(
    backend: str, store: MemoryStorage, clock: Clock
) -> None:
    quota = Limit.quota("q", 3, reset_after=timedelta(hours=1))
    async with RateLimiter(
        name="quota", repository=store, clock=clock, reservations=Reservations()
    ) as lim:
        for _ in range(3):
            await take(lim, [quota], q=1)
        assert lim.reserved() == {}
        exc = await denied(lim, [quota], q=1)
        assert exc.retry_after_seconds == 3600.0
        clock.advance(HOUR_MS)
        await take(lim, [quota], q=3)


async def test_usage_counters_stay_total_consumed_and_released(
    limiter: RateLimiter, store: MemoryStorage, clock: Clock
) -> None:
    """The aggregator folds `cn#`/`rl#` growth from stream images: a quota's reset rewrites
    `fa#`, never the counters, so net usage over the windows is what was taken and kept."""
    session = Limit.quota("session", 5, reset_after=timedelta(hours=1))
    images: list[dict[str, Any]] = []

    async def step(amount: int, fail: bool = False) -> None:
        try:
            async with limiter.acquire("e", "r", [session], {"session": amount}):
                if fail:
                    raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        images.extend(await store.bucket_items("e", "r"))

    await step(3)
    await step(2, fail=True)
    clock.advance(HOUR_MS)  # reset
    await step(4)
    growth: dict[str, int] = {"cn": 0, "rl": 0}
    for old, new in zip([{}, *images], images, strict=False):
        change = snapshots.parse_record(
            {
                "eventName": "MODIFY" if old else "INSERT",
                "dynamodb": {
                    "Keys": {schema.PK: new[schema.PK], schema.SK: new[schema.SK]},
                    "NewImage": new,
                    "OldImage": old,
                },
            },
            clock.now,
        )
        assert not isinstance(change, str)
        for total in snapshots.totals(change.growth).values():
            growth["cn"] += total.consumed_milli
            growth["rl"] += total.released_milli
    # 3 taken; 2 taken and given back; 4 taken after the reset.
    assert growth == {"cn": 9_000, "rl": 2_000}


# -- the calendar --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "named"),
    [
        ("60 0 1 * *", "minute"),
        ("0 24 1 * *", "hour"),
        ("0 0 32 * *", "day"),
        ("0 0 1 13 *", "month"),
        ("0 0 * * 8", "weekday"),
        ("0 0 5-1 * *", "day"),
        ("0 0 1 foo *", "month"),
        ("0 0 1 *", "5 fields"),
        ("0 0 30 feb *", "no day"),
    ],
)
def test_a_bad_cron_is_a_validation_error_naming_the_field(cron: str, named: str) -> None:
    with pytest.raises(ValidationError) as info:
        Limit.quota("q", 1, cron=cron)
    assert info.value.field == "cron"
    assert named in str(info.value)


def test_an_unknown_zone_is_a_validation_error_on_tz() -> None:
    with pytest.raises(ValidationError) as info:
        Limit.quota("q", 1, cron="0 0 * * *", tz="Mars/Olympus")
    assert info.value.field == "tz"


def test_cron_ranges_steps_names_and_lists() -> None:
    cron = calendar.parse_cron("*/15 9-17/4 1,15 jan-mar mon-fri")
    assert cron.minutes == (45, 30, 15, 0)
    assert cron.hours == (17, 13, 9)
    assert cron.days == frozenset({1, 15})
    assert cron.months == frozenset({1, 2, 3})
    assert cron.weekdays == frozenset({1, 2, 3, 4, 5})
    assert calendar.parse_cron("0 0 * * 7").weekdays == frozenset({0})  # 7 is Sunday


def test_day_of_month_and_day_of_week_match_either_when_both_are_set() -> None:
    # The 13th or any Friday, from Tue 2026-01-13: next are Fri 16th, Fri 23rd.
    start, end = calendar.window_at("0 0 13 * fri", "UTC", ms(datetime(2026, 1, 13, 5, tzinfo=UTC)))
    assert (start, end) == (
        ms(datetime(2026, 1, 13, tzinfo=UTC)),
        ms(datetime(2026, 1, 16, tzinfo=UTC)),
    )
    # The day of month `*`: the day of week alone decides (Fridays, not every day).
    start, end = calendar.window_at("0 0 * * fri", "UTC", utc(2026, 1, 13))
    assert (start, end) == (utc(2026, 1, 9), utc(2026, 1, 16))


def test_a_skipped_time_opens_past_the_gap_and_a_repeated_one_at_its_first_occurrence() -> None:
    tz = ZoneInfo(NEW_YORK)
    # 02:30 does not exist on 2026-03-08: the window opens at 03:30 EDT (07:30Z).
    start, _ = calendar.window_at("30 2 * * *", NEW_YORK, ms(datetime(2026, 3, 8, 12, tzinfo=UTC)))
    assert start == ms(datetime(2026, 3, 8, 7, 30, tzinfo=UTC))
    # 01:30 happens twice on 2026-11-01: the first (EDT, 05:30Z) opens the window.
    start, end = calendar.window_at("30 1 * * *", NEW_YORK, utc(2026, 11, 1, 12))
    assert start == ms(datetime(2026, 11, 1, 5, 30, tzinfo=UTC))
    assert end == ms(datetime(2026, 11, 2, 1, 30, tzinfo=tz))
    assert end - start == 25 * HOUR_MS


def test_the_nominal_window_is_the_longest() -> None:
    assert Limit.quota("m", 1, cron="0 0 1 * *").refill_period_seconds == 31 * 86400
    assert Limit.quota("d", 1, cron="0 0 * * *", tz=NEW_YORK).refill_period_seconds == 25 * 3600


def test_quota_decisions_on_the_pure_python_core_in_a_fresh_interpreter() -> None:
    """`ZAE_LIMITER_NATIVE=0` selects the reference at import: the suite's decisions hold there
    too (the fixture swaps functions; this runs the selection itself)."""
    env = {**os.environ, "ZAE_LIMITER_NATIVE": "0"}
    script = (
        "import asyncio\n"
        "from datetime import timedelta\n"
        "from zae_limiter import Limit, MemoryStorage, RateLimiter, RateLimitExceeded, core\n"
        "q = Limit.quota('q', 2, reset_after=timedelta(hours=1))\n"
        "async def main():\n"
        "    now = [1_800_000_000_000]\n"
        "    async with RateLimiter(repository=MemoryStorage(), clock=lambda: now[0]) as lim:\n"
        "        async with lim.acquire('e', 'r', [q], {'q': 2}): pass\n"
        "        try:\n"
        "            async with lim.acquire('e', 'r', [q], {'q': 1}): pass\n"
        "        except RateLimitExceeded as exc:\n"
        "            print(core.BACKEND, exc.retry_after_seconds)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["python", "3600.0"]
