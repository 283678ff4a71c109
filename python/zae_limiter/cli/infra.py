"""`deploy`, `preview`, `status`, `delete`, `pulumi-program`: a deployment's infrastructure.

Against AWS these drive Pulumi (`zae_limiter.infra.automation`, needs the Pulumi CLI). With
`--endpoint-url` (a local DynamoDB) `deploy`/`status`/`delete` act on the table alone, directly
with boto3 (`zae_limiter.ops.table`): no Pulumi, no Lambda, no alarms. `deploy --table-only` does
the same on AWS (`zae_limiter.ops.readiness`): the table and its version record, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import schema
from ..infra import InfraOptions, alarm_names
from ..ops import readiness
from ..ops import recovery as ops
from . import main
from .toolkit import (
    EXIT_FAILED,
    Output,
    Target,
    confirm,
    fields_table,
    key_values,
    not_found,
    target_options,
)

if TYPE_CHECKING:
    from ..storage.dynamodb.repository import Repository

_NAME_HELP = "Deployment name: table ZAEL-<name>, stack ZAEL-<name>."
_ENDPOINT_HELP = (
    "A local DynamoDB (moto, DynamoDB Local): manage the table directly, without Pulumi."
)


def _target_options(*, json_output: bool = False) -> Callable[[Callable[..., Any]], Any]:
    return target_options(
        json_output=json_output, name_help=_NAME_HELP, endpoint_help=_ENDPOINT_HELP
    )


def _stack_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Every flag defaults to None ("not given") so InfraOptions' defaults stay the only defaults.
    flags: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--aggregator/--no-aggregator", default=None,
                     help="Deploy the usage aggregator Lambda (default: yes)."),
        click.option("--usage-windows", default=None, metavar="LIST",
                     help=f"Comma list of snapshot windows (default: "
                          f"{','.join(schema.USAGE_WINDOWS)})."),
        click.option("--snapshot-ttl-days", type=int, default=None),
        click.option("--pitr-recovery-days", type=click.IntRange(1, 35), default=None,
                     help="Point-in-time recovery period (default 35)."),
        click.option("--no-pitr", is_flag=True, default=False,
                     help="Turn point-in-time recovery off."),
        click.option("--deletion-protection/--no-deletion-protection", default=None),
        click.option("--billing-mode", type=click.Choice(["PAY_PER_REQUEST", "PROVISIONED"]),
                     default=None),
        click.option("--read-capacity", type=int, default=None),
        click.option("--write-capacity", type=int, default=None),
        click.option("--lambda-memory", "lambda_memory_mb", type=int, default=None),
        click.option("--lambda-timeout", "lambda_timeout_seconds", type=int, default=None),
        click.option("--log-retention-days", type=int, default=None),
        click.option("--alarm-sns-topic", "alarm_sns_topic_arn", default=None, metavar="ARN"),
        click.option("--iterator-age-threshold-ms", type=int, default=None),
        click.option("--duration-threshold-pct", type=int, default=None),
        click.option("--kms-key-arn", default=None, metavar="ARN"),
        click.option("--permission-boundary", default=None, metavar="ARN"),
        click.option("--role-name-format", default=None, metavar="FORMAT",
                     help="Aggregator role name, '{}' standing for ZAEL-<name>-aggregator-role."),
        click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE"),
        click.option("--alarms/--no-alarms", default=None),
        click.option("--app-policy", "create_app_policy", is_flag=True, default=None,
                     help="Also create managed policy ZAEL-<name>-app for applications."),
        click.option("--adopt-existing-table", is_flag=True, default=None,
                     help="Take over an existing table (one a previous delete retained)."),
        click.option("--log-level", default=None,
                     type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                       case_sensitive=False)),
    ]
    for flag in reversed(flags):
        fn = flag(fn)
    return fn


def _build_options(values: dict[str, Any]) -> InfraOptions:
    given: dict[str, Any] = {}
    for key, value in values.items():
        if key == "tags":
            if value:
                given["tags"] = key_values(value, "--tag")
        elif key == "no_pitr":
            if value:
                given["point_in_time_recovery"] = False
        elif value is not None:
            given[key] = value
    return InfraOptions.from_dict(given)


def _print_engine(line: str) -> None:
    click.echo(line.rstrip("\n"), err=True)


def _record_deployment(target: Target) -> None:
    """Write the version record: the Pulumi program does not, and limiters check it."""
    from ..version import record_deployment

    target.run(record_deployment)


def _version_part(target: Target) -> dict[str, Any]:
    try:
        return target.run(ops.version_status_async)
    except Exception as exc:  # status must still show the rest when the record cannot be read
        return {"error": str(exc)}


def _dlq_depth(target: Target, dlq_url: object) -> object:
    if not isinstance(dlq_url, str) or not dlq_url:
        return None
    try:
        attrs = target.client("sqs").get_queue_attributes(
            QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"])
    except Exception as exc:  # reported, not fatal: status is a diagnostic
        return f"unavailable: {exc}"


# -- commands ----------------------------------------------------------------------------------


# The flags `deploy --table-only` takes: what CreateTable itself sets. The rest configure the
# Pulumi stack's other parts, and silently ignoring one would deploy less than was asked for.
# Turning off what the table only never has (`--no-aggregator`, `--no-pitr`, ...) is consistent
# with it, so only values that ask for more are refused.
_TABLE_ONLY_OPTIONS = frozenset(
    {"billing_mode", "read_capacity", "write_capacity", "tags", "no_pitr"}
)


def _deploy_table_only(target: Target, out: Output, option_values: dict[str, Any]) -> None:
    given = sorted(
        f"--{key.replace('_', '-')}" for key, value in option_values.items()
        if key not in _TABLE_ONLY_OPTIONS and value not in (None, False, ())
    )
    if given:
        raise click.UsageError(
            f"--table-only deploys the table alone; {', '.join(given)} configure(s) the Pulumi "
            "stack: drop --table-only to deploy the whole stack"
        )
    options = _build_options(option_values)
    where = f"at {target.endpoint_url}" if target.endpoint_url else f"in {target.region}"

    async def work(repo: Repository) -> dict[str, Any]:
        done = await readiness.deploy_table(repo, options)
        checks = await readiness.check_table(
            repo, region=target.region, endpoint_url=target.endpoint_url,
            cli_args=target.options_text,
        )
        return {**done, "checks": checks}

    result = target.run(work)
    checks: list[readiness.Check] = result.pop("checks")
    ready = readiness.table_ready(checks)
    data = {"table": target.table, "where": target.where, "ready": ready, **result,
            "checks": [c.as_dict() for c in checks]}
    if result["created"]:
        head = f"table {target.table} created {where}"
    elif ready and not result["version_record_written"]:
        head = f"table {target.table} already exists {where} and is ready: nothing to do"
    elif result["version_record_written"]:
        head = f"table {target.table} already exists {where}; its missing version record written"
    else:
        head = f"table {target.table} already exists {where}"
    lines = [head, *readiness.lines(checks)]
    if not ready:
        out.show(data, *lines)
        raise click.exceptions.Exit(EXIT_FAILED)
    lines.append("table only: no aggregator Lambda, alarms, point-in-time recovery or "
                 "deletion protection (drop --table-only for the Pulumi stack)")
    region = "" if target.endpoint_url else f", region={target.region!r}"
    lines.append(f"next: RateLimiter(name={target.name!r}{region})")
    out.show(data, *lines)


@main.command()
@_target_options(json_output=True)
@_stack_options
@click.option("--table-only", is_flag=True, default=False,
              help="Create only the table (keys, GSI1, stream, TTL) and its version record, "
                   "with boto3 and your AWS credentials: no Pulumi, no aggregator or alarms.")
def deploy(target: Target, out: Output, table_only: bool, **option_values: Any) -> None:
    """Create or update the deployment (table, aggregator, alarms)."""
    if table_only:
        _deploy_table_only(target, out, option_values)
        return
    options = _build_options(option_values)
    if target.endpoint_url:
        from ..ops import table as direct

        created = direct.ensure_table(target.client("dynamodb"), target.name, options)
        verb = "created" if created else "already exists:"
        lines = [f"table {target.table} {verb} at {target.endpoint_url}"]
        if options.aggregator:
            lines.append("local endpoint: table only (no aggregator Lambda, queue or alarms)")
        _record_deployment(target)
        out.show({"table": target.table, "where": target.where, "created": created}, *lines)
        return
    from ..infra import automation

    automation.require_pulumi()
    out.note(f"deploying stack {target.stack} in {target.region} ...")
    outputs = automation.deploy(target.name, target.region, options, on_output=_print_engine)
    _record_deployment(target)
    out.show(outputs, fields_table(f"{target.stack} deployed", outputs))


@main.command()
@_target_options()
@_stack_options
def preview(target: Target, out: Output, **option_values: Any) -> None:
    """Show what `deploy` would change, without changing anything."""
    options = _build_options(option_values)
    if target.endpoint_url:
        raise click.ClickException("preview needs Pulumi; it has no meaning for --endpoint-url")
    from ..infra import automation

    automation.require_pulumi()
    summary = automation.preview(target.name, target.region, options, on_output=_print_engine)
    out.show(summary, fields_table(f"{target.stack}: planned changes", summary))


@main.command()
@_target_options(json_output=True)
def status(target: Target, out: Output) -> None:
    """Show the deployment: table, stack outputs, last update."""
    if target.endpoint_url:
        from ..ops import table as direct

        info = direct.describe(target.client("dynamodb"), target.name)
        if not info["exists"]:
            out.fail(info, not_found(f"table {target.table}", target))
        info["version"] = _version_part(target)
        table = {k: v for k, v in info.items() if k != "version"}
        out.show(
            info,
            fields_table(f"table {info['table_name']}", table),
            fields_table("versions", info["version"]),
        )
        return
    from ..infra import automation

    automation.require_pulumi()
    info = automation.status(target.name, target.region)  # a missing stack: cli_errors' advice
    info["version"] = _version_part(target)
    info["dlq_depth"] = _dlq_depth(target, info.get("outputs", {}).get("dlq_url"))
    last = info.get("last_update")
    out.show(
        info,
        fields_table("versions", info["version"]),
        f"aggregator DLQ depth: {info['dlq_depth']}",
        fields_table(f"stack {info['stack']} ({info['region']})", info["outputs"]),
        *([fields_table("options (non-default)", info["options"])] if info["options"] else []),
        *([f"last update: {last['kind']} {last['result']} at {last['ended']}"] if last else []),
    )


@main.command()
@_target_options()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(target: Target, out: Output, yes: bool) -> None:
    """Delete the deployment. A table with deletion protection is kept."""
    if target.endpoint_url:
        from ..ops import table as direct

        confirm(yes, f"Delete table {target.table} and all its data at {target.endpoint_url}?")
        deleted = direct.delete_table(target.client("dynamodb"), target.name)
        out.show(None, f"table {target.table} " + ("deleted" if deleted else "did not exist"))
        return
    from ..infra import automation

    automation.require_pulumi()
    confirm(
        yes,
        f"Destroy stack {target.stack} in {target.region} (Lambda, queue, alarms, and the "
        f"table unless it has deletion protection)?",
    )
    automation.destroy(target.name, target.region, on_output=_print_engine)
    out.show(
        None,
        f"stack {target.stack} destroyed",
        f"a table with deletion protection ({target.table}) is retained with its data; "
        f"redeploy with --adopt-existing-table to manage it again, or delete it in AWS",
    )


@main.command("pulumi-program")
@_target_options()
@_stack_options
@click.option("--output", "output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the Pulumi project to.")
@click.option("--force", is_flag=True, help="Overwrite an existing project in the directory.")
def pulumi_program(target: Target, out: Output, output: Path, force: bool,
                   **option_values: Any) -> None:
    """Write a standalone Pulumi project for the deployment, to run `pulumi up` by hand."""
    options = _build_options(option_values)
    if target.endpoint_url:
        raise click.ClickException("--endpoint-url does not apply to a Pulumi program")
    if (output / "Pulumi.yaml").exists() and not force:
        raise click.ClickException(f"{output / 'Pulumi.yaml'} exists; use --force to overwrite")
    from ..infra import automation

    written = automation.write_program(output, target.name, target.region, options)
    out.show(
        None,
        f"wrote Pulumi project for {target.stack} to {output}:",
        *(f"  {path.name}" for path in written),
        f"alarms: {', '.join(alarm_names(target.name, options.aggregator).values())}",
        f"next: cd {output} && pulumi stack select --create {target.stack} && pulumi up",
    )
