"""The table alone, provisioned directly with boto3: for local DynamoDB (moto, DynamoDB Local).

No Pulumi, no Lambda, no alarms: local endpoints have no use for them. The table definition is
`schema.TABLE`, the same one the Pulumi component deploys, and creating it is
`Repository.create_table`'s (`ensure_table` hands over to it). Synchronous on purpose: it runs
from the CLI and from test fixtures, outside any event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import schema
from ..infra import coerce_options

if TYPE_CHECKING:
    # boto3-stubs[dynamodb] is a dev dependency; without it the client is simply untyped.
    from mypy_boto3_dynamodb import DynamoDBClient  # type: ignore[import-not-found,unused-ignore]

    from ..storage.dynamodb.repository import Repository

__all__ = ["delete_table", "describe", "ensure_table"]


def ensure_table(client: DynamoDBClient, name: str, options: object | None = None) -> bool:
    """Create table `ZAEL-<name>` with TTL if it does not exist; True when it was created.

    `options` is a StackOptions, InfraOptions, mapping or None; only billing mode, capacities and
    tags apply here. An existing table is left as it is (its TTL is still switched on if it is
    off). The table is created by `Repository.create_table`, the one creation path, at the
    client's endpoint and region with the client's credentials; call this outside any event loop.
    """
    import asyncio

    opts = coerce_options(options)
    repo = _repository(client, name)

    async def create() -> bool:
        try:
            return await repo.create_table(
                opts.billing_mode, opts.read_capacity, opts.write_capacity, tags=opts.tags
            )
        finally:
            await repo.close()

    return asyncio.run(create())


def _repository(client: DynamoDBClient, name: str) -> Repository:
    import aioboto3

    from ..storage.dynamodb.repository import Repository

    credentials = getattr(client, "_get_credentials", lambda: None)()
    frozen = credentials.get_frozen_credentials() if credentials is not None else None
    session = aioboto3.Session(
        aws_access_key_id=frozen.access_key if frozen else None,
        aws_secret_access_key=frozen.secret_key if frozen else None,
        aws_session_token=frozen.token if frozen else None,
    )
    return Repository(
        schema.table_name(name),
        client.meta.region_name,
        client.meta.endpoint_url,
        session=session,
    )


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
