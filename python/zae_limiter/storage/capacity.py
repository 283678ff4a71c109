"""DynamoDB capacity units from item sizes, by AWS's published rules.

moto's ConsumedCapacity figures are not DynamoDB's, so the repository counts its own: each call's
read/write units are derived from the sizes of the items it touched. Observers attached to the
ledger (`zae_limiter.metrics.Metrics`) see every call, throttle, retry and conflict as it happens,
so the repository reports to the ledger alone.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

WRITE_UNIT_BYTES = 1024
READ_UNIT_BYTES = 4096


def _number_size(text: str) -> int:
    # Numbers are stored as up to 38 significant digits, two digits per byte, plus one byte.
    digits = Decimal(text).normalize().as_tuple().digits
    return (len(digits) + 1) // 2 + 1


def attribute_value_size(value: dict[str, Any]) -> int:
    """Size in bytes of one AttributeValue in low-level form (`{"S": ...}`, `{"N": ...}`, ...)."""
    ((kind, inner),) = value.items()
    if kind == "S":
        return len(str(inner).encode())
    if kind == "N":
        return _number_size(str(inner))
    if kind == "B":
        return len(inner)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(len(s.encode()) for s in inner)
    if kind == "NS":
        return sum(_number_size(n) for n in inner)
    if kind == "BS":
        return sum(len(b) for b in inner)
    if kind == "L":
        return 3 + sum(1 + attribute_value_size(v) for v in inner)
    if kind == "M":
        return 3 + sum(len(k.encode()) + 1 + attribute_value_size(v) for k, v in inner.items())
    raise ValueError(f"unknown attribute type {kind!r}")


def item_size(item: dict[str, dict[str, Any]] | None) -> int:
    if not item:
        return 0
    return sum(len(name.encode()) + attribute_value_size(v) for name, v in item.items())


def write_units(*sizes: int) -> int:
    """A write costs one unit per started KB of the larger of the item before and after."""
    return max(1, math.ceil(max(sizes, default=0) / WRITE_UNIT_BYTES))


def read_units(size: int, consistent: bool) -> float:
    units = max(1, math.ceil(size / READ_UNIT_BYTES))
    return float(units) if consistent else units / 2


def api_name(operation: str) -> str:
    """DynamoDB's name of an operation (`UpdateItem`) from the client's method (`update_item`)."""
    if "_" not in operation and operation[:1].isupper():
        return operation
    return "".join(part.capitalize() for part in operation.split("_"))


class LedgerObserver(Protocol):
    """What a ledger tells its observers; operations arrive under DynamoDB's names."""

    def called(self, operation: str, rcu: float, wcu: float) -> None: ...

    def throttled(self, operation: str) -> None: ...

    def retried(self, operation: str) -> None: ...

    def conflicted(self, resource: str | None) -> None: ...

    def give_back_unconfirmed(self, resource: str, limit_name: str, tokens: int) -> None: ...


@dataclass
class CapacityLedger:
    """Calls and capacity units per DynamoDB operation, as DynamoDB would bill them."""

    calls: Counter[str] = field(default_factory=Counter)
    read_units: float = 0.0
    write_units: float = 0.0
    # Conditional bucket writes refused because another client changed the bucket first (each
    # is also counted, and billed, as an UpdateItem call).
    conflicts: int = 0
    # Give-backs whose write failed or whose outcome is unknown: never sent again (a copy still
    # in flight could land after the resend and add the tokens twice), so their tokens may stay
    # consumed until refill. Writes, and whole tokens per limit name.
    unconfirmed_give_backs: int = 0
    unconfirmed_give_back_tokens: Counter[str] = field(default_factory=Counter)
    observers: list[LedgerObserver] = field(default_factory=list)

    def attach(self, observer: LedgerObserver) -> None:
        """Tell `observer` of everything recorded from now on (once, however often attached)."""
        if all(o is not observer for o in self.observers):
            self.observers.append(observer)

    def detach(self, observer: LedgerObserver) -> None:
        self.observers = [o for o in self.observers if o is not observer]

    def record(self, operation: str, *, rcu: float = 0.0, wcu: float = 0.0) -> None:
        self.calls[operation] += 1
        self.read_units += rcu
        self.write_units += wcu
        for observer in self.observers:
            observer.called(operation, rcu, wcu)

    def throttled(self, operation: str) -> None:
        """A call DynamoDB refused for throughput (not billed; the repository retries it).
        Counted in `calls` as `<operation>:throttled`."""
        self.calls[f"{operation}:throttled"] += 1
        if self.observers:
            name = api_name(operation)
            for observer in self.observers:
                observer.throttled(name)

    def retried(self, operation: str) -> None:
        """The repository sends `operation` again (after a throttle or a failure)."""
        if self.observers:
            name = api_name(operation)
            for observer in self.observers:
                observer.retried(name)

    def conflict(self, resource: str | None = None) -> None:
        """A conditional bucket write refused: another client changed the bucket first."""
        self.conflicts += 1
        for observer in self.observers:
            observer.conflicted(resource)

    def give_back_unconfirmed(self, resource: str, tokens: dict[str, int]) -> None:
        """A give-back write (`tokens` per limit name) failed or may not have landed; it is
        not sent again."""
        self.unconfirmed_give_backs += 1
        self.unconfirmed_give_back_tokens.update(tokens)
        for observer in self.observers:
            for name, amount in tokens.items():
                observer.give_back_unconfirmed(resource, name, amount)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "total_calls": self.total_calls,
            "read_units": self.read_units,
            "write_units": self.write_units,
            "conflicts": self.conflicts,
            "unconfirmed_give_backs": self.unconfirmed_give_backs,
            "unconfirmed_give_back_tokens": dict(self.unconfirmed_give_back_tokens),
        }

    def reset(self) -> None:
        """Zero the counts (observers stay attached and keep their own totals)."""
        self.calls.clear()
        self.read_units = 0.0
        self.write_units = 0.0
        self.conflicts = 0
        self.unconfirmed_give_backs = 0
        self.unconfirmed_give_back_tokens.clear()
