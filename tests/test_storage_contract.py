"""The storage contract: `MemoryStorage` behaves as DynamoDB does (moto's server on loopback).

Each case runs the same script against both stores and compares what the script observed and
what each store holds afterwards, normalized only where the two must differ (write ids and
timestamps are random or the clock's). Each script also asserts what it must see, so that two
stores wrong alike would still fail. The bucket case drives the real engine (decisions,
conditional writes, retries, give-backs, conversions of another definition and of the 1.x
layout) with one seeded sequence and one frozen clock on both.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from zae_limiter import (
    AuditEvent,
    Entity,
    EntityExistsError,
    EntityNotFoundError,
    InfrastructureNotFoundError,
    Limit,
    MemoryStorage,
    RateLimitExceeded,
    schema,
)
from zae_limiter.audit import verify_trail
from zae_limiter.engine.engine import Engine, Target
from zae_limiter.storage.dynamodb.repository import Repository
from zae_limiter.storage.protocol import Item, Storage, StorageError
from zae_limiter.version import write_initial_record

pytestmark = pytest.mark.integration

TABLE = "ZAEL-contract"
T0 = 1_800_000_000_000
Script = Callable[[Storage], Awaitable[Any]]


@pytest.fixture
async def moto(endpoint_url: str) -> AsyncIterator[Repository]:
    repo = Repository(TABLE, None, endpoint_url)
    await repo.create_table()
    await write_initial_record(repo, updated_by="contract")
    try:
        yield repo
    finally:
        await repo.close()


async def both(moto: Repository, script: Script) -> Any:
    """Run `script` on a fresh `MemoryStorage` and on moto; they must observe the same."""
    memory = await script(MemoryStorage(TABLE))
    dynamodb = await script(moto)
    assert memory == dynamodb
    return memory


def plain(item: Item) -> dict[str, Any]:
    """An item without what is random or timed by the store: write ids, write and update
    times, creation stamps."""
    drop = {*schema.WRITE_ID_SLOTS, schema.WRITE_TIME, "updated_at", "updated_by", "created_at",
            "create_id"}
    return {k: v for k, v in item.items() if k not in drop}


async def table(store: Storage) -> list[dict[str, Any]]:
    return sorted(
        (plain(i) for i in await store.export_items()),
        key=lambda i: (i[schema.PK]["S"], i[schema.SK]["S"]),
    )


# -- buckets: the engine on both -------------------------------------------------------------

LIMITS = [Limit.per_minute("rpm", 10), Limit.custom("tpm", 1000, 600, 60, burst=1200)]
# Same names, another definition: the stored states are converted (and conditioned) on write.
OTHER = [Limit.per_minute("rpm", 20), Limit.per_minute("tpm", 500)]


async def engine_script(store: Storage) -> Any:
    clock = [T0]
    # Two clients, each with its own cache: whenever one wrote, the other's view is stale, so
    # its writes meet the conditions (refused, re-decided on the item returned).
    engines = [Engine(store, clock=lambda: clock[0]) for _ in range(2)]
    rng = random.Random(20)
    seen: list[Any] = []
    limits = LIMITS
    # A 1.x-layout state for "old", as release 1.0 wrote it: 4 tokens at T0 - 30 s.
    await store.replace_items(
        [
            {
                schema.PK: {"S": schema.entity_pk("old")},
                schema.SK: {"S": schema.bucket_sk("api")},
                schema.limit_attr(schema.TOKENS, "rpm"): {"N": "4000"},
                schema.limit_attr(schema.LAST_REFILL, "rpm"): {"N": str(T0 - 30_000)},
                schema.limit_attr(schema.CONSUMED, "rpm"): {"N": "6000"},
            },
            *[i for i in await store.export_items() if not schema.is_bucket_key(
                i[schema.PK]["S"], i[schema.SK]["S"])],
        ]
    )
    for step in range(80):
        if step == 50:
            limits = OTHER
        clock[0] += rng.choice((0, 0, 7, 250, 3_000, 20_000))
        entity = rng.choice(("a", "b", "old"))
        cascade = entity != "old" and rng.random() < 0.4
        targets = [Target(entity, "api", list(limits))]
        if cascade:
            targets.append(Target("proj", "api", list(limits)))
        engine = rng.choice(engines)
        await engine.load(targets)
        kind = rng.choice(("commit", "commit", "force", "give"))
        amounts = {"rpm": rng.randint(1, 4), "tpm": rng.randint(1, 300)}
        try:
            if kind == "commit":
                await engine.commit(targets, amounts)
            elif kind == "force":
                await engine.force(targets, amounts)
            else:
                await engine.force(targets, {k: -v for k, v in amounts.items()})
            seen.append((step, kind, "ok"))
        except RateLimitExceeded as exc:
            seen.append((step, kind, "denied", exc.retry_after_seconds))
    buckets = {
        (b.entity_id, b.resource): (
            len(set(b.write_ids)),  # the ring holds the last four writes' ids
            {
                name: (s.full_at, s.consumed_milli, s.released_milli, s.definition, s.legacy)
                for name, s in sorted(b.limits.items())
            },
        )
        for b in await store.all_buckets()
    }
    assert any(s[2] == "denied" for s in seen) and any(s[2] == "ok" for s in seen)
    assert buckets[("old", "api")][1]["rpm"][4] is None, "the 1.x state was not converted"
    assert store.ledger.conflicts > 0, "no write met a stale view"
    return seen, buckets, store.ledger.conflicts, await table(store)


async def test_the_engine_decides_and_writes_alike(moto: Repository) -> None:
    seen, buckets, _, _ = await both(moto, engine_script)
    assert len(seen) == 80 and len(buckets) == 4
    assert {ring for ring, _ in buckets.values()} == {4}


# Quotas: a cron window (hourly, in a zone off UTC by a half hour), a session window and a token
# bucket in one item, written by two clients with stale views across many window changes.
QUOTAS = [
    Limit.quota("hourly", 20, cron="0 * * * *", tz="Asia/Kolkata"),
    Limit.quota("session", 15, reset_after=timedelta(minutes=30)),
    Limit.per_minute("rpm", 30),
]


async def quota_script(store: Storage) -> Any:
    clock = [T0]
    engines = [Engine(store, clock=lambda: clock[0]) for _ in range(2)]
    # Each client keeps its targets (their quota books: give-backs only in the window taken).
    targets = {(e, n): Target(e, "api", list(QUOTAS)) for e in ("a", "b") for n in range(2)}
    rng = random.Random(23)
    seen: list[Any] = []
    for step in range(90):
        clock[0] += rng.choice((0, 0, 1_000, 60_000, 600_000, 1_900_000))
        entity, n = rng.choice(("a", "b")), rng.randrange(2)
        target = targets[(entity, n)]
        await engines[n].load([target])
        kind = rng.choice(("commit", "commit", "commit", "force", "give"))
        amounts = {
            "hourly": rng.randint(1, 6), "session": rng.randint(1, 5), "rpm": rng.randint(1, 5)
        }
        try:
            if kind == "commit":
                await engines[n].commit([target], amounts)
            elif kind == "force":
                await engines[n].force([target], amounts)
            else:
                await engines[n].force([target], {k: -v for k, v in amounts.items()})
            seen.append((step, kind, "ok"))
        except RateLimitExceeded as exc:
            seen.append((step, kind, "denied", sorted(v.limit_name for v in exc.violations),
                         exc.retry_after_seconds))
    buckets = {
        b.entity_id: {
            name: (s.full_at, s.consumed_milli, s.released_milli, s.definition, s.window)
            for name, s in sorted(b.limits.items())
        }
        for b in await store.all_buckets()
    }
    quota_denials = [s for s in seen if s[2] == "denied" and {"hourly", "session"} & {*s[3]}]
    assert quota_denials and any(s[2] == "ok" for s in seen)
    # A quota's wait is to its next window, never longer than the window.
    assert all(0 < s[4] <= 3600 for s in quota_denials)
    assert store.ledger.conflicts > 0, "no write met a stale view"
    return seen, buckets, store.ledger.conflicts, await table(store)


async def test_quotas_decide_and_write_alike(moto: Repository) -> None:
    seen, buckets, _, items = await both(moto, quota_script)
    assert len(seen) == 90 and set(buckets) == {"a", "b"}
    windows = {name: state[4] for b in buckets.values() for name, state in b.items()}
    assert windows["rpm"] is None and windows["hourly"] is not None
    assert all(schema.limit_attr(schema.QUOTA_WINDOW, "session") in i for i in items
               if schema.is_bucket_key(i[schema.PK]["S"], i[schema.SK]["S"]))


async def late_give_back_script(store: Storage) -> Any:
    """A client whose clock is still in January rolls back a take after a faster client opened
    February's window: the give-back is refused by the window the store holds (the slower
    client's view still says January), so February's count is not lowered: nothing minted."""
    from zae_limiter import RateLimiter

    # February's count (9) covers the give-back (6): only the window tells them apart.
    monthly = Limit.quota("monthly", 20, cron="0 0 1 * *", tz="UTC")
    new_month = 1_801_440_000_000  # 2027-02-01T00:00:00Z
    slow = RateLimiter(repository=store, clock=lambda: new_month - 1_000)
    fast = RateLimiter(repository=store, clock=lambda: new_month + 1_000)
    try:
        with pytest.raises(RuntimeError):
            async with slow.acquire("e", "r", [monthly], {"monthly": 6}):
                async with fast.acquire("e", "r", [monthly], {"monthly": 9}):
                    pass
                raise RuntimeError("the call failed: its 6 go back")
        left = await fast.available("e", "r", [monthly])
    finally:
        await slow.close()
        await fast.close()
    state = await store.get_bucket("e", "r")
    assert state is not None
    return left, state.limits["monthly"].full_at, await table(store)


async def test_a_give_back_never_lands_in_another_window_alike(moto: Repository) -> None:
    left, used, _ = await both(moto, late_give_back_script)
    assert left == {"monthly": 11} and used == 9_000


async def conditions_script(store: Storage) -> Any:
    """Writes whose conditions fail: each store answers `ConditionFailed` with the item as it
    is, and changes nothing."""
    engine = Engine(store, clock=lambda: T0)
    target = [Target("k", "api", list(LIMITS))]
    await engine.load(target)
    await engine.commit(target, {"rpm": 10})  # drains rpm
    stale = Engine(store, clock=lambda: T0)  # a second client whose view is empty (stale)
    other = [Target("k", "api", list(LIMITS))]
    other[0].state = None  # it believes no bucket exists: a create, refused
    denied: list[Any] = []
    try:
        await stale.commit(other, {"rpm": 1})
    except RateLimitExceeded as exc:  # refused, re-read, then denied on the fresh state
        denied.append(exc.retry_after_seconds)
    assert denied == [6.0]

    # A view of a draining bucket, made full again by another client's give-back: the stale
    # writer's relative write must be refused ("not full at my now" no longer holds).
    first, second = Engine(store, clock=lambda: T0), Engine(store, clock=lambda: T0)
    a, b = [Target("f", "api", list(LIMITS))], [Target("f", "api", list(LIMITS))]
    await first.load(a)
    await first.commit(a, {"rpm": 5})
    await second.load(b)  # sees 5 of 10 left
    await first.force(a, {"rpm": -5})  # full again
    conflicts = store.ledger.conflicts
    await second.commit(b, {"rpm": 2})
    refused_full = store.ledger.conflicts - conflicts

    # A view of a 1.x state that a 1.x client changed meanwhile: the conversion is refused.
    legacy_item: Item = {
        schema.PK: {"S": schema.entity_pk("old")},
        schema.SK: {"S": schema.bucket_sk("api")},
        schema.limit_attr(schema.TOKENS, "rpm"): {"N": "4000"},
        schema.limit_attr(schema.LAST_REFILL, "rpm"): {"N": str(T0)},
    }
    key = (legacy_item[schema.PK]["S"], legacy_item[schema.SK]["S"])
    rest = [i for i in await store.export_items() if (i[schema.PK]["S"], i[schema.SK]["S"]) != key]
    await store.replace_items([legacy_item, *rest])
    c = [Target("old", "api", [LIMITS[0]])]
    await second.load(c)  # sees 4 tokens
    changed = dict(legacy_item) | {schema.limit_attr(schema.TOKENS, "rpm"): {"N": "1000"}}
    await store.replace_items([changed, *rest])  # a 1.x client took 3
    conflicts = store.ledger.conflicts
    with pytest.raises(RateLimitExceeded):
        await second.commit(c, {"rpm": 2})  # 1 left: denied, not converted from 4
    refused_legacy = store.ledger.conflicts - conflicts
    assert refused_full == 1 and refused_legacy == 1
    return denied, refused_full, refused_legacy, await table(store)


async def test_refused_writes_change_nothing_alike(moto: Repository) -> None:
    await both(moto, conditions_script)


SOFT = [Limit.per_minute("rpm", 10, soft=True), Limit.custom("tpm", 1000, 600, 60, burst=1200)]


async def soft_script(store: Storage) -> Any:
    """A soft limit beside a hard one, written by two clients whose views go stale: the soft
    part of each write is forced (no "still holds" bound) in the same conditional write as the
    checked hard part; a refused write is decided again, a denial writes neither."""
    clock = [T0]
    engines = [Engine(store, clock=lambda: clock[0]) for _ in range(2)]
    excesses: list[Any] = []
    for engine in engines:
        engine.on_soft_excess = lambda *seen: excesses.append(seen)
    rng = random.Random(23)
    seen: list[Any] = []
    admitted = {"rpm": 0, "tpm": 0}
    for step in range(60):
        clock[0] += rng.choice((0, 0, 7, 250, 3_000))
        cascade = rng.random() < 0.3
        targets = [Target("a", "api", list(SOFT))]
        if cascade:
            targets.append(Target("proj", "api", list(SOFT)))
        engine = rng.choice(engines)
        await engine.load(targets)
        amounts = {"rpm": rng.randint(1, 4), "tpm": rng.randint(1, 200)}
        try:
            await engine.commit(targets, amounts)
        except RateLimitExceeded as exc:
            assert {v.limit_name for v in exc.violations} == {"tpm"}
            seen.append((step, "denied", exc.retry_after_seconds))
        else:
            seen.append((step, "ok"))
            admitted = {k: admitted[k] + v for k, v in amounts.items()}
    bucket = await store.get_bucket("a", "api")
    assert bucket is not None
    # Exactly what was admitted, the soft limit far past its 10 a minute.
    assert {n: s.consumed_milli for n, s in bucket.limits.items()} == {
        n: 1000 * v for n, v in admitted.items()
    }
    assert admitted["rpm"] > 30
    assert any(s[1] == "denied" for s in seen) and excesses
    assert store.ledger.conflicts > 0, "no write met a stale view"
    full_at = {n: s.full_at for n, s in bucket.limits.items()}
    return seen, excesses, full_at, store.ledger.conflicts, await table(store)


async def test_soft_limits_are_written_alike(moto: Repository) -> None:
    await both(moto, soft_script)


SOFT_PLANS = [
    Limit.quota("session", 30, reset_after=timedelta(minutes=10), soft=True),
    Limit.per_minute("rpm", 20),
]


async def soft_plans_script(store: Storage) -> Any:
    """A soft quota beside a hard bucket, by two clients whose views go stale, across session
    windows (with give-backs), then soft cap takes past their max beside a hard cap: the same
    decisions, conflicts and items on both stores."""
    from zae_limiter.storage.protocol import SlotConflict, SlotTake

    clock = [T0]
    engines = [Engine(store, clock=lambda: clock[0]) for _ in range(2)]
    excesses: list[Any] = []
    for engine in engines:
        engine.on_soft_excess = lambda *seen: excesses.append(seen)
    rng = random.Random(29)
    seen: list[Any] = []
    admitted: list[tuple[int, int]] = []  # (when, session units) of each admitted take
    for step in range(60):
        clock[0] += rng.choice((0, 0, 7, 250, 3_000, 240_000))
        engine = rng.choice(engines)
        targets = [Target("a", "api", list(SOFT_PLANS))]
        await engine.load(targets)
        amounts = {"session": rng.randint(1, 9), "rpm": rng.randint(1, 3)}
        try:
            await engine.commit(targets, amounts)
        except RateLimitExceeded as exc:
            assert {v.limit_name for v in exc.violations} == {"rpm"}
            seen.append((step, "denied"))
            continue
        seen.append((step, "ok"))
        admitted.append((clock[0], amounts["session"]))
        if rng.random() < 0.2:  # a give-back, into the window it was taken in
            await engine.force(targets, {"session": -1})
            admitted.append((clock[0], -1))
    bucket = await store.get_bucket("a", "api")
    assert bucket is not None
    state = bucket.limits["session"]
    assert state.window is not None
    # Exactly what was admitted in the stored window, the quota far past its 30.
    used = sum(n for when, n in admitted if when >= state.window)
    assert state.full_at == 1000 * used and used > 30
    assert any(s[1] == "denied" for s in seen) and excesses
    assert store.ledger.conflicts > 0, "no write met a stale view"

    x = T0 + 1_000
    slots: list[Any] = []

    async def take(lease: str, *takes: SlotTake) -> None:
        try:
            item = await store.take_slots("s", "api", lease, list(takes))  # type: ignore[attr-defined]
            slots.append(("took", lease, item.held))
        except SlotConflict as exc:
            slots.append(("refused", lease, None if exc.current is None else exc.current.held))

    for lease in ("a", "b", "c"):  # 3 of 2: a soft cap is taken past its max
        await take(lease, SlotTake("streams", 1, 2, x, soft=True))
    await take("a", SlotTake("streams", 1, 2, x, soft=True))  # a's entry exists: never twice
    await take("d", SlotTake("streams", 1, 2, x, (("a", 1, x),), soft=True))  # reaps a
    # A full hard cap in the same write: refused, the soft cap's slot not taken either.
    await take("e", SlotTake("gpu", 1, 1, x))
    await take("f", SlotTake("streams", 1, 2, x, soft=True), SlotTake("gpu", 1, 1, x))
    released = [
        await store.release_slots("s", "api", lease, {"streams": 1})  # type: ignore[attr-defined]
        for lease in ("b", "b", "c")
    ]
    item = await store.get_slots("s", "api")  # type: ignore[attr-defined]
    assert item is not None
    assert [s[0] for s in slots] == ["took"] * 3 + ["refused", "took", "took", "refused"]
    assert slots[2] == ("took", "c", {"streams": 3}) and released == [True, False, True]
    assert item.held == {"streams": 1, "gpu": 1}
    assert item.holders == {"streams": {"d": (1, x)}, "gpu": {"e": (1, x)}}
    conflicts = store.ledger.conflicts
    return seen, excesses, state.full_at, conflicts, slots, released, await table(store)


async def test_soft_quotas_and_soft_caps_are_written_alike(moto: Repository) -> None:
    await both(moto, soft_plans_script)


# -- entities, stored limits, audit, version, admin -------------------------------------------


async def entities_script(store: Storage) -> Any:
    seen: list[Any] = []
    await store.put_entity(Entity(id="proj", name="Project", metadata={"tier": "gold"}))
    await store.put_entity(Entity(id="k1", parent_id="proj"))
    await store.put_entity(Entity(id="k2", parent_id="proj", name="Two"))
    try:
        await store.put_entity(Entity(id="k1"))
    except EntityExistsError:
        seen.append("exists")
    proj = await store.get_entity("proj")
    assert proj is not None and proj.created_at
    seen.append(dataclasses.replace(proj, created_at=None))
    seen.append(await store.get_entity("nobody"))
    seen.append(sorted(e.id for e in await store.get_children("proj")))
    await store.set_limits("k1", "chat", [Limit.per_minute("rpm", 5), Limit.per_hour("tpm", 9)])
    await store.set_limits("k1", "chat", [Limit.per_minute("rpm", 6)])  # replaces: tpm goes
    await store.set_limits("k1", "embed", [Limit.per_day("rpd", 100)])
    plans = [
        Limit.per_minute("tpm", 1000, soft=True),
        Limit.quota("monthly", 10_000, cron="0 0 1 * *", tz="Europe/Paris"),
        Limit.quota("session", 50, reset_after=timedelta(hours=5), soft=True),
        Limit.concurrency("streams", 5),
    ]
    await store.set_limits("k1", "plans", plans)
    assert await store.get_limits("k1", "plans") == sorted(plans, key=lambda lm: lm.name)
    seen.append(await store.get_limits("k1", "plans"))
    seen.append(await store.get_limits("k1", "chat"))
    seen.append(await store.get_all_limits("k1"))
    stored = sorted(await store.list_stored_limits(), key=lambda s: (s.entity_id, s.resource))
    seen.append(stored)
    seen.append(
        await store.set_stored_limit_definition("k1", "chat", Limit.per_minute("rpm", 6), "x")
    )
    seen.append(
        await store.set_stored_limit_definition("k1", "chat", Limit.per_minute("rpm", 7), "y")
    )
    seen.append(await store.delete_limits("k1", "embed"))
    seen.append(await store.delete_entity("k2"))
    try:
        await store.delete_entity("k2")
    except EntityNotFoundError:
        seen.append("not found")
    assert seen[0] == "exists" and seen[-1] == "not found"
    return seen, await table(store)


async def test_entities_and_stored_limits_alike(moto: Repository) -> None:
    await both(moto, entities_script)


async def defaults_script(store: Storage) -> Any:
    """Resource and system default limits: their own partition, replaced whole, apart from
    every entity's stored limits."""
    system = schema.DEFAULT_RESOURCE
    await store.set_defaults(system, [Limit.per_minute("rpm", 10), Limit.per_minute("tpm", 99)])
    await store.set_defaults(system, [Limit.per_minute("rpm", 11)])  # replaces: tpm goes
    await store.set_defaults("chat", [Limit.per_minute("rpm", 5), Limit.quota(
        "monthly", 1000, cron="0 0 1 * *", tz="Europe/Paris")])
    await store.set_defaults("embed", [Limit.per_day("rpd", 7), Limit.per_minute(
        "tpm", 50, soft=True)])
    await store.set_limits("k1", "chat", [Limit.per_minute("rpm", 1)])
    seen: list[Any] = [
        await store.get_defaults(system),
        await store.get_defaults("chat"),
        await store.get_defaults("nothing"),
        await store.all_defaults(),
        # An entity's stored limits are not defaults, and defaults are no entity's.
        [(s.entity_id, s.resource) for s in await store.list_stored_limits()],
        await store.get_all_limits("k1"),
    ]
    seen.append(await store.delete_defaults("embed"))
    seen.append(await store.delete_defaults("embed"))
    seen.append(sorted(await store.all_defaults()))
    assert seen[0] == [Limit.per_minute("rpm", 11)] and seen[2] == []
    assert seen[4] == [("k1", "chat")] and seen[6:8] == [2, 0]
    assert seen[8] == sorted([system, "chat"])
    return seen, await table(store)


