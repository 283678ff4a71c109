"""`HttpOptions`: how the ASGI middleware and the FastAPI dependency limit requests.

One frozen object holds the settings both share, with their defaults, checked once when it is
made. `RateLimitMiddleware(app, limiter=..., options=...)` and `RateLimit(limiter=...,
options=...)` take one; their keywords of the same names build one, or with `options=` replace
some of its fields (`RateLimit(limiter=limiter, options=shared, resource="search")`).
docs/http.md lists the options.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ..arguments import check_limits
from ..exceptions import ValidationError
from ..models import FailureMode, Limit
from ..validation import validate_resource
from .fields import REQUESTS, check_units

__all__ = [
    "DEFAULT_HTTP_RESOURCE",
    "DEFAULT_MISSING_KEY",
    "UNSET",
    "HttpOptions",
    "KeyFunction",
    "MissingKey",
    "Unset",
    "check_missing_key",
]

Scope = MutableMapping[str, Any]

KeyFunction = Callable[[Scope], str | None]
"""`key(scope) -> entity id`, or None when the request carries no key."""

MissingKey = Literal["refuse", "pass"] | KeyFunction
"""What a request the key function gives None for gets: "refuse" (401), "pass" (unlimited), or
a fallback key function (None from it too: refused)."""



class Unset(enum.Enum):
    """The default of the constructors' keywords: the field is what `options=` says, or
    without it `HttpOptions`'s default. An enum member so that type checkers tell it apart."""

    UNSET = "unset"


UNSET: Final = Unset.UNSET

DEFAULT_HTTP_RESOURCE: Final = "http"
# Refusing is the default: a limiter that any client escapes by leaving out a header, or by
# connecting over a path with no client address, limits nobody who means harm.
DEFAULT_MISSING_KEY: Final = "refuse"


def check_missing_key(missing_key: object) -> MissingKey:
    """`missing_key` checked: "refuse", "pass" or a callable of the scope."""
    if missing_key in ("refuse", "pass") or callable(missing_key):
        return missing_key
    raise ValidationError(
        "missing_key", missing_key, 'must be "refuse", "pass" or a key function of the scope'
    )


@dataclass(frozen=True, kw_only=True)
class HttpOptions:
    """How a set of routes is limited (docs/http.md, "Options"). Every field is checked when
    the options are made, so a bad one fails at start-up, naming its field."""

    limits: Sequence[Limit] | None
    """The limits (None or empty with `use_stored_limits`: the entity's stored ones); kept as
    a tuple."""
    key: KeyFunction
    missing_key: MissingKey = DEFAULT_MISSING_KEY
    resource: str | Callable[[Scope], str] = DEFAULT_HTTP_RESOURCE
    cost: Callable[[Scope], Mapping[str, int]] | None = None
    """What one request takes; None: one of each limit that counts requests."""
    quota_units: Mapping[str, str] | None = None
    """`{limit name: unit}` of the limits that do not count requests; kept as a dict."""
    cascade: bool = False
    use_stored_limits: bool = False
    failure_mode: FailureMode | None = None
    deadline: float | None = None
    refund_on_server_error: bool = True
    partition_key: Callable[[Scope], bytes | None] | None = None
    too_large_status: int = 413
    unavailable_retry_after: int = 1
    fixed_cost: Mapping[str, int] | None = field(init=False, repr=False, compare=False)
    """The cost of every request when `cost` is None (else None)."""

    def __post_init__(self) -> None:
        if not callable(self.key):
            raise ValidationError("key", self.key, "must be a callable of the scope")
        if not isinstance(self.refund_on_server_error, bool):
            raise ValidationError(
                "refund_on_server_error", self.refund_on_server_error, "must be a bool"
            )
        self._set("missing_key", check_missing_key(self.missing_key))
        if not self.limits and not self.use_stored_limits:
            raise ValidationError("limits", self.limits, "give limits, or use_stored_limits=True")
        # Checked now: at run time a "limits" error can then only be "none stored" (a 403).
        limits = check_limits(self.limits or [], allow_empty=self.use_stored_limits)
        self._set("limits", tuple(limits))
        if isinstance(self.resource, str):
            validate_resource(self.resource)
        elif not callable(self.resource):
            raise ValidationError(
                "resource", self.resource, "must be a str or a callable of the scope"
            )
        units = check_units(self.quota_units)
        self._set("quota_units", units)
        fixed: dict[str, int] | None = None
        if self.cost is None:
            fixed = {lim.name: 1 for lim in limits if units.get(lim.name, REQUESTS) == REQUESTS}
            if not fixed:
                raise ValidationError("cost", self.cost, "no limit counts requests: give cost=")
        elif not callable(self.cost):
            raise ValidationError("cost", self.cost, "must be a callable of the scope, or None")
        self._set("fixed_cost", fixed)
        if self.too_large_status not in (400, 413, 422):
            raise ValidationError(
                "too_large_status", self.too_large_status, "must be 400, 413 or 422"
            )
        retry_after = self.unavailable_retry_after
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 1:
            raise ValidationError(
                "unavailable_retry_after", retry_after, "must be a whole second >= 1"
            )

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # frozen: only __post_init__ stores a checked form

    @classmethod
    def of(cls, options: HttpOptions | None, **given: Any) -> HttpOptions:
        """`options` with the keywords given (those not `UNSET`) in place of its fields, or
        options made of the keywords alone."""
        changes = {name: value for name, value in given.items() if value is not UNSET}
        if options is None:
            return cls(**changes)
        if not isinstance(options, HttpOptions):
            raise ValidationError("options", options, "must be an HttpOptions or None")
        return dataclasses.replace(options, **changes) if changes else options

    @property
    def units(self) -> Mapping[str, str]:
        """`quota_units` as checked (empty: every limit counts requests)."""
        return self.quota_units or {}

    def amounts(self, scope: Scope) -> Mapping[str, int]:
        """What this request takes."""
        if self.fixed_cost is not None:
            return self.fixed_cost
        assert self.cost is not None
        return self.cost(scope)

