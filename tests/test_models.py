"""Domain models: constructors, validation naming the failing field, round trips."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zae_limiter.exceptions import InvalidIdentifierError, InvalidNameError, ValidationError
from zae_limiter.models import (
    MAX_REFILL_PERIOD_SECONDS,
    Entity,
    FailureMode,
    Limit,
    LimitStatus,
    StackOptions,
    UsageSnapshot,
    UsageSummary,
)
from zae_limiter.validation import MAX_AMOUNT

# ---------------------------------------------------------------------------
# Limit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "period"),
    [
        (Limit.per_second, 1),
        (Limit.per_minute, 60),
        (Limit.per_hour, 3600),
        (Limit.per_day, 86400),
    ],
)
def test_per_period_constructors(factory: Any, period: int) -> None:
    limit = factory("rpm", 100)
    assert limit == Limit("rpm", 100, 100, 100, period)
    assert limit.refill_period_seconds == period
    assert limit.refill_amount == 100
    assert limit.burst == 100
    with_burst = factory("rpm", 100, burst=250)
    assert with_burst.burst == 250
    assert with_burst.capacity == 100


def test_custom_constructor() -> None:
    limit = Limit.custom("requests", capacity=100, refill_amount=5, refill_period_seconds=3)
    assert limit == Limit("requests", 100, 100, 5, 3)
    limit = Limit.custom("requests", 100, 100, 1, burst=1000)
    assert limit.burst == 1000


def test_refill_rate_and_millis() -> None:
    limit = Limit.custom("tpm", capacity=10, refill_amount=3, refill_period_seconds=2, burst=20)
    assert limit.refill_rate == 1.5
    assert limit.capacity_milli == 10_000
    assert limit.burst_milli == 20_000
    assert limit.refill_amount_milli == 3_000
    assert limit.refill_period_ms == 2_000
    assert Limit.per_minute("rpm", 60).refill_rate == 1.0


def test_limit_is_frozen_and_slotted() -> None:
    limit = Limit.per_second("rps", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limit.capacity = 5  # type: ignore[misc]
    assert not hasattr(limit, "__dict__")
    assert hash(limit) == hash(Limit.per_second("rps", 1))


def test_max_values_fit_signed_64_bit_millis() -> None:
    limit = Limit("big", MAX_AMOUNT, MAX_AMOUNT, MAX_AMOUNT, MAX_REFILL_PERIOD_SECONDS)
    for value in (limit.burst_milli, limit.refill_amount_milli, limit.refill_period_ms):
        assert value < 2**63


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "1rpm"}, "name"),
        ({"name": ""}, "name"),
        ({"name": "r#m"}, "name"),
        ({"name": "rpm\n"}, "name"),
        ({"capacity": 0}, "capacity"),
        ({"capacity": -1, "burst": 10}, "capacity"),
        ({"capacity": 1.0}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": math.nan}, "capacity"),
        ({"capacity": math.inf}, "capacity"),
        ({"capacity": MAX_AMOUNT + 1, "burst": MAX_AMOUNT + 1}, "capacity"),
        ({"capacity": "10"}, "capacity"),
        ({"burst": 9}, "burst"),
        ({"burst": 10.0}, "burst"),
        ({"burst": MAX_AMOUNT + 1}, "burst"),
        ({"burst": None}, "burst"),
        ({"refill_amount": 0}, "refill_amount"),
        ({"refill_amount": -5}, "refill_amount"),
        ({"refill_amount": 2.5}, "refill_amount"),
        ({"refill_amount": MAX_AMOUNT + 1}, "refill_amount"),
        ({"refill_amount": 10**30}, "refill_amount"),
        ({"refill_period_seconds": 0}, "refill_period_seconds"),
        ({"refill_period_seconds": -60}, "refill_period_seconds"),
        ({"refill_period_seconds": 60.0}, "refill_period_seconds"),
        ({"refill_period_seconds": MAX_REFILL_PERIOD_SECONDS + 1}, "refill_period_seconds"),
        ({"refill_period_seconds": False}, "refill_period_seconds"),
    ],
)
def test_limit_validation_names_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {
        "name": "rpm",
        "capacity": 10,
        "burst": 10,
        "refill_amount": 10,
        "refill_period_seconds": 60,
    }
    args.update(kwargs)
    with pytest.raises(ValidationError) as info:
        Limit(**args)
    assert info.value.field == field
    assert field in str(info.value)


def test_limit_name_error_is_invalid_name_error() -> None:
    with pytest.raises(InvalidNameError):
        Limit.per_minute("r\u0440m", 10)  # Cyrillic 'р'


def test_per_minute_burst_below_capacity_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        Limit.per_minute("rpm", 100, burst=50)
    assert info.value.field == "burst"


names = st.from_regex(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}", fullmatch=True).filter(str.isascii)


@st.composite
def limits(draw: st.DrawFn) -> Limit:
    capacity = draw(st.integers(1, MAX_AMOUNT))
    return Limit(
        name=draw(names),
        capacity=capacity,
        burst=draw(st.integers(capacity, MAX_AMOUNT)),
        refill_amount=draw(st.integers(1, MAX_AMOUNT)),
        refill_period_seconds=draw(st.integers(1, MAX_REFILL_PERIOD_SECONDS)),
    )


@given(limits())
def test_limit_dict_round_trip(limit: Limit) -> None:
    data = limit.to_dict()
    assert set(data) == {"name", "capacity", "burst", "refill_amount", "refill_period_seconds"}
    assert Limit.from_dict(data) == limit
    assert Limit.from_dict(json.loads(json.dumps(data))) == limit


@given(limits())
def test_limit_encode_round_trip(limit: Limit) -> None:
    encoded = limit.encode()
    assert limit.name not in encoded.split(":")
    assert encoded.count(":") == 3
    assert Limit.decode(encoded, limit.name) == limit


@given(limits())
def test_limit_from_dynamodb_decimals(limit: Limit) -> None:
    data: dict[str, Any] = {
        k: Decimal(v) if isinstance(v, int) else v for k, v in limit.to_dict().items()
    }
    restored = Limit.from_dict(data)
    assert restored == limit
    assert type(restored.capacity) is int


def test_limit_encode_format() -> None:
    assert Limit.custom("tpm", 10, 3, 2, burst=20).encode() == "10:20:3:2"


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "10:20:3",
        "10:20:3:2:1",
        "10:20:3:2\n",
        "+10:20:3:2",
        " 10:20:3:2",
        "10:20:3:-2",
        "10:20:3:0",
        "010:20:3:2",
        "1_0:20:3:2",
        "10:20:3:2.0",
        "\uff11\uff10:20:3:2",
        "10:5:3:2",  # burst < capacity
        "99999999999999999:99999999999999999:3:2",
        "a:b:c:d",
    ],
)
def test_limit_decode_rejects(encoded: str) -> None:
    with pytest.raises(ValidationError):
        Limit.decode(encoded, "tpm")


def test_limit_decode_validates_name() -> None:
    with pytest.raises(InvalidNameError) as info:
        Limit.decode("10:20:3:2", "bad#name")
    assert info.value.field == "name"


def test_limit_decode_rejects_non_string() -> None:
    with pytest.raises(ValidationError) as info:
        Limit.decode(b"10:20:3:2", "tpm")  # type: ignore[arg-type]
    assert info.value.field == "limit"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"capacity": 1, "burst": 1, "refill_amount": 1, "refill_period_seconds": 1}, "name"),
        ({"name": "a", "burst": 1, "refill_amount": 1, "refill_period_seconds": 1}, "capacity"),
        (
            {
                "name": "a",
                "capacity": 1,
                "burst": 1,
                "refill_amount": 1,
                "refill_period_seconds": 1,
                "extra": 1,
            },
            "extra",
        ),
        (
            {
                "name": "a",
                "capacity": Decimal("1.5"),
                "burst": 2,
                "refill_amount": 1,
                "refill_period_seconds": 1,
            },
            "capacity",
        ),
        (
            {
                "name": "a",
                "capacity": Decimal("NaN"),
                "burst": 2,
                "refill_amount": 1,
                "refill_period_seconds": 1,
            },
            "capacity",
        ),
        (
            {
                "name": "a",
                "capacity": 1,
                "burst": 1,
                "refill_amount": 1,
                "refill_period_seconds": "1",
            },
            "refill_period_seconds",
        ),
    ],
)
def test_limit_from_dict_rejects(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Limit.from_dict(data)
    assert info.value.field == field


def test_limit_pickles() -> None:
    limit = Limit.per_hour("tph", 5000, burst=6000)
    assert pickle.loads(pickle.dumps(limit)) == limit


# ---------------------------------------------------------------------------
# Entity
# ---------------------------------------------------------------------------


def test_entity_defaults_and_alias() -> None:
    entity = Entity("k1")
    assert entity.entity_id == "k1"
    assert entity.name is None
    assert entity.parent_id is None
    assert entity.metadata == {}
    assert entity.created_at is None
    assert entity.is_parent
    assert not entity.is_child
    assert Entity("k2").metadata is not entity.metadata


def test_entity_child_and_to_dict_round_trip() -> None:
    entity = Entity(
        "k1",
        name="Key 1",
        parent_id="proj-1",
        metadata={"tier": "gold"},
        created_at="2024-01-01T00:00:00Z",
    )
    assert entity.is_child
    data = entity.to_dict()
    assert data == {
        "id": "k1",
        "name": "Key 1",
        "parent_id": "proj-1",
        "metadata": {"tier": "gold"},
        "created_at": "2024-01-01T00:00:00Z",
    }
    json.dumps(data)
    assert Entity.from_dict(data) == entity
    data["metadata"]["tier"] = "silver"
    assert entity.metadata == {"tier": "gold"}


@pytest.mark.parametrize(
    ("kwargs", "field", "exc"),
    [
        ({"id": "a#b"}, "entity_id", InvalidIdentifierError),
        ({"id": ""}, "entity_id", InvalidIdentifierError),
        ({"id": "k\u0430"}, "entity_id", InvalidIdentifierError),
        ({"id": 5}, "entity_id", InvalidIdentifierError),
        ({"id": "k1", "parent_id": "p#1"}, "parent_id", InvalidIdentifierError),
        ({"id": "k1", "parent_id": "k1"}, "parent_id", ValidationError),
        ({"id": "k1", "metadata": {"a": 1}}, "metadata", ValidationError),
        ({"id": "k1", "metadata": None}, "metadata", ValidationError),
        ({"id": "k1", "name": 3}, "name", ValidationError),
        ({"id": "k1", "created_at": 1700000000}, "created_at", ValidationError),
    ],
)
def test_entity_validation(kwargs: dict[str, Any], field: str, exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        Entity(**kwargs)
    assert isinstance(info.value, ValidationError)
    assert info.value.field == field


# ---------------------------------------------------------------------------
# LimitStatus
# ---------------------------------------------------------------------------


def _status(available: int, requested: int, retry: float | None) -> LimitStatus:
    return LimitStatus(
        entity_id="k1",
        resource="gpt-4",
        limit_name="tpm",
        limit=Limit.per_minute("tpm", 1000),
        available=available,
        requested=requested,
        exceeded=requested > available,
        retry_after_seconds=retry,
    )


def test_limit_status_deficit() -> None:
    assert _status(10, 500, 3.2).deficit == 490
    assert _status(500, 10, 0.0).deficit == 0
    assert _status(-20, 5, 1.0).deficit == 25


def test_limit_status_as_dict_is_json_safe() -> None:
    data = _status(10, 500, 3.2).as_dict()
    assert data == {
        "entity_id": "k1",
        "resource": "gpt-4",
        "limit_name": "tpm",
        "capacity": 1000,
        "burst": 1000,
        "available": 10,
        "requested": 500,
        "exceeded": True,
        "retry_after_seconds": 3.2,
    }
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize("retry", [None, math.inf, math.nan])
def test_limit_status_as_dict_never_emits_non_finite(retry: float | None) -> None:
    data = _status(10, 5000, retry).as_dict()
    assert data["retry_after_seconds"] is None
    json.dumps(data, allow_nan=False)


def test_limit_status_frozen_and_picklable() -> None:
    status = _status(10, 500, 3.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.available = 0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(status)) == status


# ---------------------------------------------------------------------------
# FailureMode
# ---------------------------------------------------------------------------


def test_failure_mode_values() -> None:
    assert FailureMode.FAIL_OPEN.value == "open"
    assert FailureMode.FAIL_CLOSED.value == "closed"
    assert FailureMode("open") is FailureMode.FAIL_OPEN
    assert str(FailureMode.FAIL_CLOSED) == "closed"
    assert f"{FailureMode.FAIL_OPEN}" == "open"
    assert isinstance(FailureMode.FAIL_OPEN, str)


# ---------------------------------------------------------------------------
# StackOptions
# ---------------------------------------------------------------------------


def test_stack_options_defaults() -> None:
    opts = StackOptions()
    assert opts.create_table is True
    assert opts.aggregator is True
    assert opts.usage_windows == ("hourly", "daily")
    assert opts.snapshot_ttl_days == 90
    assert opts.pitr_recovery_days == 35
    assert opts.deletion_protection is True
    assert opts.billing_mode == "PAY_PER_REQUEST"
    assert opts.read_capacity is None
    assert opts.write_capacity is None
    assert opts.lambda_memory_mb == 256
    assert opts.lambda_timeout_seconds == 60
    assert opts.log_retention_days == 30
    assert opts.alarm_sns_topic_arn is None
    assert opts.iterator_age_threshold_ms == 30000
    assert opts.duration_threshold_pct == 80
    assert opts.kms_key_arn is None
    assert opts.permission_boundary is None
    assert opts.role_name_format is None
    assert opts.tags == {}
    assert opts.auto_update is True
    assert StackOptions().tags is not opts.tags


def test_stack_options_valid_customisation() -> None:
    tags = {"team": "platform"}
    opts = StackOptions(
        usage_windows=["daily"],  # type: ignore[arg-type]
        pitr_recovery_days=None,
        billing_mode="PROVISIONED",
        read_capacity=5,
        write_capacity=10,
        alarm_sns_topic_arn="arn:aws:sns:us-east-1:123456789012:alarms",
        role_name_format="PowerUser-{}",
        tags=tags,
        aggregator=False,
    )
    assert opts.usage_windows == ("daily",)
    tags["team"] = "x#"
    assert opts.tags == {"team": "platform"}
    assert opts.get_role_name("ZAEL-prod") == "PowerUser-ZAEL-prod-aggregator-role"
    assert StackOptions().get_role_name("ZAEL-prod") is None
    assert StackOptions(aggregator=False, usage_windows=()).usage_windows == ()


def test_stack_options_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        StackOptions().lambda_memory_mb = 512  # type: ignore[misc]
    changed = dataclasses.replace(StackOptions(), lambda_memory_mb=512)
    assert changed.lambda_memory_mb == 512
    with pytest.raises(ValidationError):
        dataclasses.replace(StackOptions(), lambda_memory_mb=64)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"create_table": 1}, "create_table"),
        ({"aggregator": "yes"}, "aggregator"),
        ({"deletion_protection": None}, "deletion_protection"),
        ({"auto_update": 0}, "auto_update"),
        ({"usage_windows": ("weekly",)}, "usage_windows"),
        ({"usage_windows": ("hourly", "hourly")}, "usage_windows"),
        ({"usage_windows": "hourly"}, "usage_windows"),
        ({"usage_windows": ()}, "usage_windows"),
        ({"snapshot_ttl_days": 0}, "snapshot_ttl_days"),
        ({"snapshot_ttl_days": 3651}, "snapshot_ttl_days"),
        ({"snapshot_ttl_days": 90.0}, "snapshot_ttl_days"),
        ({"pitr_recovery_days": 0}, "pitr_recovery_days"),
        ({"pitr_recovery_days": 36}, "pitr_recovery_days"),
        ({"billing_mode": "ON_DEMAND"}, "billing_mode"),
        ({"billing_mode": "PROVISIONED", "write_capacity": 5}, "read_capacity"),
        ({"billing_mode": "PROVISIONED", "read_capacity": 5}, "write_capacity"),
        (
            {"billing_mode": "PROVISIONED", "read_capacity": 0, "write_capacity": 5},
            "read_capacity",
        ),
        ({"read_capacity": 5}, "read_capacity"),
        ({"write_capacity": 5}, "write_capacity"),
        ({"lambda_memory_mb": 127}, "lambda_memory_mb"),
        ({"lambda_memory_mb": 10241}, "lambda_memory_mb"),
        ({"lambda_timeout_seconds": 0}, "lambda_timeout_seconds"),
        ({"lambda_timeout_seconds": 901}, "lambda_timeout_seconds"),
        ({"log_retention_days": 31}, "log_retention_days"),
        ({"log_retention_days": True}, "log_retention_days"),
        ({"alarm_sns_topic_arn": "my-topic"}, "alarm_sns_topic_arn"),
        ({"iterator_age_threshold_ms": 0}, "iterator_age_threshold_ms"),
        ({"iterator_age_threshold_ms": 86_400_001}, "iterator_age_threshold_ms"),
        ({"duration_threshold_pct": 0}, "duration_threshold_pct"),
        ({"duration_threshold_pct": 101}, "duration_threshold_pct"),
        ({"kms_key_arn": ""}, "kms_key_arn"),
        ({"permission_boundary": " "}, "permission_boundary"),
        ({"role_name_format": "no-placeholder"}, "role_name_format"),
        ({"role_name_format": "{}-{}"}, "role_name_format"),
        ({"role_name_format": "x" * 41 + "{}"}, "role_name_format"),
        ({"tags": {"aws:owner": "me"}}, "tags"),
        ({"tags": {"": "v"}}, "tags"),
        ({"tags": {"k": 1}}, "tags"),
        ({"tags": {f"k{i}": "v" for i in range(51)}}, "tags"),
        ({"tags": [("k", "v")]}, "tags"),
    ],
)
def test_stack_options_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        StackOptions(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)


# ---------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------


def test_usage_snapshot() -> None:
    snap = UsageSnapshot(
        entity_id="k1",
        resource="gpt-4",
        window="hourly",
        window_start="2024-01-01T10:00:00Z",
        counters={"tpm": 1200, "rpm": 3},
    )
    assert snap.updated_at is None
    assert snap.window_type == "hourly"
    assert snap.counters["tpm"] == 1200


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window": "weekly"}, "window"),
        ({"entity_id": "a#b"}, "entity_id"),
        ({"resource": "x#y"}, "resource"),
    ],
)
def test_usage_snapshot_validation(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {
        "entity_id": "k1",
        "resource": "gpt-4",
        "window": "daily",
        "window_start": "2024-01-01T00:00:00Z",
        "counters": {},
    }
    args.update(kwargs)
    with pytest.raises(ValidationError) as info:
        UsageSnapshot(**args)
    assert info.value.field == field


def test_usage_summary_fields() -> None:
    summary = UsageSummary(
        entity_id="k1",
        resource="gpt-4",
        window="daily",
        start="2024-01-01T00:00:00Z",
        end="2024-01-03T00:00:00Z",
        snapshot_count=2,
        totals={"tpm": 300},
        averages={"tpm": 150.0},
    )
    assert summary.totals["tpm"] / summary.snapshot_count == summary.averages["tpm"]
    assert [f.name for f in dataclasses.fields(UsageSummary)] == [
        "entity_id",
        "resource",
        "window",
        "start",
        "end",
        "snapshot_count",
        "totals",
        "averages",
    ]


def test_stack_options_constructor_defaults_are_the_fields_defaults() -> None:
    """`StackOptions.__init__` is written out (it takes 0.2.0's names too): each default it
    repeats must be the field's own, and a field with a 0.2.0 name takes None for "not given"."""
    import dataclasses
    import inspect

    from zae_limiter import StackOptions

    params = inspect.signature(StackOptions.__init__).parameters
    aliased = set(StackOptions.LEGACY_NAMES.values())
    for f in dataclasses.fields(StackOptions):
        given = params[f.name].default
        if f.name in aliased or f.name == "tags":
            assert given is None, f.name
        else:
            assert given == f.default, f.name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        assert getattr(StackOptions(), f.name) == default, f.name


async def test_every_limit_factory_with_soft_true_is_served() -> None:
    """Every shape of limit may be soft: a request past its allowance (larger than it, even)
    is admitted and debited, in a limiter that fails closed (nothing is waved through by an
    outage), and reported past its allowance. None is refused any more."""
    from datetime import timedelta

    from zae_limiter import MemoryStorage, RateLimiter

    soft = [
        Limit.per_second("ps", 2, soft=True),
        Limit.per_minute("pm", 2, soft=True),
        Limit.per_hour("ph", 2, soft=True),
        Limit.per_day("pd", 2, soft=True),
        Limit.custom("cu", 2, 1, 7, soft=True),
        Limit.quota("qc", 2, cron="0 0 * * *", soft=True),
        Limit.quota("qs", 2, reset_after=timedelta(hours=1), soft=True),
        Limit.concurrency("cc", 2, soft=True),
        Limit.parse("tx:2/1m,soft"),
    ]
    assert all(limit.soft for limit in soft)
    async with RateLimiter(repository=MemoryStorage(), failure_mode=FailureMode.FAIL_CLOSED) as lim:
        for limit in soft:
            async with lim.acquire("e", "r", [limit], {limit.name: 3}) as lease:
                [status] = lease.statuses()
                assert not lease.fail_open
                assert status.limit_name == limit.name
                assert (status.available, status.requested, status.exceeded) == (-1, 3, True)
                assert await lim.available("e", "r", [limit]) == {limit.name: -1}
