"""The RateLimit fields and problem bodies (`zae_limiter.ratelimit_fields`), without I/O.

Every field is parsed back with an RFC 9651 parser (`http_sfv`); the effective window is checked
against the core's own wait for the next whole unit.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import http_sfv
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zae_limiter import (
    Limit,
    LimitStatus,
    RateLimitExceeded,
    RequestTooLarge,
    ValidationError,
    core,
)
from zae_limiter.http.asgi import total_tokens
from zae_limiter.http.fields import (
    PROBLEM_JSON,
    QUOTA_EXCEEDED,
    Refusal,
    check_units,
    effective_window,
    fields,
    policy_field,
    ratelimit_field,
    retry_after,
)

RPM = Limit.per_minute("rpm", 100)
TPM = Limit.per_minute("tpm", 10_000)


def status(
    limit: Limit,
    available: int,
    *,
    entity: str = "key-1",
    requested: int = 1,
    exceeded: bool = False,
    retry: float | None = 0.0,
) -> LimitStatus:
    return LimitStatus(
        entity_id=entity,
        resource="llm",
        limit_name=limit.name,
        limit=limit,
        available=available,
        requested=requested,
        exceeded=exceeded,
        retry_after_seconds=retry,
    )


def parse(value: str) -> list[tuple[object, dict[str, object]]]:
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    return [(item.value, dict(item.params)) for item in parsed]


def test_policy_field_is_a_list_of_strings_with_q_w_and_qu_for_tokens() -> None:
    burst = Limit.custom("rps", 10, 10, 1, burst=50)
    value = policy_field(
        [status(RPM, 5), status(TPM, 5), status(burst, 5)], {"tpm": "tokens"}, b"\x00key"
    )
    items = parse(value)
    assert [type(name) for name, _ in items] == [str, str, str]  # Strings, not Tokens
    assert items == [
        ("rpm", {"q": 100, "w": 60, "pk": b"\x00key"}),
        ("tpm", {"q": 10_000, "qu": "tokens", "w": 60, "pk": b"\x00key"}),
        ("rps", {"q": 10, "w": 1, "pk": b"\x00key"}),  # the sustained rate, not the burst
    ]


def test_ratelimit_field_reports_whole_units_never_negative() -> None:
    items = parse(ratelimit_field([status(RPM, 37), status(TPM, -500)]))
    assert items == [("rpm", {"r": 37, "t": 1}), ("tpm", {"r": 0, "t": 4})]


def test_integers_stay_within_structured_fields_range() -> None:
    huge = Limit.custom("big", 10**15, 10**15, 1)
    items = parse(
        policy_field([status(huge, 10**15)], {}) + ", " + ratelimit_field([status(huge, 10**15)])
    )
    assert items[0][1]["q"] == 999_999_999_999_999
    assert items[1][1]["r"] == 999_999_999_999_999


@given(
    burst=st.integers(1, 5_000),
    amount=st.integers(1, 5_000),
    period=st.sampled_from([1, 7, 60, 3600, 86400]),
    used_milli=st.integers(0, 10_000_000),
    elapsed_ms=st.integers(0, 10_000_000),
)
def test_effective_window_bounds_the_wait_for_the_next_unit(
    burst: int, amount: int, period: int, used_milli: int, elapsed_ms: int
) -> None:
    """Within `t` the limit regains its next whole unit (so no more than `r` is usable
    before), and `t` overshoots that moment by less than one second plus one unit's refill."""
    limit = Limit.custom("x", burst, amount, period)
    t0 = 10**12
    state = (limit.burst_milli, limit.refill_amount_milli, limit.refill_period_ms)
    tokens = limit.burst_milli - used_milli
    now = t0 + elapsed_ms
    full_at = core.full_at_of(*state, tokens, t0)
    milli = core.available(*state, full_at, now)
    available = milli // 1000
    window = effective_window(limit, available)
    r = max(0, available)
    step_ms = limit.refill_period_ms // math.gcd(limit.refill_amount_milli, limit.refill_period_ms)
    # the refill time of one unit, at the limit's rate
    one_unit_ms = -(-1000 * limit.refill_period_ms // limit.refill_amount_milli)
    if (r + 1) * 1000 > limit.burst_milli:
        assert window == math.ceil(one_unit_ms / 1000)  # full: one unit's refill time
        return
    wait_ms = core.time_until_available([(*state, full_at, (r + 1) * 1000)], now)
    assert wait_ms is not None and wait_ms > 0
    assert wait_ms <= window * 1000 < wait_ms + 1000 + one_unit_ms + step_ms


def test_windows_end_no_later_than_retry_after() -> None:
    daily = Limit.per_day("rpd", 10)
    items = parse(ratelimit_field([status(daily, 5), status(RPM, 0)], retry_after_seconds=3))
    assert [p["t"] for _, p in items] == [3, 1]


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.001, 1), (0.6, 1), (1.0, 1), (1.001, 2), (59.2, 60)],
)
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(seconds: float, header: int) -> None:
    exc = RateLimitExceeded([status(RPM, 0, exceeded=True, retry=seconds)])
    assert retry_after(exc) == header


