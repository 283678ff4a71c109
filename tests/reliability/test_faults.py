"""Faults: DynamoDB refusing, hanging, cutting responses, slow, throttling, failing.

Every limiter here talks to moto through `FaultProxy` (see fault_proxy.py) with a small
`RetryPolicy`; the truth is read straight from moto afterwards. What each test proves:

- an outage: FAIL_CLOSED raises `RateLimiterUnavailable` within a bound derived from the retry
  policy, after a bounded number of requests; FAIL_OPEN admits (`lease.fail_open`) and its lease
  writes nothing; once the fault clears the limiter works again and the bucket holds exactly what
  was admitted, plus exactly once each write that DynamoDB applied without the client learning it
  (never twice);
- a transient fault on writes is absorbed: every acquire/adjust succeeds and the ledger is exact,
  including writes whose response was cut, reset or delayed past the client's timeout (resolved
  through the item's write ids);
- retries are spaced by jittered backoff (not all delays equal, none above the policy's cap);
- cascade: a parent write failing after the child's landed gives the child's back;
- chaos: mixed random faults, delays past the read timeout on every kind of bucket write
  (give-backs included), under concurrent acquire/adjust up and down/release/rollback, with and
  without a deadline: no over-admission (the bucket never holds more than the callers' books
  allow: no give-back lands twice), no write is applied while its id is in the item's ring, no
  write id is applied twice but a consuming write's late copy after the ring rotated (counted:
  doubled consumption), the counters are the sum of what DynamoDB applied, and the bucket lies
  within the interval the callers can know.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
from fault_proxy import FaultProxy, Seen
from figures import Figures, Size

from zae_limiter import (
    EntityExistsError,
    FailureMode,
    Limit,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    Reservations,
    StackOptions,
    schema,
)
from zae_limiter.engine import stored as stored_state
from zae_limiter.storage.dynamodb.client import RetryPolicy
from zae_limiter.storage.dynamodb.repository import Repository

pytestmark = pytest.mark.integration

FROZEN_MS = 1_800_000_000_000
TABLE = "faults"
RESOURCE = "api"
LIMIT = Limit.per_hour("tok", 1000)


@dataclass(frozen=True, slots=True)
class RecordingPolicy(RetryPolicy):
    """The library's policy, recording every backoff it draws."""

    drawn: ClassVar[list[tuple[int, float]]] = []

    def delay(self, attempt: int) -> float:
        value = RetryPolicy.delay(self, attempt)
        RecordingPolicy.drawn.append((attempt, value))
        return value


# throttle_seconds=0: a throttled request is sent max_attempts times, like any other refusal, so
# that the bounds below hold (throttles past them: `test_throttles_outlast_max_attempts`).
POLICY = RecordingPolicy(
    max_attempts=3,
    base_delay=0.02,
    max_delay=0.15,
    connect_timeout=0.4,
    read_timeout=0.4,
    throttle_seconds=0.0,
)
A = POLICY.max_attempts
# One bucket write, worst case: A UpdateItem sends in all, whatever failed (one retry loop), and
# after each ambiguous failure a resolution read of up to A GetItem sends.
MAX_REQUESTS_PER_WRITE = A + A * A
# An acquire after a failed one reads the bucket first (its cache entry was dropped): A more.
MAX_REQUESTS_PER_ACQUIRE = A + MAX_REQUESTS_PER_WRITE
# The limiter's deadline bounds every acquire and lease call, whatever the retry policy would
# allow (up to A + A x A requests of a connect and a read timeout each: ~10 s here).
DEADLINE_S = 1.0
UNAVAILABLE_BOUND_S = 1.5 * DEADLINE_S
DELAY_S = POLICY.read_timeout + 0.35  # "delay" faults outlast the client's read timeout

OUTAGES = ["refuse", "hang", "cut", "reset", "delay", "throttle", "error500"]
APPLIED = {"cut", "reset", "delay"}  # forwarded: DynamoDB applies the request
CHAOS_CLIENTS = 6
# Chaos delays: any bucket write (consuming, giving back, or both) is held a little past the
# client's read timeout, so that its late copy lands close to the client's resend, before or
# after it: exactly where only the write-id condition keeps it from applying twice, and where a
# resent give-back could land twice once four other writes rotate its id out of the ring. Three
# lengths, so that some land there however fast the client resends (load varies).
CHAOS_DELAY_P = 0.06  # for each length, of the writes no earlier fault took
CHAOS_DELAYS_S = tuple(POLICY.read_timeout + past for past in (0.05, 0.1, 0.15))
# Shorter than the read timeout, as the library's default deadline (1 s) is shorter than the
# default policy's (5 s): a call meeting a delayed or hung write returns at its deadline, and a
# lease's adjust, release or rollback goes on as a detached write.
DETACH_DEADLINE_S = 0.3
RELEASED = json.dumps(schema.limit_attr(schema.RELEASED, LIMIT.name)).encode()
CONSUMED = json.dumps(schema.limit_attr(schema.CONSUMED, LIMIT.name)).encode()
# The engine's line for a give-back it did not see land (and will not send again).
UNCONFIRMED = re.compile(r"give-back of \{'tok': (\d+)\} to k/api not confirmed")


def limiter_for(
    proxy: FaultProxy,
    mode: FailureMode = FailureMode.FAIL_CLOSED,
    clock_ms: int = FROZEN_MS,
    reservations: Reservations | None = None,
    deadline: float | None = DEADLINE_S,
    retry: RetryPolicy = POLICY,
) -> RateLimiter:
    return RateLimiter(
        name=TABLE,
        endpoint_url=proxy.endpoint_url,
        stack_options=StackOptions(),
        failure_mode=mode,
        retry=retry,
        clock=lambda: clock_ms,
        reservations=reservations,
        deadline=deadline,
    )


