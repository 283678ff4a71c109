"""Soft limits (`Limit(..., soft=True)`) and shadow mode (`RateLimiter(shadow=True)`).

A soft limit is debited exactly as a hard one (it may go into debt), never denies, and is
reported: `exceeded` in the statuses, counted in `zae_limiter.limit.soft_exceeded`, logged at
WARNING at most once per (entity, limit) per minute. Shadow mode treats every limit as soft and
counts what would have been denied. On `MemoryStorage` (the storage contract proves it decides
as DynamoDB does; `tests/test_storage_contract.py` has the soft case on both).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.responses import JSONResponse

from zae_limiter import (
    Limit,
    MemoryStorage,
    RateLimiter,
    RateLimitExceeded,
    Reservations,
    SyncRateLimiter,
    ValidationError,
)
from zae_limiter.http.asgi import RateLimitMiddleware, header_key
from zae_limiter.metrics import (
    ENTITY_ID,
    LIMIT,
    RESOURCE,
    SHADOW_DENIALS,
    SOFT_EXCEEDED,
    SOFT_WARNING_INTERVAL_MS,
    Metrics,
)

T0 = 1_800_000_000_000
RPM = Limit.per_minute("rpm", 10)
SOFT_RPM = Limit.per_minute("rpm", 10, soft=True)
TPM = Limit.per_minute("tpm", 100)
SOFT_TPM = Limit.per_minute("tpm", 100, soft=True)


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


def counted(reader: InMemoryMetricReader, name: str) -> dict[tuple[str, str], float]:
    """`name`'s data points as (resource, limit) → value."""
    found: dict[tuple[str, str], float] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else []:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    a = point.attributes or {}
                    assert ENTITY_ID not in a  # not asked for: bounded attributes
                    found[(str(a[RESOURCE]), str(a[LIMIT]))] = point.value
    return found


def limiter(clock: list[int] | None = None, **options: Any) -> RateLimiter:
    now = clock if clock is not None else [T0]
    return RateLimiter(repository=MemoryStorage(), clock=lambda: now[0], **options)


async def stored(lim: RateLimiter, entity_id: str, resource: str = "api") -> dict[str, int]:
    """Millitokens each limit's counters say were consumed (what the aggregator reads)."""
    item = await lim.repository.get_bucket(entity_id, resource)
    assert item is not None
    return {name: s.consumed_milli - s.released_milli for name, s in item.limits.items()}


# -- soft limits --------------------------------------------------------------------------------


async def test_a_soft_limit_ten_times_past_its_allowance_admits_every_request() -> None:
    async with limiter() as lim:
        exceeded: list[bool] = []
        for _ in range(100):
            async with lim.acquire("k", "api", [SOFT_RPM], {"rpm": 1}) as lease:
                [status] = lease.statuses()
                exceeded.append(status.exceeded)
        # The 11th request is the first past the allowance; every one was admitted.
        assert exceeded == [False] * 10 + [True] * 90
        assert status.available == -90 and status.requested == 1
        assert await stored(lim, "k") == {"rpm": 100_000}
        assert await lim.available("k", "api", [SOFT_RPM]) == {"rpm": -90}
        # Debt like a forced adjust: one minute of refill brings 10 back, no more.
        assert await lim.time_until_available("k", "api", [SOFT_RPM], {"rpm": 1}) == 546.0


async def test_a_soft_limit_takes_a_request_larger_than_its_burst() -> None:
    async with limiter() as lim:
        async with lim.acquire("k", "api", [SOFT_RPM, TPM], {"rpm": 25, "tpm": 1}) as lease:
            await lease.consume(rpm=30)  # checked, still never refused by a soft limit
        assert await stored(lim, "k") == {"rpm": 55_000, "tpm": 1_000}
        # A hard limit still refuses what exceeds its burst.
        with pytest.raises(RateLimitExceeded) as info:
            async with lim.acquire("k", "api", [SOFT_RPM, TPM], {"rpm": 1, "tpm": 101}):
                pass
        assert [v.limit_name for v in info.value.violations] == ["tpm"]


