"""`Repository`, the DynamoDB `zae_limiter.storage.Storage`: each storage operation as the
DynamoDB requests it takes, their capacity accounting, and the resolution of a bucket write whose
response was lost.

It makes no rate-limiting decisions: bucket writes arrive as conditions and values computed by
the core. It is composed of the package's parts: `client` (the aioboto3 client, sends and their
retries, DynamoDB's errors translated), `requests` (the requests whose expressions are built, the
bucket write's among them) and `codec` (items to and from the library's data). Errors leave it as
`client` translates them (see its docstring); `error_code` reads a code where one is still needed.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aioboto3
import botocore.exceptions

from ... import core, schema
from ...audit import CHAIN_START
from ...exceptions import (
    EntityExistsError,
    EntityNotFoundError,
    InfrastructureNotFoundError,
    ValidationError,
)
from ...models import AuditEvent, Entity, Limit, UsageSnapshot
from ...schema import error_code
from ...usage import Moment, snapshot_order
from ..capacity import CapacityLedger, item_size, read_units, write_units
from ..protocol import (
    Backup,
    BucketItem,
    ConditionFailed,
    Item,
    LimitWrite,
    RepositoryUnavailable,
    SlotConflict,
    SlotItem,
    SlotStorage,
    SlotTake,
    Storage,
    StorageError,
    StoredLimit,
    Switch,
    SwitchStorage,
    WriteRefused,
)
from .client import (
    RETRYABLE_CODES,
    THROTTLE_CODES,
    ConditionCheckFailed,
    RetryPolicy,
    TableClient,
    idempotent,
)
from .codec import (
    audit_event_from_item,
    audit_head,
    audit_item,
    backup_from,
    bucket_from_item,
    chained_audit_item,
    defaults_item,
    entity_from_item,
    entity_item,
    holds_event,
    item_key,
    item_num,
    item_str,
    key_of,
    limit_from_item,
    limit_item,
    now_iso,
    num_av,
    snapshot_from_item,
    str_av,
    switch_from_item,
    switch_item,
    version_item,
)
from .endpoint import configured_endpoint, is_loopback
from .requests import (
    BucketRequests,
    expiry_extension,
    legacy_restore,
    prefix_query,
    state_reset,
    stored_limit_definition,
    usage_query,
    version_update,
)
from .slots import (
    Change,
    Check,
    release_each,
    renew_each,
    slots_from_item,
    slots_key,
    take_op,
    update_request,
)

# The names this module exported before `client`, `codec` and `requests` were split from it
# (`zae_limiter.repository`, 0.2.0's path, is this module): they stay importable from here.
__all__ = [
    "Repository",
    "RetryPolicy",
    "audit_event_from_item",
    "audit_head",
    "audit_item",
    "bucket_from_item",
    "chained_audit_item",
    "entity_from_item",
    "error_code",
    "is_loopback",
    "limit_from_item",
    "snapshot_from_item",
    "surely_absent",
    "usage_query",
]

# Appenders racing for one entity's chain: enough for a burst of administrative changes to one
# entity from several processes; past it the event is logged and the caller told (audit.record).
AUDIT_APPEND_ATTEMPTS = 25
_TABLE_IN_USE = "ResourceInUseException"


def surely_absent(write_id: str, current: BucketItem | None, known_ids: tuple[str, ...]) -> bool:
    """True when `current` proves that the write `write_id` has not landed: its id is not in
    the ring of recent write ids, and the ring still reaches back to the item the decision was
    made on (or never filled up), so it would hold the id if the write had landed."""
    if current is None:
        return True
    if write_id in current.write_ids:
        return False
    if len(current.write_ids) < len(schema.WRITE_ID_SLOTS):
        return True
    return bool(known_ids) and known_ids[0] in current.write_ids


def _gives_back(writes: Sequence[LimitWrite]) -> bool:
    """True when applying `writes` twice could add tokens: a part that gives back (or adds
    tokens unconditionally). A write mixing such a part with consumption counts as a give-back:
    the mix is one UpdateItem, applied whole or not at all."""
    return any(w.delta_milli < 0 or w.mode == core.WRITE_ADD for w in writes)


def _unknown_outcome(cause: BaseException | None) -> RepositoryUnavailable:
    return RepositoryUnavailable(
        "a bucket write's response was lost and too many writes followed to tell whether it "
        f"landed: {cause}",
        cause,
    )


def _unconfirmed_give_back(cause: BaseException | None) -> RepositoryUnavailable:
    return RepositoryUnavailable(
        "a give-back's response was lost and its write id is not on the item: it may still "
        f"land, so it is not sent again (it could land twice and mint tokens): {cause}",
        cause,
    )


class _Landed(Exception):
    """A bucket write whose response was lost is on the item (`current`): it stands, once."""

    def __init__(self, current: BucketItem) -> None:
        super().__init__("landed")
        self.current = current


class _SlotsLanded(Exception):
    """A take whose response was lost is found in the item: it landed."""

    def __init__(self, current: SlotItem) -> None:
        super().__init__("landed")
        self.current = current


class Repository:
    """Async access to one zae-limiter table.

    `Repository("ZAEL-my-app", "us-east-1", None)` or `Repository(name="my-app")`; close with
    `await repo.close()` (or `async with`). Its parts: `table_client` (the client, every send)
    and `requests` (the bucket requests, from parts built once).
    """

    def __init__(
        self,
        table_name: str | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        session: aioboto3.Session | None = None,
        max_pool_connections: int = 50,
    ) -> None:
        if table_name is None and name is None:
            raise ValueError("Repository needs a table_name or a name")
        self.table_name = schema.table_name(table_name or name or "")
        self.region = region
        # The environment's endpoint is resolved here, not left to botocore alone: a loopback one
        # needs no region or credentials (`TableClient._where`).
        self.endpoint_url = configured_endpoint(endpoint_url)
        self.retry = retry or RetryPolicy()
        self.ledger = CapacityLedger()
        self.table_client = TableClient(
            self.table_name,
            region,
            self.endpoint_url,
            retry=self.retry,
            session=session,
            max_pool_connections=max_pool_connections,
            ledger=self.ledger,
        )
        self.requests = BucketRequests(self.table_name)
        # Appends to one entity's audit chain from this process queue here instead of racing
        # each other for the head in DynamoDB (other processes still race: see put_audit_event).
        self._audit_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())

    # -- client lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Build the client now (see `TableClient.open`)."""
        await self.table_client.open()

    async def client(self) -> Any:
        """The aiobotocore client, built on first use."""
        return await self.table_client.client()

    async def close(self) -> None:
        await self.table_client.close()

    async def __aenter__(self) -> Repository:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """One raw DynamoDB call whose effect is idempotent: ambiguous failures are simply
        retried. Errors are translated as everywhere (see `client`).

        The request is checked against the service model first, as botocore's own parameter
        validation would (it is off in the client): arguments it refuses raise
        `StorageError("ParamValidationError", ...)` and nothing is sent.
        """
        return await self.table_client.call(operation, **kwargs)

    # -- buckets ----------------------------------------------------------------------------

    async def get_bucket(self, entity_id: str, resource: str) -> BucketItem | None:
        item, size = await self._bucket_item(entity_id, resource)
        return bucket_from_item(item, size) if item else None

    async def _bucket_item(self, entity_id: str, resource: str) -> tuple[Item | None, int]:
        """One bucket item as stored (low-level form), read consistently, and its size. A
        request built here, not checked (see `TableClient.config`)."""
        request = self.requests.get(entity_id, resource)
        response = await self.table_client.send(
            "get_item", request, bucket=True, resend=idempotent
        )
        item: Item | None = response.get("Item")
        size = item_size(item)
        self.ledger.record("GetItem", rcu=read_units(size, consistent=True))
        return item, size

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
        """Apply one conditional UpdateItem for every limit write of the bucket (setting the
        item's expiry to `expires_at`, if given).

        Raises `ConditionFailed` with the current item when any condition does not hold. A write
        whose response was lost is resolved by reading the item's recent write ids, so it is
        neither lost nor applied twice. `known_ids` are the write ids of the item the decision
        was made on: when so many writes followed that the ring no longer tells whether this one
        landed, the outcome is unknown and `RepositoryUnavailable` is raised instead of a resend.

        A give-back (`_gives_back(writes)`) is never sent again once a copy may be in flight: a
        copy delayed past the read timeout can land after its resend and after four more writes
        pushed its id out of the ring, and nothing in the request can refuse it then. Unless the
        read finds its id (it landed), it raises `RepositoryUnavailable`; the tokens may or may
        not come back (capacity lost at worst, never minted).
        """
        write_id = secrets.token_urlsafe(6)
        kwargs = self.requests.update(entity_id, resource, writes, now_ms, write_id, expires_at)
        give_back = _gives_back(writes)
        retryable = THROTTLE_CODES if give_back else RETRYABLE_CODES
        lost: list[BaseException] = []  # failures after which a copy may be in flight

        async def resend(cause: BaseException) -> None:
            """After a lost response: read the item; the write is sent again only if the read
            proves it did not land."""
            lost.append(cause)
            current = await self.get_bucket(entity_id, resource)
            if current is not None and write_id in current.write_ids:
                raise _Landed(current)
            if give_back:
                # No fence keeps the copy in flight from landing after a resend, once the
                # ring has rotated: under-admit rather than risk adding the tokens twice.
                raise _unconfirmed_give_back(cause) from None
            if not surely_absent(write_id, current, known_ids):
                raise _unknown_outcome(cause) from None

        try:
            response = await self.table_client.send(
                "update_item", kwargs, retryable, bucket=True, resend=resend
            )
        except _Landed as landed:
            self.ledger.record("UpdateItem", wcu=write_units(known_size, landed.current.size))
            return landed.current
        except RepositoryUnavailable as exc:
            if lost:
                raise
            # Every send was refused before it applied (throttled, never sent).
            raise WriteRefused(str(exc), exc.__cause__) from exc
        except ConditionCheckFailed as exc:
            raw = exc.item
            current = bucket_from_item(raw) if raw else None
            if raw is None:
                # Older servers do not return the item on failure: one read instead.
                current = await self.get_bucket(entity_id, resource)
            self.ledger.record("UpdateItem", wcu=write_units(current.size if current else 0))
            if current is not None and write_id in current.write_ids:
                # An earlier send whose response was lost landed (maybe late): this resend was
                # refused by the write-id condition, and the write stands exactly once.
                return current
            if lost and not surely_absent(write_id, current, known_ids):
                raise _unknown_outcome(lost[-1]) from None
            self.ledger.conflict(resource)
            raise ConditionFailed(current) from None
        new = bucket_from_item(response["Attributes"])
        self.ledger.record("UpdateItem", wcu=write_units(known_size, new.size))
        return new

    async def extend_bucket_expiry(
        self, entity_id: str, resource: str, expires_at: int, known_size: int = 0
    ) -> bool:
        """Set the bucket item's expiry to `expires_at` only if it is earlier (or unset) and the
        item exists: one conditional UpdateItem. Monotone, so a resend after a lost response
        and a race between writers both leave the latest expiry. False when nothing changed."""
        request = expiry_extension(
            self.table_name, self.requests.key(entity_id, resource), expires_at
        )
        try:
            await self.call("update_item", **request)
        except ConditionCheckFailed:
            # Refused writes are billed too (one unit per started KB of the item).
            self.ledger.record("UpdateItem", wcu=write_units(known_size))
            return False
        self.ledger.record("UpdateItem", wcu=write_units(known_size))
        return True

    # -- concurrency caps (`SlotStorage`; docs/design.md, "Concurrency caps") ----------------

    async def get_slots(self, entity_id: str, resource: str) -> SlotItem | None:
        response = await self.call(
            "get_item",
            TableName=self.table_name,
            Key=slots_key(entity_id, resource),
            ConsistentRead=True,
        )
        item: Item | None = response.get("Item")
        size = item_size(item)
        self.ledger.record("GetItem", rcu=read_units(size, consistent=True))
        return slots_from_item(item, size) if item else None

    async def take_slots(
        self, entity_id: str, resource: str, lease_id: str, takes: Sequence[SlotTake]
    ) -> SlotItem:
        """One conditional UpdateItem. After a lost response the item is read: the lease's
        entries there mean the take landed; otherwise it is sent again, which cannot apply it
        twice (each entry must be absent). A late first copy landing after a refused resend
        leaves the slots held by an entry nobody renews: under-admission until it expires."""
        checks, change = take_op(lease_id, takes)
        lost: list[BaseException] = []

        def landed(current: SlotItem | None) -> bool:
            return current is not None and all(
                current.holders.get(t.cap, {}).get(lease_id) == (t.slots, t.expires_at_ms)
                for t in takes
            )

        async def resend(cause: BaseException) -> None:
            lost.append(cause)
            current = await self.get_slots(entity_id, resource)
            if landed(current):
                assert current is not None
                raise _SlotsLanded(current)

        try:
            return await self._slot_write(entity_id, resource, checks, change, resend)
        except _SlotsLanded as found:
            self.ledger.record("UpdateItem", wcu=write_units(found.current.size))
            return found.current
        except SlotConflict as exc:
            # The first copy landed while its resend was on the way: the resend was refused
            # by the entry the first one wrote.
            if lost and landed(exc.current):
                assert exc.current is not None
                return exc.current
            raise

    async def release_slots(
        self, entity_id: str, resource: str, lease_id: str, slots: Mapping[str, int]
    ) -> bool:
        """Each entry is removed under `attribute_exists`, so a resend after a lost response
        (or a release racing a reaper) subtracts its slots at most once."""
        async def write(checks: Sequence[Check], change: Change) -> None:
            await self._slot_write(entity_id, resource, checks, change, idempotent)

        return await release_each(lease_id, slots, write)

    async def renew_slots(
        self,
        entity_id: str,
        resource: str,
        lease_id: str,
        entries: Mapping[str, tuple[int, int]],
    ) -> bool:
        async def write(checks: Sequence[Check], change: Change) -> None:
            await self._slot_write(entity_id, resource, checks, change, idempotent)

        return await renew_each(lease_id, entries, write)

    async def _slot_write(
        self,
        entity_id: str,
        resource: str,
        checks: Sequence[Check],
        change: Change,
        resend: Any,
    ) -> SlotItem:
        key = slots_key(entity_id, resource)
        request = update_request(self.table_name, key, checks, change)
        try:
            response = await self.table_client.send(
                "update_item", request, RETRYABLE_CODES, resend=resend
            )
        except ConditionCheckFailed as exc:
            raw = exc.item
            current = slots_from_item({**raw, **key}) if raw else None
            if raw is None:
                current = await self.get_slots(entity_id, resource)
            self.ledger.record("UpdateItem", wcu=write_units(current.size if current else 0))
            self.ledger.conflict(resource)
            raise SlotConflict(current) from None
        new = slots_from_item(response["Attributes"])
        self.ledger.record("UpdateItem", wcu=write_units(new.size))
        return new

    async def resource_buckets(self, resource: str) -> list[BucketItem]:
        """Every entity's bucket item of `resource`. A Scan: the table has no index by resource
        (one would cost a write on every acquire to keep), so this is for reports, not the hot
        path."""
        items = await self.scan(
            FilterExpression="#sk = :sk AND begins_with(#pk, :pk)",
            ExpressionAttributeNames={"#pk": schema.PK, "#sk": schema.SK},
            ExpressionAttributeValues={
                ":sk": str_av(schema.bucket_sk(resource)),
                ":pk": str_av(schema.ENTITY_PREFIX),
            },
        )
        return [bucket_from_item(item) for item in items]

    async def list_buckets(self, entity_id: str) -> list[BucketItem]:
        return [bucket_from_item(item) for item in await self.bucket_items(entity_id)]

    async def all_buckets(self) -> list[BucketItem]:
        """Every bucket item of the table (a consistent Scan: migrations and reports)."""
        items = await self.scan(
            FilterExpression="begins_with(#sk, :sk) AND begins_with(#pk, :pk)",
            ExpressionAttributeNames={"#pk": schema.PK, "#sk": schema.SK},
            ExpressionAttributeValues={
                ":sk": str_av(schema.BUCKET_PREFIX),
                ":pk": str_av(schema.ENTITY_PREFIX),
            },
        )
        return [bucket_from_item(item) for item in items]

    async def bucket_items(self, entity_id: str, resource: str | None = None) -> list[Item]:
        """The entity's bucket items (of `resource` only, if given) as stored: low-level form,
        reset limits included; read consistently."""
        if resource is not None:
            item, _ = await self._bucket_item(entity_id, resource)
            return [item] if item else []
        return await self._query_all(
            **prefix_query(schema.entity_pk(entity_id), schema.BUCKET_PREFIX)
        )

    async def reset_bucket(
        self, entity_id: str, resource: str, limit_names: Iterable[str] | None = None
    ) -> bool:
        """Forget bucket state so the limits start full again; consumption counters are kept
        (the aggregator derives usage from them). Returns False when there was no bucket."""
        bucket = await self.get_bucket(entity_id, resource)
        if bucket is None:
            return False
        names = list(bucket.limits) if limit_names is None else list(limit_names)
        if not names:
            return True
        try:
            await self.call(
                "update_item", **state_reset(self.table_name, entity_id, resource, names)
            )
        except ConditionCheckFailed:
            return False  # deleted meanwhile
        self.ledger.record("UpdateItem", wcu=write_units(bucket.size))
        return True

    async def restore_legacy_state(
        self,
        entity_id: str,
        resource: str,
        limit_name: str,
        full_at: int,
        legacy: tuple[int, int],
    ) -> bool:
        """Put one limit back in the 1.x layout (tokens at an anchor), only while it still holds
        exactly `full_at` (rolling back schema 1.2.0; traffic may go on). False when it changed
        meanwhile or the item is gone."""
        key = self.requests.key(entity_id, resource)
        try:
            await self.call(
                "update_item", **legacy_restore(self.table_name, key, limit_name, full_at, legacy)
            )
        except ConditionCheckFailed:
            return False
        self.ledger.record("UpdateItem", wcu=1)
        return True

    # -- entities ---------------------------------------------------------------------------

    async def put_entity(self, entity: Entity) -> None:
        item = entity_item(entity, entity.created_at or now_iso())
        # Tells our own earlier attempt (whose response was lost) from someone else's item.
        item["create_id"] = str_av(secrets.token_urlsafe(9))
        if not await self._put_new(item):
            existing = await self.call(
                "get_item", TableName=self.table_name, ConsistentRead=True, Key=key_of(item)
            )
            if existing.get("Item", {}).get("create_id") != item["create_id"]:
                raise EntityExistsError(entity.id) from None
        self.ledger.record("PutItem", wcu=write_units(item_size(item)))

    async def get_entity(self, entity_id: str) -> Entity | None:
        response = await self.call(
            "get_item",
            TableName=self.table_name,
            Key=item_key(schema.entity_pk(entity_id), schema.META_SK),
            ConsistentRead=True,
        )
        item = response.get("Item")
        self.ledger.record("GetItem", rcu=read_units(item_size(item), consistent=True))
        return entity_from_item(item) if item else None

    async def get_children(self, parent_id: str) -> list[Entity]:
        items = await self._query_all(
            IndexName=schema.GSI1,
            KeyConditionExpression="#pk = :pk",
            ExpressionAttributeNames={"#pk": schema.GSI1PK},
            ExpressionAttributeValues={":pk": str_av(schema.parent_gsi_pk(parent_id))},
            consistent=False,
        )
        return [entity_from_item(item) for item in items]

    async def delete_entity(self, entity_id: str) -> int:
        """Delete every item of the entity (metadata, buckets, limits, usage); returns a count.
        Its audit events are not among them (`AUDIT#<id>` partition): they outlive it."""
        items = await self._query_all(
            KeyConditionExpression="#pk = :pk",
            ExpressionAttributeNames={"#pk": schema.PK},
            ExpressionAttributeValues={":pk": str_av(schema.entity_pk(entity_id))},
            ProjectionExpression="#pk, #sk",
            extra_names={"#sk": schema.SK},
        )
        if not any(item_str(item, schema.SK) == schema.META_SK for item in items):
            raise EntityNotFoundError(entity_id)
        await self._batch_delete([key_of(i) for i in items])
        return len(items)

    # -- stored limits ----------------------------------------------------------------------

    async def set_limits(self, entity_id: str, resource: str, limits: Sequence[Limit]) -> None:
        """Replace the stored limits of (entity, resource) with `limits`."""
        existing = await self._limit_items(entity_id, resource)
        keep = {limit.name for limit in limits}
        stale = [
            key_of(item)
            for item in existing
            if schema.parse_limit_sk(item_str(item, schema.SK) or "")[1] not in keep
        ]
        puts = [limit_item(entity_id, resource, limit) for limit in limits]
        await self.batch_write(puts=puts, deletes=stale)

    async def set_defaults(self, resource: str, limits: Sequence[Limit]) -> None:
        """Replace the default limits of `resource` (`DEFAULT_RESOURCE`: the system level)."""
        existing = await self._defaults_items(resource)
        keep = {limit.name for limit in limits}
        stale = [
            key_of(item)
            for item in existing
            if schema.parse_defaults_sk(item_str(item, schema.SK) or "")[1] not in keep
        ]
        puts = [defaults_item(resource, limit) for limit in limits]
        await self.batch_write(puts=puts, deletes=stale)

    async def get_defaults(self, resource: str) -> list[Limit]:
        return [limit_from_item(item) for item in await self._defaults_items(resource)]

    async def delete_defaults(self, resource: str) -> int:
        items = await self._defaults_items(resource)
        await self._batch_delete([key_of(i) for i in items])
        return len(items)

    async def all_defaults(self) -> dict[str, list[Limit]]:
        """Every default limit by resource, in one Query of `SYSTEM#`."""
        items = await self._query_all(**prefix_query(schema.SYSTEM_PK, schema.DEFAULTS_PREFIX))
        result: dict[str, list[Limit]] = {}
        for item in items:
            resource, _ = schema.parse_defaults_sk(item_str(item, schema.SK) or "")
            result.setdefault(resource, []).append(limit_from_item(item))
        return result

    async def _defaults_items(self, resource: str) -> list[Item]:
        return await self._query_all(
            **prefix_query(schema.SYSTEM_PK, schema.defaults_sk(resource))
        )

    async def get_limits(self, entity_id: str, resource: str) -> list[Limit]:
        return [limit_from_item(item) for item in await self._limit_items(entity_id, resource)]

    async def get_all_limits(self, entity_id: str) -> dict[str, list[Limit]]:
        """Every stored limit of the entity by resource, in one query."""
        items = await self._query_all(
            **prefix_query(schema.entity_pk(entity_id), schema.LIMIT_PREFIX)
        )
        result: dict[str, list[Limit]] = {}
        for item in items:
            resource, _ = schema.parse_limit_sk(item_str(item, schema.SK) or "")
            result.setdefault(resource, []).append(limit_from_item(item))
        return result

    async def delete_limits(self, entity_id: str, resource: str) -> int:
        items = await self._limit_items(entity_id, resource)
        await self._batch_delete([key_of(i) for i in items])
        return len(items)

    async def _limit_items(self, entity_id: str, resource: str) -> list[Item]:
        return await self._query_all(
            **prefix_query(schema.entity_pk(entity_id), schema.limit_sk(resource))
        )

    async def list_stored_limits(self) -> list[StoredLimit]:
        """Every stored limit of the table (a consistent Scan: operator tools and migrations).
        Items this library did not write (a field missing, an invalid limit) are left out."""
        items = await self.scan(
            FilterExpression="begins_with(#sk, :prefix)",
            ExpressionAttributeNames={"#sk": schema.SK},
            ExpressionAttributeValues={":prefix": str_av(schema.LIMIT_PREFIX)},
        )
        found: list[StoredLimit] = []
        for item in items:
            if not all(f in item for f in schema.STORED_LIMIT_FIELDS):
                continue
            if not (item_str(item, schema.PK) or "").startswith(schema.ENTITY_PREFIX):
                continue  # an entity's limits only (no other partition holds `#LIMIT#` keys)
            try:
                limit = limit_from_item(item)
                resource, _ = schema.parse_limit_sk(item_str(item, schema.SK) or "")
            except (ValidationError, ValueError, KeyError, TypeError):
                continue
            found.append(
                StoredLimit(
                    entity_id=schema.entity_id_from_pk(item_str(item, schema.PK) or ""),
                    resource=resource,
                    limit=limit,
                    definition=item_str(item, schema.STORED_LIMIT_DEF),
                )
            )
        return found

    # -- audit events -----------------------------------------------------------------------

    async def put_audit_event(self, event: AuditEvent) -> None:
        """Append an audit event to its entity's hash chain, once: a resend after a lost
        response (or a second call with the same event) never doubles it. An item with the
        event's key that is not this event raises `StorageError("AuditEventExists")`.

        The next sequence number is claimed first, by a PutItem of the chain's head conditional
        on the sequence number read (so concurrent appenders each get their own, retrying up to
        `AUDIT_APPEND_ATTEMPTS` times), then the event is written, conditional on its key being
        new. Nothing here updates or deletes an audit item: the application role's IAM policy
        denies both. Should the event's write fail after the claim, the head names an event the
        partition lacks, which `audit.verify_chain` reports (and `audit.record` logs the event).
        """
        event_key = item_key(schema.audit_pk(event.entity_id), schema.audit_sk(event.event_id))
        lock = self._audit_locks.get(event.entity_id)
        if lock is None:
            lock = self._audit_locks[event.entity_id] = asyncio.Lock()
        async with lock:
            await self._append_audit_event(event, event_key)

    async def _append_audit_event(self, event: AuditEvent, event_key: Item) -> None:
        if await self._audit_event_settled(event, event_key):
            return
        head_key = item_key(schema.audit_pk(event.entity_id), schema.AUDIT_HEAD_SK)
        # Not a retry of one request (those are `TableClient.send`'s, inside each `call`): each
        # attempt reads the head again and claims the sequence number after the one another
        # appender took, so losing a race does not spend the retry policy's sends.
        for attempt in range(AUDIT_APPEND_ATTEMPTS):
            if attempt:
                self.ledger.retried("PutItem")
                await asyncio.sleep(self.retry.delay(attempt))
            response = await self.call(
                "get_item", TableName=self.table_name, ConsistentRead=True,
                Key=head_key,
            )
            head = response.get("Item")
            self.ledger.record("GetItem", rcu=read_units(item_size(head or {}), consistent=True))
            if head is not None and item_str(head, schema.AUDIT_EVENT_ID) == event.event_id:
                # Our own claim landed on an earlier attempt whose answer was lost: the head
                # holds the link, so the event is rebuilt exactly as claimed.
                item = chained_audit_item(
                    event, item_num(head, schema.AUDIT_SEQ) or 0,
                    item_str(head, schema.AUDIT_PREV) or CHAIN_START,
                    item_str(head, schema.AUDIT_PREV_ID))
                if item[schema.AUDIT_HASH] != head.get(schema.AUDIT_HASH):
                    raise StorageError(
                        "AuditEventExists", f"another audit event has the id {event.event_id}")
                await self._write_audit_event(event, item)
                return
            seq = (item_num(head, schema.AUDIT_SEQ) or 0) if head is not None else 0
            prev = (item_str(head, schema.AUDIT_HASH) if head is not None else None) or CHAIN_START
            prev_id = item_str(head, schema.AUDIT_EVENT_ID) if head is not None else None
            item = chained_audit_item(event, seq + 1, prev, prev_id)
            condition: dict[str, Any]
            if head is None:
                condition = {
                    "ConditionExpression": "attribute_not_exists(#pk)",
                    "ExpressionAttributeNames": {"#pk": schema.PK},
                }
            else:
                condition = {
                    "ConditionExpression": "#seq = :seq",
                    "ExpressionAttributeNames": {"#seq": schema.AUDIT_SEQ},
                    "ExpressionAttributeValues": {":seq": num_av(seq)},
                }
            new_head = audit_head(item)
            try:
                await self.call("put_item", TableName=self.table_name, Item=new_head, **condition)
            except ConditionCheckFailed:
                continue  # another appender took this sequence number: read the head again
            self.ledger.record("PutItem", wcu=write_units(item_size(new_head)))
            await self._write_audit_event(event, item)
            return
        raise StorageError(
            "AuditChainContended",
            f"the audit chain of {event.entity_id!r} stayed contended for "
            f"{AUDIT_APPEND_ATTEMPTS} attempts",
        )

    async def _audit_event_settled(self, event: AuditEvent, key: Item) -> bool:
        """True when the event is already stored (an earlier call landed); `AuditEventExists`
        when another event has its key."""
        response = await self.call(
            "get_item", TableName=self.table_name, ConsistentRead=True, Key=key)
        stored = response.get("Item")
        self.ledger.record("GetItem", rcu=read_units(item_size(stored or {}), consistent=True))
        if stored is None:
            return False
        self._check_same_event(event, stored)
        return True

    def _check_same_event(self, event: AuditEvent, stored: Item) -> None:
        if not holds_event(stored, event):
            raise StorageError(
                "AuditEventExists", f"another audit event has the id {event.event_id}")

    async def _write_audit_event(self, event: AuditEvent, item: Item) -> None:
        if await self._put_new(item):
            self.ledger.record("PutItem", wcu=write_units(item_size(item)))
            return
        existing = await self.call(
            "get_item", TableName=self.table_name, ConsistentRead=True, Key=key_of(item)
        )
        self._check_same_event(event, existing.get("Item") or {})  # else our own resend landed

    async def audit_chain_items(self, entity_id: str) -> tuple[list[Item], Item | None]:
        """Every event item of the entity's audit partition, as stored, and the chain's head
        (None when there is none): read consistently, for `audit.verify_chain`."""
        pk = schema.audit_pk(entity_id)
        events = await self._query_all(**prefix_query(pk, schema.audit_sk()))
        response = await self.call(
            "get_item", TableName=self.table_name, ConsistentRead=True,
            Key=item_key(pk, schema.AUDIT_HEAD_SK),
        )
        head = response.get("Item")
        self.ledger.record("GetItem", rcu=read_units(item_size(head or {}), consistent=True))
        return events, head

    async def get_audit_events(
        self,
        entity_id: str,
        limit: int = 100,
        start_event_id: str | None = None,
        *,
        oldest_first: bool = False,
    ) -> list[AuditEvent]:
        """Up to `limit` of the entity's audit events, newest first (`oldest_first`: oldest
        first), starting after `start_event_id` in that order (paging: pass the last id of the
        previous page). Read consistently; events outlive the entity."""
        pk = schema.audit_pk(entity_id)
        args: dict[str, Any] = prefix_query(pk, schema.audit_sk()) | {
            "TableName": self.table_name,
            "ScanIndexForward": oldest_first,
            "ConsistentRead": True,
        }
        start_key: dict[str, Any] | None = None
        if start_event_id is not None:
            start_key = item_key(pk, schema.audit_sk(start_event_id))
        events: list[AuditEvent] = []
        while len(events) < limit:
            page_args = dict(args, Limit=limit - len(events))
            if start_key:
                page_args["ExclusiveStartKey"] = start_key
            response = await self.call("query", **page_args)
            page = response.get("Items", [])
            self.ledger.record(
                "Query", rcu=read_units(sum(item_size(i) for i in page), consistent=True)
            )
            events.extend(audit_event_from_item(item) for item in page)
            start_key = response.get("LastEvaluatedKey")
            if not start_key:
                break
        return events[:limit]

    async def set_stored_limit_definition(
        self, entity_id: str, resource: str, limit: Limit, definition: str | None
    ) -> bool:
        """Set (None: remove) the stored limit's `limit_def` copy, only while the item still
        holds `limit` (a limit replaced or deleted meanwhile must not get a stale copy, nor be
        recreated by the write); False when it does not."""
        request = stored_limit_definition(self.table_name, entity_id, resource, limit, definition)
        try:
            await self.call("update_item", **request)
        except ConditionCheckFailed:
            return False
        self.ledger.record("UpdateItem", wcu=1)
        return True

    # -- usage snapshots --------------------------------------------------------------------

    async def get_usage_snapshots(
        self,
        entity_id: str,
        resource: str | None = None,
        window: str | None = None,
        start: Moment | None = None,
        end: Moment | None = None,
    ) -> list[UsageSnapshot]:
        """The entity's usage snapshots (eventually consistent), oldest window start first, then
        by resource and window (`usage.snapshot_order`); None selects every resource / window.
        ValueError for an unknown window or an unreadable time, before any request."""
        args = usage_query(entity_id, resource, window, start, end)
        items = await self._query_all(consistent=False, **args)
        return sorted((snapshot_from_item(item) for item in items), key=snapshot_order)

    # -- kill switches ----------------------------------------------------------------------

    async def get_switches(self) -> list[Switch]:
        items = await self._query_all(
            KeyConditionExpression="#pk = :pk",
            ExpressionAttributeNames={"#pk": schema.PK},
            ExpressionAttributeValues={":pk": str_av(schema.SWITCH_PK)},
        )
        return [switch_from_item(item) for item in items]

    # Both return the item as it was (ALL_OLD), for the audit event's `previous`. A resend after
    # a lost response applies nothing new but reports the state the first send left.

    async def put_switch(self, switch: Switch) -> str | None:
        item = switch_item(switch)
        response = await self.call(
            "put_item", TableName=self.table_name, Item=item, ReturnValues="ALL_OLD"
        )
        old = response.get("Attributes")
        self.ledger.record("PutItem", wcu=write_units(item_size(old), item_size(item)))
        return item_str(old, schema.SWITCH_STATE) if old else None

    async def delete_switch(self, kind: str, name: str) -> str | None:
        key = item_key(schema.SWITCH_PK, schema.switch_sk(kind, name))
        response = await self.call(
            "delete_item", TableName=self.table_name, Key=key, ReturnValues="ALL_OLD"
        )
        old = response.get("Attributes")
        self.ledger.record("DeleteItem", wcu=write_units(item_size(old)))
        return item_str(old, schema.SWITCH_STATE) if old else None

    # -- version record ---------------------------------------------------------------------

    async def get_version_record(self) -> dict[str, Any] | None:
        response = await self.call(
            "get_item",
            TableName=self.table_name,
            Key=item_key(schema.SYSTEM_PK, schema.VERSION_SK),
            ConsistentRead=True,
        )
        item = response.get("Item")
        self.ledger.record("GetItem", rcu=read_units(item_size(item), consistent=True))
        if not item:
            return None
        return {
            k: next(iter(v.values())) for k, v in item.items() if k not in (schema.PK, schema.SK)
        }

    async def set_version_record(
        self,
        schema_version: str | None = None,
        lambda_version: str | None = None,
        min_client_version: str | None = None,
        updated_by: str = "zae-limiter",
        **extra: str,
    ) -> None:
        """Update the given fields of `SYSTEM#`/`#VERSION` (creating it if needed)."""
        fields = {
            "schema_version": schema_version,
            "lambda_version": lambda_version,
            "min_client_version": min_client_version,
            **extra,
        }
        request = version_update(self.table_name, fields, now_iso(), updated_by)
        await self.call("update_item", **request)
        self.ledger.record("UpdateItem", wcu=1)

    async def create_version_record(
        self, fields: Mapping[str, str], updated_by: str = "zae-limiter"
    ) -> bool:
        """Write `SYSTEM#`/`#VERSION` with `fields` only if the table has no version record
        (one conditional PutItem); False, changing nothing, when it has one."""
        item = version_item(fields, now_iso(), updated_by)
        if not await self._put_new(item):
            return False
        self.ledger.record("PutItem", wcu=write_units(item_size(item)))
        return True

    async def _put_new(self, item: Item) -> bool:
        """Put `item` unless an item with its key exists; False (nothing written) if one does."""
        try:
            await self.call(
                "put_item",
                TableName=self.table_name,
                Item=item,
                ConditionExpression="attribute_not_exists(#pk)",
                ExpressionAttributeNames={"#pk": schema.PK},
            )
        except ConditionCheckFailed:
            return False
        return True

    # -- table ------------------------------------------------------------------------------

    async def table_exists(self) -> bool:
        try:
            await self.call("describe_table", TableName=self.table_name)
        except InfrastructureNotFoundError:
            return False
        return True

    async def create_table(
        self,
        billing_mode: str = "PAY_PER_REQUEST",
        read_capacity: int | None = None,
        write_capacity: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> bool:
        """Create the table from `schema.TABLE` if it is missing, tagged with `tags`, and wait
        until it is ACTIVE; TTL is switched on (also on an existing table whose TTL is off).
        True when this call created the table.

        The one path that creates a table outside Pulumi: provisioning and
        `ops.table.ensure_table` (the CLI's local deploy) both come here.
        """
        created = False
        if not await self.table_exists():
            kwargs = schema.TABLE.create_table_kwargs(
                self.table_name, billing_mode, read_capacity, write_capacity
            )
            if tags:
                kwargs["Tags"] = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
            try:
                await self.call("create_table", **kwargs)
                created = True
            except StorageError as exc:
                if exc.code != _TABLE_IN_USE:
                    raise
                # created concurrently by someone else: the outcome we wanted
            client = await self.client()
            try:
                await client.get_waiter("table_exists").wait(
                    TableName=self.table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
                )
            except botocore.exceptions.WaiterError as exc:
                raise RepositoryUnavailable(
                    f"table {self.table_name} did not become ACTIVE: {exc}", exc
                ) from exc
        await self._ensure_ttl()
        return created

    async def _ensure_ttl(self) -> None:
        response = await self.call("describe_time_to_live", TableName=self.table_name)
        status = response.get("TimeToLiveDescription", {}).get("TimeToLiveStatus")
        if status in ("ENABLED", "ENABLING"):
            return
        try:
            await self.call(
                "update_time_to_live",
                TableName=self.table_name,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": schema.TTL_ATTRIBUTE},
            )
        except StorageError as exc:
            # A concurrent caller enabled it between our describe and update.
            if exc.code != "ValidationException" or "already enabled" not in exc.message:
                raise

    async def delete_table(self) -> bool:
        try:
            await self.call("delete_table", TableName=self.table_name)
        except InfrastructureNotFoundError:
            return False
        return True

    # -- whole-table views and backups (operator tools) -------------------------------------

    async def export_items(self) -> list[Item]:
        """Every item of the table, as stored (a consistent Scan)."""
        return await self.scan()

    async def replace_items(self, items: Sequence[Item]) -> int:
        """Make the table hold exactly `items` (put all, delete the others) but for audit
        partitions: their items are never deleted and never overwritten (a restore must not erase
        the trail of what happened since the export, nor move a chain's head back); those of
        `items` the table lacks are put. Returns how many other items were deleted."""
        current = await self.scan(
            ProjectionExpression="#pk, #sk",
            ExpressionAttributeNames={"#pk": schema.PK, "#sk": schema.SK},
        )
        present = {(i[schema.PK]["S"], i[schema.SK]["S"]) for i in current}
        wanted = {(i[schema.PK]["S"], i[schema.SK]["S"]) for i in items}
        stale = [
            key_of(i)
            for i in current
            if (i[schema.PK]["S"], i[schema.SK]["S"]) not in wanted
            and not schema.is_audit_partition(i[schema.PK]["S"])
        ]
        puts = [
            i for i in items
            if not (schema.is_audit_partition(i[schema.PK]["S"])
                    and (i[schema.PK]["S"], i[schema.SK]["S"]) in present)
        ]
        await self.batch_write(puts=puts, deletes=stale)
        return len(stale)

    async def create_backup(self, name: str) -> Backup:
        """An on-demand backup; characters DynamoDB does not allow in `name` become '-'."""
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:255]
        response = await self.call("create_backup", TableName=self.table_name, BackupName=name)
        return backup_from(response.get("BackupDetails", {}), self.table_name, name)

    async def list_backups(self) -> list[Backup]:
        """The table's on-demand backups, as DynamoDB lists them."""
        found: list[Backup] = []
        start: str | None = None
        while True:
            args: dict[str, Any] = {"TableName": self.table_name}
            if start:
                args["ExclusiveStartBackupArn"] = start
            response = await self.call("list_backups", **args)
            found.extend(backup_from(summary) for summary in response.get("BackupSummaries", []))
            start = response.get("LastEvaluatedBackupArn")
            if not start:
                return found

    # -- helpers ----------------------------------------------------------------------------

    async def query(self, **kwargs: Any) -> list[Item]:
        """Every item of an eventually consistent Query (all pages). Low-level, like `call` and
        `scan`: not part of `Storage`, for DynamoDB-specific tools and tests."""
        kwargs.pop("TableName", None)
        return await self._query_all(consistent=False, **kwargs)

    async def _query_all(
        self, *, consistent: bool = True, extra_names: dict[str, str] | None = None, **kwargs: Any
    ) -> list[Item]:
        if extra_names:
            kwargs["ExpressionAttributeNames"] = kwargs["ExpressionAttributeNames"] | extra_names
        items: list[Item] = []
        start_key: dict[str, Any] | None = None
        while True:
            page_args = dict(kwargs, TableName=self.table_name)
            if consistent:
                page_args["ConsistentRead"] = True
            if start_key:
                page_args["ExclusiveStartKey"] = start_key
            response = await self.call("query", **page_args)
            page = response.get("Items", [])
            items.extend(page)
            self.ledger.record(
                "Query", rcu=read_units(sum(item_size(i) for i in page), consistent=consistent)
            )
            start_key = response.get("LastEvaluatedKey")
            if not start_key:
                return items

    async def scan(self, **kwargs: Any) -> list[Item]:
        """Every item of a strongly consistent Scan (all pages): operator tools only."""
        items: list[Item] = []
        start_key: dict[str, Any] | None = None
        while True:
            page_args = dict(kwargs, TableName=self.table_name, ConsistentRead=True)
            if start_key:
                page_args["ExclusiveStartKey"] = start_key
            response = await self.call("scan", **page_args)
            page = response.get("Items", [])
            items.extend(page)
            self.ledger.record(
                "Scan", rcu=read_units(sum(item_size(i) for i in page), consistent=True)
            )
            start_key = response.get("LastEvaluatedKey")
            if not start_key:
                return items

    async def _batch_delete(self, keys: list[Item]) -> None:
        await self.batch_write(puts=[], deletes=keys)

    async def batch_write(self, puts: list[Item], deletes: list[Item]) -> None:
        """Put and delete whole items in batches of 25, retrying unprocessed ones."""
        requests = [{"PutRequest": {"Item": item}} for item in puts]
        requests += [{"DeleteRequest": {"Key": key}} for key in deletes]
        for start in range(0, len(requests), 25):
            pending = requests[start : start + 25]
            # Rounds, not resends (those are `TableClient.send`'s, inside each `call`): each
            # sends only what the previous round left unprocessed, DynamoDB's way of refusing
            # part of a batch for throughput, so a round that writes some items makes progress.
            for attempt in range(self.retry.max_attempts * 2):
                if not pending:
                    break
                if attempt:
                    self.ledger.retried("batch_write_item")
                    await asyncio.sleep(self.retry.delay(attempt))
                response = await self.call(
                    "batch_write_item", RequestItems={self.table_name: pending}
                )
                done = len(pending)
                pending = response.get("UnprocessedItems", {}).get(self.table_name, [])
                self.ledger.record("BatchWriteItem", wcu=float(done - len(pending)))
            if pending:
                raise RepositoryUnavailable("BatchWriteItem left unprocessed items")


def _implements_storage(repository: Repository) -> Storage:
    """Never called: mypy proves here that `Repository` implements every storage Protocol."""
    return repository


def _implements_slot_storage(repository: Repository) -> SlotStorage:
    """Never called: mypy proves here that `Repository` implements `SlotStorage`."""
    return repository


def _implements_switch_storage(repository: Repository) -> SwitchStorage:
    """Never called: mypy proves here that `Repository` implements `SwitchStorage`."""
    return repository
