"""The one definition of the table: names, keys, item attributes and the table itself.

Every key format lives here and nowhere else. The library, the aggregator, the local provisioner
and the Pulumi program all read this module, so it imports nothing but the standard library
(the aggregator runs in a bare Lambda runtime).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Final

from .core.units import MS_PER_SECOND
from .core.windows import WINDOWS

SCHEMA_VERSION: Final = "1.2.0"
# The oldest client that understands the schema a table is created with (1.2.0: `fa#` states,
# read since 1.1.0); older ones would take a state they cannot read for a full bucket. A new
# table's version record says so.
MIN_CLIENT_VERSION: Final = "1.1.0"

TABLE_PREFIX: Final = "ZAEL-"

PK: Final = "PK"
SK: Final = "SK"
GSI1: Final = "GSI1"
GSI1PK: Final = "GSI1PK"
GSI1SK: Final = "GSI1SK"
TTL_ATTRIBUTE: Final = "ttl"
STREAM_VIEW_TYPE: Final = "NEW_AND_OLD_IMAGES"

ENTITY_PREFIX: Final = "ENTITY#"
META_SK: Final = "#META"
BUCKET_PREFIX: Final = "#BUCKET#"
LIMIT_PREFIX: Final = "#LIMIT#"
USAGE_PREFIX: Final = "#USAGE#"
SYSTEM_PK: Final = "SYSTEM#"
VERSION_SK: Final = "#VERSION"
# Resource and system default limits (docs/limits.md "Where limits come from"): in the `SYSTEM#`
# partition, `#DEFAULTS#<resource>#<limit>`, the system level under the resource `_default_`
# (no user resource can be named so). One partition, apart from every `ENTITY#` one: no entity
# Query or `#LIMIT#` scan meets them, and one Query per level reads a resource's defaults.
DEFAULTS_PREFIX: Final = "#DEFAULTS#"
PARENT_PREFIX: Final = "PARENT#"
CHILD_PREFIX: Final = "CHILD#"
# Audit events live in a partition of their own per entity (`AUDIT#<id>`), not in the entity's
# `ENTITY#<id>` partition: every read of an entity's items (metadata, buckets, limits, usage) and
# `delete_entity`'s cleanup never meet them, and the trail outlives the entity (0.2.0's layout).
AUDIT_PK_PREFIX: Final = "AUDIT#"
AUDIT_PREFIX: Final = "#AUDIT#"
# The head of an entity's hash chain of events: the last sequence number and hash appended. Its
# key sits outside `#AUDIT#` so that no Query of the events (begins_with #AUDIT#) meets it.
AUDIT_HEAD_SK: Final = "#HEAD"
# The audit ids of changes to the default limits (0.17's): `$SYSTEM` for the system level,
# `$RESOURCE:<resource>` for a resource's. "$" cannot start an entity id, so neither collides
# with an entity's trail; each has its own partition and hash chain like an entity.
SYSTEM_AUDIT_ID: Final = "$SYSTEM"
RESOURCE_AUDIT_PREFIX: Final = "$RESOURCE:"

# The resource that holds an entity's fallback limits. It starts with "_" on purpose, so it
# cannot collide with any user-chosen resource name (those must start with a letter).
DEFAULT_RESOURCE: Final = "_default_"
SEP: Final = "#"

# Bucket item: one item per (entity, resource) holding every limit, so that a warm acquire of any
# number of limits is a single conditional UpdateItem. Per-limit attribute names are
# "<field>#<limit>"; limit names never contain "#", so the split is unambiguous.
FULL_AT: Final = "fa"
CONSUMED: Final = "cn"
RELEASED: Final = "rl"
LIMIT_DEF: Final = "lm"
# The 1.x layout's state (schema < 1.2.0): tokens at an anchor. Read to convert it, and left as
# a fence that 1.x clients read as exhausted (`zae_limiter.stored`).
TOKENS: Final = "tk"
LAST_REFILL: Final = "lr"
# A quota's window (docs/design.md "Quotas"): the epoch ms at which the window its `fa#` counts
# consumption in opened. Its `fa#` then holds the millitokens used in that window, not an instant.
QUOTA_WINDOW: Final = "qw"
BUCKET_FIELDS: Final = (FULL_AT, CONSUMED, RELEASED, LIMIT_DEF, TOKENS, LAST_REFILL, QUOTA_WINDOW)
WRITE_TIME: Final = "ts"
# Stored-limit items (schema >= 1.1.0): the limit in the bucket item's `lm#` encoding.
STORED_LIMIT_DEF: Final = "limit_def"
# The numbers of a stored limit's item (`#LIMIT#` rows), as `Limit` names them.
STORED_LIMIT_FIELDS: Final = ("capacity", "burst", "refill_amount", "refill_period_seconds")
WRITE_ID_SLOTS: Final = ("w0", "w1", "w2", "w3")
# Concurrency caps (`Limit.concurrency`): one item per (entity, resource), `#SLOTS#<resource>`
# in the entity's partition, apart from the bucket item (its writes are not relative token
# writes, and the aggregator, which folds `#BUCKET#` items, never meets it). Per cap
# `sh#<cap>` counts the slots held and `sl#<cap>#<lease id>` holds one lease's entry,
# "<slots>:<expires_at ms>"; every write keeps `sh` equal to the sum of the entries
# (docs/design.md, "Concurrency caps").
SLOTS_PREFIX: Final = "#SLOTS#"
SLOTS_HELD: Final = "sh"
SLOT_ENTRY: Final = "sl"
# Audit event items: one per event, written once (never updated), expiring through the table's
# TTL attribute (`TTL_ATTRIBUTE`, shared with the usage snapshots) 90 days after the event.
AUDIT_EVENT_ID: Final = "event_id"
AUDIT_TIMESTAMP: Final = "timestamp"
AUDIT_ACTION: Final = "action"
AUDIT_ENTITY_ID: Final = "entity_id"
AUDIT_PRINCIPAL: Final = "principal"
AUDIT_RESOURCE: Final = "resource"
AUDIT_DETAILS: Final = "details"
AUDIT_TTL_SECONDS: Final = 90 * 86400
# The hash chain (events written since the chain was introduced; older ones lack all four):
# `seq` counts the entity's events from 1, `prev` is the previous event's `h` (64 zeros for the
# first), `prev_id` the previous event's id (absent for the first), `h` the SHA-256 of the item's
# other attributes (`zae_limiter.audit.chain_hash`). The head item holds `seq`, `h`, `event_id`,
# `prev` and `prev_id` of the last event appended.
AUDIT_SEQ: Final = "seq"
AUDIT_PREV: Final = "prev"
AUDIT_PREV_ID: Final = "prev_id"
AUDIT_HASH: Final = "h"

# Kill switches (docs/limits.md, "Kill switch"): one item per switched resource or entity, all in
# the one partition `SWITCH#`, SK `#RESOURCE#<name>` or `#ENTITY#<id>`, holding its state
# ("disabled" or "bypass"). A limiter reads every switch with one Query per cache TTL, however
# many resources and entities it serves; no item means the switch is clear. Apart from the
# entities' partitions: a resource has none, and an entity may be switched before (or without)
# being created. The aggregator's filters never match it.
SWITCH_PK: Final = "SWITCH#"
SWITCH_KINDS: Final = ("resource", "entity")
SWITCH_STATE: Final = "state"
SWITCH_PRINCIPAL: Final = "principal"
SWITCH_CHANGED_AT: Final = "changed_at"
SWITCH_DISABLED: Final = "disabled"
SWITCH_BYPASS: Final = "bypass"
SWITCH_STATES: Final = (SWITCH_DISABLED, SWITCH_BYPASS)
# The audit trail of resource switches (a resource has no trail of its own): an id no entity can
# have, as entity ids start with a letter or digit.

# Usage snapshot items (written by the aggregator, read by storage): per window and resource,
# `counters` maps each limit to its net tokens (consumed - released), `consumed` and `released`
# the two parts, `spans` the counter intervals folded (the aggregator's idempotency state), `v`
# the version its conditional writes race on.
SNAPSHOT_ENTITY_ID: Final = "entity_id"
SNAPSHOT_RESOURCE: Final = "resource"
SNAPSHOT_WINDOW: Final = "window"
SNAPSHOT_WINDOW_START: Final = "window_start"
SNAPSHOT_COUNTERS: Final = "counters"
SNAPSHOT_CONSUMED: Final = "consumed"
SNAPSHOT_RELEASED: Final = "released"
SNAPSHOT_SPANS: Final = "spans"
SNAPSHOT_VERSION: Final = "v"
SNAPSHOT_UPDATED_AT: Final = "updated_at"

def table_name(name: str) -> str:
    """`name="my-app"` means table `ZAEL-my-app`; a name that already has the prefix is kept."""
    return name if name.startswith(TABLE_PREFIX) else f"{TABLE_PREFIX}{name}"


def stack_name(name: str) -> str:
    return table_name(name)


def short_name(table: str) -> str:
    return table[len(TABLE_PREFIX) :] if table.startswith(TABLE_PREFIX) else table


def aggregator_function_name(name: str) -> str:
    return f"{table_name(name)}-aggregator"


def aggregator_dlq_name(name: str) -> str:
    return f"{table_name(name)}-aggregator-dlq"


def entity_pk(entity_id: str) -> str:
    return f"{ENTITY_PREFIX}{entity_id}"


def entity_id_from_pk(pk: str) -> str:
    if not pk.startswith(ENTITY_PREFIX):
        raise ValueError(f"not an entity key: {pk!r}")
    return pk[len(ENTITY_PREFIX) :]


def bucket_sk(resource: str) -> str:
    return f"{BUCKET_PREFIX}{resource}"


def resource_from_bucket_sk(sk: str) -> str:
    if not sk.startswith(BUCKET_PREFIX):
        raise ValueError(f"not a bucket key: {sk!r}")
    return sk[len(BUCKET_PREFIX) :]


def limit_sk(resource: str, limit_name: str | None = None) -> str:
    """Stored limit key; without a limit name, the prefix of every limit of the resource."""
    if limit_name is None:
        return f"{LIMIT_PREFIX}{resource}{SEP}"
    return f"{LIMIT_PREFIX}{resource}{SEP}{limit_name}"


def parse_limit_sk(sk: str) -> tuple[str, str]:
    """(resource, limit_name) of a stored-limit key. Resources may not contain '#'."""
    if not sk.startswith(LIMIT_PREFIX):
        raise ValueError(f"not a limit key: {sk!r}")
    resource, _, limit_name = sk[len(LIMIT_PREFIX) :].partition(SEP)
    return resource, limit_name


def defaults_sk(resource: str, limit_name: str | None = None) -> str:
    """A default limit's key in the `SYSTEM#` partition (the system level: `DEFAULT_RESOURCE`);
    without a limit name, the prefix of every default limit of the resource."""
    if limit_name is None:
        return f"{DEFAULTS_PREFIX}{resource}{SEP}"
    return f"{DEFAULTS_PREFIX}{resource}{SEP}{limit_name}"


def parse_defaults_sk(sk: str) -> tuple[str, str]:
    """(resource, limit_name) of a default limit's key."""
    if not sk.startswith(DEFAULTS_PREFIX):
        raise ValueError(f"not a defaults key: {sk!r}")
    resource, _, limit_name = sk[len(DEFAULTS_PREFIX) :].partition(SEP)
    return resource, limit_name


