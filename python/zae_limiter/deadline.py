"""The per-operation deadline: how long one call may wait on DynamoDB, retries included.

A limiter in front of every request must answer in bounded time whatever DynamoDB does: a hung
endpoint otherwise holds each call for the retry policy's whole budget (tens of seconds). The
deadline is an outage like any other (`DeadlineExceeded` is a `RepositoryUnavailable`), so the
failure mode decides: FAIL_OPEN admits, FAIL_CLOSED raises `RateLimiterUnavailable`.

Only the part of an operation that waits on I/O is bounded: a timer per call costs more than an
acquire served from a reservation, so those never arm one.

The default depends on where DynamoDB is (`default_deadline`): 1 s for DynamoDB itself, 30 s for
an endpoint on this host's loopback (the embedded moto server, DynamoDB Local). A local engine
answers one request at a time (moto: about 100 a second) on the same CPUs as its clients, so a
few dozen concurrent clients queue there for seconds with nothing wrong; DynamoDB serves each
request in milliseconds, and a wait past a second there is an outage worth failing over.
"""

from __future__ import annotations

import asyncio
import enum
import math
from types import TracebackType
from typing import Final, Literal

from .exceptions import ValidationError
from .storage.dynamodb.endpoint import is_loopback
from .storage.protocol import RepositoryUnavailable

DEFAULT_DEADLINE_SECONDS: Final = 1.0
# Above what the embedded server's queue costs the heaviest workload run on it here (3 processes
# x 64 tasks on one item: a few seconds per call), and still a bound on a hung local server.
LOOPBACK_DEADLINE_SECONDS: Final = 30.0


class Default(enum.Enum):
    """`deadline=DEFAULT` (the constructors' default): chosen by the endpoint, see
    `default_deadline`. An enum member so that type checkers tell it from a number and None."""

    DEADLINE = "default"


DEFAULT: Final = Default.DEADLINE
DeadlineArg = float | None | Literal[Default.DEADLINE]


def default_deadline(endpoint_url: str | None) -> float:
    """The deadline a limiter gets without `deadline=`: `LOOPBACK_DEADLINE_SECONDS` for an
    endpoint on loopback (`repository.is_loopback`: localhost, 127.0.0.0/8, ::1), else
    `DEFAULT_DEADLINE_SECONDS` (AWS, or any other host)."""
    return LOOPBACK_DEADLINE_SECONDS if is_loopback(endpoint_url) else DEFAULT_DEADLINE_SECONDS


def resolve_deadline(value: object, endpoint_url: str | None) -> float | None:
    """A constructor's `deadline=`: DEFAULT (by the endpoint), None (no deadline) or seconds."""
    if value is DEFAULT:
        return default_deadline(endpoint_url)
    return None if value is None else check_deadline(value)


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
