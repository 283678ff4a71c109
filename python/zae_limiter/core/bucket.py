"""Pure-Python reference of the token-bucket core (docs/design.md section 1).

This module and the Rust extension ``zae_limiter._native`` implement one contract; property
tests prove they return identical outputs and raise the same exception types. Use
``zae_limiter.core``, which picks the native backend when it is available.

All amounts are integer millitokens, all times integer milliseconds since the Unix epoch. A
limit is ``(burst_milli, refill_amount_milli, refill_period_ms)``, all > 0. A bucket's whole
state is one number, ``full_at``: the instant it is full again, in *ticks* of ``1 / step_milli``
ms, where ``step_milli / step_ms`` is the limit's rate reduced by the gcd of amount and period.
One ms is ``step_milli`` ticks and one millitoken ``step_ms`` ticks, so refill and consumption
are whole numbers of ticks and every decision is exact.

Arguments are checked in signature order (for ``buckets``: bucket by bucket, field by field):

- ``TypeError``: not an int (``bool`` is not accepted as an int; objects with ``__index__``
  are), ``check`` not a ``bool``, ``buckets`` not a list or tuple, a bucket not a 5-tuple;
- ``OverflowError``: an int outside signed 64-bit, or a ``full_at`` beyond ``FULL_AT_MAX``.

Then the values are validated (``ValueError``: non-positive burst/amount/period, negative
``now_ms``), and finally computed: amounts and times must fit signed 64-bit and a ``full_at`` a
DynamoDB number, else ``OverflowError``. A denial is a returned value.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from math import gcd
from typing import Final, NamedTuple, SupportsIndex, TypeAlias

__all__ = [
    "FULL_AT_MAX",
    "I64_MAX",
    "I64_MIN",
    "WRITE_ABSOLUTE",
    "WRITE_ADD",
    "WRITE_NONE",
    "WRITE_RELATIVE",
    "Block",
    "BucketInput",
    "Outcome",
    "available",
    "decide",
    "full_at_of",
    "take_all",
    "time_until_available",
]

I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1
FULL_AT_MAX: Final = 10**38 - 1
"""The largest magnitude of a stored ``full_at``: DynamoDB numbers hold 38 significant digits."""

WRITE_NONE: Final = 0
"""No write (denied, or delta 0)."""
WRITE_RELATIVE: Final = 1
"""``full_at += write_value`` under ``cond_lo <= full_at [<= cond_hi]``."""
WRITE_ABSOLUTE: Final = 2
"""``full_at = write_value`` under ``full_at <= cond_hi``, or "does not exist" when the input
did not exist."""
WRITE_ADD: Final = 3
"""``full_at += write_value`` (negative) with no condition (a give-back)."""

BucketInput: TypeAlias = tuple[int, int, int, int | None, int]
"""``(burst_milli, refill_amount_milli, refill_period_ms, full_at | None, delta_milli)``."""


class Outcome(NamedTuple):
    """One bucket's outcome of a decision (docs/design.md section 1); the native extension's
    ``Outcome`` has the same attributes."""

    available_milli: int
    exceeded: bool
    retry_after_ms: int | None
    write_mode: int
    write_value: int
    new_full_at: int | None
    cond_lo: int | None
    cond_hi: int | None


# --- argument conversion ------------------------------------------------------------------------


def _index(value: object, name: str) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    if isinstance(value, SupportsIndex):
        return operator.index(value)
    raise TypeError(f"{name} must be an int, not {type(value).__name__}")


def _int(value: object, name: str) -> int:
    """An int fitting signed 64-bit (``TypeError`` / ``OverflowError`` otherwise)."""
    v = _index(value, name)
    if not I64_MIN <= v <= I64_MAX:
        raise OverflowError(f"{name} does not fit signed 64-bit: {v}")
    return v


def _full_at(value: object) -> int | None:
    if value is None:
        return None
    v = _index(value, "full_at")
    if not -FULL_AT_MAX <= v <= FULL_AT_MAX:
        raise OverflowError(f"full_at does not fit a DynamoDB number: {v}")
    return v


def _bucket(value: object) -> BucketInput:
    if not isinstance(value, tuple) or len(value) != 5:
        raise TypeError("a bucket must be a tuple of 5 items")
    burst, amount, period, full_at, delta = value
    return (
        _int(burst, "burst_milli"),
        _int(amount, "refill_amount_milli"),
        _int(period, "refill_period_ms"),
        _full_at(full_at),
        _int(delta, "delta_milli"),
    )


def _buckets(value: object) -> list[BucketInput]:
    if not isinstance(value, list | tuple):
        raise TypeError("buckets must be a list or a tuple of bucket tuples")
    return [_bucket(b) for b in value]


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool")
    return value


# --- validation ---------------------------------------------------------------------------------


def _check_now(now_ms: int) -> None:
    if now_ms < 0:
        raise ValueError(f"now_ms must be >= 0, got {now_ms}")


def _check_limit(burst: int, amount: int, period: int) -> None:
    if burst <= 0:
        raise ValueError(f"burst_milli must be > 0, got {burst}")
    if amount <= 0:
        raise ValueError(f"refill_amount_milli must be > 0, got {amount}")
    if period <= 0:
        raise ValueError(f"refill_period_ms must be > 0, got {period}")


def _fit(v: int) -> int:
    """An amount or a time: must fit signed 64-bit."""
    if not I64_MIN <= v <= I64_MAX:
        raise OverflowError("integer overflow in token-bucket arithmetic")
    return v


def _level(v: int) -> int:
    """A stored ``full_at`` or a bound on it: must fit a DynamoDB number."""
    if not -FULL_AT_MAX <= v <= FULL_AT_MAX:
        raise OverflowError("integer overflow in token-bucket arithmetic")
    return v


# --- the math -----------------------------------------------------------------------------------


class _Rate(NamedTuple):
    """A limit in whole refill quanta: ``step_milli`` millitokens every ``step_ms``."""

    burst: int
    step_ms: int
    step_milli: int

    @classmethod
    def of(cls, burst: int, amount: int, period: int) -> _Rate:
        g = gcd(amount, period)
        return cls(burst, period // g, amount // g)


class _View(NamedTuple):
    """A bucket at ``now``: ``debt`` ticks until full again (0 when full), ``available``
    millitokens now (``burst - ceil(debt / step_ms)``)."""

    full_at: int | None
    now_ticks: int
    debt: int
    available: int

    @classmethod
    def of(cls, r: _Rate, full_at: int | None, now: int) -> _View:
        now_ticks = now * r.step_milli
        debt = 0 if full_at is None else max(full_at - now_ticks, 0)
        return cls(full_at, now_ticks, debt, r.burst - -(-debt // r.step_ms))

    def covers(self, r: _Rate, delta: int) -> bool:
        return self.debt <= (r.burst - delta) * r.step_ms

    def wait(self, r: _Rate, delta: int, now: int) -> int | None:
        """Ms until ``delta`` is there: 0 if already or ``delta <= 0``; ``None`` if never."""
        if delta > r.burst:
            return None
        if delta <= 0 or self.covers(r, delta):
            return 0
        full_at = self.now_ticks if self.full_at is None else self.full_at
        due = -(-(full_at - (r.burst - delta) * r.step_ms) // r.step_milli)
        return _fit(max(due - now, 0))


def available(
    burst_milli: int,
    refill_amount_milli: int,
    refill_period_ms: int,
    full_at: int | None,
    now_ms: int,
) -> int:
    """Millitokens available at ``now_ms``; ``burst`` for a bucket that does not exist yet.

    May be negative after forced consumption.
    """
    burst = _int(burst_milli, "burst_milli")
    amount = _int(refill_amount_milli, "refill_amount_milli")
    period = _int(refill_period_ms, "refill_period_ms")
    level = _full_at(full_at)
    now = _int(now_ms, "now_ms")
    _check_limit(burst, amount, period)
    _check_now(now)
    return _fit(_View.of(_Rate.of(burst, amount, period), level, now).available)


def full_at_of(
    burst_milli: int,
    refill_amount_milli: int,
    refill_period_ms: int,
    tokens_milli: int,
    now_ms: int,
) -> int:
    """The ``full_at`` of a bucket holding ``tokens_milli`` at ``now_ms`` (at least burst: full
    now). Converts a balance into the stored form (another layout, another definition)."""
    burst = _int(burst_milli, "burst_milli")
    amount = _int(refill_amount_milli, "refill_amount_milli")
    period = _int(refill_period_ms, "refill_period_ms")
    tokens = _int(tokens_milli, "tokens_milli")
    now = _int(now_ms, "now_ms")
    _check_limit(burst, amount, period)
    _check_now(now)
    r = _Rate.of(burst, amount, period)
    return _level(now * r.step_milli + max(burst - tokens, 0) * r.step_ms)


def time_until_available(buckets: Sequence[BucketInput], now_ms: int) -> int | None:
    """Ms until every bucket with ``delta > 0`` has ``delta`` available (0 if already).

    ``None`` if some delta exceeds its burst (it never will).
    """
    parsed = _buckets(buckets)
    now = _int(now_ms, "now_ms")
    _check_now(now)
    for b in parsed:
        _check_limit(b[0], b[1], b[2])
    if any(delta > burst for burst, _, _, _, delta in parsed):
        return None
    longest = 0
    for burst, amount, period, full_at, delta in parsed:
        r = _Rate.of(burst, amount, period)
        wait = _View.of(r, full_at, now).wait(r, delta, now)
        if wait is not None:
            longest = max(longest, wait)
    return longest


def decide(
    buckets: Sequence[BucketInput], now_ms: int, check: bool
) -> tuple[bool, list[Outcome]]:
    """One acquire decision over a flat list of buckets: ``(admitted, outcomes)``.

    With ``check`` it is all-or-nothing: a bucket with ``delta > 0`` that does not hold
    ``delta`` is exceeded, and if any is, nothing is written. Without ``check`` every delta is
    applied (forced: may go negative) and nothing is ever exceeded. See design.md for the write
    rules.
    """
    parsed = _buckets(buckets)
    now = _int(now_ms, "now_ms")
    check = _bool(check, "check")
    _check_now(now)
    for b in parsed:
        _check_limit(b[0], b[1], b[2])

    # Pass 1: availability, exceeded, retry_after; nothing written yet.
    outcomes: list[Outcome] = []
    views: list[tuple[_Rate, _View]] = []
    admitted = True
    for burst, amount, period, full_at, delta in parsed:
        r = _Rate.of(burst, amount, period)
        v = _View.of(r, full_at, now)
        views.append((r, v))
        exceeded = check and delta > 0 and not v.covers(r, delta)
        retry = v.wait(r, delta, now) if exceeded else 0
        admitted = admitted and not exceeded
        outcomes.append(
            Outcome(_fit(v.available), exceeded, retry, WRITE_NONE, 0, full_at, None, None)
        )
    if not admitted:
        return False, outcomes

    # Pass 2: the writes.
    for i, (b, (r, v)) in enumerate(zip(parsed, views, strict=True)):
        if b[4] != 0:
            outcomes[i] = _write(outcomes[i], r, v, b[4], check)
    return True, outcomes


def _write(status: Outcome, r: _Rate, v: _View, delta: int, check: bool) -> Outcome:
    """The write of one admitted bucket with a non-zero delta. Each rule is exact for every
    stored state its condition accepts (design.md, "Concurrent writers")."""
    avail = status.available_milli
    ticks = delta * r.step_ms
    if v.full_at is None:
        # Created full at now (the condition is "does not exist").
        value = _level(v.now_ticks + max(ticks, 0))
        return Outcome(avail, False, 0, WRITE_ABSOLUTE, value, value, None, None)
    if delta < 0:
        # A give-back commutes with every other write: a bucket never reads fuller than full,
        # so moving `full_at` back is exact in any state and needs no condition.
        value = _level(ticks)
        return Outcome(
            avail, False, 0, WRITE_ADD, value, _level(v.full_at + ticks), None, None
        )
    if v.debt == 0:
        # Full at now: the refill past the burst is lost, so the new state is absolute. Its
        # condition pins "full at my now"; a writer that finds the bucket refilled past that
        # by its own now is full there too and overwrites nothing it should have kept.
        value = _level(v.now_ticks + ticks)
        return Outcome(avail, False, 0, WRITE_ABSOLUTE, value, value, None, v.now_ticks)
    # Not full at now: consumption moves `full_at` later by its ticks, applied to whatever is
    # stored, as long as the stored bucket is still not full at now (else the refill past the
    # burst would be counted) and, checked, still holds `delta`.
    value = _level(ticks)
    new = _level(v.full_at + ticks)
    lo = _level(v.now_ticks + 1)
    hi = _level(v.now_ticks + (r.burst - delta) * r.step_ms) if check else None
    return Outcome(avail, False, 0, WRITE_RELATIVE, value, new, lo, hi)


# -- reserved blocks (docs/design.md "Reservations"; rust/src/block.rs) -------------------------


def _amounts(value: object) -> list[int]:
    if not isinstance(value, list | tuple):
        raise TypeError("amounts must be a list or a tuple of ints")
    return [_int(v, "amount") for v in value]


class Block:
    """Tokens reserved from one bucket item, per limit: what the shared bucket already granted,
    spent locally with no I/O. Amounts are millitokens, one per limit, never negative."""

    __slots__ = ("_held", "_spent")

    def __init__(self, limits: int) -> None:
        n = _int(limits, "limits")
        if n < 0:
            raise ValueError("limits must not be negative")
        self._held = [0] * n
        self._spent = [0] * n

    @property
    def held(self) -> list[int]:
        return list(self._held)

    @property
    def spent(self) -> list[int]:
        """Spent since creation or the last `take_spent()`."""
        return list(self._spent)

    def _check(self, amounts: object) -> list[int]:
        values = _amounts(amounts)
        if len(values) != len(self._held):
            raise ValueError("amounts must give one value per limit of the block")
        if any(v < 0 for v in values):
            raise ValueError("amounts must not be negative")
        return values

    def _covers(self, values: list[int]) -> bool:
        return all(h >= v for h, v in zip(self._held, values, strict=True))

    def _spend(self, values: list[int]) -> None:
        spent = [_fit(s + v) for s, v in zip(self._spent, values, strict=True)]
        self._held = [_fit(h - v) for h, v in zip(self._held, values, strict=True)]
        self._spent = spent

    def add(self, amounts: Sequence[int]) -> None:
        values = self._check(amounts)
        self._held = [_fit(h + v) for h, v in zip(self._held, values, strict=True)]

    def take(self, amounts: Sequence[int]) -> bool:
        """Take `amounts` if the block covers all of them; otherwise take nothing."""
        values = self._check(amounts)
        if not self._covers(values):
            return False
        self._spend(values)
        return True

    def take_up_to(self, amounts: Sequence[int]) -> list[int]:
        """Take what the block holds of each amount; returns what it could not cover."""
        values = self._check(amounts)
        covered = [min(v, max(h, 0)) for h, v in zip(self._held, values, strict=True)]
        self._spend(covered)
        return [v - c for v, c in zip(values, covered, strict=True)]

    def drain(self) -> list[int]:
        held, self._held = self._held, [0] * len(self._held)
        return held

    def take_spent(self) -> list[int]:
        spent, self._spent = self._spent, [0] * len(self._spent)
        return spent

    def __repr__(self) -> str:
        return f"Block(held={self._held}, spent={self._spent})"


def take_all(blocks: Sequence[Block], amounts: Sequence[Sequence[int]]) -> bool:
    """All or nothing over several distinct blocks (an entity's and its parent's)."""
    if not isinstance(blocks, list | tuple):
        raise TypeError("blocks must be a list or a tuple of Block")
    for block in blocks:
        if not isinstance(block, Block):
            raise TypeError(f"blocks must hold Block, not {type(block).__name__}")
    if not isinstance(amounts, list | tuple):
        raise TypeError("amounts must be a list or a tuple of lists")
    lists = [_amounts(a) for a in amounts]
    if any(a is b for i, a in enumerate(blocks) for b in blocks[i + 1 :]):
        raise ValueError("take_all needs distinct blocks")
    if len(blocks) != len(lists):
        raise ValueError("take_all needs one amounts list per block")
    values = [block._check(a) for block, a in zip(blocks, lists, strict=True)]
    if not all(block._covers(v) for block, v in zip(blocks, values, strict=True)):
        return False
    for block, v in zip(blocks, values, strict=True):
        for s, x in zip(block._spent, v, strict=True):
            _fit(s + x)
    for block, v in zip(blocks, values, strict=True):
        block._spend(v)
    return True
