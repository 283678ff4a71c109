"""`zae-limiter local` and `zae-limiter demo`: the embedded DynamoDB and the demo workload."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from ..ops.demo import DemoReport
from ..ops.local import LocalDynamoDB
from ..storage.dynamodb.endpoint import LOCAL_REGION
from . import main
from .toolkit import MissingExtra, Target, cli_errors, console, markup, new_table, use_target

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

# Signals that stop `zae-limiter local` like Ctrl+C (SIGINT) does. Any other end of the process
# (SIGKILL, a crash) takes the moto child with it too: it watches its parent (`LocalDynamoDB`).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """`kill <pid>` (or a closed terminal) stops the server like Ctrl+C does, and the moto child
    is stopped cleanly too."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, stop)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@main.command()
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default: a free one).")
@cli_errors
def local(port: int | None) -> None:
    """Serve an embedded DynamoDB (moto) on 127.0.0.1 until interrupted."""
    out = console()
    # The signal handlers come first: a SIGTERM while the child starts stops it too (`start`).
    with _stop_on_sigterm(), LocalDynamoDB(port=port) as db:
        try:
            # The endpoint stays alone on the first line: scripts read it from there.
            out.print(markup(f"[bold green]DynamoDB endpoint:[/] {db.endpoint_url}"))
            # RateLimiter() without endpoint_url= reads the variable (so do botocore's clients).
            out.print(f"  point the library at it: export AWS_ENDPOINT_URL={db.endpoint_url}")
            out.print(f"  try: zae-limiter demo --endpoint-url {db.endpoint_url}")
            out.print("Press Ctrl+C to stop.")
            while db.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            db.stop()
            # A SIGHUP's terminal may be gone: the server is stopped all the same.
            with contextlib.suppress(OSError):
                out.print(f"embedded DynamoDB stopped ({db.endpoint_url} no longer answers)")
            return
        raise click.ClickException(
            f"the embedded DynamoDB on {db.endpoint_url} stopped unexpectedly"
            f" (exit code {db.returncode})"
        )


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
@click.option(
    "--reservations/--no-reservations",
    default=False,
    show_default=True,
    help="Serve acquires from reserved blocks of tokens (see docs/design.md, Reservations).",
)
@click.option(
    "--metrics",
    "show_metrics",
    is_flag=True,
    help="Also print the run's OpenTelemetry metrics (needs the otel extra): acquire outcomes, "
    "latency, DynamoDB calls and capacity units.",
)
@cli_errors
def demo(
    name: str, endpoint_url: str | None, keys: int, clients: int, requests: int,
    reservations: bool, show_metrics: bool,
) -> None:
    """Run an LLM-gateway workload on an embedded DynamoDB and summarize it."""
    # Before anything starts: a missing SDK is told at once, not after the whole run.
    reader = _metrics_reader() if show_metrics else None
    if endpoint_url is not None:
        target = use_target(Target.of(name, LOCAL_REGION, endpoint_url))
        _run_demo(target, keys, clients, requests, reservations, reader)
        return
    out = console()
    db = LocalDynamoDB()
    with out.status("Starting the embedded DynamoDB..."):
        db.start()
    with db:
        out.print(markup(f"Embedded DynamoDB on [bold]{db.endpoint_url}[/]"))
        target = use_target(Target.of(name, LOCAL_REGION, db.endpoint_url))
        _run_demo(target, keys, clients, requests, reservations, reader)


