"""The Pulumi component under Pulumi's own mocks: no engine, no AWS.

Each test runs its Pulumi program in a worker thread with a fresh event loop and a fresh Pulumi
context (`ROOT` is a ContextVar, a new thread starts without it), so nothing of Pulumi's global
state or loop leaks into the rest of the pytest process (pytest-asyncio tests in particular).

The mock records every resource's resolved inputs; most assertions read those records after the
program finished, in the test's own thread, so none can be lost inside an unresolved Output.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pulumi = pytest.importorskip("pulumi")
pytest.importorskip("pulumi_aws")

from zae_limiter import schema  # noqa: E402
from zae_limiter.infra import InfraOptions, alarm_names, role_name  # noqa: E402

# pulumi-aws warns about one of its own deprecated Lambda resources when the module is imported.
pytestmark = pytest.mark.filterwarnings("ignore:aws.lambda/microvmsimage:DeprecationWarning")

ACCOUNT = "123456789012"
REGION = "us-east-1"


@dataclass
class Recorded:
    typ: str
    name: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]


@dataclass
class Mocks(pulumi.runtime.Mocks):  # type: ignore[misc]
    resources: list[Recorded] = field(default_factory=list)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def new_resource(self, args: Any) -> tuple[str, dict[str, Any]]:
        inputs = dict(args.inputs)
        physical = inputs.get("name") or args.name
        service = args.typ.split(":")[1].split("/")[0]
        outputs = dict(inputs)
        outputs.setdefault("name", physical)
        # Every output the component reads must be returned, or it stays unknown and the
        # values depending on it (policies, alarm names...) are never computed.
        if args.typ == "aws:dynamodb/table:Table":
            arn = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{physical}"
            outputs["streamArn"] = f"{arn}/stream/2024-01-01T00:00:00.000"
        elif args.typ == "aws:sqs/queue:Queue":
            arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{physical}"
            outputs["url"] = f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{physical}"
        elif args.typ == "aws:cloudwatch/logGroup:LogGroup":
            arn = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{physical}"
        elif args.typ.startswith("aws:iam/"):
            kind = "policy" if args.typ.endswith(":Policy") else "role"
            arn = f"arn:aws:iam::{ACCOUNT}:{kind}/{physical}"
        elif args.typ == "aws:lambda/function:Function":
            arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{physical}"
        else:
            arn = f"arn:aws:{service}:{REGION}:{ACCOUNT}:{physical}"
        outputs["arn"] = arn
        resource_id = f"{physical}-id"
        self.resources.append(Recorded(args.typ, args.name, inputs, outputs))
        return resource_id, outputs

    def call(self, args: Any) -> dict[str, Any]:
        self.calls.append((args.token, dict(args.args)))
        if args.token == "aws:dynamodb/getTable:getTable":
            arn = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{args.args['name']}"
            return {"arn": arn, "name": args.args["name"], "streamArn": f"{arn}/stream/X"}
        if args.token == "aws:index/getPartition:getPartition":
            return {"id": "aws", "partition": "aws", "dnsSuffix": "amazonaws.com",
                    "reverseDnsPrefix": "com.amazonaws"}
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"id": ACCOUNT, "accountId": ACCOUNT, "userId": "AIDA",
                    "arn": f"arn:aws:iam::{ACCOUNT}:user/deployer"}
        return {}

    def of_type(self, typ: str) -> list[Recorded]:
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str) -> Recorded:
        found = self.of_type(typ)
        assert len(found) == 1, f"expected one {typ}, got {len(found)}"
        return found[0]


def run_program(program: Callable[[], Any]) -> Mocks:
    """Run `program` as a `@pulumi.runtime.test` under fresh mocks in its own thread/loop."""
    mocks = Mocks()
    errors: list[BaseException] = []

    def target() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            pulumi.runtime.set_mocks(mocks, project="zae-limiter", stack="test", preview=False)
            pulumi.runtime.test(program)()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()
            asyncio.set_event_loop(None)

    thread = threading.Thread(target=target, name="pulumi-mocks")
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the Pulumi program did not finish"
    if errors:
        raise errors[0]
    return mocks


@pytest.fixture(scope="module")
def lambda_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The component's bundle is tested in test_infra_package; here any zip will do, so these
    # tests do not depend on the aggregator package being importable.
    path = tmp_path_factory.mktemp("zip") / "aggregator.zip"
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("lambda_function.py", "def handler(event, context):\n    return {}\n")
    return path


def deploy(name: str = "app", lambda_zip: Path | None = None, **options: Any) -> tuple[Mocks, Any]:
    from zae_limiter.infra.component import ZaeLimiterStack

    holder: dict[str, Any] = {}

    def program() -> Any:
        stack = ZaeLimiterStack(name, InfraOptions(**options), lambda_zip=lambda_zip)
        holder["stack"] = stack
        return stack.alarm_names  # awaited by pulumi.runtime.test

    return run_program(program), holder["stack"]


# -- the harness itself ----------------------------------------------------------------------


def test_assertion_inside_apply_runs_and_fails_the_test(lambda_zip: Path) -> None:
    from zae_limiter.infra.component import ZaeLimiterStack

    seen: list[str] = []

    def program() -> Any:
        stack = ZaeLimiterStack("app", InfraOptions(), lambda_zip=lambda_zip)

        def check(arn: str) -> None:
            seen.append(arn)
            assert arn.endswith(":table/ZAEL-app")

        return stack.table_arn.apply(check)

    run_program(program)
    assert seen == [f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/ZAEL-app"]

    def failing() -> Any:
        stack = ZaeLimiterStack("app", InfraOptions(), lambda_zip=lambda_zip)

        def check(name: str) -> None:
            raise AssertionError(f"reached with {name}")

        return stack.table_name.apply(check)

    with pytest.raises(AssertionError, match="reached with ZAEL-app"):
        run_program(failing)


# -- table -----------------------------------------------------------------------------------


def test_table_matches_schema(lambda_zip: Path) -> None:
    mocks, _ = deploy(lambda_zip=lambda_zip)
    table = mocks.one("aws:dynamodb/table:Table").inputs
    definition = schema.TABLE
    assert table["name"] == schema.table_name("app") == "ZAEL-app"
    assert table["hashKey"] == definition.hash_key
    assert table["rangeKey"] == definition.range_key
    assert sorted((a["name"], a["type"]) for a in table["attributes"]) == sorted(
        (a.name, a.type) for a in definition.attributes
    )
    indexes = table["globalSecondaryIndexes"]
    assert len(indexes) == len(definition.global_secondary_indexes)
    for got, want in zip(indexes, definition.global_secondary_indexes, strict=True):
        assert got["name"] == want.name
        assert got["projectionType"] == want.projection
        keys = {k["keyType"]: k["attributeName"] for k in got.get("keySchemas", [])} or {
            "HASH": got["hashKey"], "RANGE": got["rangeKey"]
        }
        assert keys == {"HASH": want.hash_key, "RANGE": want.range_key}
        assert "readCapacity" not in got
    assert table["ttl"] == {"attributeName": definition.ttl_attribute, "enabled": True}
    assert table["streamEnabled"] is True
    assert table["streamViewType"] == definition.stream_view_type
    assert table["billingMode"] == "PAY_PER_REQUEST"
    assert "readCapacity" not in table and "writeCapacity" not in table
    assert table["pointInTimeRecovery"] == {"enabled": True, "recoveryPeriodInDays": 35}
    assert table["deletionProtectionEnabled"] is True
    assert table["serverSideEncryption"] == {"enabled": True}
    assert table["tags"]["zae-limiter:name"] == "app"


def test_table_options(lambda_zip: Path) -> None:
    kms = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/abcd"
    mocks, _ = deploy(
        lambda_zip=lambda_zip,
        billing_mode="PROVISIONED",
        read_capacity=7,
        write_capacity=9,
        pitr_recovery_days=7,
        deletion_protection=False,
        kms_key_arn=kms,
        tags={"team": "payments"},
    )
    table = mocks.one("aws:dynamodb/table:Table").inputs
    assert table["billingMode"] == "PROVISIONED"
    assert (table["readCapacity"], table["writeCapacity"]) == (7, 9)
    for index in table["globalSecondaryIndexes"]:
        assert (index["readCapacity"], index["writeCapacity"]) == (7, 9)
    assert table["pointInTimeRecovery"] == {"enabled": True, "recoveryPeriodInDays": 7}
    assert table["deletionProtectionEnabled"] is False
    assert table["serverSideEncryption"] == {"enabled": True, "kmsKeyArn": kms}
    assert table["tags"]["team"] == "payments"


def test_pitr_can_be_turned_off(lambda_zip: Path) -> None:
    mocks, _ = deploy(lambda_zip=lambda_zip, point_in_time_recovery=False)
    assert mocks.one("aws:dynamodb/table:Table").inputs["pointInTimeRecovery"] == {
        "enabled": False
    }


def test_pitr_none_is_the_aws_default_period_as_in_0_2_0(lambda_zip: Path) -> None:
    # 0.2.0's default: PITR on, no period given (AWS's, 35 days); deployed explicitly here.
    mocks, _ = deploy(lambda_zip=lambda_zip, pitr_recovery_days=None)
    assert mocks.one("aws:dynamodb/table:Table").inputs["pointInTimeRecovery"] == {
        "enabled": True, "recoveryPeriodInDays": 35
    }


# -- aggregator ------------------------------------------------------------------------------


def test_aggregator_function(lambda_zip: Path) -> None:
    mocks, _ = deploy(lambda_zip=lambda_zip, lambda_memory_mb=512, lambda_timeout_seconds=120,
                      snapshot_ttl_days=30, usage_windows=("hourly",), log_retention_days=14)
    function = mocks.one("aws:lambda/function:Function").inputs
    assert function["name"] == schema.aggregator_function_name("app") == "ZAEL-app-aggregator"
    assert function["runtime"] == "python3.11"
    assert function["handler"] == "lambda_function.handler"
    assert (function["memorySize"], function["timeout"]) == (512, 120)
    assert function["environment"]["variables"] == {
        "TABLE_NAME": "ZAEL-app",
        "USAGE_WINDOWS": "hourly",
        "SNAPSHOT_TTL_DAYS": "30",
        "SCHEMA_VERSION": schema.SCHEMA_VERSION,
        "LOG_LEVEL": "INFO",
    }
    assert function["role"] == f"arn:aws:iam::{ACCOUNT}:role/ZAEL-app-aggregator-role"
    assert function["sourceCodeHash"]
    logs = mocks.one("aws:cloudwatch/logGroup:LogGroup").inputs
    assert logs == {**logs, "name": "/aws/lambda/ZAEL-app-aggregator", "retentionInDays": 14}


def test_default_usage_windows_are_a_comma_list(lambda_zip: Path) -> None:
    mocks, _ = deploy(lambda_zip=lambda_zip)
    env = mocks.one("aws:lambda/function:Function").inputs["environment"]["variables"]
    assert env["USAGE_WINDOWS"] == ",".join(schema.USAGE_WINDOWS)


def test_event_source_mapping_and_dlq(lambda_zip: Path) -> None:
    mocks, _ = deploy(lambda_zip=lambda_zip)
    queue = mocks.one("aws:sqs/queue:Queue")
    assert queue.inputs["name"] == schema.aggregator_dlq_name("app") == "ZAEL-app-aggregator-dlq"
    assert queue.inputs["messageRetentionSeconds"] == 14 * 86400
    table = mocks.one("aws:dynamodb/table:Table")
    mapping = mocks.one("aws:lambda/eventSourceMapping:EventSourceMapping").inputs
    assert mapping["eventSourceArn"] == table.outputs["streamArn"]
    assert mapping["functionName"].endswith(":function:ZAEL-app-aggregator")
    assert mapping["startingPosition"] == "LATEST"
    assert mapping["batchSize"] == 100
    assert mapping["maximumBatchingWindowInSeconds"] == 5
    assert mapping["bisectBatchOnFunctionError"] is True
    assert mapping["maximumRetryAttempts"] == 3
    assert mapping["maximumRecordAgeInSeconds"] == 3600
    assert mapping["functionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["destinationConfig"] == {"onFailure": {"destinationArn": queue.outputs["arn"]}}
    # Lambda ORs the filters: bucket items (usage), and audit items changed or deleted (the
    # AuditTrailChanges count); audit inserts (every append) never invoke the function.
    buckets, audit = (json.loads(f["pattern"]) for f in mapping["filterCriteria"]["filters"])
    assert buckets == schema.AGGREGATOR_FILTER_PATTERN
    assert audit == {"eventName": ["MODIFY", "REMOVE"],
                     "dynamodb": {"Keys": {"PK": {"S": [{"prefix": "AUDIT#"}]}}}}


# -- IAM -------------------------------------------------------------------------------------


def _statements(document: str) -> list[dict[str, Any]]:
    statements = json.loads(document)["Statement"]
    return [statements] if isinstance(statements, dict) else list(statements)


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def test_aggregator_role_is_least_privilege(lambda_zip: Path) -> None:
    mocks, _ = deploy(lambda_zip=lambda_zip)
    role = mocks.one("aws:iam/role:Role")
    assert role.inputs["name"] == "ZAEL-app-aggregator-role"
    assert "permissionsBoundary" not in role.inputs
    (trust,) = _statements(role.inputs["assumeRolePolicy"])
    assert trust["Principal"] == {"Service": "lambda.amazonaws.com"}
    assert trust["Action"] == "sts:AssumeRole"

    table_arn = mocks.one("aws:dynamodb/table:Table").outputs["arn"]
    dlq_arn = mocks.one("aws:sqs/queue:Queue").outputs["arn"]
    log_arn = mocks.one("aws:cloudwatch/logGroup:LogGroup").outputs["arn"]
    policy = mocks.one("aws:iam/rolePolicy:RolePolicy")
    assert policy.inputs["role"] == "ZAEL-app-aggregator-role-id"
    grants: dict[str, set[str]] = {}
    for statement in _statements(policy.inputs["policy"]):
        assert statement["Effect"] == "Allow"
        assert "NotAction" not in statement and "NotResource" not in statement
        for action in _as_list(statement["Action"]):
            assert "*" not in action
            grants.setdefault(action, set()).update(_as_list(statement["Resource"]))
    assert grants == {
        "dynamodb:DescribeStream": {f"{table_arn}/stream/*"},
        "dynamodb:GetRecords": {f"{table_arn}/stream/*"},
        "dynamodb:GetShardIterator": {f"{table_arn}/stream/*"},
        # The one wildcard: ListStreams has no resource-level permissions.
        "dynamodb:ListStreams": {"*"},
        "dynamodb:GetItem": {table_arn},
        "dynamodb:PutItem": {table_arn},
        "sqs:SendMessage": {dlq_arn},
        "logs:CreateLogStream": {log_arn, f"{log_arn}:*"},
        "logs:PutLogEvents": {log_arn, f"{log_arn}:*"},
    }


def test_role_name_format_and_permission_boundary(lambda_zip: Path) -> None:
    boundary = f"arn:aws:iam::{ACCOUNT}:policy/Boundary"
    mocks, _ = deploy(lambda_zip=lambda_zip, role_name_format="PB-{}",
                      permission_boundary=boundary)
    role = mocks.one("aws:iam/role:Role").inputs
    assert role["name"] == "PB-ZAEL-app-aggregator-role" == role_name("app", "PB-{}")
    assert role["permissionsBoundary"] == boundary


def test_permission_boundary_given_as_a_policy_name_is_this_accounts_policy(
    lambda_zip: Path,
) -> None:
    # 0.2.0 took "a policy name or full ARN"; a name is a customer-managed policy.
    mocks, _ = deploy(lambda_zip=lambda_zip, permission_boundary="MyBoundary")
    role = mocks.one("aws:iam/role:Role").inputs
    assert role["permissionsBoundary"] == f"arn:aws:iam::{ACCOUNT}:policy/MyBoundary"


def test_app_policy_is_only_this_table(lambda_zip: Path) -> None:
    mocks, _ = deploy(lambda_zip=lambda_zip)
    assert not mocks.of_type("aws:iam/policy:Policy")
    mocks, _ = deploy(lambda_zip=lambda_zip, create_app_policy=True)
    policy = mocks.one("aws:iam/policy:Policy").inputs
    assert policy["name"] == "ZAEL-app-app"
    table_arn = mocks.one("aws:dynamodb/table:Table").outputs["arn"]
    grants: dict[str, set[str]] = {}
    for statement in _statements(policy["policy"]):
        if statement["Effect"] == "Allow":  # the Deny: test_app_policy_audit_trail
            for action in _as_list(statement["Action"]):
                grants.setdefault(action, set()).update(_as_list(statement["Resource"]))
    # Exactly what Repository calls: no BatchGetItem, ConditionCheckItem or TransactWriteItems
    # (no call site), DeleteItem for a kill switch's clearing, nothing but Query on the indexes.
    assert grants == {
        **{f"dynamodb:{a}": {table_arn} for a in ("GetItem", "PutItem", "UpdateItem",
                                                  "BatchWriteItem", "DeleteItem",
                                                  "DescribeTable")},
        "dynamodb:Query": {table_arn, f"{table_arn}/index/*"},
    }


def test_app_policy_audit_trail(lambda_zip: Path) -> None:
    """Audit needs nothing new (PutItem to record, Query to read, GetItem to settle a resend),
    and applications cannot update or delete an audit event."""
    mocks, _ = deploy(lambda_zip=lambda_zip, create_app_policy=True)
    table_arn = mocks.one("aws:dynamodb/table:Table").outputs["arn"]
    statements = _statements(mocks.one("aws:iam/policy:Policy").inputs["policy"])
    allowed = {a for s in statements if s["Effect"] == "Allow" for a in _as_list(s["Action"])}
    deny, partiql = [s for s in statements if s["Effect"] == "Deny"]
    assert {"dynamodb:PutItem", "dynamodb:Query", "dynamodb:GetItem"} <= allowed
    # PutItem stays open on AUDIT# (appending is a PutItem; the hash chain and the
    # AuditTrailChanges alarm make an overwrite evident); every other write path is closed.
    assert sorted(_as_list(deny["Action"])) == [
        "dynamodb:BatchWriteItem", "dynamodb:DeleteItem", "dynamodb:PartiQLDelete",
        "dynamodb:PartiQLInsert", "dynamodb:PartiQLUpdate", "dynamodb:TransactWriteItems",
        "dynamodb:UpdateItem"]
    assert _as_list(deny["Resource"]) == [table_arn]
    assert deny["Condition"] == {
        "ForAnyValue:StringLike": {"dynamodb:LeadingKeys": [schema.audit_pk("") + "*"]}}
    # PartiQL writes are also denied without a condition: a Deny whose condition key the
    # request lacks does not apply, so this one holds whatever DynamoDB supplies to PartiQL.
    assert sorted(_as_list(partiql["Action"])) == [
        "dynamodb:PartiQLDelete", "dynamodb:PartiQLInsert", "dynamodb:PartiQLUpdate"]
    assert sorted(_as_list(partiql["Resource"])) == [table_arn, f"{table_arn}/index/*"]
    assert "Condition" not in partiql
    assert not {a for a in allowed if a.startswith("dynamodb:PartiQL")}
    assert schema.audit_pk("key-1").startswith(schema.audit_pk(""))
    # only audit partitions: the entity partitions the deny must not touch use another prefix
    assert not schema.entity_pk("key-1").startswith(schema.audit_pk(""))


# -- alarms ----------------------------------------------------------------------------------

# The operator guide's table: metric → (namespace, statistic, threshold, dimension name).
GUIDE_ALARMS = {
    "Errors": ("AWS/Lambda", "Sum", 1.0, "FunctionName"),
    "Duration": ("AWS/Lambda", "Maximum", 60_000 * 0.8, "FunctionName"),
    "IteratorAge": ("AWS/Lambda", "Maximum", 30_000.0, "FunctionName"),
    "ReadThrottleEvents": ("AWS/DynamoDB", "Sum", 0.0, "TableName"),
    "WriteThrottleEvents": ("AWS/DynamoDB", "Sum", 0.0, "TableName"),
    "ApproximateNumberOfMessagesVisible": ("AWS/SQS", "Maximum", 0.0, "QueueName"),
    # published by the aggregator (embedded metric format): audit items changed or deleted
    # other than by an append or TTL expiry
    "AuditTrailChanges": ("ZaeLimiter", "Sum", 0.0, "TableName"),
}
DIMENSION_VALUES = {
    "FunctionName": "ZAEL-app-aggregator",
    "TableName": "ZAEL-app",
    "QueueName": "ZAEL-app-aggregator-dlq",
}


def test_alarms_follow_the_operator_guide(lambda_zip: Path) -> None:
    collected: list[list[str]] = []
    from zae_limiter.infra.component import ZaeLimiterStack

    def program() -> Any:
        stack = ZaeLimiterStack("app", InfraOptions(), lambda_zip=lambda_zip)
        return stack.alarm_names.apply(collected.append)

    mocks = run_program(program)
    alarms = {a.inputs["metricName"]: a.inputs for a in
              mocks.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")}
    assert set(alarms) == set(GUIDE_ALARMS)
    for metric, (namespace, statistic, threshold, dimension) in GUIDE_ALARMS.items():
        alarm = alarms[metric]
        assert alarm["namespace"] == namespace
        assert alarm["statistic"] == statistic
        assert alarm["threshold"] == pytest.approx(threshold)
        assert alarm["comparisonOperator"] == "GreaterThanThreshold"
        assert alarm["period"] == 300
        assert alarm["dimensions"] == {dimension: DIMENSION_VALUES[dimension]}
        assert alarm["treatMissingData"] == "notBreaching"
        assert not alarm.get("alarmActions") and not alarm.get("okActions")
    assert collected == [list(alarm_names("app").values())]
    assert set(alarm_names("app").values()) == {a["name"] for a in alarms.values()}
    assert all(n.startswith("ZAEL-app-") for n in collected[0])
    assert alarms["AuditTrailChanges"]["name"] == "ZAEL-app-audit-trail-changes"
    # the alarm watches exactly the datum the aggregator writes (embedded metric format)
    from zae_limiter.aggregator.audit_changes import emf_line
    emitted = json.loads(emf_line("ZAEL-app", 1, 0))
    (directive,) = emitted["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == alarms["AuditTrailChanges"]["namespace"]
    assert [m["Name"] for m in directive["Metrics"]] == ["AuditTrailChanges"]
    assert directive["Dimensions"] == [list(alarms["AuditTrailChanges"]["dimensions"])]
    assert emitted["TableName"] == alarms["AuditTrailChanges"]["dimensions"]["TableName"]


def test_alarm_thresholds_and_actions_are_configurable(lambda_zip: Path) -> None:
    topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:ops"
    mocks, _ = deploy(lambda_zip=lambda_zip, alarm_sns_topic_arn=topic, lambda_timeout_seconds=100,
                      duration_threshold_pct=50, iterator_age_threshold_ms=5000,
                      error_threshold=3, throttle_threshold=2, dlq_threshold=4)
    alarms = {a.inputs["metricName"]: a.inputs for a in
              mocks.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")}
    assert alarms["Duration"]["threshold"] == pytest.approx(50_000)
    assert alarms["IteratorAge"]["threshold"] == 5000
    assert alarms["Errors"]["threshold"] == 3
    assert alarms["ReadThrottleEvents"]["threshold"] == 2
    assert alarms["WriteThrottleEvents"]["threshold"] == 2
    assert alarms["ApproximateNumberOfMessagesVisible"]["threshold"] == 4
    assert alarms["AuditTrailChanges"]["threshold"] == 0  # one change is one too many
    for alarm in alarms.values():
        assert alarm["alarmActions"] == [topic] and alarm["okActions"] == [topic]


# -- shapes ----------------------------------------------------------------------------------


def test_table_only_without_aggregator(lambda_zip: Path) -> None:
    collected: list[Any] = []
    from zae_limiter.infra.component import ZaeLimiterStack

    def program() -> Any:
        stack = ZaeLimiterStack("app", InfraOptions(aggregator=False), lambda_zip=lambda_zip)
        return pulumi.Output.all(stack.function_arn, stack.dlq_url, stack.alarm_names,
                                 stack.table_name).apply(collected.append)

    mocks = run_program(program)
    kinds = {r.typ for r in mocks.resources}
    for absent in ("aws:lambda/function:Function", "aws:sqs/queue:Queue",
                   "aws:lambda/eventSourceMapping:EventSourceMapping", "aws:iam/role:Role",
                   "aws:iam/rolePolicy:RolePolicy", "aws:cloudwatch/logGroup:LogGroup"):
        assert absent not in kinds
    metrics = {a.inputs["metricName"] for a in
               mocks.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")}
    assert metrics == {"ReadThrottleEvents", "WriteThrottleEvents"}
    assert collected == [[None, None, ["ZAEL-app-read-throttles", "ZAEL-app-write-throttles"],
                          "ZAEL-app"]]


def test_outputs(lambda_zip: Path) -> None:
    collected: list[Any] = []
    from zae_limiter.infra.component import TYPE_TOKEN, ZaeLimiterStack

    def program() -> Any:
        stack = ZaeLimiterStack("app", None, lambda_zip=lambda_zip)
        return pulumi.Output.all(stack.table_name, stack.table_arn, stack.stream_arn,
                                 stack.function_arn, stack.dlq_url).apply(collected.append)

    mocks = run_program(program)
    table = mocks.one("aws:dynamodb/table:Table").outputs
    assert collected == [[
        "ZAEL-app", table["arn"], table["streamArn"],
        f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:ZAEL-app-aggregator",
        f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/ZAEL-app-aggregator-dlq",
    ]]
    component = mocks.one(TYPE_TOKEN)
    assert component.name == "ZAEL-app"


def test_existing_table_is_looked_up_not_created(lambda_zip: Path) -> None:
    mocks, _ = deploy(lambda_zip=lambda_zip, create_table=False)
    assert not mocks.of_type("aws:dynamodb/table:Table")
    assert next(c for c in mocks.calls if c[0] == "aws:dynamodb/getTable:getTable")[1] == {
        "name": "ZAEL-app"
    }
    mapping = mocks.one("aws:lambda/eventSourceMapping:EventSourceMapping").inputs
    assert mapping["eventSourceArn"].endswith(":table/ZAEL-app/stream/X")


def test_accepts_stack_options(lambda_zip: Path) -> None:
    from zae_limiter.infra.component import ZaeLimiterStack
    from zae_limiter.models import StackOptions

    options = StackOptions(billing_mode="PROVISIONED", read_capacity=3, write_capacity=4,
                           lambda_memory_mb=1024)

    mocks = run_program(lambda: ZaeLimiterStack("app", options, lambda_zip=lambda_zip).table_arn)
    table = mocks.one("aws:dynamodb/table:Table").inputs
    assert (table["readCapacity"], table["writeCapacity"]) == (3, 4)
    assert mocks.one("aws:lambda/function:Function").inputs["memorySize"] == 1024


@pytest.mark.parametrize("name", ["", "1app", "a#b", "x" * 60, "has space"])
def test_invalid_names_are_refused(name: str) -> None:
    from zae_limiter.infra.component import ZaeLimiterStack

    with pytest.raises(ValueError, match="invalid name"):
        ZaeLimiterStack(name)


def test_infra_options_are_stack_options_with_their_rules_and_a_private_copy_of_tags() -> None:
    from types import MappingProxyType

    from zae_limiter import StackOptions, ValidationError

    tags = {"team": "gw"}
    options = InfraOptions(tags=MappingProxyType(tags), snapshot_ttl_days=7)  # type: ignore[arg-type]
    tags["team"] = "changed"
    assert options.tags == {"team": "gw"} and isinstance(options.tags, dict)
    assert isinstance(options, StackOptions)
    assert options.stack_options() == StackOptions(tags={"team": "gw"}, snapshot_ttl_days=7)
    with pytest.raises(ValidationError, match="snapshot_ttl_days"):
        InfraOptions(snapshot_ttl_days=0)


# -- hardening -------------------------------------------------------------------------------


def test_uploaded_code_is_exactly_the_hashed_bytes(tmp_path: Path) -> None:
    """Changing the given zip after the program read it cannot change what is uploaded."""
    import base64
    import hashlib
    import zipfile

    given = tmp_path / "given.zip"
    with zipfile.ZipFile(given, "w") as archive:
        archive.writestr("lambda_function.py", "def handler(event, context):\n    return {}\n")
    mocks, _ = deploy(lambda_zip=given)
    function = mocks.one("aws:lambda/function:Function").inputs
    given.write_bytes(b"swapped after hashing")  # before Pulumi reads the archive for upload
    uploaded = Path(function["code"].path).read_bytes()
    assert base64.b64encode(hashlib.sha256(uploaded).digest()).decode() == (
        function["sourceCodeHash"])
    assert Path(function["code"].path).parent.stat().st_mode & 0o077 == 0


def test_dlq_is_always_encrypted(lambda_zip: Path) -> None:
    mocks, _ = deploy(lambda_zip=lambda_zip)
    queue = mocks.one("aws:sqs/queue:Queue").inputs
    assert queue.get("sqsManagedSseEnabled") is True and not queue.get("kmsMasterKeyId")
    kms = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/abcd"
    mocks, _ = deploy(lambda_zip=lambda_zip, kms_key_arn=kms)
    queue = mocks.one("aws:sqs/queue:Queue").inputs
    assert queue["kmsMasterKeyId"] == kms and not queue.get("sqsManagedSseEnabled")
    # ...and the aggregator may use that key to send to it, through SQS only.
    (kms_grant,) = [s for s in _statements(mocks.one("aws:iam/rolePolicy:RolePolicy")
                                           .inputs["policy"]) if s["Resource"] == kms]
    assert sorted(_as_list(kms_grant["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert kms_grant["Condition"] == {
        "StringEquals": {"kms:ViaService": f"sqs.{REGION}.amazonaws.com"}}


def test_dlq_policy_only_the_aggregator_over_tls(lambda_zip: Path) -> None:
    mocks, _ = deploy(lambda_zip=lambda_zip)
    queue = mocks.one("aws:sqs/queue:Queue").outputs
    role_arn = mocks.one("aws:iam/role:Role").outputs["arn"]
    policy = mocks.one("aws:sqs/queuePolicy:QueuePolicy").inputs
    assert policy["queueUrl"] == queue["url"]
    statements = {s["Sid"]: s for s in _statements(policy["policy"])}
    for statement in statements.values():
        assert statement["Resource"] == queue["arn"]
    tls = statements["DenyInsecureTransport"]
    assert (tls["Effect"], tls["Principal"], tls["Action"]) == ("Deny", "*", "sqs:*")
    assert tls["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    others = statements["OnlyTheAggregatorMaySend"]
    assert (others["Effect"], others["Principal"], others["Action"]) == (
        "Deny", "*", "sqs:SendMessage")
    assert others["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": role_arn}}
    allows = [s for s in statements.values() if s["Effect"] == "Allow"]
    assert allows == [{"Sid": "AggregatorSendsFailureRecords", "Effect": "Allow",
                       "Principal": {"AWS": role_arn}, "Action": "sqs:SendMessage",
                       "Resource": queue["arn"]}]


def _spy_table_options(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ResourceOptions the component gives its table (Pulumi's mocks do not see options)."""
    import pulumi_aws as aws

    from zae_limiter.infra import component

    seen: list[Any] = []
    real = aws.dynamodb.Table

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("opts"))
        return real(*args, **kwargs)

    monkeypatch.setattr(component.aws.dynamodb, "Table", spy)
    return seen


