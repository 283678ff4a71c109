"""DynamoDB I/O: the only module that talks to the table (aioboto3, low-level client).

`Repository` is the DynamoDB `zae_limiter.storage.Storage`. It knows keys and item layout
(through `schema`), requests and expressions, DynamoDB's error codes, retries and capacity
accounting. It makes no rate-limiting decisions: bucket writes arrive as conditions and values
computed by the core.

Errors leave it translated (callers need no botocore): a missing table is
`InfrastructureNotFoundError`, an outage (unreachable, throttled past the retries, failing) is
`RepositoryUnavailable`, any other refusal `StorageError` with DynamoDB's code (the `ClientError`
is its `__cause__`). `error_code` reads a code where one is still needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import platform
import random
import re
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, TypeVar

import aioboto3
import aiobotocore
import aiohttp
import botocore.exceptions
import botocore.validate
from aiobotocore.parsers import AioJSONParser, AioResponseParserFactory
from botocore.config import Config

from ... import core, schema
from ..._version import __version__
from ...audit import CHAIN_START, chain_hash, event_time_ms
from ...core.windows import WINDOWS, format_window_start
from ...exceptions import (
    EntityExistsError,
    EntityNotFoundError,
    InfrastructureNotFoundError,
    ValidationError,
)
from ...models import AuditEvent, Entity, Limit, UsageSnapshot
from ...schema import error_code
from ...usage import Moment, check_range, snapshot_order
from ..capacity import CapacityLedger, item_size, read_units, write_units
from ..protocol import (
    Backup,
    BucketItem,
    ConditionFailed,
    Item,
    LimitState,
    LimitWrite,
    RepositoryUnavailable,
    Storage,
    StorageError,
    StoredLimit,
    WriteRefused,
)
from .endpoint import LOCAL_CREDENTIALS, LOCAL_REGION, is_loopback
from .transport import LeanTransport

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
    "usage_query",
]

log = logging.getLogger("zae_limiter.repository")

T = TypeVar("T")

# Errors after which DynamoDB has certainly not applied the request.
_RETRYABLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
# Of those, the ones DynamoDB answers before it looks at the item (admission control): a
# refused give-back is resent only after one of these. A 503 (ServiceUnavailable) is retried
# blindly for other writes, where applying twice costs capacity at worst; an added give-back
# applied twice would mint tokens, and nothing guarantees a 503 was refused before applying.
_THROTTLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "LimitExceededException",
    }
)


def _is_throttle(exc: BaseException | None) -> bool:
    """Whether `exc` is DynamoDB refusing a request for throughput (`_THROTTLE_CODES`)."""
    return isinstance(exc, botocore.exceptions.ClientError) and error_code(exc) in _THROTTLE_CODES


# The client cannot sign or address a request at all: a configuration error, never sent.
_CLIENT_SETUP_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.NoRegionError,
)
# Errors after which the request may or may not have been applied.
_AMBIGUOUS_CODES = frozenset({"InternalServerError", "InternalFailure"})
_SAFE_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
)
# The table (or, for backups, the table named in the request) does not exist.
_MISSING_TABLE_CODES = frozenset({"ResourceNotFoundException", "TableNotFoundException"})
_CONDITION_FAILED = "ConditionalCheckFailedException"
# Appenders racing for one entity's chain: enough for a burst of administrative changes to one
# entity from several processes; past it the event is logged and the caller told (audit.record).
AUDIT_APPEND_ATTEMPTS = 25
_TABLE_IN_USE = "ResourceInUseException"


class _ConditionCheckFailed(StorageError):
    """A conditional write was refused; `item` is what DynamoDB returned with the refusal
    (ReturnValuesOnConditionCheckFailure), if anything. Handled inside this module."""

    def __init__(self, message: str, item: Item | None) -> None:
        super().__init__(_CONDITION_FAILED, message)
        self.item = item


def _surely_absent(write_id: str, current: BucketItem | None, known_ids: tuple[str, ...]) -> bool:
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


def _invalid(exc: botocore.exceptions.ParamValidationError) -> StorageError:
    return StorageError("ParamValidationError", str(exc))


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


def _never_sent(exc: BaseException) -> bool:
    """aiobotocore also reports a connection reset after the request was sent (a pooled
    connection dropped mid-response) as EndpointConnectionError: only a failure to connect means
    DynamoDB never saw the request."""
    if isinstance(exc, botocore.exceptions.ConnectTimeoutError):
        return True
    cause = getattr(exc, "kwargs", {}).get("error")
    return cause is None or isinstance(
        cause, (aiohttp.ClientConnectorError, ConnectionRefusedError)
    )


class _Ambiguous(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with full-jitter exponential backoff.

    The defaults ride out a throttled item: DynamoDB refuses writes to an item (a partition)
    past its ceiling over about a second, so the backoff before the last attempt reaches a
    second (caps 0.1, 0.2, 0.4, 0.8, 1 s; about 1.25 s in all on average). Four attempts capped
    at 0.2 s gave up within about 0.2 s, and under a write ceiling that failed acquires and
    lost reservations' give-backs.

    A throttle is a certain refusal (nothing was applied) and says the item is busy, not broken,
    so a throttled request goes on past `max_attempts` until `throttle_seconds` have passed
    since its first send. Jittered retries are not fair: on an item held at its ceiling by
    several processes, six attempts lost to the others about once in a thousand acquires. The
    call's deadline (1 s against DynamoDB) still bounds what a caller waits.
    """

    max_attempts: int = 6
    base_delay: float = 0.05
    max_delay: float = 1.0
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    throttle_seconds: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * (2 ** min(attempt, 16))))

    def retries_throttle(self, attempt: int, started: float) -> bool:
        """Whether a request throttled on its `attempt`-th send (0-based), first sent at
        `started` (monotonic seconds), is sent again."""
        if attempt + 1 < self.max_attempts:
            return True
        return time.monotonic() - started < self.throttle_seconds


@dataclass
class _Expr:
    names: dict[str, str] = field(default_factory=dict)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)

    def name(self, attr: str) -> str:
        key = f"#n{len(self.names)}"
        self.names[key] = attr
        return key

    def value(self, av: dict[str, Any]) -> str:
        key = f":v{len(self.values)}"
        self.values[key] = av
        return key


def _s(value: str) -> dict[str, Any]:
    return {"S": value}


def _n(value: int) -> dict[str, Any]:
    return {"N": str(value)}


def _get_s(item: Item, attr: str) -> str | None:
    value = item.get(attr)
    return None if value is None or "S" not in value else str(value["S"])


def _get_n(item: Item, attr: str) -> int | None:
    value = item.get(attr)
    return None if value is None or "N" not in value else int(value["N"])


