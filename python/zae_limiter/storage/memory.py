"""`MemoryStorage`: the storage interface in this process's memory, for tests and trials.

```python
from zae_limiter import Limit, MemoryStorage, RateLimiter

async with RateLimiter(name="test", repository=MemoryStorage()) as limiter:
    async with limiter.acquire("key-1", "chat", [Limit.per_minute("rpm", 2)], {"rpm": 1}):
        ...
```

No network, no table to create, no AWS account: a service's own tests can run its limiter as
it is configured, with the same decisions, errors and leases as against DynamoDB. What holds:

- Every operation is atomic per item, as DynamoDB's are, and a bucket write applies its
  conditions exactly as the DynamoDB request states them
  (`zae_limiter.storage.dynamodb.requests.bucket_update_request`): the same `full_at` bounds,
  create and 1.x-layout conditions, the ring of recent write ids, counters, definitions and
  expiry. A contract suite
  (tests/test_storage_contract.py) runs the same cases against this class and against DynamoDB
  (moto's server) and compares what each holds afterwards.
- Items are kept in DynamoDB's low-level form, so operator views (`bucket_items`, exports,
  backups) look as they would on a table.
- One instance is one table, shared by every limiter given it (`SyncRateLimiter` too: a lock
  keeps each operation whole across threads). Nothing persists past the process.

What it does not do: expire items at their `ttl` (DynamoDB deletes them within days; tests
never wait that long), bill capacity (the ledger counts calls, with units computed as
DynamoDB's), throttle, fail, or run the usage aggregator (snapshots appear only if written).
"""

from __future__ import annotations

