"""`version`, `check`, `upgrade`, `migrate` (`migrate rollback`, `migrate list`).

They never run the limiter's version check: operators must be able to repair a table whatever
its version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.text import Text

from ..ops import recovery as ops
from . import main
from .toolkit import (
    EXIT_FAILED,
    Output,
    Target,
    confirm,
    require,
    rows_table,
    target_options,
)
from .toolkit import fields_table as fields

if TYPE_CHECKING:
    from ..ops import migrations as migrations_module
    from ..storage.dynamodb.repository import Repository


@main.command("version")
@target_options()
def version_cmd(target: Target, out: Output) -> None:
    """Show client, schema, aggregator and minimum client versions."""
    info = {"table": target.table, "where": target.where, **target.run(ops.version_status_async)}
    out.show(info, fields(f"versions of {target.table}", info))


@main.command("check")
@target_options()
def check_cmd(target: Target, out: Output) -> None:
    """Is the table ready for this client? One line per check: credentials, table ACTIVE, keys,
    GSI1, TTL, stream, version record. Exit 0 if all pass, 1 (with what to do) if not."""
    from ..ops import readiness

    async def work(repo: Repository) -> tuple[list[readiness.Check], dict[str, Any]]:
        checks = await readiness.check_table(
            repo, region=target.region, endpoint_url=target.endpoint_url,
            cli_args=target.options_text,
        )
        version_ran = any(c.name == "version record" and c.status != "skipped" for c in checks)
        # The version fields `check --json` always had, when the record could be read.
        return checks, (await ops.version_status_async(repo)) if version_ran else {}

    checks, version = target.run(work)
    ready = readiness.table_ready(checks)
    data = {"table": target.table, "where": target.where, **version, "ready": ready,
            "checks": [c.as_dict() for c in checks]}
    data.setdefault("compatible", False)
    out.show(data, *readiness.lines(checks))
    if not ready:
        raise click.exceptions.Exit(EXIT_FAILED)


@main.command("upgrade")
@target_options()
@click.option("--force", is_flag=True, help="Redeploy even when the aggregator is up to date.")
def upgrade_cmd(target: Target, out: Output, force: bool) -> None:
    """Bring the aggregator and the version record up to this client.

    On AWS the Pulumi stack is redeployed with its current options; on a local endpoint (no
    Lambda) only the version record is written.
    """
    from .. import version

    async def work(repo: Repository) -> dict[str, Any]:
        record = await repo.get_version_record()
        compat = version.check_compatibility(record)
        if compat.kind in ("schema", "min_client"):
            raise click.ClickException(f"upgrade cannot fix this: {compat.reason}")
        if record is not None and compat.compatible and not force:
            return {"action": "none", "detail": "already up to date", **compat.as_dict()}
        if record is None:
            # A table without a record predates version records: its items are the base schema.
            await version.write_initial_record(repo, updated_by="zae-limiter upgrade")
        detail = await version.update_aggregator(
            repo,
            name=target.name,
            region=target.region,
            endpoint_url=target.endpoint_url,
            updated_by="zae-limiter upgrade",
        )
        after = version.check_compatibility(await repo.get_version_record())
        return {"action": "upgraded", "detail": detail, **after.as_dict()}

    result = target.run(work)
    out.show(result, f"{result['action']}: {result['detail']}")


# -- migrations -------------------------------------------------------------------------------


def _migration_options(fn: Any) -> Any:
    for option in reversed(
        [
            click.option("--dry-run", is_flag=True, help="Print the plan; change nothing."),
            click.option(
                "--backup-dir",
                default=ops.DEFAULT_BACKUP_DIR,
                show_default=True,
                type=click.Path(file_okay=False, path_type=Path),
                help="Where a local endpoint's pre-migration export goes (AWS: on-demand backup).",
            ),
            click.option("--yes", is_flag=True, help="Do not ask for confirmation."),
            click.option(
                "--force",
                is_flag=True,
                help="Run although the version record reports an unfinished migration "
                "(only after restoring the backup it names).",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def latest_schema_version() -> str:
    """The newest schema version this client can migrate a table to."""
    from ..ops import migrations

    return migrations.known_versions()[-1]


def _migrate(
    target: Target,
    out: Output,
    to: str,
    dry_run: bool,
    backup_dir: Path,
    yes: bool,
    force: bool,
    backward: bool,
) -> None:
    from ..ops import migrations

    async def plan(repo: Repository) -> tuple[str, list[migrations_module.Step]]:
        current, _ = await migrations.current_version(repo)
        return current, migrations.select(current, to)

    current, steps = target.run(plan)
    if steps and (steps[0].direction == "backward") != backward:
        command = "zae-limiter migrate rollback" if not backward else "zae-limiter migrate"
        raise click.ClickException(
            f"schema {current} -> {to} is a {steps[0].direction} migration: use `{command} --to "
            f"{to}`"
        )
    if steps:
        out.note(
            f"{target.table} is at schema {current}; plan:",
            *(f"  - {step.describe()}" for step in steps),
        )
    else:
        out.note(f"{target.table} is at schema {current}: nothing to do")
    if dry_run or not steps:
        planned = {
            "table": target.table,
            "from_version": current,
            "to_version": to,
            "dry_run": dry_run,
            "planned": [s.as_dict() for s in steps],
            "applied": [],
        }
        out.show(planned)
        return
    confirm(yes, f"Back up {target.table} and apply {len(steps)} step(s)?")

    async def work(repo: Repository) -> dict[str, Any]:
        taken = await ops.backup(
            repo, local=target.local, backup_dir=backup_dir, label=f"pre-migration-{to}"
        )
        out.note(f"backup: {taken['id']} ({taken.get('items', taken.get('status'))})")
        report = await migrations.apply(
            repo,
            to,
            backup=str(taken["id"]),
            force=force,
            on_step=lambda step: out.note(f"running: {step.describe()}"),
            updated_by="zae-limiter migrate" + (" rollback" if backward else ""),
        )
        return {"table": target.table, **report.as_dict()}

    result = target.run(work)
    out.show(result, f"done: {target.table} is at schema {result['to_version']}")


@main.group("migrate", invoke_without_command=True)
@target_options(name_required=False)
@click.option(
    "--to",
    "to",
    default=None,
    metavar="VERSION",
    help="Target schema version (default: the latest this client knows).",
)
@_migration_options
@click.pass_context
def migrate_group(
    ctx: click.Context,
    target: Target | None,
    out: Output,
    to: str | None,
    dry_run: bool,
    backup_dir: Path,
    yes: bool,
    force: bool,
) -> None:
    """Migrate the table's schema forward: `migrate [--to VERSION] [--dry-run]`.

    Without --to, to the latest schema version this client knows. A backup is taken first (AWS:
    on-demand backup; local endpoint: JSON export to --backup-dir). See also `migrate rollback`
    and `migrate list`.
    """
    if ctx.invoked_subcommand is not None:
        return
    _migrate(
        require(target),
        out,
        to or latest_schema_version(),
        dry_run,
        backup_dir,
        yes,
        force,
        backward=False,
    )


@migrate_group.command("rollback")
@target_options()
@click.option("--to", "to", required=True, metavar="VERSION", help="Schema version to return to.")
@_migration_options
def migrate_rollback(
    target: Target,
    out: Output,
    to: str,
    dry_run: bool,
    backup_dir: Path,
    yes: bool,
    force: bool,
) -> None:
    """Roll reversible migrations back to schema VERSION (a backup is taken first)."""
    _migrate(target, out, to, dry_run, backup_dir, yes, force, backward=True)


@migrate_group.command("list")
@target_options(name_required=False)
def migrate_list(target: Target | None, out: Output) -> None:
    """Known migrations; with --name, the table's schema version and migration log too."""
    from ..ops import migrations

    rows = [
        {"version": m.version, "description": m.description, "reversible": m.reversible}
        for m in migrations.get_migrations()
    ]
    data: dict[str, Any] = {"base_version": migrations.BASE_VERSION, "migrations": rows}
    human: list[Any] = [rows_table("migrations", ["version", "description", "reversible"], rows)]
    if target is not None:

        async def work(repo: Repository) -> dict[str, Any]:
            current, record = await migrations.current_version(repo)
            return {
                "table": target.table,
                "schema_version": current,
                "log": json.loads(str(record.get(migrations.MIGRATION_LOG) or "[]")),
                "migration_state": record.get(migrations.MIGRATION_STATE) or None,
            }

        info = target.run(work)
        data |= info
        human.append(f"{info['table']} is at schema {info['schema_version']}")
        if info["migration_state"]:
            human.append(Text.assemble(("state:", "bold red"), f" {info['migration_state']}"))
        human.extend(
            f"  {e.get('at')} {e.get('direction')} {e.get('from')} -> {e.get('to')}: "
            f"{e.get('result')}"
            for e in info["log"]
        )
    out.show(data, *human)
