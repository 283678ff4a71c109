"""Domain models of zae-limiter."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar

from .core import units
from .exceptions import ValidationError
from .schema import USAGE_WINDOWS  # the storage fact; re-exported (public name)

# `StackOptions` is defined with its checks in `stack_options`; importable here as in 0.2.0.
from .stack_options import VALID_LOG_RETENTION_DAYS as VALID_LOG_RETENTION_DAYS
from .stack_options import StackOptions as StackOptions
from .validation import (
    MAX_AMOUNT,
    check_int,
    validate_entity_id,
    validate_name,
    validate_resource,
)

__all__ = [
    "MAX_REFILL_PERIOD_SECONDS",
    "USAGE_WINDOWS",
    "VALID_LOG_RETENTION_DAYS",
    "AuditAction",
    "AuditEvent",
    "BucketState",
    "Entity",
    "EntityCapacity",
    "FailureMode",
    "Limit",
    "LimitName",
    "LimitStatus",
    "Reservations",
    "ResourceCapacity",
    "StackOptions",
    "UsageSnapshot",
    "UsageSummary",
]

MAX_REFILL_PERIOD_SECONDS = 10 * 365 * 86400

_LIMIT_FIELDS = ("name", "capacity", "burst", "refill_amount", "refill_period_seconds")

# Canonical non-negative decimals only: int() would also take "+5", " 5", "1_0" and non-ASCII
# digits, which would make two different stored strings decode to the same limit.
_ENCODED_LIMIT_RE = re.compile(r"(?:0|[1-9][0-9]{0,15})(?::(?:0|[1-9][0-9]{0,15})){3}", re.ASCII)

# The text form of a Limit (`Limit.parse`, `Limit.spec`); the stored form (`Limit.encode`) is its
# four numbers, positional, in this order of the keys.
LIMIT_SYNTAX = (
    "NAME:CAPACITY/PERIOD[,burst=N][,refill=N] (e.g. rpm:100/minute, tpm:10000/1m,burst=20000) "
    "or name=NAME,capacity=N,period=P[,burst=N][,refill=N]; PERIOD is seconds or "
    "second|minute|hour|day, optionally with a count (30s, 5m)"
)
_TEXT_KEYS = {  # key in the text form -> Limit field
    "name": "name",
    "limit": "name",
    "capacity": "capacity",
    "burst": "burst",
    "refill": "refill_amount",
    "refill_amount": "refill_amount",
    "period": "refill_period_seconds",
    "refill_period": "refill_period_seconds",
    "refill_period_seconds": "refill_period_seconds",
}
_TEXT_SHORT_KEYS = {  # Limit field -> its key in the canonical text form
    "name": "name",
    "capacity": "capacity",
    "burst": "burst",
    "refill_amount": "refill",
    "refill_period_seconds": "period",
}
_STORED_KEYS = ("capacity", "burst", "refill", "period")
_PERIOD_UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
_PERIOD_NAMES = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}
_PERIOD_RE = re.compile(r"([0-9]{1,20})?\s*([a-z]*)", re.ASCII)
_TEXT_INT_RE = re.compile(r"[0-9]+(?:_[0-9]+)*", re.ASCII)
_TEXT_INT_MAX_CHARS = 40  # far above MAX_AMOUNT's 16 digits; keeps int() away from huge inputs


def _text_int(field: str, text: str) -> int:
    if _TEXT_INT_RE.fullmatch(text) is None:
        raise ValidationError(field, text, "must be a whole number (digits only)")
    if len(text) > _TEXT_INT_MAX_CHARS:
        raise ValidationError(field, text, f"must be at most {MAX_AMOUNT}")
    return int(text)


def _text_period(text: str) -> int:
    match = _PERIOD_RE.fullmatch(text.strip().lower())
    if match is None or (match.group(1) is None and not match.group(2)):
        raise ValidationError(
            "refill_period_seconds", text, "must be seconds or second|minute|hour|day (30s, 5m)"
        )
    count, unit = int(match.group(1) or 1), match.group(2)
    if unit and unit not in _PERIOD_UNITS:
        raise ValidationError(
            "refill_period_seconds", text, f"unknown unit {unit!r} (use s, m, h, d or second..day)"
        )
    return count * (_PERIOD_UNITS[unit] if unit else 1)




# ---------------------------------------------------------------------------
# Limit
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """A token-bucket limit.

    ``capacity`` tokens refill over time at ``refill_amount`` per ``refill_period_seconds``;
    the bucket holds at most ``burst`` (>= capacity). The rate is kept as an integer fraction so
    the core can refill in whole quanta without drift.
    """

    name: str
    capacity: int
    burst: int
    refill_amount: int
    refill_period_seconds: int

    def __post_init__(self) -> None:
        validate_name(self.name, "name")
        check_int("capacity", self.capacity, 1, MAX_AMOUNT)
        check_int("burst", self.burst, 1, MAX_AMOUNT)
        if self.burst < self.capacity:
            raise ValidationError("burst", self.burst, f"must be >= capacity ({self.capacity})")
        check_int("refill_amount", self.refill_amount, 1, MAX_AMOUNT)
        check_int(
            "refill_period_seconds", self.refill_period_seconds, 1, MAX_REFILL_PERIOD_SECONDS
        )

    @classmethod
    def per_second(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per second."""
        return cls.custom(name, capacity, capacity, 1, burst)

    @classmethod
    def per_minute(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per minute."""
        return cls.custom(name, capacity, capacity, 60, burst)

    @classmethod
    def per_hour(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per hour."""
        return cls.custom(name, capacity, capacity, 3600, burst)

    @classmethod
    def per_day(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per day."""
        return cls.custom(name, capacity, capacity, 86400, burst)

    @classmethod
    def custom(
        cls,
        name: str,
        capacity: int,
        refill_amount: int,
        refill_period_seconds: int,
        burst: int | None = None,
    ) -> Limit:
        """An explicit rate; e.g. sustain 100/s with bursts of 1000:
        ``Limit.custom("requests", 100, 100, 1, burst=1000)``.
        """
        return cls(
            name=name,
            capacity=capacity,
            burst=capacity if burst is None else burst,
            refill_amount=refill_amount,
            refill_period_seconds=refill_period_seconds,
        )

    @property
    def refill_rate(self) -> float:
        """Tokens per second (for display; the core never uses floats)."""
        return self.refill_amount / self.refill_period_seconds

    @property
    def capacity_milli(self) -> int:
        return units.to_milli(self.capacity)

    @property
    def burst_milli(self) -> int:
        return units.to_milli(self.burst)

    @property
    def refill_amount_milli(self) -> int:
        return units.to_milli(self.refill_amount)

    @property
    def refill_period_ms(self) -> int:
        return self.refill_period_seconds * units.MS_PER_SECOND

    def to_dict(self) -> dict[str, str | int]:
        return {
            "name": self.name,
            "capacity": self.capacity,
            "burst": self.burst,
            "refill_amount": self.refill_amount,
            "refill_period_seconds": self.refill_period_seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limit:
        """Inverse of :meth:`to_dict`; the keys must be exactly the five field names.

        Integral ``Decimal`` values are accepted because that is how DynamoDB returns numbers.
        """
        if not isinstance(data, dict):
            raise ValidationError("limit", data, "must be a dict")
        for key in _LIMIT_FIELDS:
            if key not in data:
                raise ValidationError(key, None, "is missing")
        extra = sorted(str(k) for k in data if k not in _LIMIT_FIELDS)
        if extra:
            raise ValidationError(extra[0], data[extra[0]], "is not a Limit field")
        values: dict[str, Any] = {k: _from_decimal(data[k]) for k in _LIMIT_FIELDS}
        return cls(**values)

    # -- text forms ---------------------------------------------------------------------------
    #
    # One grammar, two renderings. `spec`/`parse` is the text people and scripts use
    # (`rpm:100/minute,burst=150`; see LIMIT_SYNTAX). `encode`/`decode` is the stored form written
    # into every bucket item (`lm#<limit>`) and stored limit (`limit_def`): the four numbers of
    # the explicit text form (`capacity=..,burst=..,refill=..,period=..`), positional, in
    # canonical decimals, without the name (the attribute holds it). The stored form stays
    # separate because tables, deployed aggregators and older clients hold and compare it byte
    # for byte; `decode` goes through `parse`, so both accept the same limits.

    SYNTAX: ClassVar[str] = LIMIT_SYNTAX

    @classmethod
    def parse(cls, text: str) -> Limit:
        """A limit from its text form (LIMIT_SYNTAX): ``Limit.parse("rpm:100/minute")``,
        ``Limit.parse("name=tpm,capacity=1000,period=60,burst=2000")``.

        ``Limit.parse(limit.spec) == limit`` for every limit. Bad text raises `ValidationError`
        naming the field (``capacity``, ``refill_period_seconds``, ...; ``limit`` for the shape).
        """
        if not isinstance(text, str):
            raise ValidationError("limit", text, f"must be a string, not {type(text).__name__}")
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ValidationError("limit", text, f"is empty; expected {LIMIT_SYNTAX}")
        values: dict[str, str] = {}
        if "=" not in parts[0]:
            name, colon, rate = parts.pop(0).partition(":")
            capacity, slash, period = rate.partition("/")
            if not colon or not slash:
                raise ValidationError("limit", text, f"expected {LIMIT_SYNTAX}")
            values = {"name": name.strip(), "capacity": capacity.strip(), "period": period}
        for part in parts:
            key, eq, value = part.partition("=")
            field = _TEXT_KEYS.get(key.strip().lower().replace("-", "_"))
            if not eq:
                raise ValidationError("limit", text, f"part {part!r} is not KEY=VALUE")
            if field is None:
                known = "name, capacity, period, burst, refill"
                raise ValidationError("limit", text, f"unknown key {key.strip()!r} (use {known})")
            short = _TEXT_SHORT_KEYS[field]
            if short in values:
                raise ValidationError(field, value, "is given twice")
            values[short] = value.strip()
        return cls._from_text(values)

    @classmethod
    def _from_text(cls, values: dict[str, str]) -> Limit:
        """The limit of the text form's key/value pairs (keys: name, capacity, burst, refill,
        period); the one place text becomes numbers."""
        for key in ("name", "capacity", "period"):
            if not values.get(key):
                raise ValidationError(_TEXT_KEYS[key], None, "is missing")
        capacity = _text_int("capacity", values["capacity"])
        return cls(
            name=values["name"],
            capacity=capacity,
            burst=_text_int("burst", values["burst"]) if "burst" in values else capacity,
            refill_amount=(
                _text_int("refill_amount", values["refill"]) if "refill" in values else capacity
            ),
            refill_period_seconds=_text_period(values["period"]),
        )

    @property
    def spec(self) -> str:
        """The canonical text form: ``rpm:100/minute``, ``tpm:1000/30s,burst=2000,refill=500``
        (burst and refill only when they differ from the capacity)."""
        period = self.refill_period_seconds
        text = f"{self.name}:{self.capacity}/{_PERIOD_NAMES.get(period, f'{period}s')}"
        if self.burst != self.capacity:
            text += f",burst={self.burst}"
        if self.refill_amount != self.capacity:
            text += f",refill={self.refill_amount}"
        return text

    def encode(self) -> str:
        """The stored form ``capacity:burst:refill_amount:refill_period_seconds`` (name excluded:
        it is part of the attribute name in the bucket item)."""
        return f"{self.capacity}:{self.burst}:{self.refill_amount}:{self.refill_period_seconds}"

    @classmethod
    def decode(cls, encoded: str, name: str) -> Limit:
        """Inverse of :meth:`encode`; the name comes from the attribute the string was read from.

        Stricter than `parse` (canonical decimals only, so one limit has one stored string), then
        read as the explicit text form.
        """
        if not isinstance(encoded, str) or _ENCODED_LIMIT_RE.fullmatch(encoded) is None:
            raise ValidationError(
                "limit",
                encoded,
                "must be 'capacity:burst:refill_amount:refill_period_seconds' in decimal digits",
            )
        numbers = dict(zip(_STORED_KEYS, encoded.split(":"), strict=True))
        return cls._from_text({"name": name, **numbers})


def _from_decimal(value: object) -> object:
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value)
    return value


class LimitName:
    """Conventional limit names."""

    RPM = "rpm"
    RPH = "rph"
    RPD = "rpd"
    TPM = "tpm"
    TPH = "tph"
    TPD = "tpd"


# ---------------------------------------------------------------------------
# Entity
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    """Something limits apply to (a project, an API key). Children point to their parent."""

    id: str
    name: str | None = None
    parent_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: str | None = None  # ISO-8601 UTC

    def __post_init__(self) -> None:
        validate_entity_id(self.id, "entity_id")
        if self.parent_id is not None:
            validate_entity_id(self.parent_id, "parent_id")
            if self.parent_id == self.id:
                raise ValidationError(
                    "parent_id", self.parent_id, "an entity cannot be its own parent"
                )
        if self.name is not None and not isinstance(self.name, str):
            raise ValidationError("name", self.name, "must be a string or None")
        if not isinstance(self.metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()
        ):
            raise ValidationError("metadata", self.metadata, "must be a dict of str to str")
        if self.created_at is not None and not isinstance(self.created_at, str):
            raise ValidationError("created_at", self.created_at, "must be an ISO-8601 string")

    @property
    def entity_id(self) -> str:
        return self.id

    @property
    def is_parent(self) -> bool:
        """True for a root entity (no parent)."""
        return self.parent_id is None

    @property
    def is_child(self) -> bool:
        return self.parent_id is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "parent_id": self.parent_id,
            "metadata": dict(self.metadata),
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Entity:
        return cls(
            id=data["id"],
            name=data.get("name"),
            parent_id=data.get("parent_id"),
            metadata=dict(data.get("metadata") or {}),
            created_at=data.get("created_at"),
        )


# ---------------------------------------------------------------------------
# LimitStatus
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """The outcome of checking one limit.

    Built by the limiter from validated inputs, so it does not validate itself.
    """

    entity_id: str
    resource: str
    limit_name: str
    limit: Limit
    available: int  # whole tokens now; negative after forced consumption
    requested: int
    exceeded: bool
    retry_after_seconds: float | None  # 0.0 when not exceeded; None: can never be satisfied

    @property
    def deficit(self) -> int:
        """Tokens missing for the request (0 when enough are available)."""
        return max(0, self.requested - self.available)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; a never-satisfiable (or non-finite) retry time becomes ``None``."""
        retry = self.retry_after_seconds
        if retry is not None and not math.isfinite(retry):
            retry = None
        return {
            "entity_id": self.entity_id,
            "resource": self.resource,
            "limit_name": self.limit_name,
            "capacity": self.limit.capacity,
            "burst": self.limit.burst,
            "available": self.available,
            "requested": self.requested,
            "exceeded": self.exceeded,
            "retry_after_seconds": retry,
        }


# ---------------------------------------------------------------------------
# FailureMode
# ---------------------------------------------------------------------------


class FailureMode(StrEnum):
    """What acquire does when the backing store cannot be reached."""

    FAIL_OPEN = "open"
    FAIL_CLOSED = "closed"


# ---------------------------------------------------------------------------
# StackOptions
# ---------------------------------------------------------------------------

# CloudWatch Logs only accepts these retention periods (PutRetentionPolicy).
# fmt: off
@dataclass(frozen=True)
class UsageSnapshot:
    """Net tokens consumed by one (entity, resource) in one window."""

    entity_id: str
    resource: str
    window: str  # "hourly" | "daily"
    window_start: str  # ISO-8601 UTC
    counters: dict[str, int]  # limit name -> net tokens consumed (consumed - released)
    updated_at: str | None = None

    def __post_init__(self) -> None:
        validate_entity_id(self.entity_id, "entity_id")
        validate_resource(self.resource, "resource")
        if self.window not in USAGE_WINDOWS:
            raise ValidationError("window", self.window, f"must be one of {list(USAGE_WINDOWS)}")

    @property
    def window_type(self) -> str:
        """0.x name of :attr:`window`."""
        return self.window

    @property
    def window_end(self) -> str:
        """When the window ends (exclusive), ISO-8601 UTC, as 0.x reported it."""
        from .core.units import iso_utc
        from .core.windows import window_end

        return iso_utc(window_end(self.window, self.window_start), "auto")


@dataclass(frozen=True)
class UsageSummary:
    """Usage of one (entity, resource) aggregated over several snapshots."""

    entity_id: str
    resource: str
    window: str
    start: str  # ISO-8601 UTC, inclusive
    end: str  # ISO-8601 UTC
    snapshot_count: int
    totals: dict[str, int]
    averages: dict[str, float]


def _seconds(value: object, field: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(field, value, "must be a finite number of seconds")
    if value < 0 or (positive and value == 0):
        raise ValidationError(field, value, "must be positive" if positive else "must be >= 0")
    return float(value)


@dataclass(frozen=True, slots=True)
class Reservations:
    """How a limiter reserves tokens ahead (opt-in: `RateLimiter(reservations=Reservations())`).

    Attributes:
        max_share: the largest share of a limit's burst one process may hold reserved for one
            bucket item (0 < max_share <= 1). A process that dies holding a block loses at most
            this much of each limit, until refill brings it back: under-admission, never more.
        hold_seconds: how long unused reserved tokens may stay reserved; then they go back to the
            shared bucket. It also bounds how long tokens granted earlier can be spent later.
        horizon_seconds: a block covers this much of the demand this process observed for the
            item (<= `hold_seconds`), so a hot item costs about one write per horizon.
        denial_memory_seconds: after the shared bucket refused, further requests for the item are
            denied locally (no I/O, each with its retry-after) until the bucket could grant a
            block again, for at most this long; 0 turns the memory off.
    """

    max_share: float = 0.1
    hold_seconds: float = 2.0
    horizon_seconds: float = 0.5
    denial_memory_seconds: float = 1.0

    def __post_init__(self) -> None:
        share = self.max_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ValidationError("max_share", share, "must be a number in (0, 1]")
        hold = _seconds(self.hold_seconds, "hold_seconds", positive=True)
        horizon = _seconds(self.horizon_seconds, "horizon_seconds", positive=True)
        _seconds(self.denial_memory_seconds, "denial_memory_seconds", positive=False)
        if horizon > hold:
            raise ValidationError(
                "horizon_seconds", horizon, f"must not exceed hold_seconds ({hold})"
            )


# ---------------------------------------------------------------------------
# Bucket states and capacity reports (0.x models)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketState:
    """One limit's bucket as stored: tokens as of `last_refill_ms` (refill is applied when read;
    see docs/design.md section 1). Amounts in millitokens, times in epoch milliseconds."""

    entity_id: str
    resource: str
    limit_name: str
    tokens_milli: int
    last_refill_ms: int
    capacity_milli: int
    burst_milli: int
    refill_amount_milli: int
    refill_period_ms: int

    @property
    def tokens(self) -> int:
        """Stored whole tokens (before refill since `last_refill_ms`)."""
        return units.tokens_down(self.tokens_milli)

    @property
    def capacity(self) -> int:
        return units.tokens_down(self.capacity_milli)

    @property
    def burst(self) -> int:
        return units.tokens_down(self.burst_milli)

    @classmethod
    def from_limit(cls, entity_id: str, resource: str, limit: Limit, now_ms: int) -> BucketState:
        """A new, full bucket for `limit` anchored at `now_ms`."""
        validate_entity_id(entity_id)
        validate_resource(resource)
        if not isinstance(limit, Limit):
            raise ValidationError("limit", limit, "must be a Limit")
        if isinstance(now_ms, bool) or not isinstance(now_ms, int) or now_ms < 0:
            raise ValidationError("now_ms", now_ms, "must be a non-negative int")
        return cls(
            entity_id=entity_id,
            resource=resource,
            limit_name=limit.name,
            tokens_milli=limit.burst_milli,
            last_refill_ms=now_ms,
            capacity_milli=units.to_milli(limit.capacity),
            burst_milli=limit.burst_milli,
            refill_amount_milli=limit.refill_amount_milli,
            refill_period_ms=limit.refill_period_ms,
        )


@dataclass(frozen=True)
class EntityCapacity:
    """One entity's share of a resource's capacity for one limit (`get_resource_capacity`)."""

    entity_id: str
    capacity: int
    available: int
    utilization_pct: float


@dataclass(frozen=True)
class ResourceCapacity:
    """A resource's capacity for one limit summed over the entities that have a bucket for it:
    `total_capacity` and `total_available` in tokens, `utilization_pct` the share in use."""

    resource: str
    limit_name: str
    total_capacity: int
    total_available: int
    utilization_pct: float
    entities: list[EntityCapacity]


# ---------------------------------------------------------------------------
# Audit trail
# ---------------------------------------------------------------------------


class AuditAction:
    """What an audit event records."""

    ENTITY_CREATED = "entity_created"
    ENTITY_DELETED = "entity_deleted"
    LIMITS_SET = "limits_set"
    LIMITS_DELETED = "limits_deleted"


@dataclass(frozen=True)
class AuditEvent:
    """A change to an entity or its stored limits, as recorded in the table.

    `event_id` is unique and sorts in time order; `timestamp` is ISO-8601 UTC; `principal` is
    who made the change, when the caller said (`principal=` on the mutating methods).
    """

    event_id: str
    timestamp: str
    action: str
    entity_id: str
    principal: str | None = None
    resource: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; optional fields only when set."""
        data: dict[str, Any] = {
            "event_id": self.event_id,
            "timestamp": self.timestamp,
            "action": self.action,
            "entity_id": self.entity_id,
        }
        if self.principal is not None:
            data["principal"] = self.principal
        if self.resource is not None:
            data["resource"] = self.resource
        if self.details:
            data["details"] = dict(self.details)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEvent:
        try:
            return cls(
                event_id=str(data["event_id"]),
                timestamp=str(data["timestamp"]),
                action=str(data["action"]),
                entity_id=str(data["entity_id"]),
                principal=data.get("principal"),
                resource=data.get("resource"),
                details=dict(data.get("details") or {}),
            )
        except KeyError as exc:
            raise ValidationError(str(exc.args[0]), data, "missing from the audit event") from exc
