"""The audit trail: every audited change recorded with its principal, resource and details, in
time order, paged, expiring after 90 days, written once; kept when the entity is deleted; read by
both limiters and `zae-limiter audit`; invisible to the entity's other reads and the aggregator.

The audit logic (what the limiter records, ids, details, order, paging, principals, failures)
runs on `MemoryStorage`, which the storage contract (test_storage_contract.py) shows behaves as
DynamoDB does. What is DynamoDB's own runs on moto's server, marked `integration`: the hash
chain's appends and their races, tampering with stored items, Query paging, the table's TTL,
raw items of older layouts, the stream and the aggregator, and the CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import boto3
import pytest
from click.testing import CliRunner, Result

from zae_limiter import (
    AuditAction,
    AuditEvent,
    EntityExistsError,
    EntityNotFoundError,
    InvalidIdentifierError,
    Limit,
    MemoryStorage,
    RateLimiter,
    RateLimiterUnavailable,
    StackOptions,
    SyncRateLimiter,
    ValidationError,
    schema,
)
from zae_limiter import audit as audit_mod
from zae_limiter.aggregator.handler import SnapshotTable, process_batch
from zae_limiter.aggregator.snapshots import parse_record
from zae_limiter.aggregator.stream import StreamRunner, matches_filter, to_lambda_record
from zae_limiter.cli import main
from zae_limiter.storage.dynamodb import repository as repository_mod
from zae_limiter.storage.dynamodb.codec import audit_event_from_item, audit_item
from zae_limiter.storage.protocol import Item, RepositoryUnavailable, StorageError

NAME = "audit"
TABLE = schema.table_name(NAME)
RPM = Limit.per_minute("rpm", 100)
TPM = Limit.per_minute("tpm", 10_000)
NINETY_DAYS = 90 * 86400


@pytest.fixture
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    """On a `MemoryStorage`; a test marked `integration` gets it on moto's server instead."""
    if request.node.get_closest_marker("integration") is None:
        async with RateLimiter(name=NAME, repository=MemoryStorage(TABLE)) as lim:
            yield lim
        return
    endpoint_url: str = request.getfixturevalue("endpoint_url")
    async with RateLimiter(name=NAME, endpoint_url=endpoint_url,
                           stack_options=StackOptions()) as lim:
        yield lim


def ddb(endpoint_url: str) -> Any:
    return boto3.client("dynamodb", endpoint_url=endpoint_url, region_name="us-east-1")


def items(endpoint_url: str) -> list[dict[str, Any]]:
    return list(ddb(endpoint_url).scan(TableName=TABLE, ConsistentRead=True)["Items"])


def audit_items(endpoint_url: str) -> list[dict[str, Any]]:
    return [i for i in items(endpoint_url)
            if schema.is_audit_key(i[schema.PK]["S"], i[schema.SK]["S"])]


async def stored_items(limiter: RateLimiter) -> list[Item]:
    """Every item of the limiter's table, as the table holds it (on either store)."""
    return await limiter.repository.export_items()


async def stored_audit_items(limiter: RateLimiter) -> list[Item]:
    return [i for i in await stored_items(limiter)
            if schema.is_audit_key(i[schema.PK]["S"], i[schema.SK]["S"])]


# -- keys and ids -----------------------------------------------------------------------------


def test_audit_keys_are_their_own_partition() -> None:
    pk, sk = schema.audit_pk("key-1"), schema.audit_sk("01J0000000000000000000000A")
    assert (pk, sk) == ("AUDIT#key-1", "#AUDIT#01J0000000000000000000000A")  # 0.2.0's layout
    assert schema.is_audit_key(pk, sk) and not schema.is_bucket_key(pk, sk)
    assert not pk.startswith(schema.entity_pk(""))  # no query of ENTITY#<id> can meet it
    assert schema.event_id_from_audit_sk(sk) == "01J0000000000000000000000A"
    assert sk.startswith(schema.audit_sk())
    with pytest.raises(ValueError):
        schema.event_id_from_audit_sk(schema.audit_sk())
    assert schema.audit_ttl(1_700_000_000_123) == 1_700_000_000 + NINETY_DAYS
    assert schema.TABLE.ttl_attribute == schema.TTL_ATTRIBUTE  # the snapshots' TTL, reused


def test_event_ids_are_ulid_like_unique_and_time_ordered() -> None:
    now = int(time.time() * 1000)
    ids = [audit_mod.new_event_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    for event_id in ids[:10]:
        assert audit_mod.is_event_id(event_id) and len(event_id) == 26
        assert set(event_id) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
        assert abs(audit_mod.event_time_ms(event_id) - now) < 5_000
    source = audit_mod._IdSource()
    same = [source.next(1_000) for _ in range(50)]  # one millisecond: still increasing
    back = [source.next(999), source.next(5)]  # the clock stepped back: still increasing
    later = source.next(2_000)
    sequence = [*same, *back, later]
    assert sequence == sorted(sequence) and len(set(sequence)) == len(sequence)
    assert audit_mod.event_time_ms(back[-1]) == 1_000 and audit_mod.event_time_ms(later) == 2_000
    # a timestamp later than another's always sorts after it, whatever the random part
    assert audit_mod._IdSource().next(1_001) > same[-1]
    assert not audit_mod.is_event_id("8" + ids[0][1:])  # above 128 bits
    assert not audit_mod.is_event_id(ids[0].lower()) and not audit_mod.is_event_id("x")


def test_event_ids_are_unique_across_threads() -> None:
    found: list[list[str]] = []

    def make() -> None:
        found.append([audit_mod.new_event_id() for _ in range(500)])

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for ids in found for i in ids]
    assert len(set(every)) == 2000
    assert all(ids == sorted(ids) for ids in found)


def test_event_item_round_trip() -> None:
    event = audit_mod.new_event(
        AuditAction.LIMITS_SET, "key-1", "arn:aws:iam::123456789012:user/alice", "gpt-4o",
        {"limits": [RPM.to_dict()], "flag": True, "none": None, "ratio": 0.5, "tags": ["a"]},
    )
    item = audit_item(event)
    assert item[schema.PK] == {"S": "AUDIT#key-1"}
    assert item[schema.SK] == {"S": f"#AUDIT#{event.event_id}"}
    assert int(item[schema.TTL_ATTRIBUTE]["N"]) == schema.audit_ttl(
        audit_mod.event_time_ms(event.event_id))
    assert audit_event_from_item(item) == event
    assert event.timestamp.endswith("Z")
    bare = audit_item(audit_mod.new_event(AuditAction.ENTITY_DELETED, "k"))
    assert schema.AUDIT_PRINCIPAL not in bare and schema.AUDIT_RESOURCE not in bare


# -- recording every action -------------------------------------------------------------------


