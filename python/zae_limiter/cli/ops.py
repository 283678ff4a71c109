"""Operator commands: versions, migrations, entities, limits, buckets, backups and restores.

They replace the hand-written `aws dynamodb ...` calls of the troubleshooting guide. Every command
takes `--name`, `--region`, `--endpoint-url` (a local DynamoDB) and `--json` (machine-readable
output on stdout); errors are one line on stderr with exit code 1; destructive commands ask first
unless `--yes`. They never run the limiter's version check: operators must be able to repair a
table whatever its version.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.table import Table

from .. import ops, schema
from ..exceptions import EntityNotFoundError, ZAELimiterError
from ..models import Limit
from . import main
from .render import emit_json, kv_table

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

EXIT_FAILED_CHECK = 1


# -- plumbing ---------------------------------------------------------------------------------


def _console() -> Console:
    # Built per call: CliRunner swaps sys.stdout, and a module-level Console would keep the old one.
    return Console(highlight=False, soft_wrap=True)


def _default_region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    region: str
    endpoint_url: str | None
    as_json: bool

    @property
    def table(self) -> str:
        return schema.table_name(self.name)

    @property
    def local(self) -> bool:
        return self.endpoint_url is not None

    @property
    def where(self) -> str:
        return self.endpoint_url or self.region

    def repository(self) -> Any:
        from ..repository import Repository

        return Repository(self.table, self.region, self.endpoint_url)

    def limiter(self) -> Any:
        from ..limiter import RateLimiter

        return RateLimiter(self.name, self.region, self.endpoint_url, version_check="skip")


def _target(name: str | None, region: str, endpoint_url: str | None, as_json: bool) -> Target:
    if not name:
        raise click.UsageError("Missing option '--name'.")
    from ..infra import validate_deployment_name

    short = validate_deployment_name(schema.short_name(name))
    if endpoint_url and "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_PROFILE" not in os.environ:
        # Local endpoints accept any credentials; don't make people configure real ones for them.
        os.environ["AWS_ACCESS_KEY_ID"] = "local"
        os.environ["AWS_SECRET_ACCESS_KEY"] = "local"
    return Target(short, region, endpoint_url, as_json)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Expected failures become one readable line and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (ZAELimiterError, ValueError, OSError) as exc:
            raise click.ClickException(str(exc)) from exc
        except Exception as exc:
            if _error_code(exc) == "ResourceNotFoundException":
                table = schema.table_name(str(kwargs.get("name") or "<name>"))
                where = kwargs.get("endpoint_url") or kwargs.get("region")
                raise click.ClickException(
                    f"table {table} not found at {where} (deploy it with: zae-limiter deploy)"
                ) from exc
            if type(exc).__module__.startswith(("botocore", "boto3", "aiobotocore")):
                raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
            raise

    return wrapper


def _common(required: bool = True) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        fn = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(fn)
        fn = click.option(
            "--endpoint-url",
            default=None,
            metavar="URL",
            help="A local DynamoDB (moto, DynamoDB Local) instead of AWS.",
        )(fn)
        fn = click.option(
            "--region",
            default=_default_region,
            show_default="$AWS_DEFAULT_REGION or us-east-1",
            help="AWS region.",
        )(fn)
        fn = click.option("--name", required=required, help="Deployment name (table ZAEL-<name>).")(
            fn
        )
        return _friendly(fn)

    return decorate


def _run(target: Target, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(repository)` on a fresh event loop and close the repository afterwards."""

    async def go() -> T:
        repo = target.repository()
        try:
            return await work(repo)
        finally:
            await repo.close()

    return asyncio.run(go())


