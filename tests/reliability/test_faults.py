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
- chaos: mixed random faults, delays past the read timeout included, under concurrent
  acquire/adjust/rollback: no write is applied while its id is in the item's ring, no write id
  is applied twice but a late copy after the ring rotated (the proxy records DynamoDB's own
  answers), the counters are the sum of what DynamoDB applied, and the bucket lies within the
  interval the callers can know.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
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
from zae_limiter import stored as stored_state
from zae_limiter.repository import Repository, RetryPolicy

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


POLICY = RecordingPolicy(
    max_attempts=3, base_delay=0.02, max_delay=0.15, connect_timeout=0.4, read_timeout=0.4
)
A = POLICY.max_attempts
# One bucket write, worst case: A attempts, each up to A UpdateItem calls (throttling is retried
# inside) and, after an ambiguous failure, a resolution read of up to A x A GetItem calls.
MAX_REQUESTS_PER_WRITE = A * (A + A * A)
# An acquire after a failed one reads the bucket first (its cache entry was dropped): A x A more.
MAX_REQUESTS_PER_ACQUIRE = A * A + MAX_REQUESTS_PER_WRITE
# The limiter's deadline bounds every acquire and lease call, whatever the retry policy would
# allow (up to A x (A + A x A) requests of a connect and a read timeout each: ~24 s here).
DEADLINE_S = 1.0
UNAVAILABLE_BOUND_S = 1.5 * DEADLINE_S
DELAY_S = POLICY.read_timeout + 0.35  # "delay" faults outlast the client's read timeout

OUTAGES = ["refuse", "hang", "cut", "reset", "delay", "throttle", "error500"]
APPLIED = {"cut", "reset", "delay"}  # forwarded: DynamoDB applies the request
CHAOS_CLIENTS = 6
# Chaos delays: a consuming bucket write (one that adds to `cn`, the consumed counter) is held
# a little past the client's read timeout, so that its late copy lands close to the client's
# resend, before or after it: exactly where only the write-id condition keeps it from applying
# twice. Three lengths, so that some land there however fast the client resends (load varies).
# Give-backs are not delayed: a late give-back whose id four other writes pushed out of the
# ring would mint tokens (a known limit, docs/reliability.md) and break the lower bound.
CHAOS_DELAY_P = 0.06  # for each length, of the writes no earlier fault took
CHAOS_DELAYS_S = tuple(POLICY.read_timeout + past for past in (0.05, 0.1, 0.15))
CHAOS_DELAYED = json.dumps(schema.limit_attr(schema.CONSUMED, LIMIT.name)).encode()


