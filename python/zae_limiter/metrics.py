"""Metrics through OpenTelemetry (`pip install zae-limiter[otel]`); a no-op without it.

`RateLimiter(..., metrics=Metrics())` reports each acquire's outcome and latency, and (observing
the repository's `CapacityLedger`) every DynamoDB call, its capacity units, throttles, retries and
write conflicts. The instruments are described in docs/metrics.md.

An acquire served from reserved tokens takes a few microseconds, and the SDK spends several on
each synchronous measurement. So counts are kept here, under a lock, and reported by
asynchronous (observable) counters when a reader collects: an acquire costs a dictionary lookup
and an increment, plus one histogram record for its latency (`latency_sample` thins those out).

Attributes are bounded by design: the resource, the result, the limit name, the DynamoDB
operation. An entity id is an attribute only with `entity_ids=True` (one series per entity).
A resource or a limit name may come from requests (an HTTP route's resource taken from the
path), so each instrument also keeps at most `max_series` attribute sets per `Metrics`: past
that, measurements go to one overflow series marked `otel.metric.overflow=true`, as the
OpenTelemetry SDK's own cardinality limit does.
"""

from __future__ import annotations

import logging
import random
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .exceptions import ValidationError

if TYPE_CHECKING:
    from opentelemetry.metrics import (
        CallbackOptions,
        Histogram,
        Meter,
        MeterProvider,
        Observation,
    )

log = logging.getLogger("zae_limiter")

# Outcomes of one acquire, the values of the `result` attribute.
ADMITTED = "admitted"
DENIED = "denied"
UNAVAILABLE = "unavailable"
FAIL_OPEN = "fail_open"
RESULTS = frozenset({ADMITTED, DENIED, UNAVAILABLE, FAIL_OPEN})

# Attribute names: the project's own under `zae_limiter.`, DynamoDB's operation as OpenTelemetry's
# database conventions name it.
RESOURCE = "zae_limiter.resource"
RESULT = "zae_limiter.result"
LIMIT = "zae_limiter.limit"
ENTITY_ID = "zae_limiter.entity_id"
OPERATION = "db.operation.name"

METER_NAME = "zae_limiter"

