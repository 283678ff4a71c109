"""DynamoDB's low-level item form (`{"S": ...}`, `{"N": ...}`) to and from the library's data:
keys, bucket, entity, limit, version, audit and usage snapshot items, backups as DynamoDB
describes them, the attribute-value helpers every item is built with, and item responses taken
as plain JSON (`plain_item_body`).

Pure: no aioboto3 or botocore, so `MemoryStorage` (which keeps items in the same form) uses it
without loading them.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from ... import schema
from ...audit import chain_hash, event_time_ms
from ...models import AuditEvent, Entity, Limit, UsageSnapshot
from ..capacity import item_size
from ..protocol import Backup, BucketItem, Item, LimitState, Switch

__all__ = [
    "audit_event_from_item",
    "audit_head",
    "audit_item",
    "backup_from",
    "bucket_from_item",
    "chained_audit_item",
    "defaults_item",
    "entity_from_item",
    "entity_item",
    "holds_event",
    "item_key",
    "item_num",
    "item_str",
    "key_of",
    "limit_from_item",
    "limit_item",
    "now_iso",
    "num_av",
    "plain_item_body",
    "snapshot_from_item",
    "str_av",
    "version_item",
]


def str_av(value: str) -> dict[str, Any]:
    """A string attribute value."""
    return {"S": value}


def num_av(value: int) -> dict[str, Any]:
    """A number attribute value."""
    return {"N": str(value)}


def item_str(item: Item, attr: str) -> str | None:
    """The string `item` holds in `attr`; None when it holds none (or another type)."""
    value = item.get(attr)
    return None if value is None or "S" not in value else str(value["S"])


def item_num(item: Item, attr: str) -> int | None:
    """The integer `item` holds in `attr`; None when it holds none (or another type)."""
    value = item.get(attr)
    return None if value is None or "N" not in value else int(value["N"])


def now_iso() -> str:
    """Now as items store times (`created_at`, `updated_at`): UTC, milliseconds, `Z`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def item_key(pk: str, sk: str) -> Item:
    """The key attributes of the item `pk`/`sk`."""
    return {schema.PK: str_av(pk), schema.SK: str_av(sk)}


def key_of(item: Item) -> Item:
    """`item`'s key attributes (a Key, a DeleteRequest's)."""
    return {schema.PK: item[schema.PK], schema.SK: item[schema.SK]}


# -- buckets, entities, stored limits, the version record ----------------------------------------

# Attribute names repeat in every bucket item: parse each once.
_limit_attr = functools.lru_cache(maxsize=4096)(schema.parse_limit_attr)


def bucket_from_item(item: Item, size: int | None = None) -> BucketItem:
    """The bucket of a bucket item; `size` is the item's size if the caller has it already."""
    fields: dict[str, dict[str, Any]] = {}
    for attr, value in item.items():
        parsed = _limit_attr(attr)
        if parsed is not None:
            fields.setdefault(parsed[1], {})[parsed[0]] = value
    limits: dict[str, LimitState] = {}
    for limit_name, attrs in fields.items():
        full_at = attrs.get(schema.FULL_AT)
        legacy: tuple[int, int] | None = None
        if full_at is None:
            if schema.TOKENS not in attrs or schema.LAST_REFILL not in attrs:
                continue  # reset limit: counters survive, state does not; the bucket is full
            legacy = int(attrs[schema.TOKENS]["N"]), int(attrs[schema.LAST_REFILL]["N"])
        definition = attrs.get(schema.LIMIT_DEF)
        window = attrs.get(schema.QUOTA_WINDOW)
        limits[limit_name] = LimitState(
            full_at=None if full_at is None else int(full_at["N"]),
            consumed_milli=int(attrs.get(schema.CONSUMED, {"N": "0"})["N"]),
            released_milli=int(attrs.get(schema.RELEASED, {"N": "0"})["N"]),
            definition=None if definition is None else str(definition["S"]),
            legacy=legacy,
            window=None if window is None else int(window["N"]),
        )
    pk = item_str(item, schema.PK) or ""
    sk = item_str(item, schema.SK) or ""
    return BucketItem(
        entity_id=schema.entity_id_from_pk(pk),
        resource=schema.resource_from_bucket_sk(sk),
        limits=limits,
        write_time_ms=item_num(item, schema.WRITE_TIME),
        write_ids=tuple(w for w in (item_str(item, s) for s in schema.WRITE_ID_SLOTS) if w),
        size=item_size(item) if size is None else size,
        expires_at=item_num(item, schema.TTL_ATTRIBUTE),
    )


