"""Migrations: selection, the built-in 1.1.0 forward and back with data and behaviour intact,
failing migrations that leave the table as it was or say loudly that it is half-migrated."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from zae_limiter import Limit, RateLimiter, RateLimitExceeded, StackOptions, schema
from zae_limiter.ops import migrations as mig
from zae_limiter.ops.migrations import Migration, MigrationError, v1_1_0
from zae_limiter.storage.dynamodb.repository import Repository

T0 = 1_800_000_000_000
LIMITS = [Limit.per_minute("rpm", 5), Limit.custom("tpm", 100, 100, 60, burst=150)]


async def noop(repo: Repository) -> None:
    return None


def m(version: str, reversible: bool = True) -> Migration:
    return Migration(version, f"test {version}", reversible, noop, noop if reversible else None)


# -- selection --------------------------------------------------------------------------------


def test_registry_holds_the_builtin_migration() -> None:
    assert [x.version for x in mig.get_migrations()] == ["1.1.0", "1.2.0"]
    assert mig.get_migrations()[0].reversible


def test_select_orders_forward_and_backward() -> None:
    ms = [m("1.2.0"), m("1.1.0"), m("2.0.0")]
    fwd = mig.select("1.0.0", "2.0.0", ms)
    assert [(s.migration.version, s.from_version, s.to_version) for s in fwd] == [
        ("1.1.0", "1.0.0", "1.1.0"), ("1.2.0", "1.1.0", "1.2.0"), ("2.0.0", "1.2.0", "2.0.0")
    ]
    assert [s.migration.version for s in mig.select("1.1.0", "1.2.0", ms)] == ["1.2.0"]
    back = mig.select("2.0.0", "1.1.0", ms)
    assert [(s.direction, s.from_version, s.to_version) for s in back] == [
        ("backward", "2.0.0", "1.2.0"), ("backward", "1.2.0", "1.1.0")
    ]
    assert mig.select("1.2.0", "1.2.0", ms) == []


def test_select_refuses_unknown_versions_and_irreversible_rollbacks() -> None:
    ms = [m("1.1.0"), m("1.2.0", reversible=False)]
    with pytest.raises(MigrationError, match=r"unknown schema version 1\.5\.0"):
        mig.select("1.0.0", "1.5.0", ms)
    with pytest.raises(MigrationError, match=r"1\.2\.0 cannot be rolled back: restore the backup"):
        mig.select("1.2.0", "1.0.0", ms)
    with pytest.raises(ValueError):
        Migration("1.3.0", "x", True, noop, None)


# -- against moto -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def limiter(endpoint_url: str) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(name="mig", endpoint_url=endpoint_url, stack_options=StackOptions(),
                           clock=Clock()) as lim:
        for eid in ("proj", "a", "b"):
            await lim.create_entity(eid, parent_id=None if eid == "proj" else "proj")
            await lim.set_limits(eid, LIMITS, resource="llm")
        await lim.set_limits("proj", [Limit.per_minute("rpm", 8)])  # _default_ resource
        # as a table created by the first release says (1.2.0 has tests of its own)
        await lim.repository.set_version_record(schema_version="1.0.0")
        yield lim


async def workload(lim: RateLimiter, entity_id: str) -> list[Any]:
    """A fixed sequence of data-plane calls; its results depend only on the stored limits and
    buckets, so they must not change with the schema version."""
    out: list[Any] = []
    for i in range(7):
        try:
            async with lim.acquire(entity_id, "llm", None, {"rpm": 1, "tpm": 20 + i},
                                   use_stored_limits=True) as lease:
                await lease.adjust(tpm=3)
            out.append("ok")
        except RateLimitExceeded as exc:
            out.append(("denied", [s.limit_name for s in exc.violations], exc.retry_after_ms))
    out.append(await lim.available(entity_id, "llm", None, use_stored_limits=True))
    out.append(await lim.time_until_available(entity_id, "llm", None, {"tpm": 140},
                                              use_stored_limits=True))
    return out


def items_by_key(items: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(i[schema.PK]["S"], i[schema.SK]["S"]): i for i in items
            if i[schema.PK]["S"] != schema.SYSTEM_PK}


def without(item: dict[str, Any], attr: str) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != attr}


async def test_builtin_migration_forward_and_back(limiter: RateLimiter) -> None:
    repo = limiter.repository
    before_a = await workload(limiter, "a")
    s0 = items_by_key(await repo.scan())

    report = await mig.apply(repo, "1.1.0", backup="backup-1")
    assert [s.to_version for s in report.applied] == ["1.1.0"]
    record = await repo.get_version_record()
    assert record is not None and record["schema_version"] == "1.1.0"
    assert record["migration_state"] == ""
    log = json.loads(record["migration_log"])
    assert log[-1] | {"at": ""} == {"at": "", "version": "1.1.0", "direction": "forward",
                                     "from": "1.0.0", "to": "1.1.0", "result": "applied",
                                     "backup": "backup-1"}
    s1 = items_by_key(await repo.scan())
    assert s1.keys() == s0.keys()
    limit_items = [k for k in s1 if k[1].startswith(schema.LIMIT_PREFIX)]
    assert len(limit_items) == 7
    for key, item in s1.items():
        if key in limit_items:
            lim = Limit.decode(item["limit_def"]["S"], item["limit_name"]["S"])
            assert lim.encode() == ":".join(
                item[f]["N"] for f in ("capacity", "burst", "refill_amount",
                                       "refill_period_seconds"))
            assert without(item, "limit_def") == s0[key]  # nothing else touched
        else:
            assert item == s0[key]

    # Same workload, same answers on the migrated table (b starts as a started).
    limiter.clear_cache()
    assert await workload(limiter, "b") == before_a
    # Migrating again is a no-op (already at 1.1.0); re-running the step itself is idempotent.
    assert (await mig.apply(repo, "1.1.0")).steps == []
    await v1_1_0.migrate(repo)

    back = await mig.apply(repo, "1.0.0", backup="backup-2")
    assert [(s.direction, s.to_version) for s in back.applied] == [("backward", "1.0.0")]
    s2 = items_by_key(await repo.scan())
    assert all("limit_def" not in i for i in s2.values())
    for key, item in s0.items():
        assert s2[key] == item  # a's items exactly as before the migration
    record = await repo.get_version_record()
    assert record is not None and record["schema_version"] == "1.0.0"
    assert [e["direction"] for e in json.loads(record["migration_log"])] == ["forward",
                                                                           "backward"]
    # and the data plane still answers the same after the rollback
    await limiter.create_entity("c", parent_id="proj")
    await limiter.set_limits("c", LIMITS, resource="llm")
    limiter.clear_cache()
    assert await workload(limiter, "c") == before_a


async def test_guide_rollback_snippet_shape(limiter: RateLimiter, endpoint_url: str) -> None:
    """The troubleshooting guide's manual rollback, run as written (endpoint instead of None)."""
    from zae_limiter.ops.migrations import get_migrations
    from zae_limiter.storage.dynamodb.repository import Repository as GuideRepository

    await mig.apply(limiter.repository, "1.1.0")
    repo = GuideRepository("ZAEL-mig", "us-east-1", endpoint_url)
    target = next((x for x in get_migrations() if x.version == "1.1.0"), None)
    assert target and target.reversible and target.rollback
    await target.rollback(repo)
    await repo.set_version_record(schema_version="1.0.0", updated_by="manual_rollback")
    await repo.close()
    record = await limiter.repository.get_version_record()
    assert record is not None and record["schema_version"] == "1.0.0"
    assert record["updated_by"] == "manual_rollback"
    assert all("limit_def" not in i for i in await limiter.repository.scan())


