"""Bucket items expire (the table's TTL attribute) only once they would read full anyway.

- The expiry is never earlier than the moment every limit of the item is full again: the slowest
  of several limits, a balance pushed below zero, limits only the stored definition names, tokens
  held reserved; nor than the end of the usage window of the last write (a bucket created again
  must not restart its counters inside a window the aggregator already counted).
- It is capped at the year 9999, whatever the debt or the time.
- Writes from a stale view (relative, applied to newer tokens; forced ones arbitrarily deep) end
  with an expiry no earlier than the state written needs, at the cost of one more call; an
  accurate view needs none.
- Deleting the item at or after its expiry changes no decision, and the aggregator counts
  nothing for DynamoDB's TTL deletion nor for an expiry that moves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from math import gcd
from typing import Any

import boto3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zae_limiter import (
    Limit,
    MemoryStorage,
    RateLimiter,
    RateLimitExceeded,
    Reservations,
    StackOptions,
    core,
    schema,
)
from zae_limiter.aggregator import snapshots as snap
from zae_limiter.aggregator.handler import SnapshotTable, process_batch
from zae_limiter.core import windows
from zae_limiter.engine import expiry
from zae_limiter.storage.protocol import BucketItem, LimitState, LimitWrite

T0 = 1_800_000_000_000  # 2027-01-15T08:00:00Z
HOUR = 3_600_000
DAY_END = T0 + 16 * HOUR  # the end of T0's daily usage window
RPM = Limit.per_minute("rpm", 100)
RPD = Limit.per_day("rpd", 1000)
# 1000 tokens a week: a reserved block of it refills past the end of T0's day.
RPW = Limit.custom("rpw", 1000, 1000, 7 * 86400)


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def bucket(states: dict[str, LimitState], ts: int | None = T0) -> BucketItem:
    return BucketItem("e", "r", states, write_time_ms=ts)


def _step_milli(limit: Limit) -> int:
    return limit.refill_amount_milli // gcd(limit.refill_amount_milli, limit.refill_period_ms)


def held(limit: Limit, tokens: int, at: int = T0, definition: str | None = None) -> LimitState:
    """A stored state holding `tokens` millitokens at `at`."""
    rate = (limit.burst_milli, limit.refill_amount_milli, limit.refill_period_ms)
    return LimitState(core.full_at_of(*rate, tokens, at), definition=definition)


def full_at(limit: Limit, state: LimitState, now: int) -> int:
    """When the limit is full again, from the stored form itself (design.md section 1: the
    state is the instant it is full, in ticks of 1/step_milli ms), not from the core."""
    assert state.full_at is not None
    return max(now, -(-state.full_at // _step_milli(limit)))


def tokens_of(limit: Limit, state: LimitState, at: int = T0) -> int:
    return core.available(
        limit.burst_milli, limit.refill_amount_milli, limit.refill_period_ms, state.full_at, at
    )


def is_full(limit: Limit, state: LimitState, at_ms: int) -> bool:
    return tokens_of(limit, state, at_ms) >= limit.burst_milli


def hour_ceil_s(ms: int) -> int:
    return -(-ms // HOUR) * 3600


# -- the expiry of a state ---------------------------------------------------------------------


def test_the_slowest_limit_decides() -> None:
    states = {
        "rpm": held(RPM, 0),  # full a minute later
        "rpd": held(RPD, -500_000),  # 1500 tokens short: a day and a half
    }
    both = expiry.required([RPM, RPD], bucket(states), T0)
    assert both == expiry.required([RPD, RPM], bucket(states), T0)
    slowest = full_at(RPD, states["rpd"], T0)
    assert slowest > DAY_END
    assert both == hour_ceil_s(slowest + expiry.MARGIN_MS)
    assert is_full(RPD, states["rpd"], both * 1000 - expiry.MARGIN_MS)
    assert not is_full(RPD, states["rpd"], both * 1000 - expiry.MARGIN_MS - HOUR)
    # Without the slow limit, the end of the day's usage window is what keeps it.
    fast = expiry.required([RPM], bucket({"rpm": states["rpm"]}), T0)
    assert fast == hour_ceil_s(DAY_END + expiry.MARGIN_MS) < both


@pytest.mark.parametrize("tokens", [1_000_000, 0, -1, -500_000, -(10**9)])
def test_a_negative_balance_lives_until_repaid(tokens: int) -> None:
    state = held(RPD, tokens)
    ttl = expiry.required([RPD], bucket({"rpd": state}), T0)
    assert is_full(RPD, state, ttl * 1000 - expiry.MARGIN_MS)
    assert ttl == hour_ceil_s(max(full_at(RPD, state, T0), DAY_END) + expiry.MARGIN_MS)
    deeper = held(RPD, tokens - 1_000_000)
    assert expiry.required([RPD], bucket({"rpd": deeper}), T0) > ttl


def test_the_usage_window_of_the_last_write_bounds_it_below() -> None:
    full = {"rpm": held(RPM, RPM.burst_milli)}
    for write_ms in (T0, DAY_END - 1, DAY_END):
        ttl = expiry.required([RPM], bucket(full, ts=write_ms), write_ms)
        day_end = (write_ms // (24 * HOUR) + 1) * 24 * HOUR
        assert day_end + expiry.MARGIN_MS <= ttl * 1000 < day_end + expiry.MARGIN_MS + HOUR
    # An item without a write time (older clients) counts from now.
    assert expiry.required([RPM], bucket(full, ts=None), T0) == expiry.required(
        [RPM], bucket(full), T0
    )


def test_limits_the_caller_does_not_know_count_by_their_stored_definition() -> None:
    rpd = held(RPD, -500_000, definition=RPD.encode())
    rpm = held(RPM, 0, definition=RPM.encode())
    known = expiry.required([RPM, RPD], bucket({"rpm": rpm, "rpd": rpd}), T0)
    assert expiry.required([RPM], bucket({"rpm": rpm, "rpd": rpd}), T0) == known
    # Stored slower than the caller's limit (another client's definition): the later counts.
    slower = Limit.custom("rpd", 1000, 1000, 10 * 86400)
    other = held(slower, -500_000, definition=slower.encode())
    later = expiry.required([RPD], bucket({"rpd": other}), T0)
    assert later == hour_ceil_s(full_at(slower, other, T0) + expiry.MARGIN_MS) > known
    # No definition to read: nothing tells when it is full, so the item is kept.
    for definition in (None, "not a limit"):
        unknown = LimitState(T0, definition=definition)
        assert expiry.required([RPM], bucket({"rpm": rpm, "x": unknown}), T0) == expiry.LATEST


def test_it_is_capped_at_the_year_9999() -> None:
    latest = datetime.fromtimestamp(expiry.LATEST, UTC)
    assert (latest.year, latest.month, latest.day, latest.hour) == (9999, 12, 31, 23)
    # A debt whose refill takes longer than there are years left.
    deep = held(RPD, -(10**15))
    assert expiry.required([RPD], bucket({"rpd": deep}), T0) == expiry.LATEST
    # A refill that does not fit signed 64-bit milliseconds (the core's overflow).
    slow = Limit.custom("slow", 1, 1, 10 * 365 * 86400)
    bottom = held(slow, -(2**63))
    assert expiry.required([slow], bucket({"slow": bottom}), T0) == expiry.LATEST
    # A write in the last hour of the year 9999: its usage window ends in the year 10000.
    last_hour = (expiry.LATEST + 1) * 1000 - HOUR
    full = {"rpm": held(RPM, RPM.burst_milli, last_hour)}
    assert expiry.required([RPM], bucket(full, ts=last_hour), last_hour) == expiry.LATEST


def test_a_give_back_to_a_reset_limit_reads_full() -> None:
    """Tokens added to no state (a limit reset meanwhile) read as a full bucket: the write
    plans the expiry of a full bucket for it."""
    give_back = LimitWrite("rpd", core.WRITE_ADD, -5_000 * 864, None, None, -5_000)
    assert expiry.planned([RPD], None, [give_back], T0) == expiry.required([RPD], bucket({}), T0)


# -- writes: the planned expiry, stale views and the correction ----------------------------------

LIMIT_SETS = [[RPD], [RPM, RPD], [RPM, RPW]]


def writes_of(
    limits: list[Limit], view: BucketItem, deltas: list[int], now: int, check: bool
) -> list[LimitWrite] | None:
    """The writes a decision on `view` sends (as the engine translates outcomes); None when it
    is denied."""
    inputs: list[core.BucketInput] = []
    for limit, delta in zip(limits, deltas, strict=True):
        s = view.limits.get(limit.name)
        rate = (limit.burst_milli, limit.refill_amount_milli, limit.refill_period_ms)
        inputs.append((*rate, None if s is None else s.full_at, delta))
    admitted, outcomes = core.decide(inputs, now, check)
    if not admitted:
        return None
    writes: list[LimitWrite] = []
    for limit, out, delta in zip(limits, outcomes, deltas, strict=True):
        if out.write_mode == core.WRITE_NONE:
            continue
        prior = view.limits.get(limit.name)
        writes.append(
            LimitWrite(
                limit.name,
                out.write_mode,
                out.write_value,
                out.cond_lo,
                out.cond_hi,
                delta,
                limit.encode(),
                create=prior is None,
            )
        )
    return writes


def holds(stored: BucketItem, writes: list[LimitWrite]) -> bool:
    """The update's conditions, as DynamoDB evaluates them on the stored item."""
    for w in writes:
        if w.mode == core.WRITE_ADD:
            continue
        s = stored.limits.get(w.limit_name)
        if w.create:
            ok = s is None
        else:
            ok = (
                s is not None
                and s.full_at is not None
                and (w.cond_lo is None or s.full_at >= w.cond_lo)
                and (w.cond_hi is None or s.full_at <= w.cond_hi)
            )
        if not ok:
            return False
    return True