def _run_limiter(target: Target, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    async def go() -> T:
        limiter = target.limiter()
        try:
            return await work(limiter)
        finally:
            await limiter.close()

    return asyncio.run(go())




def _rows_table(title: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("-" if row.get(c) is None else str(row.get(c)) for c in columns))
    return table


def _confirm(yes: bool, question: str) -> None:
    if not yes:
        click.confirm(question, abort=True, err=True)


def _fmt_num(value: float | None) -> str | None:
    if value is None:
        return None
    return f"{value:g}" if value != int(value) else str(int(value))


# -- limit syntax -----------------------------------------------------------------------------

_UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
_PERIOD = re.compile(r"^(\d+)?\s*([a-z]*)$")
LIMIT_SYNTAX = (
    "NAME:CAPACITY/PERIOD[,burst=N][,refill=N] (e.g. rpm:100/minute, tpm:10000/1m,burst=20000) "
    "or name=NAME,capacity=N,period=P[,burst=N][,refill=N]; PERIOD is seconds or "
    "second|minute|hour|day, optionally with a count (30s, 5m)"
)


def parse_period(text: str) -> int:
    match = _PERIOD.match(text.strip().lower())
    if match is None or (match.group(1) is None and not match.group(2)):
        raise ValueError(f"bad period {text!r}")
    count = int(match.group(1) or 1)
    unit = match.group(2)
    if unit and unit not in _UNITS:
        raise ValueError(f"bad period unit {unit!r} (use s, m, h, d or second..day)")
    return count * (_UNITS[unit] if unit else 1)


def parse_limit(spec: str) -> Limit:
    """A `Limit` from the command-line syntax (see LIMIT_SYNTAX)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty limit")
    values: dict[str, str] = {}
    first = parts[0]
    rest = parts[1:]
    if "=" in first:
        rest = parts
    else:
        name, sep, rate = first.partition(":")
        capacity_text, slash, period_text = rate.partition("/")
        if not sep or not slash:
            raise ValueError(f"{spec!r}: expected {LIMIT_SYNTAX}")
        values |= {"name": name, "capacity": capacity_text, "period": period_text}
    for part in rest:
        key, eq, value = part.partition("=")
        key = key.strip().lower().replace("-", "_")
        aliases = {"refill_amount": "refill", "refill_period": "period", "limit": "name"}
        key = aliases.get(key, key)
        if not eq or key not in ("name", "capacity", "period", "burst", "refill"):
            raise ValueError(f"{spec!r}: unknown part {part!r}; expected {LIMIT_SYNTAX}")
        values[key] = value.strip()
    missing = [k for k in ("name", "capacity", "period") if not values.get(k)]
    if missing:
        raise ValueError(f"{spec!r}: missing {', '.join(missing)}; expected {LIMIT_SYNTAX}")
    try:
        capacity = int(values["capacity"])
        burst = int(values["burst"]) if "burst" in values else None
        refill = int(values["refill"]) if "refill" in values else capacity
    except ValueError as exc:
        raise ValueError(f"{spec!r}: capacity, burst and refill must be integers") from exc
    return Limit.custom(values["name"], capacity, refill, parse_period(values["period"]), burst)


def _limit_dict(limit: Limit) -> dict[str, Any]:
    return limit.to_dict() | {"spec": _limit_spec(limit)}


def _limit_spec(limit: Limit) -> str:
    period = limit.refill_period_seconds
    unit = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}.get(period, f"{period}s")
    spec = f"{limit.name}:{limit.capacity}/{unit}"
    if limit.burst != limit.capacity:
        spec += f",burst={limit.burst}"
    if limit.refill_amount != limit.capacity:
        spec += f",refill={limit.refill_amount}"
    return spec


# -- versions ---------------------------------------------------------------------------------


@main.command("version")
@_common()
def version_cmd(name: str, region: str, endpoint_url: str | None, as_json: bool) -> None:
    """Show client, schema, aggregator and minimum client versions."""
    target = _target(name, region, endpoint_url, as_json)
    info = _run(target, ops.version_status_async)
    info = {"table": target.table, "where": target.where, **info}
    if as_json:
        emit_json(info)
        return
    _console().print(kv_table(f"versions of {target.table}", info))


@main.command("check")
@_common()
def check_cmd(name: str, region: str, endpoint_url: str | None, as_json: bool) -> None:
    """Is this client compatible with the deployment? Exit 0 if so, 1 (with the reason) if not."""
    target = _target(name, region, endpoint_url, as_json)
    info = _run(target, ops.version_status_async)
    if as_json:
        emit_json({"table": target.table, **info})
    elif info["compatible"]:
        click.echo(f"compatible: {info['reason']}")
    else:
        hint = " (fixable with: zae-limiter upgrade)" if info["can_auto_update"] else ""
        click.echo(f"NOT compatible: {info['reason']}{hint}", err=True)
    if not info["compatible"]:
        raise click.exceptions.Exit(EXIT_FAILED_CHECK)


@main.command("upgrade")
@_common()
@click.option("--force", is_flag=True, help="Redeploy even when the aggregator is up to date.")
def upgrade_cmd(
    name: str, region: str, endpoint_url: str | None, as_json: bool, force: bool
) -> None:
    """Bring the aggregator and the version record up to this client.

    On AWS the Pulumi stack is redeployed with its current options; on a local endpoint (no
    Lambda) only the version record is written.
    """
    from .. import version

    target = _target(name, region, endpoint_url, as_json)

    async def work(repo: Any) -> dict[str, Any]:
        record = await repo.get_version_record()
        compat = version.check_compatibility(record)
        if compat.kind in ("schema", "min_client"):
            raise click.ClickException(f"upgrade cannot fix this: {compat.reason}")
        if record is not None and compat.compatible and not force:
            return {"action": "none", "detail": "already up to date", **compat.as_dict()}
        if record is None:
            # A table without a record predates version records: its items are the base schema.
            await repo.set_version_record(
                schema_version=schema.SCHEMA_VERSION,
                min_client_version="0.0.0",
                updated_by="zae-limiter upgrade",
            )
        detail = await version.update_aggregator(
            repo,
            name=target.name,
            region=target.region,
            endpoint_url=target.endpoint_url,
            updated_by="zae-limiter upgrade",
        )
        after = version.check_compatibility(await repo.get_version_record())
        return {"action": "upgraded", "detail": detail, **after.as_dict()}

    result = _run(target, work)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{result['action']}: {result['detail']}")


# -- migrations -------------------------------------------------------------------------------


def _migration_options(fn: Callable[P, R]) -> Callable[P, R]:
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


def _migrate(
    target: Target, to: str, dry_run: bool, backup_dir: Path, yes: bool, force: bool, backward: bool
) -> None:
    from .. import migrations

    as_json = target.as_json
    out = _console()

    async def plan(repo: Any) -> tuple[str, list[migrations.Step]]:
        current, _ = await migrations.current_version(repo)
        return current, migrations.select(current, to)

    current, steps = _run(target, plan)
    if steps and (steps[0].direction == "backward") != backward:
        command = "zae-limiter migrate rollback" if not backward else "zae-limiter migrate"
        raise click.ClickException(
            f"schema {current} -> {to} is a {steps[0].direction} migration: use `{command} --to "
            f"{to}`"
        )
    if not as_json:
        if not steps:
            out.print(f"{target.table} is at schema {current}: nothing to do")
        else:
            out.print(f"{target.table} is at schema {current}; plan:")
            for step in steps:
                out.print(f"  - {step.describe()}")
    if dry_run or not steps:
        if as_json:
            emit_json(
                {
                    "table": target.table,
                    "from_version": current,
                    "to_version": to,
                    "dry_run": dry_run,
                    "planned": [s.as_dict() for s in steps],
                    "applied": [],
                }
            )
        return
    _confirm(yes, f"Back up {target.table} and apply {len(steps)} step(s)?")

    async def work(repo: Any) -> dict[str, Any]:
        taken = await ops.backup(
            repo, local=target.local, backup_dir=backup_dir, label=f"pre-migration-{to}"
        )
        if not as_json:
            out.print(f"backup: {taken['id']} ({taken.get('items', taken.get('status'))})")

        def on_step(step: migrations.Step) -> None:
            if not as_json:
                out.print(f"running: {step.describe()}")

        report = await migrations.apply(
            repo,
            to,
            backup=str(taken["id"]),
            force=force,
            on_step=on_step,
            updated_by="zae-limiter migrate" + (" rollback" if backward else ""),
        )
        return {"table": target.table, **report.as_dict()}

    result = _run(target, work)
    if as_json:
        emit_json(result)
    else:
        out.print(f"done: {target.table} is at schema {result['to_version']}")


@main.group("migrate", invoke_without_command=True)
@_common(required=False)
@click.option("--to", "to", default=None, metavar="VERSION", help="Target schema version.")
@_migration_options
@click.pass_context
def migrate_group(
    ctx: click.Context,
    name: str | None,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
    to: str | None,
    dry_run: bool,
    backup_dir: Path,
    yes: bool,
    force: bool,
) -> None:
    """Migrate the table's schema forward: `migrate --to VERSION [--dry-run]`.

    A backup is taken first (AWS: on-demand backup; local endpoint: JSON export to --backup-dir).
    See also `migrate rollback` and `migrate list`.
    """
    if ctx.invoked_subcommand is not None:
        return
    if to is None:
        raise click.UsageError("Missing option '--to' (or a subcommand: rollback, list).")
    _migrate(
        _target(name, region, endpoint_url, as_json),
        to,
        dry_run,
        backup_dir,
        yes,
        force,
        backward=False,
    )


@migrate_group.command("rollback")
@_common()
@click.option("--to", "to", required=True, metavar="VERSION", help="Schema version to return to.")
@_migration_options
def migrate_rollback(
    name: str,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
    to: str,
    dry_run: bool,
    backup_dir: Path,
    yes: bool,
    force: bool,
) -> None:
    """Roll reversible migrations back to schema VERSION (a backup is taken first)."""
    _migrate(
        _target(name, region, endpoint_url, as_json),
        to,
        dry_run,
        backup_dir,
        yes,
        force,
        backward=True,
    )


@migrate_group.command("list")
@_common(required=False)
def migrate_list(name: str | None, region: str, endpoint_url: str | None, as_json: bool) -> None:
    """Known migrations; with --name, the table's schema version and migration log too."""
    from .. import migrations

    rows = [
        {"version": m.version, "description": m.description, "reversible": m.reversible}
        for m in migrations.get_migrations()
    ]
    table_info: dict[str, Any] = {}
    if name:
        target = _target(name, region, endpoint_url, as_json)

        async def work(repo: Any) -> dict[str, Any]:
            current, record = await migrations.current_version(repo)
            log = json.loads(str(record.get(migrations.MIGRATION_LOG) or "[]"))
            return {
                "table": target.table,
                "schema_version": current,
                "log": log,
                "migration_state": record.get(migrations.MIGRATION_STATE) or None,
            }

        table_info = _run(target, work)
    if as_json:
        emit_json({"base_version": migrations.BASE_VERSION, "migrations": rows, **table_info})
        return
    out = _console()
    out.print(_rows_table("migrations", ["version", "description", "reversible"], rows))
    if table_info:
        out.print(f"{table_info['table']} is at schema {table_info['schema_version']}")
        if table_info["migration_state"]:
            out.print(f"[bold red]state:[/] {table_info['migration_state']}")
        for entry in table_info["log"]:
            out.print(
                f"  {entry.get('at')} {entry.get('direction')} {entry.get('from')} -> "
                f"{entry.get('to')}: {entry.get('result')}"
            )


# -- entities ---------------------------------------------------------------------------------


@main.group()
def entity() -> None:
    """Create, inspect, delete and verify entities."""


def _entity_dict(e: Any) -> dict[str, Any]:
    return {
        "entity_id": e.id,
        "name": e.name,
        "parent_id": e.parent_id,
        "metadata": dict(e.metadata),
        "created_at": e.created_at,
    }


def _pairs(values: Sequence[str], option: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for pair in values:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=option)
        result[key] = value
    return result


@entity.command("create")
@_common()
@click.argument("entity_id")
@click.option("--parent", "parent_id", default=None, help="Parent entity (for cascade).")
@click.option("--display-name", default=None, help="Human-readable name.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Metadata (repeatable).")
def entity_create(
    name: str,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
    entity_id: str,
    parent_id: str | None,
    display_name: str | None,
    meta: tuple[str, ...],
) -> None:
    """Create an entity (the parent must exist)."""
    target = _target(name, region, endpoint_url, as_json)
    metadata = _pairs(meta, "--meta")
    created = _run_limiter(
        target, lambda lim: lim.create_entity(entity_id, display_name, parent_id, metadata)
    )
    data = _entity_dict(created)
    if as_json:
        emit_json(data)
    else:
        _console().print(kv_table(f"entity {entity_id} created", data))


@entity.command("show")
@_common()
@click.argument("entity_id")
def entity_show(
    name: str, region: str, endpoint_url: str | None, as_json: bool, entity_id: str
) -> None:
    """An entity's metadata, parent, stored limits and bucket resources."""
    target = _target(name, region, endpoint_url, as_json)

    async def work(lim: Any) -> dict[str, Any]:
        found = await lim.get_entity(entity_id)
        if found is None:
            raise EntityNotFoundError(entity_id)
        limits = await lim.repository.get_all_limits(entity_id)
        buckets = await lim.repository.list_buckets(entity_id)
        return _entity_dict(found) | {
            "limits": {r: [_limit_spec(x) for x in ls] for r, ls in sorted(limits.items())},
            "bucket_resources": sorted(b.resource for b in buckets),
        }

    data = _run_limiter(target, work)
    if as_json:
        emit_json(data)
    else:
        _console().print(kv_table(f"entity {entity_id}", data))


@entity.command("delete")
@_common()
@click.argument("entity_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def entity_delete(
    name: str, region: str, endpoint_url: str | None, as_json: bool, entity_id: str, yes: bool
) -> None:
    """Delete an entity with its buckets, stored limits and usage snapshots."""
    target = _target(name, region, endpoint_url, as_json)
    _confirm(yes, f"Delete entity {entity_id} and all its items from {target.table}?")
    count = _run(target, lambda repo: repo.delete_entity(entity_id))
    if as_json:
        emit_json({"entity_id": entity_id, "deleted_items": count})
    else:
        click.echo(f"entity {entity_id} deleted ({count} items)")


@entity.command("children")
@_common()
@click.argument("parent_id")
def entity_children(
    name: str, region: str, endpoint_url: str | None, as_json: bool, parent_id: str
) -> None:
    """The entities whose parent is PARENT_ID."""
    target = _target(name, region, endpoint_url, as_json)
    children = _run_limiter(target, lambda lim: lim.get_children(parent_id))
    rows = [_entity_dict(c) for c in sorted(children, key=lambda c: c.id)]
    if as_json:
        emit_json(rows)
    else:
        _console().print(
            _rows_table(f"children of {parent_id}", ["entity_id", "name", "created_at"], rows)
        )


@entity.command("verify")
@_common()
@click.argument("entity_id")
@click.option("--resource", default=None, help="Also probe this resource (default: stored ones).")
def entity_verify(
    name: str,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
    entity_id: str,
    resource: str | None,
) -> None:
    """Check an entity end to end: exists, parent exists, limits readable, `available()` works.

    Exit 0 when every check passes, 1 otherwise.
    """
    target = _target(name, region, endpoint_url, as_json)

    async def work(lim: Any) -> list[dict[str, Any]]:
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
        try:
            stored = await lim.repository.get_all_limits(entity_id)
            count = sum(len(v) for v in stored.values())
            record("limits readable", True, f"{count} stored limit(s)")
        except ZAELimiterError as exc:
            record("limits readable", False, str(exc))
            stored = {}
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

    checks = _run_limiter(target, work)
    ok = all(c["ok"] for c in checks)
    if as_json:
        emit_json({"entity_id": entity_id, "ok": ok, "checks": checks})
    else:
        rows = [c | {"ok": "ok" if c["ok"] else "FAILED"} for c in checks]
        _console().print(_rows_table(f"verify {entity_id}", ["check", "ok", "detail"], rows))
    if not ok:
        raise click.exceptions.Exit(EXIT_FAILED_CHECK)


# -- stored limits ----------------------------------------------------------------------------


@main.group()
def limits() -> None:
    """Stored per-entity limits (used with use_stored_limits=True)."""


@limits.command("set")
@_common()
@click.argument("entity_id")
@click.option(
    "--resource",
    default=schema.DEFAULT_RESOURCE,
    show_default=True,
    help="Resource the limits apply to (_default_: every resource without its own).",
)
@click.option(
    "--limit",
    "specs",
    multiple=True,
    required=True,
    metavar="SPEC",
    help=f"Repeatable. {LIMIT_SYNTAX}.",
)
def limits_set(
    name: str,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
    entity_id: str,
    resource: str,
    specs: tuple[str, ...],
) -> None:
    """Replace the stored limits of (ENTITY_ID, --resource) with the given ones."""
    target = _target(name, region, endpoint_url, as_json)
    try:
        parsed = [parse_limit(spec) for spec in specs]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--limit") from exc
    _run_limiter(target, lambda lim: lim.set_limits(entity_id, parsed, resource))
    data = {
        "entity_id": entity_id,
        "resource": resource,
        "limits": [_limit_dict(x) for x in parsed],
    }
    if as_json:
        emit_json(data)
    else:
        click.echo(
            f"stored for {entity_id}/{resource}: " + ", ".join(_limit_spec(x) for x in parsed)
        )


@limits.command("get")
@_common()
@click.argument("entity_id")
@click.option("--resource", default=None, help="Only this resource (default: all).")
def limits_get(
    name: str,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
    entity_id: str,
    resource: str | None,
) -> None:
    """The stored limits of ENTITY_ID, by resource."""
    target = _target(name, region, endpoint_url, as_json)

    async def work(lim: Any) -> dict[str, list[Limit]]:
        if resource is not None:
            return {resource: await lim.get_limits(entity_id, resource)}
        result: dict[str, list[Limit]] = await lim.repository.get_all_limits(entity_id)
        return result

    found = _run_limiter(target, work)
    rows = [{"resource": res, **_limit_dict(x)} for res, ls in sorted(found.items()) for x in ls]
    if as_json:
        emit_json({"entity_id": entity_id, "limits": rows})
    else:
        _console().print(
            _rows_table(
                f"stored limits of {entity_id}",
                [
                    "resource",
                    "name",
                    "capacity",
                    "burst",
                    "refill_amount",
                    "refill_period_seconds",
                    "spec",
                ],
                rows,
            )
        )


@limits.command("delete")
@_common()
@click.argument("entity_id")
@click.option("--resource", default=schema.DEFAULT_RESOURCE, show_default=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def limits_delete(
    name: str,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
    entity_id: str,
    resource: str,
    yes: bool,
) -> None:
    """Delete the stored limits of (ENTITY_ID, --resource)."""
    target = _target(name, region, endpoint_url, as_json)
    _confirm(yes, f"Delete the stored limits of {entity_id}/{resource}?")
    count = _run(target, lambda repo: repo.delete_limits(entity_id, resource))
    if as_json:
        emit_json({"entity_id": entity_id, "resource": resource, "deleted": count})
    else:
        click.echo(f"deleted {count} stored limit(s) of {entity_id}/{resource}")


# -- buckets ----------------------------------------------------------------------------------


@main.group()
def bucket() -> None:
    """Inspect and reset an entity's token buckets."""


@bucket.command("show")
@_common()
@click.argument("entity_id")
@click.option("--resource", default=None, help="Only this resource's bucket item.")
def bucket_show(
    name: str,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
    entity_id: str,
    resource: str | None,
) -> None:
    """Every limit of the entity's bucket item(s): stored tokens, anchor, available now
    (computed by the core from the definition stored in `lm#<limit>`), consumed and released."""
    target = _target(name, region, endpoint_url, as_json)
    items = _run(target, lambda repo: ops.bucket_items(repo, entity_id, resource))
    now = time.time_ns() // 1_000_000
    rows = [row.as_dict() for item in items for row in ops.limit_rows(item, now)]
    if as_json:
        emit_json({"entity_id": entity_id, "now": ops.iso_ms(now), "limits": rows})
        return
    if not rows:
        click.echo(f"no buckets for {entity_id}" + (f"/{resource}" if resource else ""))
        return
    display = [
        r | {k: _fmt_num(r[k]) for k in ("tokens", "available", "consumed", "released")}
        for r in rows
    ]
    _console().print(
        _rows_table(
            f"buckets of {entity_id} at {ops.iso_ms(now)}",
            [
                "resource",
                "limit",
                "definition",
                "tokens",
                "last_refill",
                "available",
                "burst",
                "consumed",
                "released",
                "state",
            ],
            display,
        )
    )


@bucket.command("reset")
@_common()
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
    name: str,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
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
    target = _target(name, region, endpoint_url, as_json)
    scope = (
        f"limit(s) {', '.join(limit_names)} of {entity_id}/{resource}"
        if limit_names
        else f"bucket {entity_id}/{resource}"
        if resource
        else f"every bucket of {entity_id}"
    )
    _confirm(yes, f"Reset {scope} to full?")
    done = _run(
        target,
        lambda repo: ops.reset_buckets(repo, entity_id, resource, list(limit_names) or None),
    )
    if as_json:
        emit_json({"entity_id": entity_id, "reset": done})
    elif not done:
        click.echo(
            f"nothing to reset: no bucket for {entity_id}" + (f"/{resource}" if resource else "")
        )
    else:
        for entry in done:
            what = entry["limits"] if entry["limits"] == "all" else ", ".join(entry["limits"])
            click.echo(f"reset {entity_id}/{entry['resource']}: {what}")


# -- backups and restores ---------------------------------------------------------------------


def _backup_dir_option(fn: Callable[P, R]) -> Callable[P, R]:
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
@_common()
@_backup_dir_option
@click.option(
    "--export",
    "force_export",
    is_flag=True,
    help="Write a JSON export even on AWS (a Scan of the whole table).",
)
@click.option("--label", default="manual", show_default=True, help="Part of the backup's name.")
def backup_create(
    name: str,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
    backup_dir: Path,
    force_export: bool,
    label: str,
) -> None:
    """Back up the table now."""
    target = _target(name, region, endpoint_url, as_json)
    local = target.local or force_export
    taken = _run(
        target, lambda repo: ops.backup(repo, local=local, backup_dir=backup_dir, label=label)
    )
    if as_json:
        emit_json(taken)
    else:
        _console().print(kv_table(f"backup of {target.table}", taken))


@backup.command("list")
@_common()
@_backup_dir_option
def backup_list(
    name: str, region: str, endpoint_url: str | None, as_json: bool, backup_dir: Path
) -> None:
    """Backups of the table (AWS backups, or the exports in --backup-dir)."""
    target = _target(name, region, endpoint_url, as_json)
    found = ops.list_exports(backup_dir, target.table)
    if not target.local:
        found = _run(target, ops.list_backups) + found
    if as_json:
        emit_json(found)
    else:
        _console().print(
            _rows_table(
                f"backups of {target.table}", ["kind", "id", "created", "items", "status"], found
            )
        )


@main.command("restore")
@_common()
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
    name: str,
    region: str,
    endpoint_url: str | None,
    as_json: bool,
    source: Path | None,
    backup_arn: str | None,
    yes: bool,
) -> None:
    """Restore the table: re-import a JSON export (--from), or print the AWS restore commands
    (on-demand backup or point-in-time recovery; DynamoDB restores into a new table)."""
    target = _target(name, region, endpoint_url, as_json)
    if source is None:
        hints = ops.restore_hints(target.name, target.region, backup_arn)
        if as_json:
            emit_json({"table": target.table, "commands": hints})
        else:
            for line in hints:
                click.echo(line)
            if target.local:
                click.echo(
                    f"# local endpoint: zae-limiter restore --name {target.name} "
                    f"--endpoint-url {target.endpoint_url} --from <export.json>"
                )
        return
    document = ops.read_export(source)
    _confirm(
        yes,
        f"Replace every item of {target.table} with the {document.get('item_count')} "
        f"items of {source} (exported {document.get('exported_at')})?",
    )
    result = _run(target, lambda repo: ops.import_table(repo, source))
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"restored {result['restored_items']} items into {target.table} from {source}"
            f" ({result['deleted_items']} items not in the export removed)"
        )
