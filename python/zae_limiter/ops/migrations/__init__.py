"""Schema migrations: ordered, recorded in the version record, never silently half-applied.

A `Migration` brings the table from the previous schema version to `version` (`migrate`) and,
when `reversible`, back (`rollback`). Both are async callables taking the storage
(`AdminStorage`; `Repository` on DynamoDB), and both must be idempotent (a step interrupted and
re-run must end in the same state) and must keep the data plane working for clients of the same
major schema version while they run, since traffic does not stop.

`apply(repo, to_version)` runs the steps between the table's `schema_version` and `to_version` in
order. Before a step it writes `migration_state` ("in progress: ...") into the version record;
after it, the new `schema_version`, an entry in `migration_log` (JSON list) and an empty state.
When a step fails, its own undo runs (the rollback of a forward step, the migrate of a backward
one); if that is impossible or fails too, `migration_state` keeps saying "half-migrated: restore
from backup <backup>" and `MigrationError` says the same: a table is never silently half-migrated,
and `apply` refuses to run on it until the state is cleared (`force=True` after a restore).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ...core.units import iso_utc
from ...exceptions import ZAELimiterError
from ...version import compare, parse

if TYPE_CHECKING:
    from ...storage.protocol import AdminStorage

log = logging.getLogger("zae_limiter.migrations")

__all__ = [
    "BASE_VERSION",
    "Migration",
    "MigrationError",
    "MigrationReport",
    "Step",
    "apply",
    "get_migrations",
    "register",
    "select",
]

# The schema every table starts with (tables created before version records existed included).
BASE_VERSION = "1.0.0"
MIGRATION_LOG = "migration_log"
MIGRATION_STATE = "migration_state"
_LOG_KEEP = 50

MigrationFn = Callable[["AdminStorage"], Awaitable[None]]
Direction = Literal["forward", "backward"]


class MigrationError(ZAELimiterError):
    """A migration could not be selected or applied; the message says the table's state."""

    def __init__(self, message: str, *, half_migrated: bool = False) -> None:
        super().__init__(message)
        self.half_migrated = half_migrated


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    description: str
    reversible: bool
    migrate: MigrationFn
    rollback: MigrationFn | None = None

    def __post_init__(self) -> None:
        parse(self.version)
        if self.reversible and self.rollback is None:
            raise ValueError(f"migration {self.version} is reversible but has no rollback")


@dataclass(frozen=True, slots=True)
class Step:
    migration: Migration
    direction: Direction
    from_version: str
    to_version: str

    @property
    def run(self) -> MigrationFn:
        if self.direction == "forward":
            return self.migration.migrate
        assert self.migration.rollback is not None
        return self.migration.rollback

    @property
    def undo(self) -> MigrationFn | None:
        """What puts the table back as it was before this step, if anything can."""
        if self.direction == "backward":
            return self.migration.migrate
        return self.migration.rollback if self.migration.reversible else None

    def describe(self) -> str:
        verb = "migrate" if self.direction == "forward" else "roll back"
        return f"{verb} {self.from_version} -> {self.to_version}: {self.migration.description}" + (
            "" if self.migration.reversible else " (NOT reversible)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.migration.version,
            "direction": self.direction,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "description": self.migration.description,
            "reversible": self.migration.reversible,
        }


@dataclass
class MigrationReport:
    from_version: str
    to_version: str
    dry_run: bool
    steps: list[Step]
    applied: list[Step] = field(default_factory=list)
    backup: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "from_version": self.from_version,
            "to_version": self.to_version,
            "dry_run": self.dry_run,
            "backup": self.backup,
            "planned": [s.as_dict() for s in self.steps],
            "applied": [s.as_dict() for s in self.applied],
        }


_REGISTRY: list[Migration] = []


def register(migration: Migration) -> Migration:
    if any(m.version == migration.version for m in _REGISTRY):
        raise ValueError(f"a migration to {migration.version} is already registered")
    _REGISTRY.append(migration)
    return migration


def get_migrations() -> list[Migration]:
    """Every known migration, oldest first."""
    return sorted(_REGISTRY, key=lambda m: parse(m.version))


def known_versions(migrations: Sequence[Migration] | None = None) -> list[str]:
    ordered = sorted(migrations or get_migrations(), key=lambda m: parse(m.version))
    return [BASE_VERSION, *(m.version for m in ordered)]


def select(
    from_version: str, to_version: str, migrations: Sequence[Migration] | None = None
) -> list[Step]:
    """The steps from one schema version to another, in the order they must run.

    Forward: every migration with from < version <= to, oldest first. Backward: every migration
    with to < version <= from, newest first; each must be reversible.
    """
    ordered = sorted(
        get_migrations() if migrations is None else migrations, key=lambda m: parse(m.version)
    )
    versions = [BASE_VERSION, *(m.version for m in ordered)]
    for version in (from_version, to_version):
        if not any(compare(version, v) == 0 for v in versions):
            raise MigrationError(f"unknown schema version {version}; known: {', '.join(versions)}")
    previous = dict(zip((m.version for m in ordered), versions, strict=False))
    if compare(to_version, from_version) >= 0:
        return [
            Step(m, "forward", previous[m.version], m.version)
            for m in ordered
            if compare(from_version, m.version) < 0 <= compare(to_version, m.version)
        ]
    steps = [
        Step(m, "backward", m.version, previous[m.version])
        for m in reversed(ordered)
        if compare(to_version, m.version) < 0 <= compare(from_version, m.version)
    ]
    irreversible = [s.migration.version for s in steps if not s.migration.reversible]
    if irreversible:
        raise MigrationError(
            f"migration {', '.join(irreversible)} cannot be rolled back: restore the backup taken "
            f"before it (see `zae-limiter restore --help`)"
        )
    return steps