async def test_default_limits_alike(moto: Repository) -> None:
    await both(moto, defaults_script)


async def audit_script(store: Storage) -> Any:
    ids = [f"01J{n:023d}" for n in range(5)]
    for n, event_id in enumerate(ids):
        event = AuditEvent(
            event_id=event_id,
            timestamp=f"2026-12-06T00:00:0{n}.000Z",
            action="limits_set",
            entity_id="k1",
            principal="ops",
            resource="chat",
            details={"n": n, "limits": ["rpm:5/minute"]},
        )
        await store.put_audit_event(event)
        await store.put_audit_event(event)  # a resend: once
    clash = AuditEvent(ids[0], "2026-12-06T09:00:00.000Z", "entity_deleted", "k1")
    seen: list[Any] = []
    try:
        await store.put_audit_event(clash)
    except StorageError as exc:
        seen.append(exc.code)
    seen.append([e.event_id for e in await store.get_audit_events("k1")])
    seen.append([e.event_id for e in await store.get_audit_events("k1", 2, ids[3])])
    after = await store.get_audit_events("k1", 2, ids[1], oldest_first=True)
    seen.append([e.event_id for e in after])
    seen.append((await store.get_audit_events("k1", 1, oldest_first=True))[0])
    report = await verify_trail(store, "k1")
    seen.append((report.chained, report.problems))
    assert seen[0] == "AuditEventExists" and seen[2] == [ids[2], ids[1]]
    assert seen[-1] == (5, ())
    return seen, await table(store)


