"""What the limiter, its engine and the operator tools need of storage, and the data they trade.

`zae_limiter.repository.Repository` is the DynamoDB implementation; it is the only module that
knows DynamoDB's error codes, expressions and key formats (through `schema`). A second backend
implements `Storage` (see docs/design.md, "Storage interface").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .exceptions import RateLimiterUnavailable


class RepositoryUnavailable(RateLimiterUnavailable):
    """DynamoDB could not be reached, or kept failing, within the retry policy.

    A `RateLimiterUnavailable`, so callers of any method see the public exception; the limiter
    catches this subclass to apply its failure mode.
    """


class ConditionFailed(Exception):
    """A bucket write's condition did not hold; `current` is the item as DynamoDB had it."""

    def __init__(self, current: BucketItem | None) -> None:
        super().__init__("bucket condition failed")
        self.current = current


@dataclass(frozen=True, slots=True)
class LimitState:
    tokens_milli: int
    last_refill_ms: int
    consumed_milli: int = 0
    released_milli: int = 0
    definition: str | None = None


@dataclass(frozen=True, slots=True)
class BucketItem:
    """All limits of one (entity, resource), as stored."""

    entity_id: str
    resource: str
    limits: dict[str, LimitState]
    write_time_ms: int | None = None
    write_ids: tuple[str, ...] = ()
    size: int = 0


@dataclass(frozen=True, slots=True)
class LimitWrite:
    """One limit's part of a bucket write, translated from a core decision."""

    limit_name: str
    absolute: bool
    value: int
    new_last_refill_ms: int
    expect_last_refill_ms: int | None  # None: the limit must not exist yet
    cond_lo: int | None
    cond_hi: int | None
    delta_milli: int
    definition: str | None = None  # written when the stored definition differs




class StorageError(Exception):
    """A request the store refused for a reason other than an outage or a failed condition
    (e.g. a validation or permission error); `code` is the store's own error code."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class Storage(Protocol):
    """The buckets part of storage: what the acquire engine needs (see `Repository`)."""

    async def get_bucket(self, entity_id: str, resource: str) -> BucketItem | None:
        """The bucket item, read consistently; None when it does not exist."""
        ...

    async def write_bucket(
        self,
        entity_id: str,
        resource: str,
        writes: Sequence[LimitWrite],
        now_ms: int,
        known_size: int = 0,
        known_ids: tuple[str, ...] = (),
    ) -> BucketItem:
        """Apply every limit write of one bucket atomically, exactly once, or raise
        `ConditionFailed` with the current item."""
        ...
