"""Exceptions: RateLimitExceeded arithmetic, messages, JSON bodies, and pickling."""

from __future__ import annotations

import json
import math
import pickle
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zae_limiter import exceptions as exc_mod
from zae_limiter.exceptions import (
    ConfigurationError,
    EntityError,
    EntityExistsError,
    EntityNotFoundError,
    IncompatibleSchemaError,
    InfrastructureError,
    InfrastructureNotFoundError,
    InvalidIdentifierError,
    InvalidNameError,
    MinimumClientVersionError,
    RateLimitError,
    RateLimiterUnavailable,
    RateLimitExceeded,
    RequestTooLarge,
    ResourceDisabled,
    StackAlreadyExistsError,
    StackCreationError,
    ValidationError,
    VersionError,
    VersionMismatchError,
    ZAELimiterError,
)
from zae_limiter.http.fields import retry_after
from zae_limiter.models import Limit, LimitStatus


def status(
    limit_name: str = "tpm",
    available: int = 10,
    requested: int = 500,
    retry: float | None = 3.2,
    *,
    exceeded: bool | None = None,
    entity_id: str = "k1",
    resource: str = "gpt-4",
) -> LimitStatus:
    return LimitStatus(
        entity_id=entity_id,
        resource=resource,
        limit_name=limit_name,
        limit=Limit.per_minute(limit_name, 1000),
        available=available,
        requested=requested,
        exceeded=requested > available if exceeded is None else exceeded,
        retry_after_seconds=retry,
    )


# ---------------------------------------------------------------------------
# RateLimitExceeded
# ---------------------------------------------------------------------------


def test_partitions_and_primary_violation() -> None:
    ok = status("rpm", available=50, requested=1, retry=0.0)
    small = status("tpm", retry=1.5)
    big = status("tpd", retry=40.0)
    exc = RateLimitExceeded([ok, small, big])
    assert exc.statuses == [ok, small, big]
    assert exc.violations == [small, big]
    assert exc.passed == [ok]
    assert exc.primary_violation is big
    assert exc.retry_after_seconds == 40.0
    assert exc.retry_after_ms == 40_000
    assert exc.retry_after_header == "40"
    assert exc.retryable
    assert isinstance(exc, RateLimitError)
    assert isinstance(exc, ZAELimiterError)


def test_statuses_list_is_copied() -> None:
    statuses = [status()]
    exc = RateLimitExceeded(statuses)
    statuses.append(status("rpm"))
    assert len(exc.statuses) == 1


def test_message_single_violation() -> None:
    exc = RateLimitExceeded([status()])
    assert str(exc) == (
        "Rate limit exceeded for entity 'k1' resource 'gpt-4': "
        "tpm (available 10, requested 500); retry after 3.2s"
    )


def test_message_groups_cascade_violations() -> None:
    exc = RateLimitExceeded(
        [
            status("tpm", retry=1.0),
            status("rpm", available=0, requested=1, retry=0.25),
            status("tpm", retry=2.0, entity_id="proj"),
        ]
    )
    assert str(exc) == (
        "Rate limit exceeded for entity 'k1' resource 'gpt-4': "
        "tpm (available 10, requested 500), rpm (available 0, requested 1); "
        "entity 'proj' resource 'gpt-4': tpm (available 10, requested 500); retry after 2s"
    )
    assert exc.primary_violation is not None
    assert exc.primary_violation.entity_id == "proj"


def test_no_violations_is_a_value_error() -> None:
    """As in 0.2.0: a denial must name an exceeded limit."""
    with pytest.raises(ValueError, match="at least one violation"):
        RateLimitExceeded([status(available=900, requested=1, retry=0.0)])
    with pytest.raises(ValueError):
        RateLimitExceeded([])


@pytest.mark.parametrize(
    ("seconds", "header", "ms"),
    [
        (0.2, "1", 200),
        (0.001, "1", 1),
        (0.0001, "1", 1),
        (0.0, "1", 0),  # a denial decided at the instant refill covers it: still at least 1 s
        (1.0, "1", 1000),
        (2.0, "2", 2000),
        (2.001, "3", 2001),
        (2.5, "3", 2500),
        (59.999, "60", 59999),
        (0.1 * 3, "1", 300),  # 0.30000000000000004 must not become 301 ms
        (3.2, "4", 3200),
        (86400.0, "86400", 86_400_000),
    ],
)
def test_retry_after_rounding(seconds: float, header: str, ms: int) -> None:
    exc = RateLimitExceeded([status(retry=seconds)])
    assert exc.retry_after_header == header
    assert exc.retry_after_ms == ms
    assert isinstance(exc.retry_after_ms, int)


