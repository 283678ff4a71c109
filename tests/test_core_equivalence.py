"""The Rust core and the pure-Python reference agree on every output and every exception type.

Each operation is checked on 10,000 generated cases in CI (2,000 at the README's quick size)
mixing realistic buckets (valid limits, states near ``now``) with wild ones (i64 bounds, ints
outside i64, wrong types, half states, states long full or deep in debt, `full_at` beyond a
DynamoDB number, deltas beyond burst).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from random import Random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zae_limiter.core import bucket as reference

native = pytest.importorskip("zae_limiter._native")

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
# CI proves each property on 10,000 cases; the README's command (the quick size) on 2,000.
EXAMPLES = settings(
    max_examples=2_000 if os.environ.get("ZAE_RELIABILITY_SIZE", "quick") == "quick" else 10_000,
    deadline=None,
)
# Hypothesis draws are costly (~100 µs each), so each example draws one seed and the case is
# generated from it by the plain functions below; on a failure the assertion shows the inputs.
SEEDS = st.integers(0, 2**64 - 1)

EDGES = [I64_MIN, I64_MIN + 1, -(2**62), -1_000, -1, 0, 1, 2, 3, 1_000, 2**62, I64_MAX - 1, I64_MAX]
WRONG_TYPES: list[Any] = [True, False, 1.0, "1", b"1", [], None]
# The attributes of an outcome, in the documented order (docs/design.md section 1).
FIELDS = (
    "available_milli",
    "exceeded",
    "retry_after_ms",
    "write_mode",
    "write_value",
    "new_full_at",
    "cond_lo",
    "cond_hi",
)


def wild_int(rng: Random) -> Any:
    """Mostly valid ints, often the i64 bounds, rarely not an i64 at all."""
    k = rng.random()
    if k < 0.3:
        return rng.randint(-2_000, 2_000)
    if k < 0.6:
        return rng.choice(EDGES)
    if k < 0.9:
        return rng.randint(I64_MIN, I64_MAX)
    if k < 0.95:
        return rng.choice([1, -1]) * rng.randint(2**63, 2**70)
    return rng.choice(WRONG_TYPES)


FULL_AT_MAX = 10**38 - 1


def wild_full_at(rng: Random) -> Any:
    """None, i64-sized values, the edges of a DynamoDB number, or beyond it."""
    k = rng.random()
    if k < 0.3:
        return None
    if k < 0.6:
        return wild_int(rng)
    if k < 0.8:
        return rng.choice([FULL_AT_MAX, -FULL_AT_MAX, FULL_AT_MAX + 1, -FULL_AT_MAX - 1, 2**127])
    return rng.randint(-FULL_AT_MAX, FULL_AT_MAX)


def gen_now(rng: Random) -> int:
    k = rng.random()
    if k < 0.8:
        return rng.randint(0, 4_000_000_000_000)
    return rng.choice(EDGES) if k < 0.9 else rng.randint(-2_000, 2_000)


def gen_limit(rng: Random) -> tuple[int, int, int]:
    k = rng.random()
    if k < 0.5:  # realistic
        return rng.randint(1, 10**9), rng.randint(1, 10**9), rng.randint(1, 86_400_000)
    if k < 0.85:  # small: many quanta, exact caps
        return rng.randint(1, 10_000), rng.randint(1, 10_000), rng.randint(1, 10_000)
    return rng.choice([1, 2, I64_MAX]), rng.choice([1, 3, I64_MAX]), rng.choice(EDGES)


def realistic_bucket(rng: Random, now: int) -> tuple[Any, ...]:
    burst, amount, period = gen_limit(rng)
    full_at: Any = None
    if rng.random() >= 0.2:
        if rng.random() < 0.9:
            # a balance from deep debt to full, at an instant around now
            tokens = rng.randint(-2 * burst, burst + 5)
            at = max(0, rng.randint(now - 10 * abs(period), now + 1_000))
            try:
                full_at = reference.full_at_of(burst, amount, period, tokens, at)
            except (ValueError, OverflowError):
                full_at = rng.choice(EDGES)
        else:
            full_at = wild_full_at(rng)
    k = rng.random()
    if k < 0.15:
        delta = 0
    elif k < 0.6:
        delta = rng.randint(1, burst)
    elif k < 0.8:
        delta = rng.randint(-burst, -1)
    elif k < 0.9:
        delta = rng.randint(burst, burst + 10)
    else:
        delta = rng.choice(EDGES)
    return (burst, amount, period, full_at, delta)


def wild_bucket(rng: Random) -> Any:
    if rng.random() < 0.9:
        return (wild_int(rng), wild_int(rng), wild_int(rng), wild_full_at(rng), wild_int(rng))
    return rng.choice([(1, 1, 1, None), [1, 1, 1, None, 0], (1, 1, 1, None, 0, 0), 5, None])


def gen_buckets(rng: Random, now: int) -> Any:
    bs = [
        realistic_bucket(rng, now) if rng.random() < 0.85 else wild_bucket(rng)
        for _ in range(rng.randint(0, 4))
    ]
    k = rng.random()
    if k < 0.6:
        return bs
    return tuple(bs) if k < 0.99 else {"buckets": bs}


def maybe_wild(rng: Random, value: Any, p: float = 0.1) -> Any:
    return wild_int(rng) if rng.random() < p else value


def gen_single(rng: Random) -> tuple[Any, ...]:
    """Arguments for available."""
    now = gen_now(rng)
    if rng.random() < 0.25:
        b = wild_bucket(rng)
        if not isinstance(b, tuple) or len(b) != 5:
            b = (1, 1, 1, None, 0)
        return (*b[:4], maybe_wild(rng, now, 0.5))
    return (*realistic_bucket(rng, now)[:4], now)


def gen_full_at_of(rng: Random) -> tuple[Any, ...]:
    """Arguments for full_at_of: a limit, a balance, an instant."""
    now = gen_now(rng)
    burst, amount, period = gen_limit(rng)
    tokens = rng.randint(-2 * burst, burst + 5) if rng.random() < 0.8 else wild_int(rng)
    return (burst, amount, period, tokens, maybe_wild(rng, now, 0.2))


def plain(result: Any) -> Any:
    """A result in comparable form, with exact types (``True`` is not ``1``): ``decide``'s
    outcomes field by field, by name (the native ``Outcome`` and the reference's are different
    classes with the same attributes); anything else by ``repr``."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], list):
        admitted, outcomes = result
        return repr(admitted), [
            (type(o).__name__, [(name, repr(getattr(o, name))) for name in FIELDS])
            for o in outcomes
        ]
    return repr(result)