def stored_after(stored: BucketItem, writes: list[LimitWrite], now: int) -> BucketItem:
    """What DynamoDB holds after the update: relative values apply to the *stored* state."""
    limits = dict(stored.limits)
    for w in writes:
        s = limits.get(w.limit_name)
        base = 0 if s is None or s.full_at is None else s.full_at
        value = w.value if w.mode == core.WRITE_ABSOLUTE else base + w.value
        limits[w.limit_name] = LimitState(value, definition=w.definition)
    return bucket(limits, ts=now)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(LIMIT_SETS),
    st.data(),
    st.integers(min_value=0, max_value=40 * 86_400_000),
    st.booleans(),
)
def test_a_write_on_any_view_ends_with_an_expiry_the_state_needs(
    limits: list[Limit], data: st.DataObject, elapsed: int, check: bool
) -> None:
    """The stored state and the writer's view share anchors (else the write is refused) but
    may hold different tokens. The write sets the planned expiry; the engine raises it to what
    the returned state requires when that is later. The item is then full at its expiry (less
    the margin), whatever the view; on an accurate view no correction is needed."""

    def states() -> dict[str, LimitState]:
        return {
            limit.name: held(limit, data.draw(st.integers(-(10**12), limit.burst_milli)), anchor)
            for limit, anchor in zip(limits, anchors, strict=True)
        }

    anchors = [T0 - data.draw(st.integers(0, 10 * HOUR)) for _ in limits]
    stored = bucket(states())
    accurate = data.draw(st.booleans())
    view = stored if accurate else bucket(states())
    deltas = [data.draw(st.integers(-(10**9), 10**10)) for _ in limits]
    now = T0 + elapsed
    writes = writes_of(limits, view, deltas, now, check)
    if not writes or not holds(stored, writes):
        return
    planned = expiry.planned(limits, view, writes, now)
    after = stored_after(stored, writes, now)
    needed = expiry.required(limits, after, now)
    final = max(planned, needed)  # the correction, when the planned expiry is earlier
    assert final <= expiry.LATEST
    for limit in limits:
        state = after.limits.get(limit.name)
        if state is not None and final < expiry.LATEST:
            assert is_full(limit, state, final * 1000 - expiry.MARGIN_MS)
    if accurate:
        assert planned == needed


