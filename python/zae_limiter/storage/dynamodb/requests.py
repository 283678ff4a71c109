"""The requests `Repository` sends whose expressions are built rather than written out: the
bucket write's UpdateItem (`encode_bucket_write`, its one encoder), the bucket GetItem and Key
(`BucketRequests`, parts built once per write shape and item), the key-prefix and usage snapshot
Queries (`prefix_query`, `usage_query`), and the conditional updates of bucket items, stored
limits and the version record. Arguments only: nothing here sends.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

from ... import core, schema
from ...core.windows import WINDOWS, format_window_start
from ...models import Limit
from ...usage import Moment, check_range
from ..protocol import Item, LimitWrite
from .codec import item_key, num_av, str_av

__all__ = [
    "PARTS_CACHE_SIZE",
    "BucketRequests",
    "ShapeKey",
    "UpdateShape",
    "bucket_key",
    "bucket_update_request",
    "encode_bucket_write",
    "expiry_extension",
    "legacy_restore",
    "may_create",
    "prefix_query",
    "state_reset",
    "stored_limit_definition",
    "usage_query",
    "version_update",
]

T = TypeVar("T")
AttributeValue = dict[str, Any]
# What a bucket write's expressions and attribute names depend on (see `encode_bucket_write`).
ShapeKey = tuple[tuple[object, ...], ...]
# Bound on the request parts one `BucketRequests` keeps (write shapes, item keys): a limiter sees
# few shapes, but may see any number of entities. Beyond it the oldest are forgotten.
PARTS_CACHE_SIZE = 1024


@dataclass
class _Expr:
    """Placeholders of one request's expressions, numbered in the order they are made: `#n<i>`
    for attribute names, `:v<i>` for values."""

    names: dict[str, str] = field(default_factory=dict)
    values: list[AttributeValue] = field(default_factory=list)

    def name(self, attr: str) -> str:
        key = f"#n{len(self.names)}"
        self.names[key] = attr
        return key

    def value(self, av: AttributeValue) -> str:
        self.values.append(av)
        return f":v{len(self.values) - 1}"

    def value_keys(self) -> tuple[str, ...]:
        return tuple(f":v{i}" for i in range(len(self.values)))

    def value_map(self) -> dict[str, AttributeValue]:
        return dict(zip(self.value_keys(), self.values, strict=True))


def bucket_key(entity_id: str, resource: str) -> Item:
    """The Key of a bucket item."""
    return item_key(schema.entity_pk(entity_id), schema.bucket_sk(resource))


# -- the bucket write ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpdateShape:
    """What a bucket UpdateItem's arguments hold for every write of one *shape* (which limits,
    and for each: the kind of write, whether the anchor moves, which bounds, the counter, a
    definition): the expressions, the attribute names and the value placeholders in order.
    Only the values differ between two writes of one shape. Shared by every request of the
    shape, so never modified: botocore only reads the arguments it is given."""

    update: str
    condition: str
    names: Mapping[str, str]
    value_keys: tuple[str, ...]

    def request(
        self, table_name: str, key: Item, values: Sequence[AttributeValue]
    ) -> dict[str, Any]:
        """The UpdateItem arguments of the write whose values (in placeholder order) these
        are, to the item `key`."""
        return {
            "TableName": table_name,
            "Key": key,
            "UpdateExpression": self.update,
            "ConditionExpression": self.condition,
            "ExpressionAttributeNames": self.names,
            "ExpressionAttributeValues": dict(zip(self.value_keys, values, strict=True)),
            "ReturnValues": "ALL_NEW",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }


@overload
def encode_bucket_write(
    writes: Sequence[LimitWrite],
    now_ms: int,
    entity_id: str,
    resource: str,
    write_id: str,
    expires_at: int | None = ...,
    *,
    expressions: Literal[True] = ...,
) -> tuple[ShapeKey, list[AttributeValue], UpdateShape]: ...


@overload
def encode_bucket_write(
    writes: Sequence[LimitWrite],
    now_ms: int,
    entity_id: str,
    resource: str,
    write_id: str,
    expires_at: int | None = ...,
    *,
    expressions: Literal[False],
) -> tuple[ShapeKey, list[AttributeValue], None]: ...


def encode_bucket_write(
    writes: Sequence[LimitWrite],
    now_ms: int,
    entity_id: str,
    resource: str,
    write_id: str,
    expires_at: int | None = None,
    *,
    expressions: bool = True,
) -> tuple[ShapeKey, list[AttributeValue], UpdateShape | None]:
    """One bucket write (its limits' `writes`, at `now_ms`, with the id `write_id`, setting the
    item's expiry to `expires_at` epoch seconds if given) as UpdateItem parts, in one pass: its
    shape key, its values in placeholder order and, with `expressions`, its `UpdateShape`.

    The shape key says everything the expressions and names depend on, so requests of one shape
    share one `UpdateShape`. The limiter's path builds that once per shape and otherwise asks
    for the values only (`expressions=False`): no strings are built then.
    """
    shape: list[tuple[object, ...]] = []
    values: list[AttributeValue] = []
    x = _Expr(values=values) if expressions else None
    # Each value is put once, in placeholder order; `put` returns its placeholder when `x`
    # builds the expressions, and is the bare append (None) when it does not.
    put: Callable[[AttributeValue], str | None] = values.append if x is None else x.value
    sets: list[str] = []
    adds: list[str] = []
    conditions: list[str] = []
    for w in writes:
        level = put({"N": str(w.value)})
        legacy = fence = None
        if w.legacy is not None:
            legacy = put({"N": str(w.legacy[0])}), put({"N": str(w.legacy[1])})
            if w.fence is not None:
                fence = put({"N": str(w.fence[0])}), put({"N": str(w.fence[1])})
            kind: tuple[object, ...] = (w.mode, "legacy", w.fence is not None)
        elif w.create:
            kind = (w.mode, "create")
        else:
            kind = (w.mode,)
        lo = None if w.cond_lo is None else put({"N": str(w.cond_lo)})
        hi = None if w.cond_hi is None else put({"N": str(w.cond_hi)})
        counted = put({"N": str(abs(w.delta_milli))}) if w.delta_milli else None
        definition = None if w.definition is None else put({"S": w.definition})
        window = bound = None
        if w.window is not None:
            window = put({"N": str(w.window)})
            bound = None if w.window_bound is None else put({"N": str(w.window_bound)})
            kind += ("quota", w.window_bound is not None)
        counter = (w.delta_milli > 0) - (w.delta_milli < 0)
        kind += (w.cond_lo is not None, w.cond_hi is not None)
        shape.append((w.limit_name, kind, counter, w.definition is not None))
        if x is None:
            continue
        fa = x.name(schema.limit_attr(schema.FULL_AT, w.limit_name))
        if w.mode == core.WRITE_ADD:
            # ADD, not SET: on a limit reset meanwhile it starts from 0, a bucket full since
            # 1970, as a give-back to a full bucket should leave it.
            adds.append(f"{fa} {level}")
        elif w.mode == core.WRITE_RELATIVE:
            sets.append(f"{fa} = {fa} + {level}")
        else:
            sets.append(f"{fa} = {level}")
        if w.create or legacy is not None:
            lr = x.name(schema.limit_attr(schema.LAST_REFILL, w.limit_name))
            conditions.append(f"attribute_not_exists({fa})")
            if legacy is None:
                conditions.append(f"attribute_not_exists({lr})")
            else:
                tk = x.name(schema.limit_attr(schema.TOKENS, w.limit_name))
                conditions.append(f"{tk} = {legacy[0]}")
                conditions.append(f"{lr} = {legacy[1]}")
                if fence is not None:
                    sets.append(f"{tk} = {fence[0]}")
                    sets.append(f"{lr} = {fence[1]}")
        if window is not None:
            qw = x.name(schema.limit_attr(schema.QUOTA_WINDOW, w.limit_name))
            if bound is None:
                # Within the stored window: a write made on another window's view is refused.
                conditions.append(f"{qw} = {window}")
            else:
                # Opening a window: only over no window or one that ended by the writer's view.
                conditions.append(f"(attribute_not_exists({qw}) OR {qw} < {bound})")
                sets.append(f"{qw} = {window}")
        if lo is not None:
            conditions.append(f"{fa} >= {lo}")
        if hi is not None:
            conditions.append(f"{fa} <= {hi}")
        if counted is not None:
            name = schema.CONSUMED if w.delta_milli > 0 else schema.RELEASED
            adds.append(f"{x.name(schema.limit_attr(name, w.limit_name))} {counted}")
        if definition is not None:
            lm = x.name(schema.limit_attr(schema.LIMIT_DEF, w.limit_name))
            sets.append(f"{lm} = {definition}")
    now = put({"N": str(now_ms)})
    # The shape says already whether the write may create the item (its kinds name "create" or
    # "legacy") and whether the ring exists (kinds and bounds); only the expiry is added.
    creates = may_create(writes)
    named = (put({"S": entity_id}), put({"S": resource})) if creates else None
    ttl = None
    if expires_at is not None:
        ttl = put({"N": str(expires_at)})
        shape.append((schema.TTL_ATTRIBUTE,))  # a limit's part is never a 1-tuple
    empty = None if _ring_exists(writes) else put({"S": ""})
    wid = put({"S": write_id})
    if x is None:
        return tuple(shape), values, None
    sets.append(f"{x.name(schema.WRITE_TIME)} = {now}")
    if named is not None:
        # The item's names, for people reading the table; nothing reads them back (the key
        # says the same), so only a write that may create the item sets them, not every write
        # (each SET is parsed by the server and serialized by the client).
        sets.append(f"{x.name('entity_id')} = {named[0]}")
        sets.append(f"{x.name('resource')} = {named[1]}")
    if ttl is not None:
        sets.append(f"{x.name(schema.TTL_ATTRIBUTE)} = {ttl}")
    # Shift the ring of recent write ids; SET reads every right-hand side from the old item.
    slots = [x.name(slot) for slot in schema.WRITE_ID_SLOTS]
    sets.append(f"{slots[0]} = {wid}")
    for newer, older in itertools.pairwise(slots):
        sets.append(
            f"{older} = {newer}" if empty is None else f"{older} = if_not_exists({newer}, {empty})"
        )
    update = "SET " + ", ".join(sets)
    if adds:
        update += " ADD " + ", ".join(adds)
    # A resend of a write whose earlier attempt may still land (a response lost or timed out
    # in flight) must not apply twice: each write id applies at most once.
    # (IN rather than one comparison per slot: the same test, fewer tokens for the server.)
    conditions.append(f"NOT ({wid} IN ({', '.join(slots)}))")
    parts = UpdateShape(update, " AND ".join(conditions), x.names, x.value_keys())
    return tuple(shape), values, parts


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
    request, which `BucketRequests.update` sends from parts built once per shape."""
    _, values, parts = encode_bucket_write(
        writes, now_ms, entity_id, resource, write_id, expires_at
    )
    return parts.request(table_name, bucket_key(entity_id, resource), values)


def _ring_exists(writes: Sequence[LimitWrite]) -> bool:
    """Whether a bucket write can only apply to an item that holds every slot of the write-id
    ring, so that the ring shifts with plain copies (shorter for the server to parse than
    `if_not_exists`). True when one of its limits is conditioned on a bound of its `fa#`
    (a comparison with an absent attribute is false: the write fails unless the limit is
    stored) and none is created or in the legacy layout: a limit's `fa#` is only ever written
    by a bucket write, whose every write leaves all four slots (empty ones as "")."""
    return not may_create(writes) and any(
        w.cond_lo is not None
        or w.cond_hi is not None
        or (w.window is not None and w.window_bound is None)  # `qw#` exists: a bucket write's
        for w in writes
    )


def may_create(writes: Sequence[LimitWrite]) -> bool:
    """Whether a bucket write may create its item: one of its limits is written on a view of
    the limit absent (an absent item) or in the legacy layout (an item no write of this layout
    has named yet). A write on a view of the limit present finds the item there, named."""
    return any(w.create or w.legacy is not None for w in writes)


def _remember(cache: dict[Any, T], key: Any, value: T) -> T:
    if len(cache) >= PARTS_CACHE_SIZE:
        del cache[next(iter(cache))]
    cache[key] = value
    return value


class BucketRequests:
    """The bucket GetItem and UpdateItem of one table, from parts built once: each write
    shape's `UpdateShape` and each item's Key, shared by its requests (never modified), at most
    `PARTS_CACHE_SIZE` of each."""

    def __init__(self, table_name: str) -> None:
        self.table_name = table_name
        self._shapes: dict[ShapeKey, UpdateShape] = {}
        self._keys: dict[tuple[str, str], Item] = {}

    @property
    def shapes(self) -> Mapping[ShapeKey, UpdateShape]:
        """The write shapes built so far (oldest first)."""
        return self._shapes

    @property
    def keys(self) -> Mapping[tuple[str, str], Item]:
        """The item keys built so far by (entity, resource) (oldest first)."""
        return self._keys

    def key(self, entity_id: str, resource: str) -> Item:
        key = self._keys.get((entity_id, resource))
        if key is None:
            key = _remember(self._keys, (entity_id, resource), bucket_key(entity_id, resource))
        return key

    def get(self, entity_id: str, resource: str) -> dict[str, Any]:
        """The consistent GetItem of the bucket item."""
        return {
            "TableName": self.table_name,
            "Key": self.key(entity_id, resource),
            "ConsistentRead": True,
        }

    def update(
        self,
        entity_id: str,
        resource: str,
        writes: Sequence[LimitWrite],
        now_ms: int,
        write_id: str,
        expires_at: int | None = None,
    ) -> dict[str, Any]:
        """`bucket_update_request`, from the parts of its write shape (built on first use)."""
        shape_key, values, _ = encode_bucket_write(
            writes, now_ms, entity_id, resource, write_id, expires_at, expressions=False
        )
        parts = self._shapes.get(shape_key)
        if parts is None:
            _, _, built = encode_bucket_write(
                writes, now_ms, entity_id, resource, write_id, expires_at
            )
            parts = _remember(self._shapes, shape_key, built)
        return parts.request(self.table_name, self.key(entity_id, resource), values)


# -- other conditional updates -----------------------------------------------------------------


def expiry_extension(table_name: str, key: Item, expires_at: int) -> dict[str, Any]:
    """The UpdateItem setting the item's expiry to `expires_at` only if it is earlier (or
    unset) and the item exists: monotone, so resends and racing writers leave the latest."""
    return {
        "TableName": table_name,
        "Key": key,
        "UpdateExpression": "SET #ttl = :ttl",
        "ConditionExpression": "attribute_exists(#pk) AND "
        "(attribute_not_exists(#ttl) OR #ttl < :ttl)",
        "ExpressionAttributeNames": {"#pk": schema.PK, "#ttl": schema.TTL_ATTRIBUTE},
        "ExpressionAttributeValues": {":ttl": num_av(expires_at)},
    }


def state_reset(
    table_name: str, entity_id: str, resource: str, limit_names: Iterable[str]
) -> dict[str, Any]:
    """The UpdateItem removing the named limits' state from the bucket item (counters stay),
    if the item exists."""
    expr = _Expr()
    removes = [
        expr.name(schema.limit_attr(state_field, limit_name))
        for limit_name in limit_names
        for state_field in (schema.FULL_AT, schema.TOKENS, schema.LAST_REFILL, schema.QUOTA_WINDOW)
    ]
    return {
        "TableName": table_name,
        "Key": bucket_key(entity_id, resource),
        "UpdateExpression": "REMOVE " + ", ".join(removes),
        "ConditionExpression": "attribute_exists(#pk)",
        "ExpressionAttributeNames": expr.names | {"#pk": schema.PK},
    }


def legacy_restore(
    table_name: str, key: Item, limit_name: str, full_at: int, legacy: tuple[int, int]
) -> dict[str, Any]:
    """The UpdateItem putting one limit back in the 1.x layout (tokens at an anchor), only
    while it still holds exactly `full_at`."""
    expr = _Expr()
    fa = expr.name(schema.limit_attr(schema.FULL_AT, limit_name))
    tk = expr.name(schema.limit_attr(schema.TOKENS, limit_name))
    lr = expr.name(schema.limit_attr(schema.LAST_REFILL, limit_name))
    update = f"SET {tk} = {expr.value(num_av(legacy[0]))}, {lr} = {expr.value(num_av(legacy[1]))}"
    condition = f"{fa} = {expr.value(num_av(full_at))}"
    return {
        "TableName": table_name,
        "Key": key,
        "UpdateExpression": f"{update} REMOVE {fa}",
        "ConditionExpression": condition,
        "ExpressionAttributeNames": expr.names,
        "ExpressionAttributeValues": expr.value_map(),
    }


def stored_limit_definition(
    table_name: str, entity_id: str, resource: str, limit: Limit, definition: str | None
) -> dict[str, Any]:
    """The UpdateItem setting (None: removing) a stored limit's `limit_def` copy, only while
    the item exists and still holds `limit`."""
    names = {"#pk": schema.PK, "#def": schema.STORED_LIMIT_DEF} | {
        f"#{f}": f for f in schema.STORED_LIMIT_FIELDS
    }
    values = {f":{f}": num_av(getattr(limit, f)) for f in schema.STORED_LIMIT_FIELDS}
    if definition is None:
        update = "REMOVE #def"
    else:
        update = "SET #def = :def"
        values[":def"] = str_av(definition)
    return {
        "TableName": table_name,
        "Key": item_key(schema.entity_pk(entity_id), schema.limit_sk(resource, limit.name)),
        "UpdateExpression": update,
        "ConditionExpression": "attribute_exists(#pk) AND "
        + " AND ".join(f"#{f} = :{f}" for f in schema.STORED_LIMIT_FIELDS),
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }


def version_update(
    table_name: str, fields: Mapping[str, str | None], updated_at: str, updated_by: str
) -> dict[str, Any]:
    """The UpdateItem setting the given (not None) fields of the version record, creating it
    if need be."""
    expr = _Expr()
    sets = [
        f"{expr.name(k)} = {expr.value(str_av(v))}" for k, v in fields.items() if v is not None
    ]
    sets.append(f"{expr.name('updated_at')} = {expr.value(str_av(updated_at))}")
    sets.append(f"{expr.name('updated_by')} = {expr.value(str_av(updated_by))}")
    return {
        "TableName": table_name,
        "Key": item_key(schema.SYSTEM_PK, schema.VERSION_SK),
        "UpdateExpression": "SET " + ", ".join(sets),
        "ExpressionAttributeNames": expr.names,
        "ExpressionAttributeValues": expr.value_map(),
    }


# -- queries -------------------------------------------------------------------------------------


def prefix_query(pk: str, sk_prefix: str) -> dict[str, Any]:
    """Query arguments (all but TableName and paging) for the items of the partition `pk`
    whose sort key begins with `sk_prefix`."""
    return {
        "KeyConditionExpression": "#pk = :pk AND begins_with(#sk, :sk)",
        "ExpressionAttributeNames": {"#pk": schema.PK, "#sk": schema.SK},
        "ExpressionAttributeValues": {":pk": str_av(pk), ":sk": str_av(sk_prefix)},
    }



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
    values: dict[str, Any] = {":pk": str_av(schema.entity_pk(entity_id))}
    args: dict[str, Any] = {}
    if resource is not None and window is not None and lo is not None and hi is not None:
        # Window starts of one window type sort chronologically, so the key range is exact.
        values[":lo"] = str_av(schema.usage_sk(resource, window, format_window_start(window, lo)))
        values[":hi"] = str_av(schema.usage_sk(resource, window, format_window_start(window, hi)))
        args["KeyConditionExpression"] = "#pk = :pk AND #sk BETWEEN :lo AND :hi"
    else:
        if resource is None:
            prefix = schema.usage_sk()
        elif window is None:
            prefix = schema.usage_sk(resource)
        else:
            prefix = schema.usage_sk(resource, window)
        values[":prefix"] = str_av(prefix)
        args["KeyConditionExpression"] = "#pk = :pk AND begins_with(#sk, :prefix)"
        clauses: list[str] = []
        needs_window = resource is None and window is not None
        if lo is not None or hi is not None or needs_window:
            # Bounds are compared as window-start strings, which only sort within one window
            # type: hence one clause per window type.
            for i, w in enumerate([window] if window is not None else list(WINDOWS)):
                parts: list[str] = []
                if window is None or resource is None:
                    names["#window"] = schema.SNAPSHOT_WINDOW
                    values[f":w{i}"] = str_av(w)
                    parts.append(f"#window = :w{i}")
                if lo is not None:
                    names["#ws"] = schema.SNAPSHOT_WINDOW_START
                    values[f":lo{i}"] = str_av(format_window_start(w, lo))
                    parts.append(f"#ws >= :lo{i}")
                if hi is not None:
                    names["#ws"] = schema.SNAPSHOT_WINDOW_START
                    values[f":hi{i}"] = str_av(format_window_start(w, hi))
                    parts.append(f"#ws <= :hi{i}")
                clauses.append("(" + " AND ".join(parts) + ")")
            args["FilterExpression"] = " OR ".join(clauses)
    args["ExpressionAttributeNames"] = names
    args["ExpressionAttributeValues"] = values
    return args
