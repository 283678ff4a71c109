"""Changes to the audit trail that no append and no expiry explain, seen on the table's stream.

The library only ever appends to an audit partition: a new event (INSERT) and its chain's head
moved one sequence number on (an INSERT for the first event, then a MODIFY from `seq` n to n+1).
Events leave only through the table's TTL, whose stream records name the DynamoDB service as
the deleter. Anything else on an `AUDIT#` partition (an event overwritten or deleted, a head moved
back, forward by more than one, or deleted) is counted here: the handler publishes the count as
`schema.AUDIT_CHANGES_METRIC` and an alarm watches it (see docs/design.md, "Audit trail").

Pure: the standard library and `schema` only (runs in the bare Lambda runtime).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from .. import schema

__all__ = ["audit_change", "emf_line", "is_ttl_expiry"]


def is_ttl_expiry(record: Mapping[str, Any]) -> bool:
    """Whether a REMOVE record is the table's TTL deleting the item (its `userIdentity`)."""
    identity = record.get("userIdentity")
    return isinstance(identity, Mapping) and all(
        identity.get(key) == value for key, value in schema.TTL_DELETER.items()
    )


def _seq(image: Any) -> int | None:
    if not isinstance(image, Mapping):
        return None
    value = image.get(schema.AUDIT_SEQ)
    if not isinstance(value, Mapping) or "N" not in value:
        return None
    try:
        return int(Decimal(str(value["N"])))
    except (InvalidOperation, ValueError):
        return None


def audit_change(record: Any) -> str | None:
    """Why `record` (Lambda-shaped stream record) is an unexplained change to an audit item, or
    None when it is not one (not an audit partition, an append, a TTL expiry)."""
    if not isinstance(record, Mapping):
        return None
    name = record.get("eventName")
    if name not in ("MODIFY", "REMOVE"):
        return None
    dynamodb = record.get("dynamodb")
    keys = dynamodb.get("Keys") if isinstance(dynamodb, Mapping) else None
    if not isinstance(keys, Mapping):
        return None
    pk_value, sk_value = keys.get(schema.PK), keys.get(schema.SK)
    pk = pk_value.get("S") if isinstance(pk_value, Mapping) else None
    sk = sk_value.get("S") if isinstance(sk_value, Mapping) else None
    if not isinstance(pk, str) or not schema.is_audit_partition(pk):
        return None
    assert isinstance(dynamodb, Mapping)
    head = sk == schema.AUDIT_HEAD_SK
    if name == "REMOVE":
        if is_ttl_expiry(record) and not head:
            return None
        return "chain head deleted" if head else "audit event deleted"
    old, new = dynamodb.get("OldImage"), dynamodb.get("NewImage")
    if head:
        before, after = _seq(old), _seq(new)
        if before is not None and after == before + 1:
            return None  # an append
        return f"chain head moved from seq {before} to {after}"
    if isinstance(old, Mapping) and old == new:
        return None  # rewritten identically: nothing about the event changed
    return "audit event overwritten"


def emf_line(table_name: str, count: int, timestamp_ms: int) -> str:
    """CloudWatch embedded metric format: this JSON line, in the function's log, becomes one
    datum of `schema.AUDIT_CHANGES_METRIC` (dimension TableName). It needs no permission beyond
    writing the log, and the line itself says what was counted."""
    return json.dumps(
        {
            "_aws": {
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [
                    {
                        "Namespace": schema.METRIC_NAMESPACE,
                        "Dimensions": [["TableName"]],
                        "Metrics": [{"Name": schema.AUDIT_CHANGES_METRIC, "Unit": "Count"}],
                    }
                ],
            },
            "TableName": table_name,
            schema.AUDIT_CHANGES_METRIC: count,
        },
        separators=(",", ":"),
        sort_keys=True,
    )
