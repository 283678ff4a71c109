"""What the limiter, its engine and the operator tools need of storage, and the data they trade.

`zae_limiter.storage.dynamodb.Repository` is the DynamoDB implementation; its package is the
only one that knows DynamoDB's error codes, expressions and key formats (through `schema`). A
second backend implements `Storage` (see docs/design.md, "Storage interface"); each part is also
a Protocol of its own, so a component can ask for no more than it uses (the engine:
`BucketStorage`).

Errors every implementation raises, whatever its own client library says:

- `RepositoryUnavailable`: the store could not be reached or kept failing within the retry
  policy (an outage: the limiter's failure mode applies);
- `zae_limiter.exceptions.InfrastructureNotFoundError`: the table (store) does not exist;
- `StorageError`: the store refused the request for another reason (its own `code`);
- `ConditionFailed`: only from `BucketStorage.write_bucket`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..exceptions import RateLimiterUnavailable

if TYPE_CHECKING:
    from ..models import AuditEvent, Entity, Limit, UsageSnapshot
    from .capacity import CapacityLedger

# An item as DynamoDB's low-level clients spell it (`{"S": ...}`, `{"N": ...}`, `{"M": ...}`): the
# form of the operator tools' raw views and of the JSON export format (`zae_limiter.ops`). A
# backend that is not DynamoDB produces and accepts its items in this form there.
Item = dict[str, dict[str, Any]]


class RepositoryUnavailable(RateLimiterUnavailable):
    """DynamoDB could not be reached, or kept failing, within the retry policy.

    A `RateLimiterUnavailable`, so callers of any method see the public exception; the limiter
    catches this subclass to apply its failure mode.
    """


class WriteRefused(RepositoryUnavailable):
    """A bucket write that certainly did not apply (throttled, or never sent, on every
    attempt), as opposed to one whose outcome is unknown: a caller may count it as not made."""


class ConditionFailed(Exception):
    """A bucket write's condition did not hold; `current` is the item as DynamoDB had it."""

    def __init__(self, current: BucketItem | None) -> None:
        super().__init__("bucket condition failed")
        self.current = current


class StorageError(Exception):
    """A request the store refused for a reason other than an outage or a failed condition
    (e.g. a validation or permission error); `code` is the store's own error code."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit's bucket as stored: `full_at` (the instant it is full again, in the ticks of
    `definition`; docs/design.md section 1), the counters, and the definition it was written
    with. A state still in the 1.x layout has `full_at` None and `legacy` (tokens at an anchor,
    ms), read through `zae_limiter.stored` and replaced by its next write."""

    full_at: int | None
    consumed_milli: int = 0
    released_milli: int = 0
    definition: str | None = None
    legacy: tuple[int, int] | None = None
    # A quota's state (`qw#<l>`): the epoch ms its window opened; `full_at` is then the
    # millitokens used in that window (docs/design.md "Quotas"). None for a token bucket.
    window: int | None = None


@dataclass(frozen=True, slots=True)
class BucketItem:
    """All limits of one (entity, resource), as stored."""

    entity_id: str
    resource: str
    limits: dict[str, LimitState]
    write_time_ms: int | None = None
    write_ids: tuple[str, ...] = ()
    size: int = 0
    # When the store may delete the item (epoch seconds; None: never). See `zae_limiter.expiry`.
    expires_at: int | None = None


