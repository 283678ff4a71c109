"""`MemoryStorage` for users' tests: a limiter with no network and no table to create.

These run with sockets forbidden: a limiter on memory must never reach for DynamoDB, AWS
credentials or a server. That it decides as DynamoDB does is the contract suite's
(tests/test_storage_contract.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from zae_limiter import (
    EntityNotFoundError,
    Limit,
    MemoryStorage,
    RateLimiter,
    RateLimitExceeded,
    Reservations,
    SyncRateLimiter,
)

LIMITS = [Limit.per_minute("rpm", 2), Limit.per_minute("tpm", 100)]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a limiter on MemoryStorage opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    yield


async def test_a_limiter_on_memory_admits_denies_and_cascades() -> None:
    store = MemoryStorage()
    async with RateLimiter(name="svc", repository=store) as limiter:
        with pytest.raises(EntityNotFoundError):
            async with limiter.acquire("k", "chat", LIMITS, {"rpm": 1}, cascade=True):
                pass
        await limiter.create_entity("proj")
        await limiter.create_entity("k", parent_id="proj")
        first = {"rpm": 1, "tpm": 40}
        async with limiter.acquire("k", "chat", LIMITS, first, cascade=True) as lease:
            await lease.adjust(tpm=70)  # into debt: 110 of 100
        with pytest.raises(RateLimitExceeded) as denied:
            async with limiter.acquire("k", "chat", LIMITS, {"rpm": 1, "tpm": 1}, cascade=True):
                pass
        # tpm: 10 tokens of debt and 1 more at 100 a minute: 6.6 s; rpm has 1 left.
        assert denied.value.retry_after_seconds == pytest.approx(6.6, abs=0.05)
        assert {v.entity_id for v in denied.value.violations} == {"k", "proj"}
        assert (await limiter.available("proj", "chat", LIMITS))["tpm"] <= -10
        with pytest.raises(ZeroDivisionError):
            async with limiter.acquire("k", "chat", LIMITS, {"rpm": 1}):
                raise ZeroDivisionError  # rolled back
        assert (await limiter.available("k", "chat", LIMITS))["rpm"] == 1


async def test_reservations_and_the_sync_twin_share_one_memory_table() -> None:
    store = MemoryStorage()
    limits = [Limit.per_minute("rpm", 100)]
    async with RateLimiter(name="svc", repository=store, reservations=Reservations()) as limiter:
        for _ in range(30):
            async with limiter.acquire("k", "chat", limits, {"rpm": 1}):
                pass
    sync = SyncRateLimiter(name="svc", repository=store)
    try:
        with sync.acquire("k", "chat", limits, {"rpm": 1}):
            pass
        # The async limiter gave its unused block back on close: 100 - 30 - 1 are left.
        assert sync.available("k", "chat", limits)["rpm"] == 69
    finally:
        sync.close()
