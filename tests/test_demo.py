"""The main job: `zae-limiter demo` runs the LLM-gateway workload and its numbers add up."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner

from zae_limiter import RateLimiter, StackOptions
from zae_limiter.cli import main
from zae_limiter.ops.demo import PROJECT, RESOURCE, DemoReport, run_workload

pytestmark = pytest.mark.integration


def test_demo_command_reports_and_usage_matches(endpoint_url: str) -> None:
    result = CliRunner().invoke(
        main,
        ["demo", "--endpoint-url", endpoint_url, "--keys", "2", "--clients", "2",
         "--requests", "6"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "24 chat requests from 4 concurrent clients" in result.output
    assert "Usage snapshots by the aggregator" in result.output
    # every entity's aggregated usage equals what its clients counted
    rows = [line for line in result.output.splitlines() if "api-key-" in line or PROJECT in line]
    usage_rows = [line for line in rows if line.rstrip(" │").endswith(("yes", "no"))]
    assert len(usage_rows) == 3
    assert all(line.rstrip(" │").endswith("yes") for line in usage_rows), result.output


def test_demo_with_reservations_usage_still_matches_clients(endpoint_url: str) -> None:
    """Blocks are reserved and returned: once returned, the aggregator's net usage per entity is
    what the clients used, token for token."""
    result = CliRunner().invoke(
        main,
        ["demo", "--endpoint-url", endpoint_url, "--keys", "2", "--clients", "3",
         "--requests", "8", "--reservations"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "reservations" in result.output
    rows = [line for line in result.output.splitlines() if "api-key-" in line or PROJECT in line]
    usage_rows = [line for line in rows if line.rstrip(" │").endswith(("yes", "no"))]
    assert len(usage_rows) == 3
    assert all(line.rstrip(" │").endswith("yes") for line in usage_rows), result.output


def test_demo_metrics_prints_the_runs_instruments(endpoint_url: str) -> None:
    """`--metrics`: a table of the zae_limiter instruments the SDK's reader collected, whose
    acquire counts add up to the requests sent."""
    result = CliRunner().invoke(
        main,
        ["demo", "--endpoint-url", endpoint_url, "--keys", "2", "--clients", "2",
         "--requests", "6", "--metrics"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "OpenTelemetry metrics of the run" in result.output
    for name in ("zae_limiter.acquires", "zae_limiter.acquire.duration",
                 "zae_limiter.dynamodb.calls", "zae_limiter.dynamodb.write_capacity",
                 "zae_limiter.dynamodb.read_capacity"):  # fmt: skip
        assert f" {name} " in result.output, name
    rows = [line.strip("│ ").split("│") for line in result.output.splitlines()]
    acquires = [row for row in rows if row[0].strip() == "zae_limiter.acquires"]
    assert {row[1].split()[-1] for row in acquires} <= {"admitted", "denied"}
    assert sum(int(row[2]) for row in acquires) == 24
    latency = [row for row in rows if row[0].strip() == "zae_limiter.acquire.duration"]
    assert latency and all("p99<=" in row[2] for row in latency)
    assert sum(int(row[2].split()[0].removeprefix("n=")) for row in latency) == 24
    updates = [row for row in rows if row[0].strip() == "zae_limiter.dynamodb.calls"
               and row[1].strip() == "UpdateItem"]  # fmt: skip
    assert len(updates) == 1 and int(updates[0][2]) > 0


def test_workload_ledger_balances(endpoint_url: str) -> None:
    frozen = 1_800_000_000_000

    async def go() -> tuple[object, dict[str, int]]:
        async with RateLimiter(name="demo", endpoint_url=endpoint_url,
                               stack_options=StackOptions(), clock=lambda: frozen) as limiter:
            report = await run_workload(limiter, keys=2, clients_per_key=3,
                                        requests_per_client=10)
            project = await limiter.available(PROJECT, RESOURCE, report.project_limits)
            return report, project

    report, project = asyncio.run(go())
    assert isinstance(report, DemoReport)
    admitted = sum(k.admitted for k in report.keys)
    assert admitted + sum(k.rejected for k in report.keys) == report.acquires
    # With a frozen clock nothing refills: the project's buckets hold exactly what was not used.
    assert project["rpm"] == 50 - admitted
    assert project["tpm"] == 12_000 - sum(k.tokens_actual for k in report.keys)
    for key in report.keys:
        assert key.remaining["rpm"] == 20 - key.admitted
        assert key.remaining["tpm"] == 6_000 - key.tokens_actual


def test_workload_shows_rejections_by_own_limit_and_by_project(endpoint_url: str) -> None:
    """The default workload: the batch key meets its own tpm, the others the project's."""
    frozen = 1_800_000_000_000

    async def go() -> DemoReport:
        async with RateLimiter(name="demo", endpoint_url=endpoint_url,
                               stack_options=StackOptions(), clock=lambda: frozen) as limiter:
            return await run_workload(limiter)

    report = asyncio.run(go())
    own = {k.entity_id: k.rejected_by_key for k in report.keys}
    by_project = {k.entity_id: k.rejected_by_project for k in report.keys}
    assert own["api-key-1"] > 0 and sum(by_project.values()) > 0, (own, by_project)
    for key in report.keys:
        assert key.rejected == key.rejected_by_key + key.rejected_by_project


def test_demo_tables_are_whole_at_80_columns(endpoint_url: str) -> None:
    result = CliRunner().invoke(main, ["demo", "--endpoint-url", endpoint_url],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    for word in ("admitted", "rejected", "own limit", "by project", "max retry-after",
                 "tokens est.", "tokens actual", "rpm left", "tpm left", "api-key-1",
                 "api-key-3", "acme-project", "capacity/min", "remaining", "hourly snapshots",
                 "matches clients"):
        assert word in result.output, word
    assert "…" not in result.output
    rows = {line.split()[1]: line.split() for line in result.output.splitlines()
            if line.startswith("│ api-key-") and len(line.split()) > 12}
    # entity, admitted, rejected, own limit, by project: both kinds of rejection are shown
    assert int(rows["api-key-1"][7]) > 0
    assert sum(int(r[9]) for r in rows.values()) > 0


def test_demo_states_its_scenario_and_explains_an_overdrawn_limit(endpoint_url: str) -> None:
    """Two lines of scenario come first (with --endpoint-url; after the embedded server's
    endpoint without it); under the usage table, a limit whose clients used more
    than its capacity (the project's tpm, in the default workload) is named and explained by
    refill and `adjust`'s debt, and the line is absent when none was."""
    result = CliRunner().invoke(main, ["demo", "--endpoint-url", endpoint_url],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("Scenario: ") and "3 API keys" in lines[0], lines[:2]
    assert "by cascade" in lines[1] and "adjusts tpm" in lines[1], lines[:2]
    project_usage = next(line.split() for line in lines
                         if line.startswith("│ acme-project") and line.rstrip(" │").endswith("yes"))
    tpm_used = int(project_usage[7])  # │ entity │ snapshots │ rpm used │ tpm used │
    explained = [line for line in lines if "lease.adjust() debits" in line]
    if tpm_used > 12_000:
        assert len(explained) == 1 and f"acme-project tpm {tpm_used} > 12000" in explained[0]
        # right under the usage table
        assert lines[lines.index(explained[0]) - 1].startswith("└")
    else:
        assert all("acme-project tpm" not in line for line in explained), explained