async def test_audit_events_alike(moto: Repository) -> None:
    await both(moto, audit_script)


async def admin_script(store: Storage) -> Any:
    seen: list[Any] = []
    record = await store.get_version_record()
    assert record is not None
    seen.append({k: v for k, v in record.items() if k not in ("updated_at", "updated_by")})
    seen.append(await store.create_version_record({"schema_version": "9"}))
    await store.set_version_record(lambda_version="1.1.0", updated_by="test", note="hello")
    record = await store.get_version_record() or {}
    seen.append({k: v for k, v in record.items() if k != "updated_at"})
    engine = Engine(store, clock=lambda: T0)
    target = [Target("k", "api", list(LIMITS))]
    await engine.load(target)
    await engine.commit(target, {"rpm": 3, "tpm": 5})
    updates = store.ledger.calls["UpdateItem"]
    seen.append(await store.extend_bucket_expiry("k", "api", 1))  # earlier: no change
    seen.append(await store.extend_bucket_expiry("k", "api", 4_000_000_000))
    seen.append(await store.extend_bucket_expiry("nobody", "api", 4_000_000_000))
    # Each is one UpdateItem in the ledger, the refused ones too (DynamoDB bills them).
    seen.append(store.ledger.calls["UpdateItem"] - updates)
    bucket = await store.get_bucket("k", "api")
    assert bucket is not None
    full_at = bucket.limits["rpm"].full_at
    assert full_at is not None
    seen.append(await store.restore_legacy_state("k", "api", "rpm", full_at + 1, (1, 2)))
    seen.append(await store.restore_legacy_state("k", "api", "rpm", full_at, (7000, T0)))
    seen.append(await store.reset_bucket("k", "api", ["tpm"]))
    seen.append(await store.reset_bucket("nobody", "api"))
    seen.append([plain(i) for i in await store.bucket_items("k")])
    seen.append([b.resource for b in await store.resource_buckets("api")])
    exported = await store.export_items()
    await store.put_entity(Entity(id="later"))
    seen.append(await store.replace_items(exported))  # the entity made since goes
    seen.append(await store.get_entity("later"))
    assert seen[1] is False and seen[4] is True and seen[6] == 3 and seen[-1] is None
    return seen, await table(store)