def test_denial_is_429_with_retry_after_fields_and_a_problem_body() -> None:
    exc = RateLimitExceeded(
        [
            status(RPM, 0, exceeded=True, retry=0.6),
            status(TPM, 9_000, requested=500),
            status(RPM, 0, entity="project-x", exceeded=True, retry=2.5),
        ]
    )
    refusal = Refusal.exceeded(exc, "key-1", {"tpm": "tokens"})
    headers = dict(refusal.headers)
    assert refusal.status == 429
    assert headers["retry-after"] == "3"
    assert headers["content-type"] == PROBLEM_JSON
    assert int(headers["content-length"]) == len(refusal.body)
    assert [name for name, _ in parse(headers["ratelimit-policy"])] == ["rpm", "tpm"]
    assert parse(headers["ratelimit"]) == [("rpm", {"r": 0, "t": 1}), ("tpm", {"r": 9000, "t": 1})]
    problem = json.loads(refusal.body)
    assert problem["type"] == QUOTA_EXCEEDED and problem["status"] == 429
    assert problem["title"] == "Quota Exceeded" and problem["detail"].startswith("Rate limit")
    assert problem["violated-policies"] == ["rpm"]
    assert problem["retry_after_seconds"] == 2.5 and problem["retry_after_ms"] == 2500
    assert "project-x" not in refusal.body.decode()
    assert problem["limits"][2] == {
        "limit_name": "rpm",
        "shared": True,
        "exceeded": True,
        "retry_after_seconds": 2.5,
    }


def test_request_too_large_has_no_retry_after() -> None:
    exc = RequestTooLarge(
        [status(TPM, 10_000, requested=20_000, exceeded=True, retry=None)], "consume.tpm", 20_000
    )
    refusal = Refusal.exceeded(exc, "key-1", {}, too_large_status=422)
    headers = dict(refusal.headers)
    assert refusal.status == 422 and "retry-after" not in headers
    problem = json.loads(refusal.body)
    assert problem["status"] == 422 and problem["reason"] == "request_exceeds_burst"
    assert problem["retry_after_seconds"] is None
    assert parse(headers["ratelimit"]) == [("tpm", {"r": 10_000, "t": 1})]


def test_unavailable_and_bad_key_problems() -> None:
    down = Refusal.unavailable(5)
    assert down.status == 503 and dict(down.headers)["retry-after"] == "5"
    assert json.loads(down.body)["status"] == 503
    bad = Refusal.bad_key()
    assert bad.status == 400 and "retry-after" not in dict(bad.headers)


def test_fields_are_only_the_entitys_own() -> None:
    statuses = [status(RPM, 3, entity="parent"), status(RPM, 7)]
    assert [name for name, _ in fields(statuses, "key-1", {})] == ["ratelimit-policy", "ratelimit"]
    assert parse(dict(fields(statuses, "key-1", {}))["ratelimit"])[0][1]["r"] == 7
    assert fields(statuses, "nobody", {}) == []


@pytest.mark.parametrize("units", [{"tpm": "Tokens"}, {"tpm": ""}, {"tpm": 'a"b'}, ["tpm"]])
def test_bad_quota_units_name_their_field(units: object) -> None:
    with pytest.raises(ValidationError) as caught:
        check_units(units)  # type: ignore[arg-type]
    assert caught.value.field.startswith("quota_units")


def test_total_tokens_reads_the_last_usage_of_sse_or_json() -> None:
    sse = (
        b'data: {"choices":[{"delta":{"content":"\\"total_tokens\\": 999"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"total_tokens": 42}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert total_tokens(sse) == 42
    assert total_tokens(b'{"usage": {"total_tokens":7}}') == 7
    escaped = b'data: {"choices":[{"delta":{"content":"\\"total_tokens\\": 9"}}]}'
    assert total_tokens(escaped) is None


def test_the_asgi_layer_needs_no_framework() -> None:
    """`import zae_limiter` and the middleware import neither FastAPI nor Starlette."""
    code = (
        "import sys, zae_limiter, zae_limiter.asgi, zae_limiter.ratelimit_fields\n"
        "print(sorted(m for m in ('fastapi', 'starlette') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert out.stdout.decode().strip() == "[]"
