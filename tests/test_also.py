"""Several resources in one acquire (`acquire(..., also={resource: consume})`): all or nothing
over every resource's bucket items (and their parents' with cascade), one lease over all of
them. Logic on `MemoryStorage`; the same decisions on moto: tests/test_storage_contract.py; under
faults: tests/reliability/test_faults.py; the calls: tests/test_cost.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from zae_limiter import (
    FailureMode,
    Limit,
    MemoryStorage,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    RequestTooLarge,
    Reservations,
    SyncRateLimiter,
    ValidationError,
)
from zae_limiter.storage.protocol import BucketItem, RepositoryUnavailable

T0 = 1_800_000_000_000
TPM = [Limit.per_minute("tpm", 1000)]
LIMITS = [Limit.per_minute("rpm", 10), Limit.per_minute("tpm", 1000)]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def store() -> MemoryStorage:
    return MemoryStorage("ZAEL-test")


@pytest.fixture
async def limiter(store: MemoryStorage) -> AsyncIterator[RateLimiter]:
    # A frozen clock: no refill between the calls, so every figure below is exact.
    async with RateLimiter(name="test", repository=store, clock=Clock()) as lim:
        await lim.create_entity("proj")
        await lim.create_entity("key", parent_id="proj")
        yield lim


async def items(store: MemoryStorage) -> list[dict[str, Any]]:
    """Every item of the table: a denial must leave this exactly as it was."""
    return sorted(await store.export_items(), key=lambda i: (i["PK"]["S"], i["SK"]["S"]))


async def tpm(limiter: RateLimiter, entity: str, resource: str) -> int:
    return (await limiter.available(entity, resource, LIMITS))["tpm"]


async def test_every_resource_is_taken_and_the_lease_covers_all(limiter: RateLimiter) -> None:
    async with limiter.acquire(
        "key", "gpt-4o", LIMITS, {"rpm": 1, "tpm": 500}, also={"all-models": {"tpm": 300}}
    ) as lease:
        assert lease.consumed == {"rpm": 1, "tpm": 500}
        assert lease.also_consumed == {"all-models": {"tpm": 300}}
        seen = {(s.resource, s.limit_name): (s.available, s.requested) for s in lease.statuses()}
        assert seen == {
            ("gpt-4o", "rpm"): (9, 1),
            ("gpt-4o", "tpm"): (500, 500),
            ("all-models", "rpm"): (10, 0),  # named nowhere in its consume: not taken
            ("all-models", "tpm"): (700, 300),
        }
    assert await tpm(limiter, "key", "gpt-4o") == 500
    assert await tpm(limiter, "key", "all-models") == 700


async def test_a_denial_on_any_resource_writes_nothing_anywhere(
    limiter: RateLimiter, store: MemoryStorage
) -> None:
    async with limiter.acquire("key", "gpt-4o", TPM, {"tpm": 600}, also={"all": {"tpm": 100}}):
        pass
    before = await items(store)
    # The other resource short (all has 900, asked 950) ...
    with pytest.raises(RateLimitExceeded) as denied:
        async with limiter.acquire("key", "gpt-4o", TPM, {"tpm": 1}, also={"all": {"tpm": 950}}):
            pytest.fail("admitted past the other resource's limit")
    assert {(v.resource, v.limit_name) for v in denied.value.violations} == {("all", "tpm")}
    assert await items(store) == before
    # ... and the acquire's own (gpt-4o has 400, asked 401).
    with pytest.raises(RateLimitExceeded) as denied:
        async with limiter.acquire("key", "gpt-4o", TPM, {"tpm": 401}, also={"all": {"tpm": 1}}):
            pytest.fail("admitted past the own resource's limit")
    assert {(v.resource, v.limit_name) for v in denied.value.violations} == {("gpt-4o", "tpm")}
    assert await items(store) == before


async def test_library_defaults_all_or_nothing() -> None:
    """A limiter as an application builds it (the wall clock, every default): the denial
    changes no stored item, an admission writes every resource's item."""
    store = MemoryStorage()
    async with RateLimiter(repository=store) as limiter:
        async with limiter.acquire("k", "m1", TPM, {"tpm": 900}, also={"m2": {"tpm": 10}}):
            pass
        before = await items(store)
        assert len(before) == 2 + 1  # two bucket items and the version record
        with pytest.raises(RateLimitExceeded):
            async with limiter.acquire("k", "m2", TPM, {"tpm": 10}, also={"m1": {"tpm": 900}}):
                pass
        assert await items(store) == before


