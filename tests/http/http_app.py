"""The application the uvicorn tests serve (`uvicorn --factory http_app:create_app`).

Each route is wrapped in its own `RateLimitMiddleware`, all over one limiter on the table the
test created (`ZAEL_HTTP_ENDPOINT`, `ZAEL_HTTP_TABLE`), except `/down`, whose limiter points at a
port nobody listens on (`ZAEL_HTTP_DEAD_ENDPOINT`) and fails closed. `/api` is a FastAPI
application limited by the `RateLimit` dependency. `/ledger` tells the DynamoDB calls this
process made.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, request_response

from zae_limiter import FailureMode, Lease, Limit, RateLimiter
from zae_limiter.http.asgi import (
    RateLimitMiddleware,
    Served,
    client_address_key,
    header_key,
    total_tokens,
)
from zae_limiter.http.fastapi import RateLimit, install
from zae_limiter.storage.dynamodb.client import RetryPolicy

# 30 a day: nothing refills during a test (one token every 48 minutes).
EXACT = Limit.per_day("rpd", 30)
# Per-day limits small enough that refill stays under one token over a test (86 s and 43 s).
FIELDS = [Limit.per_day("rpd", 1000), Limit.per_day("tpd", 2000)]
FIELDS_COST = {"rpd": 1, "tpd": 5}
FAST = Limit.per_second("rps", 1)
# The charging tests: 3 a day, nothing refills during a test.
THREE = Limit.per_day("rpd", 3)
# A timeout middleware's budget: ample for the acquire and the response on a loaded machine,
# short of the background task's 30 s.
TIMEOUT_SECONDS = 2.0
# What every request that no client address keys shares (`/addr-fallback`).
NO_ADDRESS = "no-address"
STREAM = [Limit.per_day("rpd", 1000), Limit.per_day("tpd", 4000)]
STREAM_ESTIMATE = {"rpd": 1, "tpd": 100}
# What the hook charges for a stream the client left: no usage chunk ever came.
DISCONNECTED_COST = 7
UNITS = {"tpd": "tokens"}

key = header_key("x-api-key")


def reconcile(served: Served) -> Mapping[str, int] | None:
    if served.disconnected and not served.complete:
        return {"tpd": DISCONNECTED_COST}
    tokens = total_tokens(served.tail)
    return None if tokens is None else {"tpd": tokens}


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def stream(request: Request) -> Response:
    """An OpenAI-shaped SSE chat completion: `chunks` deltas, then the usage chunk."""
    chunks = int(request.query_params.get("chunks", "5"))
    delay = float(request.query_params.get("delay", "0"))
    total = int(request.query_params["total"])

    async def events() -> AsyncIterator[bytes]:
        for i in range(chunks):
            delta = {"choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}
            yield f"data: {json.dumps(delta)}\n\n".encode()
            await asyncio.sleep(delay)
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "total_tokens": total}}
        yield f"data: {json.dumps(usage)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


def _fail() -> None:
    raise RuntimeError("background task failed")


async def failing_background(request: Request) -> Response:
    """A complete 200, then a background task that raises."""
    return JSONResponse({"ok": True}, background=BackgroundTask(_fail))


async def stream_then_linger(request: Request) -> Response:
    """A complete stream, then cleanup work that outlasts the timeout around it."""

    async def events() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"data: {i}\n\n".encode()

    return StreamingResponse(
        events(), media_type="text/event-stream", background=BackgroundTask(asyncio.sleep, 30)
    )


class Timeout:
    """A timeout middleware, as many applications put in front: it cancels the request task
    when its time is up, whether or not the response was sent."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with asyncio.timeout(self.seconds):
                await self.app(scope, receive, send)
        except TimeoutError:
            pass  # the response (if any) is what the client got


def api(limiter: RateLimiter) -> FastAPI:
    app = FastAPI()
    install(app)
    login_limit = RateLimit(limiter=limiter, limits=[THREE], key=key, resource="login")

    # A default, not `Annotated`: this module's annotations are strings, and FastAPI resolves
    # them in the module's globals, where a local dependency is not.
    async def login(lease: Lease | None = Depends(login_limit)) -> None:  # noqa: B008
        raise HTTPException(401, "wrong password")

    app.add_api_route("/login", login, methods=["POST"])
    return app


def create_app() -> Starlette:
    table = os.environ["ZAEL_HTTP_TABLE"]
    # The stored config's cache TTL (kill switches included): the default unless a test says.
    ttl = float(os.environ.get("ZAEL_HTTP_CACHE_TTL", "30"))
    limiter = RateLimiter(
        name=table, endpoint_url=os.environ["ZAEL_HTTP_ENDPOINT"], limits_cache_ttl=ttl
    )
    dead = RateLimiter(
        name=table,
        endpoint_url=os.environ["ZAEL_HTTP_DEAD_ENDPOINT"],
        failure_mode=FailureMode.FAIL_CLOSED,
        retry=RetryPolicy(max_attempts=1, connect_timeout=0.5, read_timeout=0.5),
    )

    def limited(endpoint: Callable[[Request], Awaitable[Response]], **options: Any) -> Any:
        return RateLimitMiddleware(request_response(endpoint), limiter=limiter, key=key, **options)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await limiter.close()
        await dead.close()

    async def ledger(request: Request) -> Response:
        return JSONResponse(dict(limiter.ledger.calls))

    routes = [
        Route("/health", health),
        Route("/ledger", ledger),
        Route(
            "/background",
            limited(failing_background, limits=[THREE], resource="background"),
        ),
        Route(
            "/linger",
            Timeout(
                limited(stream_then_linger, limits=[THREE], resource="linger"), TIMEOUT_SECONDS
            ),
        ),
        Route("/cascade", limited(ok, limits=[EXACT], resource="cascade", cascade=True)),
        Route(
            "/addr",
            RateLimitMiddleware(
                request_response(ok),
                limiter=limiter,
                limits=[THREE],
                key=client_address_key,
                resource="addr",
            ),
        ),
        Route(
            "/addr-fallback",
            RateLimitMiddleware(
                request_response(ok),
                limiter=limiter,
                limits=[THREE],
                key=client_address_key,
                missing_key=lambda scope: NO_ADDRESS,
                resource="addr-fallback",
            ),
        ),
        Mount("/api", api(limiter)),
        Route("/exact", limited(ok, limits=[EXACT], resource="exact")),
        Route(
            "/fields",
            limited(
                ok,
                limits=FIELDS,
                resource="fields",
                cost=lambda scope: FIELDS_COST,
                quota_units=UNITS,
            ),
        ),
        Route("/fast", limited(ok, limits=[FAST], resource="fast")),
        Route(
            "/stream",
            limited(
                stream,
                limits=STREAM,
                resource="stream",
                cost=lambda scope: STREAM_ESTIMATE,
                quota_units=UNITS,
                reconcile=reconcile,
            ),
        ),
        Route(
            "/down",
            RateLimitMiddleware(
                request_response(ok), limiter=dead, limits=[EXACT], key=key, resource="down"
            ),
        ),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
