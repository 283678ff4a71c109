"""RateLimiter: semantics, cascade, stored limits, failure modes. Logic on `MemoryStorage`,
the sync twin's too (its DynamoDB client: tests/test_compat.py, tests/test_version.py); an
outage on an unreachable endpoint, a missing table on moto's DynamoDB server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from zae_limiter import (
    EntityExistsError,
    EntityNotFoundError,
    FailureMode,
    InfrastructureNotFoundError,
    Limit,
    MemoryStorage,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    SyncRateLimiter,
    ValidationError,
)
from zae_limiter.limiter import MISSING_ENTITY_TTL
from zae_limiter.ops.local import free_port
from zae_limiter.storage.dynamodb.client import RetryPolicy
from zae_limiter.storage.protocol import Item

T0 = 1_800_000_000_000  # a fixed instant, so refill is exact


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryStorage:
    """The table of a test's limiters: logic runs on memory (the storage contract shows it
    behaves as DynamoDB does); what needs DynamoDB itself (an outage, a missing table) builds
    its own limiter."""
    return MemoryStorage("ZAEL-test")


@pytest.fixture
async def limiter(store: MemoryStorage, clock: Clock) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(name="test", repository=store, clock=clock) as lim:
        yield lim


async def table_items(store: MemoryStorage) -> list[Item]:
    return await store.export_items()


RPM = Limit.per_minute("rpm", 100)
TPM = Limit.per_minute("tpm", 10_000)


async def test_acquire_consumes_and_is_visible_to_other_clients(
    limiter: RateLimiter, store: MemoryStorage, clock: Clock
) -> None:
    async with limiter.acquire("k1", "gpt-4", [RPM, TPM], {"rpm": 1, "tpm": 500}) as lease:
        async with RateLimiter(name="test", repository=store, clock=clock) as other:
            assert await other.available("k1", "gpt-4", [RPM, TPM]) == {"rpm": 99, "tpm": 9500}
        assert lease.consumed == {"rpm": 1, "tpm": 500}
    assert await limiter.available("k1", "gpt-4", [RPM, TPM]) == {"rpm": 99, "tpm": 9500}


async def test_concurrent_leases_never_lose_updates(limiter: RateLimiter) -> None:
    limit = Limit.per_hour("tokens", 100)

    async def take(n: int) -> None:
        async with limiter.acquire("k1", "r", [limit], {"tokens": n}):
            pass

    await asyncio.gather(take(10), take(20))
    assert await limiter.available("k1", "r", [limit]) == {"tokens": 70}


async def test_rollback_on_exception_restores_exactly(limiter: RateLimiter) -> None:
    async with limiter.acquire("k1", "r", [RPM], {"rpm": 30}):
        pass
    with pytest.raises(KeyError):
        async with limiter.acquire("k1", "r", [RPM], {"rpm": 25}) as lease:
            await lease.adjust(rpm=5)
            raise KeyError("boom")
    assert await limiter.available("k1", "r", [RPM]) == {"rpm": 70}


async def test_denial_reports_every_limit_and_writes_nothing(
    limiter: RateLimiter, clock: Clock
) -> None:
    async with limiter.acquire("k1", "r", [RPM, TPM], {"rpm": 1, "tpm": 9_999}):
        pass
    with pytest.raises(RateLimitExceeded) as info:
        async with limiter.acquire("k1", "r", [RPM, TPM], {"rpm": 1, "tpm": 2}):
            pytest.fail("body must not run when denied")
    exc = info.value
    assert [s.limit_name for s in exc.statuses] == ["rpm", "tpm"]
    assert [s.limit_name for s in exc.violations] == ["tpm"]
    assert [s.limit_name for s in exc.passed] == ["rpm"]
    # tpm has 1 token; refill is 10_000 per 60 s, so 1 more token takes exactly 6 ms.
    assert exc.retry_after_seconds == pytest.approx(0.006)
    assert exc.retry_after_header == "1"
    assert exc.as_dict()["retry_after_ms"] == 6
    assert await limiter.available("k1", "r", [RPM, TPM]) == {"rpm": 99, "tpm": 1}
    clock.advance(6)
    async with limiter.acquire("k1", "r", [RPM, TPM], {"rpm": 1, "tpm": 2}):
        pass


async def test_refill_is_exact_over_time(limiter: RateLimiter, clock: Clock) -> None:
    async with limiter.acquire("k1", "r", [RPM], {"rpm": 100}):
        pass
    assert await limiter.time_until_available("k1", "r", [RPM], {"rpm": 1}) == pytest.approx(0.6)
    clock.advance(599)
    assert await limiter.available("k1", "r", [RPM]) == {"rpm": 0}
    clock.advance(1)
    assert await limiter.available("k1", "r", [RPM]) == {"rpm": 1}
    clock.advance(3_600_000)
    assert await limiter.available("k1", "r", [RPM]) == {"rpm": 100}  # capped at burst


async def test_adjust_can_go_negative_and_release_caps_at_burst(limiter: RateLimiter) -> None:
    async with limiter.acquire("k1", "r", [TPM], {"tpm": 9_000}) as lease:
        await lease.adjust(tpm=2_000)
        assert lease.consumed == {"tpm": 11_000}
    assert await limiter.available("k1", "r", [TPM]) == {"tpm": -1_000}
    async with limiter.acquire("k2", "r", [TPM], {"tpm": 100}) as lease:
        await lease.release(tpm=100)
        with pytest.raises(ValidationError):  # more than it holds (tests/test_lease_bounds.py)
            await lease.adjust(tpm=-500)
    assert await limiter.available("k2", "r", [TPM]) == {"tpm": 10_000}


async def test_lease_consume_is_checked(limiter: RateLimiter) -> None:
    async with limiter.acquire("k1", "r", [RPM], {"rpm": 90}) as lease:
        with pytest.raises(RateLimitExceeded):
            await lease.consume(rpm=11)
        await lease.consume(rpm=10)
        assert lease.consumed == {"rpm": 100}
    assert await limiter.available("k1", "r", [RPM]) == {"rpm": 0}


async def test_cascade_consumes_parent_and_denial_takes_nothing(limiter: RateLimiter) -> None:
    await limiter.create_entity("proj", name="Project")
    await limiter.create_entity("key-a", parent_id="proj")
    await limiter.create_entity("key-b", parent_id="proj")
    child = Limit.per_hour("tpm", 1_000)
    async with limiter.acquire("key-a", "llm", [child], {"tpm": 600}, cascade=True):
        pass
    assert await limiter.available("proj", "llm", [child]) == {"tpm": 400}
    with pytest.raises(RateLimitExceeded) as info:
        async with limiter.acquire("key-b", "llm", [child], {"tpm": 500}, cascade=True):
            pass
    violation = info.value.primary_violation
    assert violation is not None and violation.entity_id == "proj"
    assert await limiter.available("key-b", "llm", [child]) == {"tpm": 1_000}
    with pytest.raises(ZeroDivisionError):
        async with limiter.acquire("key-b", "llm", [child], {"tpm": 300}, cascade=True):
            raise ZeroDivisionError
    assert await limiter.available("proj", "llm", [child]) == {"tpm": 400}
    assert await limiter.available("key-b", "llm", [child]) == {"tpm": 1_000}
    children = await limiter.get_children("proj")
    assert sorted(e.id for e in children) == ["key-a", "key-b"]


async def test_cascade_needs_the_entity(limiter: RateLimiter) -> None:
    with pytest.raises(EntityNotFoundError):
        async with limiter.acquire("ghost", "r", [RPM], {"rpm": 1}, cascade=True):
            pass


async def _misses(limiter: RateLimiter, entity_id: str, n: int) -> None:
    async def one() -> None:
        with pytest.raises(EntityNotFoundError):
            async with limiter.acquire(entity_id, "r", [RPM], {"rpm": 1}, cascade=True):
                pass

    await asyncio.gather(*(one() for _ in range(n)))


async def test_a_missing_entity_costs_one_read_per_ttl(
    limiter: RateLimiter, store: MemoryStorage
) -> None:
    """A flood naming unknown entities (cascade) reads each at most once per
    MISSING_ENTITY_TTL, concurrent requests included; an entity another process creates is
    seen once that passed, one this limiter creates at once."""
    limiter.ledger.reset()
    await _misses(limiter, "ghost-1", 20)
    await _misses(limiter, "ghost-1", 5)
    await _misses(limiter, "ghost-2", 20)
    assert limiter.ledger.calls == {"GetItem": 2}
    async with RateLimiter(name="test", repository=store) as other:
        await other.create_entity("ghost-1")
    await _misses(limiter, "ghost-1", 1)  # still believed missing
    await limiter.create_entity("ghost-2")  # this limiter's own: forgotten at once
    async with limiter.acquire("ghost-2", "r", [RPM], {"rpm": 1}, cascade=True):
        pass
    await asyncio.sleep(MISSING_ENTITY_TTL)
    async with limiter.acquire("ghost-1", "r", [RPM], {"rpm": 1}, cascade=True):
        pass


async def test_stored_parent_limit_below_the_request_is_a_validation_error(
    limiter: RateLimiter,
) -> None:
    """The parent's stored burst is only known after resolving it: a request above it could
    never be admitted, which is a ValidationError naming the field, and nothing is taken."""
    await limiter.create_entity("proj")
    await limiter.create_entity("key", parent_id="proj")
    await limiter.set_limits("proj", [Limit.per_minute("rpm", 5)])
    with pytest.raises(ValidationError) as raised:
        async with limiter.acquire(
            "key", "r", [RPM], {"rpm": 10}, cascade=True, use_stored_limits=True
        ):
            pytest.fail("admitted")
    assert raised.value.field == "consume.rpm" and "'proj'" in str(raised.value.reason)
    assert await limiter.available("key", "r", [RPM]) == {"rpm": 100}


async def test_stored_limits_resource_then_default_then_argument(limiter: RateLimiter) -> None:
    await limiter.create_entity("k1")
    await limiter.set_limits("k1", [Limit.per_minute("rpm", 5)], resource="gpt-4")
    await limiter.set_limits("k1", [Limit.per_minute("rpm", 7)])
    assert [lim.capacity for lim in await limiter.get_limits("k1", "gpt-4")] == [5]
    assert await limiter.available("k1", "gpt-4", [RPM], use_stored_limits=True) == {"rpm": 5}
    assert await limiter.available("k1", "other", [RPM], use_stored_limits=True) == {"rpm": 7}
    await limiter.delete_limits("k1")
    await limiter.delete_limits("k1", "gpt-4")
    assert await limiter.available("k1", "other", [RPM], use_stored_limits=True) == {"rpm": 100}
    assert await limiter.get_limits("k1") == []


async def test_a_cache_of_one_entry_still_resolves_cascade_and_stored_limits(
    store: MemoryStorage, clock: Clock
) -> None:
    """A resolution decides by what it read, also when the cache has already dropped it: the
    entity, its stored limits and its parent's take three entries in a cache of one."""
    async with RateLimiter(name="test", repository=store, clock=clock) as admin:
        await admin.create_entity("proj")
        await admin.create_entity("key", parent_id="proj")
        await admin.set_limits("key", [Limit.per_minute("rpm", 5)])
        await admin.set_limits("proj", [Limit.per_minute("rpm", 3)])
    async with RateLimiter(
        name="test", repository=store, clock=clock, bucket_cache_size=1
    ) as tiny:
        for _ in range(3):
            async with tiny.acquire(
                "key", "r", None, {"rpm": 1}, cascade=True, use_stored_limits=True
            ):
                pass
        with pytest.raises(RateLimitExceeded) as denied:
            async with tiny.acquire(
                "key", "r", None, {"rpm": 1}, cascade=True, use_stored_limits=True
            ):
                pass
        assert [v.entity_id for v in denied.value.violations] == ["proj"]
        assert await tiny.available("key", "r", None, use_stored_limits=True) == {"rpm": 2}


