"""`audit ENTITY_ID`: an entity's audit trail (who created or deleted it, set or deleted its
limits, when), newest first, a page at a time. Deleted entities' trails are readable too.
`audit verify ENTITY_ID`: whether that trail is as it was appended (its hash chain).

`audit` is a group whose default command is `list`: `audit ENTITY_ID` (0.2.0's spelling) is
`audit list ENTITY_ID`; an entity called `verify` or `list` is reached through `audit list`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from ..audit import is_event_id, verify_trail
from . import main
from .toolkit import Output, Target, fields_table, rows_table, target_options

if TYPE_CHECKING:
    from ..limiter import RateLimiter
    from ..models import AuditEvent

COLUMNS = ["timestamp", "action", "principal", "resource", "details", "event_id"]


def event_row(event: AuditEvent) -> dict[str, Any]:
    row = event.to_dict()
    row["details"] = json.dumps(event.details, sort_keys=True, separators=(",", ":"), default=str)
    return row


class _DefaultList(click.Group):
    """A group that runs `list` when its first argument names no command of it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["list", *args]
        return super().parse_args(ctx, args)


@main.group("audit", cls=_DefaultList)
def audit_group() -> None:
    """An entity's audit trail: `audit ENTITY_ID` lists its events (= `audit list`), `audit
    verify ENTITY_ID` checks that none was changed or deleted since it was recorded."""


@audit_group.command("list")
@target_options()
@click.argument("entity_id")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Events per page.",
)
@click.option(
    "--start-after",
    "start_event_id",
    default=None,
    metavar="EVENT_ID",
    help="The page after this event (the previous page's next_start_event_id).",
)
@click.option("--oldest-first", is_flag=True, help="Oldest events first (default: newest).")
def audit_cmd(
    target: Target,
    out: Output,
    entity_id: str,
    limit: int,
    start_event_id: str | None,
    oldest_first: bool,
) -> None:
    """The audit events of ENTITY_ID: entity created / deleted, limits set / deleted, with the
    principal who did it. Events expire 90 days after they were recorded."""
    if start_event_id is not None and not is_event_id(start_event_id):
        raise click.BadParameter(
            f"{start_event_id!r} is not an event id", param_hint="--start-after"
        )

    async def work(lim: RateLimiter) -> list[AuditEvent]:
        # One more than a page tells whether there is a next one.
        return await lim.get_audit_events(
            entity_id, limit + 1, start_event_id, oldest_first=oldest_first
        )

    found = target.run_limiter(work)
    events, more = found[:limit], len(found) > limit
    next_id = events[-1].event_id if more else None
    data = {
        "entity_id": entity_id,
        "order": "oldest_first" if oldest_first else "newest_first",
        "events": [e.to_dict() for e in events],
        "next_start_event_id": next_id,
    }
    order = "oldest first" if oldest_first else "newest first"
    human: list[Any] = [
        rows_table(f"audit events of {entity_id} ({order})", COLUMNS, map(event_row, events))
    ]
    if next_id is not None:
        again = f"zae-limiter audit {entity_id} {target.options_text} --limit {limit}"
        if oldest_first:
            again += " --oldest-first"
        human.append(f"next page: {again} --start-after {next_id}")
    elif not events:
        human.append(f"no audit events for {entity_id}")
    out.show(data, *human)


PROBLEM_COLUMNS = ["kind", "seq", "event_id", "detail"]


@audit_group.command("verify")
@target_options()
@click.argument("entity_id")
def audit_verify(target: Target, out: Output, entity_id: str) -> None:
    """Check ENTITY_ID's hash chain of audit events: every event unchanged (fields, details,
    expiry), none missing in the middle, at the start before its 90 days were over, or at the
    end (the chain's head names the last one). Events recorded before the chain existed are
    counted as unchained legacy events, not failures. Exits 1 when the trail was tampered with."""
    report = target.run(lambda repo: verify_trail(repo, entity_id))
    data = report.to_dict()
    summary = fields_table(f"audit trail of {entity_id}", {
        "intact": "yes" if report.intact else "NO",
        "chained events": report.chained,
        "legacy (unchained) events": report.legacy,
        "head sequence number": report.head_seq,
        "expired before the oldest": report.expired,
    })
    if report.intact:
        out.show(data, summary)
        return
    rows = [p.to_dict() for p in report.problems]
    out.fail(data, f"the audit trail of {entity_id} was tampered with: "
                   f"{len(rows)} problem(s)",
             summary, rows_table("problems", PROBLEM_COLUMNS, rows))
