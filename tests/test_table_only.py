"""`zae-limiter deploy --table-only` and `zae-limiter check` against moto's server: the table the
Pulumi program creates, made without Pulumi, used by the library and the aggregator; `check`
naming what is missing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner, Result

from zae_limiter import Limit, RateLimiter, RateLimitExceeded, schema
from zae_limiter.cli import main
from zae_limiter.storage.dynamodb.repository import Repository
from zae_limiter.version import check_compatibility

pytestmark = pytest.mark.integration

NAME = "my-app"
TABLE = schema.table_name(NAME)
REGION = "us-east-1"


def cli(endpoint_url: str | None, *args: str, code: int = 0) -> Result:
    target = ["--name", NAME, "--region", REGION]
    if endpoint_url is not None:
        target += ["--endpoint-url", endpoint_url]
    result = CliRunner().invoke(main, [*args, *target])
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == code, result.output
    return result


def js(endpoint_url: str | None, *args: str, code: int = 0) -> Any:
    return json.loads(cli(endpoint_url, *args, "--json", code=code).stdout)


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def ddb(endpoint_url: str) -> Any:
    return boto3.client("dynamodb", endpoint_url=endpoint_url, region_name=REGION)


def version_record(endpoint_url: str) -> dict[str, Any] | None:
    async def read() -> dict[str, Any] | None:
        async with Repository(TABLE, REGION, endpoint_url) as repo:
            return await repo.get_version_record()

    return asyncio.run(read())


# -- deploy, then check -----------------------------------------------------------------------


def test_deploy_table_only_then_check_passes(endpoint_url: str) -> None:
    missing = cli(endpoint_url, "check", code=1)
    assert f"\u2717 table: {TABLE} not found" in missing.output
    assert "zae-limiter deploy --table-only --name my-app" in missing.output

    deployed = js(endpoint_url, "deploy", "--table-only")
    assert deployed["created"] and deployed["version_record_written"] and deployed["ready"]

    report = js(endpoint_url, "check")
    assert report["ready"] and report["compatible"]
    # Every check ran but credentials, which a loopback endpoint does not need.
    assert statuses(report) == {
        "credentials": "skipped", "table": "ok", "keys": "ok", "gsi": "ok", "ttl": "ok",
        "stream": "ok", "version record": "ok",
    }
    human = cli(endpoint_url, "check").output.splitlines()
    assert [line.split(":")[0] for line in human] == [
        "\u2713 table", "\u2713 keys", "\u2713 gsi", "\u2713 ttl", "\u2713 stream",
        "\u2713 version record",
    ]


def test_deploy_twice_is_idempotent(endpoint_url: str) -> None:
    cli(endpoint_url, "deploy", "--table-only")
    record = version_record(endpoint_url)
    created = ddb(endpoint_url).describe_table(TableName=TABLE)["Table"]["CreationDateTime"]

    again = cli(endpoint_url, "deploy", "--table-only")
    assert "already exists" in again.output and "is ready: nothing to do" in again.output
    as_json = js(endpoint_url, "deploy", "--table-only")
    assert (as_json["created"], as_json["version_record_written"], as_json["ready"]) == (
        False, False, True)
    assert version_record(endpoint_url) == record  # not rewritten
    assert ddb(endpoint_url).describe_table(TableName=TABLE)["Table"]["CreationDateTime"] == created


def test_the_version_record_names_no_aggregator(endpoint_url: str) -> None:
    # No Lambda is deployed: a `lambda_version` would make every newer client demand an
    # aggregator upgrade that only Pulumi can do.
    cli(endpoint_url, "deploy", "--table-only")
    record = version_record(endpoint_url)
    assert record is not None
    assert record["schema_version"] == schema.SCHEMA_VERSION
    assert record["min_client_version"] == schema.MIN_CLIENT_VERSION
    assert record.get("lambda_version") in (None, "")
    assert check_compatibility(record, client_version="1.99.0").compatible


def test_table_only_refuses_the_stacks_flags(endpoint_url: str) -> None:
    result = cli(endpoint_url, "deploy", "--table-only", "--aggregator", "--alarms", code=2)
    assert "--aggregator" in result.output and "--alarms" in result.output
    with pytest.raises(ddb(endpoint_url).exceptions.ResourceNotFoundException):
        ddb(endpoint_url).describe_table(TableName=TABLE)
    # What the table only has anyway, or CreateTable sets, is accepted.
    deployed = js(endpoint_url, "deploy", "--table-only", "--no-aggregator", "--no-pitr",
                  "--tag", "team=payments")
    assert deployed["created"]
    arn = ddb(endpoint_url).describe_table(TableName=TABLE)["Table"]["TableArn"]
    tags = ddb(endpoint_url).list_tags_of_resource(ResourceArn=arn)["Tags"]
    assert {"Key": "team", "Value": "payments"} in tags


# -- check names what is missing --------------------------------------------------------------


def test_check_names_a_disabled_ttl_and_deploy_repairs_it(endpoint_url: str) -> None:
    cli(endpoint_url, "deploy", "--table-only")
    ddb(endpoint_url).update_time_to_live(
        TableName=TABLE,
        TimeToLiveSpecification={"Enabled": False, "AttributeName": schema.TTL_ATTRIBUTE},
    )
    report = js(endpoint_url, "check", code=1)
    assert not report["ready"]
    assert {n for n, s in statuses(report).items() if s == "failed"} == {"ttl"}
    result = cli(endpoint_url, "check", code=1)
    ttl_line = next(line for line in result.output.splitlines() if "ttl:" in line)
    assert ttl_line.startswith("\u2717 ttl: TTL disabled")
    assert "zae-limiter deploy --table-only --name my-app" in ttl_line

    repaired = js(endpoint_url, "deploy", "--table-only")
    assert repaired["ready"] and not repaired["created"]
    assert js(endpoint_url, "check")["ready"]


def test_check_names_a_stream_that_is_off(endpoint_url: str) -> None:
    cli(endpoint_url, "deploy", "--table-only")
    ddb(endpoint_url).update_table(
        TableName=TABLE, StreamSpecification={"StreamEnabled": False}
    )
    report = js(endpoint_url, "check", code=1)
    assert {n for n, s in statuses(report).items() if s == "failed"} == {"stream"}
    stream = next(c for c in report["checks"] if c["name"] == "stream")
    assert stream["detail"].startswith("stream off")
    assert "StreamViewType=NEW_AND_OLD_IMAGES" in stream["fix"]
    line = next(x for x in cli(endpoint_url, "check", code=1).output.splitlines()
                if "stream:" in x)
    assert line.startswith("\u2717 stream: stream off") and "update-table" in line
    # deploy does not turn a stream on by itself: it says so and fails the same way.
    again = cli(endpoint_url, "deploy", "--table-only", code=1)
    assert "\u2717 stream" in again.output and "next:" not in again.output


def test_check_names_a_missing_version_record(endpoint_url: str) -> None:
    cli(endpoint_url, "deploy", "--table-only")
    ddb(endpoint_url).delete_item(
        TableName=TABLE,
        Key={k: {"S": v} for k, v in schema.version_key().items()},
    )
    report = js(endpoint_url, "check", code=1)
    assert {n for n, s in statuses(report).items() if s == "failed"} == {"version record"}
    assert not report["ready"]
    repaired = cli(endpoint_url, "deploy", "--table-only")
    assert "missing version record written" in repaired.output
    assert js(endpoint_url, "check")["ready"]


def test_check_reports_an_old_aggregator_with_the_upgrade_to_run(endpoint_url: str) -> None:
    cli(endpoint_url, "deploy", "--table-only")

    async def age() -> None:
        async with Repository(TABLE, REGION, endpoint_url) as repo:
            await repo.set_version_record(lambda_version="0.5.0")

    asyncio.run(age())
    report = js(endpoint_url, "check", code=1)
    version = next(c for c in report["checks"] if c["name"] == "version record")
    assert version["status"] == "failed" and version["detail"].startswith("NOT compatible")
    assert version["fix"].startswith("zae-limiter upgrade --name my-app")
    assert not report["compatible"]


def test_check_without_credentials_says_how_to_configure_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role lookup either
    report = js(None, "check", code=1)  # real AWS: stops at credentials, before any request
    assert statuses(report)["credentials"] == "failed"
    assert {s for n, s in statuses(report).items() if n != "credentials"} == {"skipped"}
    line = cli(None, "check", code=1).output.strip()
    assert line.startswith("\u2717 credentials: no AWS credentials found")
    assert "aws configure" in line


# -- the table serves the library and the aggregator -------------------------------------------


def test_the_limiter_and_the_aggregator_use_the_table_only_table(endpoint_url: str) -> None:
    cli(endpoint_url, "deploy", "--table-only")
    limits = [Limit.per_minute("rpm", 2)]

    async def use() -> dict[str, int]:
        # No stack_options: nothing is provisioned, the strict version check reads the record.
        async with RateLimiter(name=NAME, region=REGION, endpoint_url=endpoint_url) as limiter:
            for _ in range(2):
                async with limiter.acquire("key-1", "gpt-4o", limits, {"rpm": 1}):
                    pass
            with pytest.raises(RateLimitExceeded):  # the third of 2 per minute
                async with limiter.acquire("key-1", "gpt-4o", limits, {"rpm": 1}):
                    pass
            return dict(await limiter.available("key-1", "gpt-4o", limits))

    assert asyncio.run(use())["rpm"] == 0

    ran = js(endpoint_url, "aggregator", "run")
    assert ran["failed"] == 0 and ran["processed"] >= 2, ran
    usage = js(endpoint_url, "usage", "--entity", "key-1", "--window", "daily")
    assert usage["summary"]["totals"] == {"rpm": 2}


# -- the same table as Pulumi's ----------------------------------------------------------------


def _normalized_described(client: Any) -> dict[str, Any]:
    table = client.describe_table(TableName=TABLE)["Table"]
    ttl = client.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]

    def keys(schema_: list[dict[str, str]]) -> dict[str, str]:
        return {k["KeyType"]: k["AttributeName"] for k in schema_}

    return {
        "name": table["TableName"],
        "keys": keys(table["KeySchema"]),
        "attributes": sorted((a["AttributeName"], a["AttributeType"])
                             for a in table["AttributeDefinitions"]),
        "gsi": {g["IndexName"]: (keys(g["KeySchema"]), g["Projection"]["ProjectionType"])
                for g in table["GlobalSecondaryIndexes"]},
        "billing": table["BillingModeSummary"]["BillingMode"],
        "stream": (table["StreamSpecification"]["StreamEnabled"],
                   table["StreamSpecification"]["StreamViewType"]),
        "ttl": (ttl["AttributeName"], ttl["TimeToLiveStatus"] == "ENABLED"),
    }


def _normalized_pulumi(inputs: dict[str, Any]) -> dict[str, Any]:
    def gsi_keys(index: dict[str, Any]) -> dict[str, str]:
        # pulumi-aws 7 spells an index's keys as keySchemas, earlier ones as hashKey/rangeKey.
        found = {k["keyType"]: k["attributeName"] for k in index.get("keySchemas", [])}
        return found or {"HASH": index["hashKey"], "RANGE": index["rangeKey"]}

    return {
        "name": inputs["name"],
        "keys": {"HASH": inputs["hashKey"], "RANGE": inputs["rangeKey"]},
        "attributes": sorted((a["name"], a["type"]) for a in inputs["attributes"]),
        "gsi": {g["name"]: (gsi_keys(g), g["projectionType"])
                for g in inputs["globalSecondaryIndexes"]},
        "billing": inputs["billingMode"],
        "stream": (inputs["streamEnabled"], inputs["streamViewType"]),
        "ttl": (inputs["ttl"]["attributeName"], inputs["ttl"]["enabled"]),
    }


def test_the_table_is_the_one_the_pulumi_component_declares(endpoint_url: str) -> None:
    pytest.importorskip("pulumi")
    pytest.importorskip("pulumi_aws")
    # The Pulumi-mocks harness of the component's own tests (public names of that module).
    from test_infra_component import deploy as pulumi_deploy

    mocks, _ = pulumi_deploy(NAME, aggregator=False)
    declared = _normalized_pulumi(mocks.one("aws:dynamodb/table:Table").inputs)

    cli(endpoint_url, "deploy", "--table-only")
    created = _normalized_described(ddb(endpoint_url))
    assert created == declared
    # Not vacuous: both say what schema.TABLE says.
    assert created["keys"] == {"HASH": schema.PK, "RANGE": schema.SK}
    assert created["gsi"] == {schema.GSI1: ({"HASH": schema.GSI1PK, "RANGE": schema.GSI1SK},
                                            "ALL")}
    assert created["stream"] == (True, "NEW_AND_OLD_IMAGES")
    assert created["ttl"] == ("ttl", True) and created["billing"] == "PAY_PER_REQUEST"


# -- no Pulumi needed ---------------------------------------------------------------------------


def test_deploy_table_only_and_check_work_with_pulumi_blocked(endpoint_url: str) -> None:
    # `None` in sys.modules makes every `import pulumi` raise ImportError: as if not installed.
    code = (
        "import sys\n"
        "sys.modules['pulumi'] = None\n"
        "sys.modules['pulumi_aws'] = None\n"
        "from click.testing import CliRunner\n"
        "from zae_limiter.cli import main\n"
        "base = ['--name', 'my-app', '--endpoint-url', sys.argv[1]]\n"
        "for args in (['deploy', '--table-only'], ['check']):\n"
        "    result = CliRunner().invoke(main, [*args, *base])\n"
        "    print(result.exit_code, repr(result.exception))\n"
        "    print(result.output)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('pulumi', "
        "'zae_limiter.infra.automation', 'zae_limiter.infra.component')) and sys.modules[m])\n"
        "print('loaded:', loaded)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code, endpoint_url], capture_output=True,
                            text=True, timeout=120, env=env, check=True)
    out = result.stdout
    assert out.count("0 None") == 2, out + result.stderr
    assert f"table {TABLE} created" in out and "\u2713 version record" in out
    assert "loaded: []" in out
    assert ddb(endpoint_url).describe_table(TableName=TABLE)["Table"]["TableStatus"] == "ACTIVE"


# -- the README's promise -------------------------------------------------------------------------


def test_the_readme_try_it_on_aws_commands_run(endpoint_url: str) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Try it on AWS", 1)[1].split("\n## ", 1)[0]
    bash = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].split() for line in bash.splitlines() if line.strip()]
    assert lines[0][:2] == ["pip", "install"] and len(lines) == 3
    for argv in lines[1:]:
        assert argv[0] == "zae-limiter" and argv[argv.index("--name"):][:2] == ["--name", NAME]
        # The same command, at the local endpoint instead of us-east-1.
        result = CliRunner().invoke(main, [*argv[1:], "--endpoint-url", endpoint_url])
        assert result.exit_code == 0, (argv, result.output)
    assert [argv[1] for argv in lines[1:]] == ["deploy", "check"]
    assert "on-demand" in section and "pricing page" in section  # what it costs, no stale prices
