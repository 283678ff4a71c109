"""Client CPU per DynamoDB call: the bucket `UpdateItem` (`write_bucket`) and `GetItem`
(`get_bucket`), before and after the hot-path work, in one run.

*Before* is the repository as it was: botocore's default client (every request checked against
the service model, the User-Agent rebuilt for every request) and every request dict built from
scratch (`requests.bucket_update_request`, the definition of the request). *After* is
`Repository` itself: parameter validation off for the requests it builds, a fixed User-Agent,
expressions, attribute names and keys built once per write shape and item, items of plain
attribute values taken from the response's JSON as botocore would return them, and the bucket
calls sent by the repository's own transport (`zae_limiter.transport`: its own SigV4, the
client's HTTP session) instead of through botocore's client.

- `test_cpu_per_call`: against the embedded moto server (HTTP/1.1 keep-alive, as DynamoDB),
  and *before* also against a server that closes every connection (as the embedded server did:
  a TCP connection per request).
- `test_cpu_per_call_without_network`: the same paths with the HTTP exchange replaced by the
  recorded response (botocore's `before-send` answers, and the transport's HTTP session answering
  alike), so only the client's own work remains; each change is added one at a time.

The figure is `time.process_time` over N calls, the median of a few repeats, the variants
interleaved in every repeat. Timings depend on the machine and are never asserted; the ratios
are the result. `pytest benches/bench_calls.py -s` prints the tables; `--benchmark-enable` runs
longer.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from aiobotocore.awsrequest import AioAWSResponse
from aiobotocore.parsers import AioResponseParserFactory
from botocore.config import Config

from zae_limiter.core import WRITE_ABSOLUTE, WRITE_RELATIVE
from zae_limiter.ops.local import LocalDynamoDB
from zae_limiter.storage.dynamodb.client import TableClient
from zae_limiter.storage.dynamodb.codec import bucket_from_item
from zae_limiter.storage.dynamodb.repository import Repository
from zae_limiter.storage.dynamodb.requests import (
    BucketRequests,
    bucket_key,
    bucket_update_request,
)
from zae_limiter.storage.protocol import BucketItem, LimitWrite

TABLE = "callbench"
ENTITY, RESOURCE = "key", "llm"
NOW = 1_800_000_000_000
LIMITS = ("rpm", "tpm")
BURST = 10**12
# The warm write of an acquire of 2 limits: relative, both bounds, counters.
WARM = [LimitWrite(n, WRITE_RELATIVE, 1_000, NOW, 10**31, 1_000) for n in LIMITS]


class BeforeClient(TableClient):
    """The client before the hot-path work, or with some of it (see `Before`)."""

    def __init__(
        self,
        *args: Any,
        validate: bool,
        default_user_agent: bool,
        botocore_parse: bool,
        lean: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.validate, self.default_user_agent = validate, default_user_agent
        self.botocore_parse, self.use_lean = botocore_parse, lean

    async def client(self) -> Any:
        client = await super().client()
        if not self.use_lean:
            self.lean = None
        if self.botocore_parse and self.parses_items_plainly:
            client._endpoint._response_parser_factory = AioResponseParserFactory()
            self.parses_items_plainly = False
        return client

    def config(self) -> Config:
        options: dict[str, Any] = {}
        if not self.validate:
            options["parameter_validation"] = False
        if not self.default_user_agent:
            options["user_agent"] = super().config().user_agent
        return Config(  # the configuration the repository had
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self.retry.connect_timeout,
            read_timeout=self.retry.read_timeout,
            max_pool_connections=self.max_pool_connections,
            **options,
        )


class FreshRequests(BucketRequests):
    """Every bucket request dict built from scratch, as before the hot-path work."""

    def key(self, entity_id: str, resource: str) -> dict[str, Any]:
        return bucket_key(entity_id, resource)

    def update(
        self,
        entity_id: str,
        resource: str,
        writes: Sequence[LimitWrite],
        now_ms: int,
        write_id: str,
        expires_at: int | None = None,
    ) -> dict[str, Any]:
        return bucket_update_request(
            self.table_name, entity_id, resource, writes, now_ms, write_id, expires_at
        )


class Before(Repository):
    """The repository before the hot-path work, or with some of it (`validate`: botocore checks
    every request; `default_user_agent`: botocore rebuilds the header every request;
    `fresh_requests`: every request dict built from scratch; `botocore_parse`: botocore walks
    the model for every attribute of every item it returns; `lean`: the bucket calls through
    the repository's own transport rather than botocore's client)."""

    def __init__(
        self,
        *args: Any,
        validate: bool = True,
        default_user_agent: bool = True,
        fresh_requests: bool = True,
        botocore_parse: bool = True,
        lean: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fresh_requests = fresh_requests
        self.table_client = BeforeClient(
            self.table_name,
            self.region,
            self.endpoint_url,
            retry=self.retry,
            ledger=self.ledger,
            validate=validate,
            default_user_agent=default_user_agent,
            botocore_parse=botocore_parse,
            lean=lean,
        )
        if fresh_requests:
            self.requests = FreshRequests(self.table_name)

    async def get_bucket(self, entity_id: str, resource: str) -> BucketItem | None:
        if not self.fresh_requests:
            return await super().get_bucket(entity_id, resource)
        items = await self.bucket_items(entity_id, resource)
        return bucket_from_item(items[0]) if items else None  # the size computed again, as it was


def _ops(repo: Repository) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "UpdateItem": lambda: repo.write_bucket(ENTITY, RESOURCE, WARM, NOW),
        "GetItem": lambda: repo.get_bucket(ENTITY, RESOURCE),
    }


async def _prepare(repo: Repository) -> None:
    """The table and a bucket item that every `WARM` write keeps warm."""
    await repo.create_table()
    first = [
        LimitWrite(n, WRITE_ABSOLUTE, 10**30, None, None, 0, "1:1:1:1", create=True)
        for n in LIMITS
    ]
    await repo.write_bucket(ENTITY, RESOURCE, first, NOW)


async def _measure(
    variants: dict[str, Repository], n: int, repeats: int
) -> dict[tuple[str, str], float]:
    """Median client CPU (µs) per call of each variant and operation."""
    ops = {name: _ops(repo) for name, repo in variants.items()}
    for name in variants:  # warm: connections, caches, botocore's lazy loading
        for op in ops[name].values():
            for _ in range(max(10, n // 10)):
                await op()
        variants[name].ledger.reset()
    samples: dict[tuple[str, str], list[float]] = {}
    gc.collect()
    for _ in range(repeats):
        for name in variants:
            for op_name, op in ops[name].items():
                started = time.process_time()
                for _ in range(n):
                    await op()
                elapsed = time.process_time() - started
                samples.setdefault((name, op_name), []).append(elapsed / n * 1e6)
    return {key: statistics.median(values) for key, values in samples.items()}


def _check_counts(variants: dict[str, Repository], calls: int) -> None:
    for name, repo in variants.items():
        ledger = repo.ledger
        assert ledger.calls["UpdateItem"] == calls, (name, ledger.snapshot())
        assert ledger.calls["GetItem"] == calls, (name, ledger.snapshot())
        assert ledger.conflicts == 0, name


def _print(title: str, names: list[str], cpu: dict[tuple[str, str], float], base: str) -> None:
    print(f"\n{title}")
    print(f"{'':44} {'UpdateItem':>10} {'ratio':>6} {'GetItem':>9} {'ratio':>6}")
    for name in names:
        cells = []
        for op in ("UpdateItem", "GetItem"):
            us = cpu[name, op]
            cells.append(f"{us:>9.0f}  {us / cpu[base, op]:>5.2f}")
        print(f"{name:44} {cells[0]:>17} {cells[1]:>16}")


async def _server_run(
    keep_alive_url: str, closing_url: str, n: int, repeats: int
) -> dict[tuple[str, str], float]:
    variants: dict[str, Repository] = {
        "before, a new connection per request": Before(name=TABLE, endpoint_url=closing_url),
        "before (keep-alive)": Before(name=TABLE, endpoint_url=keep_alive_url),
        "after, through botocore's client": Before(
            name=TABLE, endpoint_url=keep_alive_url, validate=False, default_user_agent=False,
            fresh_requests=False, botocore_parse=False,
        ),
        "after (keep-alive)": Repository(name=TABLE, endpoint_url=keep_alive_url),
    }
    try:
        await _prepare(variants["before (keep-alive)"])
        await _prepare(variants["before, a new connection per request"])
        cpu = await _measure(variants, n, repeats)
        _check_counts(variants, n * repeats)
    finally:
        for repo in variants.values():
            await repo.close()
    return cpu


def test_cpu_per_call(
    moto_server: LocalDynamoDB, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    timed = bool(request.config.getoption("benchmark_enable", default=False))
    n, repeats = (200, 5) if timed else (30, 3)
    moto_server.reset()
    with LocalDynamoDB(keep_alive=False) as closing:
        cpu = asyncio.run(_server_run(moto_server.endpoint_url, closing.endpoint_url, n, repeats))
    names = ["before, a new connection per request", "before (keep-alive)",
             "after, through botocore's client", "after (keep-alive)"]
    with capsys.disabled():
        _print(
            f"Client CPU per call against the embedded server, µs (median of {repeats} x {n}; "
            "ratio to before, keep-alive)",
            names,
            cpu,
            base="before (keep-alive)",
        )
    assert all(us > 0 for us in cpu.values())


# -- without the network ------------------------------------------------------------------------


class _Recorded:
    """The raw body of a recorded response, as aiohttp's response would give it."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def read(self) -> bytes:
        return self.body


