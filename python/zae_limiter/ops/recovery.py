"""Operator functions behind `zae-limiter` recovery commands: inspection, backups, restores.

Kept apart from the click commands (`zae_limiter.cli`) so scripts and other commands (e.g.
`status`) can call them. Everything here reads and writes through storage (`AdminStorage`,
`Repository` on DynamoDB); no request is built here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import schema
from ..core import units
from ..core.units import iso_utc
from ..engine import quota, stored
from ..exceptions import ZAELimiterError
from ..models import Limit
from ..storage.protocol import Item, LimitState

if TYPE_CHECKING:
    from ..storage.protocol import AdminStorage, Backup

EXPORT_FORMAT = "zae-limiter-export/1"
DEFAULT_BACKUP_DIR = "./zae-limiter-backups"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime | None = None) -> str:
    return (moment or _utcnow()).strftime("%Y%m%d-%H%M%S")


def iso_ms(ms: int | None) -> str | None:
    return None if ms is None else iso_utc(ms)


# -- buckets ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitRow:
    """One limit of a bucket item as stored, with what the core says is available now."""

    entity_id: str
    resource: str
    limit: str
    definition: str | None
    full_at: str | None  # when the bucket is full again (ISO-8601), None when full or unknown
    available: float | None
    burst: int | None
    consumed: float
    released: float
    state: str  # "ok" | "1.x layout" | "reset (full)" | "no definition"

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity_id": self.entity_id,
            "resource": self.resource,
            "limit": self.limit,
            "definition": self.definition,
            "full_at": self.full_at,
            "available": self.available,
            "burst": self.burst,
            "consumed": self.consumed,
            "released": self.released,
            "state": self.state,
        }


def limit_rows(item: Item, now_ms: int) -> list[LimitRow]:
    """Per-limit rows of a raw bucket item. Unlike the data plane's reader this keeps limits
    whose state was reset (their counters survive a reset, and operators want to see them)."""
    fields: dict[str, dict[str, Any]] = {}
    for attr, value in item.items():
        parsed = schema.parse_limit_attr(attr)
        if parsed is not None:
            fields.setdefault(parsed[1], {})[parsed[0]] = next(iter(value.values()))
    entity_id = schema.entity_id_from_pk(str(item[schema.PK]["S"]))
    resource = schema.resource_from_bucket_sk(str(item[schema.SK]["S"]))
    rows: list[LimitRow] = []
    for name in sorted(fields):
        attrs = fields[name]
        level = None if schema.FULL_AT not in attrs else int(attrs[schema.FULL_AT])
        legacy = None
        if level is None and schema.TOKENS in attrs and schema.LAST_REFILL in attrs:
            legacy = int(attrs[schema.TOKENS]), int(attrs[schema.LAST_REFILL])
        definition = attrs.get(schema.LIMIT_DEF)
        available: float | None = None
        burst: int | None = None
        full: str | None = None
        state = "ok" if level is not None else "1.x layout" if legacy else "reset (full)"
        if definition is None:
            state = "no definition"
        else:
            limit = Limit.decode(str(definition), name)
            burst = limit.burst
            limit_state = None
            window = attrs.get(schema.QUOTA_WINDOW)
            if level is not None or legacy is not None:
                limit_state = LimitState(
                    level,
                    definition=str(definition),
                    legacy=legacy,
                    window=None if window is None else int(window),
                )
            if limit.is_quota:
                # `fa#` of a quota is what its window used, not an instant (engine.quota).
                available = units.tokens_exact(quota.available(limit, limit_state, now_ms))
                due = None if limit_state is None else quota.full_ms(limit, limit_state, now_ms)
            else:
                available = units.tokens_exact(stored.available(limit, limit_state, now_ms))
                due = None if limit_state is None else stored.full_ms(limit_state, limit, now_ms)
            full = iso_ms(due) if due is not None and due > now_ms else None
        rows.append(
            LimitRow(
                entity_id=entity_id,
                resource=resource,
                limit=name,
                definition=None if definition is None else str(definition),
                full_at=full,
                available=available,
                burst=burst,
                consumed=units.tokens_exact(int(attrs.get(schema.CONSUMED, 0))),
                released=units.tokens_exact(int(attrs.get(schema.RELEASED, 0))),
                state=state,
            )
        )
    return rows


async def bucket_items(
    repo: AdminStorage, entity_id: str, resource: str | None = None
) -> list[Item]:
    """The entity's bucket items as stored (of `resource` only, if given)."""
    return await repo.bucket_items(entity_id, resource)


