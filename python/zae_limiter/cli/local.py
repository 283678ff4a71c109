"""`zae-limiter local` and `zae-limiter demo`: the embedded DynamoDB and the demo workload."""

from __future__ import annotations

import asyncio
import os
import time

import click
from rich.console import Console
from rich.table import Table

from ..demo import DemoReport
from ..local import LOCAL_CREDENTIALS, LocalDynamoDB
from . import main

console = Console()


def _local_credentials() -> None:
    # moto accepts anything; without these botocore would look for (and maybe use) real ones.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", LOCAL_CREDENTIALS["aws_access_key_id"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", LOCAL_CREDENTIALS["aws_secret_access_key"])
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@main.command()
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default: a free one).")
def local(port: int | None) -> None:
    """Serve an embedded DynamoDB (moto) on 127.0.0.1 until interrupted."""
    with LocalDynamoDB(port=port) as db:
        console.print(f"[bold green]DynamoDB endpoint:[/] {db.endpoint_url}")
        console.print(f"  try: zae-limiter demo --endpoint-url {db.endpoint_url}")
        console.print("Press Ctrl+C to stop.")
        try:
            while db.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


@main.command()
@click.option("--name", default="demo", show_default=True, help="Limiter name (table ZAEL-<name>).")
@click.option(
    "--endpoint-url",
    default=None,
    help="Use this DynamoDB endpoint instead of starting an embedded one.",
)
@click.option("--keys", default=3, show_default=True, help="API keys under the project.")
@click.option("--clients", default=2, show_default=True, help="Concurrent clients per key.")
@click.option("--requests", default=12, show_default=True, help="Requests per client.")
def demo(name: str, endpoint_url: str | None, keys: int, clients: int, requests: int) -> None:
    """Run an LLM-gateway workload on an embedded DynamoDB and summarize it."""
    _local_credentials()
    if endpoint_url is not None:
        _run_demo(name, endpoint_url, keys, clients, requests)
        return
    with console.status("Starting the embedded DynamoDB..."), LocalDynamoDB() as db:
        console.print(f"Embedded DynamoDB on [bold]{db.endpoint_url}[/]")
        _run_demo(name, db.endpoint_url, keys, clients, requests)


def _run_demo(name: str, endpoint_url: str, keys: int, clients: int, requests: int) -> None:
    from .. import BACKEND
    from ..demo import run_workload
    from ..limiter import RateLimiter
    from ..models import StackOptions

    async def go() -> object:
        async with RateLimiter(
            name=name, endpoint_url=endpoint_url, stack_options=StackOptions()
        ) as limiter:
            return await run_workload(
                limiter, keys=keys, clients_per_key=clients, requests_per_client=requests
            )

    started = time.monotonic()
    report = asyncio.run(go())
    elapsed = time.monotonic() - started
    assert isinstance(report, DemoReport)
    console.print(
        f"\n[bold]{report.acquires}[/] chat requests from {keys * clients} concurrent clients "
        f"on {keys} API keys of project [bold]acme-project[/] "
        f"(core: {BACKEND}, {elapsed:.1f}s)\n"
    )
    table = Table(
        title="API keys (per-key limits: "
        + ", ".join(f"{lim.name} {lim.capacity}/min" for lim in report.key_limits)
        + ")"
    )
    for column in (
        "entity",
        "admitted",
        "rejected",
        "by project",
        "max retry-after",
        "tokens est.",
        "tokens actual",
        "rpm left",
        "tpm left",
    ):
        table.add_column(column, justify="left" if column == "entity" else "right")
    for key in report.keys:
        table.add_row(
            key.entity_id,
            str(key.admitted),
            str(key.rejected),
            str(key.rejected_by_project),
            f"{key.max_retry_after:.2f}s",
            str(key.tokens_estimated),
            str(key.tokens_actual),
            str(key.remaining.get("rpm")),
            str(key.remaining.get("tpm")),
        )
    console.print(table)
    project = Table(title="Project acme-project (cascade target)")
    project.add_column("limit")
    project.add_column("capacity/min", justify="right")
    project.add_column("remaining", justify="right")
    for limit in report.project_limits:
        project.add_row(
            limit.name, str(limit.capacity), str(report.project_remaining.get(limit.name))
        )
    console.print(project)
    _show_usage(name, endpoint_url, report)
    calls = ", ".join(f"{op} {n}" for op, n in sorted(report.calls.items()))
    console.print(
        f"DynamoDB: {calls}; {report.write_units:g} WCU, {report.read_units:g} RCU "
        f"for {report.acquires} acquires with cascade and adjust."
    )


def _show_usage(name: str, endpoint_url: str, report: DemoReport) -> None:
    """Run the aggregator once over the table's stream and show the snapshots it produced."""
    import boto3

    from .. import schema
    from ..aggregator.stream import StreamRunner
    from ..demo import PROJECT, RESOURCE
    from ..limiter import RateLimiter

    runner = StreamRunner(
        schema.table_name(name),
        boto3.client("dynamodb", endpoint_url=endpoint_url, region_name="us-east-1"),
        boto3.client("dynamodbstreams", endpoint_url=endpoint_url, region_name="us-east-1"),
        schema.USAGE_WINDOWS,
        ttl_days=90,
    )
    result = runner.run_once()

    async def summaries() -> list[object]:
        async with RateLimiter(name=name, endpoint_url=endpoint_url) as limiter:
            return [
                await limiter.get_usage_summary(entity_id, RESOURCE, window="hourly")
                for entity_id in [*(key.entity_id for key in report.keys), PROJECT]
            ]

    table = Table(
        title=f"Usage snapshots by the aggregator ({result.records} stream records, "
        f"{result.snapshots_updated} snapshot writes)"
    )
    # What the client side counted, to check the snapshots against.
    expected = {key.entity_id: (key.admitted, key.tokens_actual) for key in report.keys}
    expected[PROJECT] = (
        sum(key.admitted for key in report.keys),
        sum(key.tokens_actual for key in report.keys),
    )
    for column in ("entity", "hourly snapshots", "rpm used", "tpm used", "matches clients"):
        table.add_column(column, justify="left" if column == "entity" else "right")
    for summary in asyncio.run(summaries()):
        from ..models import UsageSummary

        assert isinstance(summary, UsageSummary)
        table.add_row(
            summary.entity_id,
            str(summary.snapshot_count),
            str(summary.totals.get("rpm", 0)),
            str(summary.totals.get("tpm", 0)),
            "yes"
            if (summary.totals.get("rpm", 0), summary.totals.get("tpm", 0))
            == expected[summary.entity_id]
            else "[red]no[/]",
        )
    console.print(table)