def resource_audit_id(resource: str) -> str:
    """The audit trail of a resource: its default limits and its kill switch."""
    return f"{RESOURCE_AUDIT_PREFIX}{resource}"


def defaults_audit_id(resource: str) -> str:
    """The audit id of changes to `resource`'s default limits (`DEFAULT_RESOURCE`: the system
    level's)."""
    return SYSTEM_AUDIT_ID if resource == DEFAULT_RESOURCE else resource_audit_id(resource)


def usage_sk(
    resource: str | None = None, window: str | None = None, start: str | None = None
) -> str:
    """Usage snapshot key, or a prefix of it when trailing parts are omitted."""
    sk = USAGE_PREFIX
    if resource is None:
        return sk
    sk += f"{resource}{SEP}"
    if window is None:
        return sk
    sk += f"{window}{SEP}"
    if start is None:
        return sk
    return sk + start


def parse_usage_sk(sk: str) -> tuple[str, str, str]:
    """(resource, window, window_start) of a usage key."""
    if not sk.startswith(USAGE_PREFIX):
        raise ValueError(f"not a usage key: {sk!r}")
    parts = sk[len(USAGE_PREFIX) :].split(SEP)
    if len(parts) != 3:
        raise ValueError(f"malformed usage key: {sk!r}")
    return parts[0], parts[1], parts[2]