async def test_every_action_is_recorded_with_principal_resource_and_details(
    limiter: RateLimiter,
) -> None:
    await limiter.create_entity("proj", principal="admin@example.com")
    await limiter.create_entity("key", name="Key", parent_id="proj", metadata={"tier": "gold"},
                                principal="onboarding-service")
    await limiter.set_limits("key", [RPM, TPM], "gpt-4o",
                             principal="arn:aws:iam::123456789012:user/ops")
    await limiter.delete_limits("key", "gpt-4o", principal="cleanup-service")
    await limiter.delete_entity("key", principal="ops+oncall@example.com")

    events = await limiter.get_audit_events("key")
    assert [e.action for e in events] == [
        AuditAction.ENTITY_DELETED, AuditAction.LIMITS_DELETED, AuditAction.LIMITS_SET,
        AuditAction.ENTITY_CREATED]  # newest first, as 0.2.0
    deleted, limits_deleted, limits_set, created = events
    assert all(isinstance(e, AuditEvent) and e.entity_id == "key" for e in events)
    assert created.principal == "onboarding-service" and created.resource is None
    assert created.details == {"name": "Key", "parent_id": "proj", "metadata": {"tier": "gold"}}
    assert limits_set.principal == "arn:aws:iam::123456789012:user/ops"
    assert limits_set.resource == "gpt-4o"
    assert limits_set.details == {"limits": [RPM.to_dict(), TPM.to_dict()]}
    assert (limits_deleted.principal, limits_deleted.resource) == ("cleanup-service", "gpt-4o")
    assert limits_deleted.details == {"limits_deleted": 2}
    assert deleted.principal == "ops+oncall@example.com"
    assert deleted.details == {"records_deleted": 1}  # the metadata: no bucket, no limits left
    parent = await limiter.get_audit_events("proj")
    assert [(e.action, e.principal, e.details) for e in parent] == [
        (AuditAction.ENTITY_CREATED, "admin@example.com",
         {"name": "proj", "parent_id": None, "metadata": {}})]
    # without a principal the event is still recorded
    await limiter.set_limits("proj", [RPM])
    assert (await limiter.get_audit_events("proj", 1))[0].principal is None
    assert await limiter.get_audit_events("nobody") == []


async def test_failed_changes_record_nothing(limiter: RateLimiter) -> None:
    await limiter.create_entity("key", principal="a")
    with pytest.raises(EntityExistsError):
        await limiter.create_entity("key", principal="b")
    with pytest.raises(EntityNotFoundError):
        await limiter.create_entity("orphan", parent_id="nope", principal="b")
    with pytest.raises(EntityNotFoundError):
        await limiter.delete_entity("nope", principal="b")
    assert [e.principal for e in await limiter.get_audit_events("key")] == ["a"]
    assert len(await stored_audit_items(limiter)) == 1


async def test_events_are_time_ordered_and_paged_both_ways(limiter: RateLimiter) -> None:
    await limiter.create_entity("key")
    for i in range(6):
        await limiter.set_limits("key", [Limit.per_minute(f"l{i}", 10 * (i + 1))],
                                 principal=f"user-{i}")
    newest = await limiter.get_audit_events("key")
    assert len(newest) == 7 and [e.principal for e in newest[:2]] == ["user-5", "user-4"]
    ids = [e.event_id for e in newest]
    assert ids == sorted(ids, reverse=True)
    stamps = [e.timestamp for e in newest]
    assert stamps == sorted(stamps, reverse=True)
    oldest = await limiter.get_audit_events("key", oldest_first=True)
    assert oldest == newest[::-1] and oldest[0].action == AuditAction.ENTITY_CREATED

    for oldest_first, expected in ((False, newest), (True, oldest)):
        pages: list[list[AuditEvent]] = []
        start: str | None = None
        while True:
            page = await limiter.get_audit_events("key", 3, start, oldest_first=oldest_first)
            if not page:
                break
            pages.append(page)
            start = page[-1].event_id
        assert [len(p) for p in pages] == [3, 3, 1]
        assert [e for p in pages for e in p] == expected


@pytest.mark.integration
async def test_a_long_trail_reads_past_one_query_page(endpoint_url: str,
                                                      limiter: RateLimiter) -> None:
    repo = limiter.repository
    events = [audit_mod.new_event(AuditAction.LIMITS_SET, "busy", f"p{i}") for i in range(130)]
    await asyncio.gather(*(repo.put_audit_event(e) for e in events))
    got = await repo.get_audit_events("busy", 125)
    assert [e.event_id for e in got] == [e.event_id for e in events[::-1][:125]]
    rest = await repo.get_audit_events("busy", 125, got[-1].event_id)
    assert [e.event_id for e in rest] == [e.event_id for e in events[:5][::-1]]


@pytest.mark.integration
async def test_events_expire_after_90_days_through_the_tables_ttl(
    limiter: RateLimiter, endpoint_url: str
) -> None:
    before = time.time()
    await limiter.create_entity("key", principal="admin")
    (event,) = await limiter.get_audit_events("key")
    (raw,) = audit_items(endpoint_url)
    assert raw[schema.PK] == {"S": "AUDIT#key"}
    assert raw[schema.SK] == {"S": f"#AUDIT#{event.event_id}"}
    ttl = int(raw[schema.TTL_ATTRIBUTE]["N"])
    assert before + NINETY_DAYS - 2 <= ttl <= time.time() + NINETY_DAYS + 2
    described = ddb(endpoint_url).describe_time_to_live(TableName=TABLE)
    assert described["TimeToLiveDescription"]["AttributeName"] == schema.TTL_ATTRIBUTE


