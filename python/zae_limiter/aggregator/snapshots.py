"""Pure snapshot math: stream record -> per-window, per-limit counter growth.

No I/O here, so the idempotency argument can be tested exhaustively (tests/test_aggregator_unit.py).

How consumption is derived exactly and idempotently
---------------------------------------------------
A bucket item carries, per limit, two counters that only grow: ``cn#<l>`` (millitokens ever
consumed) and ``rl#<l>`` (ever released). A stream record with images (old, new) says the counter
moved through the half-open interval ``[old, new)`` (a missing old image or attribute is 0). The
records of one bucket item form a chain ``[c0, c1), [c1, c2), ...`` of disjoint, adjacent intervals,
so the growth inside a window is the total length of the *union* of the intervals of the records
assigned to that window. A union of intervals is idempotent (adding an interval twice changes
nothing) and commutative (any order gives the same union), which is exactly what at-least-once,
out-of-order stream delivery needs.

Storing the union as a sorted list of disjoint spans (adjacent spans coalesce) is a strict
generalisation of the simpler "min old / max new" rule: when a window's records are contiguous in
the chain the list has one span ``[min_old, max_new)``. It stays exact when they are not, which
happens when writers' clocks disagree around a window boundary (the window is chosen by the
writer's ``ts``, so a record stamped 11:59:59.9 can sit between two stamped 12:00:00.1); min/max
would count the foreign record's growth in both windows.

Resets: a deleted bucket (REMOVE) contributes nothing; a counter that went *down* in a record
(item overwritten) contributes nothing for that counter; a re-created bucket starts again at 0, so
its spans overlap the previous incarnation's spans of the same window and the union under-counts
that window (never negative, never more than was consumed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from .. import schema
from ..core import units
from ..core.windows import (
    window_start,
)

COUNTER_FIELDS: Final = (schema.CONSUMED, schema.RELEASED)

# Beyond this many disjoint spans per counter the two closest are merged (over-counting by the
# gap). Only pathological clock skew can get there; it bounds the snapshot item's size.
MAX_SPANS: Final = 16

Span = tuple[int, int]
"""Half-open millitoken interval ``[lo, hi)`` with ``lo < hi``."""

Growth = dict[str, dict[str, list[Span]]]
"""limit name -> counter field (``cn`` / ``rl``) -> sorted disjoint spans."""


class PoisonRecordError(ValueError):
    """A record that can never be processed (malformed image): retrying will not help."""


# ---------------------------------------------------------------------------
# Spans
# ---------------------------------------------------------------------------


def merge_spans(*groups: Iterable[Span]) -> list[Span]:
    """Union of spans, sorted, with overlapping and adjacent spans coalesced."""
    ordered = sorted(s for group in groups for s in group if s[0] < s[1])
    merged: list[Span] = []
    for lo, hi in ordered:
        if merged and lo <= merged[-1][1]:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    while len(merged) > MAX_SPANS:
        i = min(range(len(merged) - 1), key=lambda k: merged[k + 1][0] - merged[k][1])
        merged[i : i + 2] = [(merged[i][0], merged[i + 1][1])]
    return merged


def merge_growth(*growths: Mapping[str, Mapping[str, Iterable[Span]]]) -> Growth:
    out: Growth = {}
    for growth in growths:
        for limit, fields in growth.items():
            for fld, spans in fields.items():
                current = out.setdefault(limit, {}).get(fld, [])
                out[limit][fld] = merge_spans(current, spans)
    return {
        limit: {fld: spans for fld, spans in sorted(fields.items()) if spans}
        for limit, fields in sorted(out.items())
        if any(fields.values())
    }


def span_total(spans: Iterable[Span]) -> int:
    return sum(hi - lo for lo, hi in spans)


@dataclass(frozen=True, slots=True)
class LimitTotals:
    consumed_milli: int
    released_milli: int

    @property
    def net_milli(self) -> int:
        return self.consumed_milli - self.released_milli


def totals(growth: Growth) -> dict[str, LimitTotals]:
    return {
        limit: LimitTotals(
            span_total(fields.get(schema.CONSUMED, ())),
            span_total(fields.get(schema.RELEASED, ())),
        )
        for limit, fields in growth.items()
    }


def milli_to_tokens(milli: int) -> Decimal:
    """Exact token amount (``1500`` -> ``Decimal("1.5")``), normalised without an exponent."""
    return Decimal(milli).scaleb(-3).normalize() + Decimal(0)


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotKey:
    entity_id: str
    resource: str
    window: str
    window_start: str


@dataclass(frozen=True, slots=True)
class BucketChange:
    """What one stream record says about one bucket item."""

    entity_id: str
    resource: str
    ts_ms: int
    growth: Growth = field(default_factory=dict)

    def snapshot_keys(self, windows: Iterable[str]) -> list[SnapshotKey]:
        return [
            SnapshotKey(self.entity_id, self.resource, w, window_start(w, self.ts_ms))
            for w in windows
        ]


def _number(value: object, name: str) -> int:
    if not isinstance(value, Mapping) or "N" not in value:
        raise PoisonRecordError(f"attribute {name!r} is not a number: {value!r}")
    try:
        number = Decimal(str(value["N"]))
    except ArithmeticError as exc:
        raise PoisonRecordError(f"attribute {name!r} is not a number: {value!r}") from exc
    if not number.is_finite() or number != number.to_integral_value():
        raise PoisonRecordError(f"attribute {name!r} is not an integer: {value!r}")
    return int(number)


def _string(value: object, name: str) -> str:
    if not isinstance(value, Mapping) or not isinstance(value.get("S"), str):
        raise PoisonRecordError(f"attribute {name!r} is not a string: {value!r}")
    return str(value["S"])


def _creation_ms(dynamodb: Mapping[str, Any]) -> int | None:
    value = dynamodb.get("ApproximateCreationDateTime")
    if isinstance(value, datetime):
        return units.ms_of_seconds(value.timestamp())
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return int(Decimal(value) * units.MILLI)
    return None


def parse_record(record: Mapping[str, Any], now_ms: int) -> BucketChange | str:
    """The change a Lambda-shaped stream record describes, or the reason it is skipped.

    Raises :class:`PoisonRecordError` when the record is malformed.
    """
    if not isinstance(record, Mapping):
        raise PoisonRecordError(f"record is not an object: {type(record).__name__}")
    if record.get("eventName") == "REMOVE":
        return "bucket deleted"
    dynamodb = record.get("dynamodb")
    if not isinstance(dynamodb, Mapping):
        raise PoisonRecordError("record has no 'dynamodb' section")
    keys = dynamodb.get("Keys")
    if not isinstance(keys, Mapping):
        raise PoisonRecordError("record has no keys")
    pk = _string(keys.get(schema.PK), schema.PK)
    sk = _string(keys.get(schema.SK), schema.SK)
    if schema.is_audit_key(pk, sk):
        return "audit event"  # written (and expired by TTL) without any consumption
    if not schema.is_bucket_key(pk, sk):
        return "not a bucket item"
    new = dynamodb.get("NewImage")
    if not isinstance(new, Mapping):
        return "no new image"
    old = dynamodb.get("OldImage")
    if not isinstance(old, Mapping):
        old = {}

    growth: Growth = {}
    has_counters = False
    for attr, value in new.items():
        parsed = schema.parse_limit_attr(str(attr))
        if parsed is None or parsed[0] not in COUNTER_FIELDS:
            continue
        has_counters = True
        fld, limit = parsed
        hi = _number(value, attr)
        lo = _number(old[attr], attr) if attr in old else 0
        # A counter that went down means the item was overwritten (reset): nothing was consumed.
        if hi > lo:
            growth.setdefault(limit, {})[fld] = [(lo, hi)]
    if not has_counters:
        return "no counters"
    if not growth:
        return "no counter growth"

    if schema.WRITE_TIME in new:
        ts_ms = _number(new[schema.WRITE_TIME], schema.WRITE_TIME)
    else:
        ts_ms = _creation_ms(dynamodb) or now_ms
    if not 0 <= ts_ms < 253402300800000:  # year 10000: datetime cannot represent it
        raise PoisonRecordError(f"write time {ts_ms} is out of range")
    return BucketChange(
        entity_id=schema.entity_id_from_pk(pk),
        resource=schema.resource_from_bucket_sk(sk),
        ts_ms=ts_ms,
        growth=growth,
    )
