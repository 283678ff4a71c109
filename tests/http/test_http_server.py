"""The middleware in a real uvicorn process on loopback, driven by httpx over TCP.

One server for the module (`http_app.create_app`), on moto's server that the session's fixture
runs: its routes each have their own limits (see `http_app`). What is proven:
- the RateLimit fields parse as RFC 9651 Lists (`http_sfv`) and agree with `available()`;
- under concurrency (70 requests from 2 client processes at once) exactly the limit is admitted;
- waiting the Retry-After of a 429 and retrying gets a 200;
- a streaming response is reconciled with its real token count once it ended, and a stream the
  client leaves mid-way is reconciled too;
- a limiter that cannot reach DynamoDB under FAIL_CLOSED answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import http_app
import http_sfv
import httpx
import pytest

from zae_limiter import Limit, RateLimiter, StackOptions
from zae_limiter.local import LocalDynamoDB, free_port

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
TABLE = "httpserver"
STARTUP_SECONDS = 30.0


@dataclass(frozen=True)
class Server:
    url: str


async def _create_table(endpoint_url: str) -> None:
    async with RateLimiter(name=TABLE, endpoint_url=endpoint_url, stack_options=StackOptions()):
        pass


@pytest.fixture(scope="module")
def server(moto_server: LocalDynamoDB) -> Iterator[Server]:
    moto_server.reset()
    asyncio.run(_create_table(moto_server.endpoint_url))
    port = free_port()
    env = {
        **os.environ,
        "ZAEL_HTTP_ENDPOINT": moto_server.endpoint_url,
        "ZAEL_HTTP_TABLE": TABLE,
        # Nobody listens there: the route's limiter cannot reach DynamoDB.
        "ZAEL_HTTP_DEAD_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "--factory"]
    args += ["http_app:create_app", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--log-level", "warning"]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_up(process, url, log)
            yield Server(url)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _wait_until_up(process: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"uvicorn exited: {log.read().decode()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("uvicorn did not answer in time")


@pytest.fixture
async def reader(moto_server: LocalDynamoDB) -> AsyncIterator[RateLimiter]:
    """Another client of the table: reads what the server's limiter wrote."""
    async with RateLimiter(name=TABLE, endpoint_url=moto_server.endpoint_url) as limiter:
        yield limiter


def parse_list(value: str) -> dict[str, dict[str, object]]:
    """An RFC 9651 List of Items whose values are Strings, by value: their parameters."""
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    items: dict[str, dict[str, object]] = {}
    for item in parsed:
        assert type(item.value) is str  # a String, not a Token (draft-11)
        items[item.value] = dict(item.params)
    return items


async def until_available(
    reader: RateLimiter,
    key: str,
    resource: str,
    limits: Sequence[Limit],
    expected: Mapping[str, int],
    timeout: float = 10.0,
) -> dict[str, int]:
    """What `available()` says once it equals `expected`, or when `timeout` passed."""
    deadline = time.monotonic() + timeout
    while True:
        seen = await reader.available(key, resource, limits)
        if seen == expected or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.1)


async def test_fields_parse_and_agree_with_available(server: Server, reader: RateLimiter) -> None:
    limits, cost = http_app.FIELDS, http_app.FIELDS_COST
    async with httpx.AsyncClient(base_url=server.url) as client:
        for n in (1, 2):
            response = await client.get("/fields", headers={"x-api-key": "fields-a"})
            assert response.status_code == 200
            policy = parse_list(response.headers["ratelimit-policy"])
            assert policy == {
                "rpd": {"q": 1000, "w": 86400},
                "tpd": {"q": 2000, "qu": "tokens", "w": 86400},
            }
            current = parse_list(response.headers["ratelimit"])
            remaining = {name: params["r"] for name, params in current.items()}
            assert remaining == {lim.name: lim.capacity - n * cost[lim.name] for lim in limits}
            assert await reader.available("fields-a", "fields", limits) == remaining
            # The next whole unit comes back within a day's share of one unit.
            assert current["rpd"]["t"] == 87 and current["tpd"]["t"] == 44


def _clients(url: str, key: str, per_process: int, processes: int) -> list[dict[str, object]]:
    start_at = time.time() + 2.0  # both processes import httpx first, then fire together
    script = str(HERE / "http_clients.py")
    running = [
        subprocess.Popen(
            [sys.executable, script, url, key, str(per_process), str(start_at)],
            stdout=subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    results: list[dict[str, object]] = []
    for process in running:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        results += [json.loads(line) for line in out.decode().splitlines()]
    return results


async def test_admitted_count_is_exact_under_concurrency(
    server: Server, reader: RateLimiter
) -> None:
    results = await asyncio.to_thread(_clients, f"{server.url}/exact", "exact-a", 35, 2)
    statuses = [r["status"] for r in results]
    assert len(statuses) == 70
    assert statuses.count(200) == http_app.EXACT.capacity
    assert statuses.count(429) == 70 - http_app.EXACT.capacity
    for r in results:
        if r["status"] == 429:
            assert r["content_type"] == "application/problem+json"
            assert int(str(r["retry_after"])) >= 1
            assert parse_list(str(r["ratelimit"]))["rpd"]["r"] == 0
    assert await reader.available("exact-a", "exact", [http_app.EXACT]) == {"rpd": 0}


async def test_waiting_retry_after_then_retrying_gets_200(server: Server) -> None:
    headers = {"x-api-key": "fast-a"}
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/fast", headers=headers)).status_code == 200
        denied = await client.get("/fast", headers=headers)
        assert denied.status_code == 429
        wait = int(denied.headers["retry-after"])
        assert wait >= 1
        current = parse_list(denied.headers["ratelimit"])["rps"]
        assert current["r"] == 0 and 1 <= int(str(current["t"])) <= wait
        problem = denied.json()
        assert problem["status"] == 429 and problem["violated-policies"] == ["rps"]
        await asyncio.sleep(wait)
        assert (await client.get("/fast", headers=headers)).status_code == 200


async def test_streaming_response_is_reconciled_with_its_usage(
    server: Server, reader: RateLimiter
) -> None:
    limits, estimate = http_app.STREAM, http_app.STREAM_ESTIMATE
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/stream?total=42", headers={"x-api-key": "stream-a"})
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n")
    # The fields were sent before the body: they show the estimate.
    assert parse_list(response.headers["ratelimit"])["tpd"]["r"] == 4000 - estimate["tpd"]
    expected = {"rpd": 1000 - 1, "tpd": 4000 - 42}
    assert await until_available(reader, "stream-a", "stream", limits, expected) == expected


async def test_stream_left_mid_way_is_still_reconciled(server: Server, reader: RateLimiter) -> None:
    limits = http_app.STREAM
    url = "/stream?total=42&chunks=1000&delay=0.01"
    async with (
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("GET", url, headers={"x-api-key": "stream-b"}) as response,
    ):
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            assert chunk.startswith(b"data: ")
            break  # leaving the block closes the connection mid-stream
    expected = {"rpd": 1000 - 1, "tpd": 4000 - http_app.DISCONNECTED_COST}
    assert await until_available(reader, "stream-b", "stream", limits, expected) == expected


async def test_unreachable_dynamodb_under_fail_closed_is_503(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/down", headers={"x-api-key": "down-a"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 503
    assert "ratelimit" not in response.headers
