"""`deploy`, `preview`, `status`, `delete`, `pulumi-program`: a deployment's infrastructure.

Against AWS these drive Pulumi (`zae_limiter.infra.automation`, needs the Pulumi CLI). With
`--endpoint-url` (a local DynamoDB) `deploy`/`status`/`delete` act on the table alone, directly
with boto3 (`zae_limiter.infra.direct`): no Pulumi, no Lambda, no alarms.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click
from rich.console import Console

from .. import schema
from ..exceptions import InfrastructureNotFoundError, ZAELimiterError
from ..infra import InfraOptions, alarm_names, validate_deployment_name
from . import main
from .render import emit_json, kv_table

if TYPE_CHECKING:
    # boto3-stubs[dynamodb] is a dev dependency; without it the client is simply untyped.
    from mypy_boto3_dynamodb import DynamoDBClient  # type: ignore[import-not-found,unused-ignore]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_REGION_ENV = "AWS_DEFAULT_REGION"


def _console() -> Console:
    # Built per call: CliRunner swaps sys.stdout, and a module-level Console would keep the old one.
    return Console(highlight=False, soft_wrap=True)


def _default_region() -> str:
    return os.environ.get(DEFAULT_REGION_ENV) or os.environ.get("AWS_REGION") or "us-east-1"


def _friendly_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Expected failures become one readable line and a non-zero exit, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (ZAELimiterError, ValueError, FileExistsError) as exc:
            raise click.ClickException(str(exc)) from exc
        except Exception as exc:
            # botocore's errors, without importing botocore for the isinstance check.
            if type(exc).__module__.startswith(("botocore", "boto3")):
                raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
            raise

    return wrapper


def _common(fn: Callable[P, R]) -> Callable[P, R]:
    fn = click.option("--endpoint-url", default=None, metavar="URL",
                      help="A local DynamoDB (moto, DynamoDB Local): manage the table directly, "
                           "without Pulumi.")(fn)
    fn = click.option("--region", default=_default_region, show_default="$AWS_DEFAULT_REGION or "
                      "us-east-1", help="AWS region.")(fn)
    fn = click.option("--name", required=True,
                      help="Deployment name: table ZAEL-<name>, stack ZAEL-<name>.")(fn)
    return fn


def _stack_options(fn: Callable[P, R]) -> Callable[P, R]:
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
                given["tags"] = _parse_tags(value)
        elif key == "no_pitr":
            if value:
                given["pitr_recovery_days"] = None
        elif value is not None:
            given[key] = value
    return InfraOptions.from_dict(given)


def _parse_tags(pairs: tuple[str, ...]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--tag")
        tags[key] = value
    return tags


def _dynamodb(endpoint_url: str, region: str) -> DynamoDBClient:
    import boto3

    session = boto3.Session(region_name=region)
    # Local endpoints accept any credentials; don't make people configure real ones for them.
    placeholder = "local" if session.get_credentials() is None else None
    return session.client(
        "dynamodb",
        endpoint_url=endpoint_url,
        aws_access_key_id=placeholder,
        aws_secret_access_key=placeholder,
    )


def _print_engine(line: str) -> None:
    click.echo(line.rstrip("\n"), err=True)



# -- commands ----------------------------------------------------------------------------------


@main.command()
@_common
@_stack_options
@_friendly_errors
def deploy(name: str, region: str, endpoint_url: str | None, **option_values: Any) -> None:
    """Create or update the deployment (table, aggregator, alarms)."""
    short = validate_deployment_name(name)
    options = _build_options(option_values)
    console = _console()
    if endpoint_url:
        from ..infra import direct

        created = direct.ensure_table(_dynamodb(endpoint_url, region), short, options)
        verb = "created" if created else "already exists:"
        console.print(f"table {schema.table_name(short)} {verb} at {endpoint_url}")
        if options.aggregator:
            console.print("local endpoint: table only (no aggregator Lambda, queue or alarms)")
        _record_deployment(short, region, endpoint_url)
        return
    from ..infra import automation

    automation.require_pulumi()
    console.print(f"deploying stack {schema.stack_name(short)} in {region} ...")
    outputs = automation.deploy(short, region, options, on_output=_print_engine)
    _record_deployment(short, region, None)
    console.print(kv_table(f"{schema.stack_name(short)} deployed", outputs))


def _record_deployment(short: str, region: str, endpoint_url: str | None) -> None:
    """Write the version record: the Pulumi program does not, and limiters check it."""
    import asyncio

    from ..repository import Repository
    from ..version import record_deployment

    async def go() -> None:
        async with Repository(schema.table_name(short), region, endpoint_url) as repo:
            await record_deployment(repo)

    asyncio.run(go())


def _version_part(short: str, region: str, endpoint_url: str | None) -> dict[str, Any]:
    from ..ops import version_status

    try:
        return version_status(short, region, endpoint_url)
    except Exception as exc:  # status must still show the rest when the record cannot be read
        return {"error": str(exc)}


def _dlq_depth(region: str, dlq_url: object) -> object:
    if not isinstance(dlq_url, str) or not dlq_url:
        return None
    import boto3

    try:
        attrs = boto3.client("sqs", region_name=region).get_queue_attributes(
            QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"])
    except Exception as exc:  # reported, not fatal: status is a diagnostic
        return f"unavailable: {exc}"


@main.command()
@_common
@_stack_options
@_friendly_errors
def preview(name: str, region: str, endpoint_url: str | None, **option_values: Any) -> None:
    """Show what `deploy` would change, without changing anything."""
    short = validate_deployment_name(name)
    options = _build_options(option_values)
    if endpoint_url:
        raise click.ClickException("preview needs Pulumi; it has no meaning for --endpoint-url")
    from ..infra import automation

    automation.require_pulumi()
    summary = automation.preview(short, region, options, on_output=_print_engine)
    _console().print(kv_table(f"{schema.stack_name(short)}: planned changes", summary))


@main.command()
@_common
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_friendly_errors
def status(name: str, region: str, endpoint_url: str | None, as_json: bool) -> None:
    """Show the deployment: table, stack outputs, last update."""
    short = validate_deployment_name(name)
    if endpoint_url:
        from ..infra import direct

        info = direct.describe(_dynamodb(endpoint_url, region), short)
        if info["exists"]:
            info["version"] = _version_part(short, region, endpoint_url)
        if as_json:
            emit_json(info)
            if not info["exists"]:
                raise SystemExit(1)
            return
        if not info["exists"]:
            raise click.ClickException(
                f"table {info['table_name']} does not exist at {endpoint_url}"
            )
        version = info.pop("version", {})
        _console().print(kv_table(f"table {info['table_name']}", info))
        _console().print(kv_table("versions", version))
        return
    from ..infra import automation

    automation.require_pulumi()
    try:
        info = automation.status(short, region)
    except InfrastructureNotFoundError as exc:
        raise click.ClickException(
            f"{exc} (deploy it with: zae-limiter deploy --name {short})"
        ) from exc
    info["version"] = _version_part(short, region, None)
    info["dlq_depth"] = _dlq_depth(region, info.get("outputs", {}).get("dlq_url"))
    if as_json:
        emit_json(info)
        return
    console = _console()
    console.print(kv_table("versions", info["version"]))
    console.print(f"aggregator DLQ depth: {info['dlq_depth']}")
    console.print(kv_table(f"stack {info['stack']} ({info['region']})", info["outputs"]))
    if info["options"]:
        console.print(kv_table("options (non-default)", info["options"]))
    last = info.get("last_update")
    if last:
        console.print(f"last update: {last['kind']} {last['result']} at {last['ended']}")


@main.command()
@_common
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_friendly_errors
def delete(name: str, region: str, endpoint_url: str | None, yes: bool) -> None:
    """Delete the deployment. A table with deletion protection is kept."""
    short = validate_deployment_name(name)
    table = schema.table_name(short)
    console = _console()
    if endpoint_url:
        from ..infra import direct

        if not yes:
            click.confirm(f"Delete table {table} and all its data at {endpoint_url}?", abort=True)
        deleted = direct.delete_table(_dynamodb(endpoint_url, region), short)
        console.print(f"table {table} deleted" if deleted else f"table {table} did not exist")
        return
    from ..infra import automation

    automation.require_pulumi()
    if not yes:
        click.confirm(
            f"Destroy stack {schema.stack_name(short)} in {region} (Lambda, queue, alarms, and the "
            f"table unless it has deletion protection)?",
            abort=True,
        )
    automation.destroy(short, region, on_output=_print_engine)
    console.print(f"stack {schema.stack_name(short)} destroyed")
    console.print(
        f"a table with deletion protection ({table}) is retained with its data; "
        f"redeploy with --adopt-existing-table to manage it again, or delete it in AWS"
    )


@main.command("pulumi-program")
@_common
@_stack_options
@click.option("--output", "output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the Pulumi project to.")
@click.option("--force", is_flag=True, help="Overwrite an existing project in the directory.")
@_friendly_errors
def pulumi_program(name: str, region: str, endpoint_url: str | None, output: Path, force: bool,
                   **option_values: Any) -> None:
    """Write a standalone Pulumi project for the deployment, to run `pulumi up` by hand."""
    short = validate_deployment_name(name)
    options = _build_options(option_values)
    if endpoint_url:
        raise click.ClickException("--endpoint-url does not apply to a Pulumi program")
    if (output / "Pulumi.yaml").exists() and not force:
        raise click.ClickException(f"{output / 'Pulumi.yaml'} exists; use --force to overwrite")
    from ..infra import automation

    written = automation.write_program(output, short, region, options)
    console = _console()
    console.print(f"wrote Pulumi project for {schema.stack_name(short)} to {output}:")
    for path in written:
        console.print(f"  {path.name}")
    console.print(f"alarms: {', '.join(alarm_names(short, options.aggregator).values())}")
    console.print(f"next: cd {output} && pulumi stack select --create {schema.stack_name(short)}"
                  " && pulumi up")
