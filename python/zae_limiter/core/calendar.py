"""Calendar windows of quotas: a 5-field cron read in an IANA time zone.

A cron quota's window opens at every instant the cron names, read as wall-clock time in its zone,
and lasts until the next one. Wall-clock time is DST-correct (``zoneinfo``): a time the clocks skip
(a spring-forward gap) opens the window as far past the gap's start as it was meant to lie within
it (``02:30`` on a night that jumps from 02:00 to 03:00 opens at 03:30), and a time the clocks
repeat (fall back) opens at its first occurrence.

Fields: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or jan-dec), day of week
(0-7, 0 and 7 Sunday, or sun-sat); each ``*``, a value, a range ``a-b``, a step ``*/n`` or
``a-b/n``, or a comma list of those. As in every cron, when both day fields are restricted a day
matches either.

Invalid input raises ``ValueError`` (the models name the field); times are integer milliseconds
since the Unix epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["Cron", "nominal_window_seconds", "parse_cron", "window_at", "zone"]

_MONTHS: Final = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
)}
_DAYS: Final = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
# Far enough back for any cron that matches at all: Feb 29 on a Monday recurs within 28 years.
_SEARCH_DAYS: Final = 366 * 29
_REFERENCE: Final = datetime(2026, 1, 1)  # where the nominal window is measured from
_NOMINAL_SPAN: Final = timedelta(days=400)
_NOMINAL_WINDOWS: Final = 2_000


@dataclass(frozen=True)
class Cron:
    minutes: tuple[int, ...]  # descending, as the searches walk back in time
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # the day of month is `*`
    any_weekday: bool  # the day of week is `*`

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        by_day = day.day in self.days
        by_weekday = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return by_day and by_weekday
        return by_day or by_weekday


def _value(text: str, lo: int, hi: int, names: dict[str, int] | None, field: str) -> int:
    key = text.lower()
    if names is not None and key in names:
        return names[key]
    if not text.isdigit() or len(text) > 2:
        raise ValueError(f"{field}: {text!r} is not a number from {lo} to {hi}")
    value = int(text)
    if not lo <= value <= hi:
        raise ValueError(f"{field}: {value} is outside {lo}-{hi}")
    return value


def _field(
    text: str, lo: int, hi: int, field: str, names: dict[str, int] | None = None
) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, slash, step_text = part.partition("/")
        step = _value(step_text, 1, hi - lo + 1, None, field) if slash else 1
        if body == "*":
            first, last = lo, hi
        elif "-" in body:
            a, _, b = body.partition("-")
            first, last = _value(a, lo, hi, names, field), _value(b, lo, hi, names, field)
            if first > last:
                raise ValueError(f"{field}: the range {body!r} runs backwards")
        else:
            first = _value(body, lo, hi, names, field)
            last = hi if slash else first
        values.update(range(first, last + 1, step))
    return values


@lru_cache(maxsize=256)
def parse_cron(text: str) -> Cron:
    """The cron of a 5-field expression (``ValueError`` naming what is wrong)."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string, not {type(text).__name__}")
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"{text!r} must have 5 fields (minute hour day month weekday)")
    minute, hour, day, month, weekday = fields
    weekdays = {d % 7 for d in _field(weekday, 0, 7, "weekday", _DAYS)}
    cron = Cron(
        minutes=tuple(sorted(_field(minute, 0, 59, "minute"), reverse=True)),
        hours=tuple(sorted(_field(hour, 0, 23, "hour"), reverse=True)),
        days=frozenset(_field(day, 1, 31, "day", None)),
        months=frozenset(_field(month, 1, 12, "month", _MONTHS)),
        weekdays=frozenset(weekdays),
        any_day=day == "*",
        any_weekday=weekday == "*",
    )
    if not any(_possible(cron, m) for m in cron.months):
        raise ValueError(f"{text!r} names no day that exists")
    return cron


