"""The audit trail: event ids, the events of each audited change, and how one is recorded.

An `AuditEvent` is recorded after a change to an entity or its stored limits has been applied
(`create_entity`, `delete_entity`, `set_limits`, `delete_limits`, by the limiter or the CLI). Its
id is a ULID-like string: 26 Crockford base-32 characters, a 48-bit millisecond timestamp then
80 random bits, so ids are unique and sort in time order; within one process they are strictly
increasing (an id in the same millisecond as the last one, or after the clock stepped back, is
the last one plus one). Events use the wall clock, not a limiter's injected `clock=`: they say
when a change really happened.

What happens when an event cannot be recorded after its change landed: `record` logs the whole
event at ERROR level (logger `zae_limiter.audit`) and raises `RateLimiterUnavailable`, saying the
change was applied; it never drops an event silently. A caller cancelled while the event is being
written does not cancel the write.

Tamper evidence: each entity's events form a hash chain. An event item carries its sequence
number (`seq`, from 1), the hash of the entity's previous event (`prev`), that event's id
(`prev_id`) and its own hash `h`: SHA-256 over a canonical encoding of every other attribute of
the item (keys, fields, details, ttl, seq, prev, prev_id; `chain_hash`). A head item per entity
(`schema.audit_head_key`) holds the last `seq` and `h`; an append claims the next sequence
number with a conditional write on the head, then writes the event (`Repository.put_audit_event`).
`verify_chain` walks a partition and names every event changed, missing (deleted in the middle,
at the start before its 90 days were over, or at the end: the head remembers the last one), or
linked to the wrong predecessor. Events recorded before the chain existed carry none of this and
are reported as unchained legacy events, not as failures. What the chain cannot show on its own
(a writer who recomputes every hash from the changed event up to a rewritten head) the stream
shows: the aggregator counts every change of an audit item that is neither an append nor TTL
expiry (`schema.AUDIT_CHANGES_METRIC`), and an alarm watches that count. docs/design.md says
what holds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Protocol

from . import schema
from .core.units import iso_utc
from .exceptions import RateLimiterUnavailable
from .models import AuditAction, AuditEvent, Entity, Limit

__all__ = [
    "CHAIN_START",
    "EVENT_ID_LENGTH",
    "AuditChainReader",
    "AuditWriter",
    "ChainProblem",
    "ChainReport",
    "chain_hash",
    "defaults_deleted",
    "defaults_set",
    "entity_created",
    "entity_deleted",
    "event_time_ms",
    "is_event_id",
    "limits_deleted",
    "limits_set",
    "new_event",
    "new_event_id",
    "record",
    "switch_changed",
    "verify_chain",
    "verify_trail",
]

log = logging.getLogger("zae_limiter.audit")

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base 32: no I, L, O, U
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
EVENT_ID_LENGTH = 26
_TIME_CHARS = 10
_RANDOM_BITS = 80
_MAX_MS = (1 << 48) - 1


class _IdSource:
    """Strictly increasing ids in this process (thread-safe: sync limiters run on threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def next(self, now_ms: int) -> str:
        with self._lock:
            if now_ms > self._last_ms:
                ms, rand = now_ms, secrets.randbits(_RANDOM_BITS)
            else:  # same millisecond, or the clock stepped back: one past the last id
                ms, rand = self._last_ms, self._last_random + 1
                if rand >> _RANDOM_BITS:
                    ms, rand = ms + 1, secrets.randbits(_RANDOM_BITS)
            if not 0 <= ms <= _MAX_MS:
                raise ValueError(f"time {ms} ms cannot be encoded in an event id")
            self._last_ms, self._last_random = ms, rand
        return _encode((ms << _RANDOM_BITS) | rand)


def _encode(value: int) -> str:
    chars = []
    for _ in range(EVENT_ID_LENGTH):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


_IDS = _IdSource()


def new_event_id(now_ms: int | None = None) -> str:
    """A new event id: unique, and later than every id this process made before."""
    return _IDS.next(time.time_ns() // 1_000_000 if now_ms is None else now_ms)


def is_event_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == EVENT_ID_LENGTH
        and all(c in _DECODE for c in value)
        and value[0] <= "7"  # 130 bits of text hold 128 bits of id
    )


def event_time_ms(event_id: str) -> int:
    """The millisecond timestamp an event id starts with."""
    if not is_event_id(event_id):
        raise ValueError(f"not an event id: {event_id!r}")
    ms = 0
    for c in event_id[:_TIME_CHARS]:
        ms = (ms << 5) | _DECODE[c]
    return ms


def new_event(
    action: str,
    entity_id: str,
    principal: str | None = None,
    resource: str | None = None,
    details: Mapping[str, Any] | None = None,
    now_ms: int | None = None,
) -> AuditEvent:
    """An event with a new id; its `timestamp` is the id's millisecond, ISO-8601 UTC."""
    event_id = new_event_id(now_ms)
    return AuditEvent(
        event_id=event_id,
        timestamp=iso_utc(event_time_ms(event_id)),
        action=action,
        entity_id=entity_id,
        principal=principal,
        resource=resource,
        details=dict(details or {}),
    )


# -- the events of each audited change (their details are 0.2.0's) -------------------------------


def entity_created(entity: Entity, principal: str | None) -> AuditEvent:
    return new_event(
        AuditAction.ENTITY_CREATED,
        entity.id,
        principal,
        details={
            "name": entity.name or entity.id,
            "parent_id": entity.parent_id,
            "metadata": dict(entity.metadata),
        },
    )


def entity_deleted(entity_id: str, principal: str | None, records_deleted: int) -> AuditEvent:
    return new_event(
        AuditAction.ENTITY_DELETED,
        entity_id,
        principal,
        details={"records_deleted": records_deleted},
    )


def limits_set(
    entity_id: str, resource: str, limits: Sequence[Limit], principal: str | None
) -> AuditEvent:
    return new_event(
        AuditAction.LIMITS_SET,
        entity_id,
        principal,
        resource,
        details={"limits": [limit.to_dict() for limit in limits]},
    )


def limits_deleted(
    entity_id: str, resource: str, principal: str | None, limits_deleted: int
) -> AuditEvent:
    return new_event(
        AuditAction.LIMITS_DELETED,
        entity_id,
        principal,
        resource,
        details={"limits_deleted": limits_deleted},
    )


_SWITCH_ACTIONS: Final = {
    ("resource", schema.SWITCH_DISABLED): AuditAction.RESOURCE_DISABLED,
    ("resource", schema.SWITCH_BYPASS): AuditAction.RESOURCE_BYPASSED,
    ("resource", None): AuditAction.RESOURCE_ENABLED,
    ("entity", schema.SWITCH_DISABLED): AuditAction.ENTITY_DISABLED,
    ("entity", schema.SWITCH_BYPASS): AuditAction.ENTITY_BYPASSED,
    ("entity", None): AuditAction.ENTITY_ENABLED,
}


def switch_changed(
    kind: str, name: str, state: str | None, previous: str | None, principal: str | None
) -> AuditEvent:
    """A kill switch set (`state`) or cleared (None): in the entity's trail, or in the
    resource's (`$RESOURCE:<resource>`, with its default limits' changes). `previous`: the state
    it replaced."""
    resource = name if kind == "resource" else None
    return new_event(
        _SWITCH_ACTIONS[(kind, state)],
        schema.resource_audit_id(name) if kind == "resource" else name,
        principal,
        resource,
        details={"state": state or "enabled", "previous": previous or "enabled"},
    )


def defaults_set(resource: str, limits: Sequence[Limit], principal: str | None) -> AuditEvent:
    """`LIMITS_SET` of a default level, in the trail `$SYSTEM` (`resource` is
    `DEFAULT_RESOURCE`) or `$RESOURCE:<resource>` (0.17's ids for these changes)."""
    return limits_set(schema.defaults_audit_id(resource), resource, limits, principal)


def defaults_deleted(resource: str, principal: str | None, count: int) -> AuditEvent:
    return limits_deleted(schema.defaults_audit_id(resource), resource, principal, count)


# -- recording ------------------------------------------------------------------------------


class AuditWriter(Protocol):
    async def put_audit_event(self, event: AuditEvent) -> None: ...


# Writes still running for a caller that was cancelled (kept referenced until they finish).
_DETACHED: set[asyncio.Future[None]] = set()


def _lost(event: AuditEvent, exc: BaseException) -> RateLimiterUnavailable:
    log.error(
        "audit event NOT recorded (the change was applied): %s; error: %s",
        json.dumps(event.to_dict(), sort_keys=True, default=str),
        exc,
    )
    return RateLimiterUnavailable(
        f"{event.action} was applied, but its audit event {event.event_id} could not be "
        f"recorded (it is logged by zae_limiter.audit): {exc}",
        exc,
        entity_id=event.entity_id,
        resource=event.resource,
    )


async def _write(storage: AuditWriter, event: AuditEvent) -> None:
    try:
        await storage.put_audit_event(event)
    except Exception as exc:  # an outage, a refusal, the table gone: never silent
        raise _lost(event, exc) from exc


def _settle(future: asyncio.Future[None]) -> None:
    _DETACHED.discard(future)
    if not future.cancelled():
        future.exception()  # already logged by `_lost`; retrieved so asyncio does not warn


async def record(storage: AuditWriter, event: AuditEvent) -> None:
    """Write `event` (once, also when the storage resends the request). On failure: the event is
    logged at ERROR and `RateLimiterUnavailable` raised. A cancelled caller leaves the write
    running to its end."""
    task = asyncio.ensure_future(_write(storage, event))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            _DETACHED.add(task)
            task.add_done_callback(_settle)
        raise


# -- the hash chain -------------------------------------------------------------------------

# The `prev` of an entity's first chained event.
CHAIN_START: Final = "0" * 64


def _canonical_number(text: str) -> str:
    # DynamoDB stores numbers normalised ("1.50" comes back as "1.5"): hash the value, not the
    # spelling it was sent with.
    try:
        return format(Decimal(text).normalize(), "f")
    except InvalidOperation:
        return text


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        if "N" in value and len(value) == 1:
            return {"N": _canonical_number(str(value["N"]))}
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset):
        return sorted(str(_canonical(v)) for v in value)
    return value