def entity_item(entity: Entity, created_at: str) -> Item:
    """The item of an entity (`ENTITY#<id>` / `#META`), created at `created_at`."""
    item: Item = item_key(schema.entity_pk(entity.id), schema.META_SK) | {
        "entity_id": str_av(entity.id),
        "metadata": {"M": {k: str_av(v) for k, v in entity.metadata.items()}},
        "created_at": str_av(created_at),
    }
    if entity.name is not None:
        item["name"] = str_av(entity.name)
    if entity.parent_id is not None:
        item["parent_id"] = str_av(entity.parent_id)
        item[schema.GSI1PK] = str_av(schema.parent_gsi_pk(entity.parent_id))
        item[schema.GSI1SK] = str_av(schema.child_gsi_sk(entity.id))
    return item


def entity_from_item(item: Item) -> Entity:
    metadata_av = item.get("metadata", {}).get("M", {})
    return Entity(
        id=item_str(item, "entity_id") or schema.entity_id_from_pk(item_str(item, schema.PK) or ""),
        name=item_str(item, "name"),
        parent_id=item_str(item, "parent_id"),
        metadata={k: str(v.get("S", "")) for k, v in metadata_av.items()},
        created_at=item_str(item, "created_at"),
    )


def limit_item(entity_id: str, resource: str, limit: Limit) -> Item:
    """The item of a stored limit of (entity, resource)."""
    return item_key(schema.entity_pk(entity_id), schema.limit_sk(resource, limit.name)) | {
        "entity_id": str_av(entity_id),
        "resource": str_av(resource),
        "limit_name": str_av(limit.name),
        "capacity": num_av(limit.capacity),
        "burst": num_av(limit.burst),
        "refill_amount": num_av(limit.refill_amount),
        "refill_period_seconds": num_av(limit.refill_period_seconds),
    } | _plan_attributes(limit)


def defaults_item(resource: str, limit: Limit) -> Item:
    """The item of a default limit of `resource` (`DEFAULT_RESOURCE`: the system level): a
    stored limit's attributes but the entity's, in the `SYSTEM#` partition."""
    return item_key(schema.SYSTEM_PK, schema.defaults_sk(resource, limit.name)) | {
        "resource": str_av(resource),
        "limit_name": str_av(limit.name),
        "capacity": num_av(limit.capacity),
        "burst": num_av(limit.burst),
        "refill_amount": num_av(limit.refill_amount),
        "refill_period_seconds": num_av(limit.refill_period_seconds),
    } | _plan_attributes(limit)


def _plan_attributes(limit: Limit) -> Item:
    """A plan limit's settings beyond the five numbers (only those set: a plain hard token
    bucket's item is 0.2.0's)."""
    extra: Item = {}
    for key, value in limit.to_dict().items():
        if key in _LIMIT_NUMBERS or key == "name":
            continue
        if isinstance(value, bool):
            extra[key] = {"BOOL": value}
        elif isinstance(value, int):
            extra[key] = num_av(value)
        else:
            extra[key] = str_av(str(value))
    return extra


_LIMIT_NUMBERS = ("capacity", "burst", "refill_amount", "refill_period_seconds")


def limit_from_item(item: Item) -> Limit:
    data: dict[str, Any] = {
        "name": item_str(item, "limit_name")
        or schema.parse_limit_sk(item_str(item, schema.SK) or "")[1],
    }
    for key in _LIMIT_NUMBERS:
        data[key] = item_num(item, key) or 0
    if item.get("soft", {}).get("BOOL"):
        data["soft"] = True
    for key in ("kind", "cron", "tz"):
        if (text := item_str(item, key)) is not None:
            data[key] = text
    for key in ("reset_after_seconds", "lease_ttl_seconds"):
        if (number := item_num(item, key)) is not None:
            data[key] = number
    return Limit.from_dict(data)


