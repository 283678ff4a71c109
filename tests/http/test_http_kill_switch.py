"""Kill switches through the HTTP layer: a disabled resource or key is a 503 problem+json with
`Retry-After` (the limiter's switch TTL), a bypassed one passes with nothing consumed; in-process
(the middleware and the FastAPI dependency) and in a real uvicorn process, which sees a change
made by this process within its TTL.

No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time."""

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from asgi_calls import call
from fastapi import Depends, FastAPI
from starlette.responses import JSONResponse

from zae_limiter import FailureMode, Lease, Limit, RateLimiter, StackOptions
from zae_limiter.http.asgi import RateLimitMiddleware, header_key
from zae_limiter.http.fastapi import RateLimit, install
from zae_limiter.ops.local import LocalDynamoDB, free_port

pytestmark = pytest.mark.integration

T0 = 1_800_000_000_000
RPM = Limit.per_minute("rpm", 10)
KEY = header_key("x-api-key")
HERE = Path(__file__).resolve().parent


@pytest.fixture
async def limiter(endpoint_url: str) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(name="httpkill", endpoint_url=endpoint_url, clock=lambda: T0,
                           stack_options=StackOptions(), limits_cache_ttl=2.5) as lim:
        yield lim


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await JSONResponse({"ok": True})(scope, receive, send)


async def test_middleware_disabled_is_503_problem_json_in_every_failure_mode(
    limiter: RateLimiter,
) -> None:
    await limiter.disable_resource("api")
    for mode in FailureMode:
        mw = RateLimitMiddleware(ok, limiter=limiter, limits=[RPM], key=KEY, resource="api",
                                 failure_mode=mode)
        result = await call(mw, key="sk-secret-key")
        assert result.status == 503
        assert result.headers["content-type"] == "application/problem+json"
        assert result.headers["retry-after"] == "3"  # the TTL, 2.5 s, in whole seconds up
        problem = (result.body.decode())
        assert '"status":503' in problem and '"reason":"disabled"' in problem
        assert "sk-secret-key" not in problem and "ratelimit" not in result.headers
    assert await limiter.available("sk-secret-key", "api", [RPM]) == {"rpm": 10}
    await limiter.enable_resource("api")
    await limiter.disable_entity("sk-secret-key")
    result = await call(mw, key="sk-secret-key")
    assert result.status == 503 and b"this key" in result.body
    assert (await call(mw, key="another-key")).status == 200


async def test_middleware_bypass_is_200_with_nothing_consumed_and_no_call(
    limiter: RateLimiter,
) -> None:
    mw = RateLimitMiddleware(ok, limiter=limiter, limits=[RPM], key=KEY, resource="api")
    assert (await call(mw)).status == 200
    await limiter.bypass_resource("api")
    limiter.ledger.reset()
    results = [await call(mw) for _ in range(15)]  # more than the limit's 10
    assert {r.status for r in results} == {200}
    assert all("ratelimit" not in r.headers for r in results)  # no bucket was seen
    assert limiter.ledger.total_calls == 0
    assert await limiter.available("k1", "api", [RPM]) == {"rpm": 9}
    await limiter.enable_resource("api")
    assert "ratelimit" in (await call(mw)).headers


def build(limiter: RateLimiter) -> FastAPI:
    app = FastAPI()
    install(app)
    limited = RateLimit(limiter=limiter, limits=[RPM], key=KEY, resource="search")

    @app.get("/search")
    async def search(lease: Annotated[Lease | None, Depends(limited)]) -> dict[str, object]:
        assert lease is not None
        return {"bypassed": lease.bypassed, "consumed": lease.consumed}

    return app


async def test_fastapi_dependency_disabled_and_bypassed(limiter: RateLimiter) -> None:
    transport = httpx.ASGITransport(app=build(limiter), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        await limiter.disable_entity("k1")
        refused = await http.get("/search", headers={"x-api-key": "k1"})
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["reason"] == "disabled" and refused.headers["retry-after"] == "3"
        await limiter.bypass_entity("k1")
        passed = await http.get("/search", headers={"x-api-key": "k1"})
        assert passed.status_code == 200
        assert passed.json() == {"bypassed": True, "consumed": {}}
        await limiter.enable_entity("k1")
        limited = await http.get("/search", headers={"x-api-key": "k1"})
        assert limited.json() == {"bypassed": False, "consumed": {"rpm": 1}}


# -- a real uvicorn process ----------------------------------------------------------------------

TTL = 0.5


async def _wait_for(http: httpx.AsyncClient, url: str, status: int) -> float:
    started = time.monotonic()
    while time.monotonic() - started < 10:
        try:
            if (await http.get(url, headers={"x-api-key": "k-uvicorn"})).status_code == status:
                return time.monotonic() - started
        except httpx.TransportError:  # not listening yet
            pass
        await asyncio.sleep(0.02)
    return float("inf")


async def test_uvicorn_process_sees_disable_and_bypass_within_its_ttl(
    moto_server: LocalDynamoDB,
) -> None:
    moto_server.reset()
    table = "httpkillserver"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ZAEL_HTTP_ENDPOINT": moto_server.endpoint_url,
           "ZAEL_HTTP_TABLE": table, "ZAEL_HTTP_CACHE_TTL": str(TTL),
           "ZAEL_HTTP_DEAD_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "--factory",
               "http_app:create_app", "--log-level", "warning", "--host", "127.0.0.1",
               "--port", str(port)]
    async with RateLimiter(name=table, endpoint_url=moto_server.endpoint_url,
                           stack_options=StackOptions()) as admin, httpx.AsyncClient(
                               timeout=10) as http:
        with tempfile.TemporaryFile() as log:
            server = subprocess.Popen(command, env=env, stdout=log, stderr=log)
            try:
                assert await _wait_for(http, f"{url}/health", 200) < 10, "uvicorn did not start"
                assert (await http.get(f"{url}/exact",
                                       headers={"x-api-key": "k-uvicorn"})).status_code == 200
                await admin.disable_resource("exact")
                disabled = await _wait_for(http, f"{url}/exact", 503)
                refused = await http.get(f"{url}/exact", headers={"x-api-key": "k-uvicorn"})
                await admin.bypass_resource("exact")
                bypassed = await _wait_for(http, f"{url}/exact", 200)
                before = await admin.available("k-uvicorn", "exact", [Limit.per_day("rpd", 30)])
                for _ in range(5):
                    response = await http.get(f"{url}/exact", headers={"x-api-key": "k-uvicorn"})
                    assert response.status_code == 200 and "ratelimit" not in response.headers
                after = await admin.available("k-uvicorn", "exact", [Limit.per_day("rpd", 30)])
            finally:
                server.terminate()
                server.wait(timeout=10)
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "1"  # 0.5 s up to a whole second
    assert refused.json()["status"] == 503
    assert disabled < TTL + 0.5 and bypassed < TTL + 0.5, (disabled, bypassed)
    # Bypassed requests consume nothing (those polled before the server saw the disable did).
    assert before == after and before["rpd"] < 30
