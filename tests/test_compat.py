"""Drop-in for zae-limiter 0.2.0 users: names, models, exceptions and keywords as 0.2.0 had them
(docs/compatibility.md lists the deliberate differences)."""

from __future__ import annotations

import pickle

import pytest

import zae_limiter
from zae_limiter import (
    AuditAction,
    AuditEvent,
    BucketState,
    EntityCapacity,
    FailureMode,
    InfrastructureNotFoundError,
    Limit,
    LimitName,
    LimitStatus,
    RateLimiter,
    RateLimitExceeded,
    RequestTooLarge,
    ResourceCapacity,
    StackOptions,
    SyncRateLimiter,
    ValidationError,
)

pytestmark = pytest.mark.integration

# zae_limiter.__all__ of the 0.2.0 release (a fact of that release, not its code).
ALL_0_2_0 = (
    "__version__", "RateLimiter", "SyncRateLimiter", "Lease", "SyncLease", "StackManager",
    "Limit", "LimitName", "Entity", "LimitStatus", "BucketState", "UsageSnapshot",
    "ResourceCapacity", "EntityCapacity", "StackOptions", "AuditEvent", "AuditAction",
    "FailureMode", "ZAELimiterError", "RateLimitError", "InfrastructureError", "EntityError",
    "VersionError", "RateLimitExceeded", "RateLimiterUnavailable", "ValidationError",
    "InvalidIdentifierError", "InvalidNameError", "EntityNotFoundError", "EntityExistsError",
    "StackCreationError", "StackAlreadyExistsError", "InfrastructureNotFoundError",
    "VersionMismatchError", "IncompatibleSchemaError",
)
T0 = 1_800_000_000_000


def test_every_0_2_0_name_imports_from_the_package() -> None:
    missing = [name for name in ALL_0_2_0 if name not in zae_limiter.__all__]
    assert missing == []
    for name in ALL_0_2_0:
        assert getattr(zae_limiter, name) is not None


def test_exception_hierarchy_is_0_2_0s() -> None:
    from zae_limiter import (
        EntityError,
        EntityExistsError,
        EntityNotFoundError,
        IncompatibleSchemaError,
        InfrastructureError,
        RateLimitError,
        RateLimiterUnavailable,
        StackAlreadyExistsError,
        StackCreationError,
        VersionError,
        VersionMismatchError,
        ZAELimiterError,
    )

    pairs = [
        (RateLimitExceeded, RateLimitError), (RateLimiterUnavailable, RateLimitError),
        (EntityNotFoundError, EntityError), (EntityExistsError, EntityError),
        (StackCreationError, InfrastructureError), (StackAlreadyExistsError, StackCreationError),
        (InfrastructureNotFoundError, InfrastructureError),
        (VersionMismatchError, VersionError), (IncompatibleSchemaError, VersionError),
        (RateLimitError, ZAELimiterError), (ValidationError, ZAELimiterError),
    ]
    for child, parent in pairs:
        assert issubclass(child, parent), (child, parent)


# -- item 8: LimitName ------------------------------------------------------------------------


def test_limit_name_constants() -> None:
    assert (LimitName.RPM, LimitName.TPM, LimitName.RPH, LimitName.TPH, LimitName.RPD,
            LimitName.TPD) == ("rpm", "tpm", "rph", "tph", "rpd", "tpd")
    assert Limit.per_minute(LimitName.TPM, 10).name == "tpm"


# -- item 9: RateLimitExceeded needs a violation ---------------------------------------------


def _status(exceeded: bool, requested: int = 5, retry: float | None = 1.0) -> LimitStatus:
    limit = Limit.per_minute("rpm", 10)
    return LimitStatus("k", "llm", "rpm", limit, 2, requested, exceeded,
                       retry if exceeded else 0.0)