def _breaking(version: str, reversible: bool, undo_fails: bool = False) -> Migration:
    async def migrate(repo: Repository) -> None:
        # Change some items, then fail half way.
        for item in (await repo.scan())[:3]:
            await repo.call("update_item", TableName=repo.table_name,
                            Key={schema.PK: item[schema.PK], schema.SK: item[schema.SK]},
                            UpdateExpression="SET broken = :t",
                            ExpressionAttributeValues={":t": {"S": "yes"}})
        raise RuntimeError("disk on fire")

    async def rollback(repo: Repository) -> None:
        if undo_fails:
            raise RuntimeError("rollback also broken")
        for item in await repo.scan(FilterExpression="attribute_exists(broken)"):
            await repo.call("update_item", TableName=repo.table_name,
                            Key={schema.PK: item[schema.PK], schema.SK: item[schema.SK]},
                            UpdateExpression="REMOVE broken")

    return Migration(version, "breaks", reversible, migrate, rollback if reversible else None)


async def test_failing_reversible_migration_leaves_the_table_as_it_was(
    limiter: RateLimiter,
) -> None:
    repo = limiter.repository
    s0 = items_by_key(await repo.scan())
    with pytest.raises(MigrationError, match=r"disk on fire.*undone: the table is unchanged"):
        await mig.apply(repo, "1.2.0", migrations=[v1_1_0.MIGRATION, _breaking("1.2.0", True)])
    record = await repo.get_version_record()
    assert record is not None
    # The first step stood (recorded as applied), the failing one was undone.
    assert record["schema_version"] == "1.1.0" and record["migration_state"] == ""
    results = [e["result"] for e in json.loads(record["migration_log"])]
    assert results == ["applied", "failed, undone"]
    s1 = items_by_key(await repo.scan())
    assert {k: without(i, "limit_def") for k, i in s1.items()} == s0
    assert all("broken" not in i for i in s1.values())