async def test_version_record_and_operator_views_alike(moto: Repository) -> None:
    await both(moto, admin_script)


async def usage_script(store: Storage) -> Any:
    snapshots = [
        (resource, window, start)
        for resource in ("chat", "embed")
        for window, start in (
            ("hourly", "2026-12-05T22:00Z"),
            ("hourly", "2026-12-05T23:00Z"),
            ("daily", "2026-12-05"),
        )
    ]
    items: list[Item] = [
        {
            schema.PK: {"S": schema.entity_pk("k1")},
            schema.SK: {"S": schema.usage_sk(resource, window, start)},
            "entity_id": {"S": "k1"},
            "resource": {"S": resource},
            "window": {"S": window},
            "window_start": {"S": start},
            "counters": {"M": {"rpm": {"N": "3"}, "tpm": {"N": "120.5"}}},
        }
        for resource, window, start in snapshots
    ]
    await store.replace_items([*items, *await store.export_items()])
    seen: list[Any] = [
        await store.get_usage_snapshots("k1"),
        await store.get_usage_snapshots("k1", "chat"),
        await store.get_usage_snapshots("k1", window="hourly", start="2026-12-05T23:30:00Z"),
        await store.get_usage_snapshots(
            "k1", "embed", "hourly", "2026-12-05T22:00:00Z", "2026-12-05T22:59:00Z"
        ),
        await store.get_usage_snapshots("k1", end="2026-12-05T10:00:00Z"),
    ]
    assert [len(s) for s in seen] == [6, 3, 2, 1, 2]
    return seen


