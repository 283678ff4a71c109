"""The per-operation deadline bounds every call on the hot path, whatever DynamoDB does.

The limiters here talk to moto through `FaultProxy` with a retry policy that alone would let a
hung endpoint hold a call for many seconds (a read timeout of `READ_TIMEOUT_S` per attempt);
the deadline is far shorter. What each test proves, with a hung endpoint (requests read, never
answered):

- `acquire` returns within 1.5x the deadline: FAIL_CLOSED raises `RateLimiterUnavailable`,
  FAIL_OPEN admits, on a cold limiter (the version check is pending) and a warm one, with the
  limiter's deadline and a per-call one, with and without reservations;
- `available` and `time_until_available` raise within the bound;
- a lease's `adjust` returns within the bound and its write goes on: once the endpoint answers,
  it lands exactly once; `consume` raises within the bound;
- a bucket write that DynamoDB applies after the deadline (delayed) is reconciled: the next
  acquire learns it, and it counts once (its write id appears once);
- the default deadline: a limiter built without `deadline=` against a hung endpoint that is not
  on loopback (an address of this host outside 127.0.0.0/8, or its host name) fails or admits
  within 1.5x the 1 s default; against a loopback endpoint the default is the local one.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from fault_proxy import FaultProxy
from figures import Figures

from zae_limiter import (
    FailureMode,
    Limit,
    RateLimiter,
    RateLimiterUnavailable,
    Reservations,
    StackOptions,
    SyncRateLimiter,
    ValidationError,
)
from zae_limiter.deadline import (
    DEFAULT_DEADLINE_SECONDS,
    LOOPBACK_DEADLINE_SECONDS,
    DeadlineExceeded,
)
from zae_limiter.storage.dynamodb.client import RetryPolicy
from zae_limiter.storage.dynamodb.endpoint import is_loopback
from zae_limiter.storage.dynamodb.repository import Repository

pytestmark = pytest.mark.integration

TABLE = "deadline"
RESOURCE = "api"
LIMIT = Limit.per_day("tok", 1000)  # refills under one token over a test
DEADLINE_S = 0.5
BOUND_S = 1.5 * DEADLINE_S
SETUP_S = 10.0  # calls that must succeed, even on a loaded machine
READ_TIMEOUT_S = 3.0
# Without the deadline, one hung request alone costs READ_TIMEOUT_S (several times BOUND_S).
POLICY = RetryPolicy(max_attempts=4, connect_timeout=2.0, read_timeout=READ_TIMEOUT_S)


def limiter_for(
    proxy: FaultProxy,
    mode: FailureMode = FailureMode.FAIL_CLOSED,
    reservations: Reservations | None = None,
    deadline: float | None = DEADLINE_S,
) -> RateLimiter:
    return RateLimiter(
        name=TABLE,
        endpoint_url=proxy.endpoint_url,
        stack_options=StackOptions(),
        failure_mode=mode,
        retry=POLICY,
        reservations=reservations,
        deadline=deadline,
    )


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.monotonic()
    result = await call()
    return time.monotonic() - started, result


async def stored_net(proxy: FaultProxy, entity_id: str = "k") -> int:
    """Net tokens consumed from the bucket as moto holds it (read directly, not proxied)."""
    repo = Repository(TABLE, None, f"http://{proxy.upstream[0]}:{proxy.upstream[1]}")
    try:
        bucket = await repo.get_bucket(entity_id, RESOURCE)
    finally:
        await repo.close()
    if bucket is None:
        return 0
    state = bucket.limits[LIMIT.name]
    return (state.consumed_milli - state.released_milli) // 1000


@pytest.fixture
async def table(proxy: FaultProxy) -> AsyncIterator[None]:
    """The table exists and holds the version record; the bucket of "k" has 1 token taken."""
    async with (
        limiter_for(proxy, deadline=None) as limiter,
        limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 1}),
    ):
        pass
    proxy.reset_stats()
    yield


async def unavailable_within_bound(
    proxy: FaultProxy, call: Callable[[], Awaitable[Any]], bound: float = BOUND_S
) -> float:
    started = time.monotonic()
    with pytest.raises(RateLimiterUnavailable) as raised:
        await call()
    elapsed = time.monotonic() - started
    assert elapsed <= bound, f"{elapsed:.2f}s past a bound of {bound}s"
    assert isinstance(raised.value.cause, DeadlineExceeded), raised.value.cause
    assert proxy.requests(), "no request reached the endpoint"
    return elapsed


async def acquire_once(limiter: RateLimiter, **kwargs: Any) -> bool:
    """One acquire of 2 tokens; True when it was a fail-open admission."""
    async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 2}, **kwargs) as lease:
        return lease.fail_open


@pytest.mark.parametrize("reserved", [False, True], ids=["direct", "reserved"])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_acquire_is_bounded_by_the_deadline(
    proxy: FaultProxy, table: None, figures: Figures, warm: bool, reserved: bool
) -> None:
    policy = Reservations() if reserved else None
    closed = limiter_for(proxy, reservations=policy)
    opened = limiter_for(proxy, FailureMode.FAIL_OPEN, reservations=policy)
    try:
        for limiter in (closed, opened):
            # Building the client is local work done once, before any deadline starts (see
            # `Repository.open`); a cold limiter has done nothing else.
            await limiter.repository.open()
            if warm:  # the version check is done and the bucket cached
                await limiter.available("k", RESOURCE, [LIMIT], deadline=SETUP_S)
        proxy.inject("hang")

        elapsed = await unavailable_within_bound(proxy, lambda: acquire_once(closed))
        figures.worst(f"deadline_unavailable_after_s.{warm=}.{reserved=}", round(elapsed, 2))

        elapsed, fail_open = await timed(lambda: acquire_once(opened))
        assert fail_open is True
        assert elapsed <= BOUND_S, f"FAIL_OPEN admitted after {elapsed:.2f}s"
        figures.worst(f"deadline_fail_open_after_s.{warm=}.{reserved=}", round(elapsed, 2))

        # A per-call deadline overrides the limiter's, both ways.
        await unavailable_within_bound(
            proxy, lambda: acquire_once(closed, deadline=0.2), bound=1.5 * 0.2
        )
        elapsed, fail_open = await timed(
            lambda: acquire_once(closed, failure_mode=FailureMode.FAIL_OPEN, deadline=0.2)
        )
        assert fail_open is True and elapsed <= 1.5 * 0.2
        figures.add(operations=4, admitted=2)
    finally:
        proxy.clear()
        await closed.close()
        await opened.close()
    # Nothing was admitted through a bucket: whatever a cancelled reservation took went back.
    assert await stored_net(proxy) == 1


async def test_reads_are_bounded_by_the_deadline(proxy: FaultProxy, table: None) -> None:
    async with limiter_for(proxy) as limiter:
        proxy.inject("hang")
        await unavailable_within_bound(proxy, lambda: limiter.available("k", RESOURCE, [LIMIT]))
        await unavailable_within_bound(
            proxy,
            lambda: limiter.time_until_available("k", RESOURCE, [LIMIT], {"tok": 5}),
        )
        await unavailable_within_bound(
            proxy,
            lambda: limiter.available("k", RESOURCE, [LIMIT], deadline=0.2),
            bound=1.5 * 0.2,
        )
        proxy.clear()
        assert await limiter.available("k", RESOURCE, [LIMIT], deadline=SETUP_S) == {"tok": 999}


async def test_lease_operations_are_bounded_and_adjust_still_lands(
    proxy: FaultProxy, table: None
) -> None:
    limiter = limiter_for(proxy)
    try:
        # Warm (the acquire then only writes): the lease keeps its acquire's deadline.
        await limiter.available("k", RESOURCE, [LIMIT], deadline=SETUP_S)
        async with limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 2}) as lease:
            proxy.inject("hang")
            # An adjustment must land: the call returns at the deadline, the write goes on.
            elapsed, _ = await timed(lambda: lease.adjust(tok=5))
            assert elapsed <= BOUND_S, f"adjust returned after {elapsed:.2f}s"
            # The lease holds a take once it is known to have landed (a rollback must not give
            # back tokens that were never taken).
            assert lease.consumed == {"tok": 2}
            # A checked take is a decision: not made in time, it raises and takes nothing.
            await unavailable_within_bound(proxy, lambda: lease.consume(tok=1))
            assert lease.consumed == {"tok": 2}
            proxy.clear()
    finally:
        await limiter.close()  # waits for the adjustment still under way
    assert lease.consumed == {"tok": 7}
    assert await stored_net(proxy) == 1 + 7


async def test_a_write_landing_after_the_deadline_counts_once(
    proxy: FaultProxy, table: None
) -> None:
    async with limiter_for(proxy) as limiter:
        await limiter.available("k", RESOURCE, [LIMIT], deadline=SETUP_S)  # cached: only writes
        delay = 2 * DEADLINE_S
        proxy.inject("delay", ops={"UpdateItem"}, count=1, delay=delay)
        await unavailable_within_bound(proxy, lambda: acquire_once(limiter))
        await asyncio.sleep(delay)  # the delayed write reaches moto and is applied
        assert await stored_net(proxy) == 1 + 2
        # The limiter does not know whether its write landed: it learns it, never resends it.
        assert await acquire_once(limiter, deadline=SETUP_S) is False
    writes = [seen for seen in proxy.requests("UpdateItem") if seen.status == 200]
    assert len(writes) == 2
    assert await stored_net(proxy) == 1 + 2 + 2


async def test_without_a_deadline_the_retry_policy_alone_bounds_a_call(
    proxy: FaultProxy, table: None
) -> None:
    """The control: the same hang holds a call past the bound when the deadline is off (so
    the tests above measure the deadline, not a fast failure)."""
    async with limiter_for(proxy, deadline=None) as limiter:
        await limiter.available("k", RESOURCE, [LIMIT])
        proxy.inject("hang", count=1)
        elapsed, _ = await timed(lambda: acquire_once(limiter))
        assert elapsed >= READ_TIMEOUT_S > BOUND_S


def test_sync_limiter_passes_the_deadline(proxy: FaultProxy, table: None) -> None:
    with SyncRateLimiter(
        name=TABLE, endpoint_url=proxy.endpoint_url, retry=POLICY, deadline=5.0
    ) as limiter:
        assert limiter.async_limiter.deadline == 5.0
        limiter.available("k", RESOURCE, [LIMIT], deadline=SETUP_S)
        proxy.inject("hang")
        started = time.monotonic()
        with (
            pytest.raises(RateLimiterUnavailable),
            limiter.acquire("k", RESOURCE, [LIMIT], {"tok": 1}, deadline=0.3),
        ):
            pass
        assert time.monotonic() - started <= 1.5 * 0.3
        proxy.clear()


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "1", True])
async def test_a_bad_deadline_is_a_validation_error(proxy: FaultProxy, value: object) -> None:
    with pytest.raises(ValidationError) as raised:
        RateLimiter(name=TABLE, endpoint_url=proxy.endpoint_url, deadline=value)  # type: ignore[arg-type]
    assert raised.value.field == "deadline"
    limiter = limiter_for(proxy)
    try:
        with pytest.raises(ValidationError) as raised:
            await acquire_once(limiter, deadline=value)
        assert raised.value.field == "deadline"
        with pytest.raises(ValidationError):
            await limiter.available("k", RESOURCE, [LIMIT], deadline=value)  # type: ignore[arg-type]
        assert proxy.requests() == []  # rejected before any I/O
    finally:
        await limiter.close()


# -- the default deadline ---------------------------------------------------------------------


def _non_loopback_endpoint() -> tuple[str, str]:
    """(address to listen on, host to put in the URL) reaching this host without a URL that
    `is_loopback` recognizes: an address of one of its interfaces outside 127.0.0.0/8 (the one
    a datagram to a documentation address would leave from; nothing is sent), else its host
    name, which resolves locally (/etc/hosts) but is a name, and names other than localhost are
    never taken for loopback. A host with neither cannot reach itself but through loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("198.51.100.1", 9))
            address = probe.getsockname()[0]
        if not is_loopback(address):
            return address, address
    except OSError:
        pass
    name = socket.gethostname()
    address = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    return address, name