async def stored(proxy: FaultProxy, entity_id: str = "k") -> dict[str, int]:
    """The bucket as moto holds it (read directly, bypassing the proxy), in millitokens."""
    repo = Repository(TABLE, None, f"http://{proxy.upstream[0]}:{proxy.upstream[1]}")
    try:
        bucket = await repo.get_bucket(entity_id, RESOURCE)
    finally:
        await repo.close()
    if bucket is None:
        return {"cn": 0, "rl": 0, "tk": LIMIT.burst_milli, "net": 0}
    s = bucket.limits[LIMIT.name]
    return {
        "cn": s.consumed_milli,
        "rl": s.released_milli,
        "tk": stored_state.available(LIMIT, s, FROZEN_MS),
        "net": s.consumed_milli - s.released_milli,
    }


@pytest.fixture
async def warm(proxy: FaultProxy) -> AsyncIterator[RateLimiter]:
    """A FAIL_CLOSED limiter whose bucket exists and is cached (1 token taken), stats reset."""
    async with limiter_for(proxy) as limiter:
        async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 1}):
            pass
        proxy.reset_stats()
        RecordingPolicy.drawn.clear()
        yield limiter


@pytest.mark.parametrize("kind", OUTAGES)
async def test_outage(
    proxy: FaultProxy, warm: RateLimiter, size: Size, figures: Figures, kind: str
) -> None:
    limiter = warm
    before = await stored(proxy)
    assert before["net"] == 1000
    if kind == "refuse":
        proxy.inject(kind)
    else:
        proxy.inject(kind, delay=DELAY_S)

    # FAIL_CLOSED: unavailable, in bounded time, after a bounded number of requests.
    for _ in range(size.fault_rounds):
        seen_before = len(proxy.requests())
        started = time.monotonic()
        with pytest.raises(RateLimiterUnavailable):
            async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 2}):
                pytest.fail("admitted during an outage in FAIL_CLOSED")
        elapsed = time.monotonic() - started
        requests = len(proxy.requests()) - seen_before
        assert elapsed <= UNAVAILABLE_BOUND_S, f"{kind}: {elapsed:.2f}s"
        assert requests <= MAX_REQUESTS_PER_ACQUIRE, f"{kind}: {requests} requests"
        figures.worst(f"unavailable_after_s.{kind}", round(elapsed, 2))
        figures.worst(f"requests_per_failed_acquire.{kind}", requests)
        if kind != "refuse":
            assert requests >= 1
        figures.add(operations=1)

    # FAIL_OPEN: admitted without a bucket; the lease's own calls write nothing.
    async with limiter.acquire(
        "k", RESOURCE, [LIMIT], {"tok": 3}, failure_mode=FailureMode.FAIL_OPEN
    ) as lease:
        assert lease.fail_open is True
        seen_before = len(proxy.requests())
        await lease.adjust(tok=5)
        await lease.consume(tok=1)
        await lease.release(tok=2)
        assert len(proxy.requests()) == seen_before
        assert lease.consumed == {}  # nothing was taken from any bucket
    figures.add(operations=4, admitted=1)

    # Retries were spaced by drawn, jittered delays within the policy's cap.
    if kind != "refuse":
        assert RecordingPolicy.drawn, "no backoff between attempts"
    for attempt, value in RecordingPolicy.drawn:
        assert 0 <= value <= min(POLICY.max_delay, POLICY.base_delay * 2**attempt)

    proxy.clear()
    if kind == "delay":
        await asyncio.sleep(DELAY_S + 0.3)  # let the last delayed request reach moto
    after = await stored(proxy)
    # Nothing was admitted, so nothing is consumed, except writes DynamoDB applied while their
    # response was lost: each of those exactly once (distinct write ids), never twice.
    landed = applied_writes(proxy)
    ids = [write_id for write_id, _, _ in landed]
    assert len(ids) == len(set(ids)), "a write applied twice"
    if kind in APPLIED:
        assert landed, f"{kind}: the fault forwards requests, one must have landed"
        assert len(landed) <= size.fault_rounds + 1, "more than one write per acquire"
        assert after["cn"] - before["cn"] == sum(cn for _, cn, _ in landed)
        assert after["rl"] == before["rl"]
        figures.add(landed_without_admission=len(landed))
    else:
        assert not landed
        assert after == before, f"{kind}: the bucket changed without an admission"
    assert after["tk"] == LIMIT.burst_milli - after["net"]

    # Recovery: the same limiter works again and its write counts once.
    async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 4}) as lease:
        assert lease.fail_open is False
    final = await stored(proxy)
    assert final["net"] == after["net"] + 4000
    figures.add(operations=1, admitted=1, ledger_checks=1)


def applied_writes(proxy: FaultProxy) -> list[tuple[str, int, int]]:
    """(write id, cn millitokens, rl millitokens) of every bucket UpdateItem DynamoDB applied
    (answered 200), whatever the client got back."""
    applied = []
    for seen in proxy.requests("UpdateItem"):
        if seen.status != 200:
            continue
        write = bucket_write(seen)
        if write is not None:
            applied.append(write)
    return applied


