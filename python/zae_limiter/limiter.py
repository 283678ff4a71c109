"""`RateLimiter`: token buckets shared by every process through one DynamoDB table.

An acquire decides locally (the core) over the last known bucket state, then commits with one
conditional UpdateItem per entity. The conditions make a stale state harmless: if another client
changed the bucket in a way that matters, the write fails, returns the current item, and the
decision is made again on it. Only denials are confirmed with a fresh read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import botocore.exceptions

from . import core, schema, usage
from .exceptions import (
    EntityNotFoundError,
    InfrastructureNotFoundError,
    RateLimiterUnavailable,
    RateLimitExceeded,
    StackCreationError,
    ValidationError,
)
from .lease import Lease
from .models import (
    Entity,
    FailureMode,
    Limit,
    LimitStatus,
    StackOptions,
    UsageSnapshot,
    UsageSummary,
)
from .repository import (
    BucketItem,
    ConditionFailed,
    LimitWrite,
    Repository,
    RepositoryUnavailable,
    RetryPolicy,
)
from .validation import (
    validate_amount,
    validate_entity_id,
    validate_name,
    validate_resource,
)
from .version import (
    VERSION_CHECKS,
    Compatibility,
    VersionCheck,
    ensure_compatible,
    record_deployment,
)

log = logging.getLogger("zae_limiter")

DEFAULT_RESOURCE = schema.DEFAULT_RESOURCE
# Fold pending refill into the stored tokens at most once a minute per bucket: each fold moves the
# anchor, which makes concurrent writers retry once, while leaving it alone is exact anyway.
REANCHOR_MS = 60_000
MAX_ROUNDS = 12
# Give-backs and adjustments must land: losing one leaves capacity consumed for nothing.
MAX_FORCED_ROUNDS = 48


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Target:
    """One entity's bucket item taking part in a decision (the entity, or its parent)."""

    entity_id: str
    resource: str
    limits: list[Limit]
    state: BucketItem | None
    fresh: bool