async def test_cascade_takes_every_resource_of_the_parent_too(
    limiter: RateLimiter, store: MemoryStorage
) -> None:
    async with limiter.acquire(
        "key", "gpt-4o", TPM, {"tpm": 100}, cascade=True, also={"all": {"tpm": 200}}
    ):
        pass
    assert [await tpm(limiter, e, r) for e in ("key", "proj") for r in ("gpt-4o", "all")] == [
        900, 800, 900, 800,
    ]
    # The parent's item of the other resource is short: nothing is written, anywhere.
    async with limiter.acquire("proj", "all", TPM, {"tpm": 750}):
        pass
    before = await items(store)
    with pytest.raises(RateLimitExceeded) as denied:
        async with limiter.acquire(
            "key", "gpt-4o", TPM, {"tpm": 1}, cascade=True, also={"all": {"tpm": 51}}
        ):
            pass
    assert [(v.entity_id, v.resource) for v in denied.value.violations] == [("proj", "all")]
    assert await items(store) == before


async def test_stored_limits_resolve_per_resource(limiter: RateLimiter) -> None:
    """Each resource's own stored limits, then the entity's `_default_`, then the argument."""
    await limiter.set_limits("key", [Limit.per_minute("tpm", 100)], "gpt-4o")
    await limiter.set_limits("key", [Limit.per_minute("tpm", 5000)], "all-models")
    async with limiter.acquire(
        "key", "gpt-4o", TPM, {"tpm": 100}, use_stored_limits=True,
        also={"all-models": {"tpm": 100}, "other": {"tpm": 100}},
    ) as lease:
        limits = {s.resource: s.limit.capacity for s in lease.statuses()}
    assert limits == {"gpt-4o": 100, "all-models": 5000, "other": 1000}
    # gpt-4o's 100 are spent: its own stored limit denies, the others' room does not help.
    with pytest.raises(RateLimitExceeded) as denied:
        async with limiter.acquire(
            "key", "gpt-4o", TPM, {"tpm": 1}, use_stored_limits=True,
            also={"all-models": {"tpm": 1}},
        ):
            pass
    assert [v.resource for v in denied.value.violations] == ["gpt-4o"]
    # A limit the other resource does not have is named there: refused before any write.
    await limiter.set_limits("key", [Limit.per_minute("rpm", 5)], "all-models")
    limiter.clear_cache()
    with pytest.raises(ValidationError) as bad:
        async with limiter.acquire(
            "key", "other", TPM, {"tpm": 1}, use_stored_limits=True,
            also={"all-models": {"tpm": 1}},
        ):
            pass
    assert bad.value.field == "also.all-models.tpm"


async def test_lease_operations_name_each_resource(
    limiter: RateLimiter, store: MemoryStorage
) -> None:
    async with limiter.acquire(
        "key", "gpt-4o", LIMITS, {"rpm": 1, "tpm": 500}, cascade=True,
        also={"all": {"tpm": 500}},
    ) as lease:
        await lease.adjust(tpm=230, also={"all": {"tpm": 230}})  # the real count: 730
        assert lease.consumed == {"rpm": 1, "tpm": 730}
        assert lease.also_consumed == {"all": {"tpm": 730}}
        await lease.adjust(tpm=-30)  # the acquire's own resource only
        await lease.consume(also={"all": {"rpm": 2}})
        await lease.release(also={"all": {"tpm": 100}})
        assert lease.consumed == {"rpm": 1, "tpm": 700}
        assert lease.also_consumed == {"all": {"tpm": 630, "rpm": 2}}
        with pytest.raises(ValidationError) as bad:
            await lease.release(also={"all": {"tpm": 631}})
        assert bad.value.field == "also.all.tpm"
        with pytest.raises(ValidationError) as bad:
            await lease.adjust(also={"elsewhere": {"tpm": 1}})
        assert bad.value.field == "also.elsewhere"
        with pytest.raises(ValidationError) as bad:
            await lease.adjust(also={"all": {"tpmx": 1}})
        assert bad.value.field == "also.all.tpmx"
        with pytest.raises(RateLimitExceeded):  # checked, all or nothing: nothing taken
            await lease.consume(rpm=1, also={"all": {"rpm": 9}})
        assert lease.also_consumed == {"all": {"tpm": 630, "rpm": 2}}
    for entity in ("key", "proj"):
        assert await limiter.available(entity, "gpt-4o", LIMITS) == {"rpm": 9, "tpm": 300}
        assert await limiter.available(entity, "all", LIMITS) == {"rpm": 8, "tpm": 370}


