"""Quotas: a balance restored in one lump when a window opens (docs/design.md "Quotas").

A quota's state in the bucket item is two numbers: `qw#<l>`, the epoch ms its window opened, and
`fa#<l>`, the millitokens used in that window. A window is a cron's (`core.calendar.window_at`
in the quota's zone) or a session's (opened by the first admitted use after the last one ended,
lasting `reset_after_seconds`).

The decision reuses the core: the quota is shown to it as a bucket of `burst` millitokens that
refills one millitoken per ms, whose `full_at` is `now + used` (`used` millitokens short of full
at `now`). At one instant that is exactly "`used` of `burst` taken", so `core.decide` answers
the quota's admission, all or nothing with the token buckets of the same call, and its write
rules hold unchanged once shifted back by `now`: the refill the core imagines never reaches
storage, because the stored number is `used`, not an instant. Every write of a quota is also
conditioned on its window (`LimitWrite.window`), so a writer whose view belongs to another
window is refused and decides again:

- within the stored window: the core's write on `fa#` under `qw# = window`;
- the stored window is over (or there is none): `fa# = delta`, `qw# = the new window`, under
  "`qw#` absent or before the new window" (a session: "ended by now"), so of two writers opening
  one window only the first does, and the other counts its consumption in it;
- a give-back only in the window its consumption was made in (`Target.quota_spent`) and at most
  what was taken there: once the window moved on it is forgiven by the reset, never minted.

The core's retry-after for such a bucket is meaningless; a quota's is the time until its next
window opens (`View.end`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import core
from ..core import calendar
from ..exceptions import ValidationError
from ..models import Limit
from ..storage.protocol import LimitState, LimitWrite
from . import stored

__all__ = ["View", "available", "bucket_input", "full_ms", "view", "wait_ms", "write"]


@dataclass(frozen=True, slots=True)
class View:
    """A quota at `now`: `used` millitokens in the stored window, None when no stored window
    holds `now` (the next use opens `start`); `end` when the next window opens; `bound`, for an
    opening write, the stored window must be absent or earlier than it."""

    used: int | None
    start: int
    end: int
    bound: int | None


@functools.lru_cache(maxsize=4096)
def _quota_definition(definition: str) -> bool:
    try:
        return Limit.decode(definition, "quota").is_quota
    except ValidationError:
        return False


def _stored(state: LimitState | None) -> tuple[int, int] | None:
    """(used, window start) of a quota's stored state; None when there is none or the stored
    `fa#` belongs to another kind of limit (the limit was a token bucket since)."""
    if state is None or state.window is None or state.full_at is None:
        return None
    if state.definition is not None and not _quota_definition(state.definition):
        return None
    return state.full_at, state.window


def view(limit: Limit, state: LimitState | None, now_ms: int) -> View:
    """`limit` (a quota) over its stored `state` at `now_ms`."""
    known = _stored(state)
    # A window left behind by a token bucket that replaced the quota: the opening write must
    # overwrite it, so its bound lies past it.
    leftover = 0 if state is None or state.window is None or known else state.window + 1
    if limit.reset_after_seconds is not None:
        length = limit.reset_after_seconds * 1000
        if known is not None and now_ms < known[1] + length:
            return View(known[0], known[1], known[1] + length, None)
        # A session window ended by now (`window + length <= now`) may be replaced.
        return View(None, now_ms, now_ms + length, max(now_ms - length + 1, leftover))
    assert limit.cron is not None
    start, end = calendar.window_at(limit.cron, limit.tz, now_ms)
    if known is not None and known[1] >= start:
        # The stored window is this one (or one a writer with a clock ahead opened): its
        # consumption counts until this view's window ends.
        return View(known[0], known[1], end, None)
    return View(None, start, end, max(start, leftover))


def bucket_input(
    limit: Limit, state: LimitState | None, delta: int, now_ms: int
) -> core.BucketInput:
    """The core's view of the quota (module doc): `burst` refilling 1 milli per ms, `used`
    short of full at `now_ms`."""
    v = view(limit, state, now_ms)
    return limit.burst_milli, 1, 1, None if v.used is None else now_ms + v.used, delta


def available(limit: Limit, state: LimitState | None, now_ms: int) -> int:
    used = view(limit, state, now_ms).used
    return limit.burst_milli - (used if used is not None and used > 0 else 0)


def retry_ms(limit: Limit, state: LimitState | None, delta: int, now_ms: int) -> int | None:
    """How long a denied `delta` waits: until the next window opens (None: more than the quota,
    never)."""
    if delta > limit.burst_milli:
        return None
    return max(view(limit, state, now_ms).end - now_ms, 0)


def reset_ms(limit: Limit, state: LimitState | None, now_ms: int) -> int:
    """Ms until the balance is restored (the RateLimit field's `t`)."""
    return max(view(limit, state, now_ms).end - now_ms, 0)


def wait_ms(limit: Limit, state: LimitState | None, delta: int, now_ms: int) -> int | None:
    """Ms until `delta` is available: 0 if it is now, else the next window (None: never)."""
    if delta > limit.burst_milli:
        return None
    if delta <= 0 or delta <= available(limit, state, now_ms):
        return 0
    return retry_ms(limit, state, delta, now_ms)


def write(
    limit: Limit,
    prior: LimitState | None,
    outcome: core.Outcome,
    delta: int,
    now_ms: int,
    spent: tuple[int, int] | None,
) -> LimitWrite | None:
    """The quota's part of a bucket write from the core's `outcome` (module doc); None when
    nothing is written. `spent`: (window, millitokens) this target took in its last window."""
    if outcome.write_mode == core.WRITE_NONE:
        return None
    v = view(limit, prior, now_ms)
    encoded = limit.encode()
    definition = None if prior is not None and prior.definition == encoded else encoded
    if v.used is None:
        if delta < 0:
            return None  # taken in a window that is over: forgiven by the reset
        legacy = None if prior is None else prior.legacy
        return LimitWrite(
            limit_name=limit.name,
            mode=core.WRITE_ABSOLUTE,
            value=delta,
            cond_lo=None,
            cond_hi=None,
            delta_milli=delta,
            definition=definition,
            create=prior is None,
            legacy=legacy,
            fence=None if legacy is None else stored.fence(limit, now_ms),
            window=v.start,
            window_bound=v.bound,
        )
    mode, value = outcome.write_mode, outcome.write_value
    lo, hi = outcome.cond_lo, outcome.cond_hi
    if delta < 0:
        if spent is None or spent[0] != v.start:
            return None  # taken in another window: forgiven by the reset
        delta = max(delta, -spent[1])  # never more than was taken in this window
        if delta == 0:
            return None
        mode, value, lo, hi = core.WRITE_ADD, delta, None, None
    elif mode == core.WRITE_ABSOLUTE:
        # The core's instants are `now + used`: shifted back to `used`.
        value -= now_ms
    return LimitWrite(
        limit_name=limit.name,
        mode=mode,
        value=value,
        cond_lo=None if lo is None else lo - now_ms,
        cond_hi=None if hi is None else hi - now_ms,
        delta_milli=delta,
        definition=definition,
        window=v.start,
    )


def full_ms(limit: Limit, state: LimitState, now_ms: int) -> int:
    """When the stored quota state is full again (epoch ms): at once when nothing is used,
    else when its window ends."""
    if state.window is None or state.full_at is None or state.full_at <= 0:
        return now_ms
    if limit.reset_after_seconds is not None:
        return max(now_ms, state.window + limit.reset_after_seconds * 1000)
    assert limit.cron is not None
    return max(now_ms, calendar.window_at(limit.cron, limit.tz, state.window)[1])


def stored_quota(limit: Limit | None, state: LimitState) -> list[Limit] | None:
    """The quotas a stored quota state may be read with (the caller's, its stored definition);
    None when it is not a quota's state."""
    if state.window is None:
        return None
    found = [] if limit is None or not limit.is_quota else [limit]
    if state.definition is not None and _quota_definition(state.definition):
        decoded = Limit.decode(state.definition, "quota")
        if decoded not in found:
            found.append(decoded)
    return found or None