# -- written once -----------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_resent_write_never_doubles_an_event(
    limiter: RateLimiter, endpoint_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = limiter.repository
    event = audit_mod.new_event(AuditAction.ENTITY_CREATED, "key", "admin")
    await repo.put_audit_event(event)
    await repo.put_audit_event(event)  # the same event again (a retry by the caller)
    assert len(audit_items(endpoint_url)) == 1

    # The response of the first attempt of each write is lost after the write landed (the
    # chain's head claim, then the event): the repository resends (its retry of an ambiguous
    # failure), the condition refuses the copy, the call succeeds, the chain stays whole.
    client = await repo.client()
    real = client.put_item
    lost: list[str] = []

    async def lose_first_response(**kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = await real(**kwargs)
        sk = kwargs.get("Item", {}).get(schema.SK, {}).get("S", "")
        kind = "head" if sk == schema.AUDIT_HEAD_SK else "event"
        if kind not in lost:
            lost.append(kind)
            raise TimeoutError("response lost")
        return result

    monkeypatch.setattr(client, "put_item", lose_first_response)
    await limiter.set_limits("key", [RPM], principal="ops")
    assert lost == ["head", "event"]
    assert [e.action for e in await limiter.get_audit_events("key")] == [
        AuditAction.LIMITS_SET, AuditAction.ENTITY_CREATED]
    assert len(audit_items(endpoint_url)) == 2
    report = await audit_mod.verify_trail(repo, "key")
    assert report.intact and (report.chained, report.head_seq) == (2, 2)

    # a different event under an existing id is refused, not silently merged
    clash = AuditEvent(event.event_id, event.timestamp, AuditAction.LIMITS_DELETED, "key")
    with pytest.raises(StorageError) as info:
        await repo.put_audit_event(clash)
    assert info.value.code == "AuditEventExists"


# -- when the event cannot be recorded ----------------------------------------------------------


async def test_an_event_that_cannot_be_recorded_is_never_lost_silently(
    limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await limiter.create_entity("key")

    async def down(event: AuditEvent) -> None:
        raise RepositoryUnavailable("DynamoDB put_item kept failing", None)

    monkeypatch.setattr(limiter.repository, "put_audit_event", down)
    with caplog.at_level(logging.ERROR, logger="zae_limiter.audit"), \
            pytest.raises(RateLimiterUnavailable) as info:
        await limiter.set_limits("key", [RPM], "gpt-4o", principal="ops")
    assert "limits_set was applied" in str(info.value) and info.value.entity_id == "key"
    assert isinstance(info.value.cause, RepositoryUnavailable)
    # the change itself landed ...
    assert await limiter.get_limits("key", "gpt-4o") == [RPM]
    # ... and the event it could not record is in the log, whole
    (logged,) = [r for r in caplog.records if r.name == "zae_limiter.audit"]
    assert logged.levelno == logging.ERROR and "NOT recorded" in logged.getMessage()
    assert '"principal": "ops"' in logged.getMessage() and '"action": "limits_set"' in (
        logged.getMessage())


async def test_a_cancelled_caller_does_not_cancel_the_events_write(
    limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    await limiter.create_entity("key")
    repo = limiter.repository
    real = repo.put_audit_event
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow(event: AuditEvent) -> None:
        entered.set()
        await gate.wait()
        await real(event)

    monkeypatch.setattr(repo, "put_audit_event", slow)
    task = asyncio.create_task(limiter.delete_limits("key", principal="ops"))
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    for _ in range(200):
        if len(await limiter.get_audit_events("key")) == 2:
            break
        await asyncio.sleep(0.01)
    assert (await limiter.get_audit_events("key"))[0].action == AuditAction.LIMITS_DELETED


# -- principal --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "reason"),
    [("", "empty"), ("user#admin", "#"), ("x" * 257, "length"), ("has space", "ASCII"),
     ("ünï", "ASCII"), (42, "string"), ("-leading", "start")],
)
@pytest.mark.parametrize("method", ["create_entity", "delete_entity", "set_limits",
                                    "delete_limits"])
async def test_a_bad_principal_is_a_validation_error_before_any_write(
    limiter: RateLimiter, method: str, principal: Any, reason: str
) -> None:
    args: dict[str, tuple[Any, ...]] = {
        "create_entity": ("key",), "delete_entity": ("key",), "set_limits": ("key", [RPM]),
        "delete_limits": ("key",),
    }
    before = await stored_items(limiter)
    with pytest.raises(InvalidIdentifierError) as info:
        await getattr(limiter, method)(*args[method], principal=principal)
    assert isinstance(info.value, ValidationError)
    assert info.value.field == "principal" and reason in info.value.reason
    assert await stored_items(limiter) == before


async def test_principal_is_keyword_only_at_the_end(limiter: RateLimiter) -> None:
    import inspect

    for method in ("create_entity", "delete_entity", "set_limits", "delete_limits"):
        params = list(inspect.signature(getattr(RateLimiter, method)).parameters.values())
        assert params[-1].name == "principal" and params[-1].default is None
        assert params[-1].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError):
        await limiter.delete_entity("key", "admin")  # type: ignore[misc]


async def test_get_audit_events_checks_its_arguments(limiter: RateLimiter) -> None:
    for kwargs, field in (
        ({"entity_id": "a#b"}, "entity_id"), ({"limit": 0}, "limit"), ({"limit": True}, "limit"),
        ({"limit": 1.5}, "limit"), ({"start_event_id": "nope"}, "start_event_id"),
        ({"oldest_first": "yes"}, "oldest_first"),
    ):
        call = {"entity_id": "key"} | kwargs
        with pytest.raises(ValidationError) as info:
            await limiter.get_audit_events(**call)
        assert info.value.field == field


# -- deletion keeps the trail -------------------------------------------------------------------


async def test_deleting_an_entity_keeps_its_trail(limiter: RateLimiter) -> None:
    await limiter.create_entity("key", principal="admin")
    await limiter.set_limits("key", [RPM], principal="admin")
    async with limiter.acquire("key", "gpt", None, {"rpm": 1}, use_stored_limits=True):
        pass
    await limiter.delete_entity("key", principal="security")
    assert await limiter.get_entity("key") is None
    assert not [i for i in await stored_items(limiter)
                if i[schema.PK]["S"] == schema.entity_pk("key")]
    trail = await limiter.get_audit_events("key")
    assert [(e.action, e.principal) for e in trail] == [
        (AuditAction.ENTITY_DELETED, "security"), (AuditAction.LIMITS_SET, "admin"),
        (AuditAction.ENTITY_CREATED, "admin")]
    assert trail[0].details == {"records_deleted": 3}  # metadata, the limit, the bucket
    for raw in await stored_audit_items(limiter):  # and each event still expires on its own
        assert int(raw[schema.TTL_ATTRIBUTE]["N"]) > time.time() + NINETY_DAYS - 60
    # an entity created again under the same id continues the same trail
    await limiter.create_entity("key", principal="admin")
    assert len(await limiter.get_audit_events("key")) == 4


# -- the entity's other reads -------------------------------------------------------------------


@pytest.mark.integration
async def test_reads_of_an_entitys_items_are_unaffected_by_its_events(
    limiter: RateLimiter, endpoint_url: str
) -> None:
    await limiter.create_entity("proj")
    await limiter.create_entity("key", parent_id="proj")
    await limiter.set_limits("key", [RPM, TPM], "gpt")
    await limiter.set_limits("key", [RPM])
    async with limiter.acquire("key", "gpt", None, {"rpm": 1, "tpm": 10}, use_stored_limits=True):
        pass
    repo = limiter.repository
    for i in range(20):  # plenty of events in the entity's trail
        await repo.put_audit_event(
            audit_mod.new_event(AuditAction.LIMITS_SET, "key", f"p{i}", "gpt"))
    assert len(await limiter.get_audit_events("key", 1000)) == 23

    assert (await limiter.get_entity("key")).parent_id == "proj"  # type: ignore[union-attr]
    assert [e.id for e in await limiter.get_children("proj")] == ["key"]
    assert await repo.get_all_limits("key") == {"gpt": [RPM, TPM], "_default_": [RPM]}
    assert await limiter.get_limits("key", "gpt") == [RPM, TPM]
    assert [b.resource for b in await repo.list_buckets("key")] == ["gpt"]
    assert len(await repo.bucket_items("key")) == 1
    assert [b.entity_id for b in await repo.resource_buckets("gpt")] == ["key"]
    assert sorted((s.entity_id, s.resource, s.limit.name)
                  for s in await repo.list_stored_limits()) == [
        ("key", "_default_", "rpm"), ("key", "gpt", "rpm"), ("key", "gpt", "tpm")]
    assert await limiter.get_usage_snapshots("key", window=None) == []
    left = await limiter.available("key", "gpt", None, use_stored_limits=True)
    # the real clock runs: tpm refills its 10 tokens within 60 ms, rpm its one in 600 ms
    assert left["rpm"] in (99, 100) and 9990 <= left["tpm"] <= 10000
    # the cleanup counts (and deletes) the entity's own items only
    assert await repo.delete_entity("key") == 5  # metadata, 3 limits, 1 bucket
    assert len(await limiter.get_audit_events("key", 1000)) == 23


@pytest.mark.integration
async def test_restore_keeps_events_written_after_the_export(
    limiter: RateLimiter, endpoint_url: str
) -> None:
    await limiter.create_entity("key", principal="admin")
    exported = await limiter.repository.export_items()
    await limiter.delete_entity("key", principal="intruder")
    deleted = await limiter.repository.replace_items(exported)
    assert deleted == 0 and await limiter.get_entity("key") is not None
    assert [e.principal for e in await limiter.get_audit_events("key")] == ["intruder", "admin"]


@pytest.mark.integration
async def test_events_written_by_0_2_0_are_readable(limiter: RateLimiter,
                                                    endpoint_url: str) -> None:
    # 0.2.0 kept the same keys, with the fields in a `data` map.
    ddb(endpoint_url).put_item(TableName=TABLE, Item={
        "PK": {"S": "AUDIT#old"}, "SK": {"S": "#AUDIT#01HQXYZ123ABC456DEF789GH0"},
        "entity_id": {"S": "old"}, "ttl": {"N": str(int(time.time()) + 100)},
        "data": {"M": {
            "event_id": {"S": "01HQXYZ123ABC456DEF789GH0"},
            "timestamp": {"S": "2024-01-15T10:30:00Z"}, "action": {"S": "limits_set"},
            "entity_id": {"S": "old"}, "principal": {"NULL": True},
            "resource": {"S": "gpt-4"},
            "details": {"M": {"limits": {"L": [{"M": {"name": {"S": "rpm"},
                                                        "capacity": {"N": "100"}}}]}}},
        }},
    })
    (event,) = await limiter.get_audit_events("old")
    assert event == AuditEvent("01HQXYZ123ABC456DEF789GH0", "2024-01-15T10:30:00Z",
                               "limits_set", "old", None, "gpt-4",
                               {"limits": [{"name": "rpm", "capacity": 100}]})


# -- the sync twin ----------------------------------------------------------------------------


def test_sync_limiter_records_and_reads_the_trail() -> None:
    with SyncRateLimiter(name=NAME, repository=MemoryStorage(TABLE)) as lim:
        lim.create_entity("key", principal="admin")
        lim.set_limits("key", [RPM], "gpt", principal="ops")
        lim.delete_limits("key", "gpt", principal="ops")
        lim.delete_entity("key", principal="security")
        events = lim.get_audit_events("key")
        assert [(e.action, e.principal) for e in events] == [
            (AuditAction.ENTITY_DELETED, "security"), (AuditAction.LIMITS_DELETED, "ops"),
            (AuditAction.LIMITS_SET, "ops"), (AuditAction.ENTITY_CREATED, "admin")]
        first = lim.get_audit_events("key", 2, oldest_first=True)
        second = lim.get_audit_events("key", 2, first[-1].event_id, oldest_first=True)
        assert first + second == events[::-1]
        with pytest.raises(ValidationError) as info:
            lim.set_limits("key", [RPM], principal="a#b")
        assert info.value.field == "principal"


# -- the CLI ----------------------------------------------------------------------------------


def cli(endpoint_url: str, *args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(main, [*args, "--name", NAME, "--endpoint-url", endpoint_url])
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == code, result.output
    return result


def js(endpoint_url: str, *args: str, code: int = 0) -> Any:
    return json.loads(cli(endpoint_url, *args, "--json", code=code).stdout)


@pytest.fixture
def table(endpoint_url: str) -> str:
    async def setup() -> None:
        async with RateLimiter(name=NAME, endpoint_url=endpoint_url,
                               stack_options=StackOptions()):
            pass
    asyncio.run(setup())
    return endpoint_url


@pytest.mark.integration
def test_cli_records_changes_and_shows_the_trail(table: str) -> None:
    js(table, "entity", "create", "key", "--principal", "alice@example.com")
    js(table, "limits", "set", "key", "--resource", "gpt", "--limit", "rpm:10/minute",
       "--principal", "arn:aws:iam::123456789012:user/bob")
    assert js(table, "limits", "delete", "key", "--resource", "gpt", "--yes",
              "--principal", "ops")["deleted"] == 1
    assert js(table, "entity", "delete", "key", "--yes", "--principal", "ops")[
        "deleted_items"] == 1

    shown = js(table, "audit", "key")
    assert shown["entity_id"] == "key" and shown["order"] == "newest_first"
    assert shown["next_start_event_id"] is None
    assert [(e["action"], e.get("principal"), e.get("resource")) for e in shown["events"]] == [
        ("entity_deleted", "ops", None), ("limits_deleted", "ops", "gpt"),
        ("limits_set", "arn:aws:iam::123456789012:user/bob", "gpt"),
        ("entity_created", "alice@example.com", None)]
    assert shown["events"][2]["details"]["limits"][0]["capacity"] == 10
    assert all(audit_mod.is_event_id(e["event_id"]) for e in shown["events"])

    text = cli(table, "audit", "key").stdout
    assert "audit events of key (newest first)" in text
    for word in ("entity_deleted", "limits_set", "alice@example.com", '"records_deleted":1'):
        assert word in text
    assert "next page" not in text

    # paging
    page = js(table, "audit", "key", "--limit", "3")
    assert len(page["events"]) == 3
    assert page["next_start_event_id"] == page["events"][-1]["event_id"]
    rest = js(table, "audit", "key", "--limit", "3", "--start-after", page["next_start_event_id"])
    assert [e["action"] for e in rest["events"]] == ["entity_created"]
    assert rest["next_start_event_id"] is None
    hint = cli(table, "audit", "key", "--limit", "3").stdout
    assert f"--start-after {page['next_start_event_id']}" in hint
    oldest = js(table, "audit", "key", "--oldest-first", "--limit", "2")
    assert [e["action"] for e in oldest["events"]] == ["entity_created", "limits_set"]
    assert oldest["order"] == "oldest_first"
    assert "--oldest-first --start-after" in cli(table, "audit", "key", "--oldest-first",
                                                 "--limit", "2").stdout

    assert js(table, "audit", "nobody")["events"] == []
    assert "no audit events for nobody" in cli(table, "audit", "nobody").stdout


@pytest.mark.integration
def test_cli_refuses_bad_input_in_one_line(table: str) -> None:
    assert "--start-after" in cli(table, "audit", "key", "--start-after", "nope", code=2).output
    assert "--limit" in cli(table, "audit", "key", "--limit", "0", code=2).output
    bad = cli(table, "entity", "create", "key", "--principal", "a#b", code=1).output
    assert "Invalid principal" in bad and len(bad.strip().splitlines()) == 1
    js(table, "entity", "create", "key")
    for args in (["entity", "delete", "key", "--yes"], ["limits", "delete", "key", "--yes"]):
        assert "Invalid principal" in cli(table, *args, "--principal", "", code=1).output
    assert js(table, "entity", "show", "key")["entity_id"] == "key"  # nothing was deleted
    assert len(js(table, "audit", "key")["events"]) == 1


# -- the aggregator ---------------------------------------------------------------------------


def audit_stream_record(event_name: str = "INSERT") -> dict[str, Any]:
    item = audit_item(audit_mod.new_event(AuditAction.LIMITS_SET, "key", "ops", "gpt",
                                          {"limits": [RPM.to_dict()]}))
    dynamodb: dict[str, Any] = {
        "Keys": {schema.PK: item[schema.PK], schema.SK: item[schema.SK]},
        "SequenceNumber": "100000000000000000001",
        "StreamViewType": "NEW_AND_OLD_IMAGES",
        "ApproximateCreationDateTime": time.time(),
    }
    dynamodb["OldImage" if event_name == "REMOVE" else "NewImage"] = item
    record = {"eventID": "e1", "eventName": event_name, "eventSource": "aws:dynamodb",
              "dynamodb": dynamodb}
    if event_name == "REMOVE":  # expired by TTL
        record["userIdentity"] = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
    return record


class NoTable(SnapshotTable):
    def __init__(self) -> None:
        super().__init__(client=None, table_name=TABLE)
        self.folds = 0

    def fold(self, *args: Any, **kwargs: Any) -> bool:
        self.folds += 1
        raise AssertionError("an audit record must not reach a snapshot")


def test_the_aggregator_ignores_audit_records() -> None:
    insert, remove = audit_stream_record(), audit_stream_record("REMOVE")
    assert parse_record(insert, int(time.time() * 1000)) == "audit event"
    assert isinstance(parse_record(remove, int(time.time() * 1000)), str)
    assert not matches_filter(insert)  # the Lambda's event filter drops them before the handler
    table = NoTable()
    result = process_batch([insert, remove], table, ("hourly", "daily"), 90)
    assert (result.processed, result.skipped, result.failed) == (0, 2, 0)
    assert result.failed_sequence_numbers == [] and result.response() == {"batchItemFailures": []}
    assert table.folds == 0


@pytest.mark.integration
async def test_the_aggregator_counts_usage_but_not_audit_items_from_the_stream(
    limiter: RateLimiter, endpoint_url: str
) -> None:
    await limiter.create_entity("key", principal="admin")
    await limiter.set_limits("key", [RPM], principal="admin")
    async with limiter.acquire("key", "gpt", None, {"rpm": 3}, use_stored_limits=True):
        pass
    client = ddb(endpoint_url)
    streams = boto3.client("dynamodbstreams", endpoint_url=endpoint_url, region_name="us-east-1")
    # every record of the stream, unfiltered, straight into the handler's logic
    arn = client.describe_table(TableName=TABLE)["Table"]["LatestStreamArn"]
    records: list[dict[str, Any]] = []
    for shard in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
        it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            page = streams.get_records(ShardIterator=it)
            if not page["Records"]:
                break
            records += [to_lambda_record(r, arn) for r in page["Records"]]
            it = page.get("NextShardIterator")
    audit_records = [r for r in records if schema.is_audit_key(
        r["dynamodb"]["Keys"][schema.PK]["S"], r["dynamodb"]["Keys"][schema.SK]["S"])]
    assert len(audit_records) == 2
    result = process_batch(records, SnapshotTable(client, TABLE), ("hourly", "daily"), 90)
    assert result.failed == 0 and result.processed == 1  # the one bucket write
    assert result.skipped == len(records) - 1
    # and the stream runner (with the Lambda's filter) agrees: usage only, nothing failed
    run = StreamRunner(TABLE, client, streams, ("hourly", "daily"), 90).run_once()
    assert run.failed == 0
    snapshots = await limiter.get_usage_snapshots("key", window=None)
    assert {s.window: s.counters for s in snapshots} == {"hourly": {"rpm": 3},
                                                         "daily": {"rpm": 3}}
    assert not [i for i in items(endpoint_url)
                if i[schema.SK]["S"].startswith(schema.usage_sk())
                and i[schema.PK]["S"].startswith(schema.AUDIT_PK_PREFIX)]


# -- tamper evidence: the hash chain ------------------------------------------------------------


def chain(endpoint_url: str, entity_id: str) -> list[dict[str, Any]]:
    """The entity's stored event items, in chain order (seq)."""
    found = ddb(endpoint_url).query(
        TableName=TABLE, ConsistentRead=True,
        KeyConditionExpression="PK = :pk AND begins_with(SK, :sk)",
        ExpressionAttributeValues={":pk": {"S": schema.audit_pk(entity_id)},
                                   ":sk": {"S": schema.audit_sk()}})["Items"]
    return sorted(found, key=lambda i: int(i.get(schema.AUDIT_SEQ, {"N": "0"})["N"]))


def head(endpoint_url: str, entity_id: str) -> dict[str, Any]:
    key = {k: {"S": v} for k, v in schema.audit_head_key(entity_id).items()}
    return dict(ddb(endpoint_url).get_item(TableName=TABLE, Key=key, ConsistentRead=True)["Item"])


def key_of(item: dict[str, Any]) -> dict[str, Any]:
    return {schema.PK: item[schema.PK], schema.SK: item[schema.SK]}


async def four_events(limiter: RateLimiter) -> None:
    await limiter.create_entity("key", principal="admin")
    await limiter.set_limits("key", [RPM], "gpt", principal="ops")
    await limiter.set_limits("key", [TPM], "gpt", principal="ops")
    await limiter.delete_limits("key", "gpt", principal="ops")


def kinds(report: audit_mod.ChainReport) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in report.problems]


@pytest.mark.integration
async def test_each_event_links_to_the_previous_one_and_the_trail_verifies(
    limiter: RateLimiter, endpoint_url: str
) -> None:
    await four_events(limiter)
    items = chain(endpoint_url, "key")
    assert [int(i[schema.AUDIT_SEQ]["N"]) for i in items] == [1, 2, 3, 4]
    assert items[0][schema.AUDIT_PREV] == {"S": audit_mod.CHAIN_START}
    assert schema.AUDIT_PREV_ID not in items[0]
    for before, after in itertools.pairwise(items):
        assert after[schema.AUDIT_PREV] == before[schema.AUDIT_HASH]
        assert after[schema.AUDIT_PREV_ID] == before[schema.AUDIT_EVENT_ID]
    for item in items:
        assert item[schema.AUDIT_HASH]["S"] == audit_mod.chain_hash(item)
    top = head(endpoint_url, "key")
    assert (top[schema.AUDIT_SEQ], top[schema.AUDIT_HASH], top[schema.AUDIT_EVENT_ID]) == (
        {"N": "4"}, items[-1][schema.AUDIT_HASH], items[-1][schema.AUDIT_EVENT_ID])
    # the head is no event: reads of the trail never meet it
    assert len(await limiter.get_audit_events("key")) == 4

    report = await audit_mod.verify_trail(limiter.repository, "key")
    assert report.intact and report.problems == ()
    assert (report.chained, report.legacy, report.head_seq, report.expired) == (4, 0, 4, 0)
    shown = await asyncio.to_thread(js, endpoint_url, "audit", "verify", "key")
    assert shown["intact"] is True and shown["chained_events"] == 4
    assert "intact" in (await asyncio.to_thread(cli, endpoint_url, "audit", "verify",
                                                "key")).stdout
    # an entity without a trail is trivially intact
    assert (await audit_mod.verify_trail(limiter.repository, "nobody")).intact


@pytest.mark.integration
async def test_verify_detects_an_overwritten_event(limiter: RateLimiter,
                                                   endpoint_url: str) -> None:
    await four_events(limiter)
    second = chain(endpoint_url, "key")[1]
    forged = dict(second, principal={"S": "someone-else"})
    ddb(endpoint_url).put_item(TableName=TABLE, Item=forged)  # PutItem: what IAM still allows
    report = await audit_mod.verify_trail(limiter.repository, "key")
    assert kinds(report) == [("altered", 2)]
    assert report.problems[0].event_id == second[schema.AUDIT_EVENT_ID]["S"]

    # rehashing the forged event does not help: the next event still names the original hash
    forged[schema.AUDIT_HASH] = {"S": audit_mod.chain_hash(forged)}
    ddb(endpoint_url).put_item(TableName=TABLE, Item=forged)
    assert kinds(await audit_mod.verify_trail(limiter.repository, "key")) == [
        ("broken_link", 3)]

    shown = await asyncio.to_thread(js, endpoint_url, "audit", "verify", "key", code=1)
    assert shown["intact"] is False and shown["problems"][0]["kind"] == "broken_link"
    text = (await asyncio.to_thread(cli, endpoint_url, "audit", "verify", "key", code=1)).output
    assert "tampered with: 1 problem(s)" in text and "broken_link" in text


@pytest.mark.integration
async def test_verify_detects_a_changed_detail_or_an_added_attribute(
    limiter: RateLimiter, endpoint_url: str
) -> None:
    await four_events(limiter)
    first = chain(endpoint_url, "key")[0]
    details = first[schema.AUDIT_DETAILS]["M"]
    changed = dict(first, details={"M": dict(details, name={"S": "renamed"})})
    ddb(endpoint_url).put_item(TableName=TABLE, Item=changed)
    assert kinds(await audit_mod.verify_trail(limiter.repository, "key")) == [("altered", 1)]
    ddb(endpoint_url).put_item(TableName=TABLE, Item=dict(first, note={"S": "x"}))
    assert kinds(await audit_mod.verify_trail(limiter.repository, "key")) == [("altered", 1)]
    ddb(endpoint_url).put_item(TableName=TABLE, Item=first)  # the original back: whole again
    assert (await audit_mod.verify_trail(limiter.repository, "key")).intact


@pytest.mark.integration
async def test_verify_detects_a_deleted_event_in_the_middle(limiter: RateLimiter,
                                                            endpoint_url: str) -> None:
    await four_events(limiter)
    ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(chain(endpoint_url, "key")[1]))
    report = await audit_mod.verify_trail(limiter.repository, "key")
    assert kinds(report) == [("missing", 3)] and "events 2..2" in report.problems[0].detail
    assert report.chained == 3