def chain_hash(item: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of an audit item's attributes, `h` itself excluded: keys sorted, numbers
    normalised, compact JSON in UTF-8. Any attribute added, removed or changed changes it."""
    body = {k: v for k, v in item.items() if k != schema.AUDIT_HASH}
    text = json.dumps(_canonical(body), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainProblem:
    """One way the trail differs from what was appended. `kind`: `altered` (the event's hash
    no longer matches its attributes), `ttl` (its expiry is not the 90 days it was written
    with), `missing` (sequence numbers absent that had not expired), `broken_link` (`prev` is
    not the previous event's hash), `duplicate` (two events claim one sequence number) or
    `head` (the head disagrees with the last event)."""

    kind: str
    detail: str
    seq: int | None = None
    event_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "event_id": self.event_id,
                "detail": self.detail}


@dataclass(frozen=True)
class ChainReport:
    """What `verify_chain` found for one entity. `intact` when there is no problem."""

    entity_id: str
    chained: int
    legacy: int
    head_seq: int
    expired: int
    problems: tuple[ChainProblem, ...] = field(default_factory=tuple)

    @property
    def intact(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "entity_id": self.entity_id,
            "intact": self.intact,
            "chained_events": self.chained,
            "legacy_events": self.legacy,
            "head_seq": self.head_seq,
            "expired_events": self.expired,
            "problems": [p.to_dict() for p in self.problems],
        }


def _s(item: Mapping[str, Any], attr: str) -> str | None:
    value = item.get(attr)
    return str(value["S"]) if isinstance(value, Mapping) and "S" in value else None


def _int(item: Mapping[str, Any], attr: str) -> int | None:
    value = item.get(attr)
    if not isinstance(value, Mapping) or "N" not in value:
        return None
    try:
        return int(Decimal(str(value["N"])))
    except (InvalidOperation, ValueError):
        return None


def _expired(event_id: str | None, now_s: float) -> bool:
    """Whether the event `event_id` is past its 90 days (the TTL it was written with, which
    an id fixes: the id carries the millisecond the TTL is counted from)."""
    if event_id is None or not is_event_id(event_id):
        return False
    return schema.audit_ttl(event_time_ms(event_id)) <= now_s


def _event_id_of(item: Mapping[str, Any]) -> str | None:
    sk = _s(item, schema.SK) or ""
    return _s(item, schema.AUDIT_EVENT_ID) or (
        sk[len(schema.AUDIT_PREFIX):] if sk.startswith(schema.AUDIT_PREFIX) else None)


def verify_chain(
    entity_id: str,
    items: Sequence[Mapping[str, Any]],
    head: Mapping[str, Any] | None,
    now_s: float | None = None,
) -> ChainReport:
    """Check the stored event items of `entity_id` (low-level AttributeValue form, as read from
    the table) and the head of its chain.

    A sequence number may be missing only when it expired: before the first present event, or
    between two, when the event after the gap names a predecessor (`prev_id`) whose 90 days are
    over; after the last one, when both the head's event and the last present one are past
    their 90 days. Items without chain attributes are legacy events (recorded before the chain)
    and count as such, not as problems.
    """
    now = time.time() if now_s is None else now_s
    problems: list[ChainProblem] = []
    legacy = 0
    chained: list[tuple[int, str, Mapping[str, Any]]] = []  # (seq, event id, item)
    for item in items:
        event_id = _event_id_of(item) or "?"
        marks = [a for a in (schema.AUDIT_SEQ, schema.AUDIT_PREV, schema.AUDIT_HASH)
                 if a in item]
        if not marks:
            legacy += 1
            continue
        seq = _int(item, schema.AUDIT_SEQ)
        stored = _s(item, schema.AUDIT_HASH)
        if seq is None or stored is None or _s(item, schema.AUDIT_PREV) is None:
            problems.append(ChainProblem(
                "altered", "chain attributes are incomplete", seq, event_id))
            if seq is None:
                continue
        elif chain_hash(item) != stored:
            problems.append(ChainProblem(
                "altered", "the event's attributes do not match its hash", seq, event_id))
        ttl = _int(item, schema.TTL_ATTRIBUTE)
        if is_event_id(event_id) and ttl != schema.audit_ttl(event_time_ms(event_id)):
            problems.append(ChainProblem(
                "ttl", f"ttl is {ttl}, not 90 days after the event", seq, event_id))
        chained.append((seq, event_id, item))
    chained.sort(key=lambda entry: (entry[0], entry[1]))

    seen: dict[int, str] = {}
    for seq, event_id, _ in chained:
        if seq in seen:
            problems.append(ChainProblem(
                "duplicate", f"also claimed by event {seen[seq]}", seq, event_id))
        seen.setdefault(seq, event_id)

    expired = 0
    previous: tuple[int, str, Mapping[str, Any]] | None = None
    for seq, event_id, item in chained:
        if previous is not None and seq == previous[0]:
            continue  # a duplicate, reported above
        prev_hash = _s(item, schema.AUDIT_PREV)
        prev_id = _s(item, schema.AUDIT_PREV_ID)
        if previous is None:
            if seq == 1:
                if prev_hash != CHAIN_START:
                    problems.append(ChainProblem(
                        "broken_link", "the first event does not start the chain", seq,
                        event_id))
            elif _expired(prev_id, now):
                expired = seq - 1  # the oldest events, gone through TTL
            else:
                problems.append(ChainProblem(
                    "missing", f"events 1..{seq - 1} are gone before their 90 days were over",
                    seq, event_id))
        elif seq != previous[0] + 1:
            if not _expired(prev_id, now):
                problems.append(ChainProblem(
                    "missing",
                    f"events {previous[0] + 1}..{seq - 1} are gone before their 90 days were "
                    "over", seq, event_id))
        elif prev_hash != _s(previous[2], schema.AUDIT_HASH):
            problems.append(ChainProblem(
                "broken_link", f"prev is not the hash of event {previous[1]}", seq, event_id))
        previous = (seq, event_id, item)

    head_seq = 0
    if head is not None:
        head_seq = _int(head, schema.AUDIT_SEQ) or 0
        head_id = _s(head, schema.AUDIT_EVENT_ID)
        last = previous
        if last is None:
            if head_seq and not _expired(head_id, now):
                problems.append(ChainProblem(
                    "missing", f"the head names event {head_seq}, and no chained event is left",
                    head_seq, head_id))
        elif head_seq > last[0]:
            # The newest events expire last: a tail gone through TTL leaves only events past
            # their 90 days before it. Both ids are checked, as the head's own is not hashed.
            if not (_expired(head_id, now) and _expired(last[1], now)):
                problems.append(ChainProblem(
                    "missing",
                    f"events {last[0] + 1}..{head_seq} (the newest) are gone; the head names "
                    f"{head_seq}", head_seq, head_id))
        elif head_seq < last[0]:
            problems.append(ChainProblem(
                "head", f"the head names event {head_seq}, behind the last event {last[0]}",
                last[0], last[1]))
        elif _s(head, schema.AUDIT_HASH) != _s(last[2], schema.AUDIT_HASH) or head_id != last[1]:
            problems.append(ChainProblem(
                "head", "the head's hash or event id is not the last event's", last[0], last[1]))
    elif chained:
        problems.append(ChainProblem(
            "head", "chained events exist but the chain's head is gone", chained[-1][0],
            chained[-1][1]))
    return ChainReport(entity_id, len(chained), legacy, head_seq, expired, tuple(problems))


class AuditChainReader(Protocol):
    async def audit_chain_items(
        self, entity_id: str
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]: ...


async def verify_trail(
    storage: AuditChainReader, entity_id: str, now_s: float | None = None
) -> ChainReport:
    """Read the entity's audit partition (consistently) and `verify_chain` it."""
    items, head = await storage.audit_chain_items(entity_id)
    return verify_chain(entity_id, items, head, now_s)
