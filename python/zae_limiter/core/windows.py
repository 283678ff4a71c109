"""Usage windows: which there are, the window a moment falls in, and its key and end.

A window's key is the text of its start in UTC (hourly ``YYYY-MM-DDTHH:00Z``, daily
``YYYY-MM-DD``): the aggregator writes snapshots under it and the library reads them by it, and the
expiry of a bucket item waits for the end of the window of its last write.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

from .units import MS_PER_SECOND

__all__ = [
    "DAILY",
    "HOURLY",
    "WINDOWS",
    "check_window",
    "floor_window",
    "format_window_start",
    "parse_window_start",
    "parse_windows",
    "window_end",
    "window_start",
]

HOURLY: Final = "hourly"
DAILY: Final = "daily"
WINDOWS: Final[tuple[str, ...]] = (HOURLY, DAILY)
_FORMATS: Final = {HOURLY: "%Y-%m-%dT%H:00Z", DAILY: "%Y-%m-%d"}
_LENGTHS: Final = {HOURLY: timedelta(hours=1), DAILY: timedelta(days=1)}


def check_window(window: str) -> str:
    if window not in _FORMATS:
        raise ValueError(f"unknown usage window {window!r} (known: {', '.join(WINDOWS)})")
    return window


def parse_windows(spec: str) -> tuple[str, ...]:
    """``"hourly,daily"`` -> ``("hourly", "daily")``; unknown or no windows raise ValueError."""
    windows = tuple(dict.fromkeys(w.strip() for w in spec.split(",") if w.strip()))
    if not windows:
        raise ValueError("no usage windows configured")
    for window in windows:
        check_window(window)
    return windows


def floor_window(window: str, moment: datetime) -> datetime:
    """Start of the window containing ``moment`` (naive datetimes are taken as UTC)."""
    check_window(window)
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    moment = moment.replace(minute=0, second=0, microsecond=0)
    return moment if window == HOURLY else moment.replace(hour=0)


def format_window_start(window: str, moment: datetime) -> str:
    return floor_window(window, moment).strftime(_FORMATS[window])


def window_start(window: str, ts_ms: int) -> str:
    """Window key for a limiter timestamp: hourly ``YYYY-MM-DDTHH:00Z``, daily ``YYYY-MM-DD``."""
    return format_window_start(window, datetime.fromtimestamp(ts_ms / MS_PER_SECOND, UTC))


def parse_window_start(window: str, start: str) -> datetime:
    check_window(window)
    return datetime.strptime(start, _FORMATS[window]).replace(tzinfo=UTC)


def window_end(window: str, start: str) -> datetime:
    return parse_window_start(window, start) + _LENGTHS[window]