@pytest.mark.integration
async def test_verify_detects_deleting_the_oldest_or_the_newest_event(
    limiter: RateLimiter, endpoint_url: str
) -> None:
    await four_events(limiter)
    items = chain(endpoint_url, "key")
    ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(items[-1]))
    report = await audit_mod.verify_trail(limiter.repository, "key")
    # the head remembers the newest event: a truncated tail shows
    assert kinds(report) == [("missing", 4)] and "events 4..4" in report.problems[0].detail
    ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(items[0]))
    report = await audit_mod.verify_trail(limiter.repository, "key")
    # the oldest went before its 90 days were over: not expiry
    assert kinds(report) == [("missing", 2), ("missing", 4)]
    # every event gone, the head left: still evident
    for item in items[1:3]:
        ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(item))
    assert kinds(await audit_mod.verify_trail(limiter.repository, "key")) == [("missing", 4)]


@pytest.mark.integration
async def test_verify_detects_a_head_moved_back_or_deleted(limiter: RateLimiter,
                                                           endpoint_url: str) -> None:
    await four_events(limiter)
    items = chain(endpoint_url, "key")
    # hiding the newest event takes deleting it and moving the head back onto the third...
    top = dict(head(endpoint_url, "key"), seq={"N": "3"}, h=items[2][schema.AUDIT_HASH],
               event_id=items[2][schema.AUDIT_EVENT_ID])
    ddb(endpoint_url).put_item(TableName=TABLE, Item=top)
    assert kinds(await audit_mod.verify_trail(limiter.repository, "key")) == [("head", 4)]
    # ... which verify cannot tell from a shorter trail once the event is gone too: that is
    # what the stream shows (test_the_aggregator_counts_audit_changes_...)
    ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(items[3]))
    assert (await audit_mod.verify_trail(limiter.repository, "key")).intact
    ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(top))
    assert kinds(await audit_mod.verify_trail(limiter.repository, "key")) == [("head", 3)]