class _TTLCache:
    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def get(self, key: Any) -> tuple[bool, Any]:
        hit = self._data.get(key)
        if hit is None or (self.ttl and time.monotonic() - hit[0] > self.ttl):
            return False, None
        self._data.move_to_end(key)
        return True, hit[1]

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = (time.monotonic(), value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def drop(self, key: Any) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()


class RateLimiter:
    """Async rate limiter over the table `ZAEL-<name>`.

    ```python
    async with RateLimiter(name="my-app", region="us-east-1") as limiter:
        async with limiter.acquire("key-1", "gpt-4", limits, {"rpm": 1, "tpm": 500}) as lease:
            await lease.adjust(tpm=actual_tokens - 500)
    ```
    """

    def __init__(
        self,
        name: str = "limiter",
        region: str | None = None,
        endpoint_url: str | None = None,
        stack_options: StackOptions | None = None,
        failure_mode: FailureMode = FailureMode.FAIL_CLOSED,
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], int] | None = None,
        limits_cache_ttl: float = 30.0,
        bucket_cache_size: int = 10_000,
        repository: Repository | None = None,
        version_check: VersionCheck = "strict",
    ) -> None:
        if not isinstance(failure_mode, FailureMode):
            raise ValidationError("failure_mode", failure_mode, "must be a FailureMode")
        self.name = schema.short_name(schema.table_name(name))
        self.table_name = schema.table_name(name)
        self.region = region
        self.endpoint_url = endpoint_url
        self.stack_options = stack_options
        self.failure_mode = failure_mode
        self.repository = repository or Repository(
            self.table_name, region, endpoint_url, retry=retry
        )
        self._clock = clock or _wall_clock_ms
        self._buckets = _TTLCache(0, bucket_cache_size)
        self._entities = _TTLCache(limits_cache_ttl, bucket_cache_size)
        self._stored_limits = _TTLCache(limits_cache_ttl, bucket_cache_size)
        self._ready = False
        self._ready_lock = asyncio.Lock()
        # "relaxed" and "skip" are dangerous (see zae_limiter.version.enforce): they let this
        # client run against an aggregator or minimum client version it was not built for.
        if version_check not in VERSION_CHECKS:
            raise ValidationError(
                "version_check", version_check, f"must be one of {', '.join(VERSION_CHECKS)}"
            )
        self.version_check: VersionCheck = version_check
        self.compatibility: Compatibility | None = None
        self._provisioned = False
        self._version_retry_at = 0.0

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> RateLimiter:
        await self._ensure_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.repository.close()

    @property
    def ledger(self) -> Any:
        """DynamoDB calls and capacity units this limiter has used (see `CapacityLedger`)."""
        return self.repository.ledger

    async def _ensure_ready(self) -> None:
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            try:
                if (
                    not self._provisioned
                    and self.stack_options is not None
                    and self.stack_options.create_table
                ):
                    await self._provision(self.stack_options)
                self._provisioned = True
            except RepositoryUnavailable as exc:
                raise RateLimiterUnavailable(f"cannot reach DynamoDB: {exc}", exc) from exc
            self._ready = await self._check_version()

    async def _check_version(self) -> bool:
        """Check the version record once per limiter; True when the check is settled.

        An unreadable record (DynamoDB down, table missing) leaves the check pending, to be retried
        at most every 30 s: the operation itself then meets the outage and its failure mode
        decides, so FAIL_OPEN still admits while DynamoDB is unreachable.
        """
        if self.version_check == "skip":
            return True
        if time.monotonic() < self._version_retry_at:
            return False
        options = self.stack_options
        try:
            self.compatibility = await ensure_compatible(
                self.repository,
                mode=self.version_check,
                auto_update=options is not None and options.auto_update,
                name=self.name,
                region=self._region(),
                endpoint_url=self.endpoint_url,
                options=options,
            )
        except RepositoryUnavailable as exc:
            log.warning("version check postponed, DynamoDB unavailable: %s", exc)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            log.warning("version check postponed, table %s not found", self.table_name)
        else:
            return True
        self._version_retry_at = time.monotonic() + 30.0
        return False

    async def _provision(self, options: StackOptions) -> None:
        if self.endpoint_url is None:
            # On AWS the stack (table, aggregator, alarms) is Pulumi's to create. An existing
            # table means it was deployed: a Pulumi run per limiter start would take minutes,
            # and keeping the aggregator current is the version check's auto-update.
            if await self.repository.table_exists():
                return
            from .infra import automation

            try:
                await asyncio.to_thread(automation.deploy, self.name, self._region(), options)
            except automation.PulumiNotInstalledError as exc:
                raise StackCreationError(self.table_name, str(exc)) from exc
            await record_deployment(self.repository, updated_by="zae-limiter provisioning")
            return
        created = await self.repository.create_table(
            options.billing_mode, options.read_capacity, options.write_capacity
        )
        if created or await self.repository.get_version_record() is None:
            from . import __version__

            await self.repository.set_version_record(
                schema_version=schema.SCHEMA_VERSION,
                lambda_version=__version__,
                min_client_version="0.0.0",
                updated_by="zae-limiter local provisioning",
            )

    def _region(self) -> str:
        return self.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    async def delete_stack(self) -> None:
        """Delete the table (and, on AWS, the Pulumi stack)."""
        if self.endpoint_url is None:
            from .infra import automation

            await asyncio.to_thread(automation.destroy, self.name, self._region())
        else:
            await self.repository.delete_table()
        self._buckets.clear()

    # -- entities ---------------------------------------------------------------------------

    async def create_entity(
        self,
        entity_id: str,
        name: str | None = None,
        parent_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Entity:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValidationError("metadata", metadata, "must be a mapping of str to str")
        entity = Entity(
            id=validate_entity_id(entity_id),
            name=name,
            parent_id=None if parent_id is None else validate_entity_id(parent_id, "parent_id"),
            metadata=dict(metadata or {}),
        )
        await self._ensure_ready()
        with self._unavailable_as_error():
            if (
                entity.parent_id is not None
                and await self.repository.get_entity(entity.parent_id) is None
            ):
                raise EntityNotFoundError(entity.parent_id)
            await self.repository.put_entity(entity)
        stored = await self.get_entity(entity.id)
        return stored or entity

    async def get_entity(self, entity_id: str) -> Entity | None:
        validate_entity_id(entity_id)
        await self._ensure_ready()
        with self._unavailable_as_error():
            entity = await self.repository.get_entity(entity_id)
        if entity is not None:
            self._entities.put(entity_id, entity)
        return entity

    async def delete_entity(self, entity_id: str) -> None:
        validate_entity_id(entity_id)
        await self._ensure_ready()
        with self._unavailable_as_error():
            await self.repository.delete_entity(entity_id)
        self._entities.drop(entity_id)
        self._stored_limits.drop(entity_id)
        for key in [k for k, _ in list(self._buckets._data.items()) if k[0] == entity_id]:
            self._buckets.drop(key)

    async def get_children(self, parent_id: str) -> list[Entity]:
        validate_entity_id(parent_id, "parent_id")
        await self._ensure_ready()
        with self._unavailable_as_error():
            return await self.repository.get_children(parent_id)

    # -- stored limits ----------------------------------------------------------------------

    async def set_limits(
        self, entity_id: str, limits: Sequence[Limit], resource: str = DEFAULT_RESOURCE
    ) -> None:
        validate_entity_id(entity_id)
        validate_resource(resource)
        checked = _check_limits(limits)
        await self._ensure_ready()
        with self._unavailable_as_error():
            await self.repository.set_limits(entity_id, resource, checked)
        self._stored_limits.drop(entity_id)

    async def get_limits(self, entity_id: str, resource: str = DEFAULT_RESOURCE) -> list[Limit]:
        validate_entity_id(entity_id)
        validate_resource(resource)
        await self._ensure_ready()
        with self._unavailable_as_error():
            return await self.repository.get_limits(entity_id, resource)

    async def delete_limits(self, entity_id: str, resource: str = DEFAULT_RESOURCE) -> None:
        validate_entity_id(entity_id)
        validate_resource(resource)
        await self._ensure_ready()
        with self._unavailable_as_error():
            await self.repository.delete_limits(entity_id, resource)
        self._stored_limits.drop(entity_id)

    async def _resolve_limits(
        self, entity_id: str, resource: str, fallback: list[Limit]
    ) -> list[Limit]:
        hit, stored = self._stored_limits.get(entity_id)
        if not hit:
            stored = await self.repository.get_all_limits(entity_id)
            self._stored_limits.put(entity_id, stored)
        chosen = stored.get(resource) or stored.get(DEFAULT_RESOURCE) or fallback
        return list(chosen)

    async def _parent_of(self, entity_id: str) -> str | None:
        hit, entity = self._entities.get(entity_id)
        if not hit:
            entity = await self.repository.get_entity(entity_id)
            if entity is None:
                raise EntityNotFoundError(entity_id)
            self._entities.put(entity_id, entity)
        parent: str | None = entity.parent_id
        return parent

    # -- acquire ----------------------------------------------------------------------------

    @asynccontextmanager
    async def acquire(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        consume: Mapping[str, int],
        cascade: bool = False,
        use_stored_limits: bool = False,
        failure_mode: FailureMode | None = None,
    ) -> AsyncIterator[Lease]:
        """Take `consume` from every limit (and the parent's, with `cascade`) or raise
        `RateLimitExceeded`; the consumption stands on a normal exit and is given back if the
        block raises."""
        mode = self._failure_mode(failure_mode)
        validate_entity_id(entity_id)
        validate_resource(resource)
        fallback = _check_limits(limits or [], allow_empty=use_stored_limits)
        amounts = _check_consume(consume)
        if not use_stored_limits:  # the limits are known: reject before any I/O
            _check_consumable([_Target(entity_id, resource, fallback, None, False)], amounts)
        await self._ensure_ready()
        try:
            targets = await self._targets(entity_id, resource, fallback, cascade, use_stored_limits)
            _check_consumable(targets, amounts)
            await self._commit(targets, amounts)
        except (RepositoryUnavailable, botocore.exceptions.ClientError) as exc:
            if _error_code(exc) == "ResourceNotFoundException":
                raise InfrastructureNotFoundError(self.table_name) from exc
            if mode is FailureMode.FAIL_OPEN:
                log.warning("DynamoDB unavailable, admitting (FAIL_OPEN): %s", exc)
                lease = Lease(self, [], amounts, fail_open=True)
            else:
                raise RateLimiterUnavailable(f"rate limiter unavailable: {exc}", exc) from exc
        else:
            lease = Lease(self, targets, amounts)
        try:
            yield lease
        except BaseException:
            try:
                await lease._rollback()
            except Exception:  # the caller's exception matters more than a failed give-back
                log.exception("rollback of %r failed; its consumption stands", lease)
            raise

    def _failure_mode(self, failure_mode: FailureMode | None) -> FailureMode:
        if failure_mode is None:
            return self.failure_mode
        if not isinstance(failure_mode, FailureMode):
            raise ValidationError("failure_mode", failure_mode, "must be a FailureMode")
        return failure_mode

    async def _targets(
        self,
        entity_id: str,
        resource: str,
        fallback: list[Limit],
        cascade: bool,
        use_stored_limits: bool,
    ) -> list[_Target]:
        ids = [entity_id]
        if cascade:
            parent = await self._parent_of(entity_id)
            if parent is not None:
                ids.append(parent)
        limit_sets: list[list[Limit]] = []
        for eid in ids:
            limits = (
                await self._resolve_limits(eid, resource, fallback)
                if use_stored_limits
                else fallback
            )
            if not limits:
                raise ValidationError(
                    "limits", limits, f"no limits given and none stored for entity {eid!r}"
                )
            limit_sets.append(limits)
        cached = [self._buckets.get((eid, resource)) for eid in ids]
        missing = [i for i, (hit, _) in enumerate(cached) if not hit]
        fresh_states = await asyncio.gather(
            *(self.repository.get_bucket(ids[i], resource) for i in missing)
        )
        states: list[BucketItem | None] = [state for _, state in cached]
        for i, state in zip(missing, fresh_states, strict=True):
            states[i] = state
        return [
            _Target(eid, resource, limit_sets[i], states[i], fresh=i in missing)
            for i, eid in enumerate(ids)
        ]

    async def _commit(self, targets: list[_Target], amounts: Mapping[str, int]) -> None:
        """Consume `amounts` from every target, all or nothing."""
        await self._apply(targets, amounts, check=True)

    async def _force(self, targets: list[_Target], amounts: Mapping[str, int]) -> None:
        """Add `amounts` (negative: give back) to every target without a check."""
        await self._apply(targets, amounts, check=False)

    async def _apply(self, targets: list[_Target], amounts: Mapping[str, int], check: bool) -> None:
        milli = {name: amount * 1000 for name, amount in amounts.items()}
        deltas = [[milli.get(limit.name, 0) for limit in t.limits] for t in targets]
        pending = [i for i, d in enumerate(deltas) if any(d)]
        committed: list[int] = []
        # Raw outcomes per target; LimitStatus objects are only built for a denial.
        seen: dict[int, Sequence[core.BucketOutcome]] = {}
        rounds = MAX_ROUNDS if check else MAX_FORCED_ROUNDS
        try:
            for round_ in range(rounds):
                if round_:
                    await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**round_)))
                now = self._clock()
                # Statuses are reported for every target, but only pending ones are written.
                decide_on = sorted(set(pending) | (set() if seen else set(range(len(targets)))))
                inputs = [
                    _bucket_input(limit, targets[i].state, delta)
                    for i in decide_on
                    for limit, delta in zip(targets[i].limits, deltas[i], strict=True)
                ]
                admitted, outcomes = core.decide(inputs, now, check, REANCHOR_MS)
                cursor = 0
                plans: dict[int, list[LimitWrite]] = {}
                for i in decide_on:
                    target = targets[i]
                    part = outcomes[cursor : cursor + len(target.limits)]
                    cursor += len(target.limits)
                    seen[i] = part
                    plans[i] = _writes(target, part, deltas[i])
                if not admitted:
                    # Only a stale view of a short bucket can make a denial wrong.
                    stale = [
                        i
                        for i in pending
                        if not targets[i].fresh and any(out[1] for out in seen[i])
                    ]
                    if stale:
                        await self._refresh([targets[i] for i in stale])
                        continue
                    raise RateLimitExceeded(_statuses(targets, seen, deltas))
                results = await asyncio.gather(
                    *(self._write(targets[i], plans[i], now) for i in pending),
                    return_exceptions=True,
                )
                still: list[int] = []
                for i, result in zip(pending, results, strict=True):
                    if isinstance(result, ConditionFailed):
                        targets[i].state = result.current
                        targets[i].fresh = True
                        still.append(i)
                    elif isinstance(result, BaseException):
                        raise result
                    else:
                        committed.append(i)
                pending = still
                if not pending:
                    return
            if check:
                # DynamoDB answered every round; other clients kept taking what this one saw.
                # That is a denial under contention, not an outage: FAIL_OPEN must not admit it.
                raise RateLimitExceeded(_statuses(targets, seen, deltas))
            raise RepositoryUnavailable(
                f"bucket contention: gave up after {rounds} rounds of conflicting writes"
            )
        except BaseException:
            if committed and check:
                # Partial success of an all-or-nothing consume: give back what was taken.
                give_back = {name: -amount for name, amount in amounts.items()}
                await self._force([targets[i] for i in committed], give_back)
            raise

    async def _write(self, target: _Target, writes: list[LimitWrite], now: int) -> BucketItem:
        key = (target.entity_id, target.resource)
        try:
            state = await self.repository.write_bucket(
                target.entity_id,
                target.resource,
                writes,
                now,
                known_size=target.state.size if target.state else 0,
                known_ids=target.state.write_ids if target.state else (),
            )
        except ConditionFailed as exc:
            self._buckets.put(key, exc.current)
            raise
        except Exception:
            self._buckets.drop(key)
            raise
        target.state = state
        target.fresh = True
        self._buckets.put(key, state)
        return state

    async def _refresh(self, targets: list[_Target]) -> None:
        states = await asyncio.gather(
            *(self.repository.get_bucket(t.entity_id, t.resource) for t in targets)
        )
        for target, state in zip(targets, states, strict=True):
            target.state = state
            target.fresh = True
            self._buckets.put((target.entity_id, target.resource), state)

    # -- reads ------------------------------------------------------------------------------

    async def available(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        use_stored_limits: bool = False,
    ) -> dict[str, int]:
        """Tokens available now per limit (negative after over-consumption). One read."""
        validate_entity_id(entity_id)
        validate_resource(resource)
        fallback = _check_limits(limits or [], allow_empty=use_stored_limits)
        chosen, state = await self._read(entity_id, resource, fallback, use_stored_limits)
        now = self._clock()
        result: dict[str, int] = {}
        for limit in chosen:
            burst, amount, period, tokens, last_refill, _ = _bucket_input(limit, state, 0)
            milli = core.available(burst, amount, period, tokens, last_refill, now)
            result[limit.name] = milli // 1000
        return result

    async def _read(
        self, entity_id: str, resource: str, fallback: list[Limit], use_stored_limits: bool
    ) -> tuple[list[Limit], BucketItem | None]:
        """The limits that apply and the bucket item, freshly read (it refreshes the cache)."""
        await self._ensure_ready()
        with self._unavailable_as_error():
            chosen = (
                await self._resolve_limits(entity_id, resource, fallback)
                if use_stored_limits
                else fallback
            )
            state = await self.repository.get_bucket(entity_id, resource)
        self._buckets.put((entity_id, resource), state)
        return chosen, state

    async def time_until_available(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        needed: Mapping[str, int],
        use_stored_limits: bool = False,
    ) -> float:
        """Seconds until every limit can cover `needed` (0.0 if it can now)."""
        validate_entity_id(entity_id)
        validate_resource(resource)
        fallback = _check_limits(limits or [], allow_empty=use_stored_limits)
        amounts = _check_consume(needed, field="needed")
        if not use_stored_limits:  # the limits are known: reject before any I/O
            target = _Target(entity_id, resource, fallback, None, False)
            _check_consumable([target], amounts, field="needed")
        chosen, state = await self._read(entity_id, resource, fallback, use_stored_limits)
        target = _Target(entity_id, resource, chosen, state, fresh=True)
        _check_consumable([target], amounts, field="needed")
        inputs = [
            _bucket_input(limit, state, amounts.get(limit.name, 0) * 1000) for limit in chosen
        ]
        ms = core.time_until_available(inputs, self._clock())
        return 0.0 if ms is None else ms / 1000

    # -- usage ------------------------------------------------------------------------------

    async def get_usage_snapshots(
        self,
        entity_id: str,
        resource: str | None = None,
        window: str | None = "hourly",
        start: datetime | str | None = None,
        end: datetime | str | None = None,
    ) -> list[UsageSnapshot]:
        """Usage snapshots written by the aggregator, oldest first (`resource=None`: all)."""
        validate_entity_id(entity_id)
        if resource is not None:
            validate_resource(resource)
        try:
            args = usage.query_args(self.table_name, entity_id, resource, window, start, end)
        except ValueError as exc:
            raise ValidationError("window/start/end", (window, start, end), str(exc)) from exc
        await self._ensure_ready()
        with self._unavailable_as_error():
            items = await self.repository.query(**args)
        snapshots = [usage.snapshot_from_item(item) for item in items]
        return sorted(snapshots, key=lambda s: (usage.parse_window_start_iso(s), s.resource))

    async def get_usage_summary(
        self,
        entity_id: str,
        resource: str | None = None,
        window: str | None = "hourly",
        start: datetime | str | None = None,
        end: datetime | str | None = None,
    ) -> UsageSummary:
        """Totals and per-snapshot averages per limit over a range of snapshots."""
        snapshots = await self.get_usage_snapshots(entity_id, resource, window, start, end)
        return usage.summarize(snapshots, entity_id, resource, window, start, end)

    def _unavailable_as_error(self) -> _Unavailable:
        return _Unavailable(self.table_name)


