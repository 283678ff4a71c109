"""Pure-Python reference of the token-bucket core (docs/design.md section 1).

This module and the Rust extension ``zae_limiter._native`` implement one contract; property
tests prove they return identical outputs and raise the same exception types. Use
``zae_limiter.core``, which picks the native backend when it is available.

All amounts are integer millitokens, all times integer milliseconds since the Unix epoch. A
limit is ``(burst_milli, refill_amount_milli, refill_period_ms)``, all > 0. Refill is added in
whole quanta of ``step_milli`` every ``step_ms`` (the limit's rate divided by the gcd of amount
and period), so any sequence of refills adds exactly what one refill over the span would.

Arguments are checked in signature order (for ``buckets``: bucket by bucket, field by field):

- ``TypeError``: not an int (``bool`` is not accepted as an int; objects with ``__index__``
  are), ``check`` not a ``bool``, ``buckets`` not a list or tuple, a bucket not a 6-tuple;
- ``OverflowError``: an int outside signed 64-bit.

Then the values are validated (``ValueError``: non-positive burst/amount/period, only one of
tokens/last_refill given, negative ``now_ms`` or ``reanchor_ms``), and finally computed: every
result must fit signed 64-bit, else ``OverflowError``. A denial is a returned value.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from math import gcd
from typing import Final, NamedTuple, SupportsIndex, TypeAlias

__all__ = [
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
    "refill",
    "take_all",
    "time_until_available",
]

I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1

WRITE_NONE: Final = 0
"""No write (denied, or delta 0)."""
WRITE_RELATIVE: Final = 1
"""``tokens += write_value``, anchor set to ``new_last_refill_ms``."""
WRITE_ABSOLUTE: Final = 2
"""``tokens = write_value``, anchor set to ``new_last_refill_ms``."""
WRITE_ADD: Final = 3
"""``tokens += write_value`` with no condition and the anchor untouched (a give-back)."""

# The refill a full bucket may forfeit when a write re-anchors it: one token or 1% of the burst.
_FORFEIT_DIVISOR: Final = 100
_ONE_TOKEN_MILLI: Final = 1000

BucketInput: TypeAlias = tuple[int, int, int, int | None, int | None, int]
"""``(burst_milli, refill_amount_milli, refill_period_ms, tokens_milli | None,
last_refill_ms | None, delta_milli)``."""


class Outcome(NamedTuple):
    """One bucket's outcome of a decision (docs/design.md section 1); the native extension's
    ``Outcome`` has the same attributes."""

    available_milli: int
    exceeded: bool
    retry_after_ms: int | None
    write_mode: int
    write_value: int
    new_tokens_milli: int
    new_last_refill_ms: int
    cond_lo: int | None
    cond_hi: int | None


# --- argument conversion ------------------------------------------------------------------------


def _int(value: object, name: str) -> int:
    """An int fitting signed 64-bit (``TypeError`` / ``OverflowError`` otherwise)."""
    if type(value) is int:
        v = value
    elif isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    elif isinstance(value, SupportsIndex):
        v = operator.index(value)
    else:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not I64_MIN <= v <= I64_MAX:
        raise OverflowError(f"{name} does not fit signed 64-bit: {v}")
    return v


def _opt_int(value: object, name: str) -> int | None:
    return None if value is None else _int(value, name)


def _bucket(value: object) -> BucketInput:
    if not isinstance(value, tuple) or len(value) != 6:
        raise TypeError("a bucket must be a tuple of 6 items")
    burst, amount, period, tokens, last_refill, delta = value
    return (
        _int(burst, "burst_milli"),
        _int(amount, "refill_amount_milli"),
        _int(period, "refill_period_ms"),
        _opt_int(tokens, "tokens_milli"),
        _opt_int(last_refill, "last_refill_ms"),
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


def _check_state(tokens: int | None, last_refill: int | None) -> None:
    if (tokens is None) != (last_refill is None):
        raise ValueError("tokens_milli and last_refill_ms must both be given or both be None")


def _check_bucket(b: BucketInput) -> None:
    _check_limit(b[0], b[1], b[2])
    _check_state(b[3], b[4])


def _fit(v: int) -> int:
    if not I64_MIN <= v <= I64_MAX:
        raise OverflowError("integer overflow in token-bucket arithmetic")
    return v


def _lower_bound(v: int) -> int | None:
    """A bound ``tokens >= v`` below the i64 range holds for every stored value: no bound."""
    return None if v < I64_MIN else _fit(v)


# --- the math -----------------------------------------------------------------------------------


def _steps(amount: int, period: int) -> tuple[int, int]:
    """``(step_ms, step_milli)``: the limit in whole refill quanta."""
    g = gcd(amount, period)
    return period // g, amount // g


def _epoch_ms(burst: int, step_ms: int, step_milli: int, reanchor: int) -> int:
    """The longest whole number of quanta whose refill is at most ``max(1 token, burst / 100)``,
    at least one quantum, at most ``max(reanchor, one quantum)``."""
    budget = max(burst // _FORFEIT_DIVISOR, _ONE_TOKEN_MILLI)
    quanta = max(budget // step_milli, 1)
    return min(quanta * step_ms, max(reanchor, step_ms))


def _epoch_start(now: int, epoch: int) -> int:
    """The first epoch boundary at or after ``now``."""
    return -(-now // epoch) * epoch


def _view(
    burst: int, step_ms: int, step_milli: int, tokens: int | None, last: int | None, now: int
) -> tuple[int, int, int, int, int]:
    """The bucket at ``now``: ``(tokens, last_refill, q, added, available)``.

    A bucket that does not exist yet is full, anchored at ``now``. ``q`` is the number of whole
    quanta since the anchor (0 for an anchor in the future), ``added = q * step_milli``.
    """
    if tokens is None or last is None:
        return burst, now, 0, 0, burst
    q = (now - last) // step_ms if now > last else 0
    added = q * step_milli
    return tokens, last, q, added, min(burst, tokens + added)


def _wait(
    burst: int,
    step_ms: int,
    step_milli: int,
    last: int,
    q: int,
    avail: int,
    delta: int,
    now: int,
) -> int | None:
    """Ms until ``available >= delta``: 0 if already or ``delta <= 0``; ``None`` if never."""
    if delta > burst:
        return None
    if delta <= 0 or avail >= delta:
        return 0
    # available < delta <= burst: the refill is not capped. The first quantum covering the
    # shortfall is the k-th after the current one.
    k = -(-(delta - avail) // step_milli)
    return _fit(last + (q + k) * step_ms - now)


def available(
    burst_milli: int,
    refill_amount_milli: int,
    refill_period_ms: int,
    tokens_milli: int | None,
    last_refill_ms: int | None,
    now_ms: int,
) -> int:
    """Tokens (milli) available at ``now_ms``; ``burst`` for a bucket that does not exist yet.

    May be negative after forced consumption.
    """
    burst = _int(burst_milli, "burst_milli")
    amount = _int(refill_amount_milli, "refill_amount_milli")
    period = _int(refill_period_ms, "refill_period_ms")
    tokens = _opt_int(tokens_milli, "tokens_milli")
    last = _opt_int(last_refill_ms, "last_refill_ms")
    now = _int(now_ms, "now_ms")
    _check_limit(burst, amount, period)
    _check_state(tokens, last)
    _check_now(now)
    step_ms, step_milli = _steps(amount, period)
    return _view(burst, step_ms, step_milli, tokens, last, now)[4]


def refill(
    burst_milli: int,
    refill_amount_milli: int,
    refill_period_ms: int,
    tokens_milli: int,
    last_refill_ms: int,
    now_ms: int,
) -> tuple[int, int]:
    """Eager refill to ``now_ms``: ``(tokens_milli, last_refill_ms)``.

    The anchor moves by whole quanta only; a bucket that reaches burst is capped at burst and
    re-anchored at ``now_ms``. An anchor in the future refills nothing.
    """
    burst = _int(burst_milli, "burst_milli")
    amount = _int(refill_amount_milli, "refill_amount_milli")
    period = _int(refill_period_ms, "refill_period_ms")
    tokens = _int(tokens_milli, "tokens_milli")
    last = _int(last_refill_ms, "last_refill_ms")
    now = _int(now_ms, "now_ms")
    _check_limit(burst, amount, period)
    _check_now(now)
    step_ms, step_milli = _steps(amount, period)
    _, _, q, added, _ = _view(burst, step_ms, step_milli, tokens, last, now)
    if tokens + added >= burst:
        return burst, now
    return tokens + added, last + q * step_ms


def time_until_available(buckets: Sequence[BucketInput], now_ms: int) -> int | None:
    """Ms until every bucket with ``delta > 0`` has ``available >= delta`` (0 if already).

    ``None`` if some delta exceeds its burst (it never will).
    """
    parsed = _buckets(buckets)
    now = _int(now_ms, "now_ms")
    _check_now(now)
    for b in parsed:
        _check_bucket(b)
    if any(delta > burst for burst, _, _, _, _, delta in parsed):
        return None
    longest = 0
    for burst, amount, period, tokens, last, delta in parsed:
        step_ms, step_milli = _steps(amount, period)
        _, anchor, q, _, avail = _view(burst, step_ms, step_milli, tokens, last, now)
        wait = _wait(burst, step_ms, step_milli, anchor, q, avail, delta, now)
        if wait is not None:
            longest = max(longest, wait)
    return longest


def decide(
    buckets: Sequence[BucketInput], now_ms: int, check: bool, reanchor_ms: int
) -> tuple[bool, list[Outcome]]:
    """One acquire decision over a flat list of buckets: ``(admitted, outcomes)``.

    With ``check`` it is all-or-nothing: a bucket with ``delta > 0`` and ``available < delta`` is
    exceeded, and if any is, nothing is written. Without ``check`` every delta is applied (forced:
    may go negative) and nothing is ever exceeded. See design.md for the write rules.
    """
    parsed = _buckets(buckets)
    now = _int(now_ms, "now_ms")
    check = _bool(check, "check")
    reanchor = _int(reanchor_ms, "reanchor_ms")
    _check_now(now)
    if reanchor < 0:
        raise ValueError(f"reanchor_ms must be >= 0, got {reanchor}")
    for b in parsed:
        _check_bucket(b)

    # Pass 1: availability, exceeded, retry_after; nothing written yet.
    outcomes: list[Outcome] = []
    admitted = True
    for burst, amount, period, tokens, last, delta in parsed:
        step_ms, step_milli = _steps(amount, period)
        t, anchor, q, _, avail = _view(burst, step_ms, step_milli, tokens, last, now)
        exceeded = check and delta > 0 and avail < delta
        retry = _wait(burst, step_ms, step_milli, anchor, q, avail, delta, now) if exceeded else 0
        admitted = admitted and not exceeded
        outcomes.append(Outcome(avail, exceeded, retry, WRITE_NONE, 0, t, anchor, None, None))
    if not admitted:
        return False, outcomes

    # Pass 2: the writes.
    for i, (burst, amount, period, tokens, last, delta) in enumerate(parsed):
        if delta != 0:
            step_ms, step_milli = _steps(amount, period)
            outcomes[i] = _write(
                outcomes[i], burst, step_ms, step_milli, tokens, last, delta, now, check, reanchor
            )
    return True, outcomes


def _write(
    status: Outcome,
    burst: int,
    step_ms: int,
    step_milli: int,
    tokens: int | None,
    last: int | None,
    delta: int,
    now: int,
    check: bool,
    reanchor: int,
) -> Outcome:
    """The write of one admitted bucket with a non-zero delta."""
    avail = status.available_milli
    absolute_value = burst - max(delta, 0)
    if tokens is None or last is None:
        # Created full: anchored like a write to a full bucket (below), so that the writers
        # racing to create it find it relative-writable once it exists. The condition is
        # "attribute does not exist".
        anchor = _fit(_epoch_start(now, _epoch_ms(burst, step_ms, step_milli, reanchor)))
        return Outcome(
            avail, False, 0, WRITE_ABSOLUTE, absolute_value, absolute_value, anchor, None, None
        )

    if delta < 0:
        # A give-back commutes with every other write: adding tokens is exact in any state,
        # since reading caps at burst. No condition, so concurrent writers never conflict.
        return Outcome(
            avail, False, 0, WRITE_ADD, _fit(-delta), _fit(tokens - delta), last, None, None
        )

    _, _, q, added, _ = _view(burst, step_ms, step_milli, tokens, last, now)
    cap_point = burst - added + min(delta, 0)
    if tokens >= cap_point:
        # Full now: the refill past the burst is lost, so the write must be absolute. It
        # re-anchors the bucket at the next epoch boundary, deferring its refill until then: the
        # writes that follow within the epoch see a bucket that cannot fill up again, so they
        # are relative and concurrent writers all apply without invalidating each other.
        anchor = _fit(_epoch_start(now, _epoch_ms(burst, step_ms, step_milli, reanchor)))
        return Outcome(
            avail,
            False,
            0,
            WRITE_ABSOLUTE,
            absolute_value,
            absolute_value,
            anchor,
            _lower_bound(cap_point),
            None,
        )

    # Not capped: tokens + added - min(delta, 0) < burst, so available = tokens + added.
    cond_hi = _fit(cap_point - 1)
    cond_lo = _lower_bound(delta - added) if check and delta > 0 else None
    if q > 0 and now - last >= reanchor:
        value, anchor = added - delta, last + q * step_ms
    else:
        value, anchor = -delta, last
    return Outcome(
        avail,
        False,
        0,
        WRITE_RELATIVE,
        _fit(value),
        _fit(tokens + value),
        _fit(anchor),
        cond_lo,
        cond_hi,
    )


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
