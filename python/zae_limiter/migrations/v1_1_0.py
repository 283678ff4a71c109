"""Schema 1.1.0: a `limit_def` copy on every stored-limit item.

`limit_def` holds the stored limit in the encoding of the bucket item's `lm#<limit>` attribute
(`capacity:burst:refill_amount:refill_period_seconds`, `Limit.encode`), so an operator or a
projection can compare a stored limit with the definition a bucket was last written with by
reading one attribute. It is derived data: nothing in the data plane reads it, so clients behave
identically before, during and after the migration, and limits written later (by `set_limits`)
simply lack it until the migration is run again. Rollback removes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import botocore.exceptions

from .. import schema

if TYPE_CHECKING:
    from ..repository import Repository

from . import Migration

VERSION = "1.1.0"
LIMIT_DEF_ATTR = schema.STORED_LIMIT_DEF
_FIELDS = ("capacity", "burst", "refill_amount", "refill_period_seconds")


def encode(item: dict[str, Any]) -> str:
    return ":".join(str(int(item[f]["N"])) for f in _FIELDS)


async def _limit_items(repo: Repository, with_def: bool | None) -> list[dict[str, Any]]:
    names = {"#sk": schema.SK, "#def": LIMIT_DEF_ATTR}
    condition = "begins_with(#sk, :prefix)"
    if with_def is True:
        condition += " AND attribute_exists(#def)"
    elif with_def is False:
        condition += " AND attribute_not_exists(#def)"
    return await repo.scan(
        FilterExpression=condition,
        ExpressionAttributeNames=names,
        ExpressionAttributeValues={":prefix": {"S": schema.LIMIT_PREFIX}},
    )


async def migrate(repo: Repository) -> None:
    for item in await _limit_items(repo, with_def=False):
        if not all(f in item for f in _FIELDS):
            continue  # not a limit this library wrote; leave it alone
        values = {f":{f}": item[f] for f in _FIELDS}
        try:
            await repo.call(
                "update_item",
                TableName=repo.table_name,
                Key={schema.PK: item[schema.PK], schema.SK: item[schema.SK]},
                UpdateExpression="SET #def = :def",
                # A limit replaced or deleted meanwhile (set_limits) must not get a stale copy.
                ConditionExpression="attribute_exists(#pk) AND "
                + " AND ".join(f"#{f} = :{f}" for f in _FIELDS),
                ExpressionAttributeNames={"#def": LIMIT_DEF_ATTR, "#pk": schema.PK}
                | {f"#{f}": f for f in _FIELDS},
                ExpressionAttributeValues={":def": {"S": encode(item)}} | values,
            )
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise


async def rollback(repo: Repository) -> None:
    for item in await _limit_items(repo, with_def=True):
        await repo.call(
            "update_item",
            TableName=repo.table_name,
            Key={schema.PK: item[schema.PK], schema.SK: item[schema.SK]},
            UpdateExpression="REMOVE #def",
            ExpressionAttributeNames={"#def": LIMIT_DEF_ATTR},
        )


MIGRATION = Migration(
    version=VERSION,
    description="copy each stored limit's definition into `limit_def` (derived, unread by clients)",
    reversible=True,
    migrate=migrate,
    rollback=rollback,
)
