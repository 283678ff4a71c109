"""The storage interface: `Repository` implements every storage Protocol, translates DynamoDB's
errors, reads usage snapshots in one order, creates tables in one way, and talks to a loopback
endpoint without a region or credentials."""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import boto3
import botocore.exceptions
import pytest

from zae_limiter import (
    InfrastructureNotFoundError,
    Limit,
    RateLimiter,
    StackOptions,
    schema,
)
from zae_limiter.core import WRITE_ABSOLUTE
from zae_limiter.deadline import LOOPBACK_DEADLINE_SECONDS
from zae_limiter.schema import error_code
from zae_limiter.storage import protocol as storage
from zae_limiter.storage.dynamodb.endpoint import configured_endpoint, is_loopback
from zae_limiter.storage.dynamodb.repository import Repository
from zae_limiter.storage.protocol import LimitWrite, StorageError
from zae_limiter.version import (
    CLIENT_SCHEMA_VERSION,
    INITIAL_MIN_CLIENT_VERSION,
    write_initial_record,
)

PROTOCOLS = (
    storage.BucketStorage,
    storage.EntityStorage,
    storage.UsageStorage,
    storage.AdminStorage,
)


def _members(protocol: type) -> dict[str, Any]:
    return {
        name: value
        for name, value in vars(protocol).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_repository_implements_the_protocol(protocol: type) -> None:
    """mypy checks the same (`repository._implements_storage`); this also runs without it."""
    for name, member in _members(protocol).items():
        assert hasattr(Repository, name) or name in ("table_name", "ledger"), name
        if isinstance(member, property):
            continue
        ours = getattr(Repository, name)
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(member), name
        wanted = inspect.signature(member).parameters
        have = inspect.signature(ours).parameters
        for param, spec in wanted.items():
            assert param in have, f"{name}: {param}"
            assert have[param].kind == spec.kind, f"{name}: {param}"
            assert (spec.default is inspect.Parameter.empty) or (
                have[param].default == spec.default
            ), f"{name}: default of {param}"
        extra = [p for p in have.values() if p.name not in wanted]
        assert all(p.default is not inspect.Parameter.empty for p in extra), name


def test_storage_is_every_part() -> None:
    assert set(storage.Storage.__bases__) - {Protocol} == set(PROTOCOLS)


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://127.8.9.10", True),
        ("http://localhost:4566", True),
        ("localhost:8000", True),
        ("http://[::1]:8000", True),
        ("http://[::ffff:127.0.0.1]:8000", True),
        ("https://dynamodb.us-east-1.amazonaws.com", False),
        ("http://10.0.0.1:8000", False),
        ("http://localhost.example.com", False),
        ("http://dynamodb-local:8000", False),
        (None, False),
        ("", False),
    ],
)
def test_is_loopback(url: str | None, loopback: bool) -> None:
    assert is_loopback(url) is loopback


# -- loopback endpoints: no region, no credentials -------------------------------------------