def bucket_write(seen: Seen) -> tuple[str, int, int] | None:
    """(write id, cn millitokens, rl millitokens) of one bucket UpdateItem request as sent,
    applied or not; None for any other request (the version record)."""
    request = json.loads(seen.body)
    names = request.get("ExpressionAttributeNames", {})
    values = request.get("ExpressionAttributeValues", {})
    expression = request.get("UpdateExpression", "")
    w0 = next((k for k, v in names.items() if v == "w0"), None)
    if w0 is None:
        return None
    write_id = values[expression.split(f"{w0} = ", 1)[1].split(",", 1)[0].strip()]["S"]
    adds = expression.split(" ADD ", 1)[1] if " ADD " in expression else ""
    amounts = {}
    for counter in ("cn", "rl"):
        placeholder = next((k for k, v in names.items() if v == f"{counter}#tok"), None)
        amounts[counter] = 0
        if placeholder is not None and f"{placeholder} " in adds:
            value = adds.split(f"{placeholder} ", 1)[1].split(",", 1)[0].strip()
            amounts[counter] = int(values[value]["N"])
    return write_id, amounts["cn"], amounts["rl"]


TRANSIENT = [
    ("throttle", {"UpdateItem"}),
    ("error500", {"UpdateItem"}),
    ("hang", {"UpdateItem"}),
    ("cut", {"UpdateItem"}),
    ("reset", {"UpdateItem"}),
    ("delay", {"UpdateItem"}),
    ("cut", {"GetItem", "UpdateItem"}),
    ("error500", {"GetItem"}),
]


@pytest.mark.parametrize(
    ("kind", "ops"), TRANSIENT, ids=[f"{k}-{'+'.join(sorted(o))}" for k, o in TRANSIENT]
)
async def test_transient_fault_is_absorbed(
    proxy: FaultProxy, size: Size, figures: Figures, kind: str, ops: set[str]
) -> None:
    """One fault on the next call (or two) of each acquire and each adjust: every call still
    succeeds and the bucket holds exactly what the callers were told."""
    kept = 0
    async with limiter_for(proxy) as limiter:
        for round_ in range(size.fault_rounds):
            if "GetItem" in ops:
                limiter.clear_cache()  # make the acquire read the bucket first
            proxy.inject(kind, ops=ops, count=2 if len(ops) > 1 else 1, delay=DELAY_S)
            async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 2}) as lease:
                assert lease.fail_open is False
                proxy.inject(kind, ops={"UpdateItem"}, count=1, delay=DELAY_S)
                await lease.adjust(tok=round_ + 1)
                kept += lease.consumed["tok"]
            figures.add(operations=2, admitted=1)
        proxy.clear()
    if kind == "delay":
        await asyncio.sleep(DELAY_S + 0.3)  # late requests land (and must be refused)
    after = await stored(proxy)
    assert proxy.stats.injected[kind] >= size.fault_rounds * 2
    error = after["net"] - kept * 1000
    figures.add(
        ledger_checks=1,
        doubled_updates=max(0, error) // 1000,
        lost_updates=max(0, -error) // 1000,
    )
    assert after["net"] == kept * 1000, f"{kind}: bucket {after['net']} != ledger {kept * 1000}"
    assert after["rl"] == 0
    assert after["tk"] == LIMIT.burst_milli - after["net"]


async def test_backoff_is_bounded_and_jittered(
    proxy: FaultProxy, warm: RateLimiter, size: Size, figures: Figures
) -> None:
    """Persistent throttling of writes: exactly max_attempts UpdateItem calls per acquire,
    spaced by the policy's random delays (not all equal, never above the cap)."""
    proxy.inject("throttle", ops={"UpdateItem"})
    gaps: list[float] = []
    for _ in range(max(3, size.fault_rounds)):
        before = len(proxy.requests("UpdateItem"))
        with pytest.raises(RateLimiterUnavailable):
            async with warm.acquire("k", RESOURCE, [LIMIT], {"tok": 1}):
                pass
        attempts = proxy.requests("UpdateItem")[before:]
        assert len(attempts) == A, "throttled writes must be retried exactly max_attempts times"
        gaps += [b.at - a.at for a, b in itertools.pairwise(attempts)]
        figures.add(operations=1)
    drawn = [value for _, value in RecordingPolicy.drawn]
    assert len(drawn) == len(gaps)
    assert len({round(v, 6) for v in drawn}) > 1, "backoff delays are all identical"
    assert len({round(g, 3) for g in gaps}) > 1, "observed retry spacing is constant"
    assert max(gaps) <= POLICY.max_delay + 0.5
    assert max(drawn) <= POLICY.max_delay
    proxy.clear()
    assert (await stored(proxy))["net"] == 1000


async def test_throttles_outlast_max_attempts(proxy: FaultProxy, warm: RateLimiter) -> None:
    """A throttle is a certain refusal from a busy item: with the default `throttle_seconds`, a
    write throttled more than `max_attempts` times is still sent until it lands (under the
    limiter's default deadline), exactly once."""
    policy = RetryPolicy(base_delay=0.005, max_delay=0.02)
    assert policy.throttle_seconds == RetryPolicy().throttle_seconds > 1
    throttled = policy.max_attempts + 3
    async with limiter_for(proxy, retry=policy, deadline=None) as limiter:
        before = len(proxy.requests("UpdateItem"))
        proxy.inject("throttle", ops={"UpdateItem"}, count=throttled)
        async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 2}):
            pass
        assert len(proxy.requests("UpdateItem")) - before == throttled + 1
    assert (await stored(proxy))["net"] == 3000


async def test_throttle_retries_end_after_throttle_seconds(
    proxy: FaultProxy, warm: RateLimiter
) -> None:
    """Persistent throttling: retries go on past `max_attempts` for `throttle_seconds`, then the
    acquire is refused as unavailable, having written nothing."""
    policy = RetryPolicy(max_attempts=2, base_delay=0.005, max_delay=0.02, throttle_seconds=0.4)
    async with limiter_for(proxy, retry=policy, deadline=None) as limiter:
        before = len(proxy.requests("UpdateItem"))
        proxy.inject("throttle", ops={"UpdateItem"})
        started = time.monotonic()
        with pytest.raises(RateLimiterUnavailable):
            async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 2}):
                pytest.fail("admitted while every write was throttled")
        elapsed = time.monotonic() - started
        proxy.clear()
        attempts = len(proxy.requests("UpdateItem")) - before
    assert policy.throttle_seconds <= elapsed < policy.throttle_seconds + 0.5, elapsed
    assert attempts > policy.max_attempts
    assert (await stored(proxy))["net"] == 1000


