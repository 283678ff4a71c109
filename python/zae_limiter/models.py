"""Domain models of zae-limiter."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar

from .core import calendar, units
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
# The fields a plan's limit adds (`to_dict` writes them only when they differ from a plain hard
# token bucket, so 0.2.0's five keys stay the dict of every such limit).
_PLAN_FIELDS = ("soft", "kind", "cron", "tz", "reset_after_seconds", "lease_ttl_seconds")

BUCKET, QUOTA, CONCURRENCY = "bucket", "quota", "concurrency"
LIMIT_KINDS = (BUCKET, QUOTA, CONCURRENCY)
DEFAULT_LEASE_TTL = timedelta(minutes=5)

# Canonical non-negative decimals only: int() would also take "+5", " 5", "1_0" and non-ASCII
# digits, which would make two different stored strings decode to the same limit.
_ENCODED_LIMIT_RE = re.compile(r"(?:0|[1-9][0-9]{0,15})(?::(?:0|[1-9][0-9]{0,15})){3}", re.ASCII)

# The text form of a Limit (`Limit.parse`, `Limit.spec`); the stored form (`Limit.encode`) is its
# four numbers, positional, in this order of the keys.
LIMIT_SYNTAX = (
    "NAME:CAPACITY/PERIOD[,burst=N][,refill=N] (e.g. rpm:100/minute, tpm:10000/1m,burst=20000) "
    "or name=NAME,capacity=N,period=P[,burst=N][,refill=N]; PERIOD is seconds or "
    "second|minute|hour|day, optionally with a count (30s, 5m); a quota is "
    "NAME:AMOUNT/quota,cron=CRON[,tz=ZONE] or NAME:AMOUNT/quota,reset_after=DURATION, a "
    "concurrency cap NAME:N/concurrent[,lease_ttl=DURATION]; `,soft` makes any of them soft"
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
    "soft": "soft",
    "kind": "kind",
    "cron": "cron",
    "tz": "tz",
    "reset_after": "reset_after_seconds",
    "reset_after_seconds": "reset_after_seconds",
    "lease_ttl": "lease_ttl_seconds",
    "lease_ttl_seconds": "lease_ttl_seconds",
}
_TEXT_SHORT_KEYS = {  # Limit field -> its key in the canonical text form
    "name": "name",
    "capacity": "capacity",
    "burst": "burst",
    "refill_amount": "refill",
    "refill_period_seconds": "period",
    "soft": "soft",
    "kind": "kind",
    "cron": "cron",
    "tz": "tz",
    "reset_after_seconds": "reset_after",
    "lease_ttl_seconds": "lease_ttl",
}
# The PERIOD of the short form that names a kind instead of a refill period.
_KIND_PERIODS = {"quota": QUOTA, "concurrent": CONCURRENCY, "concurrency": CONCURRENCY}
# A part of the text form starts at a comma followed by a known key (a cron's own lists,
# `0 0 1,15 * *`, stay in its value).
_PART_SPLIT = re.compile(
    r",\s*(?=(?:"
    + "|".join(k.replace("_", "[-_]") for k in sorted(_TEXT_KEYS, key=len, reverse=True))
    + r")\s*(?:=|,|$))",
    re.IGNORECASE,
)
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
    """A limit: a token bucket (the default), a quota or a concurrency cap.

    A **token bucket** (``kind="bucket"``): ``capacity`` tokens refill over time at
    ``refill_amount`` per ``refill_period_seconds``; the bucket holds at most ``burst``
    (>= capacity). The rate is kept as an integer fraction so the core can refill in whole quanta
    without drift.

    A **quota** (`Limit.quota`): ``capacity`` tokens per window, restored in one lump when the
    window opens; the window opens at a ``cron`` instant read in ``tz``, or lasts
    ``reset_after_seconds`` from the entity's first admitted use.

    A **concurrency cap** (`Limit.concurrency`): at most ``capacity`` slots held at once, each
    for its lease's life; a lease never ended gives its slots back ``lease_ttl_seconds`` after
    its last renewal.

    ``soft=True`` on any of them: debited (it may go into debt), reported, never denies.

    Attributes:
        name: the limit's name (``rpm``, ``tpm``, ...), unique among an acquire's limits.
        capacity: a bucket's sustained tokens per refill period; a quota's tokens per window; a
            concurrency cap's slots.
        burst: the most a bucket holds (>= ``capacity``); a quota's and a cap's equal
            ``capacity``.
        refill_amount: tokens a bucket regains per ``refill_period_seconds``.
        refill_period_seconds: the period of ``refill_amount``.
        soft: debited and reported, never denies.
        kind: ``"bucket"``, ``"quota"`` or ``"concurrency"``.
        cron: a quota's window start, a cron expression read in ``tz``.
        tz: the time zone of ``cron`` (``"UTC"`` unless set; a quota's only).
        reset_after_seconds: a quota's window length from the entity's first admitted use
            (instead of ``cron``).
        lease_ttl_seconds: a concurrency cap's: a lease never ended gives its slots back this
            long after its last renewal.
    """

    name: str
    capacity: int
    burst: int
    refill_amount: int
    refill_period_seconds: int
    soft: bool = False
    kind: str = BUCKET
    cron: str | None = None
    tz: str = "UTC"
    reset_after_seconds: int | None = None
    lease_ttl_seconds: int | None = None

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
        if not isinstance(self.soft, bool):
            raise ValidationError("soft", self.soft, "must be a bool")
        if self.kind not in LIMIT_KINDS:
            raise ValidationError("kind", self.kind, f"must be one of {', '.join(LIMIT_KINDS)}")
        if self.kind != BUCKET and not self.capacity == self.burst == self.refill_amount:
            raise ValidationError(
                "burst", self.burst, f"of a {self.kind} must equal its capacity ({self.capacity})"
            )
        own = {
            BUCKET: (),
            QUOTA: ("cron", "tz", "reset_after_seconds"),
            CONCURRENCY: ("lease_ttl_seconds",),
        }[self.kind]
        for name in ("cron", "reset_after_seconds", "lease_ttl_seconds"):
            if name not in own and getattr(self, name) is not None:
                raise ValidationError(name, getattr(self, name), f"is not a {self.kind} setting")
        if "tz" not in own and self.tz != "UTC":
            raise ValidationError("tz", self.tz, f"is not a {self.kind} setting")
        if self.kind == QUOTA:
            _check_quota(self)
        elif self.kind == CONCURRENCY:
            check_int("lease_ttl_seconds", self.lease_ttl_seconds, 1, MAX_REFILL_PERIOD_SECONDS)
            if self.refill_period_seconds != self.lease_ttl_seconds:
                raise ValidationError(
                    "refill_period_seconds",
                    self.refill_period_seconds,
                    f"of a concurrency cap must equal its lease_ttl_seconds "
                    f"({self.lease_ttl_seconds})",
                )

    @property
    def is_quota(self) -> bool:
        return self.kind == QUOTA

    @property
    def is_concurrency(self) -> bool:
        return self.kind == CONCURRENCY

    @property
    def reset_after(self) -> timedelta | None:
        """A session quota's window, from the entity's first admitted use."""
        s = self.reset_after_seconds
        return None if s is None else timedelta(seconds=s)

    @property
    def lease_ttl(self) -> timedelta | None:
        """How long a concurrency cap's slot outlives its lease's last renewal."""
        s = self.lease_ttl_seconds
        return None if s is None else timedelta(seconds=s)

    @classmethod
    def per_second(
        cls, name: str, capacity: int, burst: int | None = None, *, soft: bool = False
    ) -> Limit:
        """``capacity`` tokens per second."""
        return cls.custom(name, capacity, capacity, 1, burst, soft=soft)

    @classmethod
    def per_minute(
        cls, name: str, capacity: int, burst: int | None = None, *, soft: bool = False
    ) -> Limit:
        """``capacity`` tokens per minute."""
        return cls.custom(name, capacity, capacity, 60, burst, soft=soft)

    @classmethod
    def per_hour(
        cls, name: str, capacity: int, burst: int | None = None, *, soft: bool = False
    ) -> Limit:
        """``capacity`` tokens per hour."""
        return cls.custom(name, capacity, capacity, 3600, burst, soft=soft)

    @classmethod
    def per_day(
        cls, name: str, capacity: int, burst: int | None = None, *, soft: bool = False
    ) -> Limit:
        """``capacity`` tokens per day."""
        return cls.custom(name, capacity, capacity, 86400, burst, soft=soft)

    @classmethod
    def custom(
        cls,
        name: str,
        capacity: int,
        refill_amount: int,
        refill_period_seconds: int,
        burst: int | None = None,
        *,
        soft: bool = False,
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
            soft=soft,
        )

    @classmethod
    def quota(
        cls,
        name: str,
        amount: int,
        *,
        cron: str | None = None,
        tz: str = "UTC",
        reset_after: timedelta | None = None,
        soft: bool = False,
    ) -> Limit:
        """``amount`` per window, restored in one lump when the window opens (no drip).

        ``cron`` (5 fields) names the instant each window opens, read in the IANA zone ``tz``
        (DST-correct): ``Limit.quota("monthly", 10_000, cron="0 0 1 * *", tz="Europe/Paris")``.
        ``reset_after`` instead opens a window at the entity's first admitted use, lasting that
        long; after it ends, the next admitted use opens the next one. Exactly one of the two.
        """
        if (cron is None) == (reset_after is None):
            raise ValidationError(
                "cron", cron, "a quota takes exactly one of cron= and reset_after="
            )
        session = None if reset_after is None else _whole_seconds("reset_after", reset_after)
        return cls(
            name=name,
            capacity=amount,
            burst=amount,
            refill_amount=amount,
            refill_period_seconds=session if session is not None else _cron_period(cron, tz),
            soft=soft,
            kind=QUOTA,
            cron=cron,
            tz=tz,
            reset_after_seconds=session,
        )

    @classmethod
    def concurrency(
        cls,
        name: str,
        max_in_flight: int,
        *,
        lease_ttl: timedelta = DEFAULT_LEASE_TTL,
        soft: bool = False,
    ) -> Limit:
        """At most ``max_in_flight`` slots held at once across every client; an acquire holds
        ``consume.get(name, 1)`` of them for its lease's life. A lease never ended (its process
        died) gives them back ``lease_ttl`` after its last renewal."""
        ttl = _whole_seconds("lease_ttl", lease_ttl)
        return cls(
            name=name,
            capacity=max_in_flight,
            burst=max_in_flight,
            refill_amount=max_in_flight,
            refill_period_seconds=ttl,
            soft=soft,
            kind=CONCURRENCY,
            lease_ttl_seconds=ttl,
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

    def to_dict(self) -> dict[str, Any]:
        """The five fields of 0.2.0, plus those of a plan (soft, kind, ...) when set."""
        data: dict[str, Any] = {
            "name": self.name,
            "capacity": self.capacity,
            "burst": self.burst,
            "refill_amount": self.refill_amount,
            "refill_period_seconds": self.refill_period_seconds,
        }
        if self.soft:
            data["soft"] = True
        if self.kind != BUCKET:
            data["kind"] = self.kind
            for key in ("cron", "reset_after_seconds", "lease_ttl_seconds"):
                if getattr(self, key) is not None:
                    data[key] = getattr(self, key)
            if self.kind == QUOTA and self.cron is not None:
                data["tz"] = self.tz
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limit:
        """Inverse of :meth:`to_dict`: the five field names, and those of a plan when set.

        Integral ``Decimal`` values are accepted because that is how DynamoDB returns numbers.
        """
        if not isinstance(data, dict):
            raise ValidationError("limit", data, "must be a dict")
        for key in _LIMIT_FIELDS:
            if key not in data:
                raise ValidationError(key, None, "is missing")
        extra = sorted(str(k) for k in data if k not in _LIMIT_FIELDS + _PLAN_FIELDS)
        if extra:
            raise ValidationError(extra[0], data[extra[0]], "is not a Limit field")
        values: dict[str, Any] = {
            k: _from_decimal(data[k]) for k in _LIMIT_FIELDS + _PLAN_FIELDS if k in data
        }
        return cls(**values)

    # -- text forms ---------------------------------------------------------------------------
    #
    # One grammar, two renderings. `spec`/`parse` is the text people and scripts use
    # (`rpm:100/minute,burst=150`; see LIMIT_SYNTAX). `encode`/`decode` is the stored form written
    # into every bucket item (`lm#<limit>`) and stored limit (`limit_def`): for a hard token
    # bucket the four numbers of the explicit text form (`capacity=..,burst=..,refill=..,
    # period=..`), positional, in canonical decimals, without the name (the attribute holds
    # it); for any other limit its canonical text form without the name. The stored form stays
    # separate because tables, deployed aggregators and older clients hold and compare it byte
    # for byte; `decode` goes through `parse`, so both accept the same limits.

    SYNTAX: ClassVar[str] = LIMIT_SYNTAX

    @classmethod
    def parse(cls, text: str) -> Limit:
        """A limit from its text form (LIMIT_SYNTAX): ``Limit.parse("rpm:100/minute")``,
        ``Limit.parse("name=tpm,capacity=1000,period=60,burst=2000")``,
        ``Limit.parse("monthly:10000/quota,cron=0 0 1 * *,tz=Europe/Paris")``,
        ``Limit.parse("streams:5/concurrent,lease_ttl=5m")``, ``Limit.parse("tpm:1000/1m,soft")``.

        ``Limit.parse(limit.spec) == limit`` for every limit. Bad text raises `ValidationError`
        naming the field (``capacity``, ``refill_period_seconds``, ...; ``limit`` for the shape).
        """
        if not isinstance(text, str):
            raise ValidationError("limit", text, f"must be a string, not {type(text).__name__}")
        parts = [p.strip() for p in _PART_SPLIT.split(text) if p.strip()]
        if not parts:
            raise ValidationError("limit", text, f"is empty; expected {LIMIT_SYNTAX}")
        values: dict[str, str] = {}
        if "=" not in parts[0]:
            name, colon, rate = parts.pop(0).partition(":")
            capacity, slash, period = rate.partition("/")
            if not colon or not slash:
                raise ValidationError("limit", text, f"expected {LIMIT_SYNTAX}")
            values = {"name": name.strip(), "capacity": capacity.strip(), "period": period}
            kind = _KIND_PERIODS.get(period.strip().lower())
            if kind is not None:
                values["kind"] = kind
                del values["period"]
        for part in parts:
            key, eq, value = part.partition("=")
            field = _TEXT_KEYS.get(key.strip().lower().replace("-", "_"))
            if field == "soft" and not eq:
                value, eq = "true", "="
            if not eq:
                raise ValidationError("limit", text, f"part {part!r} is not KEY=VALUE")
            if field is None:
                known = ", ".join(sorted(set(_TEXT_SHORT_KEYS.values())))
                raise ValidationError("limit", text, f"unknown key {key.strip()!r} (use {known})")
            short = _TEXT_SHORT_KEYS[field]
            if short in values:
                raise ValidationError(field, value, "is given twice")
            values[short] = value.strip()
        return cls._from_text(values)

    @classmethod
    def _from_text(cls, values: dict[str, str]) -> Limit:
        """The limit of the text form's key/value pairs (keys: name, capacity, burst, refill,
        period, soft, kind, cron, tz, reset_after, lease_ttl); the one place text becomes
        numbers."""
        soft = _text_bool("soft", values.get("soft", "false"))
        kind = values.get("kind", BUCKET).strip().lower()
        for key in ("name", "capacity"):
            if not values.get(key):
                raise ValidationError(_TEXT_KEYS[key], None, "is missing")
        capacity = _text_int("capacity", values["capacity"])
        foreign = {
            QUOTA: ("burst", "refill", "period", "lease_ttl"),
            CONCURRENCY: ("burst", "refill", "period", "cron", "tz", "reset_after"),
        }.get(kind, ())
        for key in foreign:
            if key in values:
                raise ValidationError(_TEXT_KEYS[key], values[key], f"is not a {kind} setting")
        if kind == QUOTA:
            after = values.get("reset_after")
            return cls.quota(
                values["name"],
                capacity,
                cron=values.get("cron"),
                tz=values.get("tz", "UTC"),
                reset_after=None if after is None else timedelta(seconds=_text_period(after)),
                soft=soft,
            )
        if kind == CONCURRENCY:
            ttl = values.get("lease_ttl")
            lease_ttl = DEFAULT_LEASE_TTL if ttl is None else timedelta(seconds=_text_period(ttl))
            return cls.concurrency(
                values["name"],
                capacity,
                lease_ttl=lease_ttl,
                soft=soft,
            )
        if kind != BUCKET:
            raise ValidationError("kind", kind, f"must be one of {', '.join(LIMIT_KINDS)}")
        for key in ("cron", "tz", "reset_after", "lease_ttl"):
            if key in values:
                raise ValidationError(_TEXT_KEYS[key], values[key], "is not a bucket setting")
        if not values.get("period"):
            raise ValidationError("refill_period_seconds", None, "is missing")
        return cls(
            name=values["name"],
            capacity=capacity,
            burst=_text_int("burst", values["burst"]) if "burst" in values else capacity,
            refill_amount=(
                _text_int("refill_amount", values["refill"]) if "refill" in values else capacity
            ),
            refill_period_seconds=_text_period(values["period"]),
            soft=soft,
        )

    @property
    def spec(self) -> str:
        """The canonical text form: ``rpm:100/minute``, ``tpm:1000/30s,burst=2000,refill=500``
        (burst and refill only when they differ from the capacity),
        ``monthly:10000/quota,cron=0 0 1 * *,tz=Europe/Paris``, ``session:50/quota,
        reset_after=18000s``, ``streams:5/concurrent,lease_ttl=300s``; ``,soft`` last."""
        return f"{self.name}:{self._spec_body()}"

    def _spec_body(self) -> str:
        if self.kind == QUOTA:
            text = f"{self.capacity}/quota"
            if self.cron is not None:
                text += f",cron={self.cron},tz={self.tz}"
            else:
                text += f",reset_after={self.reset_after_seconds}s"
        elif self.kind == CONCURRENCY:
            text = f"{self.capacity}/concurrent,lease_ttl={self.lease_ttl_seconds}s"
        else:
            period = self.refill_period_seconds
            text = f"{self.capacity}/{_PERIOD_NAMES.get(period, f'{period}s')}"
            if self.burst != self.capacity:
                text += f",burst={self.burst}"
            if self.refill_amount != self.capacity:
                text += f",refill={self.refill_amount}"
        return text + (",soft" if self.soft else "")

    def encode(self) -> str:
        """The stored form (name excluded: it is part of the attribute name in the bucket
        item): ``capacity:burst:refill_amount:refill_period_seconds`` for a hard token bucket,
        the canonical text form after the name's colon for any other limit."""
        if self.kind == BUCKET and not self.soft:
            return (
                f"{self.capacity}:{self.burst}:{self.refill_amount}:{self.refill_period_seconds}"
            )
        return self._spec_body()

    @classmethod
    def decode(cls, encoded: str, name: str) -> Limit:
        """Inverse of :meth:`encode`; the name comes from the attribute the string was read from.

        Stricter than `parse` (canonical forms only, so one limit has one stored string), then
        read as the explicit text form.
        """
        if isinstance(encoded, str) and _ENCODED_LIMIT_RE.fullmatch(encoded) is not None:
            numbers = dict(zip(_STORED_KEYS, encoded.split(":"), strict=True))
            return cls._from_text({"name": name, **numbers})
        if isinstance(encoded, str) and "/" in encoded:
            limit = cls.parse(f"{name}:{encoded}")
            if limit.encode() == encoded and (limit.soft or limit.kind != BUCKET):
                return limit
        raise ValidationError(
            "limit",
            encoded,
            "must be 'capacity:burst:refill_amount:refill_period_seconds' in decimal digits, "
            "or a plan limit's canonical text form",
        )