@pytest.mark.integration
async def test_verify_detects_a_ttl_set_in_the_past(limiter: RateLimiter,
                                                    endpoint_url: str) -> None:
    await four_events(limiter)
    second = chain(endpoint_url, "key")[1]
    ddb(endpoint_url).update_item(
        TableName=TABLE, Key=key_of(second), UpdateExpression="SET #t = :t",
        ExpressionAttributeNames={"#t": schema.TTL_ATTRIBUTE},
        ExpressionAttributeValues={":t": {"N": str(int(time.time()) - 60)}})
    report = await audit_mod.verify_trail(limiter.repository, "key")
    assert kinds(report) == [("altered", 2), ("ttl", 2)]
    # once the table's TTL removes it, the gap is no expiry: its id says 90 days are not over
    ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(second))
    assert kinds(await audit_mod.verify_trail(limiter.repository, "key")) == [("missing", 3)]


@pytest.mark.integration
async def test_events_expired_through_ttl_are_not_failures(limiter: RateLimiter,
                                                           endpoint_url: str) -> None:
    repo = limiter.repository
    long_ago = int((time.time() - NINETY_DAYS - 86400) * 1000)
    # ids of that time (the process's own id source never goes back in time: a fresh one)
    source = audit_mod._IdSource()
    old = [AuditEvent(source.next(long_ago + i), "then", AuditAction.LIMITS_SET, "key", f"p{i}")
           for i in range(3)]
    for event in old:
        await repo.put_audit_event(event)
    await repo.put_audit_event(audit_mod.new_event(AuditAction.LIMITS_SET, "key", "now"))
    items = chain(endpoint_url, "key")
    # the table's TTL removes the two oldest (their 90 days are over)
    for item in items[:2]:
        ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(item))
    report = await audit_mod.verify_trail(repo, "key")
    assert report.intact and (report.chained, report.expired, report.head_seq) == (2, 2, 4)
    # a gap after an expired event is expiry too
    ddb(endpoint_url).put_item(TableName=TABLE, Item=items[0])
    assert (await audit_mod.verify_trail(repo, "key")).intact
    # but the same trail judged before those 90 days were over is not
    early = await audit_mod.verify_trail(repo, "key", now_s=long_ago / 1000 + 86400)
    assert kinds(early) == [("missing", 3)]

    # a trail all past its 90 days may lose its newest events too, and then every one
    gone = [AuditEvent(source.next(long_ago + 10 + i), "then", AuditAction.LIMITS_SET, "gone")
            for i in range(3)]
    for event in gone:
        await repo.put_audit_event(event)
    old_items = chain(endpoint_url, "gone")
    ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(old_items[2]))
    assert (await audit_mod.verify_trail(repo, "gone")).intact
    for item in old_items[:2]:
        ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(item))
    assert (await audit_mod.verify_trail(repo, "gone")).intact