def _utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        limits[limit_name] = LimitState(
            full_at=None if full_at is None else int(full_at["N"]),
            consumed_milli=int(attrs.get(schema.CONSUMED, {"N": "0"})["N"]),
            released_milli=int(attrs.get(schema.RELEASED, {"N": "0"})["N"]),
            definition=None if definition is None else str(definition["S"]),
            legacy=legacy,
        )
    pk = _get_s(item, schema.PK) or ""
    sk = _get_s(item, schema.SK) or ""
    return BucketItem(
        entity_id=schema.entity_id_from_pk(pk),
        resource=schema.resource_from_bucket_sk(sk),
        limits=limits,
        write_time_ms=_get_n(item, schema.WRITE_TIME),
        write_ids=tuple(w for w in (_get_s(item, s) for s in schema.WRITE_ID_SLOTS) if w),
        size=item_size(item) if size is None else size,
        expires_at=_get_n(item, schema.TTL_ATTRIBUTE),
    )


def entity_from_item(item: Item) -> Entity:
    metadata_av = item.get("metadata", {}).get("M", {})
    return Entity(
        id=_get_s(item, "entity_id") or schema.entity_id_from_pk(_get_s(item, schema.PK) or ""),
        name=_get_s(item, "name"),
        parent_id=_get_s(item, "parent_id"),
        metadata={k: str(v.get("S", "")) for k, v in metadata_av.items()},
        created_at=_get_s(item, "created_at"),
    )


def limit_from_item(item: Item) -> Limit:
    return Limit(
        name=_get_s(item, "limit_name") or schema.parse_limit_sk(_get_s(item, schema.SK) or "")[1],
        capacity=_get_n(item, "capacity") or 0,
        burst=_get_n(item, "burst") or 0,
        refill_amount=_get_n(item, "refill_amount") or 0,
        refill_period_seconds=_get_n(item, "refill_period_seconds") or 0,
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
        schema.PK: _s(schema.audit_pk(event.entity_id)),
        schema.SK: _s(schema.audit_sk(event.event_id)),
        schema.AUDIT_EVENT_ID: _s(event.event_id),
        schema.AUDIT_TIMESTAMP: _s(event.timestamp),
        schema.AUDIT_ACTION: _s(event.action),
        schema.AUDIT_ENTITY_ID: _s(event.entity_id),
        schema.AUDIT_DETAILS: _to_av(dict(event.details)),
        schema.TTL_ATTRIBUTE: _n(schema.audit_ttl(event_time_ms(event.event_id))),
    }
    if event.principal is not None:
        item[schema.AUDIT_PRINCIPAL] = _s(event.principal)
    if event.resource is not None:
        item[schema.AUDIT_RESOURCE] = _s(event.resource)
    return item


def chained_audit_item(event: AuditEvent, seq: int, prev: str, prev_id: str | None) -> Item:
    """`audit_item` as the `seq`-th link of the entity's chain after the event `prev_id` (None
    for the first) whose hash is `prev`; `h` is the hash of all of it (`audit.chain_hash`)."""
    item = audit_item(event)
    item[schema.AUDIT_SEQ] = _n(seq)
    item[schema.AUDIT_PREV] = _s(prev)
    if prev_id is not None:
        item[schema.AUDIT_PREV_ID] = _s(prev_id)
    item[schema.AUDIT_HASH] = _s(chain_hash(item))
    return item


def audit_head(item: Item) -> Item:
    """The head item naming the event `item` as the last of its entity's chain."""
    head: Item = {schema.PK: item[schema.PK], schema.SK: _s(schema.AUDIT_HEAD_SK)}
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
    sk = _get_s(item, schema.SK) or ""
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
            for limit, value in item.get("counters", {}).get("M", {}).items()
        }
        updated = item.get("updated_at", {}).get("S")
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


def usage_query(
    entity_id: str,
    resource: str | None = None,
    window: str | None = None,
    start: Moment | None = None,
    end: Moment | None = None,
) -> dict[str, Any]:
    """Query arguments (all but TableName and paging) for an entity's usage snapshots.

    `resource=None`: every resource; `window=None`: every window. `start`/`end` select snapshots
    whose window contains or follows `start` and starts at or before `end` (both inclusive).
    ValueError for an unknown window or an unreadable time.
    """
    lo, hi = check_range(window, start, end)
    names: dict[str, str] = {"#pk": schema.PK, "#sk": schema.SK}
    values: dict[str, Any] = {":pk": _s(schema.entity_pk(entity_id))}
    args: dict[str, Any] = {}
    if resource is not None and window is not None and lo is not None and hi is not None:
        # Window starts of one window type sort chronologically, so the key range is exact.
        values[":lo"] = _s(schema.usage_sk(resource, window, format_window_start(window, lo)))
        values[":hi"] = _s(schema.usage_sk(resource, window, format_window_start(window, hi)))
        args["KeyConditionExpression"] = "#pk = :pk AND #sk BETWEEN :lo AND :hi"
    else:
        if resource is None:
            prefix = schema.usage_sk()
        elif window is None:
            prefix = schema.usage_sk(resource)
        else:
            prefix = schema.usage_sk(resource, window)
        values[":prefix"] = _s(prefix)
        args["KeyConditionExpression"] = "#pk = :pk AND begins_with(#sk, :prefix)"
        clauses: list[str] = []
        needs_window = resource is None and window is not None
        if lo is not None or hi is not None or needs_window:
            # Bounds are compared as window-start strings, which only sort within one window
            # type: hence one clause per window type.
            for i, w in enumerate([window] if window is not None else list(WINDOWS)):
                parts: list[str] = []
                if window is None or resource is None:
                    names["#window"] = "window"
                    values[f":w{i}"] = _s(w)
                    parts.append(f"#window = :w{i}")
                if lo is not None:
                    names["#ws"] = "window_start"
                    values[f":lo{i}"] = _s(format_window_start(w, lo))
                    parts.append(f"#ws >= :lo{i}")
                if hi is not None:
                    names["#ws"] = "window_start"
                    values[f":hi{i}"] = _s(format_window_start(w, hi))
                    parts.append(f"#ws <= :hi{i}")
                clauses.append("(" + " AND ".join(parts) + ")")
            args["FilterExpression"] = " OR ".join(clauses)
    args["ExpressionAttributeNames"] = names
    args["ExpressionAttributeValues"] = values
    return args


def _iso_time(value: object) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _size(value: object) -> int | None:
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else None


# -- bucket writes: the request -------------------------------------------------------------


