"""The middleware holds a concurrency cap's slots for the whole response: until a streamed body
ends, or until the client goes away mid-stream (in-process ASGI calls on `MemoryStorage`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from asgi_calls import call
from starlette.responses import StreamingResponse

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