def limiter_for(
    proxy: FaultProxy,
    mode: FailureMode = FailureMode.FAIL_CLOSED,
    clock_ms: int = FROZEN_MS,
    reservations: Reservations | None = None,
    deadline: float | None = DEADLINE_S,
) -> RateLimiter:
    return RateLimiter(
        name=TABLE,
        endpoint_url=proxy.endpoint_url,
        stack_options=StackOptions(),
        failure_mode=mode,
        retry=POLICY,
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


async def test_lease_calls_fail_closed(proxy: FaultProxy, warm: RateLimiter) -> None:
    """adjust/consume/release during an outage raise RateLimiterUnavailable (FAIL_CLOSED) in
    bounded time, and the lease's books keep only what landed."""
    async with warm.acquire("k", RESOURCE, [LIMIT], {"tok": 2}) as lease:
        proxy.inject("error500")
        for call in (lease.adjust, lease.consume, lease.release):
            started = time.monotonic()
            with pytest.raises(RateLimiterUnavailable):
                await call(tok=1)
            assert time.monotonic() - started <= UNAVAILABLE_BOUND_S
        assert lease.consumed == {"tok": 2}
        proxy.clear()
        await lease.adjust(tok=1)
    assert (await stored(proxy))["net"] == 4000


@pytest.mark.parametrize("mode", ["direct", "reserved"])
async def test_chaos(proxy: FaultProxy, size: Size, figures: Figures, mode: str) -> None:
    """Concurrent acquire/adjust/rollback while a mix of random faults hits every call. The
    callers' books give an interval (certain outcomes, plus calls that raised and may or may not
    have landed, plus late copies of delayed writes that DynamoDB applied); the stored bucket
    must lie in it, and its tokens match its counters. The delays (CHAOS_DELAYS_S) are what a
    removed write-id condition is caught by: the late copy of a resent write then applies too.

    `reserved`: the limiter serves the clients from reserved blocks, small ones (at most 5
    tokens) held briefly (0.2 s) while the clients pause between calls, so that many blocks are
    reserved and given back at hold expiry during the run, under the faults. A block that could
    not be given back, or whose reserve landed while the acquire failed, stays consumed in the
    bucket: the upper bound grows by at most one block per such failure, never the lower one
    (that would be over-admission)."""
    failed_rollbacks: list[str] = []
    failed_give_backs: list[logging.LogRecord] = []
    reservations = (
        Reservations(max_share=0.005, hold_seconds=0.2, horizon_seconds=0.1)
        if mode == "reserved"
        else None
    )
    pause = 0.1 if reservations is not None else 0.0

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # A rollback that failed, or went on past its deadline (its fate unknown here;
            # the later report of its failure is the same rollback).
            message = record.getMessage()
            if message.startswith("rollback of") and "which went on" not in message:
                failed_rollbacks.append(message)
            if record.getMessage().startswith("reserved tokens not given back"):
                failed_give_backs.append(record)

    handler = Capture()
    logging.getLogger("zae_limiter").addHandler(handler)
    books = {"consumed": 0, "released": 0, "maybe_consumed": 0, "rolled": 0}
    outcomes: dict[str, int] = {}

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
                    books["consumed"] += amount
                    if action < 0.3:
                        try:
                            await lease.adjust(tok=2)
                        except RateLimiterUnavailable:
                            books["maybe_consumed"] += 2
                            books["rolled"] += lease.consumed["tok"]  # given back on exit
                            raise
                        books["consumed"] += 2
                    if action > 0.75:
                        books["rolled"] += lease.consumed["tok"]
                        raise RuntimeError("abort")
                outcomes["kept"] = outcomes.get("kept", 0) + 1
            except RateLimiterUnavailable:
                outcomes["unavailable"] = outcomes.get("unavailable", 0) + 1
                if not admitted:
                    books["maybe_consumed"] += amount  # the acquire's own write is unknown
            except RateLimitExceeded:
                outcomes["denied"] = outcomes.get("denied", 0) + 1
            except RuntimeError:
                outcomes["rolled_back"] = outcomes.get("rolled_back", 0) + 1

    try:
        async with limiter_for(proxy, reservations=reservations) as limiter:
            for kind, p in (("cut", 0.08), ("reset", 0.05), ("error500", 0.08), ("throttle", 0.1)):
                proxy.inject(kind, probability=p)
            proxy.inject("hang", probability=0.02)
            # A write held past the client's read timeout lands after the client gave up and
            # resent it: only the write-id condition keeps the late copy from applying too.
            for delay in CHAOS_DELAYS_S:
                proxy.inject(
                    "delay",
                    ops={"UpdateItem"},
                    probability=CHAOS_DELAY_P,
                    delay=delay,
                    match=CHAOS_DELAYED,
                )
            # More concurrent writers than the item's ring of write ids (w0..w3): a lost
            # response may be followed by so many writes that its outcome becomes unknown.
            await asyncio.gather(*(client(limiter, seed) for seed in range(CHAOS_CLIENTS)))
            proxy.clear()
        await asyncio.sleep(max(CHAOS_DELAYS_S) + 0.3)  # delayed writes still held land
    finally:
        logging.getLogger("zae_limiter").removeHandler(handler)

    # Rollbacks that failed were logged with the lease they could not give back.
    unsure_rollback = 0
    for message in failed_rollbacks:
        unsure_rollback += int(message.split("'tok': ")[1].split("}")[0])
    released_sure = books["rolled"] - unsure_rollback
    lo = (books["consumed"] - books["rolled"]) * 1000
    hi = (books["consumed"] + books["maybe_consumed"] - released_sure) * 1000
    if reservations is not None:
        # Blocks stuck in the bucket: a failed give-back (logged), or a reserve that landed for
        # an acquire that raised. Each holds at most max_share of the burst.
        block = int(LIMIT.burst_milli * reservations.max_share)
        hi += block * (len(failed_give_backs) + outcomes.get("unavailable", 0))
        figures.add(chaos_reserved_give_back_failures=len(failed_give_backs))
    after = await stored(proxy)
    figures.add(
        operations=sum(outcomes.values()),
        admitted=outcomes.get("kept", 0) + outcomes.get("rolled_back", 0),
        rolled_back=outcomes.get("rolled_back", 0),
        ledger_checks=1,
        chaos_uncertain_tokens=(hi - lo) // 1000,
    )
    if reservations is not None:
        assert limiter.reserved() == {}, "a closed limiter still holds reserved tokens"
    assert sum(proxy.stats.injected.values()) > 0
    assert outcomes.get("kept", 0) > 0
    # What DynamoDB applied, as the proxy saw it (its own answers, whatever the client got).
    landed = landed_writes(proxy)
    # The write-id condition: no write is applied while its id is among the item's recent ids.
    # (The ring before a write is its answer's w1..w3 and one older id the answer drops.)
    breaches = [w.write_id for w in landed if w.write_id in w.before]
    assert not breaches, f"applied while their id was in the ring: {breaches}"
    # A delayed write can still land twice when four other writes rotate its id out of the
    # ring between the resend and the late copy (a known limit: consumption twice, capacity
    # lost; give-backs are not delayed here, see CHAOS_DELAYED). Any other double is a bug.
    counts = Counter(w.write_id for w in landed)
    doubled = sorted(i for i, n in counts.items() if n > 1)
    late = [w for w in landed if w.late]
    late_ids = {w.write_id for w in late}
    rotated = [i for i in doubled if i in late_ids]
    figures.add(
        doubled_updates=len(doubled) - len(rotated),
        chaos_applied_writes=len(landed),
        chaos_late_writes_applied=len(late),
        chaos_doubled_after_ring_rotation=len(rotated),
    )
    assert doubled == rotated, f"applied twice, no late copy among them: {doubled}"
    # A late copy may land after its caller moved on (it resent and was refused, then decided
    # again; or the ring rotated): consumption the callers cannot know of, never a give-back.
    assert all(w.rl == 0 for w in late)
    hi += sum(w.cn for w in late)
    assert lo <= after["net"] <= hi, f"bucket {after['net']} outside the books [{lo}, {hi}]"
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
        landed.append(Landed(*write, late=seen.fault == "delay", before=tuple(ring[1:])))
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
    from zae_limiter.storage import RepositoryUnavailable, StorageError

    async with warm.acquire("k", RESOURCE, [LIMIT], {"tok": 2}) as lease:
        proxy.inject("throttle", ops={"UpdateItem"})
        with pytest.raises(RateLimiterUnavailable) as raised:
            await getattr(lease, operation)(tok=1)
        proxy.clear()
    assert type(raised.value) is RateLimiterUnavailable
    assert not isinstance(raised.value, (RepositoryUnavailable, StorageError))
    figures.add(operations=1)
