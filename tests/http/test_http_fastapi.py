"""`zae_limiter.fastapi`: the per-route dependency, in-process through httpx's ASGI transport,
over moto's server with a frozen clock.

No `from __future__ import annotations` here: FastAPI reads the routes' annotations at run time,
and they name dependencies local to `build`."""

from collections.abc import AsyncIterator
from typing import Annotated

import http_sfv
import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from zae_limiter import Lease, Limit, RateLimiter, StackOptions
from zae_limiter.http.asgi import HttpOptions, header_key
from zae_limiter.http.fastapi import RateLimit, fields_of, install

pytestmark = pytest.mark.integration

T0 = 1_800_000_000_000
RPM = Limit.per_minute("rpm", 2)
TPM = Limit.per_minute("tpm", 1000)


@pytest.fixture
async def limiter(endpoint_url: str) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(
        name="fastapi", endpoint_url=endpoint_url, stack_options=StackOptions(), clock=lambda: T0
    ) as lim:
        yield lim


def build(limiter: RateLimiter, *, installed: bool = True) -> FastAPI:
    app = FastAPI()
    if installed:
        install(app)

    async def not_yours(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "forbidden"}, 403)

    app.add_exception_handler(PermissionError, not_yours)
    per_search = RateLimit(
        limiter=limiter, limits=[RPM], key=header_key("x-api-key"), resource="search"
    )
    per_chat = RateLimit(
        limiter=limiter,
        limits=[RPM, TPM],
        key=header_key("x-api-key"),
        resource="chat",
        cost=lambda scope: {"rpm": 1, "tpm": 100},
        quota_units={"tpm": "tokens"},
    )

    @app.get("/search")
    async def search(lease: Annotated[Lease | None, Depends(per_search)]) -> dict[str, object]:
        return {"consumed": None if lease is None else lease.consumed}

    @app.get("/fail")
    async def fail(lease: Annotated[Lease | None, Depends(per_search)]) -> None:
        raise RuntimeError("handler failed")

    @app.get("/missing")
    async def missing(lease: Annotated[Lease | None, Depends(per_search)]) -> None:
        raise HTTPException(404, "no such item")

    @app.get("/forbidden")
    async def forbidden(lease: Annotated[Lease | None, Depends(per_search)]) -> None:
        raise PermissionError("not yours")

    @app.get("/item")
    async def item(n: int, lease: Annotated[Lease | None, Depends(per_search)]) -> None:
        return None

    @app.get("/after")
    async def after(lease: Annotated[Lease | None, Depends(per_search)]) -> JSONResponse:
        def fail() -> None:
            raise RuntimeError("background task failed")

        return JSONResponse({"ok": True}, background=BackgroundTask(fail))

    @app.get("/chat")
    async def chat(
        request: Request, lease: Annotated[Lease | None, Depends(per_chat)]
    ) -> StreamingResponse:
        assert lease is not None

        async def body() -> AsyncIterator[bytes]:
            yield b"data: hello\n\n"
            await lease.adjust(tpm=240 - 100)  # the real count, known at the end
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), headers=fields_of(request))

    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def remaining(value: str) -> dict[str, int]:
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    return {str(item.value): int(item.params["r"]) for item in parsed}


async def test_dependency_hands_the_lease_and_adds_the_fields(limiter: RateLimiter) -> None:
    async with client(build(limiter)) as http:
        response = await http.get("/search", headers={"x-api-key": "k1"})
    assert response.status_code == 200
    assert response.json() == {"consumed": {"rpm": 1}}
    assert response.headers["ratelimit-policy"] == '"rpm";q=2;w=60'
    assert remaining(response.headers["ratelimit"]) == {"rpm": 1}
    assert await limiter.available("k1", "search", [RPM]) == {"rpm": 1}


async def test_no_key_is_refused_by_default(limiter: RateLimiter) -> None:
    async with client(build(limiter)) as http:
        response = await http.get("/search")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert "ratelimit" not in response.headers


async def test_no_key_passes_unlimited_when_told(limiter: RateLimiter) -> None:
    app = FastAPI()
    install(app)
    open_search = RateLimit(
        limiter=limiter, limits=[RPM], key=header_key("x-api-key"), missing_key="pass"
    )

    @app.get("/open")
    async def search(lease: Annotated[Lease | None, Depends(open_search)]) -> dict[str, object]:
        return {"consumed": None if lease is None else lease.consumed}

    async with client(app) as http:
        response = await http.get("/open")
    assert response.json() == {"consumed": None}
    assert "ratelimit" not in response.headers


