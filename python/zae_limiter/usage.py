"""Reading usage snapshots (written by the aggregator) for the library and the CLI.

Items are taken in the low-level AttributeValue form (``{"S": "..."}``, ``{"N": "..."}``,
``{"M": {...}}``): that is what aiobotocore's and boto3's *clients* return, and the library talks
to DynamoDB through clients only. Query arguments are produced in the same form.

Snapshot item attributes (see ``zae_limiter.aggregator.handler.build_item``): ``counters`` maps
each limit to its net tokens (consumed - released) in the window, exact decimals; ``consumed``
and ``released`` the two parts; ``spans`` the counter intervals the aggregator folds (its
idempotency state, not meant for readers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from . import schema
from .aggregator.snapshots import WINDOWS, check_window, format_window_start, parse_window_start
from .models import UsageSnapshot, UsageSummary

__all__ = [
    "parse_time",
    "parse_window_start_iso",
    "query_args",
    "snapshot_from_item",
    "summarize",
]

Moment = datetime | str


def parse_time(value: Moment) -> datetime:
    """A datetime from a datetime or an ISO-8601 string (``Z`` allowed); naive means UTC."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"not an ISO-8601 time: {value!r}") from None
    else:
        moment = value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _tokens(value: Mapping[str, Any]) -> int:
    # Counters are exact decimals (millitoken precision); the model holds whole tokens.
    return int(Decimal(str(value["N"])).to_integral_value(rounding=ROUND_HALF_EVEN))


def snapshot_from_item(item: Mapping[str, Any]) -> UsageSnapshot:
    """A :class:`UsageSnapshot` from a snapshot item in low-level AttributeValue form."""
    try:
        resource, window, window_start = schema.parse_usage_sk(item[schema.SK]["S"])
        entity_id = schema.entity_id_from_pk(item[schema.PK]["S"])
        counters = {
            str(limit): _tokens(value)
            for limit, value in item.get("counters", {}).get("M", {}).items()
        }
        updated = item.get("updated_at", {}).get("S")
    except (KeyError, TypeError, AttributeError, ArithmeticError) as exc:
        raise ValueError(f"not a usage snapshot item: {exc!r}") from None
    return UsageSnapshot(
        entity_id=entity_id,
        resource=resource,
        window=window,
        window_start=window_start,
        counters=dict(sorted(counters.items())),
        updated_at=updated,
    )


def query_args(table: str, entity_id: str, resource: str | None = None,
               window: str | None = None, start: Moment | None = None,
               end: Moment | None = None) -> dict[str, Any]:
    """Keyword arguments of DynamoDB ``Query`` for an entity's snapshots.

    ``resource=None``: every resource; ``window=None``: every window. ``start``/``end`` select
    snapshots whose window contains or follows ``start`` and starts at or before ``end`` (both
    inclusive). The caller paginates (``ExclusiveStartKey``) as usual.
    """
    if window is not None:
        check_window(window)
    lo = parse_time(start) if start is not None else None
    hi = parse_time(end) if end is not None else None
    names: dict[str, str] = {"#pk": schema.PK, "#sk": schema.SK}
    values: dict[str, Any] = {":pk": {"S": schema.entity_pk(entity_id)}}
    args: dict[str, Any] = {"TableName": table}

    if resource is not None and window is not None and lo is not None and hi is not None:
        # Window starts of one window type sort chronologically, so the key range is exact.
        values[":lo"] = {"S": schema.usage_sk(resource, window, format_window_start(window, lo))}
        values[":hi"] = {"S": schema.usage_sk(resource, window, format_window_start(window, hi))}
        args["KeyConditionExpression"] = "#pk = :pk AND #sk BETWEEN :lo AND :hi"
    else:
        if resource is None:
            prefix = schema.usage_sk()
        elif window is None:
            prefix = schema.usage_sk(resource)
        else:
            prefix = schema.usage_sk(resource, window)
        values[":prefix"] = {"S": prefix}
        args["KeyConditionExpression"] = "#pk = :pk AND begins_with(#sk, :prefix)"
        clauses: list[str] = []
        needs_window = resource is None and window is not None
        if lo is not None or hi is not None or needs_window:
            # Bounds are compared as window-start strings, which only sort within one window
            # type: hence one clause per window type.
            for i, w in enumerate([window] if window is not None else list(WINDOWS)):
                parts: list[str] = []
                if window is None or resource is None:
                    names["#window"] = "window"
                    values[f":w{i}"] = {"S": w}
                    parts.append(f"#window = :w{i}")
                if lo is not None:
                    names["#ws"] = "window_start"
                    values[f":lo{i}"] = {"S": format_window_start(w, lo)}
                    parts.append(f"#ws >= :lo{i}")
                if hi is not None:
                    names["#ws"] = "window_start"
                    values[f":hi{i}"] = {"S": format_window_start(w, hi)}
                    parts.append(f"#ws <= :hi{i}")
                clauses.append("(" + " AND ".join(parts) + ")")
            args["FilterExpression"] = " OR ".join(clauses)
    args["ExpressionAttributeNames"] = names
    args["ExpressionAttributeValues"] = values
    return args


def summarize(snapshots: Iterable[UsageSnapshot], entity_id: str, resource: str | None = None,
              window: str | None = None, start: Moment | None = None,
              end: Moment | None = None) -> UsageSummary:
    """Totals per limit over the snapshots, and the average per snapshot.

    A snapshot lacking a limit counts as zero for it. ``start``/``end`` default to the earliest
    and latest window start present; ``resource``/``window`` to the one the snapshots share, or
    ``"*"`` when they differ.
    """
    items = sorted(snapshots, key=lambda s: (s.window_start, s.resource, s.window))
    totals: dict[str, int] = {}
    for snapshot in items:
        for limit, amount in snapshot.counters.items():
            totals[limit] = totals.get(limit, 0) + amount
    count = len(items)
    averages = {limit: (total / count if count else 0.0) for limit, total in totals.items()}

    def shared(given: str | None, values: set[str]) -> str:
        if given is not None:
            return given
        return values.pop() if len(values) == 1 else "*"

    starts = [parse_window_start_iso(s) for s in items]
    return UsageSummary(
        entity_id=entity_id,
        resource=shared(resource, {s.resource for s in items}),
        window=shared(window, {s.window for s in items}),
        start=_iso(parse_time(start)) if start is not None else (min(starts) if starts else ""),
        end=_iso(parse_time(end)) if end is not None else (max(starts) if starts else ""),
        snapshot_count=count,
        totals=dict(sorted(totals.items())),
        averages=dict(sorted(averages.items())),
    )


def parse_window_start_iso(snapshot: UsageSnapshot) -> str:
    """The snapshot's window start as a full ISO-8601 UTC time (daily keys are bare dates)."""
    return _iso(parse_window_start(snapshot.window, snapshot.window_start))
