"""`zae-limiter aggregator run`, `zae-limiter usage` and `zae-limiter dlq replay`.

Synchronous boto3 is enough here: each command is a short sequence of calls.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.table import Table

from .. import schema
from ..aggregator.snapshots import WINDOWS, parse_windows
from ..models import UsageSnapshot
from ..usage import parse_time, query_args, snapshot_from_item, summarize
from . import main

P = ParamSpec("P")
R = TypeVar("R")

BAR_WIDTH = 40


def _readable_errors(func: Callable[P, R]) -> Callable[P, R]:
    """AWS and input errors become one line (click.ClickException), never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise click.ClickException(
                f"{error.get('Code', 'Error')}: {error.get('Message', exc)}"
            ) from None
        except (BotoCoreError, ValueError, RuntimeError, OSError) as exc:
            raise click.ClickException(str(exc) or type(exc).__name__) from None

    return wrapper


def _clients(region: str | None, endpoint_url: str | None) -> Callable[[str], Any]:
    import boto3
    from botocore.config import Config

    from ..local import LOCAL_CREDENTIALS, LOCAL_REGION

    session = boto3.session.Session(region_name=region)
    kwargs: dict[str, Any] = {"config": Config(retries={"max_attempts": 3, "mode": "standard"})}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
        if session.region_name is None:
            kwargs["region_name"] = LOCAL_REGION
        if session.get_credentials() is None:
            # A local endpoint (moto) accepts anything; don't make the operator invent keys.
            kwargs.update(LOCAL_CREDENTIALS)
    elif session.region_name is None:
        raise click.ClickException("no AWS region: pass --region or set AWS_REGION")

    def make(service: str) -> Any:
        return session.client(service, **kwargs)  # type: ignore[call-overload]

    return make


def _aws_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--region", help="AWS region.")(func)
    func = click.option("--endpoint-url", help="Endpoint (e.g. a local moto server).")(func)
    func = click.option("--name", required=True, help="Limiter name (table ZAEL-<name>).")(func)
    return func