class HungEndpoint:
    """A TCP server that reads every request and never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: list[asyncio.Task[Any]] = []

    async def start(self, address: str) -> int:
        self._server = await asyncio.start_server(self._hang, address, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _hang(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.append(task)
        while chunk := await reader.read(65536):
            self.received += len(chunk)

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()  # the handler reads end-of-file and returns
        if self._handlers:  # ended here, not cancelled by the loop's shutdown (which warns)
            await asyncio.wait(self._handlers, timeout=5)
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def hung_remote() -> AsyncIterator[tuple[str, HungEndpoint]]:
    address, host = _non_loopback_endpoint()
    endpoint = HungEndpoint()
    port = await endpoint.start(address)
    try:
        yield f"http://{host}:{port}", endpoint
    finally:
        await endpoint.close()


@pytest.mark.parametrize("mode", [FailureMode.FAIL_CLOSED, FailureMode.FAIL_OPEN])
async def test_default_deadline_bounds_a_hung_endpoint_that_is_not_loopback(
    hung_remote: tuple[str, HungEndpoint], figures: Figures, mode: FailureMode
) -> None:
    """No `deadline=`, the default retry policy (a 5 s read timeout per attempt): the 1 s
    default alone bounds a cold acquire (the version check is its first request)."""
    url, endpoint = hung_remote
    assert not is_loopback(url)
    limiter = RateLimiter(name=TABLE, endpoint_url=url, region="us-east-1", failure_mode=mode)
    try:
        assert limiter.deadline == DEFAULT_DEADLINE_SECONDS == 1.0
        assert limiter.repository.retry.read_timeout > 3 * DEFAULT_DEADLINE_SECONDS
        await limiter.repository.open()
        started = time.monotonic()
        if mode is FailureMode.FAIL_CLOSED:
            with pytest.raises(RateLimiterUnavailable) as raised:
                await acquire_once(limiter)
            assert isinstance(raised.value.cause, DeadlineExceeded), raised.value.cause
        else:
            assert await acquire_once(limiter) is True  # admitted fail-open
        elapsed = time.monotonic() - started
        figures.worst(f"default_deadline_hung_remote_s.{mode.name}", round(elapsed, 2))
        assert DEFAULT_DEADLINE_SECONDS <= elapsed <= 1.5 * DEFAULT_DEADLINE_SECONDS, elapsed
        assert endpoint.connections >= 1 and endpoint.received > 0, "the request never arrived"
    finally:
        await limiter.close()


@pytest.mark.parametrize(
    ("endpoint_url", "expected"),
    [
        ("http://127.0.0.1:8000", LOOPBACK_DEADLINE_SECONDS),
        ("http://127.9.9.9:8000", LOOPBACK_DEADLINE_SECONDS),
        ("http://localhost:8000", LOOPBACK_DEADLINE_SECONDS),
        ("http://[::1]:8000", LOOPBACK_DEADLINE_SECONDS),
        ("http://192.0.2.10:8000", DEFAULT_DEADLINE_SECONDS),
        ("https://dynamodb.eu-west-1.amazonaws.com", DEFAULT_DEADLINE_SECONDS),
        (None, DEFAULT_DEADLINE_SECONDS),
    ],
)
def test_the_default_deadline_follows_the_endpoint(
    endpoint_url: str | None, expected: float
) -> None:
    built = RateLimiter(name=TABLE, endpoint_url=endpoint_url, region="us-east-1")
    assert built.deadline == expected
    # A repository passed in decides by its own endpoint; an explicit deadline always wins.
    repo = Repository(TABLE, "us-east-1", endpoint_url)
    assert RateLimiter(name=TABLE, repository=repo).deadline == expected
    assert RateLimiter(name=TABLE, endpoint_url=endpoint_url, deadline=2.5).deadline == 2.5
    assert RateLimiter(name=TABLE, endpoint_url=endpoint_url, deadline=None).deadline is None
    sync = SyncRateLimiter(name=TABLE, endpoint_url=endpoint_url, region="us-east-1")
    try:
        assert sync.async_limiter.deadline == expected
    finally:
        sync.close()
