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
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from .exceptions import RateLimiterUnavailable
from .models import AuditAction, AuditEvent, Entity, Limit

__all__ = [
    "EVENT_ID_LENGTH",
    "AuditWriter",
    "entity_created",
    "entity_deleted",
    "event_time_ms",
    "is_event_id",
    "limits_deleted",
    "limits_set",
    "new_event",
    "new_event_id",
    "record",
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


def _iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        timestamp=_iso(event_time_ms(event_id)),
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
