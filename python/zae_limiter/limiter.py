"""`RateLimiter`: token buckets shared by every process through one DynamoDB table.

The public face: it checks arguments, resolves which limits and entities take part, applies the
failure mode, and leaves decisions and writes to the engine (`zae_limiter.engine`), creating the
table to `zae_limiter.provisioning` and storage to `zae_limiter.repository`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from . import core, provisioning, usage
from .arguments import check_consumable, check_consume, check_limits
from .cache import TTLCache
from .capacity import CapacityLedger
from .engine import Engine, bucket_input
from .exceptions import (
    EntityNotFoundError,
    InfrastructureNotFoundError,
    ValidationError,
)
from .failures import OUTAGES, public_errors, unavailable
from .lease import Lease, LeaseScope
from .models import (
    Entity,
    FailureMode,
    Limit,
    Reservations,
    StackOptions,
    UsageSnapshot,
    UsageSummary,
)
from .repository import Repository, RetryPolicy
from .reservations import Reserver
from .schema import DEFAULT_RESOURCE, default_region, short_name, table_name
from .storage import BucketItem, RepositoryUnavailable
from .validation import validate_entity_id, validate_resource
from .version import VERSION_CHECKS, Compatibility, VersionCheck, ensure_compatible

log = logging.getLogger("zae_limiter")

# A version record that could not be read (DynamoDB down, table missing) is retried at most this
# often; the operation meanwhile meets the outage, and its failure mode decides.
VERSION_RETRY_SECONDS = 30.0


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
        reservations: Reservations | None = None,
    ) -> None:
        if not isinstance(failure_mode, FailureMode):
            raise ValidationError("failure_mode", failure_mode, "must be a FailureMode")
        # "relaxed" and "skip" are dangerous (see zae_limiter.version.enforce): they let this
        # client run against an aggregator or minimum client version it was not built for.
        if version_check not in VERSION_CHECKS:
            raise ValidationError(
                "version_check", version_check, f"must be one of {', '.join(VERSION_CHECKS)}"
            )
        self.table_name = table_name(name)
        self.name = short_name(self.table_name)
        self.region = region
        self.endpoint_url = endpoint_url
        self.stack_options = stack_options
        self.failure_mode = failure_mode
        self.version_check: VersionCheck = version_check
        self.compatibility: Compatibility | None = None
        self.repository = repository or Repository(
            self.table_name, region, endpoint_url, retry=retry
        )
        if reservations is not None and not isinstance(reservations, Reservations):
            raise ValidationError("reservations", reservations, "must be a Reservations or None")
        self.reservations = reservations
        self._engine = Engine(self.repository, clock, bucket_cache_size)
        self._reserver = None if reservations is None else Reserver(self._engine, reservations)
        self._entities: TTLCache[str, Entity | None] = TTLCache(limits_cache_ttl, bucket_cache_size)
        self._stored_limits: TTLCache[str, dict[str, list[Limit]]] = TTLCache(
            limits_cache_ttl, bucket_cache_size
        )
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._provisioned = False
        self._version_retry_at = 0.0

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> RateLimiter:
        await self._ensure_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Give back reserved tokens (with `reservations`), then close the DynamoDB client."""
        if self._reserver is not None:
            await self._reserver.close()
        await self.repository.close()

    @property
    def ledger(self) -> CapacityLedger:
        """DynamoDB calls and capacity units this limiter has used (see `CapacityLedger`)."""
        return self.repository.ledger

    def reserved(self) -> dict[tuple[str, str], dict[str, int]]:
        """Tokens this limiter holds reserved, per `(entity_id, resource)` and limit (empty
        without `reservations`). They count as consumed in the shared bucket until given back."""
        return {} if self._reserver is None else self._reserver.held()

    def clear_cache(self) -> None:
        """Forget every cached bucket state, entity and stored limit: the next operations read
        them again."""
        self._engine.states.clear()
        self._entities.clear()
        self._stored_limits.clear()

    async def _ensure_ready(self) -> None:
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            options = self.stack_options
            if not self._provisioned and options is not None and options.create_table:
                try:
                    await provisioning.provision(
                        self.repository,
                        options,
                        name=self.name,
                        region=self.region,
                        endpoint_url=self.endpoint_url,
                    )
                except RepositoryUnavailable as exc:
                    raise unavailable(exc) from exc
            self._provisioned = True
            self._ready = await self._check_version()

    async def _check_version(self) -> bool:
        """Check the version record once per limiter; True when the check is settled.

        An unreadable record leaves the check pending, so FAIL_OPEN still admits while DynamoDB
        is unreachable.
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
                region=default_region(self.region),
                endpoint_url=self.endpoint_url,
                options=options,
            )
        except RepositoryUnavailable as exc:
            log.warning("version check postponed, DynamoDB unavailable: %s", exc)
        except InfrastructureNotFoundError:
            log.warning("version check postponed, table %s not found", self.table_name)
        else:
            return True
        self._version_retry_at = time.monotonic() + VERSION_RETRY_SECONDS
        return False

    async def delete_stack(self) -> None:
        """Delete the table (and, on AWS, the Pulumi stack)."""
        await provisioning.delete_stack(
            self.repository, name=self.name, region=self.region, endpoint_url=self.endpoint_url
        )
        self.clear_cache()

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
        with public_errors():
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
        with public_errors():
            entity = await self.repository.get_entity(entity_id)
        if entity is not None:
            self._entities.put(entity_id, entity)
        return entity

    async def delete_entity(self, entity_id: str) -> None:
        validate_entity_id(entity_id)
        await self._ensure_ready()
        with public_errors():
            await self.repository.delete_entity(entity_id)
        self._entities.drop(entity_id)
        self._stored_limits.drop(entity_id)
        self._engine.forget(entity_id)
        if self._reserver is not None:
            self._reserver.forget(entity_id)

    async def get_children(self, parent_id: str) -> list[Entity]:
        validate_entity_id(parent_id, "parent_id")
        await self._ensure_ready()
        with public_errors():
            return await self.repository.get_children(parent_id)

    # -- stored limits ----------------------------------------------------------------------

    async def set_limits(
        self, entity_id: str, limits: Sequence[Limit], resource: str = DEFAULT_RESOURCE
    ) -> None:
        validate_entity_id(entity_id)
        validate_resource(resource)
        checked = check_limits(limits)
        await self._ensure_ready()
        with public_errors():
            await self.repository.set_limits(entity_id, resource, checked)
        self._stored_limits.drop(entity_id)

    async def get_limits(self, entity_id: str, resource: str = DEFAULT_RESOURCE) -> list[Limit]:
        validate_entity_id(entity_id)
        validate_resource(resource)
        await self._ensure_ready()
        with public_errors():
            return await self.repository.get_limits(entity_id, resource)

    async def delete_limits(self, entity_id: str, resource: str = DEFAULT_RESOURCE) -> None:
        validate_entity_id(entity_id)
        validate_resource(resource)
        await self._ensure_ready()
        with public_errors():
            await self.repository.delete_limits(entity_id, resource)
        self._stored_limits.drop(entity_id)

    async def _resolve_limits(
        self, entity_id: str, resource: str, fallback: list[Limit]
    ) -> list[Limit]:
        """The resource's stored limits, then the entity's `_default_`, then `fallback`."""
        hit, stored = self._stored_limits.get(entity_id)
        if not hit or stored is None:
            stored = await self.repository.get_all_limits(entity_id)
            self._stored_limits.put(entity_id, stored)
        return list(stored.get(resource) or stored.get(DEFAULT_RESOURCE) or fallback)

    async def _parent_of(self, entity_id: str) -> str | None:
        hit, entity = self._entities.get(entity_id)
        if not hit or entity is None:
            entity = await self.repository.get_entity(entity_id)
            if entity is None:
                raise EntityNotFoundError(entity_id)
            self._entities.put(entity_id, entity)
        return entity.parent_id

    async def _limit_sets(
        self,
        entity_id: str,
        resource: str,
        fallback: list[Limit],
        cascade: bool,
        use_stored_limits: bool,
    ) -> list[tuple[str, list[Limit]]]:
        """`(entity_id, limits)` for the entity and, with `cascade`, its parent."""
        ids = [entity_id]
        if cascade:
            parent = await self._parent_of(entity_id)
            if parent is not None:
                ids.append(parent)
        sets: list[tuple[str, list[Limit]]] = []
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
            sets.append((eid, limits))
        return sets

    # -- acquire ----------------------------------------------------------------------------

    def acquire(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        consume: Mapping[str, int],
        cascade: bool = False,
        use_stored_limits: bool = False,
        failure_mode: FailureMode | None = None,
    ) -> LeaseScope:
        """`async with limiter.acquire(...) as lease:` takes `consume` from every limit (and the
        parent's, with `cascade`) or raises `RateLimitExceeded`; the consumption stands on a
        normal exit and is given back if the block raises. Arguments are checked on entry."""
        return LeaseScope(
            lambda: self._admit(
                entity_id, resource, limits, consume, cascade, use_stored_limits, failure_mode
            )
        )

    async def _admit(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        consume: Mapping[str, int],
        cascade: bool,
        use_stored_limits: bool,
        failure_mode: FailureMode | None,
    ) -> Lease:
        mode = self._failure_mode(failure_mode)
        validate_entity_id(entity_id)
        validate_resource(resource)
        fallback = check_limits(limits or [], allow_empty=use_stored_limits)
        amounts = check_consume(consume)
        if not use_stored_limits:  # the limits are known: reject before any I/O
            check_consumable([(entity_id, fallback)], amounts)
        if not self._ready:
            await self._ensure_ready()
        try:
            sets = await self._limit_sets(
                entity_id, resource, fallback, cascade, use_stored_limits
            )
            if use_stored_limits:  # otherwise every set is `fallback`, checked above
                check_consumable(sets, amounts)
            reserver = self._reserver
            if reserver is not None:
                targets = await reserver.acquire(resource, sets, amounts)
            else:
                targets = await self._engine.targets(resource, sets)
                await self._engine.commit(targets, amounts)
        except OUTAGES as exc:
            if mode is not FailureMode.FAIL_OPEN:
                raise unavailable(exc) from exc
            log.warning("DynamoDB unavailable, admitting (FAIL_OPEN): %s", exc)
            return Lease(self._engine, [], amounts, fail_open=True)
        return Lease(reserver or self._engine, targets, amounts)

    def _failure_mode(self, failure_mode: FailureMode | None) -> FailureMode:
        if failure_mode is None:
            return self.failure_mode
        if not isinstance(failure_mode, FailureMode):
            raise ValidationError("failure_mode", failure_mode, "must be a FailureMode")
        return failure_mode

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
        fallback = check_limits(limits or [], allow_empty=use_stored_limits)
        chosen, state = await self._read(entity_id, resource, fallback, use_stored_limits)
        now = self._engine.clock()
        result: dict[str, int] = {}
        for limit in chosen:
            burst, amount, period, tokens, last_refill, _ = bucket_input(limit, state, 0)
            result[limit.name] = core.available(burst, amount, period, tokens, last_refill, now)
            result[limit.name] //= 1000
        return result

    async def _read(
        self, entity_id: str, resource: str, fallback: list[Limit], use_stored_limits: bool
    ) -> tuple[list[Limit], BucketItem | None]:
        """The limits that apply and the bucket item, freshly read (it refreshes the cache)."""
        await self._ensure_ready()
        with public_errors():
            chosen = (
                await self._resolve_limits(entity_id, resource, fallback)
                if use_stored_limits
                else fallback
            )
            state = await self._engine.read(entity_id, resource)
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
        fallback = check_limits(limits or [], allow_empty=use_stored_limits)
        amounts = check_consume(needed, field="needed")
        if not use_stored_limits:  # the limits are known: reject before any I/O
            check_consumable([(entity_id, fallback)], amounts, field="needed")
        chosen, state = await self._read(entity_id, resource, fallback, use_stored_limits)
        check_consumable([(entity_id, chosen)], amounts, field="needed")
        inputs = [bucket_input(limit, state, amounts.get(limit.name, 0) * 1000) for limit in chosen]
        ms = core.time_until_available(inputs, self._engine.clock())
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
            usage.check_range(window, start, end)  # before any I/O
        except ValueError as exc:
            raise ValidationError("window/start/end", (window, start, end), str(exc)) from exc
        await self._ensure_ready()
        with public_errors():
            return await self.repository.get_usage_snapshots(
                entity_id, resource, window, start, end
            )

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
