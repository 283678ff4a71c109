"""`zae-limiter aggregator run`, `zae-limiter usage` and `zae-limiter dlq replay`.

Synchronous boto3 is enough for the stream and the queue: each command is a short sequence of
calls. Snapshots are read through the library's one reader (`Repository.get_usage_snapshots`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import click
from rich.text import Text

from ..core.windows import WINDOWS, parse_windows
from ..models import UsageSnapshot
from ..usage import parse_time, summarize
from . import main
from .toolkit import Output, Target, new_table, plain, target_options

BAR_WIDTH = 40
CLIENT_RETRIES = 3


def _windows(spec: str) -> tuple[str, ...]:
    try:
        return parse_windows(spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--windows") from None


def _counts_line(counts: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items())


# ---------------------------------------------------------------------------
# aggregator run
# ---------------------------------------------------------------------------


@main.group()
def aggregator() -> None:
    """Run the usage aggregator locally (the deployed one runs in Lambda)."""


@aggregator.command("run")
@target_options()
@click.option("--follow", is_flag=True, help="Keep polling for new records.")
@click.option("--duration", type=float, help="With --follow: stop after this many seconds.")
@click.option("--windows", default=",".join(WINDOWS), show_default=True,
              help="Usage windows to aggregate.")
@click.option("--ttl-days", type=click.IntRange(min=1), default=90, show_default=True,
              help="Snapshot time-to-live after the window's end.")
@click.option("--checkpoint-file", type=click.Path(dir_okay=False),
              help="Resume from / save the last sequence number per shard here.")
def run(target: Target, out: Output, follow: bool, duration: float | None, windows: str,
        ttl_days: int, checkpoint_file: str | None) -> None:
    """Fold the table's stream into usage snapshots (one pass unless --follow)."""
    from ..aggregator.stream import StreamRunner

    runner = StreamRunner(target.table, target.client("dynamodb", retries=CLIENT_RETRIES),
                          target.client("dynamodbstreams", retries=CLIENT_RETRIES),
                          _windows(windows), ttl_days, checkpoint_file=checkpoint_file)
    result = runner.follow(duration) if follow else runner.run_once()
    counts = result.as_dict()
    out.show(counts, _counts_line(counts))
    if result.failed:
        raise click.ClickException(
            f"{result.failed} record(s) could not be applied (see the error log lines)"
        )


# ---------------------------------------------------------------------------
# usage
# ---------------------------------------------------------------------------


def _query_snapshots(target: Target, entity: str, resource: str | None, window: str,
                     start: datetime, end: datetime) -> list[UsageSnapshot]:
    """The library's one reading of snapshots (`Repository.get_usage_snapshots`)."""
    return target.run(lambda repo: repo.get_usage_snapshots(entity, resource, window, start, end))


def _bar(value: int, peak: int) -> str:
    if peak <= 0 or value <= 0:
        return ""
    return "█" * max(1, round(BAR_WIDTH * value / peak))


def _charts(snapshots: list[UsageSnapshot], limits: list[str], window: str) -> list[Any]:
    parts: list[Any] = []
    for limit in limits:
        per_window: dict[str, int] = {}
        for s in snapshots:
            amount = s.counters.get(limit, 0)
            per_window[s.window_start] = per_window.get(s.window_start, 0) + amount
        peak = max(per_window.values(), default=0)
        parts.append(Text.assemble("\n", (limit, "bold"), f" (net tokens per {window} window)"))
        parts.extend(
            f"{start_key:>17} │{_bar(value, peak)} {value:,}"
            for start_key, value in per_window.items()
        )
    return parts


