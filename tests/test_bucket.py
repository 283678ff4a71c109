"""Hand-computed expectations for the token-bucket core (docs/design.md section 1).

Run against the pure-Python reference and the native extension (which the suite installs).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

from zae_limiter.core import WRITE_ABSOLUTE, WRITE_ADD, WRITE_NONE, WRITE_RELATIVE
from zae_limiter.core import bucket as reference

BACKENDS: list[Any] = [
    pytest.param(reference, id="python"),
    pytest.param(importlib.import_module("zae_limiter._native"), id="native"),
]

# 100 tokens per minute, burst 100: step_milli 5, step_ms 3; a tick is 1/5 ms, a millitoken 3
# ticks, and the bucket refills 5/3 milli per ms (one token every 600 ms).
RPM = (100_000, 100_000, 60_000)
T0 = 1_700_000_000_000
NOW = T0 * 5  # T0 in RPM's ticks
NONE, REL, ABS, ADD = WRITE_NONE, WRITE_RELATIVE, WRITE_ABSOLUTE, WRITE_ADD


@pytest.fixture(params=BACKENDS)
def core(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = request.param
    return module


def one(
    core: ModuleType,
    full_at: int | None,
    delta: int,
    now: int = T0,
    check: bool = True,
    limit: tuple[int, int, int] = RPM,
) -> Any:
    admitted, outcomes = core.decide([(*limit, full_at, delta)], now, check)
    assert len(outcomes) == 1
    return admitted, fields(outcomes[0])


def fields(outcome: Any) -> tuple[Any, ...]:
    """An outcome's attributes in their documented order (both backends name them alike)."""
    return tuple(getattr(outcome, name) for name in reference.Outcome._fields)


def holding(core: ModuleType, tokens: int, at: int = T0, limit: tuple[int, int, int] = RPM) -> int:
    return int(core.full_at_of(*limit, tokens, at))


def test_consume_from_new_bucket(core: ModuleType) -> None:
    # created full at now, conditioned on "does not exist" (no bounds)
    assert one(core, None, 1_000) == (
        True,
        (100_000, False, 0, ABS, NOW + 3_000, NOW + 3_000, None, None),
    )


def test_status_of_new_bucket_writes_nothing(core: ModuleType) -> None:
    assert one(core, None, 0) == (True, (100_000, False, 0, NONE, 0, None, None, None))


def test_refill_is_continuous_at_the_limits_rate(core: ModuleType) -> None:
    empty = holding(core, 0)
    assert empty == NOW + 300_000
    assert core.available(*RPM, empty, T0) == 0
    assert core.available(*RPM, empty, T0 + 1) == 1  # 5/3 milli, floored
    assert core.available(*RPM, empty, T0 + 3) == 5
    assert core.available(*RPM, empty, T0 + 600) == 1_000  # exactly one token
    assert core.available(*RPM, empty, T0 + 30_000) == 50_000
    assert core.available(*RPM, empty, T0 + 60_000) == 100_000
    assert core.available(*RPM, empty, T0 + 10**9) == 100_000  # capped at burst
    # many reads change nothing: the state is one number, so there is no drift
    assert core.full_at_of(*RPM, core.available(*RPM, empty, T0 + 600), T0 + 600) == empty


def test_full_bucket_write_is_absolute_under_full_at_now(core: ModuleType) -> None:
    long_full = NOW - 10**9
    assert one(core, long_full, 2_000) == (
        True,
        (100_000, False, 0, ABS, NOW + 6_000, NOW + 6_000, None, NOW),
    )
    # exactly full now is full
    assert one(core, NOW, 2_000)[1][3] == ABS


def test_draining_bucket_write_is_relative_with_exact_bounds(core: ModuleType) -> None:
    half = holding(core, 50_000)
    admitted, out = one(core, half, 1_000)
    assert admitted
    # lower bound: not full at now; upper bound: still holds 1 token at now
    assert out == (50_000, False, 0, REL, 3_000, half + 3_000, NOW + 1, NOW + 99_000 * 3)
    # forced: no upper bound, the lower one stays (a full bucket would lose the consumption)
    assert one(core, half, 1_000, check=False)[1][6:] == (NOW + 1, None)


def test_give_back_is_an_unconditional_add(core: ModuleType) -> None:
    half = holding(core, 50_000)
    assert one(core, half, -1_000) == (
        True,
        (50_000, False, 0, ADD, -3_000, half - 3_000, None, None),
    )
    # a release never needs tokens, even with check
    assert one(core, holding(core, -5_000), -1_000)[0] is True


def test_denied_when_short_and_retry_after_is_the_exact_wait(core: ModuleType) -> None:
    short = holding(core, 500)
    admitted, out = one(core, short, 1_000)
    assert not admitted
    # 500 milli short at 5/3 milli per ms: 300 ms
    assert out == (500, True, 300, NONE, 0, short, None, None)
    assert core.available(*RPM, short, T0 + 300) == 1_000
    assert core.available(*RPM, short, T0 + 299) < 1_000
    assert core.time_until_available([(*RPM, short, 1_000)], T0) == 300
    # more than the burst: never
    assert one(core, None, 100_001)[1][2] is None
    assert core.time_until_available([(*RPM, None, 100_001)], T0) is None
    # a bucket full for a long time still holds only its burst
    assert one(core, NOW - 10**12, 100_001)[0] is False