async def reset_buckets(
    repo: AdminStorage,
    entity_id: str,
    resource: str | None = None,
    limits: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Reset one limit, one resource's bucket, or every bucket of the entity; returns what was
    reset. The bucket state is forgotten (full again), consumption counters are kept."""
    names = list(limits) if limits is not None else None
    if names and resource is None:
        raise ZAELimiterError("resetting single limits needs the resource they belong to")
    resources = (
        [resource]
        if resource is not None
        else [b.resource for b in await repo.list_buckets(entity_id)]
    )
    done: list[dict[str, Any]] = []
    for res in resources:
        if await repo.reset_bucket(entity_id, res, names):
            done.append({"entity_id": entity_id, "resource": res, "limits": names or "all"})
    return done


# -- backups ----------------------------------------------------------------------------------


def export_path(directory: Path, table: str, label: str = "backup") -> Path:
    base = directory / f"{table}-{label}-{_stamp()}"
    path = Path(f"{base}.json")  # not with_suffix: labels may contain dots ("1.1.0")
    n = 1
    while path.exists():  # two exports in one second must not overwrite each other
        path = Path(f"{base}-{n}.json")
        n += 1
    return path


async def export_table(
    repo: AdminStorage, directory: Path | str = DEFAULT_BACKUP_DIR, label: str = "backup"
) -> dict[str, Any]:
    """Write every item of the table to a JSON file in `directory`; returns its summary."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = await repo.export_items()
    record = await repo.get_version_record() or {}
    path = export_path(directory, repo.table_name, label)
    exported_at = iso_utc(_utcnow(), "seconds")
    document = {
        "format": EXPORT_FORMAT,
        "table": repo.table_name,
        "exported_at": exported_at,
        "schema_version": record.get("schema_version"),
        "item_count": len(items),
        "items": items,
    }
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(document, sort_keys=True))
    tmp.replace(path)  # a crash mid-write must not leave a truncated backup that looks whole
    return {
        "kind": "export",
        "id": str(path),
        "table": repo.table_name,
        "created": exported_at,
        "items": len(items),
        "schema_version": record.get("schema_version"),
    }


def read_export(path: Path | str) -> dict[str, Any]:
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ZAELimiterError(f"cannot read export {path}: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise ZAELimiterError(f"{path} is not a zae-limiter export ({EXPORT_FORMAT})")
    return document


def list_exports(directory: Path | str, table: str | None = None) -> list[dict[str, Any]]:
    """Exports in `directory` (of `table` if given), newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found: list[dict[str, Any]] = []
    for path in directory.glob("*.json"):
        try:
            document = read_export(path)
        except ZAELimiterError:
            continue
        if table is not None and document.get("table") != table:
            continue
        found.append(
            {
                "kind": "export",
                "id": str(path),
                "table": document.get("table"),
                "created": document.get("exported_at"),
                "items": document.get("item_count"),
                "schema_version": document.get("schema_version"),
            }
        )
    return sorted(found, key=lambda e: (str(e["created"]), e["id"]), reverse=True)


async def import_table(repo: AdminStorage, path: Path | str) -> dict[str, Any]:
    """Make the table hold exactly the items of an export (items not in it are deleted)."""
    document = read_export(path)
    items: list[Item] = list(document.get("items") or [])
    deleted = await repo.replace_items(items)
    return {
        "table": repo.table_name,
        "source": str(path),
        "source_table": document.get("table"),
        "restored_items": len(items),
        "deleted_items": deleted,
        "schema_version": document.get("schema_version"),
    }


def _backup_summary(taken: Backup) -> dict[str, Any]:
    return {
        "kind": "aws-backup",
        "id": taken.id,
        "name": taken.name,
        "table": taken.table,
        "status": taken.status,
        "created": taken.created,
    }


async def create_backup(repo: AdminStorage, backup_name: str | None = None) -> dict[str, Any]:
    """An on-demand DynamoDB backup (AWS); returns its summary."""
    taken = await repo.create_backup(backup_name or f"{repo.table_name}-manual-{_stamp()}")
    return _backup_summary(taken)


async def list_backups(repo: AdminStorage) -> list[dict[str, Any]]:
    return [
        _backup_summary(b) | {"size_bytes": b.size_bytes} for b in await repo.list_backups()
    ]


async def backup(
    repo: AdminStorage,
    *,
    local: bool,
    backup_dir: Path | str = DEFAULT_BACKUP_DIR,
    label: str = "backup",
) -> dict[str, Any]:
    """On AWS an on-demand backup; on a local endpoint (no backups there) a JSON export."""
    if local:
        return await export_table(repo, backup_dir, label)
    return await create_backup(repo, f"{repo.table_name}-{label}-{_stamp()}")


def restore_hints(name: str, region: str, backup_arn: str | None = None) -> list[str]:
    """The AWS commands that restore the table; DynamoDB restores into a new table only."""
    table = schema.table_name(name)
    target = f"{table}-restored"
    arn = backup_arn or "<backup-arn>"
    return [
        f"# on-demand backups of {table}: zae-limiter backup list --name {name} --region {region}",
        f"aws dynamodb restore-table-from-backup --region {region} "
        f"--target-table-name {target} --backup-arn {arn}",
        "# point-in-time recovery (PITR): check it is on, then restore to a moment",
        f"aws dynamodb describe-continuous-backups --region {region} --table-name {table}",
        f"aws dynamodb restore-table-to-point-in-time --region {region} "
        f"--source-table-name {table} --target-table-name {target} "
        f'--restore-date-time "<YYYY-MM-DDTHH:MM:SSZ>"',
        f"# when {target} is ACTIVE, clients can use it as name "
        f"'{schema.short_name(target)}'; to serve it as {table} again, delete {table} "
        f"(deletion protection off) and restore with --target-table-name {table}",
    ]


# -- versions ---------------------------------------------------------------------------------


async def version_status_async(repo: AdminStorage) -> dict[str, Any]:
    from ..version import version_info

    return await version_info(repo)


def version_status(
    name: str, region: str | None = None, endpoint_url: str | None = None
) -> dict[str, Any]:
    """The version part of a deployment's status (blocking; for `zae-limiter status`).

    Keys: client_version, client_schema_version, schema_version, lambda_version,
    min_client_version, updated_at, updated_by, migration_state, record_exists, compatible,
    reason, can_auto_update.
    """
    from ..storage.dynamodb.repository import Repository

    async def go() -> dict[str, Any]:
        async with Repository(schema.table_name(name), region, endpoint_url) as repo:
            return await version_status_async(repo)

    return asyncio.run(go())
