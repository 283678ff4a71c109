"""Hand-computed expectations for the token-bucket core (docs/design.md section 1).

Run against the pure-Python reference and, when it is built, the native extension.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

from zae_limiter import bucket as reference
from zae_limiter.core import WRITE_ABSOLUTE, WRITE_ADD, WRITE_NONE, WRITE_RELATIVE

BACKENDS: list[Any] = [pytest.param(reference, id="python")]
with contextlib.suppress(ImportError):  # the extension is built in CI
    BACKENDS.append(pytest.param(importlib.import_module("zae_limiter._native"), id="native"))

# 100 tokens per minute, burst 100: 1 token every 600 ms, i.e. whole quanta of 5 milli per 3 ms.
RPM = (100_000, 100_000, 60_000)
T0 = 1_700_000_000_000
NONE, REL, ABS, ADD = WRITE_NONE, WRITE_RELATIVE, WRITE_ABSOLUTE, WRITE_ADD


@pytest.fixture(params=BACKENDS)
def core(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = request.param
    return module


def one(
    core: ModuleType,
    tokens: int | None,
    last: int | None,
    delta: int,
    now: int,
    check: bool = True,
    reanchor: int = 0,
    limit: tuple[int, int, int] = RPM,
) -> Any:
    admitted, outcomes = core.decide([(*limit, tokens, last, delta)], now, check, reanchor)
    assert len(outcomes) == 1
    return admitted, fields(outcomes[0])


def fields(outcome: Any) -> tuple[Any, ...]:
    """An outcome's attributes in their documented order (both backends name them alike)."""
    return tuple(getattr(outcome, name) for name in reference.Outcome._fields)




