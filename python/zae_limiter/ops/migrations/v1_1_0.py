"""Schema 1.1.0: a `limit_def` copy on every stored-limit item.

`limit_def` holds the stored limit in the encoding of the bucket item's `lm#<limit>` attribute
(`capacity:burst:refill_amount:refill_period_seconds`, `Limit.encode`), so an operator or a
projection can compare a stored limit with the definition a bucket was last written with by
reading one attribute. It is derived data: nothing in the data plane reads it, so clients behave
identically before, during and after the migration, and limits written later (by `set_limits`)
simply lack it until the migration is run again. Rollback removes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import schema
from . import Migration

if TYPE_CHECKING:
    from ...storage.protocol import AdminStorage

VERSION = "1.1.0"
LIMIT_DEF_ATTR = schema.STORED_LIMIT_DEF


async def migrate(repo: AdminStorage) -> None:
    for stored in await repo.list_stored_limits():
        if stored.definition is None:
            # Conditional on the limit being unchanged: one replaced or deleted meanwhile
            # (set_limits) gets no stale copy.
            await repo.set_stored_limit_definition(
                stored.entity_id, stored.resource, stored.limit, stored.limit.encode()
            )


async def rollback(repo: AdminStorage) -> None:
    for stored in await repo.list_stored_limits():
        if stored.definition is not None:
            await repo.set_stored_limit_definition(
                stored.entity_id, stored.resource, stored.limit, None
            )


MIGRATION = Migration(
    version=VERSION,
    description="copy each stored limit's definition into `limit_def` (derived, unread by clients)",
    reversible=True,
    migrate=migrate,
    rollback=rollback,
)