async def test_a_hard_limit_in_the_same_acquire_still_denies_and_nothing_is_written() -> None:
    async with limiter() as lim:
        for _ in range(12):
            async with lim.acquire("k", "api", [SOFT_RPM, TPM], {"rpm": 1, "tpm": 5}):
                pass
        before = await lim.repository.export_items()
        with pytest.raises(RateLimitExceeded) as info:
            async with lim.acquire("k", "api", [SOFT_RPM, TPM], {"rpm": 1, "tpm": 50}):
                pass
        exc = info.value
        # Only the hard limit denies; the soft one is reported past its allowance.
        assert [v.limit_name for v in exc.violations] == ["tpm"]
        by_name = {s.limit_name: s for s in exc.statuses}
        assert by_name["rpm"].exceeded and by_name["rpm"].available == -2
        assert by_name["rpm"].retry_after_seconds == 0.0
        assert exc.retry_after_seconds == by_name["tpm"].retry_after_seconds == 6.0
        assert [s.limit_name for s in exc.passed] == ["rpm"]
        # All or nothing: the denied acquire wrote nothing, the soft limit included.
        assert await lim.repository.export_items() == before
        assert await stored(lim, "k") == {"rpm": 12_000, "tpm": 60_000}


async def test_soft_excesses_are_counted(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    async with limiter(metrics=Metrics(provider)) as lim:
        for _ in range(15):
            async with lim.acquire("k", "api", [SOFT_RPM, TPM], {"rpm": 1, "tpm": 1}):
                pass
        async with lim.acquire("k", "api", [SOFT_RPM, TPM], {"rpm": 0, "tpm": 1}):
            pass  # takes nothing from rpm: not an excess
    assert counted(reader, SOFT_EXCEEDED) == {("api", "rpm"): 5}
    assert counted(reader, SHADOW_DENIALS) == {}


async def test_a_parents_soft_limit_with_cascade() -> None:
    async with limiter() as lim:
        await lim.create_entity("proj")
        await lim.create_entity("k1", parent_id="proj")
        await lim.create_entity("k2", parent_id="proj")
        await lim.set_limits("proj", [SOFT_TPM], "api")
        own = [Limit.per_minute("tpm", 1000)]  # each key's: hard, never reached here
        for key in ("k1", "k2"):
            for _ in range(3):
                async with lim.acquire(
                    key, "api", own, {"tpm": 60}, cascade=True, use_stored_limits=True
                ) as lease:
                    pass
        # The project's budget of 100 was spent 3.6 times over, and every request admitted.
        assert await stored(lim, "proj") == {"tpm": 360_000}
        assert await stored(lim, "k2") == {"tpm": 180_000}
        parent = [s for s in lease.statuses() if s.entity_id == "proj"]
        assert parent[0].exceeded and parent[0].available == -260


async def test_a_parents_soft_limit_does_not_lift_the_childs_hard_one() -> None:
    async with limiter() as lim:
        await lim.create_entity("proj")
        await lim.create_entity("k1", parent_id="proj")
        for _ in range(5):
            async with lim.acquire("k1", "api", [RPM, SOFT_TPM], {"rpm": 2, "tpm": 60},
                                   cascade=True):
                pass
        with pytest.raises(RateLimitExceeded) as info:
            async with lim.acquire("k1", "api", [RPM, SOFT_TPM], {"rpm": 1, "tpm": 1},
                                   cascade=True):
                pass
        # Both hard rpm buckets are spent; neither soft tpm (300 of 100) denies.
        violations = {(v.entity_id, v.limit_name) for v in info.value.violations}
        assert violations == {("k1", "rpm"), ("proj", "rpm")}
        assert {(s.entity_id, s.limit_name) for s in info.value.statuses if s.exceeded} == {
            ("k1", "rpm"), ("proj", "rpm"), ("k1", "tpm"), ("proj", "tpm")
        }
        assert await stored(lim, "proj") == {"rpm": 10_000, "tpm": 300_000}


# -- the warning -------------------------------------------------------------------------------


async def test_the_warning_is_logged_once_per_entity_and_limit_per_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [T0]
    caplog.set_level(logging.WARNING, logger="zae_limiter")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "soft limit exceeded" in r.message]

    async with limiter(clock) as lim:
        for _ in range(30):
            async with lim.acquire("k", "api", [SOFT_RPM, SOFT_TPM], {"rpm": 1, "tpm": 10}):
                pass
        # rpm past from the 11th, tpm from the 11th too: one line each, not 20 each.
        assert len(warnings()) == 2
        assert {("'rpm'" in w, "'k'" in w) for w in warnings()} == {(True, True), (False, True)}
        async with lim.acquire("other", "api", [SOFT_RPM], {"rpm": 11}):
            pass
        assert len(warnings()) == 3  # another entity: its own line
        clock[0] += SOFT_WARNING_INTERVAL_MS - 1
        async with lim.acquire("k", "api", [SOFT_RPM], {"rpm": 100}):
            pass
        assert len(warnings()) == 3
        clock[0] += 1
        async with lim.acquire("k", "api", [SOFT_RPM], {"rpm": 1}):
            pass
        assert len(warnings()) == 4