def test_rate_limit_exceeded_without_violation_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        RateLimitExceeded([])
    with pytest.raises(ValueError):
        RateLimitExceeded([_status(False)])
    exc = RateLimitExceeded([_status(True), _status(False)])
    assert len(exc.violations) == 1 and len(exc.passed) == 1


# -- item 10: InfrastructureNotFoundError(stack_name=...) ------------------------------------


def test_infrastructure_not_found_takes_0_2_0s_keyword() -> None:
    for exc in (InfrastructureNotFoundError(stack_name="ZAEL-app"),
                InfrastructureNotFoundError("ZAEL-app"),
                InfrastructureNotFoundError(name="ZAEL-app")):
        assert exc.stack_name == exc.table_name == "ZAEL-app"
        assert "ZAEL-app" in str(exc)
        assert pickle.loads(pickle.dumps(exc)).stack_name == "ZAEL-app"
    with pytest.raises(TypeError):
        InfrastructureNotFoundError()


# -- item 6 and 2: the models -----------------------------------------------------------------


def test_bucket_state_from_limit_is_a_full_bucket() -> None:
    limit = Limit.per_minute("tpm", 1_000, burst=1_500)
    state = BucketState.from_limit("key-1", "gpt-4", limit, T0)
    assert (state.tokens, state.capacity, state.burst) == (1_500, 1_000, 1_500)
    assert (state.refill_amount_milli, state.refill_period_ms) == (1_000_000, 60_000)
    assert state.last_refill_ms == T0 and state.limit_name == "tpm"
    with pytest.raises(ValidationError) as info:
        BucketState.from_limit("bad id!", "gpt-4", limit, T0)
    assert info.value.field == "entity_id"
    with pytest.raises(ValidationError) as info:
        BucketState.from_limit("key-1", "gpt-4", limit, -1)
    assert info.value.field == "now_ms"


def test_capacity_models_hold_0_2_0s_fields() -> None:
    entity = EntityCapacity(entity_id="k", capacity=100, available=40, utilization_pct=60.0)
    total = ResourceCapacity(resource="gpt-4", limit_name="rpm", total_capacity=100,
                             total_available=40, utilization_pct=60.0, entities=[entity])
    assert total.entities[0].available == 40


def test_audit_event_round_trips_and_names_a_missing_field() -> None:
    event = AuditEvent(event_id="01J0", timestamp="2026-01-01T00:00:00Z",
                       action=AuditAction.LIMITS_SET, entity_id="k", principal="ops@x",
                       resource="gpt-4", details={"limits": ["rpm"]})
    assert AuditEvent.from_dict(event.to_dict()) == event
    minimal = AuditEvent("01J1", "2026-01-01T00:00:00Z", AuditAction.ENTITY_CREATED, "k")
    assert minimal.to_dict() == {"event_id": "01J1", "timestamp": "2026-01-01T00:00:00Z",
                                 "action": "entity_created", "entity_id": "k"}
    with pytest.raises(ValidationError) as info:
        AuditEvent.from_dict({"event_id": "x", "timestamp": "t", "action": "a"})
    assert info.value.field == "entity_id"
    assert {AuditAction.ENTITY_CREATED, AuditAction.ENTITY_DELETED, AuditAction.LIMITS_SET,
            AuditAction.LIMITS_DELETED} == {"entity_created", "entity_deleted", "limits_set",
                                            "limits_deleted"}


# -- item 1: more than the burst --------------------------------------------------------------


