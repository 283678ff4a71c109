"""When a bucket item may vanish: the expiry (the table's TTL attribute) of every bucket write.

A bucket item that does not exist reads as full buckets (the core's rule), so the item may be
deleted by DynamoDB's TTL once every limit in it would be full again anyway: no decision changes.
Without an expiry, every entity id ever seen (an application keyed on untrusted ids) keeps an
item forever.

The expiry of an item is the latest of

- the moment its slowest limit is full again (`core.time_until_available` of a whole burst; a
  quota at the end of its stored window, `quota.full_ms`).
  Every limit stored in the item counts, also one the writer does not decide with (it is read
  from its stored definition, `lm#<l>`); a limit whose definition cannot be read keeps the item
  forever, as before. Reserved tokens are consumed in the bucket, so they are covered;
- the end of the longest usage window (`schema.USAGE_WINDOWS`) of the item's last write: a bucket
  created again later restarts its counters at 0, and the aggregator would count the overlap of
  the new counters with the old ones in the same window only once (an under-count). Created
  after the window ended, the new item's records fall in other windows;

plus `MARGIN_MS` (limiter clocks and DynamoDB's disagree a little), rounded up to a whole hour
(`GRID_S`: writers whose views differ by a little write the same value, so corrections stay
rare), and at most `LATEST` (DynamoDB's and Python's dates end with the year 9999).

Concurrent writers. Writes are relative (`full_at += value`, applied to the stored value), so a
writer's view, and the expiry it writes (`planned`), may be older than the state its write
produces; forced writes can push a bucket arbitrarily deep below zero. Every write returns the
item as written (atomically), and the engine compares its expiry with what that state requires
(`required`): when it is earlier, one conditional update raises it (`extend_bucket_expiry`:
only ever later, so a repeat or a race changes nothing but to the latest). Sound because an
item changes only through writes, each writer checks the state its own write produced, and a
correction never lowers an expiry: after the last write's check the item lives at least until
its state is full again. What is left: a writer that stops (crash, outage) between its write
and the correction leaves the item's expiry early until the bucket's next write.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Final

from ..core import units
from ..core.windows import WINDOWS, window_end, window_start
from ..models import Limit
from ..storage.protocol import BucketItem, LimitState, LimitWrite
from . import quota, stored

__all__ = ["GRID_S", "LATEST", "MARGIN_MS", "planned", "required"]

MARGIN_MS: Final = 60_000
GRID_S: Final = 3_600
LATEST: Final = 253_402_300_799  # 9999-12-31T23:59:59Z, in epoch seconds

_HOUR_MS: Final = 3_600_000


def required(limits: Sequence[Limit], state: BucketItem, now_ms: int) -> int:
    """The expiry (epoch seconds) the item `state` needs at `now_ms`; `limits` are those the
    caller decides with (a limit of the item not among them is read from its definition)."""
    write_ms = now_ms if state.write_time_ms is None else state.write_time_ms
    return _expiry(limits, state.limits, write_ms, now_ms)


def planned(
    limits: Sequence[Limit], view: BucketItem | None, writes: Sequence[LimitWrite], now_ms: int
) -> int:
    """The expiry a write of `writes` at `now_ms` sets: what the state it leaves on the
    writer's `view` requires."""
    states = dict(view.limits) if view is not None else {}
    for write in writes:
        state = stored.after(states.get(write.limit_name), write)
        if state is None:
            states.pop(write.limit_name, None)
        else:
            states[write.limit_name] = state
    return _expiry(limits, states, now_ms, now_ms)


def _expiry(
    limits: Sequence[Limit], states: Mapping[str, LimitState], write_ms: int, now_ms: int
) -> int:
    known = {limit.name: limit for limit in limits}
    full = now_ms
    try:
        for name, state in states.items():
            limit = known.get(name)
            quotas = quota.stored_quota(limit, state) if state.window is not None else None
            if quotas is not None:
                # A quota is full again when its window ends (at once if nothing is used).
                full = max([full, *(quota.full_ms(q, state, now_ms) for q in quotas)])
                continue
            # The stored definition and the caller's may differ: either may be the one the
            # next decision uses, so the later of the two counts.
            candidates = [stored.full_ms(state, limit, now_ms)]
            if limit is not None and stored.replaces(limit, state):
                level = stored.full_at(limit, state, now_ms)
                candidates.append(stored.full_ms(LimitState(level), limit, now_ms))
            if any(c is None for c in candidates):
                return LATEST  # cannot tell when it is full again: keep it
            full = max([full, *(c for c in candidates if c is not None)])
        usage_end = _usage_end_ms(write_ms // _HOUR_MS)
    except (OverflowError, ValueError, OSError):
        # A debt refilling beyond signed 64-bit ms, a time past the year 9999.
        return LATEST
    until = max(full, usage_end) + MARGIN_MS
    grid_ms = GRID_S * units.MS_PER_SECOND
    return min(-(-until // grid_ms) * GRID_S, LATEST)


@functools.lru_cache(maxsize=64)
def _usage_end_ms(hour: int) -> int:
    """End (ms) of the longest usage window containing the hour `hour` (hours since the
    epoch): every window is whole UTC hours, so the hour decides it (and is cached)."""
    ts_ms = hour * _HOUR_MS
    ends = [window_end(w, window_start(w, ts_ms)) for w in WINDOWS]
    return int(max(ends).timestamp()) * units.MS_PER_SECOND