# -- through the limiter ------------------------------------------------------------------------
# The engine's expiry decisions on `MemoryStorage` (the storage contract shows it behaves as
# DynamoDB does); the repository's conditional expiry update on moto's server.


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryStorage:
    return MemoryStorage("ZAEL-ttl")


@pytest.fixture
async def limiter(store: MemoryStorage, clock: Clock) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(name="ttl", repository=store, clock=clock) as lim:
        yield lim


@pytest.fixture
async def table_limiter(endpoint_url: str, clock: Clock) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(
        name="ttl", endpoint_url=endpoint_url, stack_options=StackOptions(), clock=clock
    ) as lim:
        yield lim


@pytest.fixture
def table(endpoint_url: str) -> Iterator[Any]:
    yield boto3.client("dynamodb", endpoint_url=endpoint_url, region_name="us-east-1")


def key(entity_id: str, resource: str = "llm") -> dict[str, Any]:
    return {
        schema.PK: {"S": schema.entity_pk(entity_id)},
        schema.SK: {"S": schema.bucket_sk(resource)},
    }


def ttl_of(table: Any, entity_id: str) -> int:
    item = table.get_item(TableName="ZAEL-ttl", Key=key(entity_id), ConsistentRead=True)["Item"]
    return int(item[schema.TTL_ATTRIBUTE]["N"])