async def test_cascade_parent_failure_gives_child_back(
    proxy: FaultProxy, figures: Figures
) -> None:
    """The child's write lands, the parent's is throttled to exhaustion: the acquire raises and
    the child's consumption is given back; a cut parent response is resolved exactly once."""
    async with limiter_for(proxy) as limiter:
        await limiter.create_entity("proj")
        await limiter.create_entity("k", parent_id="proj")
        async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 1}, cascade=True):
            pass
        proxy.inject("throttle", ops={"UpdateItem"}, match=b"ENTITY#proj")
        with pytest.raises(RateLimiterUnavailable):
            async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 5}, cascade=True):
                pytest.fail("admitted without the parent")
        proxy.clear()
        child, parent = await stored(proxy, "k"), await stored(proxy, "proj")
        assert child["net"] == 1000 and parent["net"] == 1000
        assert child["cn"] == 6000 and child["rl"] == 5000, "the child's write was given back"

        proxy.inject("cut", ops={"UpdateItem"}, match=b"ENTITY#proj", count=1)
        async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 7}, cascade=True):
            pass
        proxy.clear()
        child, parent = await stored(proxy, "k"), await stored(proxy, "proj")
        assert child["net"] == 8000 and parent["net"] == 8000
        assert parent["rl"] == 0
    figures.add(operations=3, admitted=2, ledger_checks=2)


async def test_cascade_child_failure_gives_parent_back(proxy: FaultProxy, figures: Figures) -> None:
    """The parent's write lands, the child's (sent in the same round, sorted first) is
    throttled to exhaustion: the parent's consumption is given back too, not only what landed
    before the failure in the round's order."""
    async with limiter_for(proxy) as limiter:
        await limiter.create_entity("proj")
        await limiter.create_entity("k", parent_id="proj")
        async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 1}, cascade=True):
            pass
        proxy.inject("throttle", ops={"UpdateItem"}, match=b"ENTITY#k")
        with pytest.raises(RateLimiterUnavailable):
            async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 5}, cascade=True):
                pytest.fail("admitted without the child")
        proxy.clear()
    child, parent = await stored(proxy, "k"), await stored(proxy, "proj")
    assert child["net"] == 1000 and parent["net"] == 1000
    assert parent["cn"] == 6000 and parent["rl"] == 5000, "the parent's write was given back"
    figures.add(operations=2, admitted=1, ledger_checks=2)


async def test_half_landed_cascade_adjust_then_rollback_gives_back_exactly(
    proxy: FaultProxy, figures: Figures
) -> None:
    """adjust(+3) lands on the child and is throttled out on the parent: the lease's books take
    the child's half only, and the rollback gives each item back exactly what it holds (the
    child 7, the parent 4), so both end where they began."""
    async with limiter_for(proxy) as limiter:
        await limiter.create_entity("proj")
        await limiter.create_entity("k", parent_id="proj")
        with pytest.raises(RateLimiterUnavailable):
            async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 4}, cascade=True) as lease:
                proxy.inject("throttle", ops={"UpdateItem"}, match=b"ENTITY#proj")
                try:
                    await lease.adjust(tok=3)
                finally:
                    proxy.clear()
        assert lease.consumed == {"tok": 0}
    child, parent = await stored(proxy, "k"), await stored(proxy, "proj")
    assert child["cn"] == 7000 and parent["cn"] == 4000
    assert child["net"] == 0, "the child's half of the adjust was not given back"
    assert parent["net"] == 0
    figures.add(operations=2, ledger_checks=2)


async def test_half_landed_cascade_release_then_rollback_gives_back_once(
    proxy: FaultProxy, figures: Figures
) -> None:
    """release(2) lands on the child and is certainly refused (throttled) on the parent: the
    child's books drop to 2, the parent's stay 4, and the rollback gives back 2 and 4. Nothing
    is given back twice (the child would then end below where it began: minted) and nothing is
    stranded on the parent."""
    async with limiter_for(proxy) as limiter:
        await limiter.create_entity("proj")
        await limiter.create_entity("k", parent_id="proj")
        with pytest.raises(RateLimiterUnavailable):
            async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 4}, cascade=True) as lease:
                proxy.inject("throttle", ops={"UpdateItem"}, match=b"ENTITY#proj")
                try:
                    await lease.release(tok=2)
                finally:
                    proxy.clear()
                assert lease.consumed == {"tok": 2}  # not reached: release raised
        assert limiter.ledger.unconfirmed_give_back_tokens == {}
    child, parent = await stored(proxy, "k"), await stored(proxy, "proj")
    assert child["cn"] == 4000 and child["rl"] == 4000, child
    assert parent["cn"] == 4000 and parent["rl"] == 4000, "the parent's tokens were stranded"
    figures.add(operations=2, ledger_checks=2)


