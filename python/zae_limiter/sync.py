"""`SyncRateLimiter`: the async limiter driven from blocking code.

It owns a private event loop on a daemon thread (no deprecated `get_event_loop`, and it works
whether or not the calling thread already runs a loop) and hands each call to it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

from .deadline import DEFAULT, DeadlineArg
from .engine.reservations import Reserver
from .entities import DEFAULT_CACHE_TTL
from .lease import SyncLease
from .limiter import RateLimiter
from .metrics import Metrics
from .models import (
    AuditEvent,
    Entity,
    FailureMode,
    Limit,
    Reservations,
    ResourceCapacity,
    StackOptions,
    UsageSnapshot,
    UsageSummary,
)
from .resolver import ResolvedLimits
from .schema import DEFAULT_RESOURCE
from .storage.capacity import CapacityLedger
from .storage.dynamodb.client import RetryPolicy
from .storage.protocol import Storage, Switch
from .version import VersionCheck

T = TypeVar("T")


class SyncRateLimiter:
    """Same constructor and methods as `RateLimiter`, blocking; also a context manager."""

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
        self._limiter = RateLimiter(
            name,
            region,
            endpoint_url,
            stack_options,
            failure_mode,
            auto_update,
            strict_version,
            skip_version_check,
            retry=retry,
            clock=clock,
            config_cache_ttl=config_cache_ttl,
            limits_cache_ttl=limits_cache_ttl,
            bucket_cache_size=bucket_cache_size,
            repository=repository,
            version_check=version_check,
            reservations=reservations,
            deadline=deadline,
            metrics=metrics,
            shadow=shadow,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="zae-limiter-loop", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("SyncRateLimiter is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def name(self) -> str:
        """`RateLimiter.name`."""
        return self._limiter.name

    @property
    def table_name(self) -> str:
        """`RateLimiter.table_name`."""
        return self._limiter.table_name

    @property
    def shadow(self) -> bool:
        """Every limit is treated as soft (see `RateLimiter.shadow`)."""
        return self._limiter.shadow

    @property
    def ledger(self) -> CapacityLedger:
        """DynamoDB calls and capacity units this limiter has used (see `CapacityLedger`)."""
        return self._limiter.ledger

    def clear_cache(self) -> None:
        """Forget every cached bucket state, entity and stored limit."""
        self._limiter.clear_cache()

    @property
    def reserver(self) -> Reserver | None:
        """This process's reserved blocks (None without `reservations`); read them on this
        limiter's loop only (`reserved()` copies them safely)."""
        return self._limiter.reserver

    def reserved(self) -> dict[tuple[str, str], dict[str, int]]:
        """Tokens held reserved, per `(entity_id, resource)` and limit (read on the loop)."""

        async def read() -> dict[tuple[str, str], dict[str, int]]:
            return self._limiter.reserved()

        if self._closed:  # the loop is stopped: nothing else touches the blocks
            return self._limiter.reserved()
        return self._run(read())

    @property
    def async_limiter(self) -> RateLimiter:
        """The `RateLimiter` this one runs on its own event loop thread."""
        return self._limiter

    def close(self) -> None:
        """`RateLimiter.close`, blocking; then stops this limiter's event loop thread."""
        if self._closed:
            return
        try:
            self._run(self._limiter.close())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> SyncRateLimiter:
        self._run(self._limiter.__aenter__())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
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
    ) -> Iterator[SyncLease]:
        """`RateLimiter.acquire`, blocking: a context manager yielding a `SyncLease`."""
        manager = self._limiter.acquire(
            entity_id,
            resource,
            limits,
            consume,
            cascade,
            use_stored_limits,
            failure_mode,
            deadline=deadline,
            also=also,
        )
        lease = self._run(manager.__aenter__())
        try:
            yield SyncLease(lease, self._run)
        except BaseException as exc:
            if not self._run(manager.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            self._run(manager.__aexit__(None, None, None))

    def create_entity(
        self,
        entity_id: str,
        name: str | None = None,
        parent_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        principal: str | None = None,
    ) -> Entity:
        """`RateLimiter.create_entity`, blocking."""
        return self._run(
            self._limiter.create_entity(entity_id, name, parent_id, metadata, principal=principal)
        )

    def get_entity(self, entity_id: str) -> Entity | None:
        """`RateLimiter.get_entity`, blocking."""
        return self._run(self._limiter.get_entity(entity_id))

    def delete_entity(self, entity_id: str, *, principal: str | None = None) -> None:
        """`RateLimiter.delete_entity`, blocking."""
        self._run(self._limiter.delete_entity(entity_id, principal=principal))

    def get_children(self, parent_id: str) -> list[Entity]:
        """`RateLimiter.get_children`, blocking."""
        return self._run(self._limiter.get_children(parent_id))

    def set_limits(
        self,
        entity_id: str,
        limits: Sequence[Limit],
        resource: str = DEFAULT_RESOURCE,
        *,
        principal: str | None = None,
    ) -> None:
        """`RateLimiter.set_limits`, blocking."""
        self._run(self._limiter.set_limits(entity_id, limits, resource, principal=principal))

    def get_limits(self, entity_id: str, resource: str = DEFAULT_RESOURCE) -> list[Limit]:
        """`RateLimiter.get_limits`, blocking."""
        return self._run(self._limiter.get_limits(entity_id, resource))

    def delete_limits(
        self, entity_id: str, resource: str = DEFAULT_RESOURCE, *, principal: str | None = None
    ) -> None:
        """`RateLimiter.delete_limits`, blocking."""
        self._run(self._limiter.delete_limits(entity_id, resource, principal=principal))

    def get_audit_events(
        self,
        entity_id: str,
        limit: int = 100,
        start_event_id: str | None = None,
        *,
        oldest_first: bool = False,
    ) -> list[AuditEvent]:
        """`RateLimiter.get_audit_events`, blocking."""
        return self._run(
            self._limiter.get_audit_events(
                entity_id, limit, start_event_id, oldest_first=oldest_first
            )
        )

    # Kill switches (`RateLimiter.disable_resource`, ...).

    def disable_resource(self, resource: str, *, principal: str | None = None) -> None:
        """`RateLimiter.disable_resource`, blocking."""
        self._run(self._limiter.disable_resource(resource, principal=principal))

    def bypass_resource(self, resource: str, *, principal: str | None = None) -> None:
        """`RateLimiter.bypass_resource`, blocking."""
        self._run(self._limiter.bypass_resource(resource, principal=principal))

    def enable_resource(self, resource: str, *, principal: str | None = None) -> None:
        """`RateLimiter.enable_resource`, blocking."""
        self._run(self._limiter.enable_resource(resource, principal=principal))

    def disable_entity(self, entity_id: str, *, principal: str | None = None) -> None:
        """`RateLimiter.disable_entity`, blocking."""
        self._run(self._limiter.disable_entity(entity_id, principal=principal))

    def bypass_entity(self, entity_id: str, *, principal: str | None = None) -> None:
        """`RateLimiter.bypass_entity`, blocking."""
        self._run(self._limiter.bypass_entity(entity_id, principal=principal))

    def enable_entity(self, entity_id: str, *, principal: str | None = None) -> None:
        """`RateLimiter.enable_entity`, blocking."""
        self._run(self._limiter.enable_entity(entity_id, principal=principal))

    def get_resource_state(self, resource: str) -> str:
        """`RateLimiter.get_resource_state`, blocking."""
        return self._run(self._limiter.get_resource_state(resource))

    def get_entity_state(self, entity_id: str) -> str:
        """`RateLimiter.get_entity_state`, blocking."""
        return self._run(self._limiter.get_entity_state(entity_id))

    def get_switches(self) -> list[Switch]:
        """`RateLimiter.get_switches`, blocking."""
        return self._run(self._limiter.get_switches())

    # -- resource and system default limits ---------------------------------------------

    def set_resource_defaults(
        self, resource: str, limits: Sequence[Limit], principal: str | None = None
    ) -> None:
        """`RateLimiter.set_resource_defaults`, blocking."""
        self._run(self._limiter.set_resource_defaults(resource, limits, principal))

    def get_resource_defaults(self, resource: str) -> list[Limit]:
        """`RateLimiter.get_resource_defaults`, blocking."""
        return self._run(self._limiter.get_resource_defaults(resource))

    def delete_resource_defaults(self, resource: str, principal: str | None = None) -> None:
        """`RateLimiter.delete_resource_defaults`, blocking."""
        self._run(self._limiter.delete_resource_defaults(resource, principal))

    def list_resource_defaults(self) -> dict[str, list[Limit]]:
        """`RateLimiter.list_resource_defaults`, blocking."""
        return self._run(self._limiter.list_resource_defaults())

    def set_system_defaults(self, limits: Sequence[Limit], principal: str | None = None) -> None:
        """`RateLimiter.set_system_defaults`, blocking."""
        self._run(self._limiter.set_system_defaults(limits, principal))

    def get_system_defaults(self) -> list[Limit]:
        """`RateLimiter.get_system_defaults`, blocking."""
        return self._run(self._limiter.get_system_defaults())

    def delete_system_defaults(self, principal: str | None = None) -> None:
        """`RateLimiter.delete_system_defaults`, blocking."""
        self._run(self._limiter.delete_system_defaults(principal))

    def get_effective_limits(self, entity_id: str, resource: str) -> list[ResolvedLimits]:
        """`RateLimiter.get_effective_limits`, blocking."""
        return self._run(self._limiter.get_effective_limits(entity_id, resource))

    def available(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        use_stored_limits: bool = False,
        *,
        deadline: float | None = None,
    ) -> dict[str, int]:
        """`RateLimiter.available`, blocking."""
        return self._run(
            self._limiter.available(
                entity_id, resource, limits, use_stored_limits, deadline=deadline
            )
        )

    def time_until_available(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[Limit] | None,
        needed: Mapping[str, int],
        use_stored_limits: bool = False,
        *,
        deadline: float | None = None,
    ) -> float:
        """`RateLimiter.time_until_available`, blocking."""
        return self._run(
            self._limiter.time_until_available(
                entity_id, resource, limits, needed, use_stored_limits, deadline=deadline
            )
        )

    def get_usage_snapshots(
        self,
        entity_id: str,
        resource: str | None = None,
        window: str | None = "hourly",
        start: datetime | str | None = None,
        end: datetime | str | None = None,
    ) -> list[UsageSnapshot]:
        """`RateLimiter.get_usage_snapshots`, blocking."""
        return self._run(self._limiter.get_usage_snapshots(entity_id, resource, window, start, end))

    def get_resource_capacity(
        self, resource: str, limit_name: str, parents_only: bool = False
    ) -> ResourceCapacity:
        """`RateLimiter.get_resource_capacity`, blocking."""
        return self._run(self._limiter.get_resource_capacity(resource, limit_name, parents_only))

    def get_usage_summary(
        self,
        entity_id: str,
        resource: str | None = None,
        window: str | None = "hourly",
        start: datetime | str | None = None,
        end: datetime | str | None = None,
    ) -> UsageSummary:
        """`RateLimiter.get_usage_summary`, blocking."""
        return self._run(self._limiter.get_usage_summary(entity_id, resource, window, start, end))

    def create_stack(self, stack_options: StackOptions | None = None) -> dict[str, Any]:
        """`RateLimiter.create_stack`, blocking."""
        return self._run(self._limiter.create_stack(stack_options))

    def delete_stack(self) -> None:
        """`RateLimiter.delete_stack`, blocking."""
        self._run(self._limiter.delete_stack())