# -- shadow mode -------------------------------------------------------------------------------


async def test_shadow_mode_admits_everything_and_counts_would_be_denials(
    provider: MeterProvider, reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="zae_limiter")
    async with limiter(shadow=True, metrics=Metrics(provider)) as lim:
        assert lim.shadow is True
        statuses = []
        for _ in range(14):
            async with lim.acquire("k", "api", [RPM, SOFT_TPM], {"rpm": 1, "tpm": 10}) as lease:
                statuses.append({s.limit_name: s.exceeded for s in lease.statuses()})
        # Larger than the burst: the hard limit would refuse it for good; shadow admits it.
        async with lim.acquire("k", "api", [RPM, SOFT_TPM], {"rpm": 11, "tpm": 0}) as lease:
            await lease.consume(rpm=20)
        assert await stored(lim, "k") == {"rpm": 45_000, "tpm": 140_000}
        assert await lim.available("k", "api", [RPM, SOFT_TPM]) == {"rpm": -35, "tpm": -40}
    assert statuses[9] == {"rpm": False, "tpm": False}
    assert statuses[10] == {"rpm": True, "tpm": True}
    # rpm is hard: 4 acquires and 2 takes past it would have been denied; tpm is soft anyway.
    assert counted(reader, SHADOW_DENIALS) == {("api", "rpm"): 6}
    assert counted(reader, SOFT_EXCEEDED) == {("api", "tpm"): 4}
    assert any("shadow mode would deny" in r.message for r in caplog.records)


async def test_shadow_mode_does_not_reserve_and_writes_every_acquire() -> None:
    async with limiter(shadow=True, reservations=Reservations()) as lim:
        assert lim.reserver is None
        for _ in range(20):
            async with lim.acquire("k", "api", [RPM], {"rpm": 1}):
                pass
        assert lim.reserved() == {}
        assert await stored(lim, "k") == {"rpm": 20_000}