def run(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """The result (see `plain`) or the exception type."""
    try:
        return "ok", plain(fn(*args))
    except (TypeError, ValueError, OverflowError) as e:
        return "raised", type(e)


def same(name: str, *args: Any) -> None:
    expected = run(getattr(reference, name), *args)
    got = run(getattr(native, name), *args)
    assert got == expected, (name, args)


@EXAMPLES
@given(seed=SEEDS)
def test_decide(seed: int) -> None:
    rng = Random(seed)
    now = gen_now(rng)
    buckets = gen_buckets(rng, now)
    k = rng.random()
    check = rng.choice([0, 1, None, "x"]) if k < 0.03 else k < 0.6
    same("decide", buckets, maybe_wild(rng, now), check)


@EXAMPLES
@given(seed=SEEDS)
def test_time_until_available(seed: int) -> None:
    rng = Random(seed)
    now = gen_now(rng)
    same("time_until_available", gen_buckets(rng, now), maybe_wild(rng, now))


@EXAMPLES
@given(seed=SEEDS)
def test_available(seed: int) -> None:
    same("available", *gen_single(Random(seed)))


@EXAMPLES
@given(seed=SEEDS)
def test_full_at_of(seed: int) -> None:
    same("full_at_of", *gen_full_at_of(Random(seed)))


def test_edges_exhaustive() -> None:
    """Every combination of edge values for the single-bucket functions."""
    levels: list[Any] = [
        -FULL_AT_MAX - 1, -FULL_AT_MAX, I64_MIN, -1, 0, 1, 7, I64_MAX, FULL_AT_MAX, None
    ]
    for burst in [I64_MIN, 0, 1, 5, I64_MAX]:
        for amount in [1, 3, I64_MAX]:
            for period in [0, 1, 2, I64_MAX]:
                for full_at in levels:
                    for now in [-1, 0, 3, I64_MAX]:
                        same("available", burst, amount, period, full_at, now)
                        for delta in [I64_MIN, -1, 0, 1, 6, I64_MAX]:
                            same("full_at_of", burst, amount, period, delta, now)
                            b = (burst, amount, period, full_at, delta)
                            same("time_until_available", [b], now)
                            same("decide", [b], now, True)
                            same("decide", [b, b], now, False)


def test_keywords_and_edge_cases() -> None:
    b = (100_000, 100_000, 60_000, 350_000, 1_000)
    cases: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("decide", (), {"buckets": [b], "now_ms": 10_700, "check": True}),
        ("decide", ([],), {"now_ms": 0, "check": False}),
        ("time_until_available", ((b,),), {"now_ms": 5}),
        ("available", b[:4], {"now_ms": 0}),
        (
            "full_at_of",
            (),
            {
                "burst_milli": 1,
                "refill_amount_milli": 1,
                "refill_period_ms": 1,
                "tokens_milli": 0,
                "now_ms": 5,
            },
        ),
        ("full_at_of", (1, 1, 1, None, 0), {}),
        ("available", (1, 1, 1, None, "x"), {}),
        ("available", (1, 1, 1, True, 0), {}),
        ("available", (0, 1, 1, None, -1), {}),
        ("available", (0, 1, 1, 2**127, -1), {}),
        ("available", (0, 1, 1, None, 2**64), {}),
        ("decide", ([b, (1, 2)], -1, True), {}),
        ("decide", ([b], 0, 1), {}),
        ("decide", ({b}, 0, True), {}),
        ("decide", ([b], 0, True, 0), {}),
    ]
    for name, args, kwargs in cases:
        expected = run(lambda: getattr(reference, name)(*args, **kwargs))  # noqa: B023
        got = run(lambda: getattr(native, name)(*args, **kwargs))  # noqa: B023
        assert got == expected, (name, args, kwargs)