async def test_a_delayed_give_back_after_a_partial_cascade_lands_once(
    proxy: FaultProxy, figures: Figures
) -> None:
    """The child's write fails, the parent's landed, and the parent's give-back is held past
    the read timeout: it is not sent again (counted as unconfirmed), and the held copy lands
    once, so the parent ends where it began."""
    async with limiter_for(proxy, deadline=None) as limiter:
        await limiter.create_entity("proj")
        await limiter.create_entity("k", parent_id="proj")
        async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 1}, cascade=True):
            pass
        proxy.inject("throttle", ops={"UpdateItem"}, match=b"ENTITY#k")
        proxy.inject("delay", ops={"UpdateItem"}, count=1, delay=HOLD_S, match=RELEASED)
        with pytest.raises(RateLimiterUnavailable):
            async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 5}, cascade=True):
                pytest.fail("admitted without the child")
        assert limiter.ledger.unconfirmed_give_back_tokens == {"tok": 5}
        await asyncio.sleep(HOLD_S)  # the held copy lands
        proxy.clear()
    parent = await stored(proxy, "proj")
    assert proxy.stats.injected["delay"] == 1
    assert parent["net"] == 1000 and parent["rl"] == 5000, "the give-back landed once"
    figures.add(operations=2, admitted=1, ledger_checks=1)


async def test_lease_calls_fail_closed(proxy: FaultProxy, warm: RateLimiter) -> None:
    """adjust/consume/release during an outage raise RateLimiterUnavailable (FAIL_CLOSED) in
    bounded time. The lease's books keep only the takes that landed, and count the failed
    release as made: it is never given back a second time (here it did not land, so its token
    stays consumed)."""
    async with warm.acquire("k", RESOURCE, [LIMIT], {"tok": 2}) as lease:
        proxy.inject("error500")
        for call in (lease.adjust, lease.consume, lease.release):
            started = time.monotonic()
            with pytest.raises(RateLimiterUnavailable):
                await call(tok=1)
            assert time.monotonic() - started <= UNAVAILABLE_BOUND_S
        assert lease.consumed == {"tok": 1}
        proxy.clear()
        await lease.adjust(tok=1)
        assert lease.consumed == {"tok": 2}
    assert (await stored(proxy))["net"] == 4000


# Long enough for the client to time out, resolve and (were it resent) resend, and for four
# more writes to push the id out of the ring, before the held copy lands.
HOLD_S = POLICY.read_timeout + 1.0


async def test_a_give_back_in_flight_is_never_resent(proxy: FaultProxy, figures: Figures) -> None:
    """A release held past the read timeout (no deadline): the client finds its id absent and
    does not send it again, since the held copy may still land. Four other writes then rotate
    the id out of the ring, and the held copy lands: once. Resent, it would have landed twice
    (the resend, then the late copy with its id no longer in w0..w3): 2 tokens minted. The lease
    counts the release as made, so the rollback gives back only the 3 it still holds; counting
    it as not made, the rollback would give those 2 back again."""
    async with (
        limiter_for(proxy, deadline=None) as limiter,
        limiter_for(proxy, deadline=None) as other,
    ):
        with pytest.raises(RuntimeError):
            async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 5}) as lease:
                proxy.inject("delay", ops={"UpdateItem"}, count=1, delay=HOLD_S, match=RELEASED)
                started = time.monotonic()
                with contextlib.suppress(RateLimiterUnavailable):  # its outcome is unknown
                    await lease.release(tok=2)
                assert time.monotonic() - started < HOLD_S, "the release waited for its copy"
                assert lease.consumed == {"tok": 3}
                for _ in range(4):
                    async with other.acquire("k", RESOURCE, [LIMIT], {"tok": 1}):
                        pass
                raise RuntimeError("abort")  # the rollback gives back what the lease holds
        await asyncio.sleep(HOLD_S)  # the held copy lands
    held = [s for s in proxy.requests("UpdateItem") if s.fault == "delay"]
    assert len(held) == 1 and held[0].status == 200, "the held release landed"
    after = await stored(proxy)
    assert after["net"] == (5 + 4 - 2 - 3) * 1000, "tokens given back twice (or lost)"
    assert after["rl"] == (2 + 3) * 1000
    releases = [w for w in map(bucket_write, proxy.requests("UpdateItem")) if w and w[2]]
    assert len(releases) == 2  # the release and the rollback, each sent once
    assert limiter.ledger.unconfirmed_give_backs == 1
    assert limiter.ledger.unconfirmed_give_back_tokens == {"tok": 2}
    figures.add(ledger_checks=1, chaos_late_give_backs_applied=1)


async def test_a_write_mixing_a_take_and_a_give_back_is_never_resent(proxy: FaultProxy) -> None:
    """adjust(tok=+1, tpm=-100) is one UpdateItem with a consuming part and a give-back part:
    held past the read timeout, it is not sent again (a second landing would give the 100
    back twice). The lease holds the give-back as made and the take as not (it did not know it
    landed); the held copy then lands, once."""
    tpm = Limit.per_hour("tpm", 10_000)
    async with limiter_for(proxy, deadline=None) as limiter:
        async with limiter.acquire("k", RESOURCE, [LIMIT, tpm], {"tok": 1, "tpm": 500}) as lease:
            proxy.reset_stats()
            proxy.inject("delay", ops={"UpdateItem"}, count=1, delay=HOLD_S)
            with pytest.raises(RateLimiterUnavailable):
                await lease.adjust(tok=1, tpm=-100)
            assert lease.consumed == {"tok": 1, "tpm": 400}
        await asyncio.sleep(HOLD_S)  # the held copy lands
    assert len(proxy.requests("UpdateItem")) == 1, "the mixed write was sent again"
    assert limiter.ledger.unconfirmed_give_back_tokens == {"tpm": 100}
    assert (await stored(proxy))["net"] == 2000  # the take's part landed with the held copy