async def stored_ttl(store: MemoryStorage, entity_id: str) -> int:
    """The item's TTL attribute as the table holds it."""
    (item,) = await store.bucket_items(entity_id, "llm")
    return int(item[schema.TTL_ATTRIBUTE]["N"])


async def delete_item(store: MemoryStorage, entity_id: str) -> None:
    """What DynamoDB's TTL does: the bucket item is gone (the rest of the table stays)."""
    gone = key(entity_id)
    await store.replace_items(
        [i for i in await store.export_items()
         if (i[schema.PK], i[schema.SK]) != (gone[schema.PK], gone[schema.SK])]
    )


async def stored_bucket(limiter: RateLimiter, entity_id: str) -> BucketItem:
    bucket_ = await limiter.repository.get_bucket(entity_id, "llm")
    assert bucket_ is not None
    return bucket_


def assert_full_at_expiry(limits: list[Limit], item: BucketItem) -> None:
    assert item.expires_at is not None
    at = item.expires_at * 1000 - expiry.MARGIN_MS
    for limit in limits:
        if limit.name in item.limits:  # a limit never written reads full
            assert is_full(limit, item.limits[limit.name], at), limit.name


async def test_a_bucket_gets_an_expiry_and_every_write_refreshes_it(
    limiter: RateLimiter, clock: Clock, store: MemoryStorage
) -> None:
    async with limiter.acquire("k", "llm", [RPM, RPD], {"rpm": 10, "rpd": 600}):
        pass
    created = await stored_bucket(limiter, "k")
    assert_full_at_expiry([RPM, RPD], created)
    assert created.expires_at is not None and created.expires_at * 1000 < T0 + 2 * 24 * HOUR
    assert await stored_ttl(store, "k") == created.expires_at

    clock.now = T0 + 3 * 24 * HOUR  # full again long ago; the item is still there
    async with limiter.acquire("k", "llm", [RPM, RPD], {"rpd": 900}):
        pass
    refreshed = await stored_bucket(limiter, "k")
    assert refreshed.expires_at is not None and refreshed.expires_at > created.expires_at
    assert_full_at_expiry([RPM, RPD], refreshed)
    assert refreshed.expires_at * 1000 > clock.now + 900 * 86_400


@pytest.mark.parametrize("stale_write", ["consume", "adjust"])
async def test_a_stale_relative_write_cannot_leave_the_expiry_early(
    store: MemoryStorage, limiter: RateLimiter, clock: Clock, stale_write: str
) -> None:
    """Client A caches the bucket; client B takes most of it; A then writes on its stale view
    (a relative consume that still holds, or a forced adjust that goes deep below zero). A's
    write plans an expiry for the tokens it believes in; the item ends with the later expiry
    its true state needs, for one more UpdateItem, counted in A's ledger."""
    async with limiter.acquire("k", "llm", [RPM, RPD], {"rpd": 1}) as lease:
        async with RateLimiter(name="ttl", repository=store, clock=clock) as other:
            before_b = other.ledger.calls["UpdateItem"]
            async with other.acquire("k", "llm", [RPM, RPD], {"rpd": 900}):
                pass
            assert other.ledger.calls["UpdateItem"] - before_b == 1  # an accurate view
        before_a = limiter.ledger.calls["UpdateItem"]
        if stale_write == "consume":
            async with limiter.acquire("k", "llm", [RPM, RPD], {"rpd": 50}):
                pass
        else:
            await lease.adjust(rpd=3000)
    await limiter.close()  # waits for the detached correction
    assert limiter.ledger.calls["UpdateItem"] - before_a == 2
    item = await stored_bucket(limiter, "k")
    taken = 951_000 if stale_write == "consume" else 3_901_000
    assert tokens_of(RPD, item.limits["rpd"]) == RPD.burst_milli - taken
    assert_full_at_expiry([RPM, RPD], item)
    assert item.expires_at == expiry.required([RPM, RPD], item, T0)