async def _record(repo: Repository) -> dict[str, tuple[dict[str, str], bytes]]:
    """One real response (headers, body) of each operation, from the server."""
    recorded: dict[str, tuple[dict[str, str], bytes]] = {}
    client = await repo.client()

    def keep(operation: str) -> Callable[..., None]:
        def handler(response_dict: dict[str, Any], **_: Any) -> None:
            recorded[operation] = (dict(response_dict["headers"]), response_dict["body"])

        return handler

    for op in ("UpdateItem", "GetItem"):
        client.meta.events.register(f"before-parse.dynamodb.{op}", keep(op), unique_id=op)
    for call in _ops(repo).values():
        await call()
    for op in ("UpdateItem", "GetItem"):
        client.meta.events.unregister(f"before-parse.dynamodb.{op}", unique_id=op)
    return recorded


async def _answer_from(repo: Repository, recorded: dict[str, tuple[dict[str, str], bytes]]) -> None:
    client = await repo.client()
    for op, (headers, body) in recorded.items():

        def answer(request: Any, headers: dict[str, str] = headers, body: bytes = body,
                   **_: Any) -> AioAWSResponse:
            return AioAWSResponse(request.url, 200, headers, _Recorded(body))

        client.meta.events.register(f"before-send.dynamodb.{op}", answer)
    lean = repo.table_client.lean
    if lean is not None:  # the bucket calls' own transport, answered the same way
        lean.http_session = _RecordedSession(recorded)