def test_protected_table_is_retained_on_delete(
    lambda_zip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy_table_options(monkeypatch)
    mocks, stack = deploy(lambda_zip=lambda_zip)
    (opts,) = seen
    assert mocks.one("aws:dynamodb/table:Table").inputs["deletionProtectionEnabled"] is True
    assert opts.retain_on_delete is True
    assert opts.parent is stack
    seen.clear()
    deploy(lambda_zip=lambda_zip, deletion_protection=False)
    assert seen[0].retain_on_delete is False


def test_the_application_policy_allows_every_item_call_the_library_makes() -> None:
    """Each item-level DynamoDB call in the repository's source is an application action (a
    kill switch cleared with DeleteItem was once refused by the policy on AWS)."""
    import re
    from pathlib import Path

    from zae_limiter.infra.component import APP_POLICY_ACTIONS

    source = Path(__file__).resolve().parent.parent / "python/zae_limiter/storage/dynamodb"
    calls = {
        name
        for path in source.glob("*.py")
        for name in re.findall(r'\.call\(\s*"([a-z_]+)"', path.read_text())
    }
    operator_only = {"create_table", "delete_table", "create_backup", "list_backups", "scan",
                     "update_time_to_live", "describe_time_to_live"}  # fmt: skip
    assert "delete_item" in calls and "get_item" in calls  # the scan reads the source
    for name in calls - operator_only:
        action = "dynamodb:" + "".join(part.title() for part in name.split("_"))
        assert action in APP_POLICY_ACTIONS, name
