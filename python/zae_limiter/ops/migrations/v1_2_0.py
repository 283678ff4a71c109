"""Schema 1.2.0: every bucket's state is `fa#<limit>`, the instant it is full again.

The 1.x layout stored tokens at an anchor (`tk#`/`lr#`) and, to keep concurrent writers from
conflicting, re-anchored a full bucket at a future epoch boundary: refill stopped until then, so
a drained bucket answered retry-afters up to a minute too long. The new state is one number, so
"full at my now" is a condition DynamoDB evaluates and every decision is an exact token bucket
(docs/design.md section 1).

Clients of this release read both layouts and convert a 1.x state on its first write
(`zae_limiter.stored`); this migration converts the rest at once, each limit by one write
conditioned on its exact 1.x state (a limit changed meanwhile is read again and converted
then), and leaves a fence in `tk#`/`lr#` that a 1.x client reads as a century of debt, so one
still running denies rather than admits what the new state already counts. It then sets the
minimum client version to this release: 1.x clients refuse the table when they start. The
balance each limit holds at the conversion is the balance it held before (`available()` and
decisions are the same at that instant; refill then runs continuously instead of in epochs).

Rollback writes each limit back as tokens at an anchor (its balance at the rollback, anchored
then), conditioned on its exact state, and restores the previous minimum client version. Stop
clients of this release first: they would convert the limits again as they write them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ... import core
from ...engine import stored
from ...exceptions import ValidationError
from ...models import Limit
from ...storage.protocol import ConditionFailed, LimitWrite
from ...version import INITIAL_MIN_CLIENT_VERSION
from . import Migration

if TYPE_CHECKING:
    from ...storage.protocol import AdminStorage, BucketItem, Storage

VERSION = "1.2.0"
MIN_CLIENT_VERSION = INITIAL_MIN_CLIENT_VERSION
# Where the minimum client version this migration replaced is kept, for its rollback.
PREVIOUS_MIN_CLIENT = "min_client_version_before_1_2_0"
_ROUNDS = 8


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _limit(name: str, definition: str | None) -> Limit | None:
    if definition is None:
        return None  # no stored definition: the data plane converts it with its own limit
    try:
        return Limit.decode(definition, name)
    except ValidationError:
        return None


async def _convert(repo: Storage, bucket: BucketItem) -> None:
    for _ in range(_ROUNDS):
        now = _now_ms()
        writes = []
        for name, state in bucket.limits.items():
            limit = _limit(name, state.definition)
            if state.legacy is None or limit is None:
                continue
            level = stored.full_at(limit, state, now)
            assert level is not None
            writes.append(
                LimitWrite(
                    limit_name=name,
                    mode=core.WRITE_ABSOLUTE,
                    value=level,
                    cond_lo=None,
                    cond_hi=None,
                    delta_milli=0,
                    legacy=state.legacy,
                    fence=stored.fence(limit, now),
                )
            )
        if not writes:
            return
        try:
            await repo.write_bucket(
                bucket.entity_id,
                bucket.resource,
                writes,
                now,
                known_size=bucket.size,
                known_ids=bucket.write_ids,
            )
            return
        except ConditionFailed as exc:
            if exc.current is None:
                return  # deleted meanwhile
            bucket = exc.current
    raise RuntimeError(
        f"bucket {bucket.entity_id}/{bucket.resource} kept changing: run the migration again"
    )


async def migrate(repo: AdminStorage) -> None:
    storage: Storage = repo  # type: ignore[assignment]
    for bucket in await repo.all_buckets():
        await _convert(storage, bucket)
    record = await repo.get_version_record() or {}
    previous = str(record.get("min_client_version") or "0.0.0")
    extra = {} if PREVIOUS_MIN_CLIENT in record else {PREVIOUS_MIN_CLIENT: previous}
    await repo.set_version_record(min_client_version=MIN_CLIENT_VERSION, **extra)


async def rollback(repo: AdminStorage) -> None:
    for bucket in await repo.all_buckets():
        for name, state in bucket.limits.items():
            limit = _limit(name, state.definition)
            if state.full_at is None or limit is None:
                continue
            for _ in range(_ROUNDS):
                now = _now_ms()
                tokens = stored.available(limit, state, now)
                assert state.full_at is not None
                if await repo.restore_legacy_state(
                    bucket.entity_id, bucket.resource, name, state.full_at, (tokens, now)
                ):
                    break
                fresh = [b for b in await repo.list_buckets(bucket.entity_id)
                         if b.resource == bucket.resource]
                current = fresh[0].limits.get(name) if fresh else None
                if current is None or current.full_at is None:
                    break
                state = current
    record = await repo.get_version_record() or {}
    previous = str(record.get(PREVIOUS_MIN_CLIENT) or "0.0.0")
    await repo.set_version_record(min_client_version=previous)


MIGRATION = Migration(
    version=VERSION,
    description="store each bucket as the instant it is full again (`fa#`): exact refill; "
    "1.x clients are fenced off and must upgrade",
    reversible=True,
    migrate=migrate,
    rollback=rollback,
)
