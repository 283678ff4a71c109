"""`RateLimitMiddleware` called in-process (as a server would) over moto's server.

A frozen clock makes every figure exact. The uvicorn tests (`test_http_server.py`) prove the
same behaviour over TCP; these cover each branch: refusals, give-backs, reconciliation,
fail-open, reservations and the options' checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import http_sfv
import pytest
from asgi_calls import call, http_scope
from starlette.responses import JSONResponse, Response, StreamingResponse

from zae_limiter import (
    FailureMode,
    Limit,
    RateLimiter,
    Reservations,
    StackOptions,
    ValidationError,
)
from zae_limiter.http.asgi import (
    HttpOptions,
    RateLimitMiddleware,
    Served,
    address_key,
    client_address_key,
    hashed_entity_id,
    hashed_header_key,
    header_key,
    lease_of,
    total_tokens,
)
from zae_limiter.ops.local import free_port
from zae_limiter.storage.dynamodb.client import RetryPolicy

pytestmark = pytest.mark.integration

T0 = 1_800_000_000_000
RPM = Limit.per_minute("rpm", 10)
TPM = Limit.per_minute("tpm", 1000)
KEY = header_key("x-api-key")


@pytest.fixture
async def limiter(endpoint_url: str) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(
        name="http", endpoint_url=endpoint_url, stack_options=StackOptions(), clock=lambda: T0
    ) as lim:
        yield lim


def remaining(value: str) -> dict[str, int]:
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    return {str(item.value): int(item.params["r"]) for item in parsed}


def json_app(body: Mapping[str, Any], status: int = 200) -> Response:
    return JSONResponse(body, status)


async def test_admitted_request_has_fields_and_its_lease(limiter: RateLimiter) -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        lease = lease_of(scope)
        assert lease is not None
        seen["consumed"] = lease.consumed
        await JSONResponse({"ok": True})(scope, receive, send)

    mw = RateLimitMiddleware(
        app,
        limiter=limiter,
        limits=[RPM, TPM],
        key=KEY,
        cost=lambda scope: {"rpm": 1, "tpm": 10},
        quota_units={"tpm": "tokens"},
    )
    result = await call(mw)
    assert result.status == 200 and json.loads(result.body) == {"ok": True}
    assert seen["consumed"] == {"rpm": 1, "tpm": 10}
    assert remaining(result.headers["ratelimit"]) == {"rpm": 9, "tpm": 990}
    assert result.headers["ratelimit-policy"] == ('"rpm";q=10;w=60, "tpm";q=1000;qu="tokens";w=60')
    assert await limiter.available("k1", "http", [RPM, TPM]) == {"rpm": 9, "tpm": 990}


async def test_unlimited_requests_and_other_scopes_pass_through(limiter: RateLimiter) -> None:
    scopes: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope["type"])
        assert lease_of(scope) is None
        if scope["type"] == "http":
            await JSONResponse({})(scope, receive, send)

    mw = RateLimitMiddleware(app, limiter=limiter, limits=[RPM], key=KEY, missing_key="pass")
    limiter.ledger.reset()
    result = await call(mw, key=None)
    assert result.status == 200 and "ratelimit" not in result.headers
    await mw({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert scopes == ["http", "lifespan"]
    assert sum(limiter.ledger.calls.values()) == 0


async def test_application_error_gives_back_and_propagates(limiter: RateLimiter) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    mw = RateLimitMiddleware(app, limiter=limiter, limits=[RPM], key=KEY)
    with pytest.raises(RuntimeError, match="boom"):
        await call(mw)
    assert await limiter.available("k1", "http", [RPM]) == {"rpm": 10}


@pytest.mark.parametrize("refund", [True, False])
async def test_server_error_gives_the_cost_back_unless_told_not_to(
    limiter: RateLimiter, refund: bool
) -> None:
    served: list[Served] = []

    def reconcile(s: Served) -> None:
        served.append(s)

    mw = RateLimitMiddleware(
        json_app({"error": "upstream"}, 502),
        limiter=limiter,
        limits=[RPM],
        key=KEY,
        refund_on_server_error=refund,
        reconcile=reconcile,
    )
    assert (await call(mw)).status == 502
    left = await limiter.available("k1", "http", [RPM])
    assert left == ({"rpm": 10} if refund else {"rpm": 9})
    assert [s.status for s in served] == ([] if refund else [502])


async def test_reconcile_applies_the_real_cost_after_the_body(limiter: RateLimiter) -> None:
    served: list[Served] = []

    async def reconcile(s: Served) -> Mapping[str, int] | None:
        served.append(s)
        tokens = total_tokens(s.tail)
        return None if tokens is None else {"tpm": tokens}

    body = {"choices": [], "usage": {"prompt_tokens": 50, "total_tokens": 250}}
    mw = RateLimitMiddleware(
        json_app(body),
        limiter=limiter,
        limits=[RPM, TPM],
        key=KEY,
        cost=lambda scope: {"rpm": 1, "tpm": 100},
        reconcile=reconcile,
    )
    await call(mw)
    assert await limiter.available("k1", "http", [RPM, TPM]) == {"rpm": 9, "tpm": 750}
    (s,) = served
    assert (s.status, s.complete, s.disconnected, s.chunks) == (200, True, False, 1)
    assert s.consumed == {"rpm": 1, "tpm": 100}
    assert json.loads(s.tail) == body and s.body_bytes == len(s.tail)


async def test_client_leaving_a_stream_is_still_reconciled(limiter: RateLimiter) -> None:
    served: list[Served] = []

    def reconcile(s: Served) -> Mapping[str, int]:
        served.append(s)
        return {"tpm": 10 * s.chunks}  # e.g. what was streamed so far

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'

    mw = RateLimitMiddleware(
        StreamingResponse(endless(), media_type="text/event-stream"),
        limiter=limiter,
        limits=[RPM, TPM],
        key=KEY,
        cost=lambda scope: {"rpm": 1, "tpm": 500},
        reconcile=reconcile,
    )
    result = await call(mw, leave_after=3)
    assert not result.complete and len(result.chunks) == 3
    (s,) = served
    assert s.disconnected and not s.complete and s.chunks >= 3
    left = await limiter.available("k1", "http", [RPM, TPM])
    assert left == {"rpm": 9, "tpm": 1000 - 10 * s.chunks}


async def test_failed_reconciliation_is_logged_and_the_estimate_stands(
    limiter: RateLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    def reconcile(s: Served) -> Mapping[str, int]:
        return {"no_such_limit": 5}

    mw = RateLimitMiddleware(
        json_app({}), limiter=limiter, limits=[RPM], key=KEY, reconcile=reconcile
    )
    with caplog.at_level(logging.ERROR, logger="zae_limiter"):
        assert (await call(mw)).status == 200
    assert "reconciliation of" in caplog.text
    assert await limiter.available("k1", "http", [RPM]) == {"rpm": 9}


async def test_denial_by_a_parent_reveals_nothing_of_it(limiter: RateLimiter) -> None:
    await limiter.create_entity("proj-secret")
    await limiter.create_entity("k1", parent_id="proj-secret")
    limits = [Limit.per_minute("rpm", 5)]
    async with limiter.acquire("proj-secret", "http", limits, {"rpm": 5}):
        pass  # the project's bucket is empty; the key's own is full
    mw = RateLimitMiddleware(json_app({}), limiter=limiter, limits=limits, key=KEY, cascade=True)
    result = await call(mw)
    assert result.status == 429
    assert result.headers["content-type"] == "application/problem+json"
    assert int(result.headers["retry-after"]) == 12  # one token of 5/minute
    everything = result.body.decode() + json.dumps(result.headers)
    assert "proj-secret" not in everything
    problem = json.loads(result.body)
    assert problem["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert (problem["title"], problem["status"]) == ("Quota Exceeded", 429)
    assert problem["violated-policies"] == []  # the key's own limit was not exceeded
    own, shared = problem["limits"]
    assert own["available"] == 5 and own["exceeded"] is False and "entity_id" not in own
    assert shared == {
        "limit_name": "rpm",
        "shared": True,
        "exceeded": True,
        "retry_after_seconds": 12.0,
    }
    assert remaining(result.headers["ratelimit"]) == {"rpm": 5}  # the key's own only


async def test_request_no_limit_could_admit_is_413_without_retry_after(
    limiter: RateLimiter,
) -> None:
    mw = RateLimitMiddleware(
        json_app({}), limiter=limiter, limits=[RPM], key=KEY, cost=lambda scope: {"rpm": 11}
    )
    limiter.ledger.reset()
    result = await call(mw)
    assert result.status == 413 and "retry-after" not in result.headers
    problem = json.loads(result.body)
    assert problem["status"] == 413 and problem["reason"] == "request_exceeds_burst"
    assert problem["violated-policies"] == ["rpm"]
    assert sum(limiter.ledger.calls.values()) == 0  # decided with no I/O


async def test_a_key_that_is_no_entity_id_is_400(limiter: RateLimiter) -> None:
    mw = RateLimitMiddleware(json_app({}), limiter=limiter, limits=[RPM], key=KEY)
    result = await call(mw, key="not an id!")
    assert result.status == 400
    assert json.loads(result.body)["title"] == "Bad Request"


async def test_fail_open_admits_with_the_policy_unknown(endpoint_url: str) -> None:
    async with RateLimiter(
        name="http",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        failure_mode=FailureMode.FAIL_OPEN,
        retry=RetryPolicy(max_attempts=1, connect_timeout=0.5, read_timeout=0.5),
    ) as dead:
        mw = RateLimitMiddleware(json_app({}), limiter=dead, limits=[RPM], key=KEY)
        result = await call(mw)
    assert result.status == 200
    assert "ratelimit" not in result.headers and "ratelimit-policy" not in result.headers


async def test_with_reservations_the_fields_agree_with_available(endpoint_url: str) -> None:
    limits = [Limit.per_day("rpd", 1000)]
    async with RateLimiter(
        name="http",
        endpoint_url=endpoint_url,
        stack_options=StackOptions(),
        clock=lambda: T0,
        reservations=Reservations(),
    ) as reserving:
        mw = RateLimitMiddleware(json_app({}), limiter=reserving, limits=limits, key=KEY)
        for _ in range(3):
            result = await call(mw)
            shown = remaining(result.headers["ratelimit"])
            assert shown == await reserving.available("k1", "http", limits)
        # The block was reserved from the shared bucket: it counts as used there.
        held = reserving.reserved()[("k1", "http")]["rpd"]
        assert shown == {"rpd": 1000 - 3 - held}


async def test_client_address_key_limits_per_client(limiter: RateLimiter) -> None:
    mw = RateLimitMiddleware(json_app({}), limiter=limiter, limits=[RPM], key=client_address_key)
    result = await call(mw, scope=http_scope(key=None))
    assert remaining(result.headers["ratelimit"]) == {"rpm": 9}
    assert await limiter.available("127.0.0.1", "http", [RPM]) == {"rpm": 9}


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"limits": [Limit.per_minute("tpm", 10)], "quota_units": {"tpm": "tokens"}}, "cost"),
        ({"limits": [RPM], "quota_units": {"rpm": "Tokens!"}}, "quota_units.rpm"),
        ({"limits": [RPM], "too_large_status": 429}, "too_large_status"),
        ({"limits": [RPM], "unavailable_retry_after": 0}, "unavailable_retry_after"),
        ({"limits": None}, "limits"),
        ({"limits": [RPM], "resource": "bad resource"}, "resource"),
        ({"limits": [RPM], "tail_bytes": -1}, "tail_bytes"),
        ({"limits": [RPM], "key": "x-api-key"}, "key"),
        ({"limits": [RPM], "missing_key": "allow"}, "missing_key"),
        ({"limits": [RPM], "refund_on_server_error": "yes"}, "refund_on_server_error"),
        ({"limits": [RPM, RPM]}, "limits"),
    ],
)
def test_bad_options_name_their_field(options: dict[str, Any], field: str) -> None:
    idle = RateLimiter(name="http", endpoint_url="http://127.0.0.1:9")  # never called
    options = {"key": KEY, **options}
    with pytest.raises(ValidationError) as caught:
        RateLimitMiddleware(json_app({}), limiter=idle, **options)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"limits": [RPM], "too_large_status": 429}, "too_large_status"),
        ({"limits": None}, "limits"),
        ({"limits": [RPM], "key": "x-api-key"}, "key"),
        ({"limits": [RPM], "missing_key": "allow"}, "missing_key"),
        ({"limits": [RPM], "refund_on_server_error": "yes"}, "refund_on_server_error"),
    ],
)
def test_the_options_object_checks_its_fields_as_the_keywords_do(
    options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        HttpOptions(**{"key": KEY, **options})
    assert caught.value.field == field
    # A keyword replacing a field of good options is checked the same way.
    good = HttpOptions(limits=[RPM], key=KEY)
    idle = RateLimiter(name="http", endpoint_url="http://127.0.0.1:9")  # never called
    replaced = {name: value for name, value in options.items() if name != "limits"} or options
    with pytest.raises(ValidationError) as caught:
        RateLimitMiddleware(json_app({}), limiter=idle, options=good, **replaced)
    assert caught.value.field == field


def test_the_keywords_build_the_options_with_the_same_defaults() -> None:
    idle = RateLimiter(name="http", endpoint_url="http://127.0.0.1:9")  # never called
    built = RateLimitMiddleware(json_app({}), limiter=idle, limits=[RPM], key=KEY).options
    assert built == HttpOptions(limits=[RPM], key=KEY)
    assert (built.missing_key, built.resource, built.cost, built.quota_units) == (
        "refuse", "http", None, {}
    )
    assert (built.cascade, built.use_stored_limits, built.failure_mode, built.deadline) == (
        False, False, None, None
    )
    assert (built.refund_on_server_error, built.partition_key) == (True, None)
    assert (built.too_large_status, built.unavailable_retry_after) == (413, 1)
    assert built.limits == (RPM,) and built.amounts({}) == {"rpm": 1}
    with pytest.raises(ValidationError) as caught:
        RateLimitMiddleware(json_app({}), limiter=idle, options="x")  # type: ignore[arg-type]
    assert caught.value.field == "options"


async def test_one_options_object_serves_several_middlewares(limiter: RateLimiter) -> None:
    """Keywords given with `options=` replace those fields, and the shared object stays as
    it was."""
    shared = HttpOptions(limits=[RPM], key=KEY, resource="api", cost=lambda scope: {"rpm": 2})
    api = RateLimitMiddleware(json_app({}), limiter=limiter, options=shared)
    search = RateLimitMiddleware(json_app({}), limiter=limiter, options=shared, resource="search")
    assert api.options is shared and shared.resource == "api"
    assert (await call(api)).status == 200
    assert (await call(search)).status == 200
    assert (await call(search)).status == 200
    assert await limiter.available("k1", "api", [RPM]) == {"rpm": 8}
    assert await limiter.available("k1", "search", [RPM]) == {"rpm": 6}


async def test_cascade_lease_knows_both_buckets_but_the_fields_show_the_keys(
    limiter: RateLimiter,
) -> None:
    await limiter.create_entity("proj")
    await limiter.create_entity("k1", parent_id="proj")
    async with limiter.acquire("proj", "http", [RPM], {"rpm": 4}):
        pass
    seen: dict[str, int] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        lease = lease_of(scope)
        assert lease is not None
        seen.update({s.entity_id: s.available for s in lease.statuses()})
        await JSONResponse({})(scope, receive, send)

    mw = RateLimitMiddleware(app, limiter=limiter, limits=[RPM], key=KEY, cascade=True)
    result = await call(mw)
    assert seen == {"k1": 9, "proj": 5}  # as the acquire left them, no read
    assert remaining(result.headers["ratelimit"]) == {"rpm": 9}
    assert await limiter.available("proj", "http", [RPM]) == {"rpm": 5}


async def test_stored_limits_decide_and_make_the_policy(limiter: RateLimiter) -> None:
    await limiter.create_entity("k1")
    await limiter.set_limits("k1", [Limit.per_hour("rph", 7)], resource="http")
    mw = RateLimitMiddleware(
        json_app({}),
        limiter=limiter,
        limits=None,
        use_stored_limits=True,
        key=KEY,
        cost=lambda scope: {"rph": 2},
    )
    result = await call(mw)
    assert result.headers["ratelimit-policy"] == '"rph";q=7;w=3600'
    assert remaining(result.headers["ratelimit"]) == {"rph": 5}


async def test_a_request_without_a_key_is_refused_by_default(limiter: RateLimiter) -> None:
    mw = RateLimitMiddleware(json_app({}), limiter=limiter, limits=[RPM], key=KEY)
    limiter.ledger.reset()
    result = await call(mw, key=None)
    assert result.status == 401
    assert result.headers["content-type"] == "application/problem+json"
    assert json.loads(result.body)["status"] == 401
    assert limiter.ledger.total_calls == 0  # decided with no I/O


async def test_a_fallback_key_limits_requests_without_one(limiter: RateLimiter) -> None:
    mw = RateLimitMiddleware(
        json_app({}), limiter=limiter, limits=[RPM], key=KEY, missing_key=lambda scope: "anon"
    )
    for n in range(1, 3):
        result = await call(mw, key=None)
        assert result.status == 200 and remaining(result.headers["ratelimit"]) == {"rpm": 10 - n}
    assert await limiter.available("anon", "http", [RPM]) == {"rpm": 8}


async def test_a_fallback_key_that_finds_nothing_refuses(limiter: RateLimiter) -> None:
    mw = RateLimitMiddleware(
        json_app({}), limiter=limiter, limits=[RPM], key=KEY, missing_key=lambda scope: None
    )
    assert (await call(mw, key=None)).status == 401


def _from(address: str) -> dict[str, Any]:
    scope = http_scope(key=None)
    scope["client"] = (address, 40000)
    return scope


async def test_client_address_key_groups_ipv6_by_64(limiter: RateLimiter) -> None:
    mw = RateLimitMiddleware(json_app({}), limiter=limiter, limits=[RPM], key=client_address_key)
    # One subscriber's /64, rotating: one bucket. Another /64: its own.
    for address in ("2001:db8:1:2::1", "2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:3::1"):
        assert (await call(mw, scope=_from(address))).status == 200
    assert await limiter.available("2001:db8:1:2::@64", "http", [RPM]) == {"rpm": 8}
    assert await limiter.available("2001:db8:1:3::@64", "http", [RPM]) == {"rpm": 9}
    # An IPv4-mapped address is the IPv4 client's.
    assert (await call(mw, scope=_from("::ffff:192.0.2.7"))).status == 200
    assert await limiter.available("192.0.2.7", "http", [RPM]) == {"rpm": 9}


async def test_address_key_prefixes_are_options(limiter: RateLimiter) -> None:
    per_address = address_key(ipv6_prefix=128, ipv4_prefix=24)
    assert per_address(_from("2001:db8::5")) == "2001:db8::5"
    assert per_address(_from("192.0.2.77")) == "192.0.2.0@24"
    assert per_address(http_scope(key=None) | {"client": None}) is None
    for field, bad in (("ipv6_prefix", 0), ("ipv4_prefix", 33), ("ipv6_prefix", True)):
        with pytest.raises(ValidationError) as caught:
            address_key(**{field: bad})
        assert caught.value.field == field


async def test_hashed_header_key_stores_no_secret(limiter: RateLimiter) -> None:
    secret = b"0123456789abcdef-server-secret"
    mw = RateLimitMiddleware(
        json_app({}), limiter=limiter, limits=[RPM], key=hashed_header_key("x-api-key", secret)
    )
    assert (await call(mw, key="sk-live-123")).status == 200
    expected = hmac.new(secret, b"sk-live-123", hashlib.sha256).hexdigest()[:32]
    assert hashed_entity_id("sk-live-123", secret) == expected
    assert await limiter.available(expected, "http", [RPM]) == {"rpm": 9}
    items = await limiter.repository.resource_buckets("http")
    assert [b.entity_id for b in items] == [expected]
    with pytest.raises(ValidationError) as caught:
        hashed_header_key("x-api-key", b"short")
    assert caught.value.field == "secret" and "short" not in str(caught.value)
    for make in (header_key, lambda name: hashed_header_key(name, secret)):
        with pytest.raises(ValidationError) as caught:
            make(b"x-api-key")
        assert caught.value.field == "name"


async def test_unknown_entity_under_cascade_is_401_and_read_once(
    limiter: RateLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    mw = RateLimitMiddleware(json_app({}), limiter=limiter, limits=[RPM], key=KEY, cascade=True)
    limiter.ledger.reset()
    with caplog.at_level(logging.DEBUG, logger="zae_limiter"):
        results = [await call(mw, key="sk-unknown-secret") for _ in range(20)]
    assert {r.status for r in results} == {401}
    assert all(b"sk-unknown-secret" not in r.body for r in results)
    assert "sk-unknown-secret" not in caplog.text
    assert limiter.ledger.calls == {"GetItem": 1}
    # Created by this limiter: known at once, no wait for the miss to expire.
    await limiter.create_entity("sk-unknown-secret")
    assert (await call(mw, key="sk-unknown-secret")).status == 200


async def test_an_invalid_resource_from_the_request_is_400(limiter: RateLimiter) -> None:
    mw = RateLimitMiddleware(
        json_app({}), limiter=limiter, limits=[RPM], key=KEY, resource=lambda scope: "a#b"
    )
    result = await call(mw)
    assert result.status == 400 and b"a#b" not in result.body
    assert result.headers["content-type"] == "application/problem+json"


async def test_no_stored_limits_is_403(limiter: RateLimiter) -> None:
    mw = RateLimitMiddleware(
        json_app({}),
        limiter=limiter,
        limits=None,
        key=KEY,
        use_stored_limits=True,
        cost=lambda scope: {"rpm": 1},
    )
    result = await call(mw, key="sk-nolimits")
    assert result.status == 403 and b"sk-nolimits" not in result.body
    assert result.headers["content-type"] == "application/problem+json"


async def test_an_exception_after_the_response_is_charged(limiter: RateLimiter) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await JSONResponse({"ok": True})(scope, receive, send)
        raise RuntimeError("a background task failed")

    mw = RateLimitMiddleware(app, limiter=limiter, limits=[RPM], key=KEY)
    with pytest.raises(RuntimeError):
        await call(mw)
    assert await limiter.available("k1", "http", [RPM]) == {"rpm": 9}


async def test_a_cancellation_after_the_body_is_charged_and_reconciled(
    limiter: RateLimiter,
) -> None:
    served: list[Served] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/late":
            await JSONResponse({"ok": True})(scope, receive, send)
        await asyncio.sleep(30)  # work a timeout (or a server's shutdown) cuts short

    def reconcile(s: Served) -> Mapping[str, int]:
        served.append(s)
        return {"tpm": 30}

    mw = RateLimitMiddleware(
        app,
        limiter=limiter,
        limits=[RPM, TPM],
        key=KEY,
        cost=lambda scope: {"rpm": 1, "tpm": 100},
        quota_units={"tpm": "tokens"},
        reconcile=reconcile,
    )
    for path in ("/late", "/early"):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await call(mw, scope=http_scope(path=path))
    # "/late" sent its whole body first: charged and reconciled; "/early" sent nothing.
    assert [(s.status, s.complete) for s in served] == [(200, True)]
    assert await limiter.available("k1", "http", [RPM, TPM]) == {"rpm": 9, "tpm": 970}
