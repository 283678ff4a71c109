"""The middleware holds a concurrency cap's slots for the whole response: until a streamed body
ends, or until the client goes away mid-stream (in-process ASGI calls on `MemoryStorage`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from asgi_calls import call
from starlette.responses import JSONResponse, StreamingResponse

from zae_limiter import Limit, MemoryStorage, RateLimiter
from zae_limiter.http.asgi import RateLimitMiddleware, header_key

STREAMS = Limit.concurrency("streams", 1)
RPM = Limit.per_minute("rpm", 100)


async def test_a_stream_holds_its_slot_until_its_body_ends() -> None:
    release = asyncio.Event()
    sent_first = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"first\n"
        sent_first.set()
        await release.wait()
        yield b"last\n"

    async with RateLimiter(repository=MemoryStorage()) as limiter:
        mw = RateLimitMiddleware(
            lambda scope, receive, send: StreamingResponse(body())(scope, receive, send),
            limiter=limiter,
            limits=[STREAMS, RPM],
            key=header_key("x-api-key"),
            cost=lambda scope: {"rpm": 1},
        )
        streaming = asyncio.create_task(call(mw))
        await sent_first.wait()
        # Mid-stream: the slot is held, a second request is refused with a retry hint.
        assert await limiter.available("k1", "http", [STREAMS]) == {"streams": 0}
        refused = await call(mw)
        assert refused.status == 429
        assert refused.headers["retry-after"] == "1"
        release.set()
        done = await streaming
        assert done.status == 200 and done.complete and done.body == b"first\nlast\n"
        assert await limiter.available("k1", "http", [STREAMS, RPM]) == {
            "streams": 1,
            "rpm": 99,  # the refused request took no token
        }
        again = await call(mw)
        assert again.status == 200


async def test_a_client_leaving_mid_stream_frees_the_slot() -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"data: x\n\n"
            await asyncio.sleep(0.001)

    async with RateLimiter(repository=MemoryStorage()) as limiter:
        mw = RateLimitMiddleware(
            lambda scope, receive, send: StreamingResponse(endless())(scope, receive, send),
            limiter=limiter,
            limits=[STREAMS],
            key=header_key("x-api-key"),
        )
        left = await asyncio.wait_for(call(mw, leave_after=3), 10)
        assert left.status == 200 and not left.complete
        assert await limiter.available("k1", "http", [STREAMS]) == {"streams": 1}
        second = await asyncio.wait_for(call(mw, leave_after=1), 10)
        assert second.status == 200


async def test_the_fields_of_a_cap_say_its_free_slots_and_its_retry_hint() -> None:
    """A cap has no refill and no window: `q` its max, `qu` the draft's "concurrent-requests",
    no `w`, `r` the free slots, `t` the retry hint (at most 1 s), on a 200 and on a 429."""
    cap = Limit.concurrency("streams", 2)
    async with RateLimiter(repository=MemoryStorage()) as limiter:
        mw = RateLimitMiddleware(
            JSONResponse({"ok": True}),
            limiter=limiter,
            limits=[cap, RPM],
            key=header_key("x-api-key"),
            cost=lambda scope: {"rpm": 1},
        )
        admitted = await call(mw)
        assert admitted.status == 200
        assert admitted.headers["ratelimit-policy"] == (
            '"rpm";q=100;w=60, "streams";q=2;qu="concurrent-requests"'
        )
        # One of two slots is this request's own while it runs.
        assert admitted.headers["ratelimit"] == '"rpm";r=99;t=1, "streams";r=1;t=1'
        hold = [limiter.acquire("k1", "http", [cap], {}) for _ in range(2)]
        async with hold[0], hold[1]:
            refused = await call(mw)
        assert refused.status == 429 and refused.headers["retry-after"] == "1"
        assert refused.headers["ratelimit-policy"] == '"streams";q=2;qu="concurrent-requests"'
        assert refused.headers["ratelimit"] == '"streams";r=0;t=1'
        problem = json.loads(refused.body)
        assert problem["violated-policies"] == ["streams"]
        assert problem["limits"] == [
            {
                "resource": "http", "limit_name": "streams", "capacity": 2, "burst": 2,
                "available": 0, "requested": 1, "exceeded": True, "retry_after_seconds": 1.0,
            }
        ]  # fmt: skip


async def test_a_soft_cap_is_never_a_429_and_its_fields_show_no_free_slot() -> None:
    soft = Limit.concurrency("streams", 1, soft=True)
    async with RateLimiter(repository=MemoryStorage()) as limiter:
        mw = RateLimitMiddleware(
            JSONResponse({"ok": True}), limiter=limiter, limits=[soft], key=header_key("x-api-key")
        )
        async with limiter.acquire("k1", "http", [soft], {}):
            past = await call(mw)
        assert past.status == 200
        assert past.headers["ratelimit"] == '"streams";r=0;t=1'  # 2 held of 1: never negative
        assert await limiter.available("k1", "http", [soft]) == {"streams": 1}