@pytest.mark.parametrize(
    ("limit", "expected_ms"),
    [
        ((2_000, 2_000, 60_000), 30_000),  # 2 per minute: 30 s, not 38-44 s
        ((5_000, 5_000, 60_000), 12_000),
        ((60_000, 60_000, 60_000), 1_000),
        ((100_000, 100_000, 3_600_000), 36_000),
        ((600_000, 600_000, 86_400_000), 144_000),
        ((100_000_000, 100_000_000, 60_000), 1),  # 0.6 ms, in whole ms
    ],
)
def test_retry_after_a_drain_is_period_over_capacity(
    core: ModuleType, limit: tuple[int, int, int], expected_ms: int
) -> None:
    burst = limit[0]
    admitted, out = one(core, None, burst, limit=limit)
    assert admitted
    drained = out[5]
    admitted, out = one(core, drained, 1_000, limit=limit)
    assert not admitted and out[2] == expected_ms
    # and it is back exactly then: the next acquire is admitted
    assert one(core, drained, 1_000, now=T0 + expected_ms, limit=limit)[0] is True


def test_forced_debt_and_its_wait(core: ModuleType) -> None:
    admitted, out = one(core, holding(core, 500), 1_500, check=False)
    assert admitted and out[3] == REL
    in_debt = out[5]
    assert core.available(*RPM, in_debt, T0) == -1_000
    # 2 tokens to get to 1: 1.2 s
    assert core.time_until_available([(*RPM, in_debt, 1_000)], T0) == 1_200


def test_cascade_all_or_nothing(core: ModuleType) -> None:
    tpm = (10_000_000, 10_000_000, 60_000)  # step_milli 500, step_ms 3
    buckets = [
        (*RPM, holding(core, 50_000), 1_000),  # entity rpm: fine
        (*tpm, holding(core, 5_000_000, limit=tpm), 500_000),  # entity tpm: fine
        (*RPM, None, 1_000),  # parent rpm: fine (new)
        (*tpm, holding(core, 100_000, limit=tpm), 500_000),  # parent tpm: exceeded
    ]
    admitted, outcomes = core.decide(buckets, T0, True)
    assert not admitted
    assert [o.exceeded for o in outcomes] == [False, False, False, True]
    assert all(o.write_mode == NONE for o in outcomes)
    assert [o.new_full_at for o in outcomes] == [b[3] for b in buckets]
    # 400_000 short at 500/3 milli per ms: 2.4 s
    assert outcomes[3].retry_after_ms == 2_400
    assert core.time_until_available(buckets, T0) == 2_400
    # forced, everything is applied
    admitted, outcomes = core.decide(buckets, T0, False)
    assert admitted
    assert [o.write_mode for o in outcomes] == [REL, REL, ABS, REL]
    after = zip(buckets, outcomes, strict=True)
    assert [core.available(*b[:3], o.new_full_at, T0) for b, o in after] == [
        49_000,
        4_500_000,
        99_000,
        -400_000,
    ]
    # and once it has refilled, all are admitted
    admitted, outcomes = core.decide(buckets, T0 + 2_400, True)
    assert admitted
    assert core.available(*tpm, outcomes[3].new_full_at, T0 + 2_400) == 0


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.available(0, 1, 1, None, 0), ValueError),
        (lambda c: c.available(1, 0, 1, None, 0), ValueError),
        (lambda c: c.available(1, 1, -1, None, 0), ValueError),
        (lambda c: c.available(1, 1, 1, None, -1), ValueError),
        (lambda c: c.full_at_of(1, 1, 1, 0, -1), ValueError),
        (lambda c: c.available(2**63, 1, 1, None, 0), OverflowError),
        (lambda c: c.available(1, 1, 1, 10**38, 0), OverflowError),
        (lambda c: c.available(True, 1, 1, None, 0), TypeError),
        (lambda c: c.available(1.0, 1, 1, None, 0), TypeError),
        (lambda c: c.available(1, 1, 1, 1.5, 0), TypeError),
        (lambda c: c.full_at_of(1, 1, 1, None, 0), TypeError),
        (lambda c: c.decide([], 0, 1), TypeError),
        (lambda c: c.decide([[1, 1, 1, None, 0]], 0, True), TypeError),
        (lambda c: c.decide([(1, 1, 1, None, 0, 0)], 0, True), TypeError),
        (lambda c: c.decide({(1, 1, 1, None, 0)}, 0, True), TypeError),
        # conversion errors come before validation errors
        (lambda c: c.available(0, 1, 1, None, 2**63), OverflowError),
        # a debt beyond i64 millitokens, a retry beyond i64 ms
        (lambda c: c.available(1, 1, 1, 10**37, 0), OverflowError),
        (lambda c: c.time_until_available([(2**62, 1, 2**62, 2**125, 3)], 0), OverflowError),
    ],
)
def test_errors(core: ModuleType, call: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        call(core)


def test_core_picks_a_backend() -> None:
    from zae_limiter import core

    expected = "python" if os.environ.get("ZAE_LIMITER_NATIVE") == "0" else "native"
    backend: str = core.BACKEND
    assert backend == expected
    assert core.decide([(*RPM, None, 1_000)], T0, True)[0] is True
    env = {**os.environ, "ZAE_LIMITER_NATIVE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", "from zae_limiter import core; print(core.BACKEND)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "python"