@dataclass(frozen=True, slots=True)
class LimitWrite:
    """One limit's part of a bucket write, translated from a core decision.

    `mode` is the core's (`core.WRITE_RELATIVE`: `full_at += value`; `WRITE_ABSOLUTE`:
    `full_at = value`; `WRITE_ADD`: `full_at += value` with no condition at all). The
    conditions, all of which must hold: the stored `full_at` within `cond_lo`/`cond_hi`;
    `create`: the limit has no state in either layout; `legacy`: the limit holds exactly this
    1.x state (tokens, anchor) and no `full_at`, which the write replaces by `fence` (see
    `zae_limiter.stored`).

    A quota's write (`window` set) also holds a window condition: with `window_bound` None the
    stored window must be exactly `window` (a write within it); with `window_bound` the stored
    window must be absent or earlier than `window_bound`, and the write opens the window
    `window` (`full_at = value`, absolute)."""

    limit_name: str
    mode: int
    value: int
    cond_lo: int | None
    cond_hi: int | None
    delta_milli: int
    definition: str | None = None  # written when the stored definition differs
    create: bool = False
    legacy: tuple[int, int] | None = None
    fence: tuple[int, int] | None = None
    window: int | None = None
    window_bound: int | None = None


@dataclass(frozen=True, slots=True)
class StoredLimit:
    """A stored limit of (entity, resource) with its `limit_def` copy (schema >= 1.1.0)."""

    entity_id: str
    resource: str
    limit: Limit
    definition: str | None = None  # None: the item has no copy


@dataclass(frozen=True, slots=True)
class Backup:
    """An on-demand backup of the table, as the store reports it."""

    id: str | None
    name: str | None
    table: str | None
    status: str | None
    created: str | None  # ISO-8601
    size_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class SlotItem:
    """The concurrency caps of one (entity, resource), as stored: per cap the slots held and
    each holder's entry, lease id -> (slots, expires_at ms). `held[cap]` is always the sum of
    the cap's entries (every write changes both at once)."""

    entity_id: str
    resource: str
    held: dict[str, int]
    holders: dict[str, dict[str, tuple[int, int]]]
    size: int = 0


@dataclass(frozen=True, slots=True)
class SlotTake:
    """One cap's part of a take: `slots` more for the lease, admitted only while the cap holds
    at most `max_in_flight - slots + freed` (`freed`: the slots of `reap`), and each entry of
    `reap` (lease id -> its entry as read: slots, expires_at) removed, only if it is still
    exactly that entry (an expired holder's; a renewal since makes the take fail). A `soft`
    cap's take has no bound on the count (it may pass `max_in_flight`); its entry and reaps are
    conditioned alike, so count and entries stay consistent."""

    cap: str
    slots: int
    max_in_flight: int
    expires_at_ms: int
    reap: tuple[tuple[str, int, int], ...] = ()
    soft: bool = False


class SlotConflict(Exception):
    """A take's condition did not hold (the cap was full as seen, or a reaped entry changed);
    `current` is the item as stored."""

    def __init__(self, current: SlotItem | None) -> None:
        super().__init__("slot condition failed")
        self.current = current


@runtime_checkable
class SlotStorage(Protocol):
    """Concurrency caps (docs/design.md, "Concurrency caps"): every operation is one
    conditional write of the (entity, resource) slot item, applied atomically and at most
    once, whatever is resent after a lost response."""

    async def get_slots(self, entity_id: str, resource: str) -> SlotItem | None:
        """The slot item, read consistently; None when it does not exist."""
        ...

    async def take_slots(
        self, entity_id: str, resource: str, lease_id: str, takes: Sequence[SlotTake]
    ) -> SlotItem:
        """Add the lease's entry to every cap of `takes` at once, or raise `SlotConflict`
        (nothing applied). A resend after a lost response never adds an entry twice."""
        ...

    async def release_slots(
        self, entity_id: str, resource: str, lease_id: str, slots: Mapping[str, int]
    ) -> bool:
        """Remove the lease's entry of each cap and its slots from the cap's count, each only
        if the entry is there (exactly once); False when none was (released or reaped)."""
        ...

    async def renew_slots(
        self,
        entity_id: str,
        resource: str,
        lease_id: str,
        entries: Mapping[str, tuple[int, int]],
    ) -> bool:
        """Set the lease's entries (cap -> slots, new expires_at ms), only where an entry is
        still there; False when some was not (reaped: those slots are no longer held)."""
        ...