class _RecordedSession:
    """The client's HTTP session as the transport uses it, answering from `recorded`."""

    def __init__(self, recorded: dict[str, tuple[dict[str, str], bytes]]) -> None:
        self.recorded = recorded

    async def send(self, request: Any) -> AioAWSResponse:
        op = request.headers["X-Amz-Target"].rsplit(".", 1)[1]
        headers, body = self.recorded[op]
        response = AioAWSResponse(request.url, 200, headers, _Recorded(body))
        await response.content
        return response


async def _offline_run(url: str, n: int, repeats: int) -> dict[tuple[str, str], float]:
    variants: dict[str, Repository] = {
        "before": Before(name=TABLE, endpoint_url=url),
        "+ parameter validation off": Before(name=TABLE, endpoint_url=url, validate=False),
        "+ fixed User-Agent": Before(
            name=TABLE, endpoint_url=url, validate=False, default_user_agent=False
        ),
        "+ request parts built once": Before(
            name=TABLE,
            endpoint_url=url,
            validate=False,
            default_user_agent=False,
            fresh_requests=False,
        ),
        "+ items parsed as plain JSON": Before(
            name=TABLE,
            endpoint_url=url,
            validate=False,
            default_user_agent=False,
            fresh_requests=False,
            botocore_parse=False,
        ),
        "+ own transport (= after)": Repository(name=TABLE, endpoint_url=url),
    }
    try:
        await _prepare(variants["before"])
        recorded = await _record(variants["before"])
        for repo in variants.values():
            await _answer_from(repo, recorded)
        cpu = await _measure(variants, n, repeats)
        _check_counts(variants, n * repeats)
    finally:
        for repo in variants.values():
            await repo.close()
    return cpu


def test_cpu_per_call_without_network(
    moto_server: LocalDynamoDB, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    timed = bool(request.config.getoption("benchmark_enable", default=False))
    n, repeats = (2_000, 7) if timed else (200, 5)
    moto_server.reset()
    cpu = asyncio.run(_offline_run(moto_server.endpoint_url, n, repeats))
    names = list(dict.fromkeys(name for name, _ in cpu))
    with capsys.disabled():
        _print(
            f"Client CPU per call, the HTTP exchange answered from a recorded response, µs "
            f"(median of {repeats} x {n}; ratio to before)",
            names,
            cpu,
            base="before",
        )
    assert all(us > 0 for us in cpu.values())