def _run_demo(
    target: Target, keys: int, clients: int, requests: int, reserve: bool,
    reader: InMemoryMetricReader | None = None,
) -> None:
    from .. import BACKEND
    from ..metrics import Metrics
    from ..models import Reservations, StackOptions
    from ..ops.demo import PROJECT, RESOURCE, run_workload

    out = console()
    metrics = None
    if reader is not None:
        from opentelemetry.sdk.metrics import MeterProvider

        metrics = Metrics(MeterProvider(metric_readers=[reader]))
    started = time.monotonic()
    with out.status(f"Running {keys * clients * requests} requests..."):
        report = target.run_limiter(
            lambda limiter: run_workload(
                limiter, keys=keys, clients_per_key=clients, requests_per_client=requests
            ),
            stack_options=StackOptions(),
            version_check="strict",
            reservations=Reservations() if reserve else None,
            metrics=metrics,
        )
        elapsed = time.monotonic() - started
        usage = _usage(target, report)
    # What happened, before the numbers that show it. Printed once the run succeeded: a demo
    # against an unreachable endpoint prints its one error line and nothing else.
    out.print(
        f"Scenario: an LLM gateway; project {PROJECT}, {keys} API keys, {clients} concurrent "
        f"clients per key, {requests} {RESOURCE} chat requests each (api-key-1's are long).\n"
        "Each request takes 1 rpm and its estimated tpm from its key and, by cascade, its "
        "project, then adjusts tpm to the tokens it really used."
    )
    out.print(
        markup(
            f"\n[bold]{report.acquires}[/] chat requests from {keys * clients} concurrent clients "
            f"on {keys} API keys of project [bold]{PROJECT}[/] "
            f"(core: {BACKEND}{', reservations' if reserve else ''}, {elapsed:.1f}s)\n"
        )
    )
    out.print(_keys_table(report))
    project = new_table(
        f"Project {PROJECT} (cascade target)", ["limit", "capacity/min", "remaining"],
        right=["capacity/min", "remaining"],
    )
    for limit in report.project_limits:
        project.add_row(
            limit.name, str(limit.capacity), str(report.project_remaining.get(limit.name))
        )
    out.print(project)
    out.print(usage)
    overdrawn = _overdrawn(report)
    if overdrawn:
        out.print(
            f"{'; '.join(overdrawn)}: more used than the limit, as buckets refill during the run "
            "and lease.adjust() debits the real count even past the limit (a debt later "
            "requests wait out)."
        )
    calls = ", ".join(f"{op} {n}" for op, n in sorted(report.calls.items()))
    out.print(
        f"DynamoDB: {calls}; {report.write_units:g} WCU, {report.read_units:g} RCU "
        f"for {report.acquires} acquires with cascade and adjust."
    )
    if reader is not None:
        out.print(_metrics_table(reader))


KEY_COLUMNS = (
    "entity",
    "admitted",
    "rejected",
    "own limit",
    "by project",
    "max retry-after",
    "tokens est.",
    "tokens actual",
    "rpm left",
    "tpm left",
)


def _overdrawn(report: DemoReport) -> list[str]:
    """"<entity> <limit> <used> > <capacity>" for each limit whose clients used more than its
    capacity (what the usage table shows; the figures the clients counted)."""
    from ..ops.demo import PROJECT

    used = {key.entity_id: {"rpm": key.admitted, "tpm": key.tokens_actual} for key in report.keys}
    used[PROJECT] = {
        "rpm": sum(key.admitted for key in report.keys),
        "tpm": sum(key.tokens_actual for key in report.keys),
    }
    found = []
    for entity_id, amounts in used.items():
        limits = report.project_limits if entity_id == PROJECT else report.key_limits
        for limit in limits:
            amount = amounts.get(limit.name)
            if amount is not None and amount > limit.capacity:
                found.append(f"{entity_id} {limit.name} {amount} > {limit.capacity}")
    return found


def _keys_table(report: DemoReport) -> Any:
    limits = ", ".join(f"{lim.name} {lim.capacity}/min" for lim in report.key_limits)
    table = new_table(f"API keys (per-key limits: {limits})", KEY_COLUMNS, right=KEY_COLUMNS[1:])
    for key in report.keys:
        table.add_row(
            key.entity_id,
            str(key.admitted),
            str(key.rejected),
            str(key.rejected_by_key),
            str(key.rejected_by_project),
            f"{key.max_retry_after:.2f}s",
            str(key.tokens_estimated),
            str(key.tokens_actual),
            str(key.remaining.get("rpm")),
            str(key.remaining.get("tpm")),
        )
    return table