async def test_a_take_past_its_deadline_is_held_once_it_landed(
    proxy: FaultProxy, figures: Figures
) -> None:
    """An adjust(+5) cut short by its deadline goes on detached, and fails: every attempt hangs,
    it never lands. The block then raises: the rollback gives back the 2 the lease certainly
    holds, not the 5 it never got. Held as soon as the adjust returned, those 5 would be given
    back without ever having been taken: minted."""
    async with limiter_for(proxy, deadline=DETACH_DEADLINE_S) as limiter:
        async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 1}):
            pass  # the bucket exists and is cached
        with pytest.raises(RuntimeError):
            async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 2}) as lease:
                proxy.inject("hang", ops={"UpdateItem"}, match=CONSUMED)  # not the rollback
                await lease.adjust(tok=5)  # returns at the deadline; its write goes on
                assert lease.consumed == {"tok": 2}
                raise RuntimeError("abort")
    # `close()` waited for the detached adjust, which failed.
    proxy.clear()
    assert lease.consumed == {"tok": 0}
    after = await stored(proxy)
    assert after["net"] == (1 + 2 - 2) * 1000, "a take that never landed was given back"
    assert proxy.stats.injected["hang"] == POLICY.max_attempts
    figures.add(ledger_checks=1)


async def test_a_give_back_is_not_retried_after_a_503(proxy: FaultProxy, warm: RateLimiter) -> None:
    """A 503 (ServiceUnavailable) gives no promise that DynamoDB did not apply the request: a
    consuming write is retried after one (applied twice, it would only cost capacity), a
    give-back is not (it could mint tokens). The give-back's tokens then stay consumed: counted
    in the ledger, and the lease does not hold them any more."""
    async with warm.acquire("k", RESOURCE, [LIMIT], {"tok": 5}) as lease:
        proxy.reset_stats()
        proxy.inject("error503", ops={"UpdateItem"}, count=1)
        await lease.adjust(tok=1)  # retried: the 503 was not forwarded, the retry lands
        assert len(proxy.requests("UpdateItem")) == 2
        proxy.inject("error503", ops={"UpdateItem"}, count=1)
        with pytest.raises(RateLimiterUnavailable):
            await lease.release(tok=2)
        assert len(proxy.requests("UpdateItem")) == 3, "the give-back was sent again"
        assert lease.consumed == {"tok": 4}
    assert warm.ledger.unconfirmed_give_back_tokens == {"tok": 2}
    assert (await stored(proxy))["net"] == (1 + 5 + 1) * 1000  # the warm-up's token included


