"""Checks of the limiter's call arguments (limit lists, consumption maps), made before any I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .exceptions import ValidationError
from .models import Limit
from .validation import MAX_AMOUNT, validate_amount, validate_name, validate_resource

# Limit names already found valid: a service uses a handful, and checking each on every acquire
# would cost more than a decision served from a reserved block.
_VALID_NAMES: set[str] = set()
_VALID_NAMES_MAX = 4096


def check_limits(limits: Sequence[Limit], allow_empty: bool = False) -> list[Limit]:
    """A list of distinct `Limit`s (empty only when stored limits may supply them)."""
    if isinstance(limits, Limit) or not isinstance(limits, (list, tuple)):
        raise ValidationError("limits", limits, "must be a list of Limit")
    seen: set[str] = set()
    for limit in limits:
        if not isinstance(limit, Limit):
            raise ValidationError("limits", limit, "must be a list of Limit")
        if limit.name in seen:
            raise ValidationError("limits", limit.name, "duplicate limit name")
        seen.add(limit.name)
    if not limits and not allow_empty:
        raise ValidationError("limits", limits, "at least one limit is required")
    return list(limits)


def check_consume(consume: Mapping[str, int], field: str = "consume") -> dict[str, int]:
    """Limit name → non-negative whole amount."""
    if not isinstance(consume, Mapping):
        raise ValidationError(field, consume, "must be a mapping of limit name to amount")
    result: dict[str, int] = {}
    for name, amount in consume.items():
        if name not in _VALID_NAMES:
            validate_name(name, field=f"{field}.{name}" if isinstance(name, str) else field)
            if len(_VALID_NAMES) < _VALID_NAMES_MAX:
                _VALID_NAMES.add(name)
        if type(amount) is int and 0 <= amount <= MAX_AMOUNT:
            result[name] = amount
        else:
            result[name] = validate_amount(amount, field=f"{field}.{name}")
    return result


def check_also(also: object, resource: str) -> dict[str, dict[str, int]]:
    """`acquire(..., also=)`: other resource -> its consumption, each resource valid and not the
    acquire's own (its bucket item would be taken from twice), each consumption as `consume`'s.
    Fields name the place: `also`, `also.<resource>`, `also.<resource>.<limit>`."""
    if not isinstance(also, Mapping):
        raise ValidationError("also", also, "must be a mapping of resource to a consume mapping")
    result: dict[str, dict[str, int]] = {}
    for other, consume in also.items():
        field = f"also.{other}" if isinstance(other, str) else "also"
        validate_resource(other, field=field)
        if other == resource:
            raise ValidationError(field, other, "repeats the acquire's own resource")
        result[other] = check_consume(consume, field=field)
    return result


def check_consumable(
    limit_sets: Sequence[tuple[str, Sequence[Limit]]],
    amounts: Mapping[str, int],
    field: str = "consume",
    *,
    burst: bool = True,
) -> None:
    """Every amount names a limit of the first entity and (with `burst`) fits every entity's
    burst; an acquire leaves the burst to `oversized`, since it raises `RequestTooLarge`."""
    own = {limit.name for limit in limit_sets[0][1]}
    for name in amounts:
        if name not in own:
            raise ValidationError(f"{field}.{name}", name, "no limit of that name")
    if burst and (too := oversized(limit_sets, amounts, field)) is not None:
        entity_id, limit, key = too
        raise ValidationError(
            key,
            amounts[limit.name],
            f"exceeds the burst ({limit.burst}) of {entity_id!r}'s limit; "
            "it could never be admitted",
        )


def oversized(
    limit_sets: Sequence[tuple[str, Sequence[Limit]]],
    amounts: Mapping[str, int],
    field: str = "consume",
) -> tuple[str, Limit, str] | None:
    """The first (entity_id, limit, field) whose amount exceeds the limit's burst, if any. A
    soft limit is never one: it never denies, so it goes into debt instead."""
    for entity_id, limits in limit_sets:
        for limit in limits:
            if amounts.get(limit.name, 0) > limit.burst and not limit.soft:
                return entity_id, limit, f"{field}.{limit.name}"
    return None
