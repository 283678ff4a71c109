"""`ZaeLimiterStack`: one zae-limiter deployment as a Pulumi component.

Use it in your own Pulumi program::

    import pulumi
    from zae_limiter.infra import InfraOptions, ZaeLimiterStack

    limiter = ZaeLimiterStack("my-app", InfraOptions(alarm_sns_topic_arn=topic.arn_value))
    pulumi.export("table_name", limiter.table_name)

It creates the table `ZAEL-<name>` (definition: `zae_limiter.schema.TABLE`), and unless
`aggregator=False`: the aggregator Lambda fed by the table's stream, its dead-letter queue, log
group and least-privilege role, and the CloudWatch alarms of the operator guide. Names are those
of `zae_limiter.schema` / `zae_limiter.infra`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import pulumi
import pulumi_aws as aws

from .. import schema
from . import (
    InfraOptions,
    alarm_names,
    app_policy_name,
    coerce_options,
    log_group_name,
    role_name,
    validate_deployment_name,
)
from .package import HANDLER, cached_lambda_zip, stage_lambda_zip

__all__ = [
    "AGGREGATOR_ROLE_ACTIONS",
    "APP_INDEX_ACTIONS",
    "APP_POLICY_ACTIONS",
    "AUDIT_TRAIL_DENIED_ACTIONS",
    "LAMBDA_RUNTIME",
    "PARTIQL_WRITE_ACTIONS",
    "TYPE_TOKEN",
    "ZaeLimiterStack",
    "aggregator_policy_document",
    "app_policy_document",
    "dlq_policy_document",
    "options_from_config",
    "stack_program",
]

TYPE_TOKEN: Final = "zae-limiter:index:Stack"
LAMBDA_RUNTIME: Final = "python3.11"
DLQ_RETENTION_SECONDS: Final = 14 * 24 * 3600  # SQS's maximum: time to notice and replay
ALARM_PERIOD_SECONDS: Final = 300

STREAM_READ_ACTIONS: Final = (
    "dynamodb:DescribeStream",
    "dynamodb:GetRecords",
    "dynamodb:GetShardIterator",
)
AGGREGATOR_ROLE_ACTIONS: Final = (
    *STREAM_READ_ACTIONS,
    "dynamodb:ListStreams",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "sqs:SendMessage",
    "logs:CreateLogStream",
    "logs:PutLogEvents",
)
# Exactly the operations the library's Repository calls on an existing table (GetItem,
# UpdateItem, PutItem, Query, BatchWriteItem for bulk deletes, DeleteItem to clear a kill
# switch, DescribeTable); no BatchGetItem, ConditionCheckItem or TransactWriteItems: nothing
# calls them. Scan and the table's lifecycle (CreateTable, DeleteTable, backups) are operator
# tools, not an application's. (The audit partitions deny every delete, DeleteItem included.)
APP_POLICY_ACTIONS: Final = (
    "dynamodb:BatchWriteItem",
    "dynamodb:DeleteItem",
    "dynamodb:DescribeTable",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:Query",
    "dynamodb:UpdateItem",
)
# On the indexes (index/*) only reads happen (Query on GSI1 for an entity's children).
APP_INDEX_ACTIONS: Final = ("dynamodb:Query",)
KMS_QUEUE_ACTIONS: Final = ("kms:Decrypt", "kms:GenerateDataKey")
# The audit trail is append-only for applications: they record events with a conditional
# PutItem (and read them with Query/GetItem), never update or delete one; TTL expires them.
# PutItem itself cannot be denied (appending is a PutItem, and so is moving the chain's head):
# the hash chain makes an overwrite evident and the aggregator's AuditTrailChanges metric counts
# it (docs/design.md, "Audit trail").
AUDIT_TRAIL_DENIED_ACTIONS: Final = (
    "dynamodb:BatchWriteItem",
    "dynamodb:DeleteItem",
    "dynamodb:PartiQLDelete",
    "dynamodb:PartiQLInsert",
    "dynamodb:PartiQLUpdate",
    "dynamodb:TransactWriteItems",
    "dynamodb:UpdateItem",
)
# PartiQL writes, denied on the whole table as well: the library issues no PartiQL at all, and
# this deny holds whether or not DynamoDB supplies dynamodb:LeadingKeys to a PartiQL request (a
# Deny whose condition key is absent from the request does not apply, so the partition-scoped
# one above alone would depend on it).
PARTIQL_WRITE_ACTIONS: Final = (
    "dynamodb:PartiQLDelete",
    "dynamodb:PartiQLInsert",
    "dynamodb:PartiQLUpdate",
)

_LAMBDA_ASSUME_ROLE: Final = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "lambda.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    },
    sort_keys=True,
)


def aggregator_policy_document(
    table_arn: str, dlq_arn: str, log_group_arn: str, kms_key_arn: str | None = None
) -> dict[str, Any]:
    """The aggregator's permissions: this table's stream and items, its DLQ, its log group (and,
    when the DLQ is encrypted with a customer key, that key for sending to it)."""
    document: dict[str, Any] = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadTableStream",
                "Effect": "Allow",
                "Action": list(STREAM_READ_ACTIONS),
                "Resource": f"{table_arn}/stream/*",
            },
            {
                # ListStreams does not support resource-level permissions (the Service
                # Authorization Reference lists no resource type for it, and CDK's
                # StreamGrants.list grants it on "*"): "*" is as tight as AWS allows. It reveals
                # stream ARNs, not data; the Lambda service's poller uses it.
                "Sid": "ListStreamsRequiresWildcard",
                "Effect": "Allow",
                "Action": ["dynamodb:ListStreams"],
                "Resource": "*",
            },
            {
                # Usage snapshots are items of this table (same ENTITY# partitions as the buckets,
                # so a dynamodb:LeadingKeys condition could not narrow this further). The
                # aggregator reads a snapshot and writes it back with a conditional PutItem
                # (optimistic versioning); it calls nothing else on the table.
                "Sid": "WriteUsageSnapshots",
                "Effect": "Allow",
                "Action": ["dynamodb:GetItem", "dynamodb:PutItem"],
                "Resource": table_arn,
            },
            {
                "Sid": "SendToOwnDeadLetterQueue",
                "Effect": "Allow",
                "Action": ["sqs:SendMessage"],
                "Resource": dlq_arn,
            },
            {
                # Log streams are named by Lambda at run time, hence the ":*" under the group.
                # CreateLogGroup is not granted: the group is created (with retention) by the stack.
                "Sid": "WriteOwnLogs",
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": [log_group_arn, f"{log_group_arn}:*"],
            },
        ],
    }
    if kms_key_arn:
        document["Statement"].append({
            # Sending to an SSE-KMS queue needs the key's GenerateDataKey and Decrypt.
            "Sid": "EncryptForOwnDeadLetterQueue",
            "Effect": "Allow",
            "Action": list(KMS_QUEUE_ACTIONS),
            "Resource": kms_key_arn,
            "Condition": {
                "StringEquals": {"kms:ViaService": f"sqs.{_region(dlq_arn)}.amazonaws.com"}
            },
        })
    return document


def _region(arn: str) -> str:
    parts = arn.split(":")
    return parts[3] if len(parts) > 3 else "*"


def dlq_policy_document(dlq_arn: str, role_arn: str) -> dict[str, Any]:
    """The DLQ's queue policy: TLS only, and only the aggregator's role (as which the event
    source mapping writes its on-failure records) may send to it."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "sqs:*",
                "Resource": dlq_arn,
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            },
            {
                "Sid": "OnlyTheAggregatorMaySend",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "sqs:SendMessage",
                "Resource": dlq_arn,
                "Condition": {"ArnNotEquals": {"aws:PrincipalArn": role_arn}},
            },
            {
                "Sid": "AggregatorSendsFailureRecords",
                "Effect": "Allow",
                "Principal": {"AWS": role_arn},
                "Action": "sqs:SendMessage",
                "Resource": dlq_arn,
            },
        ],
    }


