"""`limits`: stored limits (used with use_stored_limits=True) at every level.

`set | get | delete` an entity's; `set-resource | get-resource | delete-resource |
list-resources` a resource's defaults; `set-system | get-system | delete-system` the system
defaults; `show` what an acquire resolves and from which level. `--limit` takes the text form
of a limit (`Limit.parse`); output shows it back (`Limit.spec`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import click

from .. import audit, schema
from ..exceptions import ValidationError
from ..models import LIMIT_SYNTAX, Limit
from ..validation import validate_principal
from . import main
from .entities import PRINCIPAL_HELP
from .toolkit import Output, Target, confirm, rows_table, target_options

if TYPE_CHECKING:
    from ..limiter import RateLimiter
    from ..storage.dynamodb.repository import Repository


class LimitParam(click.ParamType[Limit, Any]):
    """A `--limit` value: a `Limit` in its text form; bad text is a usage error (exit 2)."""

    name = "limit"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Limit:
        if isinstance(value, Limit):
            return value
        try:
            return Limit.parse(value)
        except ValidationError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


def limit_dict(limit: Limit) -> dict[str, Any]:
    return limit.to_dict() | {"spec": limit.spec}


LIMIT_COLUMNS = ["name", "capacity", "burst", "refill_amount", "refill_period_seconds", "spec"]


@main.group()
def limits() -> None:
    """Stored limits (used with use_stored_limits=True): an entity's own for a resource, its
    _default_, a resource's defaults, the system defaults; the most specific level wins."""


LIMIT_OPTION = click.option(
    "--limit",
    "parsed",
    multiple=True,
    required=True,
    metavar="SPEC",
    type=LimitParam(),
    help=f"Repeatable. {LIMIT_SYNTAX}.",
)


@limits.command("set")
@target_options()
@click.argument("entity_id")
@click.option(
    "--resource",
    default=schema.DEFAULT_RESOURCE,
    show_default=True,
    help="Resource the limits apply to (_default_: every resource without its own).",
)
@click.option(
    "--limit",
    "parsed",
    multiple=True,
    required=True,
    metavar="SPEC",
    type=LimitParam(),
    help=f"Repeatable. {LIMIT_SYNTAX}.",
)
@click.option("--principal", default=None, help=PRINCIPAL_HELP)
def limits_set(
    target: Target,
    out: Output,
    entity_id: str,
    resource: str,
    parsed: tuple[Limit, ...],
    principal: str | None,
) -> None:
    """Replace the stored limits of (ENTITY_ID, --resource) with the given ones (recorded in the
    entity's audit trail)."""
    target.run_limiter(
        lambda lim: lim.set_limits(entity_id, list(parsed), resource, principal=principal)
    )
    out.show(
        {"entity_id": entity_id, "resource": resource, "limits": [limit_dict(x) for x in parsed]},
        f"stored for {entity_id}/{resource}: " + ", ".join(x.spec for x in parsed),
    )


@limits.command("get")
@target_options()
@click.argument("entity_id")
@click.option("--resource", default=None, help="Only this resource (default: all).")
def limits_get(target: Target, out: Output, entity_id: str, resource: str | None) -> None:
    """The stored limits of ENTITY_ID, by resource."""

    async def work(lim: RateLimiter) -> dict[str, list[Limit]]:
        if resource is not None:
            return {resource: await lim.get_limits(entity_id, resource)}
        return await lim.repository.get_all_limits(entity_id)

    found = target.run_limiter(work)
    rows = [{"resource": res, **limit_dict(x)} for res, ls in sorted(found.items()) for x in ls]
    out.show(
        {"entity_id": entity_id, "limits": rows},
        rows_table(f"stored limits of {entity_id}", ["resource", *LIMIT_COLUMNS], rows),
    )


