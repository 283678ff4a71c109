"""The concurrency caps' item: its requests (take, release, renew) and its decoding.

One item per (entity, resource) (`schema.slots_sk`), apart from the bucket item. Per cap,
`sh#<cap>` counts the slots held and `sl#<cap>#<lease id>` is one lease's entry,
"<slots>:<expires_at ms>". Every write changes a count and its entries in one UpdateItem, so the
count is always the sum of the entries, and each write is conditioned so that a resend after a
lost response applies nothing a second time (docs/design.md, "Concurrency caps"). `MemoryStorage`
evaluates the same conditions (`conditions_hold`, `updated`), so both backends decide alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ... import schema
from ..capacity import item_size
from ..protocol import Item, SlotConflict, SlotItem, SlotTake, StorageError
from .codec import item_key, item_num, item_str, num_av, str_av


def slots_key(entity_id: str, resource: str) -> Item:
    return item_key(schema.entity_pk(entity_id), schema.slots_sk(resource))


def entry_value(slots: int, expires_at_ms: int) -> str:
    return f"{slots}:{expires_at_ms}"


def parse_entry(value: str) -> tuple[int, int]:
    slots, _, expires = value.partition(":")
    return int(slots), int(expires)


def slots_from_item(item: Item, size: int | None = None) -> SlotItem:
    held: dict[str, int] = {}
    holders: dict[str, dict[str, tuple[int, int]]] = {}
    for attr, av in item.items():
        field, sep, cap = attr.partition(schema.SEP)
        if field == schema.SLOTS_HELD and sep and "N" in av:
            held[cap] = int(av["N"])
            continue
        parsed = schema.parse_slot_entry_attr(attr)
        if parsed is not None and "S" in av:
            holders.setdefault(parsed[0], {})[parsed[1]] = parse_entry(av["S"])
    pk, sk = item[schema.PK]["S"], item[schema.SK]["S"]
    return SlotItem(
        entity_id=schema.entity_id_from_pk(pk),
        resource=sk[len(schema.SLOTS_PREFIX) :],
        held=held,
        holders=holders,
        size=item_size(item) if size is None else size,
    )


# -- the operations, as data both backends read ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """One condition: `attr` absent (`absent`), present (`present`), equal to `equals`, or
    (`at_most`) absent or a number at most that."""

    attr: str
    absent: bool = False
    present: bool = False
    equals: str | None = None
    at_most: int | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """The update: numbers added (`add`, absent counts as 0), strings set, attributes removed."""

    add: tuple[tuple[str, int], ...] = ()
    put: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


def take_op(lease_id: str, takes: Sequence[SlotTake]) -> tuple[list[Check], Change]:
    """Every cap: the lease's entry absent (a resend after the take landed is refused), every
    reaped entry still exactly as read, and (a hard cap) the count at most
    `max - slots + freed`; then the entry set, the reaped ones removed and the count moved by
    `slots - freed`."""
    checks: list[Check] = []
    add: list[tuple[str, int]] = []
    put: list[tuple[str, str]] = []
    remove: list[str] = []
    for take in takes:
        mine = schema.slot_entry_attr(take.cap, lease_id)
        held = schema.limit_attr(schema.SLOTS_HELD, take.cap)
        freed = sum(n for _, n, _ in take.reap)
        checks.append(Check(mine, absent=True))
        if not take.soft:  # a soft cap is taken past its max: only its entries are checked
            checks.append(Check(held, at_most=take.max_in_flight - take.slots + freed))
        for other, n, expires in take.reap:
            attr = schema.slot_entry_attr(take.cap, other)
            checks.append(Check(attr, equals=entry_value(n, expires)))
            remove.append(attr)
        put.append((mine, entry_value(take.slots, take.expires_at_ms)))
        add.append((held, take.slots - freed))
    return checks, Change(tuple(add), tuple(put), tuple(remove))


def release_op(lease_id: str, slots: Mapping[str, int]) -> tuple[list[Check], Change]:
    """Every entry present (removed once: a resend after it landed is refused), then removed
    and its slots subtracted from its cap's count."""
    checks = [Check(schema.slot_entry_attr(cap, lease_id), present=True) for cap in slots]
    change = Change(
        add=tuple((schema.limit_attr(schema.SLOTS_HELD, cap), -n) for cap, n in slots.items()),
        remove=tuple(schema.slot_entry_attr(cap, lease_id) for cap in slots),
    )
    return checks, change