async def test_consuming_more_than_the_burst_is_a_rate_limit_exceeded(endpoint_url: str) -> None:
    limits = [Limit.per_minute("rpm", 10), Limit.per_minute("tpm", 100)]
    async with RateLimiter(name="compat", endpoint_url=endpoint_url,
                           stack_options=StackOptions(), clock=lambda: T0) as limiter:
        async with limiter.acquire("k", "llm", limits, {"rpm": 1, "tpm": 30}):
            pass
        limiter.ledger.reset()
        with pytest.raises(RateLimitExceeded) as info:
            async with limiter.acquire("k", "llm", limits, {"rpm": 1, "tpm": 101}):
                pass
        exc = info.value
        assert isinstance(exc, RequestTooLarge) and isinstance(exc, ValidationError)
        assert exc.field == "consume.tpm"
        (violation,) = exc.violations
        assert (violation.limit_name, violation.requested, violation.available) == ("tpm", 101, 70)
        # waiting cannot help, and the error says so
        assert exc.retry_after_seconds is None and exc.retry_after_header is None
        assert not exc.retryable
        body = exc.as_dict()
        assert (body["error"], body["reason"]) == ("rate_limit_exceeded", "request_exceeds_burst")
        assert body["retry_after_seconds"] is None
        assert limiter.ledger.calls.get("UpdateItem", 0) == 0  # nothing was taken
        # the same from a lease
        async with limiter.acquire("k", "llm", limits, {"rpm": 1}) as lease:
            with pytest.raises(RequestTooLarge) as info:
                await lease.consume(tpm=500)
            assert lease.consumed == {"rpm": 1}


async def test_too_large_is_an_error_under_fail_open_even_when_unreachable() -> None:
    from zae_limiter.ops.local import free_port
    from zae_limiter.storage.dynamodb.client import RetryPolicy

    limiter = RateLimiter(name="compat", endpoint_url=f"http://127.0.0.1:{free_port()}",
                          failure_mode=FailureMode.FAIL_OPEN, version_check="skip",
                          retry=RetryPolicy(max_attempts=1, connect_timeout=0.2))
    try:
        with pytest.raises(RequestTooLarge) as info:
            async with limiter.acquire("k", "llm", [Limit.per_minute("rpm", 5)], {"rpm": 6}):
                pass
        assert info.value.violations[0].available == 5  # unknown: a full bucket
    finally:
        await limiter.close()


# -- item 12: a fail-open lease holds nothing -------------------------------------------------


async def test_fail_open_lease_reports_nothing_consumed() -> None:
    from zae_limiter.ops.local import free_port
    from zae_limiter.storage.dynamodb.client import RetryPolicy

    limiter = RateLimiter(name="compat", endpoint_url=f"http://127.0.0.1:{free_port()}",
                          failure_mode=FailureMode.FAIL_OPEN, version_check="skip",
                          retry=RetryPolicy(max_attempts=1, connect_timeout=0.2))
    try:
        async with limiter.acquire("k", "llm", [Limit.per_minute("rpm", 5)], {"rpm": 1}) as lease:
            assert lease.fail_open
            assert lease.consumed == {}
            await lease.adjust(rpm=3)
            await lease.release(rpm=1)
            assert lease.consumed == {}
    finally:
        await limiter.close()


# -- item 3: 0.2.0's constructor keywords -----------------------------------------------------


