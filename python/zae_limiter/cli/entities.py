"""`entity create | show | delete | children | verify`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from .. import audit, schema
from ..exceptions import EntityNotFoundError, ZAELimiterError
from ..models import Entity, Limit
from ..validation import validate_principal
from . import main
from .toolkit import (
    EXIT_FAILED,
    Output,
    Target,
    confirm,
    fields_table,
    key_values,
    rows_table,
    target_options,
)

if TYPE_CHECKING:
    from ..limiter import RateLimiter
    from ..storage.dynamodb.repository import Repository

PRINCIPAL_HELP = "Who makes the change, recorded in the audit trail (e.g. a user or an IAM ARN)."


@main.group()
def entity() -> None:
    """Create, inspect, delete and verify entities."""


def entity_dict(e: Entity) -> dict[str, Any]:
    return {
        "entity_id": e.id,
        "name": e.name,
        "parent_id": e.parent_id,
        "metadata": dict(e.metadata),
        "created_at": e.created_at,
    }


@entity.command("create")
@target_options()
@click.argument("entity_id")
@click.option("--parent", "parent_id", default=None, help="Parent entity (for cascade).")
@click.option("--display-name", default=None, help="Human-readable name.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Metadata (repeatable).")
@click.option("--principal", default=None, help=PRINCIPAL_HELP)
def entity_create(
    target: Target,
    out: Output,
    entity_id: str,
    parent_id: str | None,
    display_name: str | None,
    meta: tuple[str, ...],
    principal: str | None,
) -> None:
    """Create an entity (the parent must exist); recorded in its audit trail."""
    metadata = key_values(meta, "--meta")
    created = target.run_limiter(
        lambda lim: lim.create_entity(
            entity_id, display_name, parent_id, metadata, principal=principal
        )
    )
    data = entity_dict(created)
    out.show(data, fields_table(f"entity {entity_id} created", data))


@entity.command("show")
@target_options()
@click.argument("entity_id")
def entity_show(target: Target, out: Output, entity_id: str) -> None:
    """An entity's metadata, parent, stored limits and bucket resources."""

    async def work(lim: RateLimiter) -> dict[str, Any]:
        found = await lim.get_entity(entity_id)
        if found is None:
            raise EntityNotFoundError(entity_id)
        limits = await lim.repository.get_all_limits(entity_id)
        buckets = await lim.repository.list_buckets(entity_id)
        return entity_dict(found) | {
            "limits": {r: [x.spec for x in ls] for r, ls in sorted(limits.items())},
            "bucket_resources": sorted(b.resource for b in buckets),
        }

    data = target.run_limiter(work)
    out.show(data, fields_table(f"entity {entity_id}", data))


@entity.command("delete")
@target_options()
@click.argument("entity_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--principal", default=None, help=PRINCIPAL_HELP)
def entity_delete(
    target: Target, out: Output, entity_id: str, yes: bool, principal: str | None
) -> None:
    """Delete an entity with its buckets, stored limits and usage snapshots (its audit trail is
    kept, and records the deletion)."""
    principal = validate_principal(principal)
    confirm(yes, f"Delete entity {entity_id} and all its items from {target.table}?")

    async def work(repo: Repository) -> int:
        count = await repo.delete_entity(entity_id)
        await audit.record(repo, audit.entity_deleted(entity_id, principal, count))
        return count

    count = target.run(work)
    out.show(
        {"entity_id": entity_id, "deleted_items": count},
        f"entity {entity_id} deleted ({count} items)",
    )


@entity.command("children")
@target_options()
@click.argument("parent_id")
def entity_children(target: Target, out: Output, parent_id: str) -> None:
    """The entities whose parent is PARENT_ID."""
    children = target.run_limiter(lambda lim: lim.get_children(parent_id))
    rows = [entity_dict(c) for c in sorted(children, key=lambda c: c.id)]
    columns = ["entity_id", "name", "created_at"]
    out.show(rows, rows_table(f"children of {parent_id}", columns, rows))


@entity.command("verify")
@target_options()
@click.argument("entity_id")
@click.option("--resource", default=None, help="Also probe this resource (default: stored ones).")
def entity_verify(target: Target, out: Output, entity_id: str, resource: str | None) -> None:
    """Check an entity end to end: exists, parent exists, limits readable, `available()` works.

    Exit 0 when every check passes, 1 otherwise.
    """

    async def work(lim: RateLimiter) -> list[dict[str, Any]]:
        checks: list[dict[str, Any]] = []

        def record(check: str, ok: bool, detail: str) -> None:
            checks.append({"check": check, "ok": ok, "detail": detail})

        found = await lim.get_entity(entity_id)
        record("entity exists", found is not None, "found" if found else "no #META item")
        if found is None:
            return checks
        if found.parent_id is None:
            record("parent exists", True, "no parent (cascade has nothing to add)")
        else:
            parent = await lim.get_entity(found.parent_id)
            record(
                "parent exists",
                parent is not None,
                found.parent_id if parent else f"{found.parent_id} is missing: cascade fails",
            )
        stored: dict[str, list[Limit]] = {}
        try:
            stored = await lim.repository.get_all_limits(entity_id)
            count = sum(len(v) for v in stored.values())
            record("limits readable", True, f"{count} stored limit(s)")
        except ZAELimiterError as exc:
            record("limits readable", False, str(exc))
        probes = [resource] if resource else sorted(stored) or ["health-check"]
        for res in probes:
            try:
                if stored.get(res) or stored.get(schema.DEFAULT_RESOURCE):
                    got = await lim.available(entity_id, res, None, use_stored_limits=True)
                else:
                    got = await lim.available(entity_id, res, [Limit.per_minute("probe", 1000)])
                record(f"available({res})", True, ", ".join(f"{k}={v}" for k, v in got.items()))
            except ZAELimiterError as exc:
                record(f"available({res})", False, str(exc))
        return checks

    checks = target.run_limiter(work)
    ok = all(c["ok"] for c in checks)
    rows = [c | {"ok": "ok" if c["ok"] else "FAILED"} for c in checks]
    out.show(
        {"entity_id": entity_id, "ok": ok, "checks": checks},
        rows_table(f"verify {entity_id}", ["check", "ok", "detail"], rows),
    )
    if not ok:
        raise click.exceptions.Exit(EXIT_FAILED)