@given(st.integers(min_value=0, max_value=10**12))
def test_retry_after_from_integer_ms(ms: int) -> None:
    exc = RateLimitExceeded([status(retry=ms / 1000)])
    assert exc.retry_after_ms == ms
    assert exc.retry_after_header == str(max(1, -(-ms // 1000)))
    assert retry_after(exc) == int(exc.retry_after_header or "0") >= 1  # one definition


def test_never_satisfiable_violation() -> None:
    finite = status("rpm", available=0, requested=1, retry=5.0)
    never = status("tpm", available=1000, requested=5000, retry=None)
    exc = RateLimitExceeded([finite, never])
    assert exc.primary_violation is never
    assert exc.retry_after_seconds is None
    assert exc.retry_after_ms is None
    assert exc.retry_after_header is None
    assert not exc.retryable
    assert "can never succeed" in str(exc)
    body = exc.as_dict()
    assert body["retry_after_seconds"] is None
    assert body["retry_after_ms"] is None
    text = json.dumps(body, allow_nan=False)
    assert json.loads(text)["limits"][1]["retry_after_seconds"] is None


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_retry_is_treated_as_never(bad: float) -> None:
    exc = RateLimitExceeded([status(retry=1.0), status("rpm", retry=bad)])
    assert exc.retry_after_seconds is None
    json.dumps(exc.as_dict(), allow_nan=False)


def test_as_dict_json_round_trip() -> None:
    exc = RateLimitExceeded([status(), status("rpm", available=5, requested=1, retry=0.0)])
    body = exc.as_dict()
    assert body == {
        "error": "rate_limit_exceeded",
        "message": str(exc),
        "retry_after_seconds": 3.2,
        "retry_after_ms": 3200,
        "limits": [
            {
                "entity_id": "k1",
                "resource": "gpt-4",
                "limit_name": "tpm",
                "capacity": 1000,
                "burst": 1000,
                "available": 10,
                "requested": 500,
                "exceeded": True,
                "retry_after_seconds": 3.2,
            },
            {
                "entity_id": "k1",
                "resource": "gpt-4",
                "limit_name": "rpm",
                "capacity": 1000,
                "burst": 1000,
                "available": 5,
                "requested": 1,
                "exceeded": False,
                "retry_after_seconds": 0.0,
            },
        ],
    }
    assert json.loads(json.dumps(body, allow_nan=False)) == body


retries = st.one_of(
    st.none(), st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False)
)


@given(st.lists(st.tuples(st.booleans(), retries), max_size=6))
def test_rate_limit_exceeded_properties(specs: list[tuple[bool, float | None]]) -> None:
    statuses = [
        status(f"l{i}", retry=(r if exceeded else 0.0), exceeded=exceeded)
        for i, (exceeded, r) in enumerate(specs)
    ]
    violations = [s for s in statuses if s.exceeded]
    if not violations:
        with pytest.raises(ValueError):
            RateLimitExceeded(statuses)
        return
    exc = RateLimitExceeded(statuses)
    assert exc.violations == violations
    assert len(exc.passed) + len(exc.violations) == len(statuses)
    waits = [s.retry_after_seconds for s in violations]
    if None in waits:
        assert exc.retry_after_seconds is None
        assert exc.primary_violation is not None
        assert exc.primary_violation.retry_after_seconds is None
    else:
        assert exc.retry_after_seconds == max(w for w in waits if w is not None)
        assert exc.primary_violation is not None
        assert exc.primary_violation.retry_after_seconds == exc.retry_after_seconds
        assert exc.retry_after_ms is not None
        assert exc.retry_after_ms >= exc.retry_after_seconds * 1000 - 1e-6
        assert int(exc.retry_after_header or "0") >= 1
    json.dumps(exc.as_dict(), allow_nan=False)
    clone = pickle.loads(pickle.dumps(exc))
    assert clone.as_dict() == exc.as_dict()


# ---------------------------------------------------------------------------
# Other exceptions: attributes and messages
# ---------------------------------------------------------------------------


def test_rate_limiter_unavailable() -> None:
    cause = ConnectionError("boom")
    exc = RateLimiterUnavailable("DynamoDB unavailable", cause)
    assert exc.cause is cause
    assert str(exc) == "DynamoDB unavailable"
    clone = pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
    assert isinstance(clone.cause, ConnectionError)
    assert str(clone.cause) == "boom"
    exc = RateLimiterUnavailable("down", stack_name="ZAEL-x", entity_id="k1", resource="gpt-4")
    assert exc.cause is None
    assert exc.table_name == "ZAEL-x"
    assert str(exc) == "down [stack=ZAEL-x, entity=k1, resource=gpt-4]"


def test_entity_errors() -> None:
    nf = EntityNotFoundError("k1")
    ex = EntityExistsError("k2")
    assert nf.entity_id == "k1"
    assert ex.entity_id == "k2"
    assert "k1" in str(nf)
    assert "k2" in str(ex)
    assert isinstance(nf, EntityError)
    assert isinstance(ex, EntityError)


def test_validation_error() -> None:
    exc = ValidationError("capacity", -1, "must be positive")
    assert (exc.field, exc.value, exc.reason) == ("capacity", -1, "must be positive")
    assert str(exc) == "Invalid capacity: must be positive"
    assert isinstance(exc, ValueError)
    assert isinstance(exc, ZAELimiterError)
    assert issubclass(InvalidIdentifierError, ValidationError)
    assert issubclass(InvalidNameError, ValidationError)


def test_version_mismatch_message() -> None:
    exc = VersionMismatchError("1.2.0", "1.0.0", "1.0.0", "Lambda update available.")
    assert str(exc) == (
        "Version mismatch: client=1.2.0, schema=1.0.0, lambda=1.0.0. Lambda update available."
    )
    assert exc.client_version == "1.2.0"
    assert exc.schema_version == "1.0.0"
    assert exc.lambda_version == "1.0.0"
    assert exc.can_auto_update is False
    default = VersionMismatchError("1.2.0", "1.0.0", None)
    assert "lambda=unknown" in str(default)
    assert str(default).endswith(".")
    assert isinstance(exc, VersionError)


def test_incompatible_schema_message() -> None:
    exc = IncompatibleSchemaError("2.0.0", "1.0.0")
    assert str(exc) == (
        "Incompatible schema: client 2.0.0 is not compatible with schema 1.0.0. Migration required."
    )
    with_url = IncompatibleSchemaError("2.0.0", "1.0.0", "Run migrate.", "https://x/y")
    assert str(with_url).endswith("Run migrate. See: https://x/y")
    assert with_url.migration_guide_url == "https://x/y"


def test_minimum_client_version() -> None:
    exc = MinimumClientVersionError("0.9.0", "1.1.0", "1.1.0", "1.1.0")
    assert isinstance(exc, VersionMismatchError)
    assert exc.minimum_client_version == "1.1.0"
    assert exc.client_version == "0.9.0"
    assert exc.can_auto_update is False
    assert "pip install --upgrade zae-limiter" in str(exc)
    assert "1.1.0" in str(exc)


def test_infrastructure_errors() -> None:
    sc = StackCreationError("ZAEL-x", "ROLLBACK_COMPLETE", [{"ResourceStatus": "FAILED"}])
    assert (sc.stack_name, sc.reason) == ("ZAEL-x", "ROLLBACK_COMPLETE")
    assert sc.events == [{"ResourceStatus": "FAILED"}]
    assert str(sc) == "Stack ZAEL-x creation failed: ROLLBACK_COMPLETE"
    assert StackCreationError("s", "r").events == []
    assert issubclass(StackAlreadyExistsError, StackCreationError)
    nf = InfrastructureNotFoundError("ZAEL-x")
    assert nf.name == nf.stack_name == nf.table_name == "ZAEL-x"
    assert "zae-limiter deploy" in str(nf)
    custom = InfrastructureNotFoundError("ZAEL-x", "Table is missing.")
    assert str(custom) == "Infrastructure not found for 'ZAEL-x'. Table is missing."
    assert isinstance(nf, InfrastructureError)


# ---------------------------------------------------------------------------
# Pickling
# ---------------------------------------------------------------------------


def _all_exceptions() -> list[ZAELimiterError]:
    return [
        ZAELimiterError("base"),
        RateLimitError("rl"),
        EntityError("e"),
        InfrastructureError("i"),
        VersionError("v"),
        RateLimitExceeded([status(), status("rpm", available=9, requested=1, retry=0.0)]),
        RateLimitExceeded([status(retry=None)]),
        RequestTooLarge([status(retry=None)], "consume.tpm", 10**6),
        ConfigurationError("AccessDeniedException", "not authorized", TypeError("boom")),
        # Not an OSError subclass: CPython itself unpickles those as plain OSError at protocols < 3.
        RateLimiterUnavailable("down", TypeError("boom"), stack_name="ZAEL-x"),
        RateLimiterUnavailable("down"),
        ResourceDisabled("gpt-4", "k1", "resource", "gpt-4", 30.0),
        ResourceDisabled("gpt-4", "k1", "entity", "proj", 30.0),
        EntityNotFoundError("k1"),
        EntityExistsError("k1"),
        StackCreationError("ZAEL-x", "failed", [{"a": "b"}]),
        StackAlreadyExistsError("ZAEL-x", "exists"),
        InfrastructureNotFoundError("ZAEL-x"),
        InfrastructureNotFoundError("ZAEL-x", "custom"),
        VersionMismatchError("1.2.0", "1.0.0", "1.0.0", "Lambda update available.", True),
        MinimumClientVersionError("0.9.0", "1.1.0", "1.1.0"),
        IncompatibleSchemaError("2.0.0", "1.0.0", None, "https://x"),
        ValidationError("capacity", -1, "must be positive"),
        InvalidIdentifierError("entity_id", "a#b", "no #"),
        InvalidNameError("resource", None, "must be a string"),
    ]


def test_every_public_exception_is_covered() -> None:
    covered = {type(e) for e in _all_exceptions()}
    public = {
        obj
        for name in exc_mod.__all__
        if isinstance(obj := getattr(exc_mod, name), type) and issubclass(obj, BaseException)
    }
    assert public == covered


@pytest.mark.parametrize("exc", _all_exceptions(), ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip(exc: ZAELimiterError, protocol: int) -> None:
    clone = pickle.loads(pickle.dumps(exc, protocol=protocol))
    assert type(clone) is type(exc)
    assert str(clone) == str(exc)
    assert clone.args == exc.args
    original: dict[str, Any] = vars(exc)
    restored: dict[str, Any] = vars(clone)
    assert restored.keys() == original.keys()
    for key, value in original.items():
        if isinstance(value, BaseException):
            assert type(restored[key]) is type(value)
            assert str(restored[key]) == str(value)
        else:
            assert restored[key] == value, key


def test_pickled_rate_limit_exceeded_keeps_behaviour() -> None:
    exc = RateLimitExceeded([status(retry=2.001)])
    clone = pickle.loads(pickle.dumps(exc))
    assert clone.retry_after_header == "3"
    assert clone.as_dict() == exc.as_dict()
    assert clone.primary_violation == exc.primary_violation


def test_unpicklable_cause_is_replaced_not_fatal() -> None:
    class Holder(Exception):
        def __init__(self) -> None:
            super().__init__("holds a lock")
            self.lock = threading.Lock()

    exc = RateLimiterUnavailable("down", Holder())
    clone = pickle.loads(pickle.dumps(exc))
    assert isinstance(clone.cause, RuntimeError)
    assert "Holder" in str(clone.cause)
    assert "holds a lock" in str(clone.cause)
    assert isinstance(exc.cause, Holder)


def test_unpicklable_validation_value_becomes_repr() -> None:
    lock = threading.Lock()
    exc = ValidationError("entity_id", lock, "must be a string")
    clone = pickle.loads(pickle.dumps(exc))
    assert clone.value == repr(lock)
    assert clone.field == "entity_id"


def test_pickle_keeps_notes() -> None:
    exc = EntityNotFoundError("k1")
    exc.add_note("while acquiring")
    clone = pickle.loads(pickle.dumps(exc))
    assert clone.__notes__ == ["while acquiring"]


def test_client_dict_reveals_nothing_about_a_parent() -> None:
    limit = Limit.per_minute("tpm", 1_000)
    own = LimitStatus("key-1", "gpt-4", "tpm", limit, 400, 100, False, 0.0)
    parent = LimitStatus("secret-project", "gpt-4", "tpm", Limit.per_minute("tpm", 99_000),
                         3, 100, True, 4.5)
    exc = RateLimitExceeded([own, parent])
    body = exc.client_dict()
    text = json.dumps(body, allow_nan=False)
    assert "secret-project" not in text and "99000" not in text
    assert body["retry_after_seconds"] == 4.5
    mine, shared = body["limits"]
    assert (mine["limit_name"], mine["capacity"], mine["available"]) == ("tpm", 1_000, 400)
    assert "entity_id" not in mine
    assert shared == {"limit_name": "tpm", "shared": True, "exceeded": True,
                      "retry_after_seconds": 4.5}
    # the operator's view keeps everything
    assert "secret-project" in json.dumps(exc.as_dict())
    too_large = RequestTooLarge([LimitStatus("key-1", "gpt-4", "tpm", limit, 5, 2_000, True,
                                             None)], "consume.tpm", 2_000)
    assert too_large.client_dict()["reason"] == "request_exceeds_burst"
    assert too_large.client_dict()["retry_after_seconds"] is None


def test_resource_disabled_is_neither_a_denial_nor_an_outage() -> None:
    # Code catching denials (to wait) or outages (to fail open) must not catch a kill switch.
    exc = ResourceDisabled("gpt-4", "key", "entity", "proj", 2.5)
    assert isinstance(exc, RateLimitError)
    assert not isinstance(exc, RateLimitExceeded | RateLimiterUnavailable | ValidationError)
    assert (exc.resource, exc.entity_id, exc.disabled, exc.disabled_name) == (
        "gpt-4", "key", "entity", "proj")
    assert exc.recheck_seconds == 2.5
    assert "'proj', parent of 'key'" in str(exc)
    assert "resource 'gpt-4' is disabled" in str(
        ResourceDisabled("gpt-4", "key", "resource", "gpt-4", 1.0))
