"""Limits as a file: a YAML file of system, resource and entity limits, planned against the
table, applied, and exported (docs/limits.md, "Limits as a file").

```yaml
system: ["rpm:1000/minute"]
resources:
  gpt-4o: ["tpm:100000/minute"]
entities:
  key-1:
    _default_: ["rpm:100/minute"]
    gpt-4o: ["tpm:20000/minute"]
```

Each limit is in `Limit.parse`'s text form. A file is read whole and checked before anything is
written (`parse`: a `LimitsFileError` names the line); `plan` compares it with the table, level
by level (the system level, a resource's defaults, an entity's limits for one resource); `apply`
makes each level that differs what the file says through the limiter's own management calls, so
every change is one idempotent replacement recorded in an audit trail as if made by hand: an
apply cut off midway is finished by running it again (its plan then holds what is left).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import yaml

from ..exceptions import ValidationError
from ..models import Limit
from ..schema import DEFAULT_RESOURCE
from ..validation import validate_entity_id, validate_principal, validate_resource

if TYPE_CHECKING:
    from ..limiter import RateLimiter

__all__ = [
    "Change",
    "LimitsFile",
    "LimitsFileError",
    "Plan",
    "apply",
    "dump",
    "export",
    "load",
    "parse",
    "plan",
]

SYSTEM = "system"
RESOURCES = "resources"
ENTITIES = "entities"
SECTIONS = (SYSTEM, RESOURCES, ENTITIES)

# Levels written at once by `apply`: enough to overlap the round trips of many small writes (a
# replacement, then its audit event), few enough not to crowd a table or a local server.
APPLY_CONCURRENCY = 16


class LimitsFileError(ValidationError):
    """A limits file that cannot be applied: `field` is where in the file (`entities.key-1.
    gpt-4o[0]`), `line` its line (1-based; None when unknown)."""

    def __init__(self, field: str, value: object, reason: str, line: int | None) -> None:
        super().__init__(field, value, reason)
        self.line = line
        if line is not None:
            self.args = (f"line {line}: {self.args[0]}",)


@dataclass(frozen=True)
class LimitsFile:
    """What a file says: the system level (None: the file does not say), each resource's
    defaults, each entity's limits by resource (`_default_`: its default)."""

    system: tuple[Limit, ...] | None = None
    resources: dict[str, tuple[Limit, ...]] = field(default_factory=dict)
    entities: dict[str, dict[str, tuple[Limit, ...]]] = field(default_factory=dict)

    def levels(self) -> dict[Level, tuple[Limit, ...]]:
        found: dict[Level, tuple[Limit, ...]] = {}
        if self.system is not None:
            found[(SYSTEM, None, DEFAULT_RESOURCE)] = self.system
        for resource, limits in self.resources.items():
            found[("resource", None, resource)] = limits
        for entity_id, by_resource in self.entities.items():
            for resource, limits in by_resource.items():
                found[("entity", entity_id, resource)] = limits
        return found


# A level: (kind, entity id, resource): ("system", None, "_default_"), ("resource", None, r),
# ("entity", id, r) (r `_default_`: the entity's default).
Level = tuple[str, str | None, str]


@dataclass(frozen=True)
class Change:
    """One level to write: `add` (the table has none), `change` or `remove` (only with
    prune); `before` and `after` its limits (sorted by name)."""

    action: Literal["add", "change", "remove"]
    level: str  # "system", "resource" or "entity"
    entity_id: str | None
    resource: str
    before: tuple[Limit, ...]
    after: tuple[Limit, ...]

    @property
    def where(self) -> str:
        if self.level == SYSTEM:
            return "system"
        if self.level == "resource":
            return f"resource {self.resource}"
        return f"entity {self.entity_id} {self.resource}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "level": self.level,
            "entity_id": self.entity_id,
            "resource": self.resource,
            "before": [x.spec for x in self.before],
            "after": [x.spec for x in self.after],
        }


@dataclass(frozen=True)
class Plan:
    """The changes that make the table hold what the file says, in a stable order."""

    changes: tuple[Change, ...]
    prune: bool

    @property
    def empty(self) -> bool:
        return not self.changes

    def counts(self) -> dict[str, int]:
        return {a: sum(c.action == a for c in self.changes) for a in ("add", "change", "remove")}

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": [c.to_dict() for c in self.changes],
            "summary": self.counts(),
            "prune": self.prune,
        }


# -- reading a file --------------------------------------------------------------------------


class _Text(str):
    """A string from the file that remembers its line."""

    line: int | None = None


class _Map(dict[Any, Any]):
    line: int | None = None


class _Seq(list[Any]):
    line: int | None = None


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no type hints
    """The safe loader, keeping each string's, mapping's and list's line, and refusing a key
    given twice in one mapping (YAML would keep the last silently)."""