def version_item(fields: Mapping[str, str], updated_at: str, updated_by: str) -> Item:
    """The version record (`SYSTEM#`/`#VERSION`) holding `fields`, stamped as updated."""
    return (
        item_key(schema.SYSTEM_PK, schema.VERSION_SK)
        | {k: str_av(v) for k, v in fields.items()}
        | {"updated_at": str_av(updated_at), "updated_by": str_av(updated_by)}
    )


# -- audit events ------------------------------------------------------------------------------


def switch_item(switch: Switch) -> Item:
    item = item_key(schema.SWITCH_PK, schema.switch_sk(switch.kind, switch.name))
    item[schema.SWITCH_STATE] = str_av(switch.state)
    if switch.principal is not None:
        item[schema.SWITCH_PRINCIPAL] = str_av(switch.principal)
    if switch.changed_at is not None:
        item[schema.SWITCH_CHANGED_AT] = str_av(switch.changed_at)
    return item


def switch_from_item(item: Item) -> Switch:
    kind, name = schema.parse_switch_sk(item_str(item, schema.SK) or "")
    return Switch(
        kind,
        name,
        item_str(item, schema.SWITCH_STATE) or "",
        item_str(item, schema.SWITCH_PRINCIPAL),
        item_str(item, schema.SWITCH_CHANGED_AT),
    )