@pytest.mark.parametrize("installed", [True, False])
async def test_denial_is_429_problem_json_with_the_fields(
    limiter: RateLimiter, installed: bool
) -> None:
    async with client(build(limiter, installed=installed)) as http:
        for _ in range(2):
            assert (await http.get("/search", headers={"x-api-key": "k1"})).status_code == 200
        denied = await http.get("/search", headers={"x-api-key": "k1"})
    assert denied.status_code == 429
    assert int(denied.headers["retry-after"]) == 30  # one token of 2/minute
    assert remaining(denied.headers["ratelimit"]) == {"rpm": 0}
    if installed:
        assert denied.headers["content-type"] == "application/problem+json"
        problem = denied.json()
    else:  # FastAPI's own handler: same status and fields, the problem under "detail"
        problem = denied.json()["detail"]
    assert problem["status"] == 429 and problem["violated-policies"] == ["rpm"]


async def test_handler_error_gives_the_cost_back(limiter: RateLimiter) -> None:
    async with client(build(limiter)) as http:
        response = await http.get("/fail", headers={"x-api-key": "k1"})
    assert response.status_code == 500
    assert await limiter.available("k1", "search", [RPM]) == {"rpm": 2}


@pytest.mark.parametrize("installed", [True, False])
async def test_a_4xx_from_the_handler_is_charged(limiter: RateLimiter, installed: bool) -> None:
    async with client(build(limiter, installed=installed)) as http:
        for _ in range(2):
            response = await http.get("/missing", headers={"x-api-key": "k1"})
            assert response.status_code == 404
        assert (await http.get("/missing", headers={"x-api-key": "k1"})).status_code == 429
    assert await limiter.available("k1", "search", [RPM]) == {"rpm": 0}


@pytest.mark.parametrize(("path", "status"), [("/forbidden", 403), ("/item?n=x", 422)])
async def test_an_exception_a_handler_answers_with_a_4xx_is_charged(
    limiter: RateLimiter, path: str, status: int
) -> None:
    async with client(build(limiter)) as http:
        assert (await http.get(path, headers={"x-api-key": "k1"})).status_code == status
    assert await limiter.available("k1", "search", [RPM]) == {"rpm": 1}


async def test_an_exception_after_the_response_is_charged(limiter: RateLimiter) -> None:
    async with client(build(limiter)) as http:
        response = await http.get("/after", headers={"x-api-key": "k1"})
    assert response.status_code == 200
    assert await limiter.available("k1", "search", [RPM]) == {"rpm": 1}


async def test_streaming_handler_reconciles_through_its_lease(limiter: RateLimiter) -> None:
    async with client(build(limiter)) as http:
        response = await http.get("/chat", headers={"x-api-key": "k1"})
    assert response.status_code == 200 and response.text.endswith("[DONE]\n\n")
    assert remaining(response.headers["ratelimit"]) == {"rpm": 1, "tpm": 900}
    assert await limiter.available("k1", "chat", [RPM, TPM]) == {"rpm": 1, "tpm": 760}


async def test_routes_share_one_options_object(limiter: RateLimiter) -> None:
    """The dependency takes the middleware's `HttpOptions`; a keyword replaces one field."""
    shared = HttpOptions(limits=[RPM], key=header_key("x-api-key"), resource="shared")
    app = FastAPI()
    install(app)
    per_shared = RateLimit(limiter=limiter, options=shared)
    per_other = RateLimit(limiter=limiter, options=shared, resource="other")

    @app.get("/shared")
    async def one(lease: Annotated[Lease | None, Depends(per_shared)]) -> None:
        return None

    @app.get("/other")
    async def other(lease: Annotated[Lease | None, Depends(per_other)]) -> None:
        return None

    async with client(app) as http:
        assert (await http.get("/shared", headers={"x-api-key": "k1"})).status_code == 200
        assert (await http.get("/other", headers={"x-api-key": "k1"})).status_code == 200
        assert (await http.get("/other", headers={"x-api-key": "k1"})).status_code == 200
        assert (await http.get("/other", headers={"x-api-key": "k1"})).status_code == 429
    assert await limiter.available("k1", "shared", [RPM]) == {"rpm": 1}
    assert per_shared.options is shared and shared.resource == "shared"