async def test_reserved_tokens_keep_the_item(store: MemoryStorage, clock: Clock) -> None:
    """A reserved block is consumed in the bucket: the item lives until it is refilled, not
    just until the tokens spent so far are."""
    async with RateLimiter(
        name="ttl",
        repository=store,
        clock=clock,
        reservations=Reservations(max_share=0.5, hold_seconds=5.0, horizon_seconds=5.0),
    ) as lim:
        for _ in range(3):  # demand observed: the block grows past what is spent
            async with lim.acquire("k", "llm", [RPW], {"rpw": 50}):
                pass
        item = await stored_bucket(lim, "k")  # while the block is held
    spent = 150_000  # a day and more to refill
    assert RPW.burst_milli - tokens_of(RPW, item.limits["rpw"]) > spent
    assert_full_at_expiry([RPW], item)
    spent_only = held(RPW, RPW.burst_milli - spent)
    assert item.expires_at is not None
    assert item.expires_at > expiry.required([RPW], bucket({"rpw": spent_only}), T0)


@pytest.mark.integration
async def test_the_correction_only_moves_the_expiry_later(
    table_limiter: RateLimiter, table: Any
) -> None:
    repo = table_limiter.repository
    async with table_limiter.acquire("k", "llm", [RPD], {"rpd": 1}):
        pass
    ttl = ttl_of(table, "k")
    before = repo.ledger.calls["UpdateItem"]
    assert await repo.extend_bucket_expiry("k", "llm", ttl - 3600) is False
    assert ttl_of(table, "k") == ttl
    assert await repo.extend_bucket_expiry("k", "llm", ttl + 3600) is True
    assert await repo.extend_bucket_expiry("k", "llm", ttl + 3600) is False  # a resend
    assert ttl_of(table, "k") == ttl + 3600
    # No item, no expiry: it never creates one.
    assert await repo.extend_bucket_expiry("nobody", "llm", ttl) is False
    assert "Item" not in table.get_item(TableName="ZAEL-ttl", Key=key("nobody"))
    assert repo.ledger.calls["UpdateItem"] - before == 4


async def history(limiter: RateLimiter, entity_id: str) -> None:
    async with limiter.acquire(entity_id, "llm", [RPM, RPD], {"rpm": 30, "rpd": 600}) as lease:
        await lease.adjust(rpd=700)  # forced: 300 tokens below zero


@pytest.mark.parametrize("after_ms", [0, 5 * HOUR])
async def test_deleting_the_item_at_its_expiry_changes_no_decision(
    limiter: RateLimiter, clock: Clock, store: MemoryStorage, after_ms: int
) -> None:
    """Two entities with one history; one item is deleted (what DynamoDB's TTL does) at or
    after its expiry. Both read, admit and deny exactly alike."""
    await history(limiter, "kept")
    await history(limiter, "gone")
    ttl = await stored_ttl(store, "gone")
    assert ttl == await stored_ttl(store, "kept") and ttl * 1000 > DAY_END
    await delete_item(store, "gone")  # the limiter still caches it
    clock.now = ttl * 1000 + after_ms
    seen: dict[str, list[object]] = {}
    for entity_id in ("kept", "gone"):
        outcome: list[object] = [await limiter.available(entity_id, "llm", [RPM, RPD])]
        async with limiter.acquire(entity_id, "llm", [RPM, RPD], {"rpm": 100, "rpd": 1000}):
            pass
        with pytest.raises(RateLimitExceeded) as denied:
            async with limiter.acquire(entity_id, "llm", [RPM, RPD], {"rpm": 1, "rpd": 1}):
                pass
        outcome.append(
            [
                (s.limit_name, s.available, s.exceeded, s.retry_after_seconds)
                for s in denied.value.statuses
            ]
        )
        outcome.append(await limiter.available(entity_id, "llm", [RPM, RPD]))
        seen[entity_id] = outcome
    assert seen["kept"] == seen["gone"]
    assert seen["kept"][0] == {"rpm": 100, "rpd": 1000}


# -- the aggregator ------------------------------------------------------------------------------