# Seconds: from an acquire served locally (microseconds) to one that waited out retries.
LATENCY_BOUNDARIES = (
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5,
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

Attributes = dict[str, str | bool]
Key = tuple[str | None, ...]

# The attribute set of the overflow series (OpenTelemetry's name for it).
OVERFLOW_ATTRIBUTE = "otel.metric.overflow"
DEFAULT_MAX_SERIES = 2000
_OVERFLOW_KEY: Key = ("\x00overflow",)

# The counters: name, unit, description. Each `Metrics` keeps a tally per name.
ACQUIRES = "zae_limiter.acquires"
DENIALS = "zae_limiter.limit.denials"
CALLS = "zae_limiter.dynamodb.calls"
READ_CAPACITY = "zae_limiter.dynamodb.read_capacity"
WRITE_CAPACITY = "zae_limiter.dynamodb.write_capacity"
THROTTLES = "zae_limiter.dynamodb.throttles"
RETRIES = "zae_limiter.dynamodb.retries"
CONFLICTS = "zae_limiter.write.conflicts"
UNCONFIRMED_GIVE_BACKS = "zae_limiter.give_back.unconfirmed"
SOFT_EXCEEDED = "zae_limiter.limit.soft_exceeded"
SHADOW_DENIALS = "zae_limiter.limit.shadow_denials"
COUNTERS = (
    (ACQUIRES, "{acquire}", "Acquires decided, by resource and result."),
    (DENIALS, "{denial}", "Limits acquires were denied by, by resource and limit."),
    (
        SOFT_EXCEEDED,
        "{excess}",
        "Soft limits admitted acquires took past their allowance, by resource and limit.",
    ),
    (
        SHADOW_DENIALS,
        "{denial}",
        "Limits that would have denied acquires but for shadow mode, by resource and limit.",
    ),
    (CALLS, "{call}", "DynamoDB calls answered (and billed), by operation."),
    (READ_CAPACITY, "{unit}", "DynamoDB read capacity units consumed, by operation."),
    (WRITE_CAPACITY, "{unit}", "DynamoDB write capacity units consumed, by operation."),
    (THROTTLES, "{call}", "DynamoDB calls refused for throughput (not billed), by operation."),
    (RETRIES, "{retry}", "DynamoDB calls sent again after a throttle or a failure, by operation."),
    (CONFLICTS, "{conflict}", "Bucket writes refused: another client changed the bucket first."),
    (
        UNCONFIRMED_GIVE_BACKS,
        "{token}",
        "Tokens of give-backs that failed or may not have landed, never sent again (they stay "
        "consumed until refill), by resource and limit.",
    ),
)
DURATION = "zae_limiter.acquire.duration"


class _Tally:
    """One attribute set's running total; the attribute dict is built once and reused."""

    __slots__ = ("attributes", "value")

    def __init__(self, attributes: Attributes) -> None:
        self.attributes = attributes
        self.value: float = 0


class _Tallies:
    """Running totals per key, read by an observable counter's callback (maybe another thread)."""

    def __init__(
        self, lock: threading.Lock, make: Callable[..., Attributes], max_series: int
    ) -> None:
        self._lock = lock
        self._make = make
        self._max_series = max_series
        self._by_key: dict[Key, _Tally] = {}

    def add(self, key: Key, amount: float = 1) -> _Tally:
        with self._lock:
            tally = self._by_key.get(key)
            if tally is None:
                if len(self._by_key) >= self._max_series:
                    key = _OVERFLOW_KEY
                    tally = self._by_key.get(key)
                if tally is None:
                    attributes: Attributes = (
                        {OVERFLOW_ATTRIBUTE: True} if key is _OVERFLOW_KEY else self._make(*key)
                    )
                    tally = self._by_key[key] = _Tally(attributes)
            tally.value += amount
        return tally

    def items(self) -> list[tuple[Key, float, Attributes]]:
        with self._lock:
            return [(key, t.value, t.attributes) for key, t in self._by_key.items()]


def _acquire_attributes(resource: str, result: str, entity_id: str | None) -> Attributes:
    if result not in RESULTS:
        raise ValidationError("result", result, f"must be one of {', '.join(sorted(RESULTS))}")
    attributes: Attributes = {RESOURCE: resource, RESULT: result}
    if entity_id is not None:
        attributes[ENTITY_ID] = entity_id
    return attributes


def _denial_attributes(resource: str, limit: str, entity_id: str | None) -> Attributes:
    attributes: Attributes = {RESOURCE: resource, LIMIT: limit}
    if entity_id is not None:
        attributes[ENTITY_ID] = entity_id
    return attributes


def _operation_attributes(operation: str) -> Attributes:
    return {OPERATION: operation}


def _resource_attributes(resource: str | None) -> Attributes:
    return {} if resource is None else {RESOURCE: resource}


_MAKERS: dict[str, Callable[..., Attributes]] = {
    ACQUIRES: _acquire_attributes,
    DENIALS: _denial_attributes,
    SOFT_EXCEEDED: _denial_attributes,
    SHADOW_DENIALS: _denial_attributes,
    CONFLICTS: _resource_attributes,
    UNCONFIRMED_GIVE_BACKS: _denial_attributes,
}


class _Instruments:
    """The instruments of one meter provider. A provider keeps the first callbacks registered
    under a name and drops later ones, so every `Metrics` made on it shares these, and each
    counter reports the sum of their tallies."""

    def __init__(self, meter: Meter, observation: type[Observation]) -> None:
        self.latency = meter.create_histogram(
            DURATION,
            unit="s",
            description="Time acquires took to decide, by resource and result.",
            explicit_bucket_boundaries_advisory=LATENCY_BOUNDARIES,
        )
        self._lock = threading.Lock()
        self._sources: list[dict[str, _Tallies]] = []
        for name, unit, description in COUNTERS:
            meter.create_observable_counter(
                name,
                callbacks=[self._observer(name, observation)],
                unit=unit,
                description=description,
            )

    def add(self, tallies: dict[str, _Tallies]) -> None:
        with self._lock:
            self._sources.append(tallies)

    def _observer(
        self, name: str, observation: type[Observation]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                sources = list(self._sources)
            merged: dict[Key, list[Any]] = {}
            for source in sources:
                for key, value, attributes in source[name].items():
                    slot = merged.get(key)
                    if slot is None:
                        merged[key] = [value, attributes]
                    else:
                        slot[0] += value
            return [observation(value, attributes) for value, attributes in merged.values()]

        return observe


class _Global:
    """The registry's key for the global provider: a meter taken from it before
    `set_meter_provider` forwards to the provider set later, so every `Metrics()` shares one."""


_GLOBAL = _Global()
_REGISTRY_LOCK = threading.Lock()
_BY_PROVIDER: weakref.WeakKeyDictionary[object, _Instruments] = weakref.WeakKeyDictionary()


OTEL_EXTRA = "pip install 'zae-limiter[otel]'"
NO_API_WARNING = (
    "zae_limiter: Metrics() reports nothing: opentelemetry-api is not installed; " + OTEL_EXTRA
)
NO_PROVIDER_WARNING = (
    "zae_limiter: Metrics() reports to the global OpenTelemetry meter provider, and none is set: "
    "nothing is exported until opentelemetry.metrics.set_meter_provider() is called (counts are "
    "kept, latencies are dropped); the SDK and a Prometheus exporter: " + OTEL_EXTRA
    + " (docs/metrics.md)"
)

_WARNED_LOCK = threading.Lock()
_warned = False


def _warn_once(message: str) -> None:
    """A WARNING on the "zae_limiter" logger, once per process: a misconfiguration is a fact of
    the deployment, not of each limiter, and a service making limiters per request must not log
    it per request. A log record rather than `warnings.warn`: it lands where the service's other
    operational warnings go, whatever its warning filters."""
    global _warned
    with _WARNED_LOCK:
        if _warned:
            return
        _warned = True
    log.warning("%s", message)


def _global_provider_unset() -> bool:
    """No meter provider set globally: the API then hands out its proxy, which forwards to
    nothing until `set_meter_provider`. The API has no public way to ask; the proxy's class name
    is compared rather than imported from `opentelemetry.metrics._internal`, so that a renamed
    class means no warning, never a failure."""
    from opentelemetry import metrics as otel

    return type(otel.get_meter_provider()).__name__ == "_ProxyMeterProvider"


def _instruments_of(meter_provider: MeterProvider | None) -> _Instruments | None:
    """The provider's instruments (None: the global provider), or None without OpenTelemetry."""
    try:
        from opentelemetry import metrics as otel
    except ImportError:
        _warn_once(NO_API_WARNING)
        return None
    if meter_provider is not None and not isinstance(meter_provider, otel.MeterProvider):
        raise ValidationError(
            "meter_provider", meter_provider, "must be an OpenTelemetry MeterProvider or None"
        )
    from ._version import __version__

    key: object = _GLOBAL if meter_provider is None else meter_provider
    with _REGISTRY_LOCK:
        instruments = _BY_PROVIDER.get(key)
        if instruments is None:
            meter = otel.get_meter(METER_NAME, __version__, meter_provider)
            instruments = _BY_PROVIDER[key] = _Instruments(meter, otel.Observation)
    return instruments


class Metrics:
    """Where a limiter reports what it does: `RateLimiter(..., metrics=Metrics())`.

    `meter_provider`: an OpenTelemetry `MeterProvider` (None: the global one, as
    `opentelemetry.metrics.set_meter_provider` configured it). `entity_ids=True` adds the
    entity id to the acquire and denial attributes: one series per entity, for a bounded set of
    entities only. `latency_sample` is the share of acquires whose latency is recorded (1.0:
    all; the outcome counts always include every acquire). `max_series` bounds the attribute
    sets of each instrument (see the module's docstring): one more series takes the rest.

    Without `opentelemetry-api` installed, and for `NO_METRICS`, every method does nothing. One
    `Metrics` may serve several limiters; several on one provider add up. Reporting to nobody
    is logged once per process as a WARNING on the "zae_limiter" logger: no `opentelemetry-api`
    (when made), or no global provider set yet (at its first acquire, for `meter_provider=None`).
    """

    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        *,
        entity_ids: bool = False,
        latency_sample: float = 1.0,
        enabled: bool = True,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        if isinstance(max_series, bool) or not isinstance(max_series, int) or max_series < 1:
            raise ValidationError("max_series", max_series, "must be a positive integer")
        if not isinstance(entity_ids, bool):
            raise ValidationError("entity_ids", entity_ids, "must be a bool")
        if (
            isinstance(latency_sample, bool)
            or not isinstance(latency_sample, int | float)
            or not 0.0 <= latency_sample <= 1.0
        ):
            raise ValidationError("latency_sample", latency_sample, "must be within 0.0 and 1.0")
        if not isinstance(enabled, bool):
            raise ValidationError("enabled", enabled, "must be a bool")
        self.entity_ids = entity_ids
        self.latency_sample = float(latency_sample)
        lock = threading.Lock()
        tallies = {
            name: _Tallies(lock, _MAKERS.get(name, _operation_attributes), max_series)
            for name, _, _ in COUNTERS
        }
        self._acquires = tallies[ACQUIRES]
        self._denials = tallies[DENIALS]
        self._calls = tallies[CALLS]
        self._read = tallies[READ_CAPACITY]
        self._write = tallies[WRITE_CAPACITY]
        self._throttles = tallies[THROTTLES]
        self._retries = tallies[RETRIES]
        self._conflicts = tallies[CONFLICTS]
        self._unconfirmed = tallies[UNCONFIRMED_GIVE_BACKS]
        self._soft = tallies[SOFT_EXCEEDED]
        self._shadow = tallies[SHADOW_DENIALS]
        instruments = _instruments_of(meter_provider) if enabled else None
        if instruments is not None:
            instruments.add(tallies)
        self._latency: Histogram | None = None if instruments is None else instruments.latency
        self.enabled = instruments is not None
        """False when nothing is reported (`enabled=False`, or OpenTelemetry not installed)."""
        # Whether the global provider is set is asked at the first acquire, not here: a
        # `Metrics()` may be made before `set_meter_provider` (at import, say), and only one
        # still unset when acquires are reported is a misconfiguration.
        self._check_provider = instruments is not None and meter_provider is None

    # -- the limiter's reports --------------------------------------------------------------

    def acquired(
        self,
        resource: str,
        entity_id: str,
        result: str,
        seconds: float,
        denied_by: Sequence[str] = (),
    ) -> None:
        """One `acquire` decided: `result` is one of ADMITTED, DENIED, UNAVAILABLE, FAIL_OPEN;
        `denied_by` names the limits that were exceeded (DENIED only)."""
        latency = self._latency
        if latency is None:
            return
        if self._check_provider:
            self._check_provider = False
            if _global_provider_unset():
                _warn_once(NO_PROVIDER_WARNING)
        entity = entity_id if self.entity_ids else None
        tally = self._acquires.add((resource, result, entity))
        for limit in denied_by:
            self._denials.add((resource, limit, entity))
        if self.latency_sample >= 1.0 or random.random() < self.latency_sample:
            latency.record(seconds, tally.attributes)

    def soft_exceeded(
        self, resource: str, entity_id: str, soft: Sequence[str], shadow: Sequence[str] = ()
    ) -> None:
        """An admitted acquire took the `soft` limits past their allowance; the `shadow` ones
        would have denied it but for shadow mode."""
        if not self.enabled:
            return
        entity = entity_id if self.entity_ids else None
        for limit in soft:
            self._soft.add((resource, limit, entity))
        for limit in shadow:
            self._shadow.add((resource, limit, entity))

    # -- the ledger's reports (`capacity.LedgerObserver`) -----------------------------------

    def called(self, operation: str, rcu: float, wcu: float) -> None:
        if not self.enabled:
            return
        key = (operation,)
        self._calls.add(key)
        if rcu:
            self._read.add(key, rcu)
        if wcu:
            self._write.add(key, wcu)

    def throttled(self, operation: str) -> None:
        if self.enabled:
            self._throttles.add((operation,))

    def retried(self, operation: str) -> None:
        if self.enabled:
            self._retries.add((operation,))

    def conflicted(self, resource: str | None) -> None:
        if self.enabled:
            self._conflicts.add((resource,))

    def give_back_unconfirmed(self, resource: str, limit_name: str, tokens: int) -> None:
        if self.enabled:
            self._unconfirmed.add((resource, limit_name, None), tokens)


NO_METRICS = Metrics(enabled=False)
"""Reports nothing: a limiter's metrics when none are given."""


SOFT_WARNING_INTERVAL_MS = 60_000
"""At most one WARNING per (entity, limit) in this many milliseconds of the limiter's clock."""
SOFT_WARNING_KEYS = 10_000
"""(entity, limit) pairs remembered: past that, the oldest is forgotten (and may warn again)."""


class SoftExcesses:
    """What a limiter does when an admitted change takes a soft limit past its allowance (or,
    in shadow mode, would have been denied): counts it in `metrics` and logs a WARNING on the
    "zae_limiter" logger, at most once per (entity, limit name) per
    `SOFT_WARNING_INTERVAL_MS` of `clock` (the limiter's, in ms): a flood of excesses costs a
    count each, not a log line each. The engine calls it (`Engine.on_soft_excess`)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], int]) -> None:
        self.metrics = metrics
        self.clock = clock
        # Last warning per key, oldest first: expired ones are dropped from the front.
        self._warned: OrderedDict[tuple[str, str], int] = OrderedDict()

    def __call__(
        self, entity_id: str, resource: str, soft: Sequence[str], shadow: Sequence[str]
    ) -> None:
        self.metrics.soft_exceeded(resource, entity_id, soft, shadow)
        now = self.clock()
        warned = self._warned
        while warned:
            oldest, then = next(iter(warned.items()))
            if now - then < SOFT_WARNING_INTERVAL_MS:
                break
            del warned[oldest]
        for names, what in ((soft, "soft limit exceeded"), (shadow, "shadow mode would deny")):
            for name in names:
                key = (entity_id, name)
                at = warned.get(key)
                if at is not None and 0 <= now - at < SOFT_WARNING_INTERVAL_MS:
                    continue
                warned.pop(key, None)  # re-inserted last: the order stays by time
                warned[key] = now
                if len(warned) > SOFT_WARNING_KEYS:
                    warned.popitem(last=False)
                log.warning(
                    "%s: entity %r resource %r limit %r (admitted; further ones for this "
                    "entity and limit are counted, not logged, for %d s)",
                    what,
                    entity_id,
                    resource,
                    name,
                    SOFT_WARNING_INTERVAL_MS // 1000,
                )