async def test_usage_snapshots_alike(moto: Repository) -> None:
    await both(moto, usage_script)


async def test_a_deleted_table_is_missing_on_both(moto: Repository) -> None:
    async def script(store: Storage) -> Any:
        assert await store.table_exists()
        assert await store.create_table() is False
        assert await store.delete_table() is True
        with pytest.raises(InfrastructureNotFoundError):
            await store.get_entity("k")
        return await store.table_exists(), await store.delete_table()

    assert await both(moto, script) == (False, False)


# -- concurrency caps: the slot item's conditions on both --------------------------------------


async def test_concurrency_cap_slots_alike(moto: Repository) -> None:
    """The same cap script (takes, refusals, a reap, releases and renewals, two caps at once)
    on both stores: the same outcomes, the same counts, the same items. The lease ids are
    fixed here, so the items compare exactly."""
    from zae_limiter.storage.protocol import SlotConflict, SlotTake

    x = T0 + 1_000

    async def script(store: Storage) -> Any:
        seen: list[Any] = []

        async def take(lease: str, *takes: SlotTake) -> None:
            try:
                item = await store.take_slots("e", "r", lease, list(takes))  # type: ignore[attr-defined]
                seen.append(("took", lease, item.held))
            except SlotConflict as exc:
                current = exc.current
                seen.append(("refused", lease, None if current is None else current.held))

        await take("a", SlotTake("streams", 2, 3, x))
        await take("b", SlotTake("streams", 2, 3, x))  # 2 + 2 > 3
        await take("b", SlotTake("streams", 1, 3, x))
        await take("a", SlotTake("streams", 1, 3, x))  # a's entry exists: never twice
        await take("c", SlotTake("streams", 1, 3, x, (("a", 2, x + 1),)))  # not a's entry
        await take("c", SlotTake("streams", 1, 3, x, (("a", 2, x),)))  # reaps a
        for lease in ("a", "b", "b"):
            released = await store.release_slots("e", "r", lease, {"streams": 2 if lease == "a" else 1})  # type: ignore[attr-defined]  # noqa: E501
            seen.append(("released", lease, released))
        seen.append(("renewed", await store.renew_slots("e", "r", "c", {"streams": (1, x + 5)})))  # type: ignore[attr-defined]
        seen.append(("renewed", await store.renew_slots("e", "r", "a", {"streams": (2, x + 5)})))  # type: ignore[attr-defined]
        # Two caps in one write: the second refuses, so the first is not taken either.
        await take("d", SlotTake("streams", 1, 3, x), SlotTake("gpu", 2, 2, x))
        await take("e", SlotTake("streams", 1, 3, x), SlotTake("gpu", 1, 2, x))
        item = await store.get_slots("e", "r")  # type: ignore[attr-defined]
        assert item is not None
        seen.append(("item", item.held, item.holders))
        assert seen[1][0] == "refused" and seen[3][0] == "refused" and seen[4][0] == "refused"
        assert seen[5] == ("took", "c", {"streams": 2})
        assert item.held == {"streams": 2, "gpu": 2}
        assert item.holders == {"streams": {"c": (1, x + 5), "d": (1, x)}, "gpu": {"d": (2, x)}}
        return seen, await table(store)

    await both(moto, script)


