"""`LimitResolver`: the limits that apply to (entity, resource), in one definition.

The limits of an entity for a resource are the caller's (`fallback`), or with stored limits the
first level that has any (docs/limits.md, "Where limits come from"): the entity's own for the
resource, its `_default_`, the resource's defaults, the system defaults, then the caller's. The
most specific level wins whole (no merging of limits across levels). With `cascade` the same
holds for the entity's parent, through its own levels, and the entity must exist. `acquire`,
`available` and `time_until_available` all resolve through here.

Entities, stored limits and default limits (an empty level too: a resolution with nothing stored
costs its reads once per TTL, not per acquire) are cached for the limiter's `config_cache_ttl`;
an entity found missing is believed missing for `MISSING_ENTITY_TTL`. The management calls
(`zae_limiter.entities`) tell the resolver what they changed, so this limiter sees its own
changes at once and other processes' within the TTL.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Final, NamedTuple

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

# The levels a resolution may take its limits from, most specific first (`ResolvedLimits`).
ENTITY: Final = "entity"
ENTITY_DEFAULT: Final = "entity default"
RESOURCE: Final = "resource"
SYSTEM: Final = "system"
LEVELS: Final = (ENTITY, ENTITY_DEFAULT, RESOURCE, SYSTEM)


class ResolvedLimits(NamedTuple):
    """The limits of one entity for a resource and the level they come from (`LEVELS`; None
    when no level has any)."""

    entity_id: str
    level: str | None
    limits: list[Limit]


def pick(
    stored: dict[str, list[Limit]],
    resource: str,
    resource_defaults: list[Limit] | None,
    system_defaults: list[Limit] | None,
) -> tuple[str | None, list[Limit]] | str:
    """The first level with limits, most specific first, as (level, limits); (None, []) when
    none has any. The entity's levels come from `stored` (its limits by resource); when they
    are empty and a default level is needed but not given (None), the level's name instead:
    the read it needs."""
    own = stored.get(resource)
    if own:
        return ENTITY, own
    default = stored.get(DEFAULT_RESOURCE)
    if default:
        return ENTITY_DEFAULT, default
    if resource_defaults is None:
        return RESOURCE
    if resource_defaults:
        return RESOURCE, resource_defaults
    if system_defaults is None:
        return SYSTEM
    if system_defaults:
        return SYSTEM, system_defaults
    return None, []


@dataclass
class _Reads:
    """What one resolution read: it decides even if the caches have already dropped it (a
    short TTL, a small cache)."""

    entities: dict[str, Entity] = field(default_factory=dict)
    stored: dict[str, dict[str, list[Limit]]] = field(default_factory=dict)
    defaults: dict[str, list[Limit]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Need:
    """The read a resolution waits for: the entity itself, its stored limits, or the default
    limits of a resource (`key`; the system level's is `DEFAULT_RESOURCE`)."""

    key: str
    kind: str  # "entity", "stored" or "defaults"


class LimitResolver:
    """The limits for (entity, resource), from the caches or read from `repository`."""

    def __init__(self, repository: Storage, ttl: float, size: int) -> None:
        self._repository = repository
        self._entities: TTLCache[str, Entity] = TTLCache(ttl, size)
        self._stored: TTLCache[str, dict[str, list[Limit]]] = TTLCache(ttl, size)
        # Resource defaults by resource, the system level under `DEFAULT_RESOURCE`; an empty
        # list is a cached "none" (a limiter using no defaults reads each once per TTL).
        self._defaults: TTLCache[str, list[Limit]] = TTLCache(ttl, size)
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
            if sets.kind == "entity":
                reads.entities[sets.key] = await self._entity(sets.key)
            elif sets.kind == "stored":
                reads.stored[sets.key] = await self._read_stored(sets.key)
            else:
                reads.defaults[sets.key] = await self._read_defaults(sets.key)

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
                    return _Need(entity_id, "entity")
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
                    return _Need(eid, "stored")
            chosen = pick(
                stored,
                resource,
                self._cached_defaults(resource, reads),
                self._cached_defaults(DEFAULT_RESOURCE, reads),
            )
            if isinstance(chosen, str):
                return _Need(resource if chosen == RESOURCE else DEFAULT_RESOURCE, "defaults")
            limits = list(chosen[1] or fallback)
            if required and not limits:
                raise ValidationError(
                    "limits", limits, "no limits given and none stored for the entity"
                )
            sets.append((eid, limits))
        return sets

    def _cached_defaults(self, resource: str, reads: _Reads | None) -> list[Limit] | None:
        found = None if reads is None else reads.defaults.get(resource)
        return found if found is not None else self._defaults.get(resource)[1]

    async def _read_defaults(self, resource: str) -> list[Limit]:
        found = await self._repository.get_defaults(resource)
        self._defaults.put(resource, found)
        return found

    async def explain(self, entity_id: str, resource: str) -> list[ResolvedLimits]:
        """What a resolution with stored limits takes for the entity and, if it has one, its
        parent, and from which level; read now (not from the caches: an operator's question)."""
        entity = await self._repository.get_entity(entity_id)
        ids = [entity_id]
        if entity is not None and entity.parent_id is not None:
            ids.append(entity.parent_id)
        resource_defaults = await self._repository.get_defaults(resource)
        system_defaults = await self._repository.get_defaults(DEFAULT_RESOURCE)
        found: list[ResolvedLimits] = []
        for eid in ids:
            stored = await self._repository.get_all_limits(eid)
            chosen = pick(stored, resource, resource_defaults, system_defaults)
            assert not isinstance(chosen, str)  # every level was given
            found.append(ResolvedLimits(eid, chosen[0], list(chosen[1])))
        return found

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

    def defaults_changed(self, resource: str) -> None:
        """This limiter changed `resource`'s default limits (the system level's for
        `DEFAULT_RESOURCE`): the next resolution reads them again."""
        self._defaults.drop(resource)

    def clear(self) -> None:
        self._entities.clear()
        self._stored.clear()
        self._defaults.clear()
        self._missing.clear()

