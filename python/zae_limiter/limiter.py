"""`RateLimiter`: token buckets shared by every process through one DynamoDB table.

The public face: it checks arguments, bounds each call by its deadline and applies the failure
mode. Which limits apply is decided by `zae_limiter.resolver`, decisions and writes by the
engine (`zae_limiter.engine`); the management calls on entities, stored limits and the audit
trail are `zae_limiter.entities`, creating the table is `zae_limiter.ops.provisioning`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from . import usage
from .arguments import check_also, check_consumable, check_consume, check_limits, oversized
from .core import units
from .deadline import DEFAULT, Bounded, DeadlineArg, check_deadline, resolve_deadline
from .engine.engine import Engine, Target, available_milli, request_too_large, wait_ms
from .engine.reservations import Reserver
from .engine.slots import Hold, SlotKeeper, cap_names, free, has_caps, wanted
from .engine.slots import wait_ms as slot_wait_ms
from .engine.switches import BYPASS, DISABLED, Flags, SwitchBoard, SwitchPanel, no_switches
from .entities import DEFAULT_CACHE_TTL, Entities, check_cache_ttl, resource_level
from .exceptions import (
    ConfigurationError,
    InfrastructureNotFoundError,
    RateLimiterUnavailable,
    RateLimitExceeded,
    RequestTooLarge,
    ValidationError,
)
from .failures import STORAGE_FAILURES, public_error, public_errors
from .lease import Lease, LeaseScope
from .metrics import ADMITTED, DENIED, FAIL_OPEN, NO_METRICS, UNAVAILABLE, Metrics, SoftExcesses
from .models import (
    AuditEvent,
    Entity,
    EntityCapacity,
    FailureMode,
    Limit,
    Reservations,
    ResourceCapacity,
    StackOptions,
    UsageSnapshot,
    UsageSummary,
)
from .resolver import MISSING_ENTITY_TTL as MISSING_ENTITY_TTL  # its documented place too
from .resolver import LimitResolver, LimitSets, ResolvedLimits
from .schema import DEFAULT_RESOURCE, default_region, short_name, table_name
from .storage.capacity import CapacityLedger
from .storage.dynamodb.client import RetryPolicy
from .storage.dynamodb.endpoint import configured_endpoint
from .storage.dynamodb.repository import Repository
from .storage.protocol import (
    BucketItem,
    RepositoryUnavailable,
    SlotStorage,
    Storage,
    Switch,
    SwitchStorage,
)
from .validation import validate_entity_id, validate_name, validate_resource
from .version import (
    VERSION_CHECKS,
    Compatibility,
    VersionCheck,
    ensure_compatible,
    legacy_version_check,
)

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

    Attributes:
        name: the limiter's name (``my-app``), the table's without its ``ZAEL-`` prefix.
        table_name: the table (and stack) name, ``ZAEL-<name>``.
        region: the AWS region given (None: the client library's default).
        endpoint_url: the DynamoDB endpoint given (a local one, say); None for AWS's.
        stack_options: how to create or update the infrastructure when it is missing or out of
            date; None: never create it.
        failure_mode: what an acquire does when DynamoDB cannot be reached.
        auto_update: whether the version check may update the infrastructure (None: as
            ``stack_options.auto_update`` says).
        version_check: ``"strict"``, ``"relaxed"`` (only the schema must match) or ``"skip"``.
        compatibility: the outcome of the version check once it ran; None before.
        repository: the storage: the DynamoDB `Repository`, or the one passed in
            (`MemoryStorage`, say).
        reservations: the reservation policy; None: every acquire goes to the shared bucket.
    """

    def __init__(
        self,
        name: str = "limiter",
        region: str | None = None,
        endpoint_url: str | None = None,
        stack_options: StackOptions | None = None,
        failure_mode: FailureMode = FailureMode.FAIL_CLOSED,
        auto_update: bool | None = None,
        strict_version: bool | None = None,
        skip_version_check: bool | None = None,
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], int] | None = None,
        config_cache_ttl: float = DEFAULT_CACHE_TTL,
        limits_cache_ttl: float | None = None,
        bucket_cache_size: int = 10_000,
        repository: Storage | None = None,
        version_check: VersionCheck = "strict",
        reservations: Reservations | None = None,
        deadline: DeadlineArg = DEFAULT,
        metrics: Metrics | None = None,
        shadow: bool = False,
    ) -> None:
        if not isinstance(shadow, bool):
            raise ValidationError("shadow", shadow, "must be a bool")
        if not isinstance(failure_mode, FailureMode):
            raise ValidationError("failure_mode", failure_mode, "must be a FailureMode")
        # "relaxed" and "skip" are dangerous (see zae_limiter.version.enforce): they let this
        # client run against an aggregator or minimum client version it was not built for.
        if version_check not in VERSION_CHECKS:
            raise ValidationError(
                "version_check", version_check, f"must be one of {', '.join(VERSION_CHECKS)}"
            )
        version_check = legacy_version_check(version_check, strict_version, skip_version_check)
        if auto_update is not None and not isinstance(auto_update, bool):
            raise ValidationError("auto_update", auto_update, "must be a bool or None")
        self.auto_update = auto_update
        self.table_name = table_name(name)
        self.name = short_name(self.table_name)
        self.region = region
        # As botocore does: the argument, else `AWS_ENDPOINT_URL_DYNAMODB` / `AWS_ENDPOINT_URL`.
        # Provisioning and the version check need to know a local endpoint the environment names.
        endpoint_url = configured_endpoint(endpoint_url)
        self.endpoint_url = endpoint_url
        self.stack_options = stack_options
        self.failure_mode = failure_mode
        self.version_check: VersionCheck = version_check
        self.compatibility: Compatibility | None = None
        self.repository = repository or Repository(
            self.table_name, region, endpoint_url, retry=retry
        )
        # The endpoint a given repository talks to decides, not the argument it makes unused.
        self.deadline = resolve_deadline(deadline, self.repository.endpoint_url)
        """Seconds an `acquire`, a lease operation or `available` may wait on DynamoDB,
        retries and the version check included (None: only the retry policy bounds them). By
        default 1 s, or 30 s for an endpoint on loopback (`zae_limiter.deadline`)."""
        if reservations is not None and not isinstance(reservations, Reservations):
            raise ValidationError("reservations", reservations, "must be a Reservations or None")
        self.reservations = reservations
        if metrics is not None and not isinstance(metrics, Metrics):
            raise ValidationError("metrics", metrics, "must be a Metrics or None")
        self.metrics = NO_METRICS if metrics is None else metrics
        """Where acquires are reported; it also observes the repository's ledger (a repository
        passed in included), so it sees every DynamoDB call."""
        if metrics is not None:
            self.repository.ledger.attach(metrics)
        self.shadow = shadow
        """Every limit is treated as soft: nothing is denied, everything is debited, and what
        would have been denied is counted (`zae_limiter.limit.shadow_denials`) and logged."""
        self._engine = Engine(self.repository, clock, bucket_cache_size, shadow=shadow)
        self._engine.on_soft_excess = SoftExcesses(self.metrics, self._engine.clock)
        # Soft limits are never served from reserved blocks, so in shadow mode none are.
        self._reserver = (
            None if reservations is None or shadow else Reserver(self._engine, reservations)
        )
        # Concurrency caps, for a storage that keeps them (both of the library's do).
        self._slots = (
            SlotKeeper(self.repository, self._engine.clock, self._engine.detach, shadow)
            if isinstance(self.repository, SlotStorage)
            else None
        )
        # `limits_cache_ttl`: the earlier name of `config_cache_ttl`, still accepted.
        self.config_cache_ttl = check_cache_ttl(config_cache_ttl, limits_cache_ttl)
        """Seconds a resolution's stored limits, entities and resource and system defaults are
        cached (0: until `clear_cache`); this limiter's own changes are seen at once."""
        self._resolver = LimitResolver(
            self.repository, self.config_cache_ttl, bucket_cache_size
        )
        self._entities = Entities(
            self.repository, self._resolver, self._ensure_ready, self._forget_buckets
        )
        # Kill switches (`engine.switches`), for a storage that keeps them (both of the
        # library's do); cached for the stored limits' TTL: one TTL for all stored config.
        self._switches = (
            SwitchBoard(self.repository, self.config_cache_ttl)
            if isinstance(self.repository, SwitchStorage)
            else None
        )
        self._panel = (
            None
            if self._switches is None
            else SwitchPanel(self._switches, self.repository, self._ensure_ready)
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
        await self._engine.drain()
        await self.repository.close()

    @property
    def _repository(self) -> Storage:
        # 0.x's name for `repository`: code and test fixtures written for 0.2 reach for it.
        return self.repository

    @property
    def ledger(self) -> CapacityLedger:
        """DynamoDB calls and capacity units this limiter has used (see `CapacityLedger`)."""
        return self.repository.ledger

    @property
    def reserver(self) -> Reserver | None:
        """This process's reserved blocks (`zae_limiter.engine.Reserver`; None without
        `reservations`): its holdings and counters, for inspection."""
        return self._reserver

    def reserved(self) -> dict[tuple[str, str], dict[str, int]]:
        """Tokens this limiter holds reserved, per `(entity_id, resource)` and limit (empty
        without `reservations`). They count as consumed in the shared bucket until given back."""
        return {} if self._reserver is None else self._reserver.held()

    def clear_cache(self) -> None:
        """Forget every cached bucket state, entity and stored limit: the next operations read
        them again."""
        self._engine.states.clear()
        self._resolver.clear()
        if self._switches is not None:
            self._switches.clear()

    def _forget_buckets(self, entity_id: str) -> None:
        self._engine.forget(entity_id)
        if self._reserver is not None:
            self._reserver.forget(entity_id)

    @public_errors
    async def _ensure_ready(self) -> None:
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            options = self.stack_options
            if not self._provisioned and options is not None and options.create_table:
                from .ops import provisioning  # ops' work, done only on request

                await provisioning.provision(
                    self.repository,
                    options,
                    name=self.name,
                    region=self.region,
                    endpoint_url=self.endpoint_url,
                )
            self._provisioned = True
            self._ready = await self._check_version()
            if self._ready and self._switches is not None:
                # Read with the version check, so that an acquire pays for it only once the
                # TTL has passed (an outage here is no error: the first acquire reads them).
                await self._switches.prime()

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
                auto_update=(
                    self.auto_update
                    if self.auto_update is not None
                    else options is not None and options.auto_update
                ),
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

    async def create_stack(
        self, stack_options: StackOptions | None = None
    ) -> dict[str, Any]:
        """Create the infrastructure unless it exists (zae-limiter 0.2.0's `create_stack`).

        On AWS the Pulumi stack (needs the Pulumi CLI), on a local endpoint the table. Options:
        `stack_options`, else this limiter's `stack_options`, else the defaults. Returns
        `{"stack_id", "stack_name", "status", ...}` ("CREATE_COMPLETE", or the status of the
        stack that already existed, with a "message"; see `zae_limiter.provisioning`). Raises
        StackCreationError (StackAlreadyExistsError when another process created it first).
        """
        from .ops import provisioning  # ops' work, done only on request

        return await provisioning.create_stack(
            self.repository,
            stack_options if stack_options is not None else self.stack_options,
            name=self.name,
            region=self.region,
            endpoint_url=self.endpoint_url,
        )

    async def delete_stack(self) -> None:
        """Delete the table (and, on AWS, the Pulumi stack)."""
        from .ops import provisioning  # ops' work, done only on request

        await provisioning.delete_stack(
            self.repository, name=self.name, region=self.region, endpoint_url=self.endpoint_url
        )
        self.clear_cache()

    # -- entities, stored limits, audit trail (`zae_limiter.entities`) -----------------------

    async def create_entity(
        self,
        entity_id: str,
        name: str | None = None,
        parent_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        principal: str | None = None,
    ) -> Entity:
        """Create the entity (its parent must exist) and record `ENTITY_CREATED` (by
        `principal`, if given) in its audit trail."""
        return await self._entities.create(entity_id, name, parent_id, metadata, principal)

    async def get_entity(self, entity_id: str) -> Entity | None:
        return await self._entities.get(entity_id)

    async def delete_entity(self, entity_id: str, *, principal: str | None = None) -> None:
        """Delete the entity and its buckets, stored limits and usage snapshots, and record
        `ENTITY_DELETED`: its audit trail is kept (and expires on its own, 90 days per event)."""
        await self._entities.delete(entity_id, principal)

    async def get_children(self, parent_id: str) -> list[Entity]:
        return await self._entities.children(parent_id)

    async def set_limits(
        self,
        entity_id: str,
        limits: Sequence[Limit],
        resource: str = DEFAULT_RESOURCE,
        *,
        principal: str | None = None,
    ) -> None:
        """Replace the stored limits of (entity, resource); records `LIMITS_SET`."""
        await self._entities.set_limits(entity_id, limits, resource, principal)

    async def get_limits(self, entity_id: str, resource: str = DEFAULT_RESOURCE) -> list[Limit]:
        return await self._entities.get_limits(entity_id, resource)

    async def delete_limits(
        self, entity_id: str, resource: str = DEFAULT_RESOURCE, *, principal: str | None = None
    ) -> None:
        """Delete the stored limits of (entity, resource); records `LIMITS_DELETED`."""
        await self._entities.delete_limits(entity_id, resource, principal)

    async def get_audit_events(
        self,
        entity_id: str,
        limit: int = 100,
        start_event_id: str | None = None,
        *,
        oldest_first: bool = False,
    ) -> list[AuditEvent]:
        """Up to `limit` of the entity's audit events, newest first (`oldest_first=True`: oldest
        first). Next page: `start_event_id=` the last event id of this one. The trail of a
        deleted entity stays readable until its events expire (90 days each)."""
        return await self._entities.audit_events(entity_id, limit, start_event_id, oldest_first)

    # -- kill switches (`zae_limiter.engine.switches`, docs/limits.md "Kill switch") ---------

    async def disable_resource(self, resource: str, *, principal: str | None = None) -> None:
        """Every acquire of `resource` raises `ResourceDisabled` (nothing consumed, whatever the
        failure mode) until `enable_resource`; records `RESOURCE_DISABLED` in the trail
        `$RESOURCE:<resource>`. At once here, on every other limiter within its
        `config_cache_ttl`."""
        await self._switch("resource", resource, DISABLED, principal)

    async def bypass_resource(self, resource: str, *, principal: str | None = None) -> None:
        """Every acquire of `resource` is admitted with nothing consumed and no I/O (a no-op
        lease, `lease.bypassed`) until `enable_resource`; records `RESOURCE_BYPASSED`."""
        await self._switch("resource", resource, BYPASS, principal)

    async def enable_resource(self, resource: str, *, principal: str | None = None) -> None:
        """Clear `resource`'s switch: its acquires are limited again; records
        `RESOURCE_ENABLED` (also when it was clear)."""
        await self._switch("resource", resource, None, principal)

    async def disable_entity(self, entity_id: str, *, principal: str | None = None) -> None:
        """Every acquire of the entity, and with cascade of its children, raises
        `ResourceDisabled`, until `enable_entity`; records `ENTITY_DISABLED` in its trail. The
        entity need not exist."""
        await self._switch("entity", entity_id, DISABLED, principal)

    async def bypass_entity(self, entity_id: str, *, principal: str | None = None) -> None:
        """Every acquire of the entity, and with cascade of its children, is admitted with
        nothing consumed, until `enable_entity`; records `ENTITY_BYPASSED`."""
        await self._switch("entity", entity_id, BYPASS, principal)

    async def enable_entity(self, entity_id: str, *, principal: str | None = None) -> None:
        """Clear the entity's switch; records `ENTITY_ENABLED`."""
        await self._switch("entity", entity_id, None, principal)

    @public_errors
    async def get_resource_state(self, resource: str) -> str:
        """"enabled", "disabled" or "bypass", as stored now (one read, not the cache)."""
        return await self._switch_panel().state("resource", resource)

    @public_errors
    async def get_entity_state(self, entity_id: str) -> str:
        """"enabled", "disabled" or "bypass", as stored now (one read, not the cache)."""
        return await self._switch_panel().state("entity", entity_id)

    @public_errors
    async def get_switches(self) -> list[Switch]:
        """Every switch that is set (resources and entities), as stored now."""
        return await self._switch_panel().all()

    @public_errors
    async def _switch(self, kind: str, name: str, state: str | None, principal: str | None) -> None:
        await self._switch_panel().set(kind, name, state, principal)

    def _switch_panel(self) -> SwitchPanel:
        if self._panel is None:
            raise no_switches(self.repository)
        return self._panel

    def _bypassed(
        self, flags: Flags, resource: str, entity_id: str, ids: Sequence[str], complete: bool
    ) -> Lease | None:
        """The no-op lease of a bypassed acquire, None when no switch applies; raises
        `ResourceDisabled` for a disabled one. No I/O."""
        assert self._switches is not None
        if flags.bypassed(resource, entity_id, ids, complete, self._switches.ttl):
            return Lease(self._engine, [], {}, bypassed=True)
        return None

    # -- resource and system default limits (docs/limits.md "Where limits come from") -------

    async def set_resource_defaults(
        self, resource: str, limits: Sequence[Limit], principal: str | None = None
    ) -> None:
        """Replace the default limits of `resource`: what a `use_stored_limits` resolution
        takes for an entity with none of its own for it (nor a `_default_`). Recorded in the
        audit trail `$RESOURCE:<resource>`."""
        await self._entities.set_defaults(resource_level(resource), limits, principal)

    async def get_resource_defaults(self, resource: str) -> list[Limit]:
        return await self._entities.get_defaults(resource_level(resource))

    async def delete_resource_defaults(
        self, resource: str, principal: str | None = None
    ) -> None:
        """Delete the default limits of `resource` (recorded in `$RESOURCE:<resource>`)."""
        await self._entities.delete_defaults(resource_level(resource), principal)

    async def list_resource_defaults(self) -> dict[str, list[Limit]]:
        """Every resource's default limits, by resource (in name order)."""
        return await self._entities.resource_defaults()

    async def set_system_defaults(
        self, limits: Sequence[Limit], principal: str | None = None
    ) -> None:
        """Replace the system default limits: taken after the resource's defaults, before the
        caller's `limits`. Recorded in the audit trail `$SYSTEM`."""
        await self._entities.set_defaults(DEFAULT_RESOURCE, limits, principal)

    async def get_system_defaults(self) -> list[Limit]:
        return await self._entities.get_defaults(DEFAULT_RESOURCE)

    async def delete_system_defaults(self, principal: str | None = None) -> None:
        """Delete the system default limits (recorded in `$SYSTEM`)."""
        await self._entities.delete_defaults(DEFAULT_RESOURCE, principal)

    async def get_effective_limits(self, entity_id: str, resource: str) -> list[ResolvedLimits]:
        """What `use_stored_limits=True` resolves for (entity, resource), read now: the limits
        and their level (`"entity"`, `"entity default"`, `"resource"`, `"system"`; None: the
        caller's would apply) for the entity and, if it has a parent, the parent (cascade)."""
        return await self._entities.effective(entity_id, resource)

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
        *,
        deadline: float | None = None,
        also: Mapping[str, Mapping[str, int]] | None = None,
    ) -> LeaseScope:
        """`async with limiter.acquire(...) as lease:` takes `consume` from every limit (and the
        parent's, with `cascade`) or raises `RateLimitExceeded`; the consumption stands on a
        normal exit and is given back if the block raises. Arguments are checked on entry.

        `deadline` (seconds; default: the limiter's) bounds the wait on DynamoDB, retries
        included: past it, FAIL_OPEN admits and FAIL_CLOSED raises `RateLimiterUnavailable`.
        The lease's own operations use the same deadline.

        `also={other_resource: consume_there, ...}` takes from other resources' buckets too
        (the parents' with `cascade`), all or nothing with `resource`'s, under one lease. Their
        limits are found as `resource`'s: `limits`, or with `use_stored_limits` each resource's
        own stored limits (then the entity's `_default_`, then `limits`). docs/limits.md,
        "Several resources in one acquire"."""
        if also is not None and (not isinstance(also, Mapping) or also):
            return LeaseScope(
                lambda: self._admit(
                    entity_id,
                    resource,
                    lambda: self._decide_also(
                        entity_id,
                        resource,
                        limits,
                        consume,
                        also,
                        cascade,
                        use_stored_limits,
                        failure_mode,
                        deadline,
                    ),
                )
            )
        return LeaseScope(
            lambda: self._admit(
                entity_id,
                resource,
                lambda: self._decide(
                    entity_id,
                    resource,
                    limits,
                    consume,
                    cascade,
                    use_stored_limits,
                    failure_mode,
                    deadline,
                ),
            )
        )

    async def _admit(
        self, entity_id: str, resource: str, decide: Callable[[], Awaitable[Lease]]
    ) -> Lease:
        """`decide()`, its outcome and latency reported to `metrics`."""
        metrics = self.metrics
        if metrics is NO_METRICS:
            return await decide()
        started = time.perf_counter()
        try:
            lease = await decide()
        except RateLimitExceeded as exc:  # RequestTooLarge too: a denial
            names = tuple(v.limit_name for v in exc.violations)
            metrics.acquired(resource, entity_id, DENIED, time.perf_counter() - started, names)
            raise
        except RateLimiterUnavailable:
            metrics.acquired(resource, entity_id, UNAVAILABLE, time.perf_counter() - started)
            raise
        result = FAIL_OPEN if lease.fail_open else ADMITTED
        metrics.acquired(resource, entity_id, result, time.perf_counter() - started)
        return lease

    async def _decide(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        consume: Mapping[str, int],
        cascade: bool,
        use_stored_limits: bool,
        failure_mode: FailureMode | None,
        deadline: float | None,
    ) -> Lease:
        mode = self._failure_mode(failure_mode)
        seconds = self._deadline_of(deadline)
        validate_entity_id(entity_id)
        validate_resource(resource)
        fallback = check_limits(limits or [], allow_empty=use_stored_limits)
        amounts = check_consume(consume)
        board = self._switches
        flags = None if board is None or not self._ready else board.cached()
        # The switches as last read, no I/O (without cascade the verdict is final).
        if flags is not None and (
            bypass := self._bypassed(flags, resource, entity_id, [entity_id], not cascade)
        ):
            return bypass
        if not use_stored_limits:  # the limits are known: reject before any I/O
            self._check_amounts(resource, [(entity_id, fallback)], amounts)
        reserver = self._reserver
        resolver = self._resolver
        if reserver is not None and self._ready and (flags is not None or board is None):
            # Served from the blocks with no I/O: nothing to bound, so no timer is armed.
            sets = resolver.cached(entity_id, resource, fallback, cascade, use_stored_limits)
            if cascade and sets is not None and flags is not None:  # the parent's switch
                ids = [eid for eid, _ in sets]
                if (bypass := self._bypassed(flags, resource, entity_id, ids, True)):
                    return bypass
            if sets is not None and not has_caps(sets):  # a cap's slots are always a write
                if use_stored_limits:
                    self._check_amounts(resource, sets, amounts)
                targets = reserver.take_local(resource, sets, amounts)
                if targets is not None:
                    return Lease(reserver, targets, amounts, deadline=seconds)
        try:
            if not self._ready:
                # The client is built before the deadline starts (see `Repository.open`).
                await self.repository.open()
            async with Bounded(seconds):
                if not self._ready:
                    await self._ensure_ready()
                if board is not None and flags is None:  # read once per TTL at most
                    flags = await board.current()
                    bypass = self._bypassed(flags, resource, entity_id, [entity_id], not cascade)
                    if bypass:
                        return bypass
                sets = await resolver.limit_sets(
                    entity_id, resource, fallback, cascade, use_stored_limits
                )
                if cascade and flags is not None:  # the parent's switch, now known
                    ids = [eid for eid, _ in sets]
                    if (bypass := self._bypassed(flags, resource, entity_id, ids, True)):
                        return bypass
                if use_stored_limits:  # otherwise every set is `fallback`, checked above
                    self._check_amounts(resource, sets, amounts)
                hold = await self._take_slots(resource, sets, amounts) if has_caps(sets) else None
                try:
                    if reserver is not None:
                        targets = await reserver.acquire(resource, sets, amounts)
                    else:
                        targets = await self._engine.targets(resource, sets)
                        await self._engine.commit(targets, amounts)
                except BaseException as exc:
                    if hold is not None:  # all or nothing: the buckets refused
                        await self._give_back_slots(hold, exc)
                    raise
        except STORAGE_FAILURES as exc:  # the deadline passing too
            return self._outage(exc, mode)
        if hold is not None and self._slots is not None:
            # Reported once the acquire is admitted, buckets included: a soft cap's excess in
            # an acquire a hard limit denied was given back, as a soft bucket's is not written.
            self._report_slot_excesses(hold, [(resource, sets)])
            names = cap_names(sets)
            held = {name: n for name, n in amounts.items() if name not in names}
            return Lease(
                reserver or self._engine,
                targets,
                held,
                deadline=seconds,
                slots=(self._slots, hold),
            )
        return Lease(reserver or self._engine, targets, amounts, deadline=seconds)

    async def _decide_also(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        consume: Mapping[str, int],
        also: Mapping[str, Mapping[str, int]],
        cascade: bool,
        use_stored_limits: bool,
        failure_mode: FailureMode | None,
        deadline: float | None,
    ) -> Lease:
        """`_decide` over several resources: every resource's limit sets resolved as
        `resource`'s, every cap's slots taken in one round, then one decision over every
        bucket item of every resource and one round of writes (`Engine.commit_each`), all or
        nothing. Never served from reserved blocks: a block holds one item's tokens, and
        spending several items' blocks at once is not what they are sized for."""
        mode = self._failure_mode(failure_mode)
        seconds = self._deadline_of(deadline)
        validate_entity_id(entity_id)
        validate_resource(resource)
        fallback = check_limits(limits or [], allow_empty=use_stored_limits)
        asks = {resource: check_consume(consume), **check_also(also, resource)}
        fields = {r: "consume" if r == resource else f"also.{r}" for r in asks}
        if not use_stored_limits:  # the limits are known: reject before any I/O
            for r, amounts in asks.items():
                self._check_amounts(r, [(entity_id, fallback)], amounts, fields[r])
        groups: list[tuple[str, LimitSets, dict[str, int]]] = []
        try:
            if not self._ready:
                await self.repository.open()
            async with Bounded(seconds):
                if not self._ready:
                    await self._ensure_ready()
                for r, amounts in asks.items():
                    # One after the other: the first resolution caches the entity and its
                    # stored limits (every resource's), so the others read nothing.
                    sets = await self._resolver.limit_sets(
                        entity_id, r, fallback, cascade, use_stored_limits
                    )
                    if use_stored_limits:
                        self._check_amounts(r, sets, amounts, fields[r])
                    groups.append((r, sets, amounts))
                if self._switches is not None:
                    # Every resource's switch (a disabled one refuses the whole acquire), the
                    # entity's and the parent's; bypassed only when all of it is, else every
                    # resource is limited (docs/limits.md "Kill switch").
                    flags = await self._switches.current()
                    ids = [eid for eid, _ in groups[0][1]]
                    ttl = self._switches.ttl
                    verdicts = [flags.bypassed(r, entity_id, ids, True, ttl) for r in asks]
                    if all(verdicts):
                        none: dict[str, dict[str, int]] = {r: {} for r in asks if r != resource}
                        return Lease(self._engine, [], {}, bypassed=True, also=none)
                hold = None
                if any(has_caps(sets) for _, sets, _ in groups):
                    if self._slots is None:
                        raise ValidationError(
                            "limits",
                            type(self.repository).__name__,
                            "this storage keeps no concurrency caps",
                        )
                    hold = await self._slots.take_each(groups)
                try:
                    targets = await self._engine.targets_each([(r, sets) for r, sets, _ in groups])
                    await self._engine.commit_each(targets, [asks[t.resource] for t in targets])
                except BaseException as exc:
                    if hold is not None:  # all or nothing: the buckets refused
                        await self._give_back_slots(hold, exc)
                    raise
        except STORAGE_FAILURES as exc:  # the deadline passing too
            return self._outage(exc, mode, {r: {} for r in asks if r != resource})
        slots = None
        held = asks
        if hold is not None and self._slots is not None:
            self._report_slot_excesses(hold, [(r, sets) for r, sets, _ in groups])
            slots = (self._slots, hold)
            # A cap's slots are the hold's, not tokens in the books.
            held = {
                r: {n: v for n, v in asks[r].items() if n not in cap_names(sets)}
                for r, sets, _ in groups
            }
        others = {r: held[r] for r in asks if r != resource}
        return Lease(
            self._engine, targets, held[resource], deadline=seconds, slots=slots, also=others
        )

    def _outage(
        self,
        exc: Exception,
        mode: FailureMode,
        also: Mapping[str, Mapping[str, int]] | None = None,
    ) -> Lease:
        """An acquire that met an outage (or its deadline): FAIL_OPEN admits with a lease that
        holds nothing (`also`: the other resources', empty); else, and for a misconfiguration
        in any mode, the public error is raised."""
        error = public_error(exc)
        if isinstance(error, ConfigurationError) or mode is not FailureMode.FAIL_OPEN:
            raise error from exc
        log.warning("DynamoDB unavailable, admitting (FAIL_OPEN): %s", exc)
        return Lease(self._engine, [], {}, fail_open=True, also=also)

    async def _take_slots(
        self, resource: str, sets: LimitSets, amounts: Mapping[str, int]
    ) -> Hold:
        """The slots of the concurrency caps among `sets` (`engine.slots`), before any bucket:
        a full cap denies with no bucket write."""
        if self._slots is None:
            raise ValidationError(
                "limits", type(self.repository).__name__, "this storage keeps no concurrency caps"
            )
        return await self._slots.take(resource, sets, amounts)

    def _report_slot_excesses(self, hold: Hold, groups: Sequence[tuple[str, LimitSets]]) -> None:
        observer = self._engine.on_soft_excess
        if observer is None or not any(p.past for p in hold.parts):
            return
        caps = {
            (eid, resource): {c.name: c for c in limits if c.is_concurrency}
            for resource, sets in groups
            for eid, limits in sets
        }
        for entity_id, resource, soft, shadow in hold.excesses(caps):
            try:
                observer(entity_id, resource, soft, shadow)
            except Exception:  # the slots are held: a failed report must not undo the acquire
                log.exception("reporting a soft concurrency cap excess failed")

    async def _give_back_slots(self, hold: Hold, exc: BaseException) -> None:
        """The slots of an acquire whose buckets refused, given back by a detached write (a
        deadline cancelling the acquire cannot cancel it; it is waited for otherwise)."""
        assert self._slots is not None
        back = self._engine.detach(self._slots.release(hold), "give-back of slots")
        if not isinstance(exc, asyncio.CancelledError):
            try:
                await asyncio.shield(back)
            except Exception as failure:  # the buckets' error is the one to raise
                log.warning("give-back of slots failed; they expire at lease_ttl: %s", failure)

    def _check_amounts(
        self, resource: str, sets: LimitSets, amounts: Mapping[str, int], field: str = "consume"
    ) -> None:
        """No I/O: every amount names one of the entity's limits (else `ValidationError`) and
        fits every limit's burst (else `RequestTooLarge`); errors name `field.<limit>`."""
        check_consumable(sets, amounts, field, burst=False)
        if not self.shadow and (too := oversized(sets, amounts, field)) is not None:
            raise self._too_large(resource, sets, amounts, too[2])

    def _deadline_of(self, deadline: float | None) -> float | None:
        return self.deadline if deadline is None else check_deadline(deadline)

    def _too_large(
        self,
        resource: str,
        sets: LimitSets,
        amounts: Mapping[str, int],
        field: str,
    ) -> RequestTooLarge:
        """The error for a request no bucket can ever hold, raised in every failure mode and
        with no I/O (a flood of them costs nothing): what the buckets hold is as this client
        last saw them, a full bucket if it never did."""
        targets = [Target(eid, resource, limits) for eid, limits in sets]
        for target in targets:
            _, target.state = self._engine.states.get((target.entity_id, resource))
        return request_too_large(targets, amounts, self._engine.clock(), field)

    def _failure_mode(self, failure_mode: FailureMode | None) -> FailureMode:
        if failure_mode is None:
            return self.failure_mode
        if not isinstance(failure_mode, FailureMode):
            raise ValidationError("failure_mode", failure_mode, "must be a FailureMode")
        return failure_mode

    # -- reads ------------------------------------------------------------------------------

    @public_errors
    async def available(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        use_stored_limits: bool = False,
        *,
        deadline: float | None = None,
    ) -> dict[str, int]:
        """Tokens available now per limit (negative after over-consumption). One read, within
        `deadline` (default: the limiter's), else `RateLimiterUnavailable`."""
        validate_entity_id(entity_id)
        validate_resource(resource)
        fallback = check_limits(limits or [], allow_empty=use_stored_limits)
        seconds = self._deadline_of(deadline)
        chosen, state = await self._read(entity_id, resource, fallback, use_stored_limits, seconds)
        caps = [limit for limit in chosen if limit.is_concurrency]
        slots = None
        if caps and self._slots is not None:
            async with Bounded(seconds):
                slots = await self._slots.storage.get_slots(entity_id, resource)
        now = self._engine.clock()
        result: dict[str, int] = {}
        for limit in chosen:
            if limit.is_concurrency:  # free slots: expired holders count as free
                result[limit.name] = free(limit, slots, now)
            else:
                result[limit.name] = units.tokens_down(available_milli(limit, state, now))
        return result

    async def _read(
        self,
        entity_id: str,
        resource: str,
        fallback: list[Limit],
        use_stored_limits: bool,
        seconds: float | None,
    ) -> tuple[list[Limit], BucketItem | None]:
        """The limits that apply and the bucket item, freshly read (it refreshes the cache)."""
        if not self._ready:
            await self.repository.open()  # before the deadline starts, as for `acquire`
        async with Bounded(seconds):
            await self._ensure_ready()
            chosen = await self._resolver.limits(entity_id, resource, fallback, use_stored_limits)
            state = await self._engine.read(entity_id, resource)
        return chosen, state

    @public_errors
    async def time_until_available(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        needed: Mapping[str, int],
        use_stored_limits: bool = False,
        *,
        deadline: float | None = None,
    ) -> float:
        """Seconds until every limit can cover `needed` (0.0 if it can now); bounded like
        `available`. A quota that cannot cover it waits for its next window; a concurrency cap
        (`needed.get(name, 1)` slots, as an acquire takes) that cannot, its retry hint: the
        earliest expiry among its holders, at most 1 s (a holder may end any time before)."""
        validate_entity_id(entity_id)
        validate_resource(resource)
        fallback = check_limits(limits or [], allow_empty=use_stored_limits)
        amounts = check_consume(needed, field="needed")
        seconds = self._deadline_of(deadline)
        if not use_stored_limits:  # the limits are known: reject before any I/O
            check_consumable([(entity_id, fallback)], amounts, field="needed")
        chosen, state = await self._read(entity_id, resource, fallback, use_stored_limits, seconds)
        check_consumable([(entity_id, chosen)], amounts, field="needed")
        buckets = [limit for limit in chosen if not limit.is_concurrency]
        slots = wanted([limit for limit in chosen if limit.is_concurrency], amounts)
        item = None
        if slots and self._slots is not None:
            async with Bounded(seconds):
                item = await self._slots.storage.get_slots(entity_id, resource)
        now = self._engine.clock()
        ms = wait_ms(buckets, state, units.milli_of(amounts, buckets), now)
        for limit in chosen:
            if ms is not None and limit.name in slots:
                ms = max(ms, slot_wait_ms(limit, item, slots[limit.name], now))
        return 0.0 if ms is None else units.seconds(ms)

    @public_errors
    async def get_resource_capacity(
        self, resource: str, limit_name: str, parents_only: bool = False
    ) -> ResourceCapacity:
        """Capacity and what is available now of one limit of `resource`, per entity that has a
        bucket for it, and summed (`parents_only`: root entities only). Reads every bucket of
        the resource (a Scan): a report, not for the hot path. Reserved tokens count as used."""
        validate_resource(resource)
        validate_name(limit_name)
        if not isinstance(parents_only, bool):
            raise ValidationError("parents_only", parents_only, "must be a bool")
        await self._ensure_ready()
        buckets = await self.repository.resource_buckets(resource)
        now = self._engine.clock()
        entities: list[EntityCapacity] = []
        for bucket in sorted(buckets, key=lambda b: b.entity_id):
            state = bucket.limits.get(limit_name)
            if state is None or state.definition is None:
                continue  # no bucket of that limit, or one reset by an operator
            if parents_only:
                entity = await self.repository.get_entity(bucket.entity_id)
                if entity is None or not entity.is_parent:
                    continue
            limit = Limit.decode(state.definition, limit_name)
            left = units.tokens_down(available_milli(limit, bucket, now))
            used = _used(limit.capacity, left)
            entities.append(EntityCapacity(bucket.entity_id, limit.capacity, left, used))
        total = sum(e.capacity for e in entities)
        left = sum(e.available for e in entities)
        return ResourceCapacity(resource, limit_name, total, left, _used(total, left), entities)

    # -- usage ------------------------------------------------------------------------------

    @public_errors
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
        return await self.repository.get_usage_snapshots(entity_id, resource, window, start, end)

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


def _used(capacity: int, available: int) -> float:
    """Percent of `capacity` in use (over 100 after over-consumption; 0 without capacity)."""
    return (capacity - available) / capacity * 100 if capacity > 0 else 0.0
