"""`limits set | get | delete`: stored per-entity limits (used with use_stored_limits=True).

`--limit` takes the text form of a limit (`Limit.parse`); output shows it back (`Limit.spec`).
"""

from __future__ import annotations

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
    """Stored per-entity limits (used with use_stored_limits=True)."""


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