def _text_bool(field: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise ValidationError(field, text, "must be true or false")


def _whole_seconds(field: str, value: object) -> int:
    """A positive timedelta of whole seconds, as its seconds."""
    if not isinstance(value, timedelta):
        raise ValidationError(field, value, f"must be a timedelta, not {type(value).__name__}")
    seconds = value.total_seconds()
    if seconds <= 0 or seconds != int(seconds):
        raise ValidationError(field, value, "must be a positive whole number of seconds")
    if seconds > MAX_REFILL_PERIOD_SECONDS:
        raise ValidationError(field, value, f"must be at most {MAX_REFILL_PERIOD_SECONDS} s")
    return int(seconds)


def _check_quota(limit: Limit) -> None:
    """A quota has exactly one window shape; a cron quota's cron and zone are valid."""
    if (limit.cron is None) == (limit.reset_after_seconds is None):
        raise ValidationError(
            "cron", limit.cron, "a quota takes exactly one of cron= and reset_after="
        )
    if limit.reset_after_seconds is not None:
        check_int(
            "reset_after_seconds", limit.reset_after_seconds, 1, MAX_REFILL_PERIOD_SECONDS
        )
        if limit.refill_period_seconds != limit.reset_after_seconds:
            raise ValidationError(
                "refill_period_seconds",
                limit.refill_period_seconds,
                f"of a session quota must equal its reset_after_seconds "
                f"({limit.reset_after_seconds})",
            )
        if limit.tz != "UTC":
            raise ValidationError("tz", limit.tz, "is read only with cron=")
    else:
        assert limit.cron is not None
        if limit.refill_period_seconds != _cron_period(limit.cron, limit.tz):
            raise ValidationError(
                "refill_period_seconds",
                limit.refill_period_seconds,
                "of a cron quota must be its cron's nominal window",
            )


def _cron_period(cron: object, tz: object) -> int:
    """A cron quota's nominal window in seconds (its longest window, for the RateLimit `w`
    field and display); checks the cron and the zone."""
    if not isinstance(tz, str):
        raise ValidationError("tz", tz, f"must be a string, not {type(tz).__name__}")
    try:
        calendar.zone(tz)
    except ValueError as exc:
        raise ValidationError("tz", tz, str(exc)) from None
    if not isinstance(cron, str):
        raise ValidationError("cron", cron, f"must be a string, not {type(cron).__name__}")
    try:
        return calendar.nominal_window_seconds(cron, tz)
    except ValueError as exc:
        raise ValidationError("cron", cron, str(exc)) from None


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

    Attributes:
        entity_id: the entity whose bucket was checked (with cascade, the parent's for its
            limits).
        resource: the resource the limit applies to.
        limit_name: the limit's name (``limit.name``).
        limit: the limit's definition.
        available: whole tokens available now; negative after forced consumption.
        requested: tokens the request asked of this limit.
        exceeded: whether the request exceeds it (a soft limit past its allowance is exceeded
            too, but denies nothing).
        retry_after_seconds: seconds until the request fits: ``0.0`` when not exceeded;
            ``None`` when it never can (the request exceeds the limit's burst).
        reset_seconds: a quota's seconds until its window resets and its balance is restored;
            ``None`` for a token bucket, which has no reset instant.
    """

    entity_id: str
    resource: str
    limit_name: str
    limit: Limit
    available: int  # whole tokens now; negative after forced consumption
    requested: int
    exceeded: bool
    retry_after_seconds: float | None  # 0.0 when not exceeded; None: can never be satisfied
    # A quota's: seconds until its window resets and the balance is restored (None: a token
    # bucket, which has no reset instant).
    reset_seconds: float | None = None

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
    """What acquire does when the backing store cannot be reached.

    Attributes:
        FAIL_OPEN: admit the request without a bucket (the lease's ``fail_open`` is True).
        FAIL_CLOSED: raise `RateLimiterUnavailable` (the default).
    """

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
    """What an audit event records (`AuditEvent.action`): the constants below.

    Attributes:
        ENTITY_CREATED: an entity was created.
        ENTITY_DELETED: an entity was deleted.
        LIMITS_SET: stored limits were set (an entity's, a resource's defaults or the system's).
        LIMITS_DELETED: stored limits were deleted.
        RESOURCE_DISABLED: a resource's kill switch was set to disabled.
        RESOURCE_BYPASSED: a resource's kill switch was set to bypass.
        RESOURCE_ENABLED: a resource's kill switch was cleared.
        ENTITY_DISABLED: an entity's kill switch was set to disabled.
        ENTITY_BYPASSED: an entity's kill switch was set to bypass.
        ENTITY_ENABLED: an entity's kill switch was cleared.
    """

    ENTITY_CREATED = "entity_created"
    ENTITY_DELETED = "entity_deleted"
    LIMITS_SET = "limits_set"
    LIMITS_DELETED = "limits_deleted"
    # Kill switches (docs/limits.md "Kill switch"); a resource's are in its trail
    # (`$RESOURCE:<resource>`, `schema.resource_audit_id`), an entity's in its own.
    RESOURCE_DISABLED = "resource_disabled"
    RESOURCE_BYPASSED = "resource_bypassed"
    RESOURCE_ENABLED = "resource_enabled"
    ENTITY_DISABLED = "entity_disabled"
    ENTITY_BYPASSED = "entity_bypassed"
    ENTITY_ENABLED = "entity_enabled"


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