@pytest.mark.integration
async def test_a_head_naming_an_expired_event_does_not_hide_a_truncated_tail(
    limiter: RateLimiter, endpoint_url: str
) -> None:
    await four_events(limiter)
    items = chain(endpoint_url, "key")
    ddb(endpoint_url).delete_item(TableName=TABLE, Key=key_of(items[3]))
    # the head is not hashed: pointing it at an ancient event id must not pass as expiry
    ancient = audit_mod._IdSource().next(int((time.time() - 2 * NINETY_DAYS) * 1000))
    ddb(endpoint_url).put_item(TableName=TABLE, Item=dict(head(endpoint_url, "key"),
                                                          event_id={"S": ancient}))
    assert kinds(await audit_mod.verify_trail(limiter.repository, "key")) == [("missing", 4)]


@pytest.mark.integration
async def test_events_written_before_the_chain_verify_as_unchained_legacy_events(
    limiter: RateLimiter, endpoint_url: str
) -> None:
    # 0.2.0's layout (fields in `data`) and this library's before the chain (no seq, prev, h)
    ddb(endpoint_url).put_item(TableName=TABLE, Item={
        "PK": {"S": "AUDIT#key"}, "SK": {"S": "#AUDIT#01HQXYZ123ABC456DEF789GH0"},
        "entity_id": {"S": "key"}, "ttl": {"N": str(int(time.time()) + 100)},
        "data": {"M": {"event_id": {"S": "01HQXYZ123ABC456DEF789GH0"},
                       "timestamp": {"S": "2024-01-15T10:30:00Z"},
                       "action": {"S": "entity_created"}, "entity_id": {"S": "key"}}}})
    ddb(endpoint_url).put_item(TableName=TABLE, Item=audit_item(
        audit_mod.new_event(AuditAction.LIMITS_SET, "key", "old-client")))
    report = await audit_mod.verify_trail(limiter.repository, "key")
    assert report.intact and (report.chained, report.legacy, report.head_seq) == (0, 2, 0)
    await limiter.set_limits("key", [RPM], principal="new-client")
    report = await audit_mod.verify_trail(limiter.repository, "key")
    assert report.intact and (report.chained, report.legacy, report.head_seq) == (1, 2, 1)
    assert chain(endpoint_url, "key")[-1][schema.AUDIT_PREV] == {"S": audit_mod.CHAIN_START}
    shown = await asyncio.to_thread(js, endpoint_url, "audit", "verify", "key")
    assert shown["legacy_events"] == 2
    # stripping an event of its chain attributes does not make it legacy: its seq goes missing
    newest = chain(endpoint_url, "key")[-1]
    stripped = {k: v for k, v in newest.items()
                if k not in (schema.AUDIT_SEQ, schema.AUDIT_PREV, schema.AUDIT_PREV_ID,
                             schema.AUDIT_HASH)}
    ddb(endpoint_url).put_item(TableName=TABLE, Item=stripped)
    assert kinds(await audit_mod.verify_trail(limiter.repository, "key")) == [("missing", 1)]


