"""Units: every conversion between tokens and millitokens, milliseconds and seconds.

Decisions are made in integers: millitokens (a token is `MILLI` of them) and milliseconds. What
people see is whole tokens and seconds. One rounding rule per direction, here only:

- tokens a bucket *holds* round down (`tokens_down`): never report a token that is not there;
- tokens a request *needs* round up (`tokens_up`): a block or a write always covers a fraction;
- a wait in seconds is the exact quotient of its milliseconds (`seconds`), and whole seconds
  for a header round up (`whole_seconds_up`): never tell a client to come back too early.

A moment shown to people or written in an item is ISO-8601 in UTC with `Z` (`iso_utc`), here only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Final, Literal, Protocol

MILLI: Final = 1000  # millitokens per token
MS_PER_SECOND: Final = 1000


class Named(Protocol):
    @property
    def name(self) -> str: ...


def to_milli(tokens: int) -> int:
    """Whole tokens in millitokens."""
    return tokens * MILLI


def milli_of(amounts: Mapping[str, int], limits: Iterable[Named]) -> list[int]:
    """`amounts` (whole tokens by limit name) in millitokens, in the order of `limits` (0 for a
    limit not named)."""
    return [amounts.get(limit.name, 0) * MILLI for limit in limits]


def tokens_down(milli: int) -> int:
    """Whole tokens held in `milli` millitokens, rounded down (toward minus infinity: a debt
    of half a token shows as -1)."""
    return milli // MILLI


def tokens_exact(milli: int) -> float:
    """Millitokens as tokens with their fraction, for operators' displays (never a decision)."""
    return milli / MILLI


def tokens_up(milli: int) -> int:
    """Whole tokens that cover `milli` millitokens, rounded up."""
    return -(-milli // MILLI)


def seconds(ms: int) -> float:
    """Milliseconds in seconds (exact for any whole number of milliseconds a decision yields)."""
    return ms / MS_PER_SECOND


def whole_seconds_up(ms: int) -> int:
    """Milliseconds in whole seconds, rounded up."""
    return -(-ms // MS_PER_SECOND)


def ms_of_seconds(value: float) -> int:
    """Seconds (a configuration value) in whole milliseconds, rounded down."""
    return int(value * MS_PER_SECOND)


Timespec = Literal["auto", "seconds", "milliseconds"]


def iso_utc(moment: datetime | int | None = None, timespec: Timespec = "milliseconds") -> str:
    """`moment` (a datetime, naive taken as UTC; epoch milliseconds; None: now) as ISO-8601 in
    UTC ending in `Z`, e.g. `2026-12-06T06:15:16.123Z`."""
    if moment is None:
        moment = datetime.now(UTC)
    elif isinstance(moment, int):
        moment = datetime.fromtimestamp(moment / MS_PER_SECOND, UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