@pytest.mark.parametrize("bad", ["yes", 1, None])
async def test_shadow_must_be_a_bool(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        RateLimiter(repository=MemoryStorage(), shadow=bad)  # type: ignore[arg-type]
    assert info.value.field == "shadow"
    with pytest.raises(ValidationError) as sync_info:
        SyncRateLimiter(repository=MemoryStorage(), shadow=bad)  # type: ignore[arg-type]
    assert sync_info.value.field == "shadow"


def test_the_sync_twin_serves_soft_limits_and_shadow_mode() -> None:
    clock = [T0]
    with SyncRateLimiter(repository=MemoryStorage(), clock=lambda: clock[0]) as lim:
        for _ in range(12):
            with lim.acquire("k", "api", [SOFT_RPM], {"rpm": 1}) as lease:
                pass
        assert [s.exceeded for s in lease.statuses()] == [True]
        assert lim.available("k", "api", [SOFT_RPM]) == {"rpm": -2}
        # The same bucket seen through a hard limit: in debt, so denied.
        with pytest.raises(RateLimitExceeded), lim.acquire("k", "api", [RPM], {"rpm": 1}):
            pass
    with SyncRateLimiter(
        repository=MemoryStorage(), clock=lambda: clock[0], shadow=True
    ) as shadow:
        assert shadow.shadow is True
        for _ in range(12):
            with shadow.acquire("k", "api", [RPM], {"rpm": 1}):
                pass
        assert shadow.available("k", "api", [RPM]) == {"rpm": -2}


# -- reservations ------------------------------------------------------------------------------


async def test_soft_limits_are_not_served_from_reserved_blocks() -> None:
    async with limiter(reservations=Reservations()) as lim:
        for _ in range(30):
            async with lim.acquire("soft", "api", [SOFT_RPM, TPM], {"rpm": 1, "tpm": 1}):
                pass
        # Exact: what the soft entity's bucket says it consumed is what was admitted.
        assert await stored(lim, "soft") == {"rpm": 30_000, "tpm": 30_000}
        # At the plain acquire's cost once warm: one write each, none refused.
        lim.ledger.reset()
        for _ in range(5):
            async with lim.acquire("soft", "api", [SOFT_RPM, TPM], {"rpm": 1, "tpm": 1}):
                pass
        assert lim.ledger.calls == {"UpdateItem": 5} and lim.ledger.conflicts == 0
        for _ in range(5):
            async with lim.acquire("hard", "api", [RPM], {"rpm": 1}):
                pass
        reserver = lim.reserver
        assert reserver is not None
        # The hard-only entity is served from a block; the one with a soft limit never is.
        assert ("hard", "api") in reserver.holdings
        assert ("soft", "api") not in reserver.holdings
        assert ("soft", "api") not in lim.reserved()
        async with lim.acquire("soft", "api", [SOFT_RPM, TPM], {"rpm": 1, "tpm": 1}) as lease:
            await lease.adjust(tpm=4)
            await lease.release(rpm=1)
        assert await stored(lim, "soft") == {"rpm": 35_000, "tpm": 40_000}
    # Closing gives the hard entity's block back: its bucket holds what was admitted.
    assert await stored(lim, "hard") == {"rpm": 5_000}


# -- HTTP ----------------------------------------------------------------------------------------


async def asgi_get(app: Any, key: str) -> tuple[int, dict[str, str]]:
    """One GET through an ASGI application, in-process."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/", "raw_path": b"/", "root_path": "", "query_string": b"",
        "headers": [(b"host", b"test"), (b"x-api-key", key.encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    done = False

    async def receive() -> dict[str, Any]:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


async def test_the_middleware_never_answers_429_for_a_soft_limit() -> None:
    async with limiter() as lim:
        soft = RateLimitMiddleware(
            JSONResponse({"ok": True}), limiter=lim, limits=[Limit.per_minute("rpm", 3, soft=True)],
            key=header_key("x-api-key"),
        )
        answers = [await asgi_get(soft, "k1") for _ in range(8)]
        assert [status for status, _ in answers] == [200] * 8
        # The fields still tell the client its allowance is spent.
        assert answers[-1][1]["ratelimit"].startswith('"rpm";r=0;')
        assert await lim.available("k1", "http", [Limit.per_minute("rpm", 3)]) == {"rpm": -5}
        hard = RateLimitMiddleware(
            JSONResponse({"ok": True}), limiter=lim, limits=[Limit.per_minute("rpm", 3)],
            key=header_key("x-api-key"),
        )
        status, headers = await asgi_get(hard, "k2")
        assert status == 200
        for _ in range(2):
            await asgi_get(hard, "k2")
        status, headers = await asgi_get(hard, "k2")
        assert status == 429 and "retry-after" in headers


# -- soft quotas, soft concurrency caps, shadow mode over both ----------------------------------

SOFT_SESSION = Limit.quota("session", 5, reset_after=timedelta(hours=1), soft=True)
SOFT_STREAMS = Limit.concurrency("streams", 2, soft=True)


async def slot_counts(store: MemoryStorage, entity_id: str = "k") -> dict[str, int]:
    """Slots held per cap, as stored (the count every take and release moves)."""
    item = await store.get_slots(entity_id, "api")
    return {} if item is None else dict(item.held)


async def test_a_soft_quota_past_its_allowance_admits_and_stores_what_was_admitted(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    clock = [T0]
    rpm = Limit.per_minute("rpm", 9)
    async with limiter(clock, metrics=Metrics(provider)) as lim:
        exceeded: list[bool] = []
        both = {"session": 1, "rpm": 1}
        for _ in range(8):
            async with lim.acquire("k", "api", [SOFT_SESSION, rpm], both) as lease:
                exceeded.append(lease.statuses()[0].exceeded)
        # Larger than the whole quota: no RequestTooLarge, debited all the same.
        async with lim.acquire("k", "api", [SOFT_SESSION], {"session": 7}) as lease:
            [status] = lease.statuses()
            await lease.release(session=2)  # given back into the window it was taken in
        assert exceeded == [False] * 5 + [True] * 3
        assert (status.available, status.exceeded, status.reset_seconds) == (-10, True, 3600.0)
        item = await lim.repository.get_bucket("k", "api")
        assert item is not None and item.limits["session"].full_at == 13_000  # used: exact
        assert await stored(lim, "k") == {"session": 13_000, "rpm": 8_000}
        assert await lim.available("k", "api", [SOFT_SESSION]) == {"session": -8}
        # A hard bucket on the same acquire still denies, and nothing is written.
        async with lim.acquire("k", "api", [SOFT_SESSION, rpm], {"session": 1, "rpm": 1}):
            pass
        before = await lim.repository.export_items()
        with pytest.raises(RateLimitExceeded) as info:
            async with lim.acquire("k", "api", [SOFT_SESSION, rpm], {"session": 1, "rpm": 1}):
                pass
        assert [v.limit_name for v in info.value.violations] == ["rpm"]
        assert {s.limit_name: s.exceeded for s in info.value.statuses} == {
            "session": True, "rpm": True
        }
        assert await lim.repository.export_items() == before
        # The window's reset forgives the debt: the whole amount is back, nothing more.
        clock[0] += 3_600_000
        async with lim.acquire("k", "api", [SOFT_SESSION], {"session": 2}) as lease:
            assert [(s.available, s.exceeded) for s in lease.statuses()] == [(3, False)]
    # Past the allowance: the 6th to 9th acquires and the one after the give-back.
    assert counted(reader, SOFT_EXCEEDED) == {("api", "session"): 5}


async def test_a_soft_cap_past_its_max_admits_and_releases_exactly(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    store = MemoryStorage()
    async with RateLimiter(repository=store, metrics=Metrics(provider)) as lim:
        leases = [lim.acquire("k", "api", [SOFT_STREAMS, RPM], {"rpm": 1}) for _ in range(4)]
        held = [await scope.__aenter__() for scope in leases]
        caps = [next(s for s in lease.statuses() if s.limit_name == "streams") for lease in held]
        assert [(s.available, s.exceeded) for s in caps] == [
            (1, False), (0, False), (-1, True), (-2, True)
        ]
        item = await store.get_slots("k", "api")
        assert item is not None
        assert item.held == {"streams": 4} and len(item.holders["streams"]) == 4
        assert await lim.available("k", "api", [SOFT_STREAMS]) == {"streams": -2}
        # A hard cap in the same acquire still denies, and the soft one's slot is not taken.
        one = Limit.concurrency("gpu", 1)
        async with lim.acquire("k", "api", [SOFT_STREAMS, one], {}):
            with pytest.raises(RateLimitExceeded) as info:
                async with lim.acquire("k", "api", [SOFT_STREAMS, one], {}):
                    pass
            assert [v.limit_name for v in info.value.violations] == ["gpu"]
            assert await slot_counts(store) == {"streams": 5, "gpu": 1}
        await held[0].release()
        await held[0].release()  # exactly once: the second sends nothing
        assert await slot_counts(store) == {"streams": 3, "gpu": 0}
        for scope in leases:
            await scope.__aexit__(None, None, None)
        item = await store.get_slots("k", "api")
        assert item is not None and item.held == {"streams": 0, "gpu": 0}
        assert not any(item.holders.values())
    # Past the max: the 3rd and 4th acquires, and the one the hard cap let through (5 of 2).
    assert counted(reader, SOFT_EXCEEDED) == {("api", "streams"): 3}
    assert counted(reader, SHADOW_DENIALS) == {}


async def test_shadow_mode_with_a_quota_and_a_cap_admits_all_and_counts_would_be_denials(
    provider: MeterProvider, reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="zae_limiter")
    quota = Limit.quota("daily", 3, cron="0 0 * * *")
    cap = Limit.concurrency("streams", 1)
    async with limiter(shadow=True, metrics=Metrics(provider)) as lim:
        scopes = [lim.acquire("k", "api", [quota, cap], {"daily": 2}) for _ in range(3)]
        leases = [await scope.__aenter__() for scope in scopes]
        # Larger than the quota and the cap: what the hard limits would refuse for good.
        async with lim.acquire("k", "api", [quota, cap], {"daily": 4, "streams": 2}):
            pass
        assert await stored(lim, "k") == {"daily": 10_000}
        assert await lim.available("k", "api", [quota, cap]) == {"daily": -7, "streams": -2}
        # Each as its own take left it: the first within both, the others past both.
        assert [[s.exceeded for s in lease.statuses()] for lease in leases] == [
            [False, False], [True, True], [True, True]
        ]
        for scope in scopes:
            await scope.__aexit__(None, None, None)
        assert await lim.available("k", "api", [quota, cap]) == {"daily": -7, "streams": 1}
    # Each acquire after the first would have been denied by both.
    assert counted(reader, SHADOW_DENIALS) == {("api", "daily"): 3, ("api", "streams"): 3}
    assert counted(reader, SOFT_EXCEEDED) == {}
    assert sum("shadow mode would deny" in r.message for r in caplog.records) == 2
