"""Kill switches: an operator disables a resource or an entity (every acquire of it raises
`ResourceDisabled`) or bypasses it (every acquire is admitted with no consumption and no I/O).

Every switch lives in one partition (`schema.SWITCH_PK`), so a limiter knows all of them from one
Query, cached for its `config_cache_ttl`: a limiter whose switches are all clear pays one read
per TTL, whatever number of resources and entities it serves, and none per acquire. The first
read happens when the limiter gets ready (with its version check), so an acquire pays for one
only when the TTL has passed. A change is seen at once by the limiter that made it and by every
other one within the TTL.

What applies to an acquire: a disabled resource, entity or (with cascade) parent refuses it;
otherwise a bypassed one admits it as a no-op lease. `available()` ignores the switches: it
reports the buckets as they are.

When DynamoDB cannot be read past the TTL, the switches last read stay in force (a disabled
resource stays disabled through an outage, whatever the failure mode) and the read is tried
again after `RETRY_SECONDS`; a limiter that never read them meets the outage like any read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .. import audit, schema
from ..core.units import iso_utc
from ..exceptions import ResourceDisabled, ValidationError
from ..storage.protocol import RepositoryUnavailable, Storage, Switch, SwitchStorage
from ..validation import validate_entity_id, validate_principal, validate_resource

log = logging.getLogger("zae_limiter")

# After a failed read, the switches last read stay in force this long before the next try: an
# outage must not add a read to every acquire, and a short blip must not hide a change for long.
RETRY_SECONDS = 1.0

DISABLED = schema.SWITCH_DISABLED
BYPASS = schema.SWITCH_BYPASS
ENABLED = "enabled"  # what a clear switch reads as


@dataclass(frozen=True)
class Flags:
    """The switches that are set, as one limiter last read them: name -> state."""

    resources: Mapping[str, str] = field(default_factory=dict)
    entities: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, switches: Iterable[Switch]) -> Flags:
        resources: dict[str, str] = {}
        entities: dict[str, str] = {}
        for switch in switches:
            if switch.state in schema.SWITCH_STATES:  # an unknown state is no switch
                (resources if switch.kind == "resource" else entities)[switch.name] = switch.state
        return cls(resources, entities)

    def with_state(self, kind: str, name: str, state: str | None) -> Flags:
        resources, entities = dict(self.resources), dict(self.entities)
        target = resources if kind == "resource" else entities
        if state is None:
            target.pop(name, None)
        else:
            target[name] = state
        return Flags(resources, entities)

    def bypassed(
        self, resource: str, entity_id: str, ids: Iterable[str], complete: bool, recheck: float
    ) -> bool:
        """Raises `ResourceDisabled` when the resource or one of `ids` (the entity, its parent
        with cascade) is disabled; True when one is bypassed. `complete` False: `ids` may lack
        the parent, so a bypass is decided only if no entity at all is disabled (no I/O)."""
        if not self.resources and not self.entities:  # the common case, cheapest
            return False
        state = self.resources.get(resource)
        if state == DISABLED:
            raise ResourceDisabled(resource, entity_id, "resource", resource, recheck)
        bypass = state == BYPASS
        for eid in ids:
            own = self.entities.get(eid)
            if own == DISABLED:
                raise ResourceDisabled(resource, entity_id, "entity", eid, recheck)
            bypass = bypass or own == BYPASS
        if bypass and not complete:
            return DISABLED not in self.entities.values()
        return bypass


class SwitchBoard:
    """This limiter's copy of the switches, read at most once per `ttl` (one read in flight,
    shared by every acquire waiting for it)."""

    def __init__(
        self, storage: SwitchStorage, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.storage = storage
        self.ttl = ttl
        self._clock = clock
        self._flags: Flags | None = None
        self._fresh_until = 0.0
        self._read: asyncio.Future[Flags] | None = None
        # Bumped by each change this limiter makes: a read sent before it must not bring the
        # old state back.
        self._generation = 0

    def cached(self) -> Flags | None:
        """The switches if read within the TTL (no I/O), else None."""
        if self._flags is not None and self._clock() < self._fresh_until:
            return self._flags
        return None

    async def current(self) -> Flags:
        """The switches: cached, or read now. A failed read leaves the last ones in force."""
        flags = self.cached()
        if flags is not None:
            return flags
        read = self._read
        if read is None:
            read = asyncio.ensure_future(self._fetch(self._generation))
            self._read = read
            read.add_done_callback(self._fetched)
        # Shielded: an acquire past its deadline must not cancel the read the others wait for.
        return await asyncio.shield(read)

    async def prime(self) -> None:
        """Read the switches now unless known (the limiter getting ready): an outage here is
        not an error, the first acquire reads them then."""
        try:
            await self.current()
        except RepositoryUnavailable as exc:
            log.warning("kill switches not read yet, DynamoDB unavailable: %s", exc)

    async def _fetch(self, generation: int) -> Flags:
        try:
            flags = Flags.of(await self.storage.get_switches())
        except RepositoryUnavailable as exc:
            if self._flags is None:
                raise
            log.warning("kill switches not refreshed, the last ones stay in force: %s", exc)
            self._fresh_until = self._clock() + min(self.ttl, RETRY_SECONDS)
            return self._flags
        if generation == self._generation:
            self._flags = flags
            self._fresh_until = self._clock() + self.ttl
        return flags

    def _fetched(self, done: asyncio.Future[Flags]) -> None:
        if self._read is done:
            self._read = None
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have gone (deadline)

    def changed(self, kind: str, name: str, state: str | None) -> None:
        """This limiter changed a switch: its next acquire sees it, with no read."""
        self._generation += 1
        if self._flags is not None:
            self._flags = self._flags.with_state(kind, name, state)

    def clear(self) -> None:
        self._flags = None
        self._fresh_until = 0.0
        self._generation += 1


class SwitchPanel:
    """The limiter's management calls on the switches: each change is written, recorded in
    the audit trail and applied to this limiter's board at once. `ready` makes the table
    usable (the version check)."""

    def __init__(
        self, board: SwitchBoard, storage: Storage, ready: Callable[[], Awaitable[None]]
    ) -> None:
        self._board = board
        self._storage = storage  # the audit trail's
        self._ready = ready

    async def set(self, kind: str, name: str, state: str | None, principal: str | None) -> None:
        name = validate_resource(name) if kind == "resource" else validate_entity_id(name)
        principal = validate_principal(principal)
        await self._ready()
        storage = self._board.storage
        if state is None:
            previous = await storage.delete_switch(kind, name)
        else:
            # The wall clock, as audit events use: when the change really happened.
            switch = Switch(kind, name, state, principal, iso_utc())
            previous = await storage.put_switch(switch)
        self._board.changed(kind, name, state)
        event = audit.switch_changed(kind, name, state, previous, principal)
        await audit.record(self._storage, event)

    async def state(self, kind: str, name: str) -> str:
        """"disabled", "bypass" or "enabled", as stored now (a fresh read, not the cache)."""
        name = validate_resource(name) if kind == "resource" else validate_entity_id(name)
        await self._ready()
        flags = Flags.of(await self._board.storage.get_switches())
        found = (flags.resources if kind == "resource" else flags.entities).get(name)
        return found or ENABLED

    async def all(self) -> list[Switch]:
        """Every switch that is set, as stored now."""
        await self._ready()
        switches = await self._board.storage.get_switches()
        return sorted(switches, key=lambda s: (s.kind, s.name))


def no_switches(storage: object) -> ValidationError:
    return ValidationError(
        "repository", type(storage).__name__, "this storage keeps no kill switches"
    )
