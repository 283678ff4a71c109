"""Version compatibility: semver, each outcome's exception, the limiter's once-per-limiter check,
auto-update on a local endpoint, and the AWS path's clear error without Pulumi."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import pytest

from zae_limiter import (
    IncompatibleSchemaError,
    Limit,
    MinimumClientVersionError,
    RateLimiter,
    StackOptions,
    SyncRateLimiter,
    ValidationError,
    VersionMismatchError,
    __version__,
    schema,
)
from zae_limiter import version as v
from zae_limiter.storage.dynamodb.repository import Repository

RPM = [Limit.per_minute("rpm", 10)]


# -- pure -------------------------------------------------------------------------------------


def test_parse_and_compare() -> None:
    assert v.parse("1.2.3") == v.parse("v1.2.3+build.7")
    assert v.compare("1.2.3", "1.10.0") == -1
    assert v.compare("2.0.0", "1.99.99") == 1
    assert v.compare("1.0.0-rc.1", "1.0.0") == -1
    assert v.compare("1.0.0-alpha", "1.0.0-alpha.1") == -1
    assert v.compare("1.0.0-2", "1.0.0-10") == -1
    assert v.compare("1.0.0-beta", "1.0.0-10") == 1
    assert str(v.parse("1.0.0-rc.1")) == "1.0.0-rc.1"
    for bad in ("1.0", "01.0.0", "x", ""):
        with pytest.raises(ValueError):
            v.parse(bad)


def record(**fields: str) -> dict[str, str]:
    base = {"schema_version": "1.0.0", "lambda_version": "1.0.0", "min_client_version": "0.0.0"}
    return base | fields


@pytest.mark.parametrize(
    ("rec", "kind", "exc"),
    [
        (record(), "ok", None),
        (None, "missing_record", None),
        (record(schema_version="1.4.0"), "ok", None),  # minor schema: compatible both ways
        (record(lambda_version="1.5.0"), "ok", None),  # newer aggregator is fine
        (record(schema_version="2.0.0"), "schema", IncompatibleSchemaError),
        (record(schema_version="0.9.0"), "schema", IncompatibleSchemaError),
        (record(schema_version="garbage"), "schema", IncompatibleSchemaError),
        (record(min_client_version="1.0.1"), "min_client", MinimumClientVersionError),
        (record(lambda_version="0.9.0"), "lambda", VersionMismatchError),
        # The schema outranks everything: nothing but a migration fixes it.
        (record(schema_version="2.0.0", lambda_version="0.1.0"), "schema", IncompatibleSchemaError),
    ],
)
def test_each_outcome_raises_its_exception(
    rec: dict[str, str] | None, kind: str, exc: type[Exception] | None
) -> None:
    compat = v.check_compatibility(rec, "1.0.0", "1.0.0")
    assert compat.kind == kind
    assert compat.compatible is (exc is None)
    assert compat.can_auto_update is (kind == "lambda")
    if exc is None:
        assert v.enforce(compat) is compat
        return
    with pytest.raises(exc) as info:
        v.enforce(compat, "strict")
    # MinimumClientVersionError subclasses VersionMismatchError; it must not be the plain one.
    assert type(info.value) is exc
    if exc is IncompatibleSchemaError:
        assert "zae-limiter migrate --to 1.0.0" in str(info.value)
        with pytest.raises(IncompatibleSchemaError):
            v.enforce(compat, "relaxed")
    else:
        assert v.enforce(compat, "relaxed") is compat
    assert v.enforce(compat, "skip") is compat


def test_enforce_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError):
        v.enforce(v.check_compatibility(record()), "lenient")  # type: ignore[arg-type]


# -- against moto -----------------------------------------------------------------------------

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
async def repo(endpoint_url: str) -> AsyncIterator[Repository]:
    # The limiter's local provisioning creates the table and a compatible record.
    async with RateLimiter(name="ver", endpoint_url=endpoint_url, stack_options=StackOptions()):
        pass
    async with Repository("ZAEL-ver", "us-east-1", endpoint_url) as r:
        yield r


async def use(limiter: RateLimiter) -> None:
    try:
        await limiter.available("e1", "r", RPM)
    finally:
        await limiter.close()


async def test_provisioned_table_is_compatible(repo: Repository, endpoint_url: str) -> None:
    rec = await repo.get_version_record()
    assert rec is not None
    assert rec["schema_version"] == schema.SCHEMA_VERSION
    assert rec["lambda_version"] == __version__
    limiter = RateLimiter(name="ver", endpoint_url=endpoint_url)
    await use(limiter)
    assert limiter.compatibility is not None and limiter.compatibility.kind == "ok"


@pytest.mark.parametrize(
    ("fields", "exc", "relaxed_ok"),
    [
        ({"schema_version": "2.0.0"}, IncompatibleSchemaError, False),
        ({"min_client_version": "99.0.0"}, MinimumClientVersionError, True),
        ({"lambda_version": "0.0.1"}, VersionMismatchError, True),
    ],
)
async def test_limiter_raises_per_outcome(
    repo: Repository,
    endpoint_url: str,
    fields: dict[str, str],
    exc: type[Exception],
    relaxed_ok: bool,
) -> None:
    await repo.set_version_record(**fields)  # type: ignore[arg-type]
    with pytest.raises(exc) as info:
        await use(RateLimiter(name="ver", endpoint_url=endpoint_url))
    assert type(info.value) is exc
    relaxed = RateLimiter(name="ver", endpoint_url=endpoint_url, version_check="relaxed")
    if relaxed_ok:
        await use(relaxed)
    else:
        with pytest.raises(exc):
            await use(relaxed)
    # skip reads nothing at all
    skipping = RateLimiter(name="ver", endpoint_url=endpoint_url, version_check="skip")
    await use(skipping)
    assert skipping.compatibility is None
    # auto_update cannot help these two; the limiter must not pretend it did
    if exc is not VersionMismatchError:
        with pytest.raises(exc):
            await use(RateLimiter(name="ver", endpoint_url=endpoint_url,
                                  stack_options=StackOptions()))


async def test_auto_update_on_local_endpoint_rewrites_lambda_version(
    repo: Repository, endpoint_url: str
) -> None:
    await repo.set_version_record(lambda_version="0.0.1")
    with pytest.raises(VersionMismatchError) as info:
        await use(RateLimiter(name="ver", endpoint_url=endpoint_url,
                              stack_options=StackOptions(auto_update=False)))
    assert info.value.can_auto_update
    limiter = RateLimiter(name="ver", endpoint_url=endpoint_url, stack_options=StackOptions())
    await use(limiter)
    rec = await repo.get_version_record()
    assert rec is not None and rec["lambda_version"] == __version__
    assert rec["updated_by"] == "zae-limiter auto-update"
    assert limiter.compatibility is not None and limiter.compatibility.compatible


async def test_check_runs_once_per_limiter(repo: Repository, endpoint_url: str) -> None:
    limiter = RateLimiter(name="ver", endpoint_url=endpoint_url)
    await limiter.available("e1", "r", RPM)
    await repo.set_version_record(schema_version="2.0.0")
    limiter.ledger.reset()
    await limiter.available("e1", "r", RPM)  # cached verdict: no second read, no raise
    assert limiter.ledger.snapshot()["calls"] == {"GetItem": 1}
    await limiter.close()


async def test_missing_record_is_compatible(endpoint_url: str) -> None:
    async with Repository("ZAEL-bare", "us-east-1", endpoint_url) as r:
        await r.create_table()
        limiter = RateLimiter(name="bare", endpoint_url=endpoint_url)
        await use(limiter)
        assert limiter.compatibility is not None
        assert limiter.compatibility.kind == "missing_record"


async def test_aws_update_without_pulumi_is_a_clear_error(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zae_limiter.infra

    # `from .infra import automation` finds an already imported module as a package attribute.
    monkeypatch.delattr(zae_limiter.infra, "automation", raising=False)
    monkeypatch.setitem(sys.modules, "zae_limiter.infra.automation", None)
    with pytest.raises(VersionMismatchError, match=r"needs Pulumi: pip install"):
        await v.update_aggregator(repo, name="ver", region="us-east-1", endpoint_url=None)
    rec = await repo.get_version_record()
    assert rec is not None and rec["lambda_version"] == __version__  # untouched


async def test_aws_update_redeploys_with_current_options_then_records(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    calls: list[tuple[str, object]] = []
    fake = types.ModuleType("zae_limiter.infra.automation")
    fake.status = lambda name, region: {  # type: ignore[attr-defined]
        "options": {"name": "ver", "lambda_memory_mb": "512", "aggregator": "false"}
    }
    fake.deploy = lambda name, region, options: calls.append((name, options))  # type: ignore[attr-defined]
    import zae_limiter.infra

    monkeypatch.setattr(zae_limiter.infra, "automation", fake, raising=False)
    monkeypatch.setitem(sys.modules, "zae_limiter.infra.automation", fake)
    await repo.set_version_record(lambda_version="0.0.1")
    detail = await v.update_aggregator(repo, name="ver", region="eu-west-1", endpoint_url=None)
    assert "Pulumi" in detail
    from zae_limiter.infra import InfraOptions

    # The stack's deployed options are kept; everything else stays at its default.
    assert calls == [("ver", InfraOptions(lambda_memory_mb=512, aggregator=False))]
    rec = await repo.get_version_record()
    assert rec is not None and rec["lambda_version"] == __version__


def test_sync_limiter_passes_version_check(endpoint_url: str) -> None:
    with SyncRateLimiter(name="ver", endpoint_url=endpoint_url, stack_options=StackOptions()):
        pass
    with SyncRateLimiter(name="ver", endpoint_url=endpoint_url, version_check="skip") as lim:
        assert lim.async_limiter.version_check == "skip"
        assert lim.available("e", "r", RPM) == {"rpm": 10}
    with pytest.raises(ValidationError):
        SyncRateLimiter(name="ver", endpoint_url=endpoint_url,
                        version_check="sometimes")  # type: ignore[arg-type]


async def test_version_status_for_the_status_command(repo: Repository, endpoint_url: str) -> None:
    from zae_limiter.ops import recovery as ops

    info = await ops.version_status_async(repo)
    assert info["compatible"] and info["schema_version"] == schema.SCHEMA_VERSION
    assert set(info) >= {"client_version", "lambda_version", "min_client_version", "reason"}