# -- several resources in one acquire: the limiter on both -------------------------------------

ALSO_LIMITS = [Limit.per_minute("rpm", 20), Limit.per_minute("tpm", 1000)]


async def also_script(store: Storage) -> Any:
    """Acquires over two resources (`also=`), with and without cascade, by two limiters whose
    views go stale, with adjusts over both resources, rollbacks and denials: the same
    outcomes and items on both stores, and every item's net consumption is what the leases
    say they hold."""
    from zae_limiter import RateLimiter

    clock = [T0]
    await store.put_entity(Entity(id="proj"))  # directly: the limiter's would audit them
    await store.put_entity(Entity(id="k", parent_id="proj"))
    limiters = [
        RateLimiter(
            name=TABLE, repository=store, clock=lambda: clock[0], version_check="skip"
        )
        for _ in range(2)
    ]
    rng = random.Random(31)
    seen: list[Any] = []
    books: dict[tuple[str, str], int] = {}  # net tpm tokens per (entity, resource)
    for step in range(40):
        clock[0] += rng.choice((0, 0, 7, 250, 3_000))
        limiter = rng.choice(limiters)
        cascade = rng.random() < 0.5
        own, other = rng.randint(1, 300), rng.randint(1, 300)
        rollback = rng.random() < 0.2
        try:
            async with limiter.acquire(
                "k", "m1", ALSO_LIMITS, {"rpm": 1, "tpm": own}, cascade=cascade,
                also={"all": {"tpm": other}},
            ) as lease:
                if rng.random() < 0.4:
                    await lease.adjust(tpm=-(own // 2), also={"all": {"tpm": 25}})
                if rollback:
                    raise LookupError("the block failed: everything goes back")
        except RateLimitExceeded as exc:
            denied = sorted((v.entity_id, v.resource) for v in exc.violations)
            seen.append((step, "denied", denied))
            continue
        except LookupError:
            seen.append((step, "rolled back"))
            continue
        seen.append((step, "ok", lease.consumed, lease.also_consumed))
        for entity in ("k", "proj") if cascade else ("k",):
            books[(entity, "m1")] = books.get((entity, "m1"), 0) + lease.consumed["tpm"]
            held = lease.also_consumed["all"]["tpm"]
            books[(entity, "all")] = books.get((entity, "all"), 0) + held
    net = {
        (b.entity_id, b.resource): b.limits["tpm"].consumed_milli - b.limits["tpm"].released_milli
        for b in await store.all_buckets()
    }
    assert net == {key: 1000 * n for key, n in books.items()}
    kinds = {s[1] for s in seen}
    assert kinds == {"ok", "denied", "rolled back"}, kinds
    assert any(("k", "all") in s[2] or ("proj", "all") in s[2] for s in seen if s[1] == "denied")
    assert store.ledger.conflicts > 0, "no write met a stale view"
    return seen, net, store.ledger.conflicts, await table(store)


async def test_several_resources_in_one_acquire_alike(moto: Repository) -> None:
    seen, net, _, _ = await both(moto, also_script)
    assert len(seen) == 40 and len(net) == 4

# -- kill switches ---------------------------------------------------------------------------


async def switches_script(store: Storage) -> Any:
    from zae_limiter.storage.protocol import Switch, SwitchStorage

    assert isinstance(store, SwitchStorage)
    seen: list[Any] = [await store.get_switches()]
    at = "2027-01-01T00:00:00.000Z"
    seen.append(await store.put_switch(Switch("resource", "openai/gpt-4o", "disabled", "ops", at)))
    seen.append(await store.put_switch(Switch("entity", "k:1@x", "bypass", None, at)))
    # Replacing a state reports the one it replaced.
    seen.append(await store.put_switch(Switch("resource", "openai/gpt-4o", "bypass", "ops", at)))
    switches = sorted(await store.get_switches(), key=lambda s: (s.kind, s.name))
    assert switches == [
        Switch("entity", "k:1@x", "bypass", None, at),
        Switch("resource", "openai/gpt-4o", "bypass", "ops", at),
    ]
    seen.append(switches)
    seen.append(await store.delete_switch("entity", "k:1@x"))
    seen.append(await store.delete_switch("entity", "k:1@x"))  # already clear
    seen.append(await table(store))
    return seen


async def test_kill_switches_are_stored_alike(moto: Repository) -> None:
    seen = await both(moto, switches_script)
    assert seen[1:4] == [None, None, "disabled"]
    assert seen[5:7] == ["bypass", None]
    # One item in the switch partition, keyed as schema.py says.
    keys = [(i[schema.PK]["S"], i[schema.SK]["S"]) for i in seen[7]]
    assert (schema.SWITCH_PK, schema.switch_sk("resource", "openai/gpt-4o")) in keys
    assert not any(pk == schema.SWITCH_PK and "ENTITY" in sk for pk, sk in keys)