def test_native_outcome_has_the_reference_fields_and_is_frozen() -> None:
    buckets = [(10_000, 1_000, 1_000, 9_000, 1_000), (10_000, 1_000, 1_000, None, 0)]
    admitted, outs = native.decide(buckets, 5_000, True)
    ref_admitted, ref_outs = reference.decide(buckets, 5_000, True)
    assert admitted is ref_admitted is True
    for got, want in zip(outs, ref_outs, strict=True):
        assert type(got).__name__ == "Outcome"
        assert reference.Outcome._fields == FIELDS
        for name in FIELDS:
            assert getattr(got, name) == getattr(want, name), name
            assert type(getattr(got, name)) is type(getattr(want, name)), name
        with pytest.raises(AttributeError):
            got.write_mode = 0
    assert outs[0] == native.decide(buckets, 5_000, True)[1][0]


# -- reserved blocks ------------------------------------------------------------------------


def gen_amounts(rng: Random, n: int) -> Any:
    """Amounts for a block of `n` limits: mostly valid, sometimes wrong in length, sign or type."""
    k = rng.random()
    if k < 0.05:
        return rng.choice([None, 3, "12", {1: 2}])
    length = n if rng.random() < 0.9 else rng.randint(0, n + 2)
    values = [
        rng.randint(0, 3_000) if rng.random() < 0.85 else wild_int(rng) for _ in range(length)
    ]
    return tuple(values) if rng.random() < 0.2 else values


def block_script(rng: Random) -> list[tuple[str, Any]]:
    ops = rng.choices(["add", "take", "take_up_to", "drain", "take_spent", "take_all"],
                      weights=[3, 4, 2, 1, 1, 2], k=rng.randint(1, 25))
    script: list[tuple[str, Any]] = []
    for op in ops:
        if op in ("drain", "take_spent"):
            script.append((op, None))
        elif op == "take_all":
            script.append((op, [gen_amounts(rng, 2), gen_amounts(rng, 1)]))
        else:
            script.append((op, gen_amounts(rng, 2)))
    return script


def play(impl: Any, script: list[tuple[str, Any]]) -> list[Any]:
    """Run `script` on two blocks of `impl` (one of 2 limits, one of 1); every result or error."""
    a, b = impl.Block(2), impl.Block(1)
    b.add([10_000])
    trace: list[Any] = []
    for op, arg in script:
        if op == "take_all":
            trace.append(run(impl.take_all, [a, b], arg))
        elif arg is None:
            trace.append(run(getattr(a, op)))
        else:
            trace.append(run(getattr(a, op), arg))
        trace.append((a.held, a.spent, b.held, b.spent))
    return trace


@given(seed=SEEDS)
@settings(max_examples=3_000, deadline=None)
def test_blocks(seed: int) -> None:
    script = block_script(Random(seed))
    assert play(native, script) == play(reference, script), script


def test_block_edge_cases() -> None:
    for impl in (native, reference):
        with pytest.raises(ValueError):
            impl.Block(-1)
        with pytest.raises(TypeError):
            impl.Block(True)
        block = impl.Block(1)
        with pytest.raises(ValueError, match="distinct"):
            impl.take_all([block, block], [[0], [0]])
        with pytest.raises(TypeError):
            impl.take_all([object()], [[0]])
        block.add([I64_MAX])
        with pytest.raises(OverflowError):
            block.add([1])
        assert block.take([I64_MAX]) is True
        assert block.held == [0]
        with pytest.raises(OverflowError):  # spent would pass i64
            block.add([1])
            block.take([1])
        assert block.held == [1] and block.spent == [I64_MAX]