async def test_a_rollback_gives_back_every_resource(
    limiter: RateLimiter, store: MemoryStorage
) -> None:
    with pytest.raises(RuntimeError):
        async with limiter.acquire(
            "key", "gpt-4o", TPM, {"tpm": 500}, cascade=True, also={"all": {"tpm": 300}}
        ) as lease:
            await lease.adjust(tpm=10, also={"all": {"tpm": 20}})
            raise RuntimeError
    for entity in ("key", "proj"):
        for resource in ("gpt-4o", "all"):
            assert await tpm(limiter, entity, resource) == 1000, (entity, resource)
    for item in await items(store):
        if "cn#tpm" in item:  # every consumption was released, exactly
            assert item["cn#tpm"] == item["rl#tpm"], item["SK"]


async def test_a_partial_success_is_given_back(store: MemoryStorage) -> None:
    """One item's write fails after the other's landed: the acquire raises and the landed
    consumption is given back (the engine's rule for cascade, over resources)."""

    class FailsOn(MemoryStorage):
        async def write_bucket(self, entity_id: str, resource: str, *args: Any, **kw: Any) -> Any:
            if resource == "all" and self.failing:
                raise RepositoryUnavailable("the all-models write failed (test)")
            return await super().write_bucket(entity_id, resource, *args, **kw)

    failing = FailsOn("ZAEL-test")
    failing.failing = False  # type: ignore[attr-defined]
    async with RateLimiter(name="test", repository=failing, clock=Clock()) as limiter:
        async with limiter.acquire("key", "gpt-4o", TPM, {"tpm": 1}, also={"all": {"tpm": 1}}):
            pass
        failing.failing = True  # type: ignore[attr-defined]
        with pytest.raises(RateLimiterUnavailable):
            async with limiter.acquire(
                "key", "gpt-4o", TPM, {"tpm": 400}, also={"all": {"tpm": 400}}
            ):
                pytest.fail("admitted without the other resource")
        failing.failing = False  # type: ignore[attr-defined]
        assert await tpm(limiter, "key", "gpt-4o") == 999
        assert await tpm(limiter, "key", "all") == 999


@pytest.mark.parametrize(
    ("also", "field"),
    [
        ({"gpt-4o": {"tpm": 1}}, "also.gpt-4o"),  # the acquire's own resource again
        ({"bad#name": {"tpm": 1}}, "also.bad#name"),
        ({"": {"tpm": 1}}, "also."),
        ({7: {"tpm": 1}}, "also"),
        ([("all", {"tpm": 1})], "also"),
        ({"all": 5}, "also.all"),
        ({"all": {"tpm": -1}}, "also.all.tpm"),
        ({"all": {"tpm": 1.5}}, "also.all.tpm"),
        ({"all": {"tpmx": 1}}, "also.all.tpmx"),
        ({"all": {"9x": 1}}, "also.all.9x"),
    ],
)
async def test_bad_also_is_a_validation_error_naming_it(
    limiter: RateLimiter, store: MemoryStorage, also: Any, field: str
) -> None:
    before = await items(store)
    with pytest.raises(ValidationError) as bad:
        async with limiter.acquire("key", "gpt-4o", TPM, {"tpm": 1}, also=also):
            pytest.fail("admitted")
    assert bad.value.field == field
    assert await items(store) == before