def test_version_keywords_map_onto_version_check() -> None:
    assert RateLimiter(name="a", skip_version_check=True).version_check == "skip"
    assert RateLimiter(name="a", strict_version=False).version_check == "relaxed"
    assert RateLimiter(name="a", strict_version=True).version_check == "strict"
    assert RateLimiter(name="a").version_check == "strict"
    assert RateLimiter(name="a", version_check="relaxed", strict_version=False).version_check \
        == "relaxed"
    # positional, in 0.2.0's order
    positional = RateLimiter("a", None, None, None, FailureMode.FAIL_OPEN, False, True, True)
    assert positional.version_check == "skip" and positional.auto_update is False
    # 0.2's fixtures reach for `limiter._repository`
    assert positional._repository is positional.repository
    sync = SyncRateLimiter(name="a", skip_version_check=True, auto_update=False)
    try:
        assert sync.async_limiter.version_check == "skip"
        assert sync.async_limiter.auto_update is False
    finally:
        sync.close()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"version_check": "relaxed", "strict_version": True}, "version_check"),
        ({"version_check": "skip", "skip_version_check": False}, "version_check"),
        ({"strict_version": "yes"}, "strict_version"),
        ({"skip_version_check": 1}, "skip_version_check"),
        ({"auto_update": "no"}, "auto_update"),
    ],
)
def test_contradicting_version_keywords_are_errors(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        RateLimiter(name="a", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


async def test_auto_update_keyword_overrides_stack_options(
    endpoint_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto_update=False` keeps an old aggregator as it is; the check then decides."""
    from zae_limiter import version

    calls: list[bool] = []
    real = version.ensure_compatible

    async def spy(*args: object, **kwargs: object) -> version.Compatibility:
        calls.append(bool(kwargs["auto_update"]))
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("zae_limiter.limiter.ensure_compatible", spy)
    for auto_update, expected in ((False, False), (None, True)):
        async with RateLimiter(name="compat", endpoint_url=endpoint_url,
                               stack_options=StackOptions(), auto_update=auto_update):
            pass
        assert calls[-1] is expected


# -- item 2: get_resource_capacity ------------------------------------------------------------


async def test_resource_capacity_sums_every_entity(endpoint_url: str) -> None:
    limits = [Limit.per_minute("rpm", 100), Limit.per_minute("tpm", 1_000)]
    async with RateLimiter(name="compat", endpoint_url=endpoint_url,
                           stack_options=StackOptions(), clock=lambda: T0) as limiter:
        await limiter.create_entity("proj")
        await limiter.create_entity("k1", parent_id="proj")
        await limiter.create_entity("k2", parent_id="proj")
        for entity, used in (("proj", 10), ("k1", 30), ("k2", 60)):
            async with limiter.acquire(entity, "gpt-4", limits, {"rpm": used}):
                pass
        async with limiter.acquire("k1", "other", limits, {"rpm": 99}):
            pass  # another resource: not counted
        report = await limiter.get_resource_capacity("gpt-4", "rpm")
        assert [(e.entity_id, e.capacity, e.available) for e in report.entities] == [
            ("k1", 100, 70), ("k2", 100, 40), ("proj", 100, 90)]
        assert (report.total_capacity, report.total_available) == (300, 200)
        assert report.utilization_pct == pytest.approx(100 / 3)
        assert report.entities[1].utilization_pct == pytest.approx(60.0)
        parents = await limiter.get_resource_capacity("gpt-4", "rpm", parents_only=True)
        assert [e.entity_id for e in parents.entities] == ["proj"]
        empty = await limiter.get_resource_capacity("gpt-4", "absent")
        assert (empty.total_capacity, empty.utilization_pct, empty.entities) == (0, 0.0, [])
        with pytest.raises(ValidationError) as info:
            await limiter.get_resource_capacity("gpt-4", "rpm", parents_only="yes")  # type: ignore[arg-type]
        assert info.value.field == "parents_only"


def test_sync_resource_capacity(endpoint_url: str) -> None:
    with SyncRateLimiter(name="compat", endpoint_url=endpoint_url, stack_options=StackOptions(),
                         clock=lambda: T0) as limiter:
        with limiter.acquire("k1", "gpt-4", [Limit.per_minute("rpm", 10)], {"rpm": 4}):
            pass
        report = limiter.get_resource_capacity("gpt-4", "rpm")
        assert (report.total_capacity, report.total_available) == (10, 6)


def test_usage_snapshot_keeps_0_2_0s_window_names() -> None:
    from zae_limiter import UsageSnapshot

    hourly = UsageSnapshot("k", "gpt-4", "hourly", "2026-01-01T23:00Z", {"rpm": 3})
    assert hourly.window_type == "hourly"
    assert hourly.window_end == "2026-01-02T00:00:00Z"
    daily = UsageSnapshot("k", "gpt-4", "daily", "2026-01-31", {"rpm": 3})
    assert daily.window_end == "2026-02-01T00:00:00Z"
