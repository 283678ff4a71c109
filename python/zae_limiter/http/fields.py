"""What an HTTP layer says about a decision: the RateLimit fields and the problem bodies.

`RateLimit-Policy` and `RateLimit` follow draft-ietf-httpapi-ratelimit-headers-11 and are
serialized as RFC 9651 Structured Fields (Lists of Items whose value is a String). One policy per
limit of the requesting entity, named by the limit:

    RateLimit-Policy: "rpm";q=100;w=60, "tpm";q=10000;qu="tokens";w=60
    RateLimit: "rpm";r=99;t=1, "tpm";r=9500;t=1

- `q`/`w`: what the limit grants per window: its refill amount per refill period (seconds).
- `qu`: the quota unit. Omitted for limits that count requests (the draft's default); any other
  unit (an LLM's "tokens") is written out. "tokens" is not in the draft's quota unit registry
  (draft-11 registers "requests", "content-bytes", "concurrent-requests", and a new unit needs a
  specification): a client that only knows registered units may ignore those items.
- `r`: whole units available now (never negative: an over-consumed bucket reports 0).
- `t`: the draft's effective window, "the time within which the client can use no more than the
  available quota". A token bucket has no reset instant; until the limit regains one whole unit
  beyond `r`, no more than `r` can be used, so `t` is that wait, in whole seconds rounded up.
  For a denied request it is never later than `Retry-After`, as the draft asks. A quota does
  have a reset instant: its `t` is the time until its window resets, and its `w` the window
  (a cron quota's longest, `Limit.refill_period_seconds`; a session quota's `reset_after`).
- A concurrency cap has neither refill nor window: its `q` is `max_in_flight`, its `qu` the
  draft's registered "concurrent-requests" (unless the application names another unit), its
  `w` omitted (optional in the draft; a `lease_ttl` is no window), its `r` the free slots and
  its `t` the cap's retry hint (the earliest expiry among its holders, at most 1 s: a slot may
  come back any time a holder ends, so no longer promise is true).
- `pk`: an optional partition key (a Byte Sequence) the application chooses.

A parent's limits (cascade) never appear in the fields: another entity's quota and remaining
tokens are not the client's to see. The problem bodies (RFC 9457) show them only as anonymous
shared limits, through `RateLimitExceeded.client_dict()`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..core import units
from ..exceptions import RateLimitExceeded, RequestTooLarge, ResourceDisabled, ValidationError
from ..models import Limit, LimitStatus

__all__ = [
    "CONCURRENT_REQUESTS",
    "PROBLEM_JSON",
    "QUOTA_EXCEEDED",
    "REQUESTS",
    "Refusal",
    "check_units",
    "effective_window",
    "fields",
    "policy_field",
    "ratelimit_field",
    "retry_after",
]

PROBLEM_JSON: Final = "application/problem+json"
# The draft's problem type for requests over a quota (section 5.1), and its registered title.
QUOTA_EXCEEDED: Final = "https://iana.org/assignments/http-problem-types#quota-exceeded"
QUOTA_EXCEEDED_TITLE: Final = "Quota Exceeded"
REQUESTS: Final = "requests"
CONCURRENT_REQUESTS: Final = "concurrent-requests"

# RFC 9651 Integers have at most 15 digits.
_SF_INT_MAX: Final = 999_999_999_999_999
_UNIT_RE: Final = re.compile(r"[a-z][a-z0-9-]{0,63}")


def check_units(units: Mapping[str, str] | None, field: str = "quota_units") -> dict[str, str]:
    """`{limit name: quota unit}`; a limit not named counts requests."""
    if units is None:
        return {}
    if not isinstance(units, Mapping):
        raise ValidationError(field, units, "must be a mapping of limit name to quota unit")
    checked: dict[str, str] = {}
    for name, unit in units.items():
        if not isinstance(name, str) or not isinstance(unit, str) or not _UNIT_RE.fullmatch(unit):
            raise ValidationError(
                f"{field}.{name}", unit, "a quota unit is lowercase letters, digits and '-'"
            )
        checked[name] = unit
    return checked


def _sf_int(value: int) -> int:
    return -_SF_INT_MAX if value < -_SF_INT_MAX else _SF_INT_MAX if value > _SF_INT_MAX else value


def _sf_bytes(value: bytes) -> str:
    return ":" + base64.b64encode(value).decode("ascii") + ":"


# Limit names (validation.validate_name) and quota units (`check_units`) are ASCII letters,
# digits and `_ . -`: as Structured Field Strings they need no escaping.


def effective_window(limit: Limit, available: int) -> int:
    """Whole seconds, rounded up, until `limit` holds one whole unit more than it reports now
    (`available` whole units, negative after over-consumption), at the limit's rate (the core
    refills continuously, docs/design.md section 1). An upper bound, since whole units do not
    tell how much of the next unit has already come back."""
    needed_milli = units.to_milli((available if available > 0 else 0) + 1 - available)
    wait_ms = -(-needed_milli * limit.refill_period_ms // limit.refill_amount_milli)
    return units.whole_seconds_up(wait_ms)


def policy_field(
    statuses: Sequence[LimitStatus],
    units: Mapping[str, str],
    partition_key: bytes | None = None,
) -> str:
    """`RateLimit-Policy` for the limits of `statuses` (one entity's)."""
    pk = "" if partition_key is None else ";pk=" + _sf_bytes(partition_key)
    items = []
    for status in statuses:
        limit = status.limit
        if limit.is_concurrency:
            unit = units.get(status.limit_name, CONCURRENT_REQUESTS)
            items.append(f'"{status.limit_name}";q={_sf_int(limit.capacity)};qu="{unit}"{pk}')
            continue
        unit = units.get(status.limit_name, REQUESTS)
        qu = "" if unit == REQUESTS else f';qu="{unit}"'
        q, w = _sf_int(limit.refill_amount), _sf_int(limit.refill_period_seconds)
        items.append(f'"{status.limit_name}";q={q}{qu};w={w}{pk}')
    return ", ".join(items)


def ratelimit_field(
    statuses: Sequence[LimitStatus],
    partition_key: bytes | None = None,
    retry_after_seconds: int | None = None,
) -> str:
    """`RateLimit` for the limits of `statuses` (one entity's). With a `Retry-After`, no window
    ends later than it (the draft's rule; a shorter window is still a true statement)."""
    pk = "" if partition_key is None else ";pk=" + _sf_bytes(partition_key)
    items = []
    for status in statuses:
        available = status.available
        if status.reset_seconds is not None:
            # A quota: nothing comes back before its window resets, all of it then. A cap: its
            # retry hint (`engine.slots.retry_ms`), never a refill it does not have.
            window = units.whole_seconds_up(round(status.reset_seconds * units.MS_PER_SECOND))
        else:
            window = effective_window(status.limit, available)
        if retry_after_seconds is not None and window > retry_after_seconds:
            window = retry_after_seconds
        r = _sf_int(available if available > 0 else 0)
        items.append(f'"{status.limit_name}";r={r};t={_sf_int(window)}{pk}')
    return ", ".join(items)


def retry_after(exc: RateLimitExceeded) -> int | None:
    """`Retry-After` for a denial (`RateLimitExceeded.retry_after_header`, as a number); None
    when no wait helps (the request exceeds a burst)."""
    header = exc.retry_after_header
    return None if header is None else int(header)


def fields(
    statuses: Sequence[LimitStatus],
    entity_id: str | None,
    units: Mapping[str, str],
    partition_key: bytes | None = None,
    retry_after_seconds: int | None = None,
) -> list[tuple[str, str]]:
    """Both fields for the limits of `entity_id` among `statuses` (none: no fields)."""
    own = [s for s in statuses if s.entity_id == entity_id]
    if not own:
        return []
    return [
        ("ratelimit-policy", policy_field(own, units, partition_key)),
        ("ratelimit", ratelimit_field(own, partition_key, retry_after_seconds)),
    ]


@dataclass(frozen=True)
class Refusal:
    """A response that refuses a request: its status, header fields and problem+json body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @classmethod
    def problem(
        cls, status: int, problem: Mapping[str, Any], headers: Sequence[tuple[str, str]] = ()
    ) -> Refusal:
        body = json.dumps(problem, separators=(",", ":")).encode()
        return cls(
            status,
            [
                *headers,
                ("content-type", PROBLEM_JSON),
                ("content-length", str(len(body))),
            ],
            body,
        )

    @classmethod
    def exceeded(
        cls,
        exc: RateLimitExceeded,
        entity_id: str,
        units: Mapping[str, str],
        partition_key: bytes | None = None,
        too_large_status: int = 413,
    ) -> Refusal:
        """429 with `Retry-After` for a denial; `too_large_status` (no `Retry-After`: no wait
        helps) for a request no limit could ever admit. Both with the fields."""
        too_large = isinstance(exc, RequestTooLarge)
        status = too_large_status if too_large else 429
        wait = None if too_large else retry_after(exc)
        headers = fields(exc.statuses, entity_id, units, partition_key, wait)
        if wait is not None:
            headers.insert(0, ("retry-after", str(wait)))
        client = exc.client_dict()
        problem: dict[str, Any] = {
            "type": QUOTA_EXCEEDED,
            "title": QUOTA_EXCEEDED_TITLE,
            "status": status,
            "detail": client["message"],
            "violated-policies": [v.limit_name for v in exc.violations if v.entity_id == entity_id],
            "retry_after_seconds": client["retry_after_seconds"],
            "retry_after_ms": client["retry_after_ms"],
            "limits": client["limits"],
        }
        if too_large:
            problem["reason"] = client["reason"]
        return cls.problem(status, problem, headers)

    @classmethod
    def unavailable(cls, retry_after_seconds: int) -> Refusal:
        """503 for a limiter that cannot decide (FAIL_CLOSED): nothing about the cause."""
        return cls.problem(
            503,
            {
                "type": "about:blank",
                "title": "Service Unavailable",
                "status": 503,
                "detail": "The rate limiter cannot decide now; retry later.",
            },
            [("retry-after", str(retry_after_seconds))],
        )

    @classmethod
    def disabled(cls, exc: ResourceDisabled) -> Refusal:
        """503 for a request an operator's kill switch refuses (`ResourceDisabled`): the service
        is off on purpose, for everyone or for this key. `Retry-After` is the limiter's switch
        TTL in whole seconds (at least 1): this server reads the switches again within it, so an
        earlier retry would most likely meet the same answer. No key, no entity id."""
        retry = max(1, units.whole_seconds_up(round(exc.recheck_seconds * units.MS_PER_SECOND)))
        if exc.disabled == "resource":
            detail = "This resource is disabled by its operator."
        else:
            detail = "Requests with this key are disabled by its operator."
        return cls.problem(
            503,
            {
                "type": "about:blank",
                "title": "Service Unavailable",
                "status": 503,
                "detail": detail,
                "reason": "disabled",
            },
            [("retry-after", str(retry))],
        )

    @classmethod
    def _blank(cls, status: int, title: str, detail: str) -> Refusal:
        # The request's key never appears: it is often a credential.
        return cls.problem(
            status, {"type": "about:blank", "title": title, "status": status, "detail": detail}
        )

    @classmethod
    def bad_key(cls) -> Refusal:
        """400 for a request whose rate-limit key is not a valid entity id."""
        return cls._blank(
            400, "Bad Request", "The request's rate-limit key is not a valid identifier."
        )

    @classmethod
    def missing_key(cls) -> Refusal:
        """401 for a request that carries no rate-limit key (`missing_key="refuse"`)."""
        return cls._blank(401, "Unauthorized", "The request carries no rate-limit key.")

    @classmethod
    def unknown_key(cls) -> Refusal:
        """401 for a key that names no known entity (`cascade=True`: its parent is looked up)."""
        return cls._blank(401, "Unauthorized", "The request's rate-limit key is not known.")

    @classmethod
    def no_limits(cls) -> Refusal:
        """403 for a key with no stored limits (`use_stored_limits=True`, no `limits`)."""
        return cls._blank(403, "Forbidden", "No rate limit is granted to this key.")

    @classmethod
    def bad_resource(cls) -> Refusal:
        """400 for a request whose resource (derived from the request) is not a valid name."""
        return cls._blank(
            400, "Bad Request", "The request's rate-limit resource is not a valid name."
        )