def bucket_update_request(
    table_name: str,
    entity_id: str,
    resource: str,
    writes: Sequence[LimitWrite],
    now_ms: int,
    write_id: str,
    expires_at: int | None = None,
) -> dict[str, Any]:
    """The UpdateItem arguments of one bucket write, built from scratch: the definition of the
    request. `expires_at` (epoch seconds): the item's new expiry, if any. `Repository` sends the
    same request from parts built once per write shape (`_UpdateShape`); the two are kept equal
    by tests/test_repository_hot_path.py."""
    expr = _Expr()
    sets: list[str] = []
    adds: list[str] = []
    conditions: list[str] = []
    for w in writes:
        fa = expr.name(schema.limit_attr(schema.FULL_AT, w.limit_name))
        if w.mode == core.WRITE_ADD:
            # ADD, not SET: on a limit reset meanwhile it starts from 0, a bucket full since
            # 1970, as a give-back to a full bucket should leave it.
            adds.append(f"{fa} {expr.value(_n(w.value))}")
        elif w.mode == core.WRITE_RELATIVE:
            sets.append(f"{fa} = {fa} + {expr.value(_n(w.value))}")
        else:
            sets.append(f"{fa} = {expr.value(_n(w.value))}")
        if w.create or w.legacy is not None:
            lr = expr.name(schema.limit_attr(schema.LAST_REFILL, w.limit_name))
            conditions.append(f"attribute_not_exists({fa})")
            if w.legacy is None:
                conditions.append(f"attribute_not_exists({lr})")
            else:
                tk = expr.name(schema.limit_attr(schema.TOKENS, w.limit_name))
                conditions.append(f"{tk} = {expr.value(_n(w.legacy[0]))}")
                conditions.append(f"{lr} = {expr.value(_n(w.legacy[1]))}")
                if w.fence is not None:
                    sets.append(f"{tk} = {expr.value(_n(w.fence[0]))}")
                    sets.append(f"{lr} = {expr.value(_n(w.fence[1]))}")
        if w.cond_lo is not None:
            conditions.append(f"{fa} >= {expr.value(_n(w.cond_lo))}")
        if w.cond_hi is not None:
            conditions.append(f"{fa} <= {expr.value(_n(w.cond_hi))}")
        if w.delta_milli:
            counter = schema.CONSUMED if w.delta_milli > 0 else schema.RELEASED
            counter_name = expr.name(schema.limit_attr(counter, w.limit_name))
            adds.append(f"{counter_name} {expr.value(_n(abs(w.delta_milli)))}")
        if w.definition is not None:
            lm = expr.name(schema.limit_attr(schema.LIMIT_DEF, w.limit_name))
            sets.append(f"{lm} = {expr.value(_s(w.definition))}")
    sets.append(f"{expr.name(schema.WRITE_TIME)} = {expr.value(_n(now_ms))}")
    if _may_create(writes):
        # The item's names, for people reading the table; nothing reads them back (the key
        # says the same), so only a write that may create the item sets them, not every write
        # (each SET is parsed by the server and serialized by the client).
        sets.append(f"{expr.name('entity_id')} = {expr.value(_s(entity_id))}")
        sets.append(f"{expr.name('resource')} = {expr.value(_s(resource))}")
    if expires_at is not None:
        sets.append(f"{expr.name(schema.TTL_ATTRIBUTE)} = {expr.value(_n(expires_at))}")
    # Shift the ring of recent write ids; SET reads every right-hand side from the old item.
    slots = [expr.name(slot) for slot in schema.WRITE_ID_SLOTS]
    ring_exists = _ring_exists(writes)
    empty = None if ring_exists else expr.value(_s(""))
    wid = expr.value(_s(write_id))
    sets.append(f"{slots[0]} = {wid}")
    for newer, older in itertools.pairwise(slots):
        sets.append(
            f"{older} = {newer}" if empty is None else f"{older} = if_not_exists({newer}, {empty})"
        )
    update = "SET " + ", ".join(sets)
    if adds:
        update += " ADD " + ", ".join(adds)
    kwargs: dict[str, Any] = {
        "TableName": table_name,
        "Key": _bucket_key(entity_id, resource),
        "UpdateExpression": update,
        "ExpressionAttributeNames": expr.names,
        "ExpressionAttributeValues": expr.values,
        "ReturnValues": "ALL_NEW",
    }
    # A resend of a write whose earlier attempt may still land (a response lost or timed out
    # in flight) must not apply twice: each write id applies at most once.
    # (IN rather than one comparison per slot: the same test, fewer tokens for the server.)
    conditions.append(f"NOT ({wid} IN ({', '.join(slots)}))")
    if conditions:
        kwargs["ConditionExpression"] = " AND ".join(conditions)
        kwargs["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
    return kwargs


def _ring_exists(writes: Sequence[LimitWrite]) -> bool:
    """Whether a bucket write can only apply to an item that holds every slot of the write-id
    ring, so that the ring shifts with plain copies (shorter for the server to parse than
    `if_not_exists`). True when one of its limits is conditioned on a bound of its `fa#`
    (a comparison with an absent attribute is false: the write fails unless the limit is
    stored) and none is created or in the legacy layout: a limit's `fa#` is only ever written
    by `bucket_update_request`, whose every write leaves all four slots (empty ones as "")."""
    return not _may_create(writes) and any(
        w.cond_lo is not None or w.cond_hi is not None for w in writes
    )


def _may_create(writes: Sequence[LimitWrite]) -> bool:
    """Whether a bucket write may create its item: one of its limits is written on a view of
    the limit absent (an absent item) or in the legacy layout (an item no write of this layout
    has named yet). A write on a view of the limit present finds the item there, named."""
    return any(w.create or w.legacy is not None for w in writes)


def _bucket_key(entity_id: str, resource: str) -> dict[str, Any]:
    return {
        schema.PK: _s(schema.entity_pk(entity_id)),
        schema.SK: _s(schema.bucket_sk(resource)),
    }


@dataclass(frozen=True, slots=True)
class _UpdateShape:
    """What a bucket UpdateItem's arguments hold for every write of one *shape* (which limits,
    and for each: the kind of write, whether the anchor moves, which bounds, the counter, a
    definition): the expressions, the attribute names and the value placeholders in order.
    Only the values differ between two writes of one shape. Shared by every request of the
    shape, so never modified: botocore only reads the arguments it is given."""

    update: str
    condition: str
    names: Mapping[str, str]
    value_keys: tuple[str, ...]

    @classmethod
    def of(cls, request: Mapping[str, Any]) -> _UpdateShape:
        return cls(
            update=request["UpdateExpression"],
            condition=request["ConditionExpression"],
            names=request["ExpressionAttributeNames"],
            value_keys=tuple(request["ExpressionAttributeValues"]),
        )


def _shape_and_values(
    writes: Sequence[LimitWrite],
    now_ms: int,
    entity_id: str,
    resource: str,
    write_id: str,
    expires_at: int | None = None,
) -> tuple[tuple[tuple[object, ...], ...], list[dict[str, Any]]]:
    """The shape of a bucket write (what `_UpdateShape` depends on) and its values, in the order
    `bucket_update_request` numbers them: one pass, no strings built."""
    shape: list[tuple[object, ...]] = []
    values: list[dict[str, Any]] = []
    for w in writes:
        values.append({"N": str(w.value)})
        if w.create:
            kind: tuple[object, ...] = (w.mode, "create")
        elif w.legacy is not None:
            values.append({"N": str(w.legacy[0])})
            values.append({"N": str(w.legacy[1])})
            if w.fence is not None:
                values.append({"N": str(w.fence[0])})
                values.append({"N": str(w.fence[1])})
            kind = (w.mode, "legacy", w.fence is not None)
        else:
            kind = (w.mode,)
        if w.cond_lo is not None:
            values.append({"N": str(w.cond_lo)})
        if w.cond_hi is not None:
            values.append({"N": str(w.cond_hi)})
        kind += (w.cond_lo is not None, w.cond_hi is not None)
        if w.delta_milli:
            values.append({"N": str(abs(w.delta_milli))})
        if w.definition is not None:
            values.append({"S": w.definition})
        counter = (w.delta_milli > 0) - (w.delta_milli < 0)
        shape.append((w.limit_name, kind, counter, w.definition is not None))
    values.append({"N": str(now_ms)})
    if _may_create(writes):  # the shape says so already: a write's kinds name "create"/"legacy"
        values.append({"S": entity_id})
        values.append({"S": resource})
    if expires_at is not None:
        values.append({"N": str(expires_at)})
        shape.append((schema.TTL_ATTRIBUTE,))  # a limit's part is never a 1-tuple
    if not _ring_exists(writes):  # the shape says so already (kinds and bounds)
        values.append({"S": ""})
    values.append({"S": write_id})
    return tuple(shape), values


# Bound on the request parts a repository keeps (write shapes, item keys): a limiter sees few
# shapes, but may see any number of entities. Beyond it the oldest are forgotten.
_PARTS_CACHE_SIZE = 1024


def _remember(cache: dict[Any, T], key: Any, value: T) -> T:
    if len(cache) >= _PARTS_CACHE_SIZE:
        del cache[next(iter(cache))]
    cache[key] = value
    return value


# -- responses: items without botocore's walk of the model ---------------------------------------

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


# aiobotocore's stubs leave out the parts overridden here.
_JSONParser: Any = AioJSONParser
_ParserFactory: Any = AioResponseParserFactory


class _ItemJSONParser(_JSONParser):  # type: ignore[misc]
    def _handle_json_body(self, raw_body: bytes, shape: Any) -> Any:
        if shape is not None:
            parsed = plain_item_body(raw_body, shape.name)
            if parsed is not None:
                return parsed
        return super()._handle_json_body(raw_body, shape)


class _ItemParserFactory(_ParserFactory):  # type: ignore[misc]
    """aiobotocore's parser factory, whose JSON parser takes plain items as they come."""

    def create_parser(self, protocol_name: str) -> Any:
        if protocol_name == "json":
            return _ItemJSONParser(**self._defaults)
        return super().create_parser(protocol_name)


def _parse_items_plainly(client: Any) -> bool:
    """Give the client's endpoint `_ItemParserFactory` (with the factory's defaults), if it has
    aiobotocore's own factory where this version of aiobotocore keeps it; True if it did. On any
    other layout the client keeps parsing as it does: slower, never different."""
    endpoint = getattr(client, "_endpoint", None)
    factory = getattr(endpoint, "_response_parser_factory", None)
    if type(factory) is not AioResponseParserFactory:
        return False
    plain = _ItemParserFactory()
    plain.set_parser_defaults(**getattr(factory, "_defaults", {}))
    endpoint._response_parser_factory = plain  # type: ignore[union-attr]
    return True


# The User-Agent header, fixed: botocore otherwise rebuilds it (twice) for every request, with
# per-request feature metadata, one of the largest client costs of a call.
_USER_AGENT = (
    f"zae-limiter/{__version__} aiobotocore/{aiobotocore.__version__} "
    f"Python/{platform.python_version()}"
)


class Repository:
    """Async access to one zae-limiter table.

    `Repository("ZAEL-my-app", "us-east-1", None)` or `Repository(name="my-app")`; close with
    `await repo.close()` (or `async with`).
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
        self.endpoint_url = endpoint_url
        self.retry = retry or RetryPolicy()
        self.ledger = CapacityLedger()
        self._session = session or aioboto3.Session()
        self._max_pool_connections = max_pool_connections
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        # Request parts built once (see `_bucket_update`, `_bucket_key`).
        self._update_shapes: dict[tuple[tuple[object, ...], ...], _UpdateShape] = {}
        self._keys: dict[tuple[str, str], dict[str, Any]] = {}
        self._input_shapes: dict[str, Any] = {}
        self._parses_items_plainly = False  # see `_parse_items_plainly`
        # Appends to one entity's audit chain from this process queue here instead of racing
        # each other for the head in DynamoDB (other processes still race: see put_audit_event).
        self._audit_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())
        # The bucket calls' transport (None: they go through the client; see `transport`).
        self._lean: LeanTransport | None = None

    # -- client lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Build the client now. Loading botocore's service model costs a few hundred
        milliseconds of CPU once: the limiter does it before a deadline starts, which bounds
        the wait on DynamoDB, not this."""
        try:
            await self.client()
        except _CLIENT_SETUP_ERRORS as exc:
            raise StorageError(type(exc).__name__, str(exc)) from exc

    async def client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                stack = contextlib.AsyncExitStack()
                client = await stack.enter_async_context(
                    self._session.client(
                        "dynamodb",
                        endpoint_url=self.endpoint_url,
                        config=self._client_config(),
                        **await self._where(),
                    )
                )
                self._parses_items_plainly = _parse_items_plainly(client)
                self._lean = await LeanTransport.of(client, self.table_name, plain_item_body)
                self._client, self._stack = client, stack
        return self._client

    def _client_config(self) -> Config:
        return Config(
            # Our own retry loop owns retries: botocore's would replay non-idempotent bucket
            # writes after a lost response and double them.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self.retry.connect_timeout,
            read_timeout=self.retry.read_timeout,
            max_pool_connections=self._max_pool_connections,
            # Checking every request against the service model was the largest single cost of
            # a bucket write in botocore. The bucket requests are built here from checked
            # arguments and need no check; every other request is checked by `call` itself.
            parameter_validation=False,
            user_agent=_USER_AGENT,
        )

    async def _where(self) -> dict[str, Any]:
        """Region (and, if need be, credentials) of the client. A loopback endpoint (a local
        DynamoDB) needs neither: the region defaults to us-east-1 and, when botocore finds no
        credentials, placeholders are used. What the caller or the environment configured wins."""
        where: dict[str, Any] = {"region_name": self.region}
        if not is_loopback(self.endpoint_url):
            return where
        if self.region is None and self._session.region_name is None:
            where["region_name"] = LOCAL_REGION
        # aioboto3's Session.get_credentials returns aiobotocore's coroutine.
        if await self._session.get_credentials() is None:
            where.update(LOCAL_CREDENTIALS)
        return where

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        self._lean = None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Repository:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- calls and retries ------------------------------------------------------------------

    async def _call(
        self,
        operation: str,
        kwargs: Mapping[str, Any],
        retryable: frozenset[str] = _RETRYABLE_CODES,
        bucket: bool = False,
    ) -> dict[str, Any]:
        """One DynamoDB call with bounded, jittered retries of errors that did not apply
        (`retryable`: the codes taken as refused before applying; any other 5xx is ambiguous).
        The request is not checked against the service model (see `call`). A `bucket` call (the
        bucket GetItem and UpdateItem) goes through `transport.LeanTransport` when the client
        allows it; it raises botocore's exceptions, so what follows is the same for both."""
        try:
            client = await self.client()
        except _CLIENT_SETUP_ERRORS as exc:
            raise StorageError(type(exc).__name__, str(exc)) from exc
        lean = self._lean if bucket else None
        method: Callable[..., Awaitable[dict[str, Any]]] = getattr(client, operation)
        last: BaseException | None = None
        started = time.monotonic()
        attempt = -1
        while True:
            attempt += 1
            if attempt:
                if not (
                    attempt < self.retry.max_attempts
                    or (_is_throttle(last) and self.retry.retries_throttle(attempt - 1, started))
                ):
                    break
                self.ledger.retried(operation)
                await asyncio.sleep(self.retry.delay(attempt))
            try:
                if lean is not None:
                    return await lean.send(operation, kwargs)
                return await method(**kwargs)
            except botocore.exceptions.ClientError as exc:
                code = error_code(exc) or ""
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                if code in retryable:
                    self.ledger.throttled(operation)
                    last = exc
                    continue
                if code in _AMBIGUOUS_CODES or code in _RETRYABLE_CODES or status >= 500:
                    raise _Ambiguous(exc) from exc
                raise self._translate(exc, code) from exc
            except botocore.exceptions.ParamValidationError as exc:
                # Refused before sending (`call` checks requests; botocore may still refuse
                # some itself): retrying cannot help.
                raise _invalid(exc) from exc
            except _CLIENT_SETUP_ERRORS as exc:
                # No credentials (or region) to sign with: nothing was sent, no retry helps.
                raise StorageError(type(exc).__name__, str(exc)) from exc
            except _SAFE_TRANSPORT_ERRORS as exc:
                if not _never_sent(exc):
                    raise _Ambiguous(exc) from exc
                last = exc
                continue
            except (TimeoutError, botocore.exceptions.BotoCoreError, OSError) as exc:
                raise _Ambiguous(exc) from exc
        raise RepositoryUnavailable(
            f"DynamoDB {operation} failed after {attempt} attempts: {last}", last
        )

    def _translate(self, exc: botocore.exceptions.ClientError, code: str) -> Exception:
        message = str(exc.response.get("Error", {}).get("Message", "")) or str(exc)
        if code in _MISSING_TABLE_CODES:
            return InfrastructureNotFoundError(self.table_name)
        if code == _CONDITION_FAILED:
            return _ConditionCheckFailed(message, exc.response.get("Item"))  # type: ignore[arg-type]
        return StorageError(code or "UnknownError", message)

    async def call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """One raw DynamoDB call whose effect is idempotent: ambiguous failures are simply
        retried. Errors are translated as everywhere (see the module's docstring).

        The request is checked against the service model first, as botocore's own parameter
        validation would (it is off in the client): arguments it refuses raise
        `StorageError("ParamValidationError", ...)` and nothing is sent.
        """
        await self._check(operation, kwargs)
        return await self._idempotent(operation, kwargs)

    async def _check(self, operation: str, kwargs: Mapping[str, Any]) -> None:
        shape = self._input_shapes.get(operation)
        if shape is None:
            meta = (await self.client()).meta
            api = meta.method_to_api_mapping.get(operation)
            if api is None:
                return  # not an operation: the call fails as it always did
            shape = meta.service_model.operation_model(api).input_shape
            if shape is None:
                return
            self._input_shapes[operation] = shape
        try:
            botocore.validate.validate_parameters(kwargs, shape)
        except botocore.exceptions.ParamValidationError as exc:
            raise _invalid(exc) from exc

    async def _idempotent(
        self, operation: str, kwargs: Mapping[str, Any], bucket: bool = False
    ) -> dict[str, Any]:
        """`_call`, also retrying ambiguous failures (the effect of the call is idempotent)."""
        last: BaseException | None = None
        for attempt in range(self.retry.max_attempts):
            if attempt:
                self.ledger.retried(operation)
                await asyncio.sleep(self.retry.delay(attempt))
            try:
                return await self._call(operation, kwargs, bucket=bucket)
            except _Ambiguous as exc:
                last = exc.cause
        raise RepositoryUnavailable(f"DynamoDB {operation} kept failing: {last}", last)

    # -- buckets ----------------------------------------------------------------------------

    async def get_bucket(self, entity_id: str, resource: str) -> BucketItem | None:
        item, size = await self._bucket_item(entity_id, resource)
        return bucket_from_item(item, size) if item else None

    async def _bucket_item(self, entity_id: str, resource: str) -> tuple[Item | None, int]:
        """One bucket item as stored (low-level form), read consistently, and its size. A
        request built here (not checked: see `_client_config`)."""
        request = {
            "TableName": self.table_name,
            "Key": self._bucket_key(entity_id, resource),
            "ConsistentRead": True,
        }
        response = await self._idempotent("get_item", request, bucket=True)
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
        kwargs = self._bucket_update(entity_id, resource, writes, now_ms, write_id, expires_at)
        give_back = _gives_back(writes)
        retryable = _THROTTLE_CODES if give_back else _RETRYABLE_CODES
        last: BaseException | None = None
        sent_unanswered = False  # an earlier attempt may have landed
        for attempt in range(self.retry.max_attempts):
            if attempt:
                self.ledger.retried("update_item")
                await asyncio.sleep(self.retry.delay(attempt))
            try:
                response = await self._call("update_item", kwargs, retryable, bucket=True)
            except RepositoryUnavailable as exc:
                if sent_unanswered:
                    raise
                # Every attempt was refused before it applied (throttled, never sent).
                raise WriteRefused(str(exc), exc.__cause__ or last) from exc
            except _ConditionCheckFailed as exc:
                raw = exc.item
                current = bucket_from_item(raw) if raw else None
                if raw is None:
                    # Older servers do not return the item on failure: one read instead.
                    current = await self.get_bucket(entity_id, resource)
                self.ledger.record("UpdateItem", wcu=write_units(current.size if current else 0))
                if current is not None and write_id in current.write_ids:
                    # An earlier attempt whose response was lost landed (maybe late): this resend
                    # was refused by the write-id condition, and the write stands exactly once.
                    return current
                if sent_unanswered and not _surely_absent(write_id, current, known_ids):
                    raise _unknown_outcome(last) from None
                self.ledger.conflict(resource)
                raise ConditionFailed(current) from None
            except _Ambiguous as exc:
                last = exc.cause
                sent_unanswered = True
                current = await self.get_bucket(entity_id, resource)
                if current is not None and write_id in current.write_ids:
                    self.ledger.record("UpdateItem", wcu=write_units(known_size, current.size))
                    return current
                if give_back:
                    # No fence keeps the copy in flight from landing after a resend, once the
                    # ring has rotated: under-admit rather than risk adding the tokens twice.
                    raise _unconfirmed_give_back(last) from None
                if not _surely_absent(write_id, current, known_ids):
                    raise _unknown_outcome(last) from None
                continue  # it did not land: safe to send again
            new = bucket_from_item(response["Attributes"])
            self.ledger.record("UpdateItem", wcu=write_units(known_size, new.size))
            return new
        raise RepositoryUnavailable(f"bucket write kept failing: {last}", last)

    def _bucket_update(
        self,
        entity_id: str,
        resource: str,
        writes: Sequence[LimitWrite],
        now_ms: int,
        write_id: str,
        expires_at: int | None = None,
    ) -> dict[str, Any]:
        """`bucket_update_request`, from the parts of its write shape (built on first use)."""
        shape_key, values = _shape_and_values(
            writes, now_ms, entity_id, resource, write_id, expires_at
        )
        shape = self._update_shapes.get(shape_key)
        if shape is None:
            request = bucket_update_request(
                self.table_name, entity_id, resource, writes, now_ms, write_id, expires_at
            )
            shape = _remember(self._update_shapes, shape_key, _UpdateShape.of(request))
        return {
            "TableName": self.table_name,
            "Key": self._bucket_key(entity_id, resource),
            "UpdateExpression": shape.update,
            "ConditionExpression": shape.condition,
            "ExpressionAttributeNames": shape.names,
            "ExpressionAttributeValues": dict(zip(shape.value_keys, values, strict=True)),
            "ReturnValues": "ALL_NEW",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }

    async def extend_bucket_expiry(
        self, entity_id: str, resource: str, expires_at: int, known_size: int = 0
    ) -> bool:
        """Set the bucket item's expiry to `expires_at` only if it is earlier (or unset) and the
        item exists: one conditional UpdateItem. Monotone, so a resend after a lost response
        and a race between writers both leave the latest expiry. False when nothing changed."""
        try:
            await self.call(
                "update_item",
                TableName=self.table_name,
                Key=self._bucket_key(entity_id, resource),
                UpdateExpression="SET #ttl = :ttl",
                ConditionExpression="attribute_exists(#pk) AND "
                "(attribute_not_exists(#ttl) OR #ttl < :ttl)",
                ExpressionAttributeNames={"#pk": schema.PK, "#ttl": schema.TTL_ATTRIBUTE},
                ExpressionAttributeValues={":ttl": _n(expires_at)},
            )
        except _ConditionCheckFailed:
            # Refused writes are billed too (one unit per started KB of the item).
            self.ledger.record("UpdateItem", wcu=write_units(known_size))
            return False
        self.ledger.record("UpdateItem", wcu=write_units(known_size))
        return True

    def _bucket_key(self, entity_id: str, resource: str) -> dict[str, Any]:
        """The Key of a bucket item, built once per item (shared by its requests, never
        modified)."""
        key = self._keys.get((entity_id, resource))
        if key is None:
            key = _remember(self._keys, (entity_id, resource), _bucket_key(entity_id, resource))
        return key

    async def resource_buckets(self, resource: str) -> list[BucketItem]:
        """Every entity's bucket item of `resource`. A Scan: the table has no index by resource
        (one would cost a write on every acquire to keep), so this is for reports, not the hot
        path."""
        items = await self.scan(
            FilterExpression="#sk = :sk AND begins_with(#pk, :pk)",
            ExpressionAttributeNames={"#pk": schema.PK, "#sk": schema.SK},
            ExpressionAttributeValues={
                ":sk": _s(schema.bucket_sk(resource)),
                ":pk": _s(schema.ENTITY_PREFIX),
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
                ":sk": _s(schema.BUCKET_PREFIX),
                ":pk": _s(schema.ENTITY_PREFIX),
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
            KeyConditionExpression="#pk = :pk AND begins_with(#sk, :sk)",
            ExpressionAttributeNames={"#pk": schema.PK, "#sk": schema.SK},
            ExpressionAttributeValues={
                ":pk": _s(schema.entity_pk(entity_id)),
                ":sk": _s(schema.BUCKET_PREFIX),
            },
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
        expr = _Expr()
        removes = []
        for limit_name in names:
            for state_field in (schema.FULL_AT, schema.TOKENS, schema.LAST_REFILL):
                removes.append(expr.name(schema.limit_attr(state_field, limit_name)))
        try:
            await self.call(
                "update_item",
                TableName=self.table_name,
                Key={
                    schema.PK: _s(schema.entity_pk(entity_id)),
                    schema.SK: _s(schema.bucket_sk(resource)),
                },
                UpdateExpression="REMOVE " + ", ".join(removes),
                ConditionExpression="attribute_exists(#pk)",
                ExpressionAttributeNames=expr.names | {"#pk": schema.PK},
            )
        except _ConditionCheckFailed:
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
        expr = _Expr()
        fa = expr.name(schema.limit_attr(schema.FULL_AT, limit_name))
        tk = expr.name(schema.limit_attr(schema.TOKENS, limit_name))
        lr = expr.name(schema.limit_attr(schema.LAST_REFILL, limit_name))
        update = f"SET {tk} = {expr.value(_n(legacy[0]))}, {lr} = {expr.value(_n(legacy[1]))}"
        condition = f"{fa} = {expr.value(_n(full_at))}"
        try:
            await self.call(
                "update_item",
                TableName=self.table_name,
                Key=self._bucket_key(entity_id, resource),
                UpdateExpression=f"{update} REMOVE {fa}",
                ConditionExpression=condition,
                ExpressionAttributeNames=expr.names,
                ExpressionAttributeValues=expr.values,
            )
        except _ConditionCheckFailed:
            return False
        self.ledger.record("UpdateItem", wcu=1)
        return True

    # -- entities ---------------------------------------------------------------------------

    async def put_entity(self, entity: Entity) -> None:
        item: Item = {
            schema.PK: _s(schema.entity_pk(entity.id)),
            schema.SK: _s(schema.META_SK),
            "entity_id": _s(entity.id),
            "metadata": {"M": {k: _s(v) for k, v in entity.metadata.items()}},
            "created_at": _s(entity.created_at or _utcnow()),
            # Tells our own earlier attempt (whose response was lost) from someone else's item.
            "create_id": _s(secrets.token_urlsafe(9)),
        }
        if entity.name is not None:
            item["name"] = _s(entity.name)
        if entity.parent_id is not None:
            item["parent_id"] = _s(entity.parent_id)
            item[schema.GSI1PK] = _s(schema.parent_gsi_pk(entity.parent_id))
            item[schema.GSI1SK] = _s(schema.child_gsi_sk(entity.id))
        if not await self._put_new(item):
            existing = await self.call(
                "get_item",
                TableName=self.table_name,
                ConsistentRead=True,
                Key={schema.PK: item[schema.PK], schema.SK: item[schema.SK]},
            )
            if existing.get("Item", {}).get("create_id") != item["create_id"]:
                raise EntityExistsError(entity.id) from None
        self.ledger.record("PutItem", wcu=write_units(item_size(item)))

    async def get_entity(self, entity_id: str) -> Entity | None:
        response = await self.call(
            "get_item",
            TableName=self.table_name,
            Key={schema.PK: _s(schema.entity_pk(entity_id)), schema.SK: _s(schema.META_SK)},
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
            ExpressionAttributeValues={":pk": _s(schema.parent_gsi_pk(parent_id))},
            consistent=False,
        )
        return [entity_from_item(item) for item in items]

    async def delete_entity(self, entity_id: str) -> int:
        """Delete every item of the entity (metadata, buckets, limits, usage); returns a count.
        Its audit events are not among them (`AUDIT#<id>` partition): they outlive it."""
        items = await self._query_all(
            KeyConditionExpression="#pk = :pk",
            ExpressionAttributeNames={"#pk": schema.PK},
            ExpressionAttributeValues={":pk": _s(schema.entity_pk(entity_id))},
            ProjectionExpression="#pk, #sk",
            extra_names={"#sk": schema.SK},
        )
        if not any(_get_s(item, schema.SK) == schema.META_SK for item in items):
            raise EntityNotFoundError(entity_id)
        await self._batch_delete(
            [{schema.PK: i[schema.PK], schema.SK: i[schema.SK]} for i in items]
        )
        return len(items)

    # -- stored limits ----------------------------------------------------------------------

    async def set_limits(self, entity_id: str, resource: str, limits: Sequence[Limit]) -> None:
        """Replace the stored limits of (entity, resource) with `limits`."""
        existing = await self._limit_items(entity_id, resource)
        keep = {limit.name for limit in limits}
        stale = [
            {schema.PK: item[schema.PK], schema.SK: item[schema.SK]}
            for item in existing
            if schema.parse_limit_sk(_get_s(item, schema.SK) or "")[1] not in keep
        ]
        puts: list[Item] = []
        for limit in limits:
            puts.append(
                {
                    schema.PK: _s(schema.entity_pk(entity_id)),
                    schema.SK: _s(schema.limit_sk(resource, limit.name)),
                    "entity_id": _s(entity_id),
                    "resource": _s(resource),
                    "limit_name": _s(limit.name),
                    "capacity": _n(limit.capacity),
                    "burst": _n(limit.burst),
                    "refill_amount": _n(limit.refill_amount),
                    "refill_period_seconds": _n(limit.refill_period_seconds),
                }
            )
        await self.batch_write(puts=puts, deletes=stale)

    async def get_limits(self, entity_id: str, resource: str) -> list[Limit]:
        return [limit_from_item(item) for item in await self._limit_items(entity_id, resource)]

    async def get_all_limits(self, entity_id: str) -> dict[str, list[Limit]]:
        """Every stored limit of the entity by resource, in one query."""
        items = await self._query_all(
            KeyConditionExpression="#pk = :pk AND begins_with(#sk, :sk)",
            ExpressionAttributeNames={"#pk": schema.PK, "#sk": schema.SK},
            ExpressionAttributeValues={
                ":pk": _s(schema.entity_pk(entity_id)),
                ":sk": _s(schema.LIMIT_PREFIX),
            },
        )
        result: dict[str, list[Limit]] = {}
        for item in items:
            resource, _ = schema.parse_limit_sk(_get_s(item, schema.SK) or "")
            result.setdefault(resource, []).append(limit_from_item(item))
        return result

    async def delete_limits(self, entity_id: str, resource: str) -> int:
        items = await self._limit_items(entity_id, resource)
        await self._batch_delete(
            [{schema.PK: i[schema.PK], schema.SK: i[schema.SK]} for i in items]
        )
        return len(items)

    async def _limit_items(self, entity_id: str, resource: str) -> list[Item]:
        return await self._query_all(
            KeyConditionExpression="#pk = :pk AND begins_with(#sk, :sk)",
            ExpressionAttributeNames={"#pk": schema.PK, "#sk": schema.SK},
            ExpressionAttributeValues={
                ":pk": _s(schema.entity_pk(entity_id)),
                ":sk": _s(schema.limit_sk(resource)),
            },
        )

    async def list_stored_limits(self) -> list[StoredLimit]:
        """Every stored limit of the table (a consistent Scan: operator tools and migrations).
        Items this library did not write (a field missing, an invalid limit) are left out."""
        items = await self.scan(
            FilterExpression="begins_with(#sk, :prefix)",
            ExpressionAttributeNames={"#sk": schema.SK},
            ExpressionAttributeValues={":prefix": _s(schema.LIMIT_PREFIX)},
        )
        found: list[StoredLimit] = []
        for item in items:
            if not all(f in item for f in schema.STORED_LIMIT_FIELDS):
                continue
            try:
                limit = limit_from_item(item)
                resource, _ = schema.parse_limit_sk(_get_s(item, schema.SK) or "")
            except (ValidationError, ValueError, KeyError, TypeError):
                continue
            found.append(
                StoredLimit(
                    entity_id=schema.entity_id_from_pk(_get_s(item, schema.PK) or ""),
                    resource=resource,
                    limit=limit,
                    definition=_get_s(item, schema.STORED_LIMIT_DEF),
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
        event_key = {
            schema.PK: _s(schema.audit_pk(event.entity_id)),
            schema.SK: _s(schema.audit_sk(event.event_id)),
        }
        lock = self._audit_locks.get(event.entity_id)
        if lock is None:
            lock = self._audit_locks[event.entity_id] = asyncio.Lock()
        async with lock:
            await self._append_audit_event(event, event_key)

    async def _append_audit_event(self, event: AuditEvent, event_key: Item) -> None:
        if await self._audit_event_settled(event, event_key):
            return
        head_key = schema.audit_head_key(event.entity_id)
        for attempt in range(AUDIT_APPEND_ATTEMPTS):
            if attempt:
                self.ledger.retried("PutItem")
                await asyncio.sleep(self.retry.delay(attempt))
            response = await self.call(
                "get_item", TableName=self.table_name, ConsistentRead=True,
                Key={k: _s(v) for k, v in head_key.items()},
            )
            head = response.get("Item")
            self.ledger.record("GetItem", rcu=read_units(item_size(head or {}), consistent=True))
            if head is not None and _get_s(head, schema.AUDIT_EVENT_ID) == event.event_id:
                # Our own claim landed on an earlier attempt whose answer was lost: the head
                # holds the link, so the event is rebuilt exactly as claimed.
                item = chained_audit_item(
                    event, _get_n(head, schema.AUDIT_SEQ) or 0,
                    _get_s(head, schema.AUDIT_PREV) or CHAIN_START,
                    _get_s(head, schema.AUDIT_PREV_ID))
                if item[schema.AUDIT_HASH] != head.get(schema.AUDIT_HASH):
                    raise StorageError(
                        "AuditEventExists", f"another audit event has the id {event.event_id}")
                await self._write_audit_event(event, item)
                return
            seq = (_get_n(head, schema.AUDIT_SEQ) or 0) if head is not None else 0
            prev = (_get_s(head, schema.AUDIT_HASH) if head is not None else None) or CHAIN_START
            prev_id = _get_s(head, schema.AUDIT_EVENT_ID) if head is not None else None
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
                    "ExpressionAttributeValues": {":seq": _n(seq)},
                }
            new_head = audit_head(item)
            try:
                await self.call("put_item", TableName=self.table_name, Item=new_head, **condition)
            except _ConditionCheckFailed:
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
        mine = audit_item(event)
        same = (schema.AUDIT_ACTION, schema.AUDIT_TIMESTAMP, schema.AUDIT_ENTITY_ID)
        if any(stored.get(attr) != mine[attr] for attr in same):
            raise StorageError(
                "AuditEventExists", f"another audit event has the id {event.event_id}")

    async def _write_audit_event(self, event: AuditEvent, item: Item) -> None:
        if await self._put_new(item):
            self.ledger.record("PutItem", wcu=write_units(item_size(item)))
            return
        existing = await self.call(
            "get_item", TableName=self.table_name, ConsistentRead=True,
            Key={schema.PK: item[schema.PK], schema.SK: item[schema.SK]},
        )
        self._check_same_event(event, existing.get("Item") or {})  # else our own resend landed

    async def audit_chain_items(self, entity_id: str) -> tuple[list[Item], Item | None]:
        """Every event item of the entity's audit partition, as stored, and the chain's head
        (None when there is none): read consistently, for `audit.verify_chain`."""
        events = await self._query_all(
            KeyConditionExpression="#pk = :pk AND begins_with(#sk, :sk)",
            ExpressionAttributeNames={"#pk": schema.PK, "#sk": schema.SK},
            ExpressionAttributeValues={
                ":pk": _s(schema.audit_pk(entity_id)), ":sk": _s(schema.audit_sk())},
        )
        response = await self.call(
            "get_item", TableName=self.table_name, ConsistentRead=True,
            Key={k: _s(v) for k, v in schema.audit_head_key(entity_id).items()},
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
        key_values = {":pk": _s(schema.audit_pk(entity_id)), ":sk": _s(schema.audit_sk())}
        args: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": "#pk = :pk AND begins_with(#sk, :sk)",
            "ExpressionAttributeNames": {"#pk": schema.PK, "#sk": schema.SK},
            "ExpressionAttributeValues": key_values,
            "ScanIndexForward": oldest_first,
            "ConsistentRead": True,
        }
        start_key: dict[str, Any] | None = None
        if start_event_id is not None:
            start_key = {
                schema.PK: key_values[":pk"],
                schema.SK: _s(schema.audit_sk(start_event_id)),
            }
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
        names = {"#pk": schema.PK, "#def": schema.STORED_LIMIT_DEF} | {
            f"#{f}": f for f in schema.STORED_LIMIT_FIELDS
        }
        values = {f":{f}": _n(getattr(limit, f)) for f in schema.STORED_LIMIT_FIELDS}
        if definition is None:
            update = "REMOVE #def"
        else:
            update = "SET #def = :def"
            values[":def"] = _s(definition)
        try:
            await self.call(
                "update_item",
                TableName=self.table_name,
                Key={
                    schema.PK: _s(schema.entity_pk(entity_id)),
                    schema.SK: _s(schema.limit_sk(resource, limit.name)),
                },
                UpdateExpression=update,
                ConditionExpression="attribute_exists(#pk) AND "
                + " AND ".join(f"#{f} = :{f}" for f in schema.STORED_LIMIT_FIELDS),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except _ConditionCheckFailed:
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

    # -- version record ---------------------------------------------------------------------

    async def get_version_record(self) -> dict[str, Any] | None:
        response = await self.call(
            "get_item",
            TableName=self.table_name,
            Key={k: _s(v) for k, v in schema.version_key().items()},
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
        expr = _Expr()
        sets = [f"{expr.name(k)} = {expr.value(_s(v))}" for k, v in fields.items() if v is not None]
        sets.append(f"{expr.name('updated_at')} = {expr.value(_s(_utcnow()))}")
        sets.append(f"{expr.name('updated_by')} = {expr.value(_s(updated_by))}")
        await self.call(
            "update_item",
            TableName=self.table_name,
            Key={k: _s(v) for k, v in schema.version_key().items()},
            UpdateExpression="SET " + ", ".join(sets),
            ExpressionAttributeNames=expr.names,
            ExpressionAttributeValues=expr.values,
        )
        self.ledger.record("UpdateItem", wcu=1)

    async def create_version_record(
        self, fields: Mapping[str, str], updated_by: str = "zae-limiter"
    ) -> bool:
        """Write `SYSTEM#`/`#VERSION` with `fields` only if the table has no version record
        (one conditional PutItem); False, changing nothing, when it has one."""
        item: Item = {k: _s(v) for k, v in schema.version_key().items()}
        item |= {k: _s(v) for k, v in fields.items()}
        item |= {"updated_at": _s(_utcnow()), "updated_by": _s(updated_by)}
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
        except _ConditionCheckFailed:
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
            {schema.PK: i[schema.PK], schema.SK: i[schema.SK]}
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
        details = response.get("BackupDetails", {})
        return Backup(
            id=details.get("BackupArn"),
            name=details.get("BackupName", name),
            table=self.table_name,
            status=details.get("BackupStatus"),
            created=_iso_time(details.get("BackupCreationDateTime")),
            size_bytes=_size(details.get("BackupSizeBytes")),
        )

    async def list_backups(self) -> list[Backup]:
        """The table's on-demand backups, as DynamoDB lists them."""
        found: list[Backup] = []
        start: str | None = None
        while True:
            args: dict[str, Any] = {"TableName": self.table_name}
            if start:
                args["ExclusiveStartBackupArn"] = start
            response = await self.call("list_backups", **args)
            for summary in response.get("BackupSummaries", []):
                found.append(
                    Backup(
                        id=summary.get("BackupArn"),
                        name=summary.get("BackupName"),
                        table=summary.get("TableName"),
                        status=summary.get("BackupStatus"),
                        created=_iso_time(summary.get("BackupCreationDateTime")),
                        size_bytes=_size(summary.get("BackupSizeBytes")),
                    )
                )
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