async def test_a_request_no_bucket_of_another_resource_can_hold(limiter: RateLimiter) -> None:
    with pytest.raises(RequestTooLarge) as too:
        async with limiter.acquire("key", "gpt-4o", TPM, {"tpm": 1}, also={"all": {"tpm": 1001}}):
            pass
    assert too.value.field == "also.all.tpm"


async def test_an_empty_also_is_a_plain_acquire(limiter: RateLimiter) -> None:
    async with limiter.acquire("key", "gpt-4o", TPM, {"tpm": 5}, also={}) as lease:
        assert lease.also_consumed == {}
        with pytest.raises(ValidationError) as bad:
            await lease.adjust(also={"all": {"tpm": 1}})
        assert bad.value.field == "also.all"
    assert await tpm(limiter, "key", "gpt-4o") == 995


async def test_a_limit_named_also_is_still_adjusted_by_keyword(limiter: RateLimiter) -> None:
    also = [Limit.per_minute("also", 100)]
    async with limiter.acquire("key", "r", also, {"also": 5}, also={"s": {"also": 1}}) as lease:
        await lease.adjust(also=7)  # an int: the limit's amount, not resources
        assert lease.consumed == {"also": 12}
        assert lease.also_consumed == {"s": {"also": 1}}
    assert await limiter.available("key", "r", also) == {"also": 88}


async def test_quotas_and_soft_limits_in_another_resource(limiter: RateLimiter) -> None:
    monthly = Limit.quota("monthly", 100, cron="0 0 1 * *")
    soft = Limit.per_minute("tpm", 50, soft=True)
    async with limiter.acquire(
        "key", "m", [monthly], {"monthly": 60}, also={"all": {"monthly": 60}}
    ):
        pass
    with pytest.raises(RateLimitExceeded) as denied:  # 60 + 60 > 100 in both windows
        async with limiter.acquire(
            "key", "m", [monthly], {"monthly": 1}, also={"all": {"monthly": 41}}
        ):
            pass
    assert [v.resource for v in denied.value.violations] == ["all"]
    assert denied.value.violations[0].reset_seconds is not None
    assert await limiter.available("key", "all", [monthly]) == {"monthly": 40}
    # A soft limit in the other resource is debited past its allowance, never denies.
    async with limiter.acquire(
        "key", "s1", [soft], {"tpm": 10}, also={"s2": {"tpm": 70}}
    ) as lease:
        exceeded = {s.resource: s.exceeded for s in lease.statuses()}
    assert exceeded == {"s1": False, "s2": True}
    assert await limiter.available("key", "s2", [soft]) == {"tpm": -20}


async def test_concurrency_caps_in_another_resource(
    limiter: RateLimiter, store: MemoryStorage
) -> None:
    """A cap of another resource takes its slot with the acquire (one per cap, as for the own
    resource's), denies when full with no bucket written, comes back when a bucket denies, and
    goes back with `release()` or the lease's end."""
    cap = Limit.concurrency("streams", 1, lease_ttl=timedelta(minutes=5))
    limits = [cap, *TPM]
    async with limiter.acquire(
        "key", "m", limits, {"tpm": 1, "streams": 0}, also={"gpu": {"tpm": 1}}
    ) as lease:
        assert lease.slots == {}  # 0 slots asked of the own resource's cap
        assert await limiter.available("key", "gpu", limits) == {"streams": 0, "tpm": 999}
        caps = {(s.resource, s.limit_name): s.requested for s in lease.statuses()}
        assert caps[("gpu", "streams")] == 1
        assert ("m", "streams") not in caps  # no slot taken there: no item seen
        before = await items(store)
        with pytest.raises(RateLimitExceeded) as denied:
            async with limiter.acquire(
                "key", "m2", limits, {"streams": 0}, also={"gpu": {"tpm": 1}}
            ):
                pass
        assert [(v.resource, v.limit_name) for v in denied.value.violations] == [
            ("gpu", "streams")
        ]
        assert await items(store) == before  # the full cap denied before any bucket write
        await lease.release()
        assert await limiter.available("key", "gpu", limits) == {"streams": 1, "tpm": 999}
    # A bucket of the own resource denies: the other resource's slot is given back.
    with pytest.raises(RateLimitExceeded):
        async with limiter.acquire(
            "key", "m", limits, {"tpm": 1000, "streams": 0}, also={"gpu": {"tpm": 1}}
        ):
            pass
    assert await limiter.available("key", "gpu", limits) == {"streams": 1, "tpm": 999}
    # Naming the other resource's cap in a release gives back every slot, once.
    async with limiter.acquire(
        "key", "m", limits, {"tpm": 1}, also={"gpu": {"tpm": 1}}
    ) as lease:
        assert lease.slots == {"streams": 1}
        with pytest.raises(ValidationError) as bad:
            await lease.release(also={"gpu": {"streams": 2}})
        assert bad.value.field == "also.gpu.streams"
        await lease.release(also={"gpu": {"streams": 1}})
        assert lease.slots == {}
        assert (await limiter.available("key", "m", limits))["streams"] == 1
        assert (await limiter.available("key", "gpu", limits))["streams"] == 1


