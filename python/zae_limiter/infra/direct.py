"""The table alone, provisioned directly with boto3: for local DynamoDB (moto, DynamoDB Local).

No Pulumi, no Lambda, no alarms: local endpoints have no use for them. The table definition is
`schema.TABLE`, the same one the Pulumi component deploys. Synchronous on purpose: it runs from
the CLI and from test fixtures, outside any event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import schema
from . import coerce_options

if TYPE_CHECKING:
    # boto3-stubs[dynamodb] is a dev dependency; without it the client is simply untyped.
    from mypy_boto3_dynamodb import DynamoDBClient  # type: ignore[import-not-found,unused-ignore]

__all__ = ["delete_table", "describe", "ensure_table"]


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def ensure_table(client: DynamoDBClient, name: str, options: object | None = None) -> bool:
    """Create table `ZAEL-<name>` with TTL if it does not exist; True when it was created.

    `options` is a StackOptions, InfraOptions, mapping or None; only billing mode and capacities
    apply here. An existing table is left as it is (its TTL is still switched on if it is off).
    """
    opts = coerce_options(options)
    table = schema.table_name(name)
    created = False
    try:
        client.describe_table(TableName=table)
    except client.exceptions.ResourceNotFoundException:
        kwargs = schema.TABLE.create_table_kwargs(
            table, opts.billing_mode, opts.read_capacity, opts.write_capacity
        )
        if opts.tags:
            kwargs["Tags"] = [{"Key": k, "Value": v} for k, v in sorted(opts.tags.items())]
        try:
            client.create_table(**kwargs)
            created = True
        except client.exceptions.ResourceInUseException:
            pass  # created concurrently by someone else: the outcome we wanted
        client.get_waiter("table_exists").wait(
            TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
        )
    _ensure_ttl(client, table)
    return created


def _ensure_ttl(client: DynamoDBClient, table: str) -> None:
    ttl = client.describe_time_to_live(TableName=table).get("TimeToLiveDescription", {})
    if ttl.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
        return
    try:
        client.update_time_to_live(
            TableName=table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": schema.TABLE.ttl_attribute},
        )
    except Exception as exc:
        # A concurrent caller enabled it between our describe and update.
        if _error_code(exc) != "ValidationException" or "already enabled" not in str(exc):
            raise


def describe(client: DynamoDBClient, name: str) -> dict[str, Any]:
    """A JSON-able summary of table `ZAEL-<name>`; `{"exists": False, ...}` when there is none."""
    table = schema.table_name(name)
    try:
        description = client.describe_table(TableName=table)["Table"]
    except client.exceptions.ResourceNotFoundException:
        return {"exists": False, "table_name": table}
    ttl = client.describe_time_to_live(TableName=table).get("TimeToLiveDescription", {})
    billing = description.get("BillingModeSummary", {}).get("BillingMode", "PROVISIONED")
    throughput = description.get("ProvisionedThroughput", {})
    stream = description.get("StreamSpecification", {})
    return {
        "exists": True,
        "table_name": table,
        "table_arn": description.get("TableArn"),
        "status": description.get("TableStatus"),
        "item_count": description.get("ItemCount"),
        "size_bytes": description.get("TableSizeBytes"),
        "billing_mode": billing,
        "read_capacity": throughput.get("ReadCapacityUnits") if billing == "PROVISIONED" else None,
        "write_capacity": (
            throughput.get("WriteCapacityUnits") if billing == "PROVISIONED" else None
        ),
        "stream_enabled": bool(stream.get("StreamEnabled")),
        "stream_view_type": stream.get("StreamViewType"),
        "stream_arn": description.get("LatestStreamArn"),
        "ttl_attribute": ttl.get("AttributeName"),
        "ttl_status": ttl.get("TimeToLiveStatus"),
        "indexes": sorted(i["IndexName"] for i in description.get("GlobalSecondaryIndexes", [])),
        "deletion_protection": bool(description.get("DeletionProtectionEnabled", False)),
        "created": (
            description["CreationDateTime"].isoformat()
            if "CreationDateTime" in description
            else None
        ),
    }


def delete_table(client: DynamoDBClient, name: str) -> bool:
    """Delete table `ZAEL-<name>` and wait until it is gone; False when it did not exist.

    A table with deletion protection is not touched: DynamoDB refuses, and the error is raised.
    """
    table = schema.table_name(name)
    try:
        client.delete_table(TableName=table)
    except client.exceptions.ResourceNotFoundException:
        return False
    client.get_waiter("table_not_exists").wait(
        TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )
    return True