@pytest.mark.parametrize("deadline", [None, DETACH_DEADLINE_S], ids=["no_deadline", "deadline"])
@pytest.mark.parametrize("mode", ["direct", "reserved"])
async def test_chaos(
    proxy: FaultProxy, size: Size, figures: Figures, mode: str, deadline: float | None
) -> None:
    """Concurrent acquire/adjust (up and down)/release/rollback while a mix of random faults
    hits every call, and every kind of bucket write may be delayed past the read timeout.

    The callers' own books are the independent ledger. Every give-back the callers attempted
    is counted as made, and only the consumption they were told of for certain as taken: the
    bucket's net consumption below that is tokens given back twice, over-admission, and must
    be 0. The upper bound (certain and uncertain consumption, give-backs the engine did not see
    land, late copies of consuming writes) catches lost updates. The proxy records DynamoDB's own
    answers, so the truth per write id is known: none applies while its id is in the item's
    ring, and none twice but a consuming write's late copy after its id rotated out (doubled
    consumption, reported: capacity lost, never minted).

    `deadline`: None lets every write run its retries (a resend after a read timeout);
    DETACH_DEADLINE_S cuts every call that meets a delayed or hung write short, so adjustments,
    releases and rollbacks go on as detached writes after their caller returned (the first
    give-backs are delayed for certain, so that some do).

    `reserved`: the limiter serves the clients from reserved blocks, small ones (at most 5
    tokens) held briefly (0.2 s) while the clients pause between calls, so that many blocks are
    reserved and given back at hold expiry during the run, under the faults. A reserve that
    landed while the call failed stays consumed in the bucket: the upper bound grows by at most
    one block per such failure, never the lower one."""
    unconfirmed: list[int] = []
    detached: list[str] = []
    reservations = (
        Reservations(max_share=0.005, hold_seconds=0.2, horizon_seconds=0.1)
        if mode == "reserved"
        else None
    )
    pause = 0.1 if reservations is not None else 0.0

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if found := UNCONFIRMED.search(message):
                unconfirmed.append(int(found.group(1)))
            if "goes on past its deadline" in message:
                detached.append(message)

    handler = Capture()
    logging.getLogger("zae_limiter").addHandler(handler)
    books = {"sure": 0, "maybe": 0, "given": 0, "raised": 0}
    outcomes: Counter[str] = Counter()

    async def client(limiter: RateLimiter, seed: int) -> None:
        import random

        rng = random.Random(seed)
        for _ in range(size.fault_rounds * 4):
            amount = rng.randint(1, 3)
            action = rng.random()
            admitted = False
            if pause:
                await asyncio.sleep(rng.uniform(0, pause))
            try:
                async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": amount}) as lease:
                    admitted = True
                    books["sure"] += amount
                    held = amount  # what this lease certainly took and did not give back
                    try:
                        if action < 0.25:
                            before = lease.consumed["tok"]
                            await lease.adjust(tok=2)
                            # Past its deadline the adjust returns and its write goes on: the
                            # lease counts the take only once it is known to have landed. A take
                            # it claims wrongly is given back by the rollback: over-admission.
                            taken = lease.consumed["tok"] - before
                            books["sure"] += taken
                            books["maybe"] += 2 - taken
                            held += taken
                        elif action < 0.4:
                            books["given"] += 1
                            held -= 1
                            await lease.adjust(tok=-1)
                        elif action < 0.55:
                            books["given"] += 1
                            held -= 1
                            await lease.release(tok=1)
                    except RateLimiterUnavailable:
                        books["raised"] += 1
                        if action < 0.25:
                            books["maybe"] += 2
                        books["given"] += held  # the rollback on exit gives back the rest
                        raise
                    if action > 0.75:
                        books["given"] += held
                        raise RuntimeError("abort")
                outcomes["kept"] += 1
            except RateLimiterUnavailable:
                outcomes["unavailable"] += 1
                if not admitted:
                    books["raised"] += 1
                    books["maybe"] += amount  # the acquire's own write is unknown
            except RateLimitExceeded:
                outcomes["denied"] += 1
            except RuntimeError:
                outcomes["rolled_back"] += 1

    try:
        limiter = limiter_for(proxy, reservations=reservations, deadline=deadline)
        async with limiter:
            for kind, p in (("cut", 0.08), ("reset", 0.05), ("error500", 0.08), ("throttle", 0.1)):
                proxy.inject(kind, probability=p)
            proxy.inject("hang", probability=0.02)
            if deadline is not None:
                proxy.inject(
                    "delay", ops={"UpdateItem"}, count=3, delay=CHAOS_DELAYS_S[0], match=RELEASED
                )
            # A write held past the client's read timeout lands after the client gave up (and,
            # unless it gives back, resent it): the write-id condition keeps a late copy from
            # applying while its id is in the ring, and a give-back is never resent.
            for delay in CHAOS_DELAYS_S:
                proxy.inject("delay", ops={"UpdateItem"}, probability=CHAOS_DELAY_P, delay=delay)
            # More concurrent writers than the item's ring of write ids (w0..w3): a lost
            # response may be followed by so many writes that its outcome becomes unknown.
            await asyncio.gather(*(client(limiter, seed) for seed in range(CHAOS_CLIENTS)))
            proxy.clear()
        await asyncio.sleep(max(CHAOS_DELAYS_S) + 0.3)  # delayed writes still held land
    finally:
        logging.getLogger("zae_limiter").removeHandler(handler)

    after = await stored(proxy)
    # What DynamoDB applied, as the proxy saw it (its own answers, whatever the client got).
    landed = landed_writes(proxy)
    counts = Counter(w.write_id for w in landed)
    doubled = sorted(i for i, n in counts.items() if n > 1)
    late = [w for w in landed if w.late]
    late_ids = {w.write_id for w in late}
    rotated = [i for i in doubled if i in late_ids]
    extra_copies = [w for w in landed if w.write_id in doubled]
    doubled_tokens = sum(w.cn for w in extra_copies) - sum(
        max(w.cn for w in extra_copies if w.write_id == i) for i in doubled
    )
    lo = (books["sure"] - books["given"]) * 1000
    over_admitted = max(0, lo - after["net"])
    figures.add(
        operations=sum(outcomes.values()),
        admitted=outcomes["kept"] + outcomes["rolled_back"],
        rolled_back=outcomes["rolled_back"],
        ledger_checks=1,
        over_admissions=over_admitted // 1000,
        doubled_updates=len(doubled) - len(rotated),
        chaos_applied_writes=len(landed),
        chaos_late_writes_applied=len(late),
        chaos_late_give_backs_applied=sum(1 for w in late if w.rl),
        chaos_doubled_after_ring_rotation=len(rotated),
        chaos_doubled_consumption_tokens=doubled_tokens // 1000,
        chaos_unconfirmed_give_back_tokens=sum(unconfirmed),
        chaos_detached_writes=len(detached),
    )
    assert sum(proxy.stats.injected.values()) > 0
    assert proxy.stats.injected["delay"] > 0
    assert outcomes["kept"] > 0
    if deadline is not None and reservations is None:
        assert detached, "no lease write went on past its deadline"
    if reservations is not None:
        assert limiter.reserved() == {}, "a closed limiter still holds reserved tokens"
    # No give-back lands twice, so the bucket never holds more than the books allow.
    assert not [i for i in doubled if any(w.rl for w in landed if w.write_id == i)]
    assert after["net"] >= lo, (
        f"over-admission: the bucket's net {after['net']} is below the books' {lo} "
        f"({over_admitted // 1000} tokens given back twice)"
    )
    # The write-id condition: no write is applied while its id is among the item's recent ids.
    # (The ring before a write is its answer's w1..w3 and one older id the answer drops.)
    breaches = [w.write_id for w in landed if w.write_id in w.before]
    assert not breaches, f"applied while their id was in the ring: {breaches}"
    # A consuming write's late copy can still land after its resend when four other writes
    # rotate its id out of the ring in between: consumption twice, capacity lost (reported).
    # Any other double is a bug.
    assert doubled == rotated, f"applied twice, no late copy among them: {doubled}"
    hi = (books["sure"] + books["maybe"] - books["given"] + sum(unconfirmed)) * 1000
    hi += sum(w.cn for w in late)  # a late copy may land after its caller moved on
    if reservations is not None:
        # A reserve that landed for a call that raised, or a top-up ahead whose outcome is
        # unknown: at most one block each. (The reserver's count is private.)
        assert limiter.reserver is not None
        uncertain = books["raised"] + limiter.reserver.failed_ahead
        hi += int(LIMIT.burst_milli * reservations.max_share) * uncertain
    figures.add(chaos_uncertain_tokens=(hi - lo) // 1000)
    assert after["net"] <= hi, f"bucket {after['net']} above the books' bound {hi}"
    assert after["cn"] == sum(w.cn for w in landed)
    assert after["rl"] == sum(w.rl for w in landed)
    assert after["tk"] == LIMIT.burst_milli - after["net"]


@dataclass(frozen=True, slots=True)
class Landed:
    """One bucket write DynamoDB applied, from the request the proxy forwarded and the item
    DynamoDB returned (ALL_NEW)."""

    write_id: str
    cn: int
    rl: int
    late: bool  # held by a "delay" fault past the client's read timeout
    before: tuple[str, ...]  # the write ids the answer shows before this one's (w1..w3)


def landed_writes(proxy: FaultProxy) -> list[Landed]:
    landed = []
    for seen in proxy.requests("UpdateItem"):
        write = bucket_write(seen) if seen.status == 200 else None
        if write is None:
            continue
        body = json.loads(seen.response.partition(b"\r\n\r\n")[2])
        ring = [body["Attributes"].get(slot, {}).get("S", "") for slot in schema.WRITE_ID_SLOTS]
        assert ring[0] == write[0], "an applied write's answer names another write id"
        # Late: answered after the client's read timeout, so the client may have resent it
        # meanwhile; held by a "delay" fault, or slow on a loaded machine (the same to the
        # client, which cannot tell them apart).
        slow = seen.answered is not None and seen.answered - seen.at >= POLICY.read_timeout
        landed.append(
            Landed(*write, late=seen.fault == "delay" or slow, before=tuple(ring[1:]))
        )
    return landed


@pytest.mark.parametrize("kind", ["cut", "reset"])
async def test_create_entity_with_a_lost_response_is_created_once(
    proxy: FaultProxy, kind: str
) -> None:
    """The PutItem lands but its answer is lost; the retry meets the item: it is ours, so
    create_entity succeeds, and a real second create is still refused."""
    async with limiter_for(proxy) as limiter:
        proxy.inject(kind, ops={"PutItem"}, count=1)
        entity = await limiter.create_entity("lost-answer", name="once")
        assert entity.name == "once"
        assert proxy.stats.injected.get(kind) == 1
        with pytest.raises(EntityExistsError):
            await limiter.create_entity("lost-answer")


@pytest.mark.parametrize("operation", ["adjust", "consume", "release"])
async def test_lease_operations_raise_the_public_error_under_throttling(
    proxy: FaultProxy, warm: RateLimiter, figures: Figures, operation: str
) -> None:
    """A lease call whose write is throttled to exhaustion raises `RateLimiterUnavailable`
    itself, never the repository's internal subclass or a storage error."""
    from zae_limiter.storage.protocol import RepositoryUnavailable, StorageError

    async with warm.acquire("k", RESOURCE, [LIMIT], {"tok": 2}) as lease:
        proxy.inject("throttle", ops={"UpdateItem"})
        with pytest.raises(RateLimiterUnavailable) as raised:
            await getattr(lease, operation)(tok=1)
        proxy.clear()
    assert type(raised.value) is RateLimiterUnavailable
    assert not isinstance(raised.value, (RepositoryUnavailable, StorageError))
    figures.add(operations=1)


async def item_net(proxy: FaultProxy, entity_id: str, resource: str) -> int:
    """An item's net consumption of `LIMIT` as moto holds it (read bypassing the proxy)."""
    repo = Repository(TABLE, None, f"http://{proxy.upstream[0]}:{proxy.upstream[1]}")
    try:
        bucket = await repo.get_bucket(entity_id, resource)
    finally:
        await repo.close()
    if bucket is None:
        return 0
    s = bucket.limits[LIMIT.name]
    return s.consumed_milli - s.released_milli


@pytest.mark.parametrize("kind", ["reset", "cut", "delay", "throttle", "error500"])
async def test_an_acquire_over_several_resources_never_stays_partial(
    proxy: FaultProxy, figures: Figures, kind: str
) -> None:
    """`acquire(..., also=)` with cascade writes four items in one round; a fault on the
    writes of one resource's items (the other resource's first, then the own one's): a lost
    response (reset, cut, a delay past the read timeout) is resolved and the acquire and its
    adjust stand once; a refusal (throttled or failing to exhaustion) fails the acquire and
    what landed on the other items is given back. Every item's counters then equal the
    leases' books: nothing partial stays, nothing is doubled."""
    refused = kind in {"throttle", "error500"}
    items = [(e, r) for e in ("k", "proj") for r in ("m1", "m2")]
    async with limiter_for(proxy) as limiter:
        await limiter.create_entity("proj")
        await limiter.create_entity("k", parent_id="proj")
        async with limiter.acquire(
            "k", "m1", [LIMIT], {"tok": 1}, cascade=True, also={"m2": {"tok": 1}}
        ):
            pass
        books = dict.fromkeys(items, 1)
        for round_ in range(4):
            faulty = ("m2", "m1")[round_ % 2]
            proxy.inject(
                kind,
                ops={"UpdateItem"},
                count=None if refused else 1,
                delay=DELAY_S,
                match=f"#BUCKET#{faulty}".encode(),
            )
            try:
                async with limiter.acquire(
                    "k", "m1", [LIMIT], {"tok": 2}, cascade=True, also={"m2": {"tok": 3}}
                ) as lease:
                    await lease.adjust(tok=1, also={"m2": {"tok": -1}})
            except RateLimiterUnavailable:
                assert refused, f"{kind}: a lost response failed the acquire"
                figures.add(operations=1)
            else:
                assert not refused, f"{kind}: admitted without the {faulty} items"
                assert lease.consumed == {"tok": 3} and lease.also_consumed == {"m2": {"tok": 2}}
                for entity in ("k", "proj"):
                    books[(entity, "m1")] += 3
                    books[(entity, "m2")] += 2
                figures.add(operations=2, admitted=1)
            finally:
                proxy.clear()
        if kind == "delay":
            await asyncio.sleep(DELAY_S + 0.3)  # late copies land (and must be refused)
    assert proxy.stats.injected[kind] >= 4
    nets = {key: await item_net(proxy, *key) for key in items}
    assert nets == {key: 1000 * n for key, n in books.items()}, kind
    assert (books[("k", "m1")] == 1) is refused
    figures.add(ledger_checks=len(items))