import copy
import itertools
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from .. import core, schema
from ..audit import CHAIN_START
from ..core.windows import WINDOWS, format_window_start
from ..exceptions import EntityExistsError, EntityNotFoundError, InfrastructureNotFoundError
from ..models import AuditEvent, Entity, Limit, UsageSnapshot
from ..usage import Moment, check_range, snapshot_order
from .capacity import CapacityLedger, item_size, read_units, write_units
from .dynamodb.codec import (
    audit_event_from_item,
    audit_head,
    bucket_from_item,
    chained_audit_item,
    defaults_item,
    entity_from_item,
    entity_item,
    holds_event,
    item_key,
    item_num,
    item_str,
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
from .dynamodb.requests import may_create
from .dynamodb.slots import (
    Change,
    Check,
    conditions_hold,
    release_each,
    renew_each,
    slots_from_item,
    slots_key,
    take_op,
    updated,
)
from .protocol import (
    Backup,
    BucketItem,
    ConditionFailed,
    Item,
    LimitWrite,
    SlotConflict,
    SlotItem,
    SlotStorage,
    SlotTake,
    Storage,
    StorageError,
    StoredLimit,
    Switch,
    SwitchStorage,
)

__all__ = ["MemoryStorage"]

T = TypeVar("T")
Key = tuple[str, str]


class MemoryStorage:
    """A table in memory implementing the storage interface (`zae_limiter.storage.Storage`):
    `RateLimiter(repository=MemoryStorage())`. It starts as a table of this release's schema,
    with its version record; see the module's docstring for what it mirrors and what not."""

    endpoint_url: str | None = None
    """None: there is no endpoint (the limiter's default deadline is then the one for DynamoDB,
    which memory answers well within)."""

    def __init__(self, table_name: str = "ZAEL-memory") -> None:
        self._table_name = table_name
        self._items: dict[Key, Item] = {}
        self._exists = True
        self._lock = threading.RLock()
        self._backups: list[tuple[Backup, dict[Key, Item]]] = []
        self._ledger = CapacityLedger()
        fields = {
            "schema_version": schema.SCHEMA_VERSION,
            "min_client_version": schema.MIN_CLIENT_VERSION,
        }
        self._put(version_item(fields, now_iso(), "MemoryStorage"))

    # -- the table --------------------------------------------------------------------------

    @property
    def table_name(self) -> str:
        return self._table_name

    @property
    def ledger(self) -> CapacityLedger:
        return self._ledger

    async def open(self) -> None:
        """Nothing to open (the interface's; a DynamoDB client is built here)."""

    async def close(self) -> None:
        """Nothing to close: the items stay, and the instance may be used again."""

    async def table_exists(self) -> bool:
        return self._exists

    async def create_table(
        self,
        billing_mode: str = "PAY_PER_REQUEST",
        read_capacity: int | None = None,
        write_capacity: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> bool:
        with self._lock:
            created, self._exists = not self._exists, True
            return created

    async def delete_table(self) -> bool:
        with self._lock:
            existed, self._exists = self._exists, False
            self._items.clear()
            return existed

    def _run(self, work: Callable[[], T]) -> T:
        """`work` as one atomic operation on the table (which must exist)."""
        with self._lock:
            if not self._exists:
                raise InfrastructureNotFoundError(self._table_name)
            return work()

    def _get(self, key: Key) -> Item | None:
        item = self._items.get(key)
        return None if item is None else copy.deepcopy(item)

    def _put(self, item: Item) -> None:
        self._items[(item[schema.PK]["S"], item[schema.SK]["S"])] = copy.deepcopy(item)

    def _where(self, keep: Callable[[str, str], bool]) -> list[Item]:
        """Copies of the items whose key `keep` accepts, in key order (as a Query reads)."""
        return [copy.deepcopy(self._items[k]) for k in sorted(self._items) if keep(*k)]

    def _read(self, operation: str, items: Iterable[Item | None]) -> None:
        size = sum(item_size(i) for i in items if i)
        self._ledger.record(operation, rcu=read_units(size, consistent=True))

    # -- buckets ----------------------------------------------------------------------------

    @staticmethod
    def _bucket_key(entity_id: str, resource: str) -> Key:
        return schema.entity_pk(entity_id), schema.bucket_sk(resource)

    async def get_bucket(self, entity_id: str, resource: str) -> BucketItem | None:
        item = self._run(lambda: self._get(self._bucket_key(entity_id, resource)))
        self._read("GetItem", [item])
        return bucket_from_item(item) if item else None

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
        """One bucket write, applied whole or not at all, under the conditions DynamoDB is
        sent (`requests.bucket_update_request`); `ConditionFailed` with the item as it is
        when one does not hold. Never lost, never applied twice: memory answers every call."""
        key = self._bucket_key(entity_id, resource)
        write_id = secrets.token_urlsafe(6)

        def apply() -> Item:
            old = self._items.get(key)
            if not _conditions_hold(old or {}, writes, write_id):
                self._ledger.record("UpdateItem", wcu=write_units(item_size(old)))
                self._ledger.conflict(resource)
                raise ConditionFailed(bucket_from_item(copy.deepcopy(old)) if old else None)
            new = _updated(old, key, writes, now_ms, write_id, entity_id, resource, expires_at)
            self._items[key] = new
            self._ledger.record("UpdateItem", wcu=write_units(item_size(old), item_size(new)))
            return copy.deepcopy(new)

        return bucket_from_item(self._run(apply))

    async def extend_bucket_expiry(
        self, entity_id: str, resource: str, expires_at: int, known_size: int = 0
    ) -> bool:
        key = self._bucket_key(entity_id, resource)

        def apply() -> bool:
            item = self._items.get(key)
            before = item_size(item)
            ttl = None if item is None else item_num(item, schema.TTL_ATTRIBUTE)
            if item is None or (ttl is not None and ttl >= expires_at):
                # One UpdateItem either way: a refused condition is billed too.
                self._ledger.record("UpdateItem", wcu=write_units(before))
                return False
            item[schema.TTL_ATTRIBUTE] = num_av(expires_at)
            self._ledger.record("UpdateItem", wcu=write_units(before, item_size(item)))
            return True

        return self._run(apply)

    # -- concurrency caps: the conditions of `dynamodb.slots`, atomic per item ----------------

    async def get_slots(self, entity_id: str, resource: str) -> SlotItem | None:
        k = slots_key(entity_id, resource)
        item = self._run(lambda: self._get((k[schema.PK]["S"], k[schema.SK]["S"])))
        self._read("GetItem", [item])
        return slots_from_item(item) if item else None

    def _slot_write(
        self, entity_id: str, resource: str, checks: Sequence[Check], change: Change
    ) -> SlotItem:
        k = slots_key(entity_id, resource)
        key = (k[schema.PK]["S"], k[schema.SK]["S"])

        def apply() -> Item:
            old = self._items.get(key)
            if not conditions_hold(old or {}, checks):
                self._ledger.record("UpdateItem", wcu=write_units(item_size(old)))
                self._ledger.conflict(resource)
                raise SlotConflict(slots_from_item(copy.deepcopy(old)) if old else None)
            new = updated(old, k, change)
            self._items[key] = copy.deepcopy(new)
            self._ledger.record("UpdateItem", wcu=write_units(item_size(old), item_size(new)))
            return new

        return slots_from_item(self._run(apply))

    async def take_slots(
        self, entity_id: str, resource: str, lease_id: str, takes: Sequence[SlotTake]
    ) -> SlotItem:
        checks, change = take_op(lease_id, takes)
        return self._slot_write(entity_id, resource, checks, change)

    async def release_slots(
        self, entity_id: str, resource: str, lease_id: str, slots: Mapping[str, int]
    ) -> bool:
        async def write(checks: Sequence[Check], change: Change) -> None:
            self._slot_write(entity_id, resource, checks, change)

        return await release_each(lease_id, slots, write)

    async def renew_slots(
        self,
        entity_id: str,
        resource: str,
        lease_id: str,
        entries: Mapping[str, tuple[int, int]],
    ) -> bool:
        async def write(checks: Sequence[Check], change: Change) -> None:
            self._slot_write(entity_id, resource, checks, change)

        return await renew_each(lease_id, entries, write)

    async def resource_buckets(self, resource: str) -> list[BucketItem]:
        sk = schema.bucket_sk(resource)
        items = self._run(
            lambda: self._where(lambda p, s: s == sk and p.startswith(schema.ENTITY_PREFIX))
        )
        self._read("Scan", items)
        return [bucket_from_item(i) for i in items]

    async def list_buckets(self, entity_id: str) -> list[BucketItem]:
        return [bucket_from_item(i) for i in await self.bucket_items(entity_id)]

    async def all_buckets(self) -> list[BucketItem]:
        items = self._run(lambda: self._where(schema.is_bucket_key))
        self._read("Scan", items)
        return [bucket_from_item(i) for i in items]

    async def bucket_items(self, entity_id: str, resource: str | None = None) -> list[Item]:
        pk = schema.entity_pk(entity_id)
        prefix = schema.BUCKET_PREFIX if resource is None else schema.bucket_sk(resource)
        items = self._run(
            lambda: self._where(
                lambda p, s: p == pk and (s.startswith(prefix) if resource is None else s == prefix)
            )
        )
        self._read("Query", items)
        return items

    async def reset_bucket(
        self, entity_id: str, resource: str, limit_names: Sequence[str] | None = None
    ) -> bool:
        key = self._bucket_key(entity_id, resource)

        def apply() -> bool:
            item = self._items.get(key)
            if item is None:
                return False
            names = list(bucket_from_item(item).limits) if limit_names is None else limit_names
            for name in names:
                for state in (
                    schema.FULL_AT, schema.TOKENS, schema.LAST_REFILL, schema.QUOTA_WINDOW
                ):
                    item.pop(schema.limit_attr(state, name), None)
            return True

        return self._run(apply)

    async def restore_legacy_state(
        self,
        entity_id: str,
        resource: str,
        limit_name: str,
        full_at: int,
        legacy: tuple[int, int],
    ) -> bool:
        key = self._bucket_key(entity_id, resource)
        fa = schema.limit_attr(schema.FULL_AT, limit_name)

        def apply() -> bool:
            item = self._items.get(key)
            if item is None or item_num(item, fa) != full_at:
                return False
            del item[fa]
            item[schema.limit_attr(schema.TOKENS, limit_name)] = num_av(legacy[0])
            item[schema.limit_attr(schema.LAST_REFILL, limit_name)] = num_av(legacy[1])
            return True

        return self._run(apply)

    # -- entities ---------------------------------------------------------------------------

    async def put_entity(self, entity: Entity) -> None:
        item = entity_item(entity, entity.created_at or now_iso())

        def apply() -> None:
            if (schema.entity_pk(entity.id), schema.META_SK) in self._items:
                raise EntityExistsError(entity.id)
            self._put(item)
            self._ledger.record("PutItem", wcu=write_units(item_size(item)))

        self._run(apply)

    async def get_entity(self, entity_id: str) -> Entity | None:
        item = self._run(lambda: self._get((schema.entity_pk(entity_id), schema.META_SK)))
        self._read("GetItem", [item])
        return entity_from_item(item) if item else None

    async def get_children(self, parent_id: str) -> list[Entity]:
        gsi = schema.parent_gsi_pk(parent_id)
        items = [
            i for i in self._run(lambda: self._where(lambda p, s: True))
            if item_str(i, schema.GSI1PK) == gsi
        ]  # fmt: skip
        items.sort(key=lambda i: item_str(i, schema.GSI1SK) or "")
        return [entity_from_item(i) for i in items]

    async def delete_entity(self, entity_id: str) -> int:
        pk = schema.entity_pk(entity_id)

        def apply() -> int:
            keys = [k for k in self._items if k[0] == pk]
            if (pk, schema.META_SK) not in self._items:
                raise EntityNotFoundError(entity_id)
            for k in keys:
                del self._items[k]
            return len(keys)

        return self._run(apply)

    # -- stored limits ----------------------------------------------------------------------

    async def set_limits(self, entity_id: str, resource: str, limits: Sequence[Limit]) -> None:
        pk, prefix = schema.entity_pk(entity_id), schema.limit_sk(resource)

        def apply() -> None:
            keep = {limit.name for limit in limits}
            for key in [k for k in self._items if k[0] == pk and k[1].startswith(prefix)]:
                if schema.parse_limit_sk(key[1])[1] not in keep:
                    del self._items[key]
            for limit in limits:
                self._put(limit_item(entity_id, resource, limit))

        self._run(apply)

    def _limit_items(self, entity_id: str, resource: str) -> list[Item]:
        pk, prefix = schema.entity_pk(entity_id), schema.limit_sk(resource)
        return self._run(lambda: self._where(lambda p, s: p == pk and s.startswith(prefix)))

    async def get_limits(self, entity_id: str, resource: str) -> list[Limit]:
        return [limit_from_item(i) for i in self._limit_items(entity_id, resource)]

    async def get_all_limits(self, entity_id: str) -> dict[str, list[Limit]]:
        pk = schema.entity_pk(entity_id)
        items = self._run(
            lambda: self._where(lambda p, s: p == pk and s.startswith(schema.LIMIT_PREFIX))
        )
        found: dict[str, list[Limit]] = {}
        for item in items:
            resource, _ = schema.parse_limit_sk(item[schema.SK]["S"])
            found.setdefault(resource, []).append(limit_from_item(item))
        return found

    async def delete_limits(self, entity_id: str, resource: str) -> int:
        pk, prefix = schema.entity_pk(entity_id), schema.limit_sk(resource)

        def apply() -> int:
            keys = [k for k in self._items if k[0] == pk and k[1].startswith(prefix)]
            for k in keys:
                del self._items[k]
            return len(keys)

        return self._run(apply)

    # -- default limits (resource and system levels) ----------------------------------------

    async def set_defaults(self, resource: str, limits: Sequence[Limit]) -> None:
        prefix = schema.defaults_sk(resource)

        def apply() -> None:
            keep = {limit.name for limit in limits}
            for key in [k for k in self._items if k[0] == schema.SYSTEM_PK
                        and k[1].startswith(prefix)]:
                if schema.parse_defaults_sk(key[1])[1] not in keep:
                    del self._items[key]
            for limit in limits:
                self._put(defaults_item(resource, limit))

        self._run(apply)

    def _defaults_items(self, prefix: str) -> list[Item]:
        return self._run(
            lambda: self._where(lambda p, s: p == schema.SYSTEM_PK and s.startswith(prefix))
        )

    async def get_defaults(self, resource: str) -> list[Limit]:
        return [limit_from_item(i) for i in self._defaults_items(schema.defaults_sk(resource))]

    async def delete_defaults(self, resource: str) -> int:
        prefix = schema.defaults_sk(resource)

        def apply() -> int:
            keys = [k for k in self._items if k[0] == schema.SYSTEM_PK and k[1].startswith(prefix)]
            for k in keys:
                del self._items[k]
            return len(keys)

        return self._run(apply)

    async def all_defaults(self) -> dict[str, list[Limit]]:
        found: dict[str, list[Limit]] = {}
        for item in self._defaults_items(schema.DEFAULTS_PREFIX):
            resource, _ = schema.parse_defaults_sk(item[schema.SK]["S"])
            found.setdefault(resource, []).append(limit_from_item(item))
        return found

    async def list_stored_limits(self) -> list[StoredLimit]:
        items = self._run(lambda: self._where(lambda p, s: p.startswith(schema.ENTITY_PREFIX)
                                              and s.startswith(schema.LIMIT_PREFIX)))
        found: list[StoredLimit] = []
        for item in items:
            if not all(f in item for f in schema.STORED_LIMIT_FIELDS):
                continue
            try:
                limit = limit_from_item(item)
            except (ValueError, KeyError, TypeError):
                continue
            found.append(
                StoredLimit(
                    entity_id=schema.entity_id_from_pk(item[schema.PK]["S"]),
                    resource=schema.parse_limit_sk(item[schema.SK]["S"])[0],
                    limit=limit,
                    definition=item_str(item, schema.STORED_LIMIT_DEF),
                )
            )
        return found

    async def set_stored_limit_definition(
        self, entity_id: str, resource: str, limit: Limit, definition: str | None
    ) -> bool:
        key = (schema.entity_pk(entity_id), schema.limit_sk(resource, limit.name))

        def apply() -> bool:
            item = self._items.get(key)
            if item is None or any(
                item_num(item, f) != getattr(limit, f) for f in schema.STORED_LIMIT_FIELDS
            ):
                return False
            if definition is None:
                item.pop(schema.STORED_LIMIT_DEF, None)
            else:
                item[schema.STORED_LIMIT_DEF] = str_av(definition)
            return True

        return self._run(apply)

    # -- audit events -----------------------------------------------------------------------

    async def put_audit_event(self, event: AuditEvent) -> None:
        """Append the event to its entity's hash chain (as `Repository.put_audit_event` does,
        the head and the event in one step here); a second call with the same event changes
        nothing, another event with its id raises `StorageError("AuditEventExists")`."""
        key = (schema.audit_pk(event.entity_id), schema.audit_sk(event.event_id))
        head_key = (schema.audit_pk(event.entity_id), schema.AUDIT_HEAD_SK)

        def apply() -> None:
            stored = self._items.get(key)
            if stored is not None:
                if not holds_event(stored, event):
                    raise StorageError(
                        "AuditEventExists", f"another audit event has the id {event.event_id}"
                    )
                return
            head = self._items.get(head_key) or {}
            item = chained_audit_item(
                event,
                (item_num(head, schema.AUDIT_SEQ) or 0) + 1,
                item_str(head, schema.AUDIT_HASH) or CHAIN_START,
                item_str(head, schema.AUDIT_EVENT_ID),
            )
            self._put(item)
            self._put(audit_head(item))
            self._ledger.record("PutItem", wcu=write_units(item_size(item)))

        self._run(apply)

    async def audit_chain_items(self, entity_id: str) -> tuple[list[Item], Item | None]:
        """The entity's audit event items as stored and the chain's head (for verifying)."""
        pk, prefix = schema.audit_pk(entity_id), schema.audit_sk()
        events = self._run(lambda: self._where(lambda p, s: p == pk and s.startswith(prefix)))
        return events, self._run(lambda: self._get((pk, schema.AUDIT_HEAD_SK)))

    async def get_audit_events(
        self,
        entity_id: str,
        limit: int = 100,
        start_event_id: str | None = None,
        *,
        oldest_first: bool = False,
    ) -> list[AuditEvent]:
        pk, prefix = schema.audit_pk(entity_id), schema.audit_sk()
        items = self._run(lambda: self._where(lambda p, s: p == pk and s.startswith(prefix)))
        if not oldest_first:
            items.reverse()
        if start_event_id is not None:
            start = schema.audit_sk(start_event_id)
            # After the start in the reading order: later keys oldest first, earlier ones else.
            after: Callable[[str], bool] = (
                (lambda sk: sk > start) if oldest_first else (lambda sk: sk < start)
            )
            items = [i for i in items if after(i[schema.SK]["S"])]
        return [audit_event_from_item(i) for i in items[:limit]]

    # -- usage snapshots --------------------------------------------------------------------

    async def get_usage_snapshots(
        self,
        entity_id: str,
        resource: str | None = None,
        window: str | None = None,
        start: Moment | None = None,
        end: Moment | None = None,
    ) -> list[UsageSnapshot]:
        lo, hi = check_range(window, start, end)
        pk = schema.entity_pk(entity_id)
        items = self._run(
            lambda: self._where(lambda p, s: p == pk and s.startswith(schema.USAGE_PREFIX))
        )
        found: list[UsageSnapshot] = []
        for item in items:
            snap = snapshot_from_item(item)
            if resource is not None and snap.resource != resource:
                continue
            if window is not None and snap.window != window:
                continue
            if snap.window not in WINDOWS:
                continue
            if lo is not None and snap.window_start < format_window_start(snap.window, lo):
                continue
            if hi is not None and snap.window_start > format_window_start(snap.window, hi):
                continue
            found.append(snap)
        return sorted(found, key=snapshot_order)

    # -- version record ---------------------------------------------------------------------

    # -- kill switches ----------------------------------------------------------------------

    async def get_switches(self) -> list[Switch]:
        items = self._run(lambda: self._where(lambda p, s: p == schema.SWITCH_PK))
        self._read("Query", items)
        return [switch_from_item(i) for i in items]

    async def put_switch(self, switch: Switch) -> str | None:
        item = switch_item(switch)

        def apply() -> str | None:
            key = (item[schema.PK]["S"], item[schema.SK]["S"])
            old = self._items.get(key)
            self._put(item)
            self._ledger.record("PutItem", wcu=write_units(item_size(old), item_size(item)))
            return None if old is None else item_str(old, schema.SWITCH_STATE)

        return self._run(apply)

    async def delete_switch(self, kind: str, name: str) -> str | None:
        key = (schema.SWITCH_PK, schema.switch_sk(kind, name))

        def apply() -> str | None:
            old = self._items.pop(key, None)
            self._ledger.record("DeleteItem", wcu=write_units(item_size(old)))
            return None if old is None else item_str(old, schema.SWITCH_STATE)

        return self._run(apply)

    @staticmethod
    def _version_key() -> Key:
        key = schema.version_key()
        return key[schema.PK], key[schema.SK]

    async def get_version_record(self) -> dict[str, Any] | None:
        item = self._run(lambda: self._get(self._version_key()))
        if item is None:
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
        fields = {
            "schema_version": schema_version,
            "lambda_version": lambda_version,
            "min_client_version": min_client_version,
            **extra,
        }

        def apply() -> None:
            key = self._version_key()
            item = self._items.setdefault(key, item_key(*key))
            item.update({k: str_av(v) for k, v in fields.items() if v is not None})
            item["updated_at"] = str_av(now_iso())
            item["updated_by"] = str_av(updated_by)

        self._run(apply)

    async def create_version_record(
        self, fields: Mapping[str, str], updated_by: str = "zae-limiter"
    ) -> bool:
        def apply() -> bool:
            key = self._version_key()
            if key in self._items:
                return False
            self._put(version_item(fields, now_iso(), updated_by))
            return True

        return self._run(apply)

    # -- whole-table views and backups --------------------------------------------------------

    async def export_items(self) -> list[Item]:
        return self._run(lambda: self._where(lambda p, s: True))

    async def replace_items(self, items: Sequence[Item]) -> int:
        def apply() -> int:
            # Audit partitions are only ever added to: a restore keeps the trail since the
            # export and never moves a chain's head back (as `Repository.replace_items`).
            wanted = {(i[schema.PK]["S"], i[schema.SK]["S"]) for i in items}
            stale = [
                k for k in self._items if k not in wanted and not schema.is_audit_partition(k[0])
            ]
            for k in stale:
                del self._items[k]
            for item in items:
                key = (item[schema.PK]["S"], item[schema.SK]["S"])
                if not (schema.is_audit_partition(key[0]) and key in self._items):
                    self._put(item)
            return len(stale)

        return self._run(apply)

    async def create_backup(self, name: str) -> Backup:
        def apply() -> Backup:
            number = len(self._backups) + 1
            backup = Backup(
                id=f"memory:{self._table_name}:{number}",
                name=name,
                table=self._table_name,
                status="AVAILABLE",
                created=now_iso(),
                size_bytes=sum(item_size(i) for i in self._items.values()),
            )
            self._backups.append((backup, copy.deepcopy(self._items)))
            return backup

        return self._run(apply)

    async def list_backups(self) -> list[Backup]:
        with self._lock:
            return [backup for backup, _ in self._backups]


def _conditions_hold(item: Item, writes: Sequence[LimitWrite], write_id: str) -> bool:
    """The ConditionExpression of `requests.bucket_update_request`, evaluated on `item` (an
    absent attribute fails every comparison, as in DynamoDB)."""
    if any(item_str(item, slot) == write_id for slot in schema.WRITE_ID_SLOTS):
        return False
    for w in writes:
        fa = item_num(item, schema.limit_attr(schema.FULL_AT, w.limit_name))
        if w.create or w.legacy is not None:
            if fa is not None:
                return False
            tk = item_num(item, schema.limit_attr(schema.TOKENS, w.limit_name))
            lr = item_num(item, schema.limit_attr(schema.LAST_REFILL, w.limit_name))
            if w.legacy is None and lr is not None:
                return False
            if w.legacy is not None and (tk, lr) != w.legacy:
                return False
        if w.window is not None:
            qw = item_num(item, schema.limit_attr(schema.QUOTA_WINDOW, w.limit_name))
            if w.window_bound is None and qw != w.window:
                return False
            if w.window_bound is not None and qw is not None and qw >= w.window_bound:
                return False
        if w.cond_lo is not None and (fa is None or fa < w.cond_lo):
            return False
        if w.cond_hi is not None and (fa is None or fa > w.cond_hi):
            return False
    return True


def _updated(
    old: Item | None,
    key: Key,
    writes: Sequence[LimitWrite],
    now_ms: int,
    write_id: str,
    entity_id: str,
    resource: str,
    expires_at: int | None,
) -> Item:
    """The item after the UpdateExpression of `requests.bucket_update_request` (every
    right-hand side read from the old item)."""
    before = old or {}
    new: Item = copy.deepcopy(before) | item_key(*key)
    for w in writes:
        fa = schema.limit_attr(schema.FULL_AT, w.limit_name)
        current = item_num(before, fa)
        if w.mode == core.WRITE_ADD:
            new[fa] = num_av((current or 0) + w.value)
        elif w.mode == core.WRITE_RELATIVE:
            if current is None:  # DynamoDB refuses the expression: the condition prevents it
                raise StorageError("ValidationException", "relative write to an absent state")
            new[fa] = num_av(current + w.value)
        else:
            new[fa] = num_av(w.value)
        if w.window is not None and w.window_bound is not None:
            new[schema.limit_attr(schema.QUOTA_WINDOW, w.limit_name)] = num_av(w.window)
        if w.legacy is not None and w.fence is not None:
            new[schema.limit_attr(schema.TOKENS, w.limit_name)] = num_av(w.fence[0])
            new[schema.limit_attr(schema.LAST_REFILL, w.limit_name)] = num_av(w.fence[1])
        if w.delta_milli:
            counter = schema.CONSUMED if w.delta_milli > 0 else schema.RELEASED
            attr = schema.limit_attr(counter, w.limit_name)
            new[attr] = num_av((item_num(before, attr) or 0) + abs(w.delta_milli))
        if w.definition is not None:
            new[schema.limit_attr(schema.LIMIT_DEF, w.limit_name)] = str_av(w.definition)
    new[schema.WRITE_TIME] = num_av(now_ms)
    if may_create(writes):
        new["entity_id"] = str_av(entity_id)
        new["resource"] = str_av(resource)
    if expires_at is not None:
        new[schema.TTL_ATTRIBUTE] = num_av(expires_at)
    slots = schema.WRITE_ID_SLOTS
    new[slots[0]] = str_av(write_id)
    for newer, older in itertools.pairwise(slots):
        new[older] = copy.deepcopy(before.get(newer, str_av("")))
    return new


def _implements_storage(memory: MemoryStorage) -> Storage:
    """Never called: mypy proves here that `MemoryStorage` implements the storage Protocol."""
    return memory


def _implements_slot_storage(memory: MemoryStorage) -> SlotStorage:
    """Never called: mypy proves here that `MemoryStorage` implements `SlotStorage`."""
    return memory


def _implements_switch_storage(memory: MemoryStorage) -> SwitchStorage:
    """Never called: mypy proves here that `MemoryStorage` implements `SwitchStorage`."""
    return memory