class _Unavailable:
    """Management calls have no failure mode: an unreachable table is always an error."""

    def __init__(self, table_name: str) -> None:
        self.table_name = table_name

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, RepositoryUnavailable):
            raise RateLimiterUnavailable(f"rate limiter unavailable: {exc}", exc) from exc
        if _error_code(exc) == "ResourceNotFoundException":
            raise InfrastructureNotFoundError(self.table_name) from exc


def _error_code(exc: BaseException | None) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return None if code is None else str(code)


def _check_limits(limits: Sequence[Limit], allow_empty: bool = False) -> list[Limit]:
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


def _check_consume(consume: Mapping[str, int], field: str = "consume") -> dict[str, int]:
    if not isinstance(consume, Mapping):
        raise ValidationError(field, consume, "must be a mapping of limit name to amount")
    result: dict[str, int] = {}
    for name, amount in consume.items():
        validate_name(name, field=f"{field}.{name}" if isinstance(name, str) else field)
        result[name] = validate_amount(amount, field=f"{field}.{name}")
    return result


def _check_consumable(
    targets: list[_Target], amounts: Mapping[str, int], field: str = "consume"
) -> None:
    own = {limit.name: limit for limit in targets[0].limits}
    for name in amounts:
        if name not in own:
            raise ValidationError(f"{field}.{name}", name, "no limit of that name")
    for target in targets:
        for limit in target.limits:
            if amounts.get(limit.name, 0) > limit.burst:
                raise ValidationError(
                    f"{field}.{limit.name}",
                    amounts[limit.name],
                    f"exceeds the burst ({limit.burst}) of {target.entity_id!r}'s limit; "
                    "it could never be admitted",
                )


