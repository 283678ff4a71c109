"""`backup create | list` and `restore`: on AWS on-demand DynamoDB backups (restores print the
commands), on local endpoints JSON exports (restores re-import them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..ops import recovery as ops
from . import main
from .toolkit import Output, Target, confirm, fields_table, rows_table, target_options


def _backup_dir_option(fn: Any) -> Any:
    return click.option(
        "--backup-dir",
        default=ops.DEFAULT_BACKUP_DIR,
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory of JSON exports (local endpoints, or with --export).",
    )(fn)


@main.group()
def backup() -> None:
    """Backups: on AWS on-demand DynamoDB backups, on local endpoints JSON exports."""


@backup.command("create")
@target_options()
@_backup_dir_option
@click.option(
    "--export",
    "force_export",
    is_flag=True,
    help="Write a JSON export even on AWS (a Scan of the whole table).",
)
@click.option("--label", default="manual", show_default=True, help="Part of the backup's name.")
def backup_create(
    target: Target, out: Output, backup_dir: Path, force_export: bool, label: str
) -> None:
    """Back up the table now."""
    local = target.local or force_export
    taken = target.run(
        lambda repo: ops.backup(repo, local=local, backup_dir=backup_dir, label=label)
    )
    out.show(taken, fields_table(f"backup of {target.table}", taken))


@backup.command("list")
@target_options()
@_backup_dir_option
def backup_list(target: Target, out: Output, backup_dir: Path) -> None:
    """Backups of the table (AWS backups, or the exports in --backup-dir)."""
    found = ops.list_exports(backup_dir, target.table)
    if not target.local:
        found = target.run(ops.list_backups) + found
    out.show(
        found,
        rows_table(
            f"backups of {target.table}", ["kind", "id", "created", "items", "status"], found
        ),
    )


@main.command("restore")
@target_options()
@click.option(
    "--from",
    "source",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Re-import this JSON export into the table (replaces every item).",
)
@click.option("--backup-arn", default=None, help="Show the commands for this AWS backup.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def restore_cmd(
    target: Target, out: Output, source: Path | None, backup_arn: str | None, yes: bool
) -> None:
    """Restore the table: re-import a JSON export (--from), or print the AWS restore commands
    (on-demand backup or point-in-time recovery; DynamoDB restores into a new table)."""
    if source is None:
        hints = ops.restore_hints(target.name, target.region, backup_arn)
        local = (
            [
                f"# local endpoint: zae-limiter restore --name {target.name} "
                f"--endpoint-url {target.endpoint_url} --from <export.json>"
            ]
            if target.local
            else []
        )
        out.show({"table": target.table, "commands": hints}, *hints, *local)
        return
    document = ops.read_export(source)
    confirm(
        yes,
        f"Replace every item of {target.table} with the {document.get('item_count')} "
        f"items of {source} (exported {document.get('exported_at')})?",
    )
    result = target.run(lambda repo: ops.import_table(repo, source))
    out.show(
        result,
        f"restored {result['restored_items']} items into {target.table} from {source}"
        f" ({result['deleted_items']} items not in the export removed)",
    )
