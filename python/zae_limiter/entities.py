"""`Entities`: the limiter's management calls on entities, their stored limits, the resource
and system default limits, and the audit trails.

Each change is applied, then recorded in the entity's audit trail (`zae_limiter.audit`), and
the limit resolver (`zae_limiter.resolver`) is told what it changed, so that this limiter's
next acquire sees it at once (other processes see it when their caches expire).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

from . import audit
from .arguments import check_limits
from .exceptions import EntityNotFoundError, ValidationError
from .failures import public_errors
from .models import AuditEvent, Entity, Limit
from .resolver import LimitResolver, ResolvedLimits
from .schema import DEFAULT_RESOURCE
from .storage.protocol import Storage
from .validation import (
    validate_audit_id,
    validate_entity_id,
    validate_principal,
    validate_resource,
)


def resource_level(resource: str) -> str:
    """A resource whose defaults are set: any valid resource but `_default_`, which names the
    system level (`set_system_defaults`)."""
    validate_resource(resource)
    if resource == DEFAULT_RESOURCE:
        raise ValidationError(
            "resource", resource, "names the system level: use the system defaults instead"
        )
    return resource


def check_cache_ttl(config_cache_ttl: object, limits_cache_ttl: object) -> float:
    """The resolution cache's TTL: `config_cache_ttl` (0.17's name), or `limits_cache_ttl`
    (this library's earlier name, kept as an alias) when only that is given."""
    ttl = config_cache_ttl if limits_cache_ttl is None else limits_cache_ttl
    field = "config_cache_ttl" if limits_cache_ttl is None else "limits_cache_ttl"
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 <= ttl < float("inf"):
        raise ValidationError(field, ttl, "must be a number of seconds >= 0 (0: never expire)")
    if limits_cache_ttl is not None and config_cache_ttl != DEFAULT_CACHE_TTL and (
        config_cache_ttl != limits_cache_ttl
    ):
        raise ValidationError(
            "limits_cache_ttl", limits_cache_ttl, "is an alias of config_cache_ttl: give one"
        )
    return float(ttl)


DEFAULT_CACHE_TTL = 30.0


class Entities:
    """What `RateLimiter.create_entity`, `get_entity`, ..., `get_audit_events` do. `ready`
    makes the table usable (the version check); `forget_buckets` drops what this process keeps
    of a deleted entity's buckets."""

    def __init__(
        self,
        repository: Storage,
        resolver: LimitResolver,
        ready: Callable[[], Awaitable[None]],
        forget_buckets: Callable[[str], None],
    ) -> None:
        self._repository = repository
        self._resolver = resolver
        self._ready = ready
        self._forget_buckets = forget_buckets

    @public_errors
    async def create(
        self,
        entity_id: str,
        name: str | None,
        parent_id: str | None,
        metadata: Mapping[str, str] | None,
        principal: str | None,
    ) -> Entity:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValidationError("metadata", metadata, "must be a mapping of str to str")
        entity = Entity(
            id=validate_entity_id(entity_id),
            name=name,
            parent_id=None if parent_id is None else validate_entity_id(parent_id, "parent_id"),
            metadata=dict(metadata or {}),
        )
        principal = validate_principal(principal)
        await self._ready()
        parent = entity.parent_id
        if parent is not None and await self._repository.get_entity(parent) is None:
            raise EntityNotFoundError(parent)
        await self._repository.put_entity(entity)
        self._resolver.created(entity.id)
        await audit.record(self._repository, audit.entity_created(entity, principal))
        stored = await self.get(entity.id)
        return stored or entity

    @public_errors
    async def get(self, entity_id: str) -> Entity | None:
        validate_entity_id(entity_id)
        await self._ready()
        entity = await self._repository.get_entity(entity_id)
        if entity is not None:
            self._resolver.saw(entity)
        return entity

    @public_errors
    async def delete(self, entity_id: str, principal: str | None) -> None:
        validate_entity_id(entity_id)
        principal = validate_principal(principal)
        await self._ready()
        count = await self._repository.delete_entity(entity_id)
        self._resolver.deleted(entity_id)
        self._forget_buckets(entity_id)
        await audit.record(self._repository, audit.entity_deleted(entity_id, principal, count))

    @public_errors
    async def children(self, parent_id: str) -> list[Entity]:
        validate_entity_id(parent_id, "parent_id")
        await self._ready()
        return await self._repository.get_children(parent_id)

    @public_errors
    async def set_limits(
        self, entity_id: str, limits: Sequence[Limit], resource: str, principal: str | None
    ) -> None:
        validate_entity_id(entity_id)
        validate_resource(resource)
        checked = check_limits(limits)
        principal = validate_principal(principal)
        await self._ready()
        await self._repository.set_limits(entity_id, resource, checked)
        self._resolver.limits_changed(entity_id)
        await audit.record(
            self._repository, audit.limits_set(entity_id, resource, checked, principal)
        )

    @public_errors
    async def get_limits(self, entity_id: str, resource: str) -> list[Limit]:
        validate_entity_id(entity_id)
        validate_resource(resource)
        await self._ready()
        return await self._repository.get_limits(entity_id, resource)

    @public_errors
    async def delete_limits(self, entity_id: str, resource: str, principal: str | None) -> None:
        validate_entity_id(entity_id)
        validate_resource(resource)
        principal = validate_principal(principal)
        await self._ready()
        count = await self._repository.delete_limits(entity_id, resource)
        self._resolver.limits_changed(entity_id)
        await audit.record(
            self._repository, audit.limits_deleted(entity_id, resource, principal, count)
        )

    # -- default limits: a resource's, and the system's under `DEFAULT_RESOURCE` ----------------

    @public_errors
    async def set_defaults(
        self, resource: str, limits: Sequence[Limit], principal: str | None
    ) -> None:
        checked = check_limits(limits)
        principal = validate_principal(principal)
        await self._ready()
        await self._repository.set_defaults(resource, checked)
        self._resolver.defaults_changed(resource)
        await audit.record(self._repository, audit.defaults_set(resource, checked, principal))

    @public_errors
    async def get_defaults(self, resource: str) -> list[Limit]:
        await self._ready()
        return await self._repository.get_defaults(resource)

    @public_errors
    async def delete_defaults(self, resource: str, principal: str | None) -> None:
        principal = validate_principal(principal)
        await self._ready()
        count = await self._repository.delete_defaults(resource)
        self._resolver.defaults_changed(resource)
        await audit.record(self._repository, audit.defaults_deleted(resource, principal, count))

    @public_errors
    async def resource_defaults(self) -> dict[str, list[Limit]]:
        await self._ready()
        found = await self._repository.all_defaults()
        return {r: found[r] for r in sorted(found) if r != DEFAULT_RESOURCE}

    @public_errors
    async def effective(self, entity_id: str, resource: str) -> list[ResolvedLimits]:
        validate_entity_id(entity_id)
        validate_resource(resource)
        await self._ready()
        return await self._resolver.explain(entity_id, resource)

    @public_errors
    async def audit_events(
        self, entity_id: str, limit: int, start_event_id: str | None, oldest_first: bool
    ) -> list[AuditEvent]:
        validate_audit_id(entity_id)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValidationError("limit", limit, "must be a positive integer")
        if start_event_id is not None and not audit.is_event_id(start_event_id):
            raise ValidationError("start_event_id", start_event_id, "is not an audit event id")
        if not isinstance(oldest_first, bool):
            raise ValidationError("oldest_first", oldest_first, "must be a bool")
        await self._ready()
        return await self._repository.get_audit_events(
            entity_id, limit, start_event_id, oldest_first=oldest_first
        )