@dataclass(frozen=True, slots=True)
class Switch:
    """A kill switch as stored: resource or entity (`kind`, one of `schema.SWITCH_KINDS`)
    `name` is "disabled" or "bypass" (`state`); who set it and when (ISO-8601 UTC)."""

    kind: str
    name: str
    state: str
    principal: str | None = None
    changed_at: str | None = None


@runtime_checkable
class SwitchStorage(Protocol):
    """Kill switches (docs/limits.md, "Kill switch"), all in one partition."""

    async def get_switches(self) -> list[Switch]:
        """Every switch that is set, read consistently with one Query (all pages)."""
        ...

    async def put_switch(self, switch: Switch) -> str | None:
        """Set the switch (replacing its state); returns the state it had (None: clear)."""
        ...

    async def delete_switch(self, kind: str, name: str) -> str | None:
        """Clear the switch; returns the state it had (None: it was clear)."""
        ...


class BucketStorage(Protocol):
    """The buckets: what the acquire engine needs."""

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
        expires_at: int | None = None,
    ) -> BucketItem:
        """Apply every limit write of one bucket atomically, exactly once, or raise
        `ConditionFailed` with the current item, `WriteRefused` when it certainly did not
        apply, or `RepositoryUnavailable` when its outcome is unknown. `expires_at` (epoch
        seconds), if given, is set as the item's expiry by the same write."""
        ...

    async def extend_bucket_expiry(
        self, entity_id: str, resource: str, expires_at: int, known_size: int = 0
    ) -> bool:
        """Move the item's expiry to `expires_at` unless it is already as late (never earlier;
        a repeat changes nothing), without creating an item; False when nothing changed."""
        ...

    async def resource_buckets(self, resource: str) -> list[BucketItem]:
        """Every entity's bucket item of `resource` (a report for operators: it may read the
        whole table)."""
        ...


class EntityStorage(Protocol):
    """Entities and their stored limits: what the limiter resolves an acquire with; and the
    audit trail of changes to them."""

    async def put_entity(self, entity: Entity) -> None:
        """Create the entity; `EntityExistsError` when one with its id exists."""
        ...

    async def get_entity(self, entity_id: str) -> Entity | None: ...

    async def get_children(self, parent_id: str) -> list[Entity]: ...

    async def delete_entity(self, entity_id: str) -> int:
        """Delete every item of the entity; `EntityNotFoundError` when it does not exist."""
        ...

    async def set_limits(self, entity_id: str, resource: str, limits: Sequence[Limit]) -> None:
        """Replace the stored limits of (entity, resource)."""
        ...

    async def get_limits(self, entity_id: str, resource: str) -> list[Limit]: ...

    async def get_all_limits(self, entity_id: str) -> dict[str, list[Limit]]: ...

    async def delete_limits(self, entity_id: str, resource: str) -> int: ...

    async def set_defaults(self, resource: str, limits: Sequence[Limit]) -> None:
        """Replace the default limits of `resource` (`schema.DEFAULT_RESOURCE`: the system
        level); docs/limits.md, "Where limits come from"."""
        ...

    async def get_defaults(self, resource: str) -> list[Limit]:
        """The default limits of `resource` (the system level's for `DEFAULT_RESOURCE`), read
        consistently; empty when none are stored."""
        ...

    async def delete_defaults(self, resource: str) -> int:
        """Delete the default limits of `resource`; how many there were."""
        ...

    async def all_defaults(self) -> dict[str, list[Limit]]:
        """Every level's default limits by resource (`DEFAULT_RESOURCE`: the system level), in
        one read of their partition."""
        ...

    async def put_audit_event(self, event: AuditEvent) -> None:
        """Record an audit event exactly once (a resend never doubles it)."""
        ...

    async def get_audit_events(
        self,
        entity_id: str,
        limit: int = 100,
        start_event_id: str | None = None,
        *,
        oldest_first: bool = False,
    ) -> list[AuditEvent]:
        """Up to `limit` events of the entity, newest first (or oldest first), after
        `start_event_id` in that order; read consistently. Events outlive the entity."""
        ...

    async def audit_chain_items(self, entity_id: str) -> tuple[list[Item], Item | None]:
        """The entity's audit event items as stored, and its chain's head (None: none), read
        consistently: what `audit.verify_trail` checks."""
        ...