def _usage(target: Target, report: DemoReport) -> Any:
    """Run the aggregator once over the table's stream; the snapshots it produced, as a table."""
    from .. import schema
    from ..aggregator.stream import StreamRunner
    from ..limiter import RateLimiter
    from ..models import UsageSummary
    from ..ops.demo import PROJECT, RESOURCE

    runner = StreamRunner(
        target.table,
        target.client("dynamodb"),
        target.client("dynamodbstreams"),
        schema.USAGE_WINDOWS,
        ttl_days=90,
    )
    result = runner.run_once()

    async def summaries(limiter: RateLimiter) -> list[UsageSummary]:
        return [
            await limiter.get_usage_summary(entity_id, RESOURCE, window="hourly")
            for entity_id in [*(key.entity_id for key in report.keys), PROJECT]
        ]

    table = new_table(
        f"Usage snapshots by the aggregator ({result.records} stream records, "
        f"{result.snapshots_updated} snapshot writes)",
        ["entity", "hourly snapshots", "rpm used", "tpm used", "matches clients"],
        right=["hourly snapshots", "rpm used", "tpm used", "matches clients"],
    )
    # What the client side counted, to check the snapshots against.
    expected = {key.entity_id: (key.admitted, key.tokens_actual) for key in report.keys}
    expected[PROJECT] = (
        sum(key.admitted for key in report.keys),
        sum(key.tokens_actual for key in report.keys),
    )
    for summary in target.run_limiter(summaries):
        used = (summary.totals.get("rpm", 0), summary.totals.get("tpm", 0))
        table.add_row(
            summary.entity_id,
            str(summary.snapshot_count),
            str(used[0]),
            str(used[1]),
            "yes" if used == expected[summary.entity_id] else markup("[red]no[/]"),
        )
    return table


# -- `demo --metrics` -------------------------------------------------------------------------


def _metrics_reader() -> InMemoryMetricReader:
    """The SDK's in-memory reader the demo's metrics go to, or `MissingExtra` naming the extra."""
    try:
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    except ImportError:
        raise MissingExtra(
            "demo --metrics needs the OpenTelemetry SDK: pip install 'zae-limiter[otel]'"
        ) from None
    return InMemoryMetricReader()


def _quantile_bound(point: HistogramDataPoint, q: float) -> float:
    """An upper bound of the q-quantile: the bucket boundary the cumulative count reaches it
    at (the buckets are all the SDK keeps), capped by the largest value recorded."""
    wanted = q * point.count
    seen = 0
    for bound, count in zip(point.explicit_bounds, point.bucket_counts, strict=False):
        seen += count
        if seen >= wanted:
            return min(bound, point.max)
    return point.max


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _metrics_table(reader: InMemoryMetricReader) -> Any:
    """The run's `zae_limiter` instruments as the reader collected them: one row per
    instrument and attribute set (a counter's total, the latency's summary)."""
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, NumberDataPoint

    from ..metrics import METER_NAME

    table = new_table(
        # The DynamoDB line above counts the clients' requests only; these count everything.
        "OpenTelemetry metrics of the run (meter zae_limiter, read in memory; the DynamoDB "
        "ones include the setup: table, entities, stored limits, the final available())",
        ["instrument", "attributes", "value"],
        right=["value"],
    )
    data = reader.get_metrics_data()
    rows: list[tuple[str, str, str]] = []
    for resource_metrics in data.resource_metrics if data is not None else []:
        for scope in resource_metrics.scope_metrics:
            if scope.scope.name != METER_NAME:
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = " ".join(str(v) for v in (point.attributes or {}).values())
                    if isinstance(point, HistogramDataPoint):
                        mean = point.sum / point.count if point.count else 0.0
                        value = (
                            f"n={point.count} mean {_ms(mean)} "
                            f"p50<={_ms(_quantile_bound(point, 0.5))} "
                            f"p99<={_ms(_quantile_bound(point, 0.99))} max {_ms(point.max)}"
                        )
                    elif isinstance(point, NumberDataPoint):
                        value = f"{point.value:g}"
                    else:  # an exponential histogram: only by a view the demo does not set
                        continue
                    rows.append((metric.name, attributes, value))
    for row in sorted(rows):
        table.add_row(*row)
    return table