async def test_entities(limiter: RateLimiter, store: MemoryStorage) -> None:
    entity = await limiter.create_entity("k1", name="Key one", metadata={"tier": "gold"})
    assert entity.entity_id == "k1" and entity.metadata == {"tier": "gold"}
    assert entity.created_at
    with pytest.raises(EntityExistsError):
        await limiter.create_entity("k1")
    with pytest.raises(EntityNotFoundError):
        await limiter.create_entity("k2", parent_id="nope")
    async with limiter.acquire("k1", "r", [RPM], {"rpm": 1}):
        pass
    await limiter.delete_entity("k1")
    assert await limiter.get_entity("k1") is None
    assert not [i for i in await table_items(store) if i["PK"] == {"S": "ENTITY#k1"}]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"entity_id": "bad#id"}, "entity_id"),
        ({"entity_id": ""}, "entity_id"),
        ({"resource": "a#b"}, "resource"),
        ({"consume": {"rpm": -1}}, "consume.rpm"),
        ({"consume": {"rpm": 1.5}}, "consume.rpm"),
        ({"consume": {"nope": 1}}, "consume.nope"),
        ({"consume": {"rpm": 101}}, "consume.rpm"),
        ({"limits": []}, "limits"),
    ],
)
async def test_bad_input_is_a_validation_error_before_any_write(
    limiter: RateLimiter, store: MemoryStorage, kwargs: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {
        "entity_id": "k1",
        "resource": "r",
        "limits": [RPM],
        "consume": {"rpm": 1},
    }
    args.update(kwargs)
    with pytest.raises(ValidationError) as info:
        async with limiter.acquire(**args):  # type: ignore[arg-type]
            pass
    assert info.value.field == field
    assert [i for i in await table_items(store) if i["PK"]["S"] != "SYSTEM#"] == []


async def test_adjust_unknown_limit_is_rejected(limiter: RateLimiter) -> None:
    async with limiter.acquire("k1", "r", [RPM], {"rpm": 1}) as lease:
        with pytest.raises(ValidationError) as info:
            await lease.adjust(tpm=5)
        assert info.value.field == "consume.tpm"


async def test_stale_cache_is_harmless(
    store: MemoryStorage, clock: Clock, limiter: RateLimiter
) -> None:
    limit = Limit.per_hour("rph", 10)
    async with RateLimiter(name="test", repository=store, clock=clock) as other:
        async with limiter.acquire("k1", "r", [limit], {"rph": 1}):
            pass  # limiter now caches 9 left
        async with other.acquire("k1", "r", [limit], {"rph": 8}):
            pass  # only 1 left, unknown to limiter's cache
        with pytest.raises(RateLimitExceeded) as info:
            async with limiter.acquire("k1", "r", [limit], {"rph": 2}):
                pass
        assert info.value.statuses[0].available == 1
        async with limiter.acquire("k1", "r", [limit], {"rph": 1}):
            pass
    assert await limiter.available("k1", "r", [limit]) == {"rph": 0}


async def test_fail_open_and_fail_closed_when_dynamodb_is_down() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    retry = RetryPolicy(max_attempts=2, base_delay=0.001, connect_timeout=0.5, read_timeout=0.5)
    async with RateLimiter(name="test", endpoint_url=down, retry=retry) as closed:
        with pytest.raises(RateLimiterUnavailable) as info:
            async with closed.acquire("k1", "r", [RPM], {"rpm": 1}):
                pytest.fail("FAIL_CLOSED must not admit")
        assert info.value.cause is not None
        async with closed.acquire(
            "k1", "r", [RPM], {"rpm": 1}, failure_mode=FailureMode.FAIL_OPEN
        ) as lease:
            assert lease.fail_open
            await lease.adjust(rpm=3)
            assert lease.consumed == {}  # as in 0.2: a fail-open lease took nothing


@pytest.mark.integration
async def test_missing_table_is_infrastructure_not_found(endpoint_url: str) -> None:
    async with RateLimiter(name="absent", endpoint_url=endpoint_url) as limiter:
        for mode in FailureMode:
            with pytest.raises(InfrastructureNotFoundError):
                async with limiter.acquire("k1", "r", [RPM], {"rpm": 1}, failure_mode=mode):
                    pass
        with pytest.raises(InfrastructureNotFoundError):
            await limiter.get_entity("k1")


def test_sync_limiter(store: MemoryStorage) -> None:
    with SyncRateLimiter(name="test", repository=store) as limiter:
        limiter.create_entity("proj")
        limiter.create_entity("k1", parent_id="proj")
        with limiter.acquire("k1", "r", [RPM], {"rpm": 5}, cascade=True) as lease:
            lease.adjust(rpm=1)
        with pytest.raises(RuntimeError), limiter.acquire("k1", "r", [RPM], {"rpm": 5}):
            raise RuntimeError
        assert limiter.available("k1", "r", [RPM]) == {"rpm": 94}
        assert limiter.available("proj", "r", [RPM]) == {"rpm": 94}
        assert [e.id for e in limiter.get_children("proj")] == ["k1"]


async def test_a_give_back_lands_without_a_condition_after_another_client_moved_the_anchor(
    limiter: RateLimiter, store: MemoryStorage
) -> None:
    """A release is an unconditional add: another client re-anchoring the bucket meanwhile
    (here its clock is two minutes later, so its write folds the refill in) costs the release
    no conflict and no extra round, and the tokens come back exactly."""
    async with limiter.acquire("k1", "r", [RPM], {"rpm": 30}) as lease:
        later = Clock(T0 + 120_000)
        async with RateLimiter(name="test", repository=store, clock=later) as other:
            async with other.acquire("k1", "r", [RPM], {"rpm": 10}):
                pass
            limiter.ledger.reset()
            await lease.release(rpm=20)
            assert limiter.ledger.conflicts == 0
            assert limiter.ledger.calls["UpdateItem"] == 1
            # bucket: 70 left at T0, full again two minutes later, minus 10, plus 20 (capped)
            assert await other.available("k1", "r", [RPM]) == {"rpm": 100}
            async with other.acquire("k1", "r", [RPM], {"rpm": 100}):
                pass