def _bucket_input(limit: Limit, state: BucketItem | None, delta: int) -> core.BucketInput:
    s = state.limits.get(limit.name) if state else None
    return (
        limit.burst_milli,
        limit.refill_amount_milli,
        limit.refill_period_ms,
        None if s is None else s.tokens_milli,
        None if s is None else s.last_refill_ms,
        delta,
    )


def _status(target: _Target, limit: Limit, outcome: core.BucketOutcome, delta: int) -> LimitStatus:
    retry_ms = outcome[2]
    return LimitStatus(
        entity_id=target.entity_id,
        resource=target.resource,
        limit_name=limit.name,
        limit=limit,
        available=outcome[0] // 1000,
        requested=delta // 1000,
        exceeded=bool(outcome[1]),
        retry_after_seconds=None if retry_ms is None else retry_ms / 1000,
    )


def _statuses(
    targets: list[_Target],
    seen: Mapping[int, Sequence[core.BucketOutcome]],
    deltas: list[list[int]],
) -> list[LimitStatus]:
    return [
        _status(targets[i], limit, out, delta)
        for i in sorted(seen)
        for limit, out, delta in zip(targets[i].limits, seen[i], deltas[i], strict=True)
    ]


def _writes(
    target: _Target, outcomes: Sequence[core.BucketOutcome], deltas: Sequence[int]
) -> list[LimitWrite]:
    writes: list[LimitWrite] = []
    for limit, out, delta in zip(target.limits, outcomes, deltas, strict=True):
        mode = out[3]
        if mode == 0:
            continue
        prior = target.state.limits.get(limit.name) if target.state else None
        encoded = limit.encode()
        writes.append(
            LimitWrite(
                limit_name=limit.name,
                absolute=mode == 2,
                value=out[4],
                new_last_refill_ms=out[6],
                expect_last_refill_ms=None if prior is None else prior.last_refill_ms,
                cond_lo=out[7],
                cond_hi=out[8],
                delta_milli=delta,
                definition=None if prior is not None and prior.definition == encoded else encoded,
            )
        )
    return writes