async def test_failing_single_step_leaves_schema_unchanged(limiter: RateLimiter) -> None:
    repo = limiter.repository
    s0 = items_by_key(await repo.scan())
    with pytest.raises(MigrationError):
        await mig.apply(repo, "1.1.0", migrations=[_breaking("1.1.0", True)])
    record = await repo.get_version_record()
    assert record is not None and record["schema_version"] == "1.0.0"
    assert items_by_key(await repo.scan()) == s0


@pytest.mark.parametrize("undo_fails", [False, True])
async def test_unrecoverable_failure_says_half_migrated(
    limiter: RateLimiter, undo_fails: bool
) -> None:
    repo = limiter.repository
    broken = _breaking("1.1.0", reversible=undo_fails, undo_fails=undo_fails)
    with pytest.raises(MigrationError) as info:
        await mig.apply(repo, "1.1.0", migrations=[broken], backup="arn:backup/pre-1.1.0")
    assert info.value.half_migrated
    message = str(info.value)
    assert message.startswith("half-migrated:")
    assert "restore from backup arn:backup/pre-1.1.0" in message
    assert ("undoing it failed" if undo_fails else "not reversible") in message
    record = await repo.get_version_record()
    assert record is not None
    assert record["schema_version"] == "1.0.0"  # never claims the target version
    assert record["migration_state"] == message
    # Refuses to run on a half-migrated table until told the backup was restored.
    with pytest.raises(MigrationError, match=r"not in a clean state"):
        await mig.apply(repo, "1.1.0")
    report = await mig.apply(repo, "1.1.0", force=True)
    assert [s.to_version for s in report.applied] == ["1.1.0"]


async def test_dry_run_changes_nothing(limiter: RateLimiter) -> None:
    repo = limiter.repository
    s0 = await repo.scan()
    report = await mig.apply(repo, "1.1.0", dry_run=True)
    assert report.dry_run and [s.to_version for s in report.steps] == ["1.1.0"]
    assert report.applied == []
    assert await repo.scan() == s0