async def test_reservations_serve_several_resources_through_the_buckets(
    store: MemoryStorage,
) -> None:
    """With reservations an acquire over several resources is written (never served from
    blocks), exactly; the blocks of a one-resource acquire beside it stay as they are."""
    async with RateLimiter(
        name="test", repository=store, clock=Clock(), reservations=Reservations()
    ) as limiter:
        async with limiter.acquire("k", "a", TPM, {"tpm": 10}):
            pass
        held = limiter.reserved()
        store.ledger.reset()
        async with limiter.acquire("k", "a", TPM, {"tpm": 5}, also={"b": {"tpm": 7}}) as lease:
            await lease.adjust(tpm=1, also={"b": {"tpm": 1}})
        assert store.ledger.snapshot()["calls"].get("UpdateItem", 0) == 4
        assert limiter.reserved() == held
        assert lease.consumed == {"tpm": 6} and lease.also_consumed == {"b": {"tpm": 8}}
        bucket_b = await store.get_bucket("k", "b")
        assert isinstance(bucket_b, BucketItem)
        assert bucket_b.limits["tpm"].consumed_milli == 8000


async def test_fail_open_and_fail_closed() -> None:
    class Down(MemoryStorage):
        async def get_bucket(self, entity_id: str, resource: str) -> Any:
            raise RepositoryUnavailable("DynamoDB is down (test)")

    async with RateLimiter(repository=Down()) as closed:
        with pytest.raises(RateLimiterUnavailable):
            async with closed.acquire("k", "a", TPM, {"tpm": 1}, also={"b": {"tpm": 1}}):
                pytest.fail("FAIL_CLOSED must not admit")
        async with closed.acquire(
            "k", "a", TPM, {"tpm": 1}, failure_mode=FailureMode.FAIL_OPEN, also={"b": {"tpm": 1}}
        ) as lease:
            assert lease.fail_open
            await lease.adjust(tpm=3, also={"b": {"tpm": 3}})
            assert lease.consumed == {} and lease.also_consumed == {"b": {}}
            with pytest.raises(ValidationError) as bad:  # the resources are still known
                await lease.adjust(also={"c": {"tpm": 1}})
            assert bad.value.field == "also.c"


def test_the_sync_twin(store: MemoryStorage, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with SyncRateLimiter(name="test", repository=store, clock=Clock()) as limiter:
        with limiter.acquire("k", "a", TPM, {"tpm": 5}, also={"b": {"tpm": 6}}) as lease:
            lease.adjust(also={"b": {"tpm": 1}})
            lease.consume(tpm=1, also={"b": {"tpm": 1}})
            lease.release(tpm=2)
            assert lease.consumed == {"tpm": 4}
            assert lease.also_consumed == {"b": {"tpm": 8}}
        assert limiter.available("k", "a", TPM) == {"tpm": 996}
        assert limiter.available("k", "b", TPM) == {"tpm": 992}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