def _possible(cron: Cron, month: int) -> bool:
    longest = 29 if month == 2 else 30 if month in (4, 6, 9, 11) else 31
    return (not cron.any_weekday and not cron.any_day) or any(d <= longest for d in cron.days)


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The IANA zone `name` (``ValueError`` if unknown)."""
    if not isinstance(name, str) or not name or name.startswith(("/", ".")) or ".." in name:
        raise ValueError(f"{name!r} is not an IANA time zone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"{name!r} is not an IANA time zone") from exc


def _instant_ms(local: datetime, tz: ZoneInfo) -> int:
    """The instant a wall-clock time opens a window (gaps pushed forward, repeats at the first
    occurrence: `fold=0` does both)."""
    aware = local.replace(tzinfo=tz, fold=0)
    return int(aware.timestamp()) * 1000


def _openings_back(cron: Cron, tz: ZoneInfo, before_ms: int) -> int | None:
    """The last opening at or before `before_ms`."""
    day = datetime.fromtimestamp(before_ms / 1000, tz).date() + timedelta(days=1)
    for _ in range(_SEARCH_DAYS):
        if cron.matches_day(day):
            best: int | None = None
            for h in cron.hours:
                for m in cron.minutes:
                    at = _instant_ms(datetime(day.year, day.month, day.day, h, m), tz)
                    # Gaps can reorder instants within a day: keep the latest one at or before.
                    if at <= before_ms and (best is None or at > best):
                        best = at
            if best is not None:
                return best
        day -= timedelta(days=1)
    return None


def _openings_after(cron: Cron, tz: ZoneInfo, after_ms: int) -> int | None:
    """The first opening strictly after `after_ms`."""
    day = datetime.fromtimestamp(after_ms / 1000, tz).date() - timedelta(days=1)
    hours, minutes = cron.hours[::-1], cron.minutes[::-1]
    for _ in range(_SEARCH_DAYS):
        if cron.matches_day(day):
            best: int | None = None
            for h in hours:
                for m in minutes:
                    at = _instant_ms(datetime(day.year, day.month, day.day, h, m), tz)
                    # Gaps can reorder instants within a day: keep the earliest one after.
                    if at > after_ms and (best is None or at < best):
                        best = at
            if best is not None:
                return best
        day += timedelta(days=1)
    return None


_last: dict[tuple[str, str], tuple[int, int]] = {}


def window_at(cron_text: str, tz_name: str, now_ms: int) -> tuple[int, int]:
    """``(start_ms, end_ms)`` of the window holding `now_ms`: the last opening at or before it
    and the next one after it. The last window of each cron is kept: acquires inside it cost a
    lookup."""
    key = (cron_text, tz_name)
    known = _last.get(key)
    if known is not None and known[0] <= now_ms < known[1]:
        return known
    cron, tz = parse_cron(cron_text), zone(tz_name)
    start = _openings_back(cron, tz, now_ms)
    end = _openings_after(cron, tz, now_ms)
    if start is None or end is None:
        raise ValueError(f"{cron_text!r} opens no window around {now_ms} ms")
    if len(_last) > 1024:
        _last.clear()
    _last[key] = (start, end)
    return start, end


@lru_cache(maxsize=256)
def nominal_window_seconds(cron_text: object, tz_name: object) -> int:
    """The longest window of the cron over 400 days (or 2,000 windows) from 2026-01-01 in its
    zone: a cron quota's `refill_period_seconds`, for display and the RateLimit `w` field.
    Checks both (``ValueError``)."""
    if not isinstance(cron_text, str):
        raise ValueError(f"cron must be a string, not {type(cron_text).__name__}")
    if not isinstance(tz_name, str):
        raise ValueError(f"tz must be a string, not {type(tz_name).__name__}")
    cron, tz = parse_cron(cron_text), zone(tz_name)
    at = _openings_after(cron, tz, _instant_ms(_REFERENCE, tz) - 1)
    if at is None:
        raise ValueError(f"{cron_text!r} opens no window")
    limit = at + int(_NOMINAL_SPAN.total_seconds()) * 1000
    longest = 0
    for _ in range(_NOMINAL_WINDOWS):
        following = _openings_after(cron, tz, at)
        if following is None:
            break
        longest = max(longest, following - at)
        if following > limit:
            break
        at = following
    return max(1, longest // 1000)