def app_policy_document(table_arn: str) -> dict[str, Any]:
    """What an application using the limiter needs: this table and its indexes, nothing else;
    and no way to update or delete audit events (`AUDIT#` partitions) it recorded."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "UseRateLimiterTable",
                "Effect": "Allow",
                "Action": list(APP_POLICY_ACTIONS),
                "Resource": table_arn,
            },
            {
                "Sid": "QueryRateLimiterIndexes",
                "Effect": "Allow",
                "Action": list(APP_INDEX_ACTIONS),
                "Resource": f"{table_arn}/index/*",
            },
            {
                # Audit events need PutItem (conditional: never overwrites) and Query, both
                # allowed above. IAM cannot demand the condition, so PutItem stays possible on
                # an existing event; everything that updates or deletes one is refused.
                "Sid": "AuditTrailIsAppendOnly",
                "Effect": "Deny",
                "Action": list(AUDIT_TRAIL_DENIED_ACTIONS),
                "Resource": table_arn,
                "Condition": {
                    "ForAnyValue:StringLike": {
                        "dynamodb:LeadingKeys": [f"{schema.AUDIT_PK_PREFIX}*"]
                    }
                },
            },
            {
                "Sid": "NoPartiQLWrites",
                "Effect": "Deny",
                "Action": list(PARTIQL_WRITE_ACTIONS),
                "Resource": [table_arn, f"{table_arn}/index/*"],
            },
        ],
    }


def _strip_arn_suffix(arn: str) -> str:
    # pulumi-aws reports a log group's ARN with a trailing ":*" in some versions.
    return arn[:-2] if arn.endswith(":*") else arn


class ZaeLimiterStack(pulumi.ComponentResource):
    """A zae-limiter deployment called `name` (table `ZAEL-<name>`).

    `options`: an `InfraOptions`, a `zae_limiter.models.StackOptions`, a mapping of option names,
    or None for the defaults. `lambda_zip`: a prebuilt aggregator bundle (default: built from the
    installed package, see `zae_limiter.infra.package`).

    Attributes (Outputs): table_name, table_arn, stream_arn, function_arn (None without the
    aggregator), dlq_url (None without the aggregator), alarm_names, role_arn, app_policy_arn.
    """

    table_name: pulumi.Output[str]
    table_arn: pulumi.Output[str]
    stream_arn: pulumi.Output[str]
    function_arn: pulumi.Output[str | None]
    dlq_url: pulumi.Output[str | None]
    alarm_names: pulumi.Output[list[str]]
    role_arn: pulumi.Output[str | None]
    app_policy_arn: pulumi.Output[str | None]

    def __init__(
        self,
        name: str,
        options: object | None = None,
        opts: pulumi.ResourceOptions | None = None,
        *,
        lambda_zip: Path | None = None,
    ) -> None:
        self.name = validate_deployment_name(name)
        self.options: InfraOptions = coerce_options(options)
        self.physical_table_name = schema.table_name(self.name)
        super().__init__(TYPE_TOKEN, self.physical_table_name, None, opts)

        o = self.options
        prefix = self.physical_table_name
        self._tags: dict[str, str] = {
            **dict(o.tags),
            "zae-limiter:name": self.name,
            "zae-limiter:schema-version": schema.SCHEMA_VERSION,
        }
        child = pulumi.ResourceOptions(parent=self)

        self.table: aws.dynamodb.Table | None = None
        table_arn: pulumi.Output[str]
        stream_arn: pulumi.Output[str]
        if o.create_table:
            self.table = self._table(prefix, o)
            table_arn = self.table.arn
            stream_arn = self.table.stream_arn
        else:
            # An existing table: only the aggregator and alarms are managed around it.
            existing = aws.dynamodb.get_table_output(
                name=self.physical_table_name, opts=pulumi.InvokeOutputOptions(parent=self)
            )
            table_arn = existing.arn
            stream_arn = existing.stream_arn

        self.dlq: aws.sqs.Queue | None = None
        self.log_group: aws.cloudwatch.LogGroup | None = None
        self.role: aws.iam.Role | None = None
        self.role_policy: aws.iam.RolePolicy | None = None
        self.dlq_policy: aws.sqs.QueuePolicy | None = None
        self.function: aws.lambda_.Function | None = None
        self.event_source_mapping: aws.lambda_.EventSourceMapping | None = None
        if o.aggregator:
            self._aggregator(prefix, o, table_arn, stream_arn, lambda_zip, child)

        self.app_policy: aws.iam.Policy | None = None
        if o.create_app_policy:
            self.app_policy = aws.iam.Policy(
                f"{prefix}-app-policy",
                name=app_policy_name(self.name),
                description=f"Use the zae-limiter table {prefix} and its indexes",
                policy=table_arn.apply(lambda arn: json.dumps(app_policy_document(arn))),
                tags=self._tags,
                opts=child,
            )

        self.alarms: dict[str, aws.cloudwatch.MetricAlarm] = (
            self._alarms(o, child) if o.alarms else {}
        )

        self.table_name = pulumi.Output.from_input(self.physical_table_name)
        self.table_arn = table_arn
        self.stream_arn = stream_arn
        self.function_arn = (
            self.function.arn if self.function is not None else pulumi.Output.from_input(None)
        )
        self.dlq_url = self.dlq.url if self.dlq is not None else pulumi.Output.from_input(None)
        self.role_arn = self.role.arn if self.role is not None else pulumi.Output.from_input(None)
        self.app_policy_arn = (
            self.app_policy.arn if self.app_policy is not None else pulumi.Output.from_input(None)
        )
        self.alarm_names = pulumi.Output.all(*(a.name for a in self.alarms.values())).apply(
            lambda names: [str(n) for n in names]
        )
        self.register_outputs(
            {
                "table_name": self.table_name,
                "table_arn": self.table_arn,
                "stream_arn": self.stream_arn,
                "function_arn": self.function_arn,
                "dlq_url": self.dlq_url,
                "role_arn": self.role_arn,
                "app_policy_arn": self.app_policy_arn,
                "alarm_names": self.alarm_names,
            }
        )

    # -- table ---------------------------------------------------------------------------------

    def _table(self, prefix: str, o: InfraOptions) -> aws.dynamodb.Table:
        definition = schema.TABLE
        capacity: tuple[int, int] | None = None
        if o.provisioned:
            # StackOptions requires both capacities with PROVISIONED; the fallback matches
            # schema.TableDefinition.create_table_kwargs.
            capacity = (o.read_capacity or 5, o.write_capacity or 5)
        # pitr_recovery_days=None is AWS's default period, as in zae-limiter 0.2.0; it is given
        # explicitly so that a stack moving from another period to None does go back to it.
        pitr = (
            aws.dynamodb.TablePointInTimeRecoveryArgs(
                enabled=True,
                recovery_period_in_days=o.pitr_recovery_days or o.PITR_DEFAULT_RECOVERY_DAYS,
            )
            if o.point_in_time_recovery
            else aws.dynamodb.TablePointInTimeRecoveryArgs(enabled=False)
        )
        return aws.dynamodb.Table(
            f"{prefix}-table",
            name=self.physical_table_name,
            hash_key=definition.hash_key,
            range_key=definition.range_key,
            attributes=[
                aws.dynamodb.TableAttributeArgs(name=a.name, type=a.type)
                for a in definition.attributes
            ],
            global_secondary_indexes=[
                _gsi(index, capacity) for index in definition.global_secondary_indexes
            ],
            billing_mode=o.billing_mode,
            stream_enabled=True,
            stream_view_type=definition.stream_view_type,
            ttl=aws.dynamodb.TableTtlArgs(attribute_name=definition.ttl_attribute, enabled=True),
            point_in_time_recovery=pitr,
            deletion_protection_enabled=o.deletion_protection,
            # Always KMS-encrypted: with the given customer key, else the AWS-managed
            # aws/dynamodb key, whose use shows in CloudTrail (unlike the AWS-owned default).
            server_side_encryption=aws.dynamodb.TableServerSideEncryptionArgs(
                enabled=True, kms_key_arn=o.kms_key_arn
            ),
            read_capacity=capacity[0] if capacity else None,
            write_capacity=capacity[1] if capacity else None,
            tags=self._tags,
            opts=pulumi.ResourceOptions(
                parent=self,
                # A protected table outlives `destroy` (AWS would refuse to delete it anyway,
                # leaving a half-destroyed stack); it can be adopted back with
                # adopt_existing_table.
                retain_on_delete=o.deletion_protection,
                import_=self.physical_table_name if o.adopt_existing_table else None,
            ),
        )

    # -- aggregator ----------------------------------------------------------------------------

    def _aggregator(
        self,
        prefix: str,
        o: InfraOptions,
        table_arn: pulumi.Output[str],
        stream_arn: pulumi.Output[str],
        lambda_zip: Path | None,
        child: pulumi.ResourceOptions,
    ) -> None:
        function_name = schema.aggregator_function_name(self.name)
        self.dlq = aws.sqs.Queue(
            f"{prefix}-aggregator-dlq",
            name=schema.aggregator_dlq_name(self.name),
            message_retention_seconds=DLQ_RETENTION_SECONDS,
            # Encrypted at rest: with the table's customer key when one is configured, else
            # SQS-managed keys. Never unencrypted.
            kms_master_key_id=o.kms_key_arn,
            sqs_managed_sse_enabled=None if o.kms_key_arn else True,
            tags=self._tags,
            opts=child,
        )
        # Created by the stack, not by Lambda on first run: Lambda's own would keep logs forever
        # and would need logs:CreateLogGroup.
        self.log_group = aws.cloudwatch.LogGroup(
            f"{prefix}-aggregator-logs",
            name=log_group_name(self.name),
            retention_in_days=o.log_retention_days,
            tags=self._tags,
            opts=child,
        )
        self.role = aws.iam.Role(
            f"{prefix}-aggregator-role",
            name=role_name(self.name, o.role_name_format),
            assume_role_policy=_LAMBDA_ASSUME_ROLE,
            permissions_boundary=self._boundary_arn(o.permission_boundary),
            description=f"zae-limiter aggregator of {prefix}",
            tags=self._tags,
            opts=child,
        )
        self.role_policy = aws.iam.RolePolicy(
            f"{prefix}-aggregator-policy",
            role=self.role.id,
            name="aggregator",
            policy=pulumi.Output.all(table_arn, self.dlq.arn, self.log_group.arn).apply(
                lambda arns: json.dumps(
                    aggregator_policy_document(
                        str(arns[0]), str(arns[1]), _strip_arn_suffix(str(arns[2])),
                        o.kms_key_arn,
                    ),
                    sort_keys=True,
                )
            ),
            opts=child,
        )
        # The DLQ's replay trusts only pointers into the stream, and the queue itself accepts
        # messages only over TLS and from the aggregator's role.
        self.dlq_policy = aws.sqs.QueuePolicy(
            f"{prefix}-aggregator-dlq-policy",
            queue_url=self.dlq.url,
            policy=pulumi.Output.all(self.dlq.arn, self.role.arn).apply(
                lambda arns: json.dumps(
                    dlq_policy_document(str(arns[0]), str(arns[1])), sort_keys=True
                )
            ),
            opts=child,
        )
        if lambda_zip is not None:
            # Read once; what is hashed is what is uploaded: a private copy of these bytes, so
            # changing the given file afterwards cannot change the code behind the hash.
            zip_path, code_hash = stage_lambda_zip(Path(lambda_zip).read_bytes())
        else:
            zip_path, code_hash = cached_lambda_zip()
        self.function = aws.lambda_.Function(
            f"{prefix}-aggregator",
            name=function_name,
            description=f"zae-limiter usage aggregator of {prefix}",
            runtime=LAMBDA_RUNTIME,
            handler=HANDLER,
            code=pulumi.FileArchive(str(zip_path)),
            source_code_hash=code_hash,
            role=self.role.arn,
            memory_size=o.lambda_memory_mb,
            timeout=o.lambda_timeout_seconds,
            environment=aws.lambda_.FunctionEnvironmentArgs(
                variables={
                    "TABLE_NAME": self.physical_table_name,
                    "USAGE_WINDOWS": ",".join(o.usage_windows),
                    "SNAPSHOT_TTL_DAYS": str(o.snapshot_ttl_days),
                    "SCHEMA_VERSION": schema.SCHEMA_VERSION,
                    "LOG_LEVEL": o.log_level.upper(),
                }
            ),
            tags=self._tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.log_group]),
        )
        self.event_source_mapping = aws.lambda_.EventSourceMapping(
            f"{prefix}-aggregator-stream",
            event_source_arn=stream_arn,
            function_name=self.function.arn,
            starting_position="LATEST",
            batch_size=o.batch_size,
            maximum_batching_window_in_seconds=o.maximum_batching_window_seconds,
            bisect_batch_on_function_error=True,
            maximum_retry_attempts=o.maximum_retry_attempts,
            maximum_record_age_in_seconds=o.maximum_record_age_seconds,
            function_response_types=["ReportBatchItemFailures"],
            destination_config=aws.lambda_.EventSourceMappingDestinationConfigArgs(
                on_failure=aws.lambda_.EventSourceMappingDestinationConfigOnFailureArgs(
                    destination_arn=self.dlq.arn
                )
            ),
            filter_criteria=aws.lambda_.EventSourceMappingFilterCriteriaArgs(
                filters=[
                    aws.lambda_.EventSourceMappingFilterCriteriaFilterArgs(
                        pattern=json.dumps(pattern, sort_keys=True)
                    )
                    for pattern in schema.AGGREGATOR_FILTER_PATTERNS
                ]
            ),
            tags=self._tags,
            # AWS checks the role can read the stream when the mapping is created.
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[self.role_policy, self.dlq_policy]
            ),
        )

    def _boundary_arn(self, boundary: str | None) -> pulumi.Input[str] | None:
        """A permissions boundary given as a policy name (as zae-limiter 0.2.0 allowed) is the
        customer-managed policy of that name in the deploying account; an ARN is kept."""
        if boundary is None or boundary.startswith("arn:"):
            return boundary
        invoke = pulumi.InvokeOutputOptions(parent=self)
        partition = aws.get_partition_output(opts=invoke)
        identity = aws.get_caller_identity_output(opts=invoke)
        return pulumi.Output.all(partition, identity).apply(
            lambda found: f"arn:{found[0].partition}:iam::{found[1].account_id}:policy/{boundary}"
        )

    # -- alarms --------------------------------------------------------------------------------

    def _alarms(
        self, o: InfraOptions, child: pulumi.ResourceOptions
    ) -> dict[str, aws.cloudwatch.MetricAlarm]:
        names = alarm_names(self.name, aggregator=o.aggregator)
        actions = [o.alarm_sns_topic_arn] if o.alarm_sns_topic_arn else []
        table_dims = {"TableName": self.physical_table_name}
        function_dims = {"FunctionName": schema.aggregator_function_name(self.name)}
        queue_dims = {"QueueName": schema.aggregator_dlq_name(self.name)}
        # (key, namespace, metric, statistic, threshold, dimensions, description)
        specs: list[tuple[str, str, str, str, float, Mapping[str, str], str]] = [
            ("read_throttles", "AWS/DynamoDB", "ReadThrottleEvents", "Sum",
             o.throttle_threshold, table_dims, "DynamoDB read requests are being throttled"),
            ("write_throttles", "AWS/DynamoDB", "WriteThrottleEvents", "Sum",
             o.throttle_threshold, table_dims, "DynamoDB write requests are being throttled"),
        ]
        if o.aggregator:
            specs += [
                ("errors", "AWS/Lambda", "Errors", "Sum", o.error_threshold, function_dims,
                 "The aggregator Lambda is failing"),
                ("duration", "AWS/Lambda", "Duration", "Maximum", o.duration_threshold_ms,
                 function_dims,
                 f"Aggregator runs take over {o.duration_threshold_pct}% of their timeout"),
                ("iterator_age", "AWS/Lambda", "IteratorAge", "Maximum",
                 float(o.iterator_age_threshold_ms), function_dims,
                 "The aggregator is falling behind the table's stream"),
                ("dlq_messages", "AWS/SQS", "ApproximateNumberOfMessagesVisible", "Maximum",
                 o.dlq_threshold, queue_dims,
                 "Stream batches the aggregator gave up on are waiting in its dead-letter queue"),
                # Threshold 0, not configurable: the library never changes or deletes an audit
                # item, so a single one is worth a look.
                ("audit_changes", schema.METRIC_NAMESPACE, schema.AUDIT_CHANGES_METRIC, "Sum",
                 0.0, table_dims,
                 "Audit items were changed or deleted other than by an append or TTL expiry"),
            ]
        # alarm_names' order, so that the alarm_names output lists them as documented.
        order = list(names)
        specs.sort(key=lambda spec: order.index(spec[0]))
        alarms: dict[str, aws.cloudwatch.MetricAlarm] = {}
        for key, namespace, metric, statistic, threshold, dims, description in specs:
            depends: Sequence[pulumi.Resource] = [
                r for r in (self.function, self.dlq)
                if r is not None and namespace != "AWS/DynamoDB"
            ]
            alarms[key] = aws.cloudwatch.MetricAlarm(
                f"{names[key]}-alarm",
                name=names[key],
                alarm_description=f"{description} (zae-limiter {self.physical_table_name})",
                namespace=namespace,
                metric_name=metric,
                statistic=statistic,
                dimensions=dict(dims),
                period=ALARM_PERIOD_SECONDS,
                evaluation_periods=1,
                threshold=threshold,
                comparison_operator="GreaterThanThreshold",
                # No data means no traffic, no throttling, an empty queue: all healthy.
                treat_missing_data="notBreaching",
                alarm_actions=actions,
                ok_actions=actions,
                tags=self._tags,
                opts=pulumi.ResourceOptions(parent=self, depends_on=list(depends))
                if depends
                else child,
            )
        return alarms


def _gsi(
    index: schema.Index, capacity: tuple[int, int] | None
) -> aws.dynamodb.TableGlobalSecondaryIndexArgs:
    read, write = capacity if capacity else (None, None)
    # pulumi-aws 7.x deprecates an index's hash_key/range_key for key_schemas; older releases
    # only know the former.
    key_schema_args = getattr(aws.dynamodb, "TableGlobalSecondaryIndexKeySchemaArgs", None)
    if key_schema_args is not None:
        return aws.dynamodb.TableGlobalSecondaryIndexArgs(
            name=index.name,
            projection_type=index.projection,
            key_schemas=[
                key_schema_args(attribute_name=index.hash_key, key_type="HASH"),
                key_schema_args(attribute_name=index.range_key, key_type="RANGE"),
            ],
            read_capacity=read,
            write_capacity=write,
        )
    return aws.dynamodb.TableGlobalSecondaryIndexArgs(  # pragma: no cover - old pulumi-aws
        name=index.name,
        projection_type=index.projection,
        hash_key=index.hash_key,
        range_key=index.range_key,
        read_capacity=read,
        write_capacity=write,
    )


# -- the ready program -------------------------------------------------------------------------

CONFIG_NAMESPACE: Final = "zae-limiter"
EXPORTS: Final = (
    "table_name", "table_arn", "stream_arn", "function_arn", "dlq_url", "role_arn",
    "app_policy_arn", "alarm_names",
)


def options_from_config(config: pulumi.Config) -> InfraOptions:
    """InfraOptions from a program's stack config (`zae-limiter:<option>`; see pulumi/README.md)."""
    raw = {f.name: config.get(f.name) for f in dataclasses.fields(InfraOptions)}
    return InfraOptions.from_config_values({k: v for k, v in raw.items() if v is not None})


def stack_program() -> ZaeLimiterStack:
    """The whole program of `pulumi/__main__.py`: one deployment from the stack's config."""
    config = pulumi.Config(CONFIG_NAMESPACE)
    stack = ZaeLimiterStack(config.require("name"), options_from_config(config))
    for key in EXPORTS:
        pulumi.export(key, getattr(stack, key))
    return stack
