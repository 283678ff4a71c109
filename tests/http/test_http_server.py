"""The middleware in real uvicorn processes on loopback, driven by httpx over TCP.

Two servers on one table for the module (`http_app.create_app`), on moto's server that the
session's fixture runs: its routes each have their own limits (see `http_app`). Each test uses
both processes, so what one charged the other sees. What is proven:
- the RateLimit fields parse as RFC 9651 Lists (`http_sfv`) and agree with `available()`;
- under concurrency (70 requests from 2 client processes, one per server) exactly the limit is
  admitted;
- waiting the Retry-After of a 429 and retrying gets a 200;
- a streaming response is reconciled with its real token count once it ended, and a stream the
  client leaves mid-way is reconciled too;
- a limiter that cannot reach DynamoDB under FAIL_CLOSED answers 503 with Retry-After;
- the charging rule: a FastAPI route answering 401, a response whose background task fails, a
  stream whose task a timeout cancels after the body: each is charged, then 429;
- a client on a Unix socket (no address) is refused, or keyed by the fallback;
- a flood of unknown keys under cascade is 401, one read per key per process, and the key is in
  neither the answer nor the server's log.
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import http_app
import http_sfv
import httpx
import pytest

from zae_limiter import Limit, RateLimiter, StackOptions
from zae_limiter.limiter import MISSING_ENTITY_TTL
from zae_limiter.ops.local import LocalDynamoDB, free_port

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
TABLE = "httpserver"
STARTUP_SECONDS = 30.0


@dataclass(frozen=True)
class Server:
    urls: list[str]
    logs: list[IO[bytes]]

    @property
    def url(self) -> str:
        return self.urls[0]

    def log_text(self) -> str:
        text = ""
        for log in self.logs:
            log.seek(0)
            text += log.read().decode(errors="replace")
        return text


async def _create_table(endpoint_url: str) -> None:
    async with RateLimiter(name=TABLE, endpoint_url=endpoint_url, stack_options=StackOptions()):
        pass


def _environment(moto_server: LocalDynamoDB) -> dict[str, str]:
    return {
        **os.environ,
        "ZAEL_HTTP_ENDPOINT": moto_server.endpoint_url,
        "ZAEL_HTTP_TABLE": TABLE,
        # Nobody listens there: the route's limiter cannot reach DynamoDB.
        "ZAEL_HTTP_DEAD_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }


@contextmanager
def _uvicorn(
    env: dict[str, str], listen: list[list[str]], urls: list[str], transports: list[Any]
) -> Iterator[list[IO[bytes]]]:
    """uvicorn processes serving `http_app`, one per `listen` (its address options), started
    together; yields their logs once each answers."""
    base = [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "--factory"]
    base += ["http_app:create_app", "--log-level", "warning"]
    with ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in listen]
        processes = [
            subprocess.Popen([*base, *where], env=env, stdout=log, stderr=log)
            for where, log in zip(listen, logs, strict=True)
        ]
        try:
            for process, url, transport, log in zip(processes, urls, transports, logs, strict=True):
                _wait_until_up(process, url, transport, log)
            yield logs
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(moto_server: LocalDynamoDB) -> Iterator[Server]:
    moto_server.reset()
    asyncio.run(_create_table(moto_server.endpoint_url))
    ports = [free_port(), free_port()]
    listen = [["--host", "127.0.0.1", "--port", str(port)] for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    with _uvicorn(_environment(moto_server), listen, urls, [None, None]) as logs:
        yield Server(urls, logs)


@pytest.fixture(scope="module")
def socket_path(server: Server, moto_server: LocalDynamoDB) -> Iterator[str]:
    """A third process, on the same table, listening on a Unix socket."""
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "http.sock")
        transport = httpx.HTTPTransport(uds=path)
        with _uvicorn(_environment(moto_server), [["--uds", path]], ["http://uds"], [transport]):
            yield path


def _wait_until_up(
    process: subprocess.Popen[bytes], url: str, transport: Any, log: IO[bytes]
) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    with httpx.Client(transport=transport, timeout=1) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"uvicorn exited: {log.read().decode()}")
            try:
                if client.get(f"{url}/health").status_code == 200:
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
    async with httpx.AsyncClient() as client:
        for n, url in zip((1, 2), server.urls, strict=True):
            response = await client.get(f"{url}/fields", headers={"x-api-key": "fields-a"})
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


def _clients(urls: list[str], key: str, per_process: int) -> list[dict[str, object]]:
    """One client process per url, firing together."""
    start_at = time.time() + 2.0  # both processes import httpx first, then fire together
    script = str(HERE / "http_clients.py")
    running = [
        subprocess.Popen(
            [sys.executable, script, url, key, str(per_process), str(start_at)],
            stdout=subprocess.PIPE,
        )
        for url in urls
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
    urls = [f"{url}/exact" for url in server.urls]
    results = await asyncio.to_thread(_clients, urls, "exact-a", 35)
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
    first, second = server.urls
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{first}/fast", headers=headers)).status_code == 200
        denied = await client.get(f"{second}/fast", headers=headers)
        assert denied.status_code == 429
        wait = int(denied.headers["retry-after"])
        assert wait >= 1
        current = parse_list(denied.headers["ratelimit"])["rps"]
        assert current["r"] == 0 and 1 <= int(str(current["t"])) <= wait
        problem = denied.json()
        assert problem["status"] == 429 and problem["violated-policies"] == ["rps"]
        await asyncio.sleep(wait)
        assert (await client.get(f"{second}/fast", headers=headers)).status_code == 200


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


async def _alternating(
    server: Server, method: str, path: str, key: str, n: int
) -> list[httpx.Response]:
    """`n` sequential requests, taking turns between the two server processes, each on a new
    connection: uvicorn closes one whose request raised, even after its response, and a request
    already sent on it would be lost."""
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=fresh) as client:
        return [
            await client.request(method, f"{server.urls[i % 2]}{path}", headers={"x-api-key": key})
            for i in range(n)
        ]


async def test_a_route_answering_401_is_charged(server: Server, reader: RateLimiter) -> None:
    responses = await _alternating(server, "POST", "/api/login", "login-a", 10)
    assert [r.status_code for r in responses] == [401] * 3 + [429] * 7
    assert responses[3].headers["content-type"] == "application/problem+json"
    assert await reader.available("login-a", "login", [http_app.THREE]) == {"rpd": 0}


async def test_a_failing_background_task_is_charged(server: Server, reader: RateLimiter) -> None:
    responses = await _alternating(server, "GET", "/background", "background-a", 5)
    assert [r.status_code for r in responses] == [200] * 3 + [429] * 2
    assert await reader.available("background-a", "background", [http_app.THREE]) == {"rpd": 0}


async def test_a_stream_cancelled_after_its_body_is_charged(
    server: Server, reader: RateLimiter
) -> None:
    responses = await _alternating(server, "GET", "/linger", "linger-a", 4)
    assert [r.status_code for r in responses] == [200] * 3 + [429]
    assert all(r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n" for r in responses[:3])
    # Each task was cancelled by the timeout after its body, and its cost stands.
    await asyncio.sleep(http_app.TIMEOUT_SECONDS + 1)
    assert await reader.available("linger-a", "linger", [http_app.THREE]) == {"rpd": 0}


async def test_a_unix_socket_client_is_refused_or_keyed_by_the_fallback(
    socket_path: str, reader: RateLimiter
) -> None:
    transport = httpx.AsyncHTTPTransport(uds=socket_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://uds") as client:
        refused = [await client.get("/addr") for _ in range(5)]
        fallback = [await client.get("/addr-fallback") for _ in range(5)]
    assert {r.status_code for r in refused} == {401}
    assert refused[0].headers["content-type"] == "application/problem+json"
    assert [r.status_code for r in fallback] == [200] * 3 + [429] * 2
    assert await reader.available(http_app.NO_ADDRESS, "addr-fallback", [http_app.THREE]) == {
        "rpd": 0
    }


async def _ledgers(client: httpx.AsyncClient, server: Server) -> list[dict[str, int]]:
    return [(await client.get(f"{url}/ledger")).json() for url in server.urls]


async def test_a_flood_of_unknown_keys_under_cascade_is_401_and_cheap(server: Server) -> None:
    keys = [f"sk-ghost-{i}-do-not-log" for i in range(3)]
    async with httpx.AsyncClient(timeout=30) as client:
        # Each process's limiter gets ready (its version check, one read) on its first acquire:
        # not part of the flood, whichever test ran first on the server.
        for url in server.urls:
            await client.get(f"{url}/cascade", headers={"x-api-key": "sk-warm-up"})
        before = await _ledgers(client, server)
        started = time.monotonic()
        responses = await asyncio.gather(
            *(
                client.get(f"{server.urls[i % 2]}/cascade", headers={"x-api-key": keys[i % 3]})
                for i in range(60)
            )
        )
        elapsed = time.monotonic() - started
        after = await _ledgers(client, server)
    assert {r.status_code for r in responses} == {401}
    assert all(r.headers["content-type"] == "application/problem+json" for r in responses)
    assert not any(key in r.text for r in responses for key in keys)
    # At most one read per key per process for each TTL the flood lasted.
    bound = len(keys) * (1 + int(elapsed // MISSING_ENTITY_TTL))
    for old, new in zip(before, after, strict=True):
        assert new.get("GetItem", 0) - old.get("GetItem", 0) <= bound
        assert sum(new.values()) - sum(old.values()) <= bound  # nothing else either
    assert not any(key in server.log_text() for key in keys)
