"""Usage snapshots (written by the aggregator) for the library and the CLI: time arguments, the
order of listings, summaries.

Reading them is storage's (`UsageStorage.get_usage_snapshots`; the DynamoDB query and the item
format are in `zae_limiter.storage.dynamodb`: `requests.usage_query`, `codec`). Snapshot item
attributes (see ``zae_limiter.aggregator.handler.build_item``): ``counters`` maps each limit to
its net tokens (consumed - released) in the window, exact decimals; ``consumed`` and
``released`` the two parts; ``spans`` the counter intervals the aggregator folds (its
idempotency state, not meant for readers).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from .core.units import iso_utc
from .core.windows import check_window, parse_window_start
from .models import UsageSnapshot, UsageSummary

__all__ = [
    "check_range",
    "parse_time",
    "parse_window_start_iso",
    "snapshot_order",
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
    return iso_utc(moment, "auto")


def check_range(
    window: str | None, start: Moment | None = None, end: Moment | None = None
) -> tuple[datetime | None, datetime | None]:
    """Check a snapshot selection before any I/O: ``ValueError`` for an unknown window or an
    unreadable time; returns ``start``/``end`` as UTC datetimes (None stays None)."""
    if window is not None:
        check_window(window)
    return (
        parse_time(start) if start is not None else None,
        parse_time(end) if end is not None else None,
    )


def snapshot_order(snapshot: UsageSnapshot) -> tuple[str, str, str]:
    """The one order of snapshot listings: oldest window start first, then resource, window."""
    return (parse_window_start_iso(snapshot), snapshot.resource, snapshot.window)


def summarize(snapshots: Iterable[UsageSnapshot], entity_id: str, resource: str | None = None,
              window: str | None = None, start: Moment | None = None,
              end: Moment | None = None) -> UsageSummary:
    """Totals per limit over the snapshots, and the average per snapshot.

    A snapshot lacking a limit counts as zero for it. ``start``/``end`` default to the earliest
    and latest window start present; ``resource``/``window`` to the one the snapshots share, or
    ``"*"`` when they differ.
    """
    items = sorted(snapshots, key=snapshot_order)
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