def _windows(spec: str) -> tuple[str, ...]:
    try:
        return parse_windows(spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--windows") from None


# ---------------------------------------------------------------------------
# aggregator run
# ---------------------------------------------------------------------------


@main.group()
def aggregator() -> None:
    """Run the usage aggregator locally (the deployed one runs in Lambda)."""


@aggregator.command("run")
@_aws_options
@click.option("--follow", is_flag=True, help="Keep polling for new records.")
@click.option("--duration", type=float, help="With --follow: stop after this many seconds.")
@click.option("--windows", default=",".join(WINDOWS), show_default=True,
              help="Usage windows to aggregate.")
@click.option("--ttl-days", type=click.IntRange(min=1), default=90, show_default=True,
              help="Snapshot time-to-live after the window's end.")
@click.option("--checkpoint-file", type=click.Path(dir_okay=False),
              help="Resume from / save the last sequence number per shard here.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@_readable_errors
def run(name: str, endpoint_url: str | None, region: str | None, follow: bool,
        duration: float | None, windows: str, ttl_days: int, checkpoint_file: str | None,
        as_json: bool) -> None:
    """Fold the table's stream into usage snapshots (one pass unless --follow)."""
    from ..aggregator.stream import StreamRunner

    client = _clients(region, endpoint_url)
    runner = StreamRunner(schema.table_name(name), client("dynamodb"), client("dynamodbstreams"),
                          _windows(windows), ttl_days, checkpoint_file=checkpoint_file)
    try:
        result = runner.follow(duration) if follow else runner.run_once()
    except KeyboardInterrupt:
        raise click.ClickException("interrupted") from None
    counts = result.as_dict()
    click.echo(json.dumps(counts) if as_json else " ".join(f"{k}={v}" for k, v in counts.items()))
    if result.failed:
        raise click.ClickException(
            f"{result.failed} record(s) could not be applied (see the error log lines)"
        )


# ---------------------------------------------------------------------------
# usage
# ---------------------------------------------------------------------------


def _query_snapshots(ddb: Any, table: str, entity: str, resource: str | None, window: str,
                     start: datetime, end: datetime) -> list[UsageSnapshot]:
    args = query_args(table, entity, resource, window, start, end)
    snapshots: list[UsageSnapshot] = []
    while True:
        page = ddb.query(**args)
        snapshots.extend(snapshot_from_item(item) for item in page.get("Items", []))
        if "LastEvaluatedKey" not in page:
            break
        args["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return sorted(snapshots, key=lambda s: (s.window_start, s.resource))


def _bar(value: int, peak: int) -> str:
    if peak <= 0 or value <= 0:
        return ""
    return "█" * max(1, round(BAR_WIDTH * value / peak))


@main.command()
@_aws_options
@click.option("--entity", required=True, help="Entity id.")
@click.option("--resource", help="Resource (default: all resources).")
@click.option("--window", type=click.Choice(list(WINDOWS)), default="hourly", show_default=True)
@click.option("--start", help="ISO-8601 start (default: 24 h, or 30 days for daily, ago).")
@click.option("--end", help="ISO-8601 end, inclusive (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print snapshots and summary as JSON.")
@_readable_errors
def usage(name: str, endpoint_url: str | None, region: str | None, entity: str,
          resource: str | None, window: str, start: str | None, end: str | None,
          as_json: bool) -> None:
    """Show an entity's usage snapshots, totals and a chart over time."""
    end_at = parse_time(end) if end else datetime.now(UTC)
    span = timedelta(days=30) if window == "daily" else timedelta(hours=24)
    start_at = parse_time(start) if start else end_at - span
    if start_at > end_at:
        raise click.BadParameter("--start is after --end", param_hint="--start")
    ddb = _clients(region, endpoint_url)("dynamodb")
    snapshots = _query_snapshots(ddb, schema.table_name(name), entity, resource, window,
                                 start_at, end_at)
    summary = summarize(snapshots, entity, resource, window, start_at, end_at)
    if as_json:
        click.echo(json.dumps({
            "summary": summary.__dict__,
            "snapshots": [s.__dict__ for s in snapshots],
        }, indent=2))
        return

    console = Console()
    if not snapshots:
        console.print(f"No {window} usage for {entity} between {summary.start} and {summary.end}.")
        return
    limits = sorted(summary.totals)
    several = len({s.resource for s in snapshots}) > 1
    table = Table(title=f"{window} usage of {entity}" + (f" on {resource}" if resource else ""))
    table.add_column("window start")
    if several:
        table.add_column("resource")
    for limit in limits:
        table.add_column(limit, justify="right")
    for s in snapshots:
        row = [s.window_start] + ([s.resource] if several else [])
        table.add_row(*row, *(f"{s.counters.get(limit, 0):,}" for limit in limits))
    table.add_section()
    table.add_row("total", *([""] if several else []), *(f"{summary.totals[x]:,}" for x in limits))
    table.add_row("average", *([""] if several else []),
                  *(f"{summary.averages[x]:,.1f}" for x in limits))
    console.print(table)

    for limit in limits:
        per_window: dict[str, int] = {}
        for s in snapshots:
            amount = s.counters.get(limit, 0)
            per_window[s.window_start] = per_window.get(s.window_start, 0) + amount
        peak = max(per_window.values(), default=0)
        console.print(f"\n[bold]{limit}[/bold] (net tokens per {window} window)")
        for start_key, value in per_window.items():
            console.print(f"{start_key:>17} │{_bar(value, peak)} {value:,}", highlight=False)


# ---------------------------------------------------------------------------
# dlq replay
# ---------------------------------------------------------------------------


@main.group()
def dlq() -> None:
    """The aggregator's dead-letter queue."""


@dlq.command("replay")
@_aws_options
@click.option("--max-messages", type=click.IntRange(min=1), help="Stop after this many.")
@click.option("--windows", default=",".join(WINDOWS), show_default=True,
              help="Usage windows the deployment aggregates.")
@click.option("--ttl-days", type=click.IntRange(min=1), default=90, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@_readable_errors
def replay(name: str, endpoint_url: str | None, region: str | None, max_messages: int | None,
           windows: str, ttl_days: int, as_json: bool) -> None:
    """Reprocess the records of failed batches and delete the messages that succeed."""
    from ..aggregator import dlq as dlq_replay
    from ..aggregator.handler import SnapshotTable

    client = _clients(region, endpoint_url)
    sqs = client("sqs")
    queue = schema.aggregator_dlq_name(name)
    try:
        queue_url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    except sqs.exceptions.QueueDoesNotExist:
        raise click.ClickException(f"queue {queue} does not exist") from None
    table = SnapshotTable(client("dynamodb"), schema.table_name(name))
    result = dlq_replay.replay(sqs, queue_url, client("dynamodbstreams"), table,
                               _windows(windows), ttl_days, max_messages=max_messages)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        counts = {k: v for k, v in result.as_dict().items() if k != "errors"}
        click.echo(" ".join(f"{k}={v}" for k, v in counts.items()))
        for error in result.errors:
            click.echo(f"failed: {error}", err=True)
    if result.failed:
        raise click.ClickException(f"{result.failed} message(s) could not be replayed; kept")