def _text(loader: _Loader, node: Any) -> _Text:
    value = _Text(loader.construct_scalar(node))
    value.line = node.start_mark.line + 1
    return value


def _map(loader: _Loader, node: Any) -> Any:
    data = _Map()
    data.line = node.start_mark.line + 1
    yield data
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *tier`: the mapping's own keys override the merged ones
        key = key_node.value
        if key in seen:
            raise LimitsFileError(str(key), key, "is given twice", key_node.start_mark.line + 1)
        seen.add(key)
    data.update(loader.construct_mapping(node))


def _seq(loader: _Loader, node: Any) -> Any:
    data = _Seq()
    data.line = node.start_mark.line + 1
    yield data
    data.extend(loader.construct_sequence(node))


_Loader.add_constructor("tag:yaml.org,2002:str", _text)
_Loader.add_constructor("tag:yaml.org,2002:map", _map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _seq)


def _line(value: object, default: int | None) -> int | None:
    found = getattr(value, "line", None)
    return found if isinstance(found, int) else default


def parse(text: str) -> LimitsFile:
    """The file's limits, every one checked; `LimitsFileError` (naming the line) for the first
    problem: YAML syntax, an unknown section, a bad id or resource, a bad or repeated limit."""
    try:
        data = yaml.load(text, Loader=_Loader)  # safe: a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        raise LimitsFileError("file", None, f"not YAML: {exc.problem}", line) from None
    except yaml.YAMLError as exc:
        raise LimitsFileError("file", None, f"not YAML: {exc}", None) from None
    if data is None:
        return LimitsFile()
    if not isinstance(data, dict):
        raise LimitsFileError("file", None, "must be a mapping of system, resources, entities",
                              _line(data, 1))
    for key in data:
        if key not in SECTIONS:
            raise LimitsFileError(str(key), key, f"unknown section (one of {', '.join(SECTIONS)})",
                                  _line(key, None))
    system = None
    if SYSTEM in data:
        system = _limits(SYSTEM, data[SYSTEM], _line(_key(data, SYSTEM), None))
    resources: dict[str, tuple[Limit, ...]] = {}
    for resource, limits in _mapping(RESOURCES, data.get(RESOURCES), data).items():
        where = f"{RESOURCES}.{resource}"
        _check(validate_resource, resource, where)
        if resource == DEFAULT_RESOURCE:
            raise LimitsFileError(where, resource, "is the system level: use the system section",
                                  _line(resource, None))
        resources[str(resource)] = _limits(where, limits, _line(resource, None))
    entities: dict[str, dict[str, tuple[Limit, ...]]] = {}
    for entity_id, by_resource in _mapping(ENTITIES, data.get(ENTITIES), data).items():
        where = f"{ENTITIES}.{entity_id}"
        _check(validate_entity_id, entity_id, where)
        levels: dict[str, tuple[Limit, ...]] = {}
        for resource, limits in _mapping(where, by_resource, None, _line(entity_id, None)).items():
            at = f"{where}.{resource}"
            _check(validate_resource, resource, at)
            levels[str(resource)] = _limits(at, limits, _line(resource, None))
        entities[str(entity_id)] = levels
    return LimitsFile(system, resources, entities)


def _key(data: dict[Any, Any], name: str) -> Any:
    return next(k for k in data if k == name)


def _mapping(
    where: str, value: object, parent: dict[Any, Any] | None, line: int | None = None
) -> dict[Any, Any]:
    if value is None:
        return {}
    if parent is not None:
        line = _line(_key(parent, where), None)
    if not isinstance(value, dict):
        raise LimitsFileError(where, None, "must be a mapping", _line(value, line))
    return value


def _check(check: Callable[[object, str], object], value: object, where: str) -> None:
    try:
        check(value, where)
    except ValidationError as exc:
        raise LimitsFileError(where, value, exc.reason, _line(value, None)) from None


def _limits(where: str, value: object, line: int | None) -> tuple[Limit, ...]:
    if not isinstance(value, list) or not value:
        raise LimitsFileError(where, None, "must be a non-empty list of limits (text form)",
                              _line(value, line))
    found: dict[str, Limit] = {}
    for n, text in enumerate(value):
        at = f"{where}[{n}]"
        here = _line(text, _line(value, line))
        if not isinstance(text, str):
            raise LimitsFileError(at, text, "must be a limit in its text form", here)
        try:
            limit = Limit.parse(text)
        except ValidationError as exc:
            raise LimitsFileError(f"{at}.{exc.field}", text, exc.reason, here) from None
        if limit.name in found:
            raise LimitsFileError(at, text, f"a second limit named {limit.name!r}", here)
        found[limit.name] = limit
    return _sorted(found.values())


def _sorted(limits: Any) -> tuple[Limit, ...]:
    return tuple(sorted(limits, key=lambda x: x.name))


def load(path: str) -> LimitsFile:
    """`parse` of a file's text (`LimitsFileError`, or OSError when it cannot be read)."""
    with open(path, encoding="utf-8") as f:
        return parse(f.read())


# -- the table's limits ------------------------------------------------------------------------


async def export(limiter: RateLimiter) -> LimitsFile:
    """Every stored limit of the table (system, resources, entities) as a `LimitsFile`: one
    Query of the defaults and one Scan of the entities' limits."""
    repo = limiter.repository
    defaults = await repo.all_defaults()
    stored = await repo.list_stored_limits()
    system = defaults.pop(DEFAULT_RESOURCE, None)
    entities: dict[str, dict[str, list[Limit]]] = {}
    for item in stored:
        entities.setdefault(item.entity_id, {}).setdefault(item.resource, []).append(item.limit)
    return LimitsFile(
        None if system is None else _sorted(system),
        {r: _sorted(ls) for r, ls in sorted(defaults.items())},
        {
            e: {r: _sorted(ls) for r, ls in sorted(by.items())}
            for e, by in sorted(entities.items())
        },
    )


def dump(limits: LimitsFile) -> str:
    """The file's YAML. Entities with equal limits share one anchored mapping (a tier written
    once, `*id001` after), so an export of many keys on few tiers stays short; `parse` reads it
    back as it was."""
    tiers: dict[tuple[tuple[str, tuple[str, ...]], ...], dict[str, list[str]]] = {}
    entities: dict[str, dict[str, list[str]]] = {}
    for entity_id, by_resource in limits.entities.items():
        key = tuple((r, tuple(x.spec for x in ls)) for r, ls in sorted(by_resource.items()))
        # The same object for equal mappings: the dumper writes it once, as an anchor.
        entities[entity_id] = tiers.setdefault(key, {r: list(specs) for r, specs in key})
    data: dict[str, Any] = {}
    if limits.system is not None:
        data[SYSTEM] = [x.spec for x in limits.system]
    if limits.resources:
        data[RESOURCES] = {r: [x.spec for x in ls] for r, ls in limits.resources.items()}
    if entities:
        data[ENTITIES] = entities
    text: str = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    return text if data else "{}\n"


# -- planning and applying -------------------------------------------------------------------


async def plan(limiter: RateLimiter, wanted: LimitsFile, prune: bool = False) -> Plan:
    """What `apply` would change: each level of the file whose limits differ from the table's
    (`add`, `change`), and with `prune` each level of the table the file omits (`remove`; the
    system level only when the file has no `system` section)."""
    current = (await export(limiter)).levels()
    target = wanted.levels()
    changes: list[Change] = []
    for level in sorted(set(current) | set(target), key=_order):
        before, after = current.get(level, ()), target.get(level)
        kind, entity_id, resource = level
        if after is None:
            if prune:
                changes.append(Change("remove", kind, entity_id, resource, before, ()))
        elif not before:
            changes.append(Change("add", kind, entity_id, resource, (), after))
        elif before != after:
            changes.append(Change("change", kind, entity_id, resource, before, after))
    return Plan(tuple(changes), prune)


def _order(level: Level) -> tuple[int, str, str]:
    kind, entity_id, resource = level
    return ((SYSTEM, "resource", "entity").index(kind), entity_id or "", resource)


async def apply(
    limiter: RateLimiter,
    changes: Plan,
    principal: str | None = None,
    concurrency: int = APPLY_CONCURRENCY,
    on_done: Callable[[Change], None] | None = None,
) -> int:
    """Make every change of `changes` through the limiter's management calls (each replaces or
    deletes one level and records its audit event), `concurrency` at a time; returns how many
    were made. Idempotent: a change already made is made again to the same result, and an apply
    cut off midway is finished by planning and applying again."""
    principal = validate_principal(principal)  # before any write
    gate = asyncio.Semaphore(concurrency)

    async def make(change: Change) -> None:
        async with gate:
            await _write(limiter, change, principal)
        if on_done is not None:
            on_done(change)

    await _all([make(c) for c in changes.changes])
    return len(changes.changes)


async def _all(work: list[Awaitable[None]]) -> None:
    """Every awaitable to its end, then the first failure raised: a failed write does not
    cancel the others (each is whole), so a rerun has the least left to do."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _write(limiter: RateLimiter, change: Change, principal: str | None) -> None:
    after = list(change.after)
    if change.level == SYSTEM:
        if after:
            await limiter.set_system_defaults(after, principal)
        else:
            await limiter.delete_system_defaults(principal)
    elif change.level == "resource":
        if after:
            await limiter.set_resource_defaults(change.resource, after, principal)
        else:
            await limiter.delete_resource_defaults(change.resource, principal)
    else:
        assert change.entity_id is not None
        if after:
            await limiter.set_limits(change.entity_id, after, change.resource,
                                     principal=principal)
        else:
            await limiter.delete_limits(change.entity_id, change.resource, principal=principal)