def audit_pk(entity_id: str) -> str:
    """The partition of an entity's audit events (kept when the entity is deleted)."""
    return f"{AUDIT_PK_PREFIX}{entity_id}"


def audit_sk(event_id: str | None = None) -> str:
    """An audit event's key; without an id, the prefix of every event. Event ids sort in time
    order, so one Query of the partition reads the events in time order (either way)."""
    return AUDIT_PREFIX if event_id is None else f"{AUDIT_PREFIX}{event_id}"


def event_id_from_audit_sk(sk: str) -> str:
    if not sk.startswith(AUDIT_PREFIX) or len(sk) == len(AUDIT_PREFIX):
        raise ValueError(f"not an audit key: {sk!r}")
    return sk[len(AUDIT_PREFIX) :]


def is_audit_key(pk: str, sk: str) -> bool:
    """An audit event's key (not the chain's head)."""
    return pk.startswith(AUDIT_PK_PREFIX) and sk.startswith(AUDIT_PREFIX)


def audit_head_key(entity_id: str) -> dict[str, str]:
    return {PK: audit_pk(entity_id), SK: AUDIT_HEAD_SK}


def is_audit_partition(pk: str) -> bool:
    """Any item of an audit partition: an event or the head of the entity's chain."""
    return pk.startswith(AUDIT_PK_PREFIX)