class UsageStorage(Protocol):
    """Usage snapshots (written by the aggregator)."""

    async def get_usage_snapshots(
        self,
        entity_id: str,
        resource: str | None = None,
        window: str | None = None,
        start: datetime | str | None = None,
        end: datetime | str | None = None,
    ) -> list[UsageSnapshot]:
        """Snapshots oldest first (by window start, then resource, then window); None: any.
        `ValueError` for an unknown window or an unreadable time, before any I/O."""
        ...


class AdminStorage(Protocol):
    """The table itself, its version record, and the operator tools' views and backups."""

    @property
    def table_name(self) -> str: ...

    @property
    def ledger(self) -> CapacityLedger: ...

    # Where the store is reached (None: AWS's regional endpoint, or no network at all); the
    # limiter's default deadline follows it (`zae_limiter.deadline`).
    endpoint_url: str | None

    async def open(self) -> None:
        """Make ready what the first call would (a client), before any deadline starts."""
        ...

    async def close(self) -> None: ...

    async def table_exists(self) -> bool: ...

    async def create_table(
        self,
        billing_mode: str = "PAY_PER_REQUEST",
        read_capacity: int | None = None,
        write_capacity: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> bool:
        """Create the table if it is missing (True when this call created it), and wait until
        it is usable."""
        ...

    async def delete_table(self) -> bool: ...

    async def get_version_record(self) -> dict[str, Any] | None: ...

    async def set_version_record(
        self,
        schema_version: str | None = None,
        lambda_version: str | None = None,
        min_client_version: str | None = None,
        updated_by: str = "zae-limiter",
        **extra: str,
    ) -> None: ...

    async def create_version_record(
        self, fields: Mapping[str, str], updated_by: str = "zae-limiter"
    ) -> bool:
        """Write the version record only if there is none; False when there was one."""
        ...

    async def list_buckets(self, entity_id: str) -> list[BucketItem]: ...

    async def all_buckets(self) -> list[BucketItem]:
        """Every bucket item of the table, read consistently (migrations, reports)."""
        ...

    async def restore_legacy_state(
        self,
        entity_id: str,
        resource: str,
        limit_name: str,
        full_at: int,
        legacy: tuple[int, int],
    ) -> bool:
        """Put one limit back in the 1.x layout (tokens, anchor) only while it holds exactly
        `full_at`; False when it changed meanwhile (rolling back schema 1.2.0)."""
        ...

    async def bucket_items(self, entity_id: str, resource: str | None = None) -> list[Item]:
        """The entity's bucket items as stored (reset limits included), read consistently."""
        ...

    async def reset_bucket(
        self, entity_id: str, resource: str, limit_names: Sequence[str] | None = None
    ) -> bool: ...

    async def list_stored_limits(self) -> list[StoredLimit]:
        """Every stored limit of every entity (a full read: operator tools and migrations)."""
        ...

    async def set_stored_limit_definition(
        self, entity_id: str, resource: str, limit: Limit, definition: str | None
    ) -> bool:
        """Set (None: remove) the `limit_def` copy of a stored limit, only while the item still
        holds `limit`; False when it does not (replaced or deleted meanwhile)."""
        ...

    async def export_items(self) -> list[Item]:
        """Every item of the table, read consistently."""
        ...

    async def replace_items(self, items: Sequence[Item]) -> int:
        """Make the table hold exactly `items`; returns how many other items were deleted."""
        ...

    async def create_backup(self, name: str) -> Backup: ...

    async def list_backups(self) -> list[Backup]: ...


class Storage(BucketStorage, EntityStorage, UsageStorage, AdminStorage, Protocol):
    """Everything a storage backend implements (`Repository` is the DynamoDB one)."""