@pytest.fixture
def bare_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS configuration at all: no variables, no config or credentials files."""
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-credentials"))
    # Keep botocore from asking an instance metadata service (not credentials the user set).
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_the_names_of_the_earlier_module_still_import() -> None:
    """`zae_limiter.repository` (0.2.0's path) and `storage.dynamodb.repository` still export
    every name they did before `client`, `codec` and `requests` were split from them: the same
    objects as in their homes now."""
    import zae_limiter.repository as earlier
    from zae_limiter.storage.dynamodb import client, codec, endpoint, repository, requests

    homes = {"Repository": repository, "RetryPolicy": client, "error_code": schema,
             "is_loopback": endpoint, "usage_query": requests, "surely_absent": repository}
    assert earlier is repository
    for name in earlier.__all__:
        assert getattr(earlier, name) is getattr(homes.get(name, codec), name), name


def _write(limit: str, full_at: int) -> LimitWrite:
    return LimitWrite(limit, WRITE_ABSOLUTE, full_at, None, None, 0, "10:10:10:60", create=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_loopback_endpoint_needs_no_region_or_credentials(
    bare_environment: None, endpoint_url: str, host: str
) -> None:
    assert "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_DEFAULT_REGION" not in os.environ
    url = endpoint_url.replace("127.0.0.1", host)
    async with Repository(name="bare", endpoint_url=url) as repo:
        assert await repo.create_table() is True
        written = await repo.write_bucket("e1", "r", [_write("rpm", 7_000)], now_ms=1_000)
        assert written.limits["rpm"].full_at == 7_000
        read = await repo.get_bucket("e1", "r")
        assert read is not None and read.limits["rpm"].full_at == 7_000
        client = await repo.client()
        assert client.meta.region_name == "us-east-1"
        assert client._request_signer._credentials.access_key == "local"


async def test_configured_region_and_credentials_win(
    bare_environment: None, endpoint_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "mine")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "my-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    async with Repository(name="mine", endpoint_url=endpoint_url) as repo:
        client = await repo.client()
        assert client.meta.region_name == "eu-west-1"
        assert client._request_signer._credentials.access_key == "mine"
    async with Repository(name="mine", region="ap-south-1", endpoint_url=endpoint_url) as repo:
        assert (await repo.client()).meta.region_name == "ap-south-1"


async def test_remote_endpoint_gets_no_placeholders(bare_environment: None) -> None:
    async with Repository(
        name="x", region="us-east-1", endpoint_url="http://10.0.0.1:8000"
    ) as repo:
        client = await repo.client()  # nothing is sent: building it needs no endpoint
        assert client.meta.region_name == "us-east-1"
        assert client._request_signer._credentials is None


@pytest.mark.parametrize(
    ("argument", "environ", "expected"),
    [
        (None, {}, None),
        (None, {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}, "http://127.0.0.1:1"),
        (None, {"AWS_ENDPOINT_URL": " ", "AWS_ENDPOINT_URL_DYNAMODB": ""}, None),
        # The service's own variable wins over the general one, as in botocore.
        (None, {"AWS_ENDPOINT_URL": "http://127.0.0.1:1",
                "AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:2"}, "http://127.0.0.1:2"),
        ("http://127.0.0.1:3", {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}, "http://127.0.0.1:3"),
        (None, {"AWS_ENDPOINT_URL": "http://127.0.0.1:1",
                "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "True"}, None),
        (None, {"AWS_ENDPOINT_URL": "http://127.0.0.1:1",
                "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "false"}, "http://127.0.0.1:1"),
    ],
)
def test_configured_endpoint(
    argument: str | None, environ: dict[str, str], expected: str | None
) -> None:
    assert configured_endpoint(argument, environ) == expected


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_DYNAMODB"])
async def test_loopback_endpoint_from_the_environment_needs_nothing_else(
    bare_environment: None, endpoint_url: str, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """`export AWS_ENDPOINT_URL=...` (what `zae-limiter local` prints) is as good as
    `endpoint_url=`: no region, no credentials; a limiter with `StackOptions()` creates the
    table there (not a Pulumi deployment) and gets the loopback deadline."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    monkeypatch.setenv(variable, endpoint_url.replace("127.0.0.1", "localhost"))
    async with Repository(name="from-env") as repo:
        assert repo.endpoint_url == endpoint_url.replace("127.0.0.1", "localhost")
        assert await repo.create_table() is True
        client = await repo.client()
        assert client.meta.region_name == "us-east-1"
        assert client._request_signer._credentials.access_key == "local"
    limiter = RateLimiter(name="from-env-limiter", stack_options=StackOptions())
    async with limiter:
        assert limiter.deadline == LOOPBACK_DEADLINE_SECONDS
        await limiter.create_entity("k")
        assert (await limiter.get_entity("k")) is not None
    assert "ZAEL-from-env-limiter" in boto3.client(
        "dynamodb", endpoint_url=endpoint_url, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
    ).list_tables()["TableNames"]


# -- errors -------------------------------------------------------------------------------------


@pytest.fixture
async def repo(endpoint_url: str) -> AsyncIterator[Repository]:
    async with Repository(name="store", region="us-east-1", endpoint_url=endpoint_url) as r:
        yield r


async def test_missing_table_is_infrastructure_not_found(repo: Repository) -> None:
    for call in (
        lambda: repo.get_bucket("e", "r"),
        lambda: repo.get_entity("e"),
        lambda: repo.get_version_record(),
        lambda: repo.get_usage_snapshots("e"),
        lambda: repo.export_items(),
        lambda: repo.create_backup("backup"),
    ):
        with pytest.raises(InfrastructureNotFoundError) as info:
            await call()
        assert info.value.table_name == "ZAEL-store"
        assert error_code(info.value.__cause__) in ("ResourceNotFoundException",
                                                    "TableNotFoundException")
    assert await repo.table_exists() is False
    assert await repo.delete_table() is False


async def test_refusals_are_storage_errors_with_the_client_error_as_cause(
    repo: Repository,
) -> None:
    await repo.create_table()
    with pytest.raises(StorageError) as info:
        await repo.call("get_item", TableName=repo.table_name, Key={schema.PK: {"S": "x"}})
    assert info.value.code == "ValidationException"
    assert isinstance(info.value.__cause__, botocore.exceptions.ClientError)
    assert error_code(info.value.__cause__) == "ValidationException"
    assert error_code(info.value) is None and error_code(None) is None


# -- one table-creation path --------------------------------------------------------------------


async def test_create_table_applies_tags_and_ttl_once(repo: Repository, endpoint_url: str) -> None:
    assert await repo.create_table(tags={"team": "ml", "env": "test"}) is True
    assert await repo.create_table(tags={"team": "ml"}) is False
    ddb = boto3.client("dynamodb", endpoint_url=endpoint_url, region_name="us-east-1")
    arn = ddb.describe_table(TableName="ZAEL-store")["Table"]["TableArn"]
    tags = {t["Key"]: t["Value"] for t in ddb.list_tags_of_resource(ResourceArn=arn)["Tags"]}
    assert tags == {"team": "ml", "env": "test"}
    ttl = ddb.describe_time_to_live(TableName="ZAEL-store")["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", schema.TTL_ATTRIBUTE)


def test_direct_ensure_table_goes_through_the_repository(endpoint_url: str) -> None:
    from zae_limiter.infra import InfraOptions
    from zae_limiter.ops import table as direct

    ddb = boto3.client("dynamodb", endpoint_url=endpoint_url, region_name="us-east-1")
    assert direct.ensure_table(ddb, "tagged", InfraOptions(tags={"owner": "ops"})) is True
    assert direct.ensure_table(ddb, "tagged") is False
    arn = ddb.describe_table(TableName="ZAEL-tagged")["Table"]["TableArn"]
    assert ddb.list_tags_of_resource(ResourceArn=arn)["Tags"] == [
        {"Key": "owner", "Value": "ops"}]


# -- version record: one first-record writer ----------------------------------------------------


async def test_write_initial_record_writes_once(repo: Repository) -> None:
    await repo.create_table()
    assert await write_initial_record(repo, updated_by="first", lambda_version="9.9.9") is True
    assert await write_initial_record(repo, updated_by="second") is False
    record = await repo.get_version_record()
    assert record is not None
    assert record | {"updated_at": ""} == {
        "schema_version": CLIENT_SCHEMA_VERSION,
        "min_client_version": INITIAL_MIN_CLIENT_VERSION,
        "lambda_version": "9.9.9",
        "updated_by": "first",
        "updated_at": "",
    }


# -- usage snapshots: one read path, one order --------------------------------------------------


def _snapshot_item(entity: str, resource: str, window: str, start: str, rpm: int) -> Any:
    return {
        schema.PK: {"S": schema.entity_pk(entity)},
        schema.SK: {"S": schema.usage_sk(resource, window, start)},
        "entity_id": {"S": entity},
        "resource": {"S": resource},
        "window": {"S": window},
        "window_start": {"S": start},
        "counters": {"M": {"rpm": {"N": str(rpm)}}},
    }


async def test_usage_snapshots_oldest_first_then_resource(repo: Repository) -> None:
    await repo.create_table()
    rows = [
        ("gpt", "hourly", "2024-05-01T11:00Z", 1),
        ("claude", "hourly", "2024-05-01T11:00Z", 2),
        ("gpt", "hourly", "2024-05-01T09:00Z", 3),
        ("gpt", "daily", "2024-05-01", 4),
        ("claude", "daily", "2024-04-30", 5),
    ]
    for resource, window, start, rpm in rows:
        await repo.call("put_item", TableName=repo.table_name,
                        Item=_snapshot_item("e1", resource, window, start, rpm))
    await repo.call("put_item", TableName=repo.table_name,
                    Item=_snapshot_item("e2", "gpt", "hourly", "2024-05-01T09:00Z", 9))
    every = await repo.get_usage_snapshots("e1")
    assert [(s.window_start, s.resource, s.counters["rpm"]) for s in every] == [
        ("2024-04-30", "claude", 5),
        ("2024-05-01", "gpt", 4),  # the day starts at 00:00, before 09:00
        ("2024-05-01T09:00Z", "gpt", 3),
        ("2024-05-01T11:00Z", "claude", 2),
        ("2024-05-01T11:00Z", "gpt", 1),
    ]
    hourly = await repo.get_usage_snapshots("e1", None, "hourly", "2024-05-01T10:30Z")
    assert [(s.resource, s.counters["rpm"]) for s in hourly] == [("claude", 2), ("gpt", 1)]
    with pytest.raises(ValueError):
        await repo.get_usage_snapshots("e1", window="weekly")


# -- stored limits, for migrations ---------------------------------------------------------------


async def test_stored_limit_definitions_follow_the_limit(repo: Repository) -> None:
    await repo.create_table()
    rpm = Limit.per_minute("rpm", 5)
    await repo.set_limits("e1", "llm", [rpm])
    (stored,) = await repo.list_stored_limits()
    assert (stored.entity_id, stored.resource, stored.limit, stored.definition) == (
        "e1", "llm", rpm, None)
    assert await repo.set_stored_limit_definition("e1", "llm", rpm, rpm.encode()) is True
    assert [s.definition for s in await repo.list_stored_limits()] == [rpm.encode()]
    # A limit replaced meanwhile gets no stale copy; a deleted one is not recreated.
    await repo.set_limits("e1", "llm", [Limit.per_minute("rpm", 6)])
    assert await repo.set_stored_limit_definition("e1", "llm", rpm, rpm.encode()) is False
    await repo.delete_limits("e1", "llm")
    assert await repo.set_stored_limit_definition("e1", "llm", rpm, None) is False
    assert await repo.list_stored_limits() == []


def test_a_lost_write_is_surely_absent_only_when_the_ring_proves_it() -> None:
    """After a lost response the write is resent only if the item's ring of recent write ids
    proves it did not land: the id is missing and the ring still reaches back to the item the
    decision was made on (or has free slots). A full ring that has moved past that item proves
    nothing: no resend, which could take twice."""
    from zae_limiter.storage.dynamodb.repository import surely_absent
    from zae_limiter.storage.protocol import BucketItem

    def item(*ids: str) -> BucketItem:
        return BucketItem("e", "r", {}, write_ids=ids)

    assert surely_absent("w", None, ("a",))  # no item: nothing landed
    assert not surely_absent("w", item("w"), ())  # it landed
    assert surely_absent("w", item("a", "b"), ())  # free slots: the id would be there
    assert surely_absent("w", item("a", "b", "c", "d"), ("b",))  # still reaches back to "b"
    assert not surely_absent("w", item("e", "f", "g", "h"), ("b",))  # moved past: unknown
    assert not surely_absent("w", item("e", "f", "g", "h"), ())  # nothing to reach back to