def renew_op(lease_id: str, entries: Mapping[str, tuple[int, int]]) -> tuple[list[Check], Change]:
    """Every entry present (a renewal never brings back a released or reaped entry), then set
    to its later expiry: a resend sets the same value again."""
    checks = [Check(schema.slot_entry_attr(cap, lease_id), present=True) for cap in entries]
    change = Change(
        put=tuple(
            (schema.slot_entry_attr(cap, lease_id), entry_value(n, x))
            for cap, (n, x) in entries.items()
        )
    )
    return checks, change


def update_request(
    table_name: str, key: Item, checks: Sequence[Check], change: Change
) -> dict[str, Any]:
    """The UpdateItem of `change` under every check, returning the item either way."""
    names: dict[str, str] = {}
    values: dict[str, Any] = {}

    def name(attr: str) -> str:
        ref = f"#a{len(names)}"
        names[ref] = attr
        return ref

    def value(av: dict[str, Any]) -> str:
        ref = f":v{len(values)}"
        values[ref] = av
        return ref

    conditions: list[str] = []
    for check in checks:
        ref = name(check.attr)
        if check.absent:
            conditions.append(f"attribute_not_exists({ref})")
        elif check.present:
            conditions.append(f"attribute_exists({ref})")
        elif check.equals is not None:
            conditions.append(f"{ref} = {value(str_av(check.equals))}")
        elif check.at_most is not None:
            conditions.append(
                f"(attribute_not_exists({ref}) OR {ref} <= {value(num_av(check.at_most))})"
            )
    clauses: list[str] = []
    if change.put:
        clauses.append("SET " + ", ".join(f"{name(a)} = {value(str_av(v))}" for a, v in change.put))
    if change.remove:
        clauses.append("REMOVE " + ", ".join(name(a) for a in change.remove))
    if change.add:
        clauses.append("ADD " + ", ".join(f"{name(a)} {value(num_av(n))}" for a, n in change.add))
    request: dict[str, Any] = {
        "TableName": table_name,
        "Key": key,
        "UpdateExpression": " ".join(clauses),
        "ExpressionAttributeNames": names,
        "ReturnValues": "ALL_NEW",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }
    if conditions:
        request["ConditionExpression"] = " AND ".join(conditions)
    if values:
        request["ExpressionAttributeValues"] = values
    return request


def conditions_hold(item: Item, checks: Sequence[Check]) -> bool:
    """The ConditionExpression of `update_request`, evaluated on `item` (`MemoryStorage`)."""
    for check in checks:
        present = check.attr in item
        if check.absent and present:
            return False
        if check.present and not present:
            return False
        if check.equals is not None and item_str(item, check.attr) != check.equals:
            return False
        if check.at_most is not None and present:
            number = item_num(item, check.attr)
            if number is None or number > check.at_most:
                return False
    return True


def updated(item: Item | None, key: Item, change: Change) -> Item:
    """The item after the UpdateExpression of `update_request` (`MemoryStorage`)."""
    new: Item = dict(item or {}) | dict(key)
    for attr, text in change.put:
        new[attr] = str_av(text)
    for attr in change.remove:
        new.pop(attr, None)
    for attr, n in change.add:
        new[attr] = num_av((item_num(new, attr) or 0) + n)
    return new


SlotWrite = Callable[[Sequence["Check"], "Change"], Awaitable[object]]
"""A backend's conditional write of a slot item (`SlotConflict` with the item when refused)."""


async def release_each(lease_id: str, slots: Mapping[str, int], write: SlotWrite) -> bool:
    """Release the lease's entries with `write` (each under `attribute_exists`, so a resend or a
    race with a reaper subtracts its slots at most once); when refused, the entries still there
    are released alone. False when none was there. Both backends release through here."""
    caps = dict(slots)
    while caps:
        checks, change = release_op(lease_id, caps)
        try:
            await write(checks, change)
            return True
        except SlotConflict as exc:
            have = exc.current.holders if exc.current else {}
            left = {c: n for c, n in caps.items() if lease_id in have.get(c, {})}
            if left == caps:  # nothing to tell apart: not ours to settle
                raise StorageError("SlotReleaseConflict", "release refused") from None
            caps = left
    return False


async def renew_each(
    lease_id: str, entries: Mapping[str, tuple[int, int]], write: SlotWrite
) -> bool:
    """Move the lease's entries' expiry with `write`, only where an entry is still there; False
    when some was not (reaped: those slots are no longer held)."""
    todo = dict(entries)
    whole = True
    while todo:
        checks, change = renew_op(lease_id, todo)
        try:
            await write(checks, change)
            return whole
        except SlotConflict as exc:
            have = exc.current.holders if exc.current else {}
            left = {c: e for c, e in todo.items() if lease_id in have.get(c, {})}
            if left == todo:
                raise StorageError("SlotRenewConflict", "renewal refused") from None
            todo, whole = left, False
    return False
