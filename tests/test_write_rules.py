"""The write rules under concurrency (docs/design.md, "Concurrent writers").

A simulated table holds one bucket; writers decide on stale views and the table applies a write
only if its condition holds on the stored state, as DynamoDB does, else the writer gets the
stored state back and decides again. For any interleaving:

- a write whose condition holds has exactly the effect of a fresh decision on the stored state
  (so stale views never over-admit, lose or double an update);
- the stored bucket offers exactly what an exact token bucket fed the same admitted consumption
  in the same order offers, now and at any later instant (an independent model in exact
  fractions, not the core), and every denial is one that exact bucket makes too;
- writers racing on a full or half-full bucket conflict at most twice each, and none is denied.

Both core implementations run the same cases.
"""

from __future__ import annotations

import importlib
from fractions import Fraction
from math import floor, gcd
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zae_limiter.core import bucket as reference

# The suite installs the extension: a missing one must fail, not skip.
BACKENDS = [
    pytest.param(reference, id="python"),
    pytest.param(importlib.import_module("zae_limiter._native"), id="native"),
]

T0 = 1_800_000_000_000
LIMITS = [
    (10_000_000_000, 10_000_000_000, 86_400_000),  # 10^7 per day
    (100_000, 100_000, 60_000),  # 100 per minute
    (5_000, 1_000, 1_000),  # 1 per second, burst 5
    (1_000_000, 1_000_000, 1_000),  # 1000 per second
    (2_000, 2_000, 60_000),  # 2 per minute
]


def holds(o: Any, stored: int | None, view: int | None) -> bool:
    """The condition DynamoDB evaluates (repository.bucket_update_request)."""
    if o.write_mode in (reference.WRITE_ADD, reference.WRITE_NONE):
        return True
    if view is None:
        return stored is None
    if stored is None:
        return False
    return (o.cond_lo is None or stored >= o.cond_lo) and (o.cond_hi is None or stored <= o.cond_hi)


def apply(o: Any, stored: int | None) -> int | None:
    if o.write_mode == reference.WRITE_ABSOLUTE:
        return int(o.write_value)
    if o.write_mode == reference.WRITE_NONE:
        return stored
    # ADD on a missing number starts from 0 (a bucket full since 1970)
    return (0 if stored is None else stored) + int(o.write_value)


class ExactBucket:
    """The textbook token bucket, in exact fractions: `tokens` at `at`, refilling at
    amount/period per ms, capped at burst; consumption may take it below zero."""

    def __init__(self, limit: tuple[int, int, int], tokens: Fraction, at: int) -> None:
        self.burst = limit[0]
        self.rate = Fraction(limit[1], limit[2])
        self.tokens, self.at = tokens, at

    def level(self, now: int) -> Fraction:
        return min(Fraction(self.burst), self.tokens + self.rate * max(0, now - self.at))

    def take(self, delta: int, now: int) -> None:
        self.tokens = min(Fraction(self.burst), self.level(now) - delta)
        self.at = max(self.at, now)

    def available(self, now: int) -> int:
        return floor(self.level(now))


def balance(limit: tuple[int, int, int], full_at: int) -> Fraction:
    """The exact balance at T0 of a stored state (design.md: full at `full_at` ticks of
    `1/step_milli` ms; a millitoken is `step_ms` ticks)."""
    burst, amount, period = limit
    g = gcd(amount, period)
    step_ms, step_milli = period // g, amount // g
    return min(Fraction(burst), burst - Fraction(full_at - T0 * step_milli, step_ms))


def simulate(core: ModuleType, limit: tuple[int, int, int], start: int | None,
             steps: list[tuple[int, int, int, bool]]) -> dict[str, Any]:
    """`steps`: (writer, ms advanced, delta, check); each writer starts from `start`."""
    burst = limit[0]
    table = start
    exact = ExactBucket(limit, Fraction(burst) if start is None else balance(limit, start), T0)
    views: dict[int, int | None] = {}
    now = T0
    conflicts: dict[int, int] = {}
    denied = 0
    for writer, advance, delta, check in steps:
        now += advance
        for _ in range(50):
            view = views.setdefault(writer, start)
            admitted, (o,) = core.decide([(*limit, view, delta)], now, check)
            if not admitted:
                if view != table:  # only a stale view can be wrong: read and decide again
                    views[writer] = table
                    continue
                denied += 1
                assert exact.level(now) < delta, "a denial an exact bucket would not make"
                assert o.retry_after_ms is None or exact.level(now + o.retry_after_ms) >= delta
                assert o.retry_after_ms is None or exact.level(now + o.retry_after_ms - 1) < delta
                break
            if not holds(o, table, view):
                conflicts[writer] = conflicts.get(writer, 0) + 1
                views[writer] = table
                continue
            # exact: the same effect as a decision made on the stored state itself
            _, (fresh,) = core.decide([(*limit, table, delta)], now, check)
            assert apply(o, table) == apply(fresh, table)
            table = apply(o, table)
            views[writer] = table
            exact.take(delta, now)
            for later in (now, now + 1, now + 997, now + 60_000, now + 86_400_000):
                assert core.available(*limit, table, later) == exact.available(later)
            break
        else:
            raise AssertionError("a writer never landed")
    return {"conflicts": conflicts, "denied": denied, "table": table}


step = st.tuples(
    st.integers(0, 7),
    st.integers(0, 2_000),
    st.integers(-3_000, 5_000).filter(bool),
    st.booleans(),
).map(lambda s: (s[0], s[1], s[2], s[3] and s[2] > 0))


@pytest.mark.parametrize("core", BACKENDS)
@settings(max_examples=300, deadline=None)
@given(
    limit=st.sampled_from(LIMITS),
    fill=st.sampled_from(["absent", "full", "half", "empty", "debt"]),
    steps=st.lists(step, min_size=1, max_size=60),
)
def test_any_interleaving_is_exact(
    core: ModuleType, limit: tuple[int, int, int], fill: str, steps: list[Any]
) -> None:
    burst = limit[0]
    start = None if fill == "absent" else core.full_at_of(*limit, {
        "full": burst,
        "half": burst // 2,
        "empty": 0,
        "debt": -burst,
    }[fill], T0 - (600_000 if fill == "full" else 0))
    simulate(core, limit, start, steps)


@pytest.mark.parametrize("core", BACKENDS)
@pytest.mark.parametrize("limit", LIMITS[:2])
@settings(max_examples=100, deadline=None)
@given(
    writers=st.integers(2, 64),
    order=st.randoms(use_true_random=False),
    fill=st.sampled_from(["full", "half"]),
)
def test_racing_writers_on_a_hot_bucket_conflict_at_most_twice(
    core: ModuleType, limit: tuple[int, int, int], writers: int, order: Any, fill: str
) -> None:
    """Every writer holds the same stale view and lands in any order, at clocks a few ms
    apart: none is denied and none conflicts more than twice, full or half full, forced or
    checked, give-backs among them."""
    burst = limit[0]
    start = core.full_at_of(*limit, burst if fill == "full" else burst // 2, T0 - 600_000)
    ids = list(range(writers))
    order.shuffle(ids)
    steps = [(w, order.randint(0, 3), 1_000, order.random() < 0.8) for w in ids]
    steps += [(w, order.randint(0, 3), -500, False) for w in ids[: writers // 2]]
    result = simulate(core, limit, start, steps)
    assert result["denied"] == 0
    assert max(result["conflicts"].values(), default=0) <= 2, result["conflicts"]