def boundary(now: int, epoch: int = 3) -> int:
    """The epoch boundary at or after `now` (RPM with reanchor_ms 0: one 3 ms quantum)."""
    return -(-now // epoch) * epoch


def test_consume_from_new_bucket(core: ModuleType) -> None:
    # created full, anchored at the epoch boundary like a write at full
    assert one(core, None, None, 1_000, T0) == (
        True,
        (100_000, False, 0, ABS, 99_000, 99_000, boundary(T0), None, None),
    )
    assert one(core, None, None, 1_000, T0, reanchor=60_000)[1][6] == boundary(T0, 600)


def test_status_of_new_bucket_writes_nothing(core: ModuleType) -> None:
    assert one(core, None, None, 0, T0) == (
        True,
        (100_000, False, 0, NONE, 0, 100_000, T0, None, None),
    )


def test_refill_after_600ms_gives_exactly_one_token(core: ModuleType) -> None:
    assert core.available(*RPM, 0, T0, T0 + 600) == 1_000
    assert core.available(*RPM, 0, T0, T0 + 599) == 995  # 199 whole quanta of 5 milli
    assert core.available(*RPM, 0, T0, T0 + 2) == 0
    assert core.refill(*RPM, 0, T0, T0 + 601) == (1_000, T0 + 600)
    assert core.refill(*RPM, 0, T0, T0 + 602) == (1_000, T0 + 600)  # anchor on whole quanta
    assert core.refill(*RPM, 0, T0, T0 + 603) == (1_005, T0 + 603)


def test_refill_has_no_drift(core: ModuleType) -> None:
    limit = (10_000_000, 7_000, 9_000)  # 7 milli every 9 ms
    tokens, last = 0, T0
    for now in range(T0 + 1, T0 + 50_000, 17):
        tokens, last = core.refill(*limit, tokens, last, now)
    assert (tokens, last) == core.refill(*limit, 0, T0, now)
    assert tokens == (now - T0) // 9 * 7


def test_retry_after_is_exact(core: ModuleType) -> None:
    admitted, o = one(core, 0, T0, 1_000, T0)
    assert not admitted
    assert o == (0, True, 600, NONE, 0, 0, T0, None, None)
    # 500 short at T0 + 1: 100 more quanta, the 100th lands at T0 + 300
    admitted, o = one(core, 500, T0, 1_000, T0 + 1)
    assert (admitted, o[1], o[2]) == (False, True, 299)
    assert core.available(*RPM, 500, T0, T0 + 300) == 1_000
    assert core.available(*RPM, 500, T0, T0 + 299) == 995
    assert core.time_until_available([(*RPM, 500, T0, 1_000)], T0 + 1) == 299


def test_more_than_burst_is_never_available(core: ModuleType) -> None:
    admitted, o = one(core, None, None, 100_001, T0)
    assert not admitted
    assert o[1:3] == (True, None)
    assert core.time_until_available([(*RPM, None, None, 100_001)], T0) is None
    # but it can be forced
    assert one(core, None, None, 100_001, T0, check=False) == (
        True,
        (100_000, False, 0, ABS, -1, -1, boundary(T0), None, None),
    )


def test_cap_at_burst(core: ModuleType) -> None:
    assert core.available(*RPM, 99_000, T0, T0 + 600_000) == 100_000
    assert core.refill(*RPM, 99_000, T0, T0 + 600_000) == (100_000, T0 + 600_000)
    # a consumption from a full bucket rewrites it absolutely, re-anchored at the next epoch
    # boundary: 3 ms quanta of 5 milli; the epoch is the reanchor interval capped at the quanta
    # that refill at most max(1 token, 1% of burst) = 1 token: 200 quanta, 600 ms
    now = T0 + 600_000
    admitted, o = one(core, 99_000, T0, 2_000, now, reanchor=60_000)
    assert admitted
    boundary = -(-now // 600) * 600
    assert now < boundary < now + 600
    # cap point: 100_000 - 1_000_000 added -> any stored value >= -900_000 means "full now"
    assert o == (100_000, False, 0, ABS, 98_000, 98_000, boundary, -900_000, None)
    # until the boundary nothing refills, so the bucket cannot be full again for later writers
    assert core.available(*RPM, 98_000, boundary, boundary - 1) == 98_000
    # with reanchor_ms = 0 the epoch is one quantum
    assert one(core, 99_000, T0, 2_000, now)[1][6] == -(-now // 3) * 3


def test_relative_consume_and_conditions(core: ModuleType) -> None:
    # no quantum yet: tokens -= 1000, anchor unchanged, enough tokens and not full
    assert one(core, 50_000, T0, 1_000, T0 + 2) == (
        True,
        (50_000, False, 0, REL, -1_000, 49_000, T0, 1_000, 99_999),
    )
    # 233 quanta (1165 milli) since the anchor, folded in since reanchor_ms = 0
    assert one(core, 50_000, T0, 1_000, T0 + 700) == (
        True,
        (51_165, False, 0, REL, 165, 50_165, T0 + 699, -165, 98_834),
    )
    # not folded while now - anchor < reanchor_ms
    assert one(core, 50_000, T0, 1_000, T0 + 700, reanchor=1_000)[1][3:7] == (
        REL,
        -1_000,
        49_000,
        T0,
    )


def test_negative_after_forced_consume(core: ModuleType) -> None:
    admitted, o = one(core, 500, T0, 2_000, T0, check=False)
    assert admitted
    assert o == (500, False, 0, REL, -2_000, -1_500, T0, None, 99_999)
    assert core.available(*RPM, -1_500, T0, T0) == -1_500
    # 2500 short for one token: 500 quanta
    assert core.time_until_available([(*RPM, -1_500, T0, 1_000)], T0) == 1_500


def test_release_capped_at_burst(core: ModuleType) -> None:
    # a release is an unconditional add, whether or not it overfills: reading caps at burst
    assert one(core, 99_500, T0, -1_000, T0) == (
        True,
        (99_500, False, 0, ADD, 1_000, 100_500, T0, None, None),
    )
    assert core.available(*RPM, 100_500, T0, T0 + 5) == 100_000
    assert one(core, 50_000, T0, -1_000, T0, check=False) == (
        True,
        (50_000, False, 0, ADD, 1_000, 51_000, T0, None, None),
    )
    # a release never needs tokens, even with check
    assert one(core, -5_000, T0, -1_000, T0)[0] is True


def test_future_anchor_refills_nothing(core: ModuleType) -> None:
    assert core.available(*RPM, 10, T0 + 5_000, T0) == 10
    assert core.refill(*RPM, 10, T0 + 5_000, T0) == (10, T0 + 5_000)
    # the wait counts from the anchor
    assert core.time_until_available([(*RPM, 0, T0 + 5_000, 5)], T0) == 5_003


def test_cascade_all_or_nothing(core: ModuleType) -> None:
    tpm = (10_000_000, 10_000_000, 60_000)
    buckets = [
        (*RPM, 50_000, T0, 1_000),  # entity rpm: fine
        (*tpm, 5_000_000, T0, 500_000),  # entity tpm: fine
        (*RPM, None, None, 1_000),  # parent rpm: fine (new)
        (*tpm, 100_000, T0, 500_000),  # parent tpm: exceeded
    ]
    admitted, outcomes = core.decide(buckets, T0, True, 0)
    assert not admitted
    assert [o.exceeded for o in outcomes] == [False, False, False, True]
    assert all(o.write_mode == NONE for o in outcomes)
    assert [(o.new_tokens_milli, o.new_last_refill_ms) for o in outcomes] == [
        (50_000, T0),
        (5_000_000, T0),
        (100_000, T0),
        (100_000, T0),
    ]
    # 400_000 short at 1/6 milli per ms (quanta of 500 milli per 3 ms): 800 quanta
    assert outcomes[3].retry_after_ms == 2_400
    assert core.time_until_available(buckets, T0) == 2_400
    # forced, everything is applied
    admitted, outcomes = core.decide(buckets, T0, False, 0)
    assert admitted
    assert [o.write_mode for o in outcomes] == [REL, REL, ABS, REL]
    assert [o.new_tokens_milli for o in outcomes] == [49_000, 4_500_000, 99_000, -400_000]
    # and once it has refilled, all are admitted
    admitted, outcomes = core.decide(buckets, T0 + 2_400, True, 0)
    assert admitted
    assert outcomes[3].new_tokens_milli == 0


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.available(0, 1, 1, None, None, 0), ValueError),
        (lambda c: c.available(1, 0, 1, None, None, 0), ValueError),
        (lambda c: c.available(1, 1, -1, None, None, 0), ValueError),
        (lambda c: c.available(1, 1, 1, 5, None, 0), ValueError),
        (lambda c: c.available(1, 1, 1, None, None, -1), ValueError),
        (lambda c: c.decide([], 0, True, -1), ValueError),
        (lambda c: c.available(2**63, 1, 1, None, None, 0), OverflowError),
        (lambda c: c.refill(1, 1, 1, 0, 0, -(2**63) - 1), OverflowError),
        (lambda c: c.available(True, 1, 1, None, None, 0), TypeError),
        (lambda c: c.available(1.0, 1, 1, None, None, 0), TypeError),
        (lambda c: c.refill(1, 1, 1, None, None, 0), TypeError),
        (lambda c: c.decide([], 0, 1, 0), TypeError),
        (lambda c: c.decide([[1, 1, 1, None, None, 0]], 0, True, 0), TypeError),
        (lambda c: c.decide([(1, 1, 1, None, None)], 0, True, 0), TypeError),
        (lambda c: c.decide({(1, 1, 1, None, None, 0)}, 0, True, 0), TypeError),
        # conversion errors come before validation errors
        (lambda c: c.available(0, 1, 1, None, None, 2**63), OverflowError),
        # a retry beyond i64
        (lambda c: c.time_until_available([(2**62, 1, 2**62, 0, 0, 3)], 0), OverflowError),
    ],
)
def test_errors(core: ModuleType, call: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        call(core)


def test_core_picks_a_backend() -> None:
    from zae_limiter import core

    expected = "python" if os.environ.get("ZAE_LIMITER_NATIVE") == "0" else None
    if expected is None:
        expected = "native" if len(BACKENDS) == 2 else "python"
    backend: str = core.BACKEND
    assert backend == expected
    assert core.decide([(*RPM, None, None, 1_000)], T0, True, 0)[0] is True
    env = {**os.environ, "ZAE_LIMITER_NATIVE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", "from zae_limiter import core; print(core.BACKEND)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "python"