@limits.command("delete")
@target_options()
@click.argument("entity_id")
@click.option("--resource", default=schema.DEFAULT_RESOURCE, show_default=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--principal", default=None, help=PRINCIPAL_HELP)
def limits_delete(
    target: Target, out: Output, entity_id: str, resource: str, yes: bool, principal: str | None
) -> None:
    """Delete the stored limits of (ENTITY_ID, --resource) (recorded in the audit trail)."""
    principal = validate_principal(principal)
    confirm(yes, f"Delete the stored limits of {entity_id}/{resource}?")

    async def work(repo: Repository) -> int:
        count = await repo.delete_limits(entity_id, resource)
        await audit.record(repo, audit.limits_deleted(entity_id, resource, principal, count))
        return count

    count = target.run(work)
    out.show(
        {"entity_id": entity_id, "resource": resource, "deleted": count},
        f"deleted {count} stored limit(s) of {entity_id}/{resource}",
    )


# -- resource and system defaults -----------------------------------------------------------------


def _shown(title: str, limits: list[Limit]) -> Any:
    return rows_table(title, LIMIT_COLUMNS, [limit_dict(x) for x in limits])


@limits.command("set-resource")
@target_options()
@click.argument("resource")
@LIMIT_OPTION
@click.option("--principal", default=None, help=PRINCIPAL_HELP)
def limits_set_resource(
    target: Target, out: Output, resource: str, parsed: tuple[Limit, ...], principal: str | None
) -> None:
    """Replace the default limits of RESOURCE: for every entity with none of its own for it
    (nor a _default_). Recorded in the audit trail $RESOURCE:RESOURCE."""
    target.run_limiter(lambda lim: lim.set_resource_defaults(resource, list(parsed), principal))
    out.show(
        {"resource": resource, "limits": [limit_dict(x) for x in parsed]},
        f"defaults of {resource}: " + ", ".join(x.spec for x in parsed),
    )


@limits.command("get-resource")
@target_options()
@click.argument("resource")
def limits_get_resource(target: Target, out: Output, resource: str) -> None:
    """The default limits of RESOURCE."""
    found = target.run_limiter(lambda lim: lim.get_resource_defaults(resource))
    out.show(
        {"resource": resource, "limits": [limit_dict(x) for x in found]},
        _shown(f"defaults of {resource}", found),
    )


@limits.command("delete-resource")
@target_options()
@click.argument("resource")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--principal", default=None, help=PRINCIPAL_HELP)
def limits_delete_resource(
    target: Target, out: Output, resource: str, yes: bool, principal: str | None
) -> None:
    """Delete the default limits of RESOURCE (recorded in the audit trail)."""
    principal = validate_principal(principal)
    confirm(yes, f"Delete the default limits of {resource}?")
    target.run_limiter(lambda lim: lim.delete_resource_defaults(resource, principal))
    out.show({"resource": resource, "deleted": True}, f"deleted the defaults of {resource}")


@limits.command("list-resources")
@target_options()
def limits_list_resources(target: Target, out: Output) -> None:
    """Every resource with default limits."""
    found = target.run_limiter(lambda lim: lim.list_resource_defaults())
    rows = [{"resource": res, **limit_dict(x)} for res, ls in found.items() for x in ls]
    out.show(
        {"resources": rows},
        rows_table("resource defaults", ["resource", *LIMIT_COLUMNS], rows),
    )


@limits.command("set-system")
@target_options()
@LIMIT_OPTION
@click.option("--principal", default=None, help=PRINCIPAL_HELP)
def limits_set_system(
    target: Target, out: Output, parsed: tuple[Limit, ...], principal: str | None
) -> None:
    """Replace the system default limits: for every resource without defaults of its own.
    Recorded in the audit trail $SYSTEM."""
    target.run_limiter(lambda lim: lim.set_system_defaults(list(parsed), principal))
    out.show(
        {"limits": [limit_dict(x) for x in parsed]},
        "system defaults: " + ", ".join(x.spec for x in parsed),
    )


@limits.command("get-system")
@target_options()
def limits_get_system(target: Target, out: Output) -> None:
    """The system default limits."""
    found = target.run_limiter(lambda lim: lim.get_system_defaults())
    out.show({"limits": [limit_dict(x) for x in found]}, _shown("system defaults", found))


@limits.command("delete-system")
@target_options()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--principal", default=None, help=PRINCIPAL_HELP)
def limits_delete_system(target: Target, out: Output, yes: bool, principal: str | None) -> None:
    """Delete the system default limits (recorded in the audit trail $SYSTEM)."""
    principal = validate_principal(principal)
    confirm(yes, "Delete the system default limits?")
    target.run_limiter(lambda lim: lim.delete_system_defaults(principal))
    out.show({"deleted": True}, "deleted the system defaults")


@limits.command("show")
@target_options()
@click.argument("entity_id")
@click.argument("resource")
def limits_show(target: Target, out: Output, entity_id: str, resource: str) -> None:
    """The limits use_stored_limits=True resolves for (ENTITY_ID, RESOURCE), each with the level
    it comes from (entity, entity default, resource, system; "caller": none is stored, the
    acquire's own limits apply), and the parent's (cascade) if the entity has one."""
    found = target.run_limiter(lambda lim: lim.get_effective_limits(entity_id, resource))
    rows = [
        {"entity_id": r.entity_id, "level": r.level or "caller", **limit_dict(x)}
        for r in found
        for x in r.limits
    ]
    rows += [
        {"entity_id": r.entity_id, "level": "caller"} for r in found if not r.limits
    ]
    data = {
        "entity_id": entity_id,
        "resource": resource,
        "resolved": [
            {"entity_id": r.entity_id, "level": r.level or "caller",
             "limits": [limit_dict(x) for x in r.limits]}
            for r in found
        ],
    }
    out.show(
        data,
        rows_table(
            f"limits of {entity_id} for {resource}",
            ["entity_id", "level", *LIMIT_COLUMNS],
            rows,
        ),
    )


# -- limits as a file (zae_limiter.ops.limits_file) -------------------------------------------


def _plan_view(found: Any) -> list[Any]:
    if found.empty:
        return ["no changes"]
    marks = {"add": "+", "change": "~", "remove": "-"}
    lines = []
    for change in found.changes:
        before = ", ".join(x.spec for x in change.before)
        after = ", ".join(x.spec for x in change.after)
        what = {"add": after, "remove": before, "change": f"{before} -> {after}"}[change.action]
        lines.append(f"{marks[change.action]} {change.where}: {what}")
    counts = found.counts()
    lines.append(f"{counts['add']} to add, {counts['change']} to change, "
                 f"{counts['remove']} to remove")
    return ["\n".join(lines)]


PRUNE_OPTION = click.option(
    "--prune", is_flag=True, help="Also remove the stored limits the file does not list."
)


@limits.command("plan")
@target_options()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@PRUNE_OPTION
def limits_plan(target: Target, out: Output, file: str, prune: bool) -> None:
    """What `limits apply FILE` would change in the table: additions and changes, removals
    only with --prune ("no changes" when the file is applied). FILE: YAML with `system`,
    `resources` and `entities` sections of limits in their text form (docs/limits.md)."""
    from ..ops import limits_file

    wanted = limits_file.load(file)
    found = target.run_limiter(lambda lim: limits_file.plan(lim, wanted, prune))
    out.show(found.to_dict(), *_plan_view(found))


@limits.command("apply")
@target_options()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@PRUNE_OPTION
@click.option("--principal", default=None, help=PRINCIPAL_HELP)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def limits_apply(
    target: Target, out: Output, file: str, prune: bool, principal: str | None, yes: bool
) -> None:
    """Make the table's limits what FILE says (each level replaced whole and recorded in its
    audit trail). The whole file is checked before anything is written; running it again
    changes nothing, and finishes an apply that was cut off."""
    from ..ops import limits_file

    principal = validate_principal(principal)
    wanted = limits_file.load(file)

    async def work(lim: RateLimiter) -> tuple[Any, int]:
        found = await limits_file.plan(lim, wanted, prune)
        if found.empty:
            return found, 0
        if not yes:
            out.note(*_plan_view(found))
            counts = found.counts()
            question = (f"Apply {counts['add']} addition(s), {counts['change']} change(s), "
                        f"{counts['remove']} removal(s)?")
            # Asked off the event loop: click's prompt blocks.
            await asyncio.to_thread(confirm, False, question)
        return found, await limits_file.apply(lim, found, principal)

    found, made = target.run_limiter(work)
    data = found.to_dict() | {"applied": made}
    out.show(data, "no changes" if not made else f"applied {made} change(s)")


@limits.command("export")
@target_options(json_output=False)
@click.option("--output", "-o", "output", default=None, type=click.Path(dir_okay=False),
              help="Write the file here (default: stdout).")
def limits_export(target: Target, out: Output, output: str | None) -> None:
    """The table's limits (system, resources, entities) as a limits file: `limits apply` of it
    on this table changes nothing."""
    from ..ops import limits_file

    text = limits_file.dump(target.run_limiter(limits_file.export))
    if output is None:
        click.echo(text, nl=False)
        return
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    click.echo(f"wrote {output}", err=True)
