"""`LimitResolver`: the limits that apply to (entity, resource), in one definition.

The limits of an entity for a resource are the caller's (`fallback`), or with stored limits the
entity's stored limits for the resource, else its stored `_default_`, else the caller's; with
`cascade` the same holds for the entity's parent, and the entity must exist. `acquire`,
`available` and `time_until_available` all resolve through here.

Entities and stored limits are cached for the limiter's `limits_cache_ttl`; an entity found
missing is believed missing for `MISSING_ENTITY_TTL`. The management calls
(`zae_limiter.entities`) tell the resolver what they changed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .engine.cache import TTLCache
from .exceptions import EntityNotFoundError, ValidationError
from .models import Entity, Limit
from .schema import DEFAULT_RESOURCE
from .storage.protocol import Storage

# How long an entity found missing is believed missing (cascade): a flood of requests naming
# unknown entities then costs one read per entity per this many seconds. Short, because another
# process may create the entity meanwhile; this limiter's own `create_entity` forgets it at once.
MISSING_ENTITY_TTL = 5.0

LimitSets = list[tuple[str, list[Limit]]]
"""`(entity_id, limits)` for the entity and, with cascade, its parent."""


@dataclass
class _Reads:
    """What one resolution read: it decides even if the caches have already dropped it (a
    short TTL, a small cache)."""

    entities: dict[str, Entity] = field(default_factory=dict)
    stored: dict[str, dict[str, list[Limit]]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Need:
    """The read a resolution waits for: the entity itself, or its stored limits."""

    entity_id: str
    entity: bool


class LimitResolver:
    """The limits for (entity, resource), from the caches or read from `repository`."""

    def __init__(self, repository: Storage, ttl: float, size: int) -> None:
        self._repository = repository
        self._entities: TTLCache[str, Entity] = TTLCache(ttl, size)
        self._stored: TTLCache[str, dict[str, list[Limit]]] = TTLCache(ttl, size)
        # Apart from `_entities`, so that a flood of unknown ids cannot evict the known ones.
        self._missing: TTLCache[str, bool] = TTLCache(MISSING_ENTITY_TTL, size)
        self._lookups: dict[str, asyncio.Future[Entity | None]] = {}

    def cached(
        self,
        entity_id: str,
        resource: str,
        fallback: list[Limit],
        cascade: bool,
        use_stored_limits: bool,
    ) -> LimitSets | None:
        """`limit_sets` from the caches alone (no I/O); None when it needs a read."""
        sets = self._sets(entity_id, resource, fallback, cascade, use_stored_limits, None, True)
        return None if isinstance(sets, _Need) else sets

    async def limit_sets(
        self,
        entity_id: str,
        resource: str,
        fallback: list[Limit],
        cascade: bool,
        use_stored_limits: bool,
    ) -> LimitSets:
        """`(entity_id, limits)` for the entity and, with `cascade`, its parent (which must
        exist: `EntityNotFoundError`); a `ValidationError` when one of them has no limits."""
        return await self._resolve(entity_id, resource, fallback, cascade, use_stored_limits, True)

    async def limits(
        self, entity_id: str, resource: str, fallback: list[Limit], use_stored_limits: bool
    ) -> list[Limit]:
        """The entity's own limits for `resource` (empty when none are given or stored)."""
        sets = await self._resolve(entity_id, resource, fallback, False, use_stored_limits, False)
        return sets[0][1]

    async def _resolve(
        self,
        entity_id: str,
        resource: str,
        fallback: list[Limit],
        cascade: bool,
        use_stored_limits: bool,
        required: bool,
    ) -> LimitSets:
        reads = _Reads()
        while True:
            sets = self._sets(
                entity_id, resource, fallback, cascade, use_stored_limits, reads, required
            )
            if not isinstance(sets, _Need):
                return sets
            if sets.entity:
                reads.entities[sets.entity_id] = await self._entity(sets.entity_id)
            else:
                reads.stored[sets.entity_id] = await self._read_stored(sets.entity_id)

    def _sets(
        self,
        entity_id: str,
        resource: str,
        fallback: list[Limit],
        cascade: bool,
        use_stored_limits: bool,
        reads: _Reads | None,
        required: bool,
    ) -> LimitSets | _Need:
        """The definition: the limit sets, or the first read they need. `required`: an entity
        left with no limits is a `ValidationError`."""
        ids = [entity_id]
        if cascade:
            entity = None if reads is None else reads.entities.get(entity_id)
            if entity is None:
                entity = self._entities.get(entity_id)[1]
                if entity is None:
                    return _Need(entity_id, entity=True)
            if entity.parent_id is not None:
                ids.append(entity.parent_id)
        if not use_stored_limits:
            return [(eid, fallback) for eid in ids]
        sets: LimitSets = []
        for eid in ids:
            stored = None if reads is None else reads.stored.get(eid)
            if stored is None:
                stored = self._stored.get(eid)[1]
                if stored is None:
                    return _Need(eid, entity=False)
            limits = list(stored.get(resource) or stored.get(DEFAULT_RESOURCE) or fallback)
            if required and not limits:
                raise ValidationError(
                    "limits", limits, "no limits given and none stored for the entity"
                )
            sets.append((eid, limits))
        return sets

    async def _read_stored(self, entity_id: str) -> dict[str, list[Limit]]:
        stored = await self._repository.get_all_limits(entity_id)
        self._stored.put(entity_id, stored)
        return stored

    async def _entity(self, entity_id: str) -> Entity:
        """The entity, read once however many resolutions wait for it."""
        if self._missing.get(entity_id)[0]:
            raise EntityNotFoundError(entity_id)
        # Concurrent requests for one uncached id share one read (a flood of an unknown key).
        lookup = self._lookups.get(entity_id)
        if lookup is None:
            lookup = asyncio.ensure_future(self._look_up(entity_id))
            self._lookups[entity_id] = lookup
            lookup.add_done_callback(lambda done: self._looked_up(entity_id, done))
        # Shielded: a waiter past its deadline must not cancel the read the others wait for.
        entity = await asyncio.shield(lookup)
        if entity is None:
            raise EntityNotFoundError(entity_id)
        return entity

    async def _look_up(self, entity_id: str) -> Entity | None:
        entity = await self._repository.get_entity(entity_id)
        if entity is None:
            self._missing.put(entity_id, True)
        else:
            self._entities.put(entity_id, entity)
        return entity

    def _looked_up(self, entity_id: str, done: asyncio.Future[Entity | None]) -> None:
        if self._lookups.get(entity_id) is done:
            del self._lookups[entity_id]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have gone (deadline)

    # -- what the management calls changed ------------------------------------------------

    def saw(self, entity: Entity) -> None:
        """`entity` was just read: it exists, with this parent."""
        self._entities.put(entity.id, entity)
        self._missing.drop(entity.id)

    def created(self, entity_id: str) -> None:
        """This limiter created the entity: no longer believed missing."""
        self._missing.drop(entity_id)

    def deleted(self, entity_id: str) -> None:
        self._entities.drop(entity_id)
        self._stored.drop(entity_id)

    def limits_changed(self, entity_id: str) -> None:
        self._stored.drop(entity_id)

    def clear(self) -> None:
        self._entities.clear()
        self._stored.clear()
        self._missing.clear()

