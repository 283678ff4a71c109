"""The per-operation deadline: how long one call may wait on DynamoDB, retries included.

A limiter in front of every request must answer in bounded time whatever DynamoDB does: a hung
endpoint otherwise holds each call for the retry policy's whole budget (tens of seconds). The
deadline is an outage like any other (`DeadlineExceeded` is a `RepositoryUnavailable`), so the
failure mode decides: FAIL_OPEN admits, FAIL_CLOSED raises `RateLimiterUnavailable`.

Only the part of an operation that waits on I/O is bounded: a timer per call costs more than an
acquire served from a reservation, so those never arm one.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Final

from .exceptions import ValidationError
from .storage import RepositoryUnavailable

DEFAULT_DEADLINE_SECONDS: Final = 1.0


class DeadlineExceeded(RepositoryUnavailable):
    """The operation's deadline passed while it waited on DynamoDB."""


def check_deadline(value: object, field: str = "deadline") -> float:
    """A deadline in seconds: a positive, finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(field, value, "must be a number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValidationError(field, value, "must be positive and finite")
    return seconds


class Bounded:
    """`async with Bounded(seconds):` raises `DeadlineExceeded` when the block runs past
    `seconds` (None: no bound). What the block was awaiting is cancelled; anything that must
    finish regardless runs as its own task and is shielded by its caller."""

    __slots__ = ("_seconds", "_timeout")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        if self._seconds is not None:
            self._timeout = asyncio.timeout(self._seconds)
            await self._timeout.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        timeout, self._timeout = self._timeout, None
        if timeout is None:
            return
        try:
            await timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError as expired:
            if not timeout.expired():
                raise  # a TimeoutError of the block's own, not the deadline's
            raise DeadlineExceeded(
                f"deadline of {self._seconds:g}s passed waiting for DynamoDB", expired
            ) from expired