def _to_av(value: Any) -> dict[str, Any]:
    """A JSON-like value (an audit event's details) as an AttributeValue."""
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, int | float | Decimal):
        return {"N": str(value)}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, Mapping):
        return {"M": {str(k): _to_av(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"L": [_to_av(v) for v in value]}
    return {"S": str(value)}


def _from_av(av: Mapping[str, Any]) -> Any:
    if "S" in av:
        return str(av["S"])
    if "N" in av:
        text = str(av["N"])
        return int(text) if re.fullmatch(r"-?[0-9]+", text) else float(text)
    if "BOOL" in av:
        return bool(av["BOOL"])
    if "M" in av:
        return {str(k): _from_av(v) for k, v in av["M"].items()}
    if "L" in av:
        return [_from_av(v) for v in av["L"]]
    return None  # NULL, and binary or set types this library never writes


def audit_item(event: AuditEvent) -> Item:
    """The item of an audit event: `AUDIT#<entity>` / `#AUDIT#<event id>`, expiring 90 days after
    the event (`schema.audit_ttl` of the id's millisecond)."""
    item: Item = {
        schema.PK: str_av(schema.audit_pk(event.entity_id)),
        schema.SK: str_av(schema.audit_sk(event.event_id)),
        schema.AUDIT_EVENT_ID: str_av(event.event_id),
        schema.AUDIT_TIMESTAMP: str_av(event.timestamp),
        schema.AUDIT_ACTION: str_av(event.action),
        schema.AUDIT_ENTITY_ID: str_av(event.entity_id),
        schema.AUDIT_DETAILS: _to_av(dict(event.details)),
        schema.TTL_ATTRIBUTE: num_av(schema.audit_ttl(event_time_ms(event.event_id))),
    }
    if event.principal is not None:
        item[schema.AUDIT_PRINCIPAL] = str_av(event.principal)
    if event.resource is not None:
        item[schema.AUDIT_RESOURCE] = str_av(event.resource)
    return item


def holds_event(item: Item, event: AuditEvent) -> bool:
    """Whether the audit item `item` (under `event`'s key) is `event`: the same action, time and
    entity (any other item under its key is another event with the same id)."""
    mine = audit_item(event)
    same = (schema.AUDIT_ACTION, schema.AUDIT_TIMESTAMP, schema.AUDIT_ENTITY_ID)
    return all(item.get(attr) == mine[attr] for attr in same)


def chained_audit_item(event: AuditEvent, seq: int, prev: str, prev_id: str | None) -> Item:
    """`audit_item` as the `seq`-th link of the entity's chain after the event `prev_id` (None
    for the first) whose hash is `prev`; `h` is the hash of all of it (`audit.chain_hash`)."""
    item = audit_item(event)
    item[schema.AUDIT_SEQ] = num_av(seq)
    item[schema.AUDIT_PREV] = str_av(prev)
    if prev_id is not None:
        item[schema.AUDIT_PREV_ID] = str_av(prev_id)
    item[schema.AUDIT_HASH] = str_av(chain_hash(item))
    return item


def audit_head(item: Item) -> Item:
    """The head item naming the event `item` as the last of its entity's chain."""
    head: Item = {schema.PK: item[schema.PK], schema.SK: str_av(schema.AUDIT_HEAD_SK)}
    for attr in (schema.AUDIT_SEQ, schema.AUDIT_HASH, schema.AUDIT_EVENT_ID, schema.AUDIT_PREV,
                 schema.AUDIT_PREV_ID):
        if attr in item:
            head[attr] = item[attr]
    return head


def audit_event_from_item(item: Item) -> AuditEvent:
    """The event of an audit item (also of one written by 0.2.0, whose fields sit in `data`)."""
    fields: Mapping[str, Any] = item
    nested = item.get("data", {}).get("M")
    if isinstance(nested, Mapping) and schema.AUDIT_ACTION in nested:
        fields = nested
    values = {k: _from_av(v) for k, v in fields.items() if isinstance(v, Mapping)}
    sk = item_str(item, schema.SK) or ""
    details = values.get(schema.AUDIT_DETAILS)
    return AuditEvent(
        event_id=str(values.get(schema.AUDIT_EVENT_ID) or schema.event_id_from_audit_sk(sk)),
        timestamp=str(values.get(schema.AUDIT_TIMESTAMP) or ""),
        action=str(values.get(schema.AUDIT_ACTION) or ""),
        entity_id=str(values.get(schema.AUDIT_ENTITY_ID) or ""),
        principal=values.get(schema.AUDIT_PRINCIPAL),
        resource=values.get(schema.AUDIT_RESOURCE),
        details=details if isinstance(details, dict) else {},
    )


# -- usage snapshots and backups ---------------------------------------------------------------


def _tokens(value: Mapping[str, Any]) -> int:
    # Counters are exact decimals (millitoken precision); the model holds whole tokens.
    return int(Decimal(str(value["N"])).to_integral_value(rounding=ROUND_HALF_EVEN))


def snapshot_from_item(item: Mapping[str, Any]) -> UsageSnapshot:
    """A `UsageSnapshot` from a snapshot item (low-level form); ValueError if it is not one."""
    try:
        resource, window, window_start = schema.parse_usage_sk(item[schema.SK]["S"])
        entity_id = schema.entity_id_from_pk(item[schema.PK]["S"])
        counters = {
            str(limit): _tokens(value)
            for limit, value in item.get(schema.SNAPSHOT_COUNTERS, {}).get("M", {}).items()
        }
        updated = item.get(schema.SNAPSHOT_UPDATED_AT, {}).get("S")
    except (KeyError, TypeError, AttributeError, ArithmeticError) as exc:
        raise ValueError(f"not a usage snapshot item: {exc!r}") from None
    return UsageSnapshot(
        entity_id=entity_id,
        resource=resource,
        window=window,
        window_start=window_start,
        counters=dict(sorted(counters.items())),
        updated_at=updated,
    )


def _iso_time(value: object) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _size(value: object) -> int | None:
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else None


def backup_from(
    description: Mapping[str, Any], table: str | None = None, name: str | None = None
) -> Backup:
    """A `Backup` from DynamoDB's description of one (`BackupDetails`, or a `BackupSummary` of
    ListBackups); `table` and `name` stand for what it does not say."""
    return Backup(
        id=description.get("BackupArn"),
        name=description.get("BackupName", name),
        table=description.get("TableName", table),
        status=description.get("BackupStatus"),
        created=_iso_time(description.get("BackupCreationDateTime")),
        size_bytes=_size(description.get("BackupSizeBytes")),
    )


# -- item responses taken as plain JSON ----------------------------------------------------------

# Outputs whose plain JSON *is* botocore's parse when every attribute value is plain (below): the
# item reads and writes, with the item and the consumed capacity (which moto's server returns
# unasked). Their other members are left to botocore.
_PLAIN_OUTPUTS: Mapping[str, tuple[str, frozenset[str]]] = {
    "GetItemOutput": ("Item", frozenset({"Item", "ConsumedCapacity"})),
    "UpdateItemOutput": ("Attributes", frozenset({"Attributes", "ConsumedCapacity"})),
}
# Attribute-value tags botocore returns exactly as JSON has them; B and BS it decodes (base64).
_PLAIN_TAGS = frozenset({"S", "N", "SS", "NS", "M", "L", "NULL", "BOOL"})
# Tokens after which the JSON may not be botocore's parse: a binary value, a null (dropped).
_NOT_PLAIN = re.compile(rb'"BS?"|null')
# ConsumedCapacity's members: botocore keeps JSON's numbers and strings as they are.
_CAPACITY_NUMBERS = frozenset({"CapacityUnits", "ReadCapacityUnits", "WriteCapacityUnits"})
_CAPACITY_INDEXES = frozenset({"LocalSecondaryIndexes", "GlobalSecondaryIndexes"})


def _plain_values(values: Iterable[Any]) -> bool:
    """True when every attribute value is a JSON object of plain tags only (lists and maps of
    plain values included), so that botocore's parse of it would be the JSON unchanged."""
    for value in values:
        if type(value) is not dict or not value.keys() <= _PLAIN_TAGS:
            return False
        nested = value.get("M")
        if nested is not None and (type(nested) is not dict or not _plain_values(nested.values())):
            return False
        nested = value.get("L")
        if nested is not None and (type(nested) is not list or not _plain_values(nested)):
            return False
    return True


def _plain_units(value: Any) -> bool:
    """A `Capacity` structure of numbers only."""
    return type(value) is dict and all(
        key in _CAPACITY_NUMBERS and type(units) in (int, float) for key, units in value.items()
    )


def _plain_capacity(value: Any) -> bool:
    """A ConsumedCapacity whose members are all known and of their type (botocore's parse
    drops an unknown member)."""
    if type(value) is not dict:
        return False
    for key, member in value.items():
        if key == "TableName":
            if type(member) is not str:
                return False
        elif key == "Table":
            if not _plain_units(member):
                return False
        elif key in _CAPACITY_INDEXES:
            if type(member) is not dict or not all(
                _plain_units(units) for units in member.values()
            ):
                return False
        elif key not in _CAPACITY_NUMBERS or type(member) not in (int, float):
            return False
    return True


def plain_item_body(raw_body: bytes, output: str) -> dict[str, Any] | None:
    """The parse of a GetItem or UpdateItem response body when it is the JSON itself (a plain
    item: the bucket items and every item this library writes), else None (botocore parses).

    botocore's parse walks the service model for every attribute value of the item, and for an
    item of strings and numbers returns what `json.loads` does (the model is the check: an
    unknown member or a null would be dropped, a binary decoded; any of them, and any other
    member of the output, is left to botocore)."""
    spec = _PLAIN_OUTPUTS.get(output)
    if spec is None or not raw_body or _NOT_PLAIN.search(raw_body) is not None:
        return None
    try:
        parsed = json.loads(raw_body.decode("utf-8"))
    except ValueError:
        return None
    item_member, members = spec
    if type(parsed) is not dict or not parsed.keys() <= members:
        return None
    item = parsed.get(item_member)
    if item is not None and (type(item) is not dict or not _plain_values(item.values())):
        return None
    capacity = parsed.get("ConsumedCapacity")
    if capacity is not None and not _plain_capacity(capacity):
        return None
    return parsed