@main.command()
@target_options()
@click.option("--entity", required=True, help="Entity id.")
@click.option("--resource", help="Resource (default: all resources).")
@click.option("--window", type=click.Choice(list(WINDOWS)), default="hourly", show_default=True)
@click.option("--start", help="ISO-8601 start (default: 24 h, or 30 days for daily, ago).")
@click.option("--end", help="ISO-8601 end, inclusive (default: now).")
def usage(target: Target, out: Output, entity: str, resource: str | None, window: str,
          start: str | None, end: str | None) -> None:
    """Show an entity's usage snapshots, totals and a chart over time."""
    end_at = parse_time(end) if end else datetime.now(UTC)
    span = timedelta(days=30) if window == "daily" else timedelta(hours=24)
    start_at = parse_time(start) if start else end_at - span
    if start_at > end_at:
        raise click.BadParameter("--start is after --end", param_hint="--start")
    snapshots = _query_snapshots(target, entity, resource, window, start_at, end_at)
    summary = summarize(snapshots, entity, resource, window, start_at, end_at)
    data = {"summary": summary.__dict__, "snapshots": [s.__dict__ for s in snapshots]}
    if not snapshots:
        out.show(data, f"No {window} usage for {entity} between {summary.start} and {summary.end}.")
        return
    limits = sorted(summary.totals)
    several = len({s.resource for s in snapshots}) > 1
    table = new_table(
        f"{window} usage of {entity}" + (f" on {resource}" if resource else ""),
        ["window start", *(["resource"] if several else []), *limits],
        right=limits,
    )
    for s in snapshots:
        row = [plain(s.window_start)] + ([plain(s.resource)] if several else [])
        table.add_row(*row, *(f"{s.counters.get(limit, 0):,}" for limit in limits))
    table.add_section()
    table.add_row("total", *([""] if several else []), *(f"{summary.totals[x]:,}" for x in limits))
    table.add_row("average", *([""] if several else []),
                  *(f"{summary.averages[x]:,.1f}" for x in limits))
    out.show(data, table, *_charts(snapshots, limits, window))


# ---------------------------------------------------------------------------
# dlq replay
# ---------------------------------------------------------------------------


@main.group()
def dlq() -> None:
    """The aggregator's dead-letter queue."""


@dlq.command("replay")
@target_options()
@click.option("--max-messages", type=click.IntRange(min=1), help="Stop after this many.")
@click.option("--windows", default=",".join(WINDOWS), show_default=True,
              help="Usage windows the deployment aggregates.")
@click.option("--ttl-days", type=click.IntRange(min=1), default=90, show_default=True)
def replay(target: Target, out: Output, max_messages: int | None, windows: str,
           ttl_days: int) -> None:
    """Reprocess the records of failed batches and delete the messages that succeed.

    Only the stream-failure pointers Lambda writes are replayed, their records re-read from the
    table's stream; any other message (one carrying records, say) is rejected: reported, never
    applied, and kept in the queue."""
    from .. import schema
    from ..aggregator import dlq as dlq_replay
    from ..aggregator.handler import SnapshotTable
    from .toolkit import Stderr

    sqs = target.client("sqs", retries=CLIENT_RETRIES)
    queue = schema.aggregator_dlq_name(target.name)
    try:
        queue_url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    except sqs.exceptions.QueueDoesNotExist:
        raise click.ClickException(f"queue {queue} does not exist") from None
    table = SnapshotTable(target.client("dynamodb", retries=CLIENT_RETRIES), target.table)
    result = dlq_replay.replay(sqs, queue_url,
                               target.client("dynamodbstreams", retries=CLIENT_RETRIES), table,
                               _windows(windows), ttl_days, max_messages=max_messages)
    counts = result.as_dict()
    out.show(counts, _counts_line({k: v for k, v in counts.items() if k != "errors"}),
             *(Stderr(f"failed: {error}") for error in result.errors))
    problems = []
    if result.failed:
        problems.append(f"{result.failed} message(s) could not be replayed")
    if result.rejected:
        problems.append(f"{result.rejected} message(s) rejected as not stream-failure records "
                        "(not applied)")
    if problems:
        raise click.ClickException("; ".join(problems) + "; kept in the queue")