def _now() -> str:
    return iso_utc(timespec="seconds")


def _log_entry(step: Step, result: str, **extra: str) -> dict[str, str]:
    return {
        "at": _now(),
        "version": step.migration.version,
        "direction": step.direction,
        "from": step.from_version,
        "to": step.to_version,
        "result": result,
        **extra,
    }


async def _append_log(
    repo: AdminStorage,
    record: dict[str, Any],
    entry: dict[str, str],
    updated_by: str,
    **fields: str,
) -> None:
    try:
        history = json.loads(str(record.get(MIGRATION_LOG) or "[]"))
        if not isinstance(history, list):
            history = []
    except ValueError:
        history = []
    history = [*history, entry][-_LOG_KEEP:]
    record[MIGRATION_LOG] = json.dumps(history)
    await repo.set_version_record(
        updated_by=updated_by, **{MIGRATION_LOG: record[MIGRATION_LOG]}, **fields
    )


async def current_version(repo: AdminStorage) -> tuple[str, dict[str, Any]]:
    record = await repo.get_version_record() or {}
    return str(record.get("schema_version") or BASE_VERSION), record


async def apply(
    repo: AdminStorage,
    to_version: str,
    dry_run: bool = False,
    *,
    backup: str | None = None,
    migrations: Sequence[Migration] | None = None,
    updated_by: str = "zae-limiter migrate",
    force: bool = False,
    on_step: Callable[[Step], None] | None = None,
) -> MigrationReport:
    """Migrate the table to `to_version` (forward or back), one recorded step at a time."""
    from_version, record = await current_version(repo)
    state = str(record.get(MIGRATION_STATE) or "")
    if state and not force:
        raise MigrationError(
            f"the version record says the table is not in a clean state ({state}); restore the "
            "backup it names, then re-run with --force",
            half_migrated=state.startswith("half-migrated"),
        )
    steps = select(from_version, to_version, migrations)
    report = MigrationReport(from_version, to_version, dry_run, steps, backup=backup)
    if dry_run or not steps:
        return report
    where = f"backup {backup}" if backup else "a backup taken before the migration"
    for step in steps:
        if on_step is not None:
            on_step(step)
        await repo.set_version_record(
            updated_by=updated_by,
            **{MIGRATION_STATE: f"in progress: {step.describe()} ({where})"},
        )
        try:
            await step.run(repo)
        except Exception as exc:
            await _fail(repo, record, step, exc, where, updated_by)
            raise AssertionError("unreachable") from exc  # _fail always raises
        await _append_log(
            repo,
            record,
            _log_entry(step, "applied", **({"backup": backup} if backup else {})),
            updated_by,
            schema_version=step.to_version,
            **{MIGRATION_STATE: ""},
        )
        report.applied.append(step)
        log.info("schema migration applied: %s", step.describe())
    return report


async def _fail(
    repo: AdminStorage,
    record: dict[str, Any],
    step: Step,
    exc: Exception,
    where: str,
    updated_by: str,
) -> None:
    reason = f"{type(exc).__name__}: {exc}"
    undo = step.undo
    undo_error: Exception | None = None
    if undo is not None:
        try:
            await undo(repo)
        except Exception as second:  # the state below reports it; the first error is the cause
            undo_error = second
        else:
            await _append_log(
                repo,
                record,
                _log_entry(step, "failed, undone", error=reason),
                updated_by,
                **{MIGRATION_STATE: ""},
            )
            raise MigrationError(
                f"{step.describe()} failed ({reason}); it was undone: the table is unchanged at "
                f"schema {step.from_version}"
            ) from exc
    detail = "it is not reversible" if undo_error is None else f"undoing it failed: {undo_error}"
    message = (
        f"half-migrated: {step.describe()} failed ({reason}) and {detail}; restore from {where} "
        f"(schema {step.from_version})"
    )
    try:
        await _append_log(
            repo,
            record,
            _log_entry(step, "failed, half-migrated", error=reason),
            updated_by,
            **{MIGRATION_STATE: message},
        )
    except Exception:  # the table may be unreachable; the exception still tells the operator
        log.exception("could not record the failed migration in the version record")
    raise MigrationError(message, half_migrated=True) from exc


def _load_builtin() -> None:
    from . import v1_1_0, v1_2_0

    register(v1_1_0.MIGRATION)
    register(v1_2_0.MIGRATION)


_load_builtin()
