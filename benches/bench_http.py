"""The HTTP layer's added latency per request: `RateLimitMiddleware` against the bare app.

In-process ASGI calls (no sockets: a server's own cost is the same with or without the
middleware), one event loop, wall-clock time per request, the median of a few repeats, compared
as ratios within one run:

- the bare app (a 13-byte JSON response);
- the same app behind the middleware, two limits, with reservations, so that acquires are
  served from this process's blocks (no DynamoDB call on the hot path: counted, and asserted);
- `limiter.acquire` alone with the same limits, so the middleware's own part (key, scope, the
  RateLimit fields, the wrapped send) is the difference.

`pytest benches/bench_http.py -s` prints the table; `--benchmark-enable` runs longer.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest

from zae_limiter import BACKEND, Limit, RateLimiter, Reservations, StackOptions
from zae_limiter.http.asgi import RateLimitMiddleware, header_key

Message = MutableMapping[str, Any]
LIMITS = [Limit.per_day("rpm", 10**9), Limit.per_day("tpm", 10**12)]
COST = {"rpm": 1, "tpm": 100}
SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/v1/chat",
    "raw_path": b"/v1/chat",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench"), (b"x-api-key", b"bench-key")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 80),
}
BODY = b'{"ok": true}\n'


async def bare(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"13")],
        }
    )
    await send({"type": "http.response.body", "body": BODY, "more_body": False})


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class Sink:
    """The server's side of `send`: keeps the status and whether the fields came."""

    def __init__(self) -> None:
        self.status = 0
        self.fields = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.fields += any(k == b"ratelimit" for k, _ in message["headers"])


async def per_request(run: Callable[[], Awaitable[None]], n: int, repeats: int) -> float:
    """Median over `repeats` of the wall-clock µs of one call of `run`."""
    for _ in range(max(50, n // 10)):
        await run()
    gc.collect()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(n):
            await run()
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


async def measure(endpoint_url: str, n: int, repeats: int) -> dict[str, float]:
    async with RateLimiter(
        name="httpbench",
        endpoint_url=endpoint_url,
        stack_options=StackOptions(),
        reservations=Reservations(hold_seconds=60, horizon_seconds=30),
    ) as limiter:
        app = RateLimitMiddleware(
            bare,
            limiter=limiter,
            limits=LIMITS,
            key=header_key("x-api-key"),
            resource="chat",
            cost=lambda scope: COST,
            quota_units={"tpm": "tokens"},
        )
        sink = Sink()

        async def bare_call() -> None:
            await bare(SCOPE, _receive, sink)

        async def limited_call() -> None:
            await app(SCOPE, _receive, sink)

        async def acquire_only() -> None:
            async with limiter.acquire("bench-key", "chat", LIMITS, COST):
                pass

        figures = {"bare": await per_request(bare_call, n, repeats)}
        limiter.ledger.reset()
        figures["limited"] = await per_request(limited_call, n, repeats)
        requests = max(50, n // 10) + n * repeats
        figures["calls_per_request"] = sum(limiter.ledger.calls.values()) / requests
        figures["fields"] = sink.fields / requests
        figures["acquire"] = await per_request(acquire_only, n, repeats)
        assert sink.status == 200
    return figures


def test_middleware_latency(
    moto_server: Any, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    timed = bool(request.config.getoption("benchmark_enable", default=False))
    moto_server.reset()
    n, repeats = (20_000, 7) if timed else (1_000, 3)
    f = asyncio.run(measure(moto_server.endpoint_url, n, repeats))
    own = f["limited"] - f["bare"] - f["acquire"]
    with capsys.disabled():
        print(f"\nPer request, in-process ASGI, 2 limits, reservations, {BACKEND} core (µs)")
        print(f"  bare app:                 {f['bare']:8.1f}")
        print(
            f"  behind the middleware:    {f['limited']:8.1f}"
            f"   ({f['limited'] / f['bare']:.1f}x the bare app)"
        )
        print(f"  limiter.acquire alone:    {f['acquire']:8.1f}")
        print(
            f"  the middleware's own part: {own:7.1f}"
            f"   (added latency {f['limited'] - f['bare']:.1f} µs per request)"
        )
        print(f"  DynamoDB calls per request: {f['calls_per_request']:.4f}")
    assert f["fields"] == 1.0  # every response carried the RateLimit fields
    assert f["calls_per_request"] <= 0.01  # the hot path is served from the blocks
    assert f["bare"] > 0 and f["limited"] > 0
