"""What a stored limit holds, read with the limit a caller decides with now.

A bucket's state is `full_at` in the ticks of the definition it was last written with (`lm#<l>`,
docs/design.md section 1). A caller whose limit has another rate or burst (the limit was
edited), or who finds the 1.x layout (`tk#<l>`/`lr#<l>`: tokens at an anchor, schema < 1.2.0),
converts the balance the stored state holds at its now into its own ticks. The write that
follows *replaces* the stored state under a condition on its exact old value (the engine's
`_writes`), so a state is converted once, by one writer, and never merged with a stale copy.

A 1.x state is replaced by `full_at` plus a *fence* left in `tk#`/`lr#`: a balance so deep that
a 1.x client still running reads the limit as exhausted for a century and denies, instead of
reading a missing state as a full bucket and admitting what this layout already counts.
"""

from __future__ import annotations

import functools
from math import gcd
from typing import Final

from .. import core
from ..exceptions import ValidationError
from ..models import Limit
from ..storage.protocol import LimitState, LimitWrite

__all__ = [
    "FENCE_MS",
    "Rate",
    "after",
    "available",
    "fence",
    "full_at",
    "full_ms",
    "rate",
    "replaces",
    "stored_rate",
]

# How long a fenced 1.x state stays exhausted to a 1.x client: a century of refill.
FENCE_MS: Final = 100 * 365 * 86_400_000
# The deepest fence: 1.x clients compute in signed 64-bit and must not overflow on it.
_FENCE_FLOOR: Final = -(2**62)

# A limit's rate as the core takes it: (burst_milli, refill_amount_milli, refill_period_ms).
Rate = tuple[int, int, int]


def rate(limit: Limit) -> Rate:
    return limit.burst_milli, limit.refill_amount_milli, limit.refill_period_ms


@functools.lru_cache(maxsize=4096)
def stored_rate(definition: str | None) -> Rate | None:
    """The rate of a stored definition (`lm#<l>`), None if there is none or it is unreadable.
    The name plays no part in the rate, so any valid one serves to decode."""
    if definition is None:
        return None
    try:
        return rate(Limit.decode(definition, "limit"))
    except ValidationError:
        return None


def replaces(limit: Limit, state: LimitState) -> bool:
    """Whether a write of `limit` must replace `state` rather than update it: the state is in
    the 1.x layout, or in the ticks of another rate."""
    if state.legacy is not None:
        return True
    if state.definition is None or state.definition == limit.encode():
        return False
    stored = stored_rate(state.definition)
    return stored is not None and stored != rate(limit)


def full_at(limit: Limit, state: LimitState | None, now_ms: int) -> int | None:
    """`state` as a `full_at` in `limit`'s ticks at `now_ms` (None: no state, a full bucket)."""
    if state is None:
        return None
    if state.legacy is not None:
        tokens, anchor = state.legacy
        held = _legacy_available(rate(limit), tokens, anchor, now_ms)
        return core.full_at_of(*rate(limit), held, now_ms)
    assert state.full_at is not None
    if not replaces(limit, state):
        return state.full_at
    stored = stored_rate(state.definition)
    assert stored is not None
    held = core.available(*stored, state.full_at, now_ms)
    return core.full_at_of(*rate(limit), held, now_ms)


def available(limit: Limit, state: LimitState | None, now_ms: int) -> int:
    """Millitokens the bucket holds at `now_ms`, read with `limit` (negative: in debt)."""
    return core.available(*rate(limit), full_at(limit, state, now_ms), now_ms)


def full_ms(state: LimitState, fallback: Limit | None, now_ms: int) -> int | None:
    """When the stored state is full again (epoch ms), read with its stored definition, else
    with `fallback`; None when neither is known."""
    known = stored_rate(state.definition) or (None if fallback is None else rate(fallback))
    if known is None:
        return None
    if state.legacy is not None:
        level = core.full_at_of(*known, _legacy_available(known, *state.legacy, now_ms), now_ms)
    else:
        assert state.full_at is not None
        level = state.full_at
    burst, amount, period = known
    wait = core.time_until_available([(burst, amount, period, level, burst)], now_ms)
    return None if wait is None else now_ms + wait


def after(prior: LimitState | None, write: LimitWrite) -> LimitState | None:
    """The limit's state once `write` applied to `prior` (storage's `LimitWrite` rules; the
    counters as they were); None: no state, a full bucket."""
    definition = write.definition
    if definition is None and prior is not None:
        definition = prior.definition
    # A quota's write keeps (or opens) its window; a token bucket's has none.
    window = write.window
    if write.mode == core.WRITE_ABSOLUTE:
        return LimitState(write.value, definition=definition, window=window)
    if prior is None or prior.full_at is None:
        return None  # an add to no state (a reset limit): a full bucket
    return LimitState(
        prior.full_at + write.value,
        prior.consumed_milli,
        prior.released_milli,
        definition,
        window=window,
    )


def fence(limit: Limit, now_ms: int) -> tuple[int, int]:
    """The 1.x state (tokens, anchor) a converted limit leaves behind: a century short."""
    burst, amount, period = rate(limit)
    return max(_FENCE_FLOOR, -burst - FENCE_MS * amount // period), now_ms


def _legacy_available(limit: Rate, tokens: int, anchor: int, now_ms: int) -> int:
    """Millitokens a 1.x state held at `now_ms`: whole refill quanta since the anchor (none
    before it), capped at burst. The 1.x core's rule, kept only to read such states."""
    burst, amount, period = limit
    g = gcd(amount, period)
    step_ms, step_milli = period // g, amount // g
    quanta = (now_ms - anchor) // step_ms if now_ms > anchor else 0
    return min(burst, tokens + quanta * step_milli)

