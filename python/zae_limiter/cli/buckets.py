"""`bucket show | reset`: an entity's token buckets as stored, and resetting them to full."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

from ..exceptions import EntityNotFoundError
from ..ops import recovery as ops
from . import main
from .toolkit import Output, Target, confirm, fmt_num, rows_table, target_options

if TYPE_CHECKING:
    from ..storage.dynamodb.repository import Repository

BUCKET_COLUMNS = [
    "resource",
    "limit",
    "definition",
    "full_at",
    "available",
    "burst",
    "consumed",
    "released",
    "state",
]
NUMBERS = ("available", "consumed", "released")


@main.group()
def bucket() -> None:
    """Inspect and reset an entity's token buckets."""


@bucket.command("show")
@target_options()
@click.argument("entity_id")
@click.option("--resource", default=None, help="Only this resource's bucket item.")
def bucket_show(target: Target, out: Output, entity_id: str, resource: str | None) -> None:
    """Every limit of the entity's bucket item(s): when it is full again, available now
    (computed by the core from the definition stored in `lm#<limit>`), consumed and released.

    Exit 1 when the entity has neither buckets nor an entity record.
    """

    async def work(repo: Repository) -> list[Any]:
        items = await ops.bucket_items(repo, entity_id, resource)
        # Buckets may exist without an entity record (acquire does not need one); an id with
        # neither is a mistyped or deleted entity, which must not look like an idle one.
        if not items and await repo.get_entity(entity_id) is None:
            raise EntityNotFoundError(entity_id)
        return items

    items = target.run(work)
    now = time.time_ns() // 1_000_000
    rows = [row.as_dict() for item in items for row in ops.limit_rows(item, now)]
    display = [r | {k: fmt_num(r[k]) for k in NUMBERS} for r in rows]
    out.show(
        {"entity_id": entity_id, "now": ops.iso_ms(now), "limits": rows},
        rows_table(
            f"buckets of {entity_id} at {ops.iso_ms(now)}", BUCKET_COLUMNS, display, right=NUMBERS
        )
        if rows
        else f"no buckets for {entity_id}" + (f"/{resource}" if resource else ""),
    )


@bucket.command("reset")
@target_options()
@click.argument("entity_id")
@click.option("--resource", default=None, help="Only this resource (default: every bucket).")
@click.option(
    "--limit",
    "limit_names",
    multiple=True,
    metavar="NAME",
    help="Only this limit of --resource (repeatable).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def bucket_reset(
    target: Target,
    out: Output,
    entity_id: str,
    resource: str | None,
    limit_names: tuple[str, ...],
    yes: bool,
) -> None:
    """Reset buckets to full: one limit (--resource and --limit), one resource, or all.

    Consumption counters are kept (usage history stays right).
    """
    if limit_names and resource is None:
        raise click.UsageError("--limit needs --resource (a limit lives in one resource's bucket)")
    scope = (
        f"limit(s) {', '.join(limit_names)} of {entity_id}/{resource}"
        if limit_names
        else f"bucket {entity_id}/{resource}"
        if resource
        else f"every bucket of {entity_id}"
    )
    confirm(yes, f"Reset {scope} to full?")
    done = target.run(
        lambda repo: ops.reset_buckets(repo, entity_id, resource, list(limit_names) or None)
    )
    lines = [
        f"reset {entity_id}/{entry['resource']}: "
        + (entry["limits"] if entry["limits"] == "all" else ", ".join(entry["limits"]))
        for entry in done
    ] or [f"nothing to reset: no bucket for {entity_id}" + (f"/{resource}" if resource else "")]
    out.show({"entity_id": entity_id, "reset": done}, *lines)