def audit_ttl(event_ms: int) -> int:
    """The TTL (epoch seconds) of an audit event written at `event_ms`: 90 days later."""
    return event_ms // MS_PER_SECOND + AUDIT_TTL_SECONDS


def parent_gsi_pk(parent_id: str) -> str:
    return f"{PARENT_PREFIX}{parent_id}"


def child_gsi_sk(entity_id: str) -> str:
    return f"{CHILD_PREFIX}{entity_id}"


def limit_attr(field: str, limit_name: str) -> str:
    return f"{field}{SEP}{limit_name}"


def parse_limit_attr(attr: str) -> tuple[str, str] | None:
    """(field, limit_name) for a per-limit bucket attribute, None for any other attribute."""
    field, sep, limit_name = attr.partition(SEP)
    if not sep or field not in BUCKET_FIELDS or not limit_name:
        return None
    return field, limit_name


def slots_sk(resource: str) -> str:
    """The key of the concurrency caps' item of (entity, resource)."""
    return f"{SLOTS_PREFIX}{resource}"


def slot_entry_attr(cap: str, lease_id: str) -> str:
    """The attribute holding one lease's slots of `cap` (lease ids never contain "#")."""
    return f"{SLOT_ENTRY}{SEP}{cap}{SEP}{lease_id}"


def parse_slot_entry_attr(attr: str) -> tuple[str, str] | None:
    """(cap, lease_id) of a slot entry attribute, None for any other attribute."""
    field, _, rest = attr.partition(SEP)
    cap, sep, lease_id = rest.partition(SEP)
    if field != SLOT_ENTRY or not sep or not cap or not lease_id:
        return None
    return cap, lease_id


def is_bucket_key(pk: str, sk: str) -> bool:
    return pk.startswith(ENTITY_PREFIX) and sk.startswith(BUCKET_PREFIX)


def switch_sk(kind: str, name: str) -> str:
    """The key of the switch of resource `name` (`kind` "resource") or entity `name`."""
    if kind not in SWITCH_KINDS:
        raise ValueError(f"not a switch kind: {kind!r}")
    return f"{SEP}{kind.upper()}{SEP}{name}"


def parse_switch_sk(sk: str) -> tuple[str, str]:
    """(kind, name) of a switch key."""
    head, _, name = sk[len(SEP) :].partition(SEP)
    kind = head.lower()
    if not sk.startswith(SEP) or head != kind.upper() or kind not in SWITCH_KINDS or not name:
        raise ValueError(f"not a switch key: {sk!r}")
    return kind, name


def switch_key(kind: str, name: str) -> dict[str, str]:
    return {PK: SWITCH_PK, SK: switch_sk(kind, name)}


def version_key() -> dict[str, str]:
    return {PK: SYSTEM_PK, SK: VERSION_SK}


@dataclass(frozen=True, slots=True)
class KeyAttribute:
    name: str
    type: str  # "S" | "N" | "B"


@dataclass(frozen=True, slots=True)
class Index:
    name: str
    hash_key: str
    range_key: str
    projection: str = "ALL"