class NoTable:
    """A snapshot table client that fails any call: a record that folded anything fails."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the aggregator called {name}")


def bucket_image(counters: dict[str, int], ttl: int | None, ts: int = T0) -> dict[str, Any]:
    image = key("k") | {schema.WRITE_TIME: {"N": str(ts)}}
    image |= {attr: {"N": str(v)} for attr, v in counters.items()}
    if ttl is not None:
        image[schema.TTL_ATTRIBUTE] = {"N": str(ttl)}
    return image


def stream_record(
    seq: int, event: str, old: dict[str, Any] | None, new: dict[str, Any] | None
) -> dict[str, Any]:
    dynamodb: dict[str, Any] = {
        "Keys": key("k"),
        "SequenceNumber": str(10**20 + seq),
        "StreamViewType": schema.STREAM_VIEW_TYPE,
        "ApproximateCreationDateTime": T0 / 1000,
    }
    if old is not None:
        dynamodb["OldImage"] = old
    if new is not None:
        dynamodb["NewImage"] = new
    return {
        "eventID": f"e{seq}",
        "eventName": event,
        "eventSource": "aws:dynamodb",
        "dynamodb": dynamodb,
    }


def test_dynamodbs_ttl_deletion_counts_nothing() -> None:
    expired = stream_record(1, "REMOVE", bucket_image({"cn#rpm": 9_000}, ttl=1), None)
    expired["userIdentity"] = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
    assert snap.parse_record(expired, T0) == "bucket deleted"
    result = process_batch([expired], SnapshotTable(NoTable(), "ZAEL-ttl"), windows.WINDOWS, 90)
    assert (result.skipped, result.failed, result.snapshots_updated) == (1, 0, 0)


def test_a_moving_expiry_is_no_usage() -> None:
    counters = {"cn#rpm": 9_000, "rl#rpm": 1_000}
    moved = stream_record(2, "MODIFY", bucket_image(counters, 10), bucket_image(counters, 20))
    assert snap.parse_record(moved, T0) == "no counter growth"
    result = process_batch([moved], SnapshotTable(NoTable(), "ZAEL-ttl"), windows.WINDOWS, 90)
    assert (result.skipped, result.failed) == (1, 0)
    # A write that also moves the expiry counts exactly what it consumed.
    grown = {"cn#rpm": 12_000, "rl#rpm": 1_000}
    write = stream_record(3, "MODIFY", bucket_image(counters, 10), bucket_image(grown, 20))
    without = stream_record(4, "MODIFY", bucket_image(counters, None), bucket_image(grown, None))
    change, plain = snap.parse_record(write, T0), snap.parse_record(without, T0)
    assert isinstance(change, snap.BucketChange) and change == plain
    assert change.growth == {"rpm": {"cn": [(9_000, 12_000)]}}


def test_a_bucket_created_again_after_expiry_is_counted_in_full() -> None:
    """Counters restart at 0 in a new item; created no earlier than the old one's expiry, its
    records fall outside every window of the old one's, so no usage overlaps and none is lost."""
    old_ts = DAY_END - HOUR // 2  # the old item's last write: late in its day
    ttl = expiry.required([RPM], bucket({"rpm": held(RPM, 0, old_ts)}, ts=old_ts), old_ts)
    old = [
        stream_record(1, "INSERT", None, bucket_image({"cn#rpm": 5_000}, ttl, T0)),
        stream_record(
            2,
            "MODIFY",
            bucket_image({"cn#rpm": 5_000}, ttl, T0),
            bucket_image({"cn#rpm": 8_000}, ttl, old_ts),
        ),
        stream_record(3, "REMOVE", bucket_image({"cn#rpm": 8_000}, ttl, old_ts), None),
    ]
    new = [stream_record(4, "INSERT", None, bucket_image({"cn#rpm": 2_000}, None, ttl * 1000))]
    folded: dict[snap.SnapshotKey, snap.Growth] = {}
    for record in old + new:
        change = snap.parse_record(record, T0)
        if isinstance(change, snap.BucketChange):
            for k in change.snapshot_keys(windows.WINDOWS):
                folded[k] = snap.merge_growth(folded.get(k, {}), change.growth)
    daily = {
        k.window_start: snap.totals(g)["rpm"].net_milli
        for k, g in folded.items()
        if k.window == windows.DAILY
    }
    assert daily == {"2027-01-15": 8_000, "2027-01-16": 2_000}