@pytest.mark.integration
async def test_concurrent_appenders_share_one_chain(endpoint_url: str,
                                                    limiter: RateLimiter) -> None:
    # two repositories (two processes' worth of clients) appending to one entity at once
    async with RateLimiter(name=NAME, endpoint_url=endpoint_url,
                           stack_options=StackOptions()) as other:
        events = [audit_mod.new_event(AuditAction.LIMITS_SET, "busy", f"p{i}") for i in range(24)]
        repos = (limiter.repository, other.repository)
        await asyncio.gather(*(repos[i % 2].put_audit_event(e) for i, e in enumerate(events)))
    items = chain(endpoint_url, "busy")
    assert [int(i[schema.AUDIT_SEQ]["N"]) for i in items] == list(range(1, 25))
    assert {i[schema.AUDIT_EVENT_ID]["S"] for i in items} == {e.event_id for e in events}
    report = await audit_mod.verify_trail(limiter.repository, "busy")
    assert report.intact and report.chained == report.head_seq == 24


@pytest.mark.integration
async def test_an_append_that_loses_every_race_is_refused_not_forked(
    limiter: RateLimiter, endpoint_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await limiter.create_entity("key")
    repo = limiter.repository
    real = repo.call
    # another process keeps taking the next sequence number just before this one claims it
    async def overtaken(operation: str, **kwargs: Any) -> dict[str, Any]:
        if operation == "put_item" and kwargs["Item"][schema.SK]["S"] == schema.AUDIT_HEAD_SK:
            current = head(endpoint_url, "key")
            bumped = dict(current, seq={"N": str(int(current[schema.AUDIT_SEQ]["N"]) + 1)})
            ddb(endpoint_url).put_item(TableName=TABLE, Item=bumped)
        return await real(operation, **kwargs)

    monkeypatch.setattr(repository_mod, "AUDIT_APPEND_ATTEMPTS", 3)
    monkeypatch.setattr(repo, "call", overtaken)
    with pytest.raises(RateLimiterUnavailable) as info:
        await limiter.set_limits("key", [RPM], principal="ops")
    assert isinstance(info.value.cause, StorageError)
    assert info.value.cause.code == "AuditChainContended"
    assert len(chain(endpoint_url, "key")) == 1  # no event was written off the chain


@pytest.mark.integration
async def test_an_event_claimed_but_not_written_shows_as_missing(
    limiter: RateLimiter, endpoint_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await limiter.create_entity("key")
    repo = limiter.repository

    async def event_write_fails(event: AuditEvent, item: dict[str, Any]) -> None:
        raise RepositoryUnavailable("DynamoDB put_item kept failing", None)

    monkeypatch.setattr(repo, "_write_audit_event", event_write_fails)
    with pytest.raises(RateLimiterUnavailable):
        await limiter.set_limits("key", [RPM], principal="ops")
    report = await audit_mod.verify_trail(repo, "key")
    assert kinds(report) == [("missing", 2)]  # and the event itself is in the ERROR log


@pytest.mark.integration
async def test_a_restore_never_moves_a_chain_back(limiter: RateLimiter,
                                                  endpoint_url: str) -> None:
    await limiter.create_entity("key", principal="admin")
    exported = await limiter.repository.export_items()
    await limiter.set_limits("key", [RPM], principal="ops")
    before = head(endpoint_url, "key")
    await limiter.repository.replace_items(exported)
    assert head(endpoint_url, "key") == before
    assert (await audit_mod.verify_trail(limiter.repository, "key")).intact


# -- tamper evidence: the stream -------------------------------------------------------------


def stream_records(endpoint_url: str) -> list[dict[str, Any]]:
    client = ddb(endpoint_url)
    streams = boto3.client("dynamodbstreams", endpoint_url=endpoint_url, region_name="us-east-1")
    arn = client.describe_table(TableName=TABLE)["Table"]["LatestStreamArn"]
    records: list[dict[str, Any]] = []
    for shard in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
        it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            page = streams.get_records(ShardIterator=it)
            if not page["Records"]:
                break
            records += [to_lambda_record(r, arn) for r in page["Records"]]
            it = page.get("NextShardIterator")
    return records


@pytest.mark.integration
async def test_the_aggregator_counts_audit_changes_that_are_no_append_or_expiry(
    limiter: RateLimiter, endpoint_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    await four_events(limiter)
    client = ddb(endpoint_url)
    appends = stream_records(endpoint_url)
    # appending: event inserts and the head moving one on are never counted
    assert process_batch(appends, SnapshotTable(client, TABLE), ("hourly",), 90).audit_changes == 0
    assert StreamRunner(TABLE, client, boto3.client(
        "dynamodbstreams", endpoint_url=endpoint_url, region_name="us-east-1"),
        ("hourly",), 90).run_once().audit_changes == 0

    items = chain(endpoint_url, "key")
    # what verify alone cannot see: the newest event rewritten with a fresh hash, and the head
    # rewritten to match it
    forged = dict(items[3], principal={"S": "someone-else"})
    forged[schema.AUDIT_HASH] = {"S": audit_mod.chain_hash(forged)}
    client.put_item(TableName=TABLE, Item=forged)
    client.put_item(TableName=TABLE, Item=dict(head(endpoint_url, "key"),
                                               h=forged[schema.AUDIT_HASH]))
    assert (await audit_mod.verify_trail(limiter.repository, "key")).intact
    client.delete_item(TableName=TABLE, Key=key_of(items[1]))  # a deletion that is no expiry
    changes = stream_records(endpoint_url)[len(appends):]
    assert [r["eventName"] for r in changes] == ["MODIFY", "MODIFY", "REMOVE"]
    expired = audit_stream_record("REMOVE")  # what the table's TTL sends: not counted
    everything = [*changes, expired]

    from zae_limiter.aggregator import handler as module
    from zae_limiter.aggregator.audit_changes import audit_change
    from zae_limiter.aggregator.stream import matches_any_filter
    assert [audit_change(r) for r in everything] == [
        "audit event overwritten", "chain head moved from seq 4 to 4", "audit event deleted",
        None]
    assert all(matches_any_filter(r) for r in everything)  # the Lambda is invoked for them
    assert not any(matches_any_filter(r) for r in appends if r["eventName"] == "INSERT"
                   and schema.is_audit_partition(r["dynamodb"]["Keys"][schema.PK]["S"]))

    monkeypatch.setattr(module, "_settings", module.Settings(TABLE, ("hourly",), 90, "INFO",
                                                             endpoint_url))
    monkeypatch.setattr(module, "_table", SnapshotTable(client, TABLE))
    capsys.readouterr()
    with caplog.at_level(logging.ERROR, logger="zae_limiter.aggregator"):
        assert module.handler({"Records": everything}, None) == {"batchItemFailures": []}
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"_aws"' in x]
    (directive,) = line["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == schema.METRIC_NAMESPACE == "ZaeLimiter"
    assert directive["Metrics"] == [{"Name": "AuditTrailChanges", "Unit": "Count"}]
    assert (line["TableName"], line["AuditTrailChanges"]) == (TABLE, 3)
    logged = [json.loads(r.getMessage()) for r in caplog.records
              if "Audit trail changed" in r.getMessage()]
    assert [entry["reason"] for entry in logged] == [
        "audit event overwritten", "chain head moved from seq 4 to 4", "audit event deleted"]
    # and a batch with nothing to count writes no metric line
    capsys.readouterr()
    module.handler({"Records": appends}, None)
    assert '"_aws"' not in capsys.readouterr().out