@dataclass(frozen=True, slots=True)
class TableDefinition:
    """Keys, indexes, TTL and stream of the table: read by boto3 and by Pulumi alike."""

    hash_key: str
    range_key: str
    attributes: tuple[KeyAttribute, ...]
    global_secondary_indexes: tuple[Index, ...]
    ttl_attribute: str
    stream_view_type: str

    def create_table_kwargs(
        self,
        table: str,
        billing_mode: str = "PAY_PER_REQUEST",
        read_capacity: int | None = None,
        write_capacity: int | None = None,
    ) -> dict[str, Any]:
        """Arguments for DynamoDB's CreateTable (boto3 spelling)."""
        provisioned = billing_mode == "PROVISIONED"
        throughput = {
            "ReadCapacityUnits": read_capacity or 5,
            "WriteCapacityUnits": write_capacity or 5,
        }
        gsis: list[dict[str, Any]] = []
        for index in self.global_secondary_indexes:
            gsi: dict[str, Any] = {
                "IndexName": index.name,
                "KeySchema": [
                    {"AttributeName": index.hash_key, "KeyType": "HASH"},
                    {"AttributeName": index.range_key, "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": index.projection},
            }
            if provisioned:
                gsi["ProvisionedThroughput"] = dict(throughput)
            gsis.append(gsi)
        kwargs: dict[str, Any] = {
            "TableName": table,
            "KeySchema": [
                {"AttributeName": self.hash_key, "KeyType": "HASH"},
                {"AttributeName": self.range_key, "KeyType": "RANGE"},
            ],
            "AttributeDefinitions": [
                {"AttributeName": a.name, "AttributeType": a.type} for a in self.attributes
            ],
            "GlobalSecondaryIndexes": gsis,
            "BillingMode": billing_mode,
            "StreamSpecification": {"StreamEnabled": True, "StreamViewType": self.stream_view_type},
        }
        if provisioned:
            kwargs["ProvisionedThroughput"] = throughput
        return kwargs


TABLE: Final = TableDefinition(
    hash_key=PK,
    range_key=SK,
    attributes=(
        KeyAttribute(PK, "S"),
        KeyAttribute(SK, "S"),
        KeyAttribute(GSI1PK, "S"),
        KeyAttribute(GSI1SK, "S"),
    ),
    global_secondary_indexes=(Index(GSI1, GSI1PK, GSI1SK),),
    ttl_attribute=TTL_ATTRIBUTE,
    stream_view_type=STREAM_VIEW_TYPE,
)

# Event-source filter for the aggregator: only bucket items carry consumption counters.
AGGREGATOR_FILTER_PATTERN: Final = {"dynamodb": {"Keys": {SK: {"S": [{"prefix": BUCKET_PREFIX}]}}}}
# ... and every change to an audit partition other than an insert, which the aggregator counts
# when it is not the table's TTL expiring an event (`AUDIT_CHANGES_METRIC`).
AUDIT_CHANGE_FILTER_PATTERN: Final = {
    "eventName": ["MODIFY", "REMOVE"],
    "dynamodb": {"Keys": {PK: {"S": [{"prefix": AUDIT_PK_PREFIX}]}}},
}
# Lambda passes a record that matches any one of the filters.
AGGREGATOR_FILTER_PATTERNS: Final = (AGGREGATOR_FILTER_PATTERN, AUDIT_CHANGE_FILTER_PATTERN)
# Who a stream record says deleted an item when the table's TTL expired it.
TTL_DELETER: Final = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}

# The aggregator's own CloudWatch metric (embedded metric format in its log), with the
# `TableName` dimension, and the alarm on it (`zae_limiter.infra`): audit items changed or
# deleted other than by an append or TTL expiry.
METRIC_NAMESPACE: Final = "ZaeLimiter"
AUDIT_CHANGES_METRIC: Final = "AuditTrailChanges"

USAGE_WINDOWS: Final = WINDOWS


def error_code(exc: BaseException | None) -> str | None:
    """DynamoDB's error code of a botocore `ClientError` (or anything shaped like one), else None.

    Here rather than in `repository`, because the aggregator (a bare Lambda: no aioboto3) reads
    codes from its own boto3 client too; `repository.error_code` is the same function.
    """
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error")
        if isinstance(error, dict):
            code = error.get("Code")
            return str(code) if code else None
    return None


# The region when none is given or configured (also that of every local endpoint).
DEFAULT_REGION: Final = "us-east-1"


def default_region(region: str | None = None) -> str:
    """`region`, else `$AWS_DEFAULT_REGION`, else `$AWS_REGION`, else us-east-1."""
    return (
        region
        or os.environ.get("AWS_DEFAULT_REGION")
        or os.environ.get("AWS_REGION")
        or DEFAULT_REGION
    )
