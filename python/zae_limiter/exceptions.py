"""Exceptions raised by zae-limiter.

Every exception derives from :class:`ZAELimiterError`, grouped under category bases
(:class:`RateLimitError`, :class:`EntityError`, :class:`InfrastructureError`,
:class:`VersionError`, :class:`ValidationError`) so callers can catch as broadly as they need.
"""

from __future__ import annotations

import math
import pickle
from typing import TYPE_CHECKING, Any

from .core import units

if TYPE_CHECKING:
    from .models import LimitStatus

__all__ = [
    "ConfigurationError",
    "EntityError",
    "EntityExistsError",
    "EntityNotFoundError",
    "IncompatibleSchemaError",
    "InfrastructureError",
    "InfrastructureNotFoundError",
    "InvalidIdentifierError",
    "InvalidNameError",
    "MinimumClientVersionError",
    "RateLimitError",
    "RateLimitExceeded",
    "RateLimiterUnavailable",
    "RequestTooLarge",
    "ResourceDisabled",
    "StackAlreadyExistsError",
    "StackCreationError",
    "ValidationError",
    "VersionError",
    "VersionMismatchError",
    "ZAELimiterError",
]


def _restore(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    # Bypass __init__: the constructors take structured arguments, but `args` only holds the
    # formatted message, so the default BaseException unpickling (cls(*args)) would fail.
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def _picklable(value: Any) -> Any:
    # A worker must always be able to send the error back, even when it carries something that
    # cannot cross a process boundary (a client-library exception holding a socket, say); the
    # stand-in keeps the information that matters for a human reading it.
    try:
        pickle.dumps(value)
    except Exception:
        if isinstance(value, BaseException):
            return RuntimeError(f"{type(value).__name__}: {value}")
        return repr(value)
    return value


class ZAELimiterError(Exception):
    """Base class of every exception raised by zae-limiter."""

    def __reduce__(self) -> tuple[Any, ...]:
        state = {k: _picklable(v) for k, v in self.__dict__.items()}
        return (_restore, (type(self), self.args, state))


# ---------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------


class RateLimitError(ZAELimiterError):
    """Base class for rate-limiting outcomes (exceeded, limiter unavailable, disabled)."""


class EntityError(ZAELimiterError):
    """Base class for entity lookups and creation."""


class InfrastructureError(ZAELimiterError):
    """Base class for problems with the deployed table, stack or Lambda."""


class VersionError(ZAELimiterError):
    """Base class for client / infrastructure version incompatibilities."""


# ---------------------------------------------------------------------------
# Rate limiting
# ---------------------------------------------------------------------------


def _finite_or_none(seconds: float | None) -> float | None:
    # A non-finite retry time can only mean "never"; normalising here keeps inf/NaN out of
    # JSON bodies and integer conversions.
    if seconds is None or not math.isfinite(seconds):
        return None
    return float(seconds)


def _ceil_ms(seconds: float) -> int:
    # Retry times come from integer milliseconds divided by 1000, so seconds*1000 can land a few
    # ulps above an integer (0.1 * 3 * 1000 = 300.00000000000006); that must not add a
    # millisecond, while any genuine fraction of a millisecond still rounds up.
    x = seconds * 1000
    nearest = round(x)
    if abs(x - nearest) <= 4 * math.ulp(x):
        return int(nearest)
    return math.ceil(x)


def _format_seconds(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


class RateLimitExceeded(RateLimitError):
    """One or more limits would be exceeded by the request.

    Carries the status of *every* limit that was checked, so callers see the whole picture.

    Attributes:
        entity_id: the entity that asked (its limits are its own in ``client_dict``; any other
            entity's, a cascade parent's, are shown as anonymous shared limits).
        statuses: all checked limits (a soft limit past its allowance is ``exceeded`` too).
        violations: the exceeded hard limits: what denied the request.
        passed: the others (soft limits included, exceeded or not).
        primary_violation: the violation with the longest wait (a never-satisfiable violation
            counts as the longest); ``None`` without violations.
        retry_after_seconds: seconds until every violation can be satisfied; ``0.0`` without
            violations; ``None`` when some request exceeds its limit's burst and so can never
            succeed (retrying is pointless).
    """

    def __init__(self, statuses: list[LimitStatus], *, entity_id: str | None = None) -> None:
        self.statuses: list[LimitStatus] = list(statuses)
        # Who asked: the first status's entity unless said (a denial by a parent's cap alone
        # holds only the parent's status, which the requester must not see in full).
        self.entity_id: str | None = entity_id or (statuses[0].entity_id if statuses else None)
        # A soft limit past its allowance is reported `exceeded` but denies nothing.
        self.violations: list[LimitStatus] = [
            s for s in self.statuses if s.exceeded and not s.limit.soft
        ]
        self.passed: list[LimitStatus] = [
            s for s in self.statuses if not s.exceeded or s.limit.soft
        ]
        if not self.violations:
            # A denial that names no exceeded limit would tell the caller nothing to act on.
            raise ValueError("RateLimitExceeded requires at least one violation")

        self.primary_violation: LimitStatus | None = None
        self.retry_after_seconds: float | None = 0.0
        best = -1.0
        for v in self.violations:
            wait = _finite_or_none(v.retry_after_seconds)
            key = math.inf if wait is None else wait
            if key > best:
                best = key
                self.primary_violation = v
                self.retry_after_seconds = wait
        # Not super(): in `RequestTooLarge` the next class is `ValidationError`, whose
        # constructor wants a field; the message is all `Exception` needs.
        Exception.__init__(self, self._format_message())

    @property
    def retryable(self) -> bool:
        """False when some violation can never be satisfied, whatever the wait."""
        return self.retry_after_seconds is not None

    @property
    def retry_after_ms(self) -> int | None:
        """``retry_after_seconds`` in whole milliseconds, rounded up."""
        if self.retry_after_seconds is None:
            return None
        return _ceil_ms(self.retry_after_seconds)

    @property
    def retry_after_header(self) -> str | None:
        """Value for an HTTP ``Retry-After`` header: whole seconds, rounded up, at least 1 (a
        429 saying 0 would invite an immediate retry that the same bucket refuses again).

        ``None`` when retrying can never succeed: the header should then be omitted. The one
        definition of Retry-After: the HTTP layer's fields use it too.
        """
        ms = self.retry_after_ms
        if ms is None:
            return None
        # From the integer milliseconds, so header and retry_after_ms never disagree.
        return str(max(1, units.whole_seconds_up(ms)))

    def _format_message(self) -> str:
        # Cascaded checks mix the entity's and its parent's limits; group so each
        # (entity, resource) is named once.
        groups: dict[tuple[str, str], list[str]] = {}
        for v in self.violations:
            groups.setdefault((v.entity_id, v.resource), []).append(
                f"{v.limit_name} (available {v.available}, requested {v.requested})"
            )
        parts = [
            f"entity '{entity}' resource '{resource}': {', '.join(items)}"
            for (entity, resource), items in groups.items()
        ]
        if self.retry_after_seconds is None:
            tail = "request exceeds the limit's burst and can never succeed"
        else:
            tail = f"retry after {_format_seconds(self.retry_after_seconds)}s"
        return f"Rate limit exceeded for {'; '.join(parts)}; {tail}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready body for a 429 response (``json.dumps`` always succeeds)."""
        return {
            "error": "rate_limit_exceeded",
            "message": str(self),
            "retry_after_seconds": self.retry_after_seconds,
            "retry_after_ms": self.retry_after_ms,
            "limits": [s.as_dict() for s in self.statuses],
        }

    def client_dict(self) -> dict[str, Any]:
        """JSON-ready body safe to return to the client that was denied: its own limits in full,
        a parent's (cascade) only as an anonymous shared limit: no id, capacity or remaining
        tokens of another entity. `as_dict()` is the operator's view, for logs."""
        own = self.entity_id
        limits: list[dict[str, Any]] = []
        for status in self.statuses:
            if status.entity_id == own:
                view = status.as_dict()
                view.pop("entity_id", None)
                limits.append(view)
            else:
                retry = _finite_or_none(status.retry_after_seconds)
                limits.append({
                    "limit_name": status.limit_name,
                    "shared": True,
                    "exceeded": status.exceeded,
                    "retry_after_seconds": retry if status.exceeded else 0.0,
                })
        if self.retry_after_seconds is None:
            message = "Rate limit exceeded: the request exceeds a limit and can never succeed"
        else:
            wait = _format_seconds(self.retry_after_seconds)
            message = f"Rate limit exceeded; retry after {wait}s"
        return {
            "error": "rate_limit_exceeded",
            "message": message,
            "retry_after_seconds": self.retry_after_seconds,
            "retry_after_ms": self.retry_after_ms,
            "limits": limits,
        }


class RateLimiterUnavailable(RateLimitError):
    """The backing store could not be reached and the limiter fails closed.

    A transient infrastructure problem, not a rate-limit decision.

    Attributes:
        cause: the storage error behind it (DynamoDB unreachable, past the deadline, throttled
            or failing past the retries); ``None`` when DynamoDB answered but other clients'
            conflicting writes kept every write of this one from landing.
        stack_name: the limiter's stack (table) name, when known.
        table_name: the same as ``stack_name`` (zae-limiter 0.x's name for it).
        entity_id: the acquire's entity, when the error came from one.
        resource: the acquire's resource, when the error came from one.
    """

    def __init__(
        self,
        message: str,
        cause: BaseException | None = None,
        *,
        stack_name: str | None = None,
        entity_id: str | None = None,
        resource: str | None = None,
    ) -> None:
        self.cause = cause
        self.stack_name = stack_name
        self.table_name = stack_name  # 0.x name for the same thing
        self.entity_id = entity_id
        self.resource = resource
        context = [
            f"{label}={value}"
            for label, value in (
                ("stack", stack_name),
                ("entity", entity_id),
                ("resource", resource),
            )
            if value
        ]
        super().__init__(f"{message} [{', '.join(context)}]" if context else message)


class ResourceDisabled(RateLimitError):
    """An operator's kill switch refuses the acquire: its resource, its entity or (with cascade)
    the entity's parent is disabled (docs/limits.md, "Kill switch"). Nothing is consumed.

    Neither a denial (`RateLimitExceeded`: no wait frees capacity) nor an outage
    (`RateLimiterUnavailable`): it is raised in every failure mode, `FAIL_OPEN` included, which
    admits only when DynamoDB cannot answer. `resource` and `entity_id` are the acquire's;
    `disabled` says what is switched off, "resource" or "entity", and `disabled_name` its name
    (the parent's id when the parent is). `recheck_seconds`: the limiter reads the switches again
    at most this long from now (its cache TTL), so an `enable` is seen within it.

    Attributes:
        resource: the acquire's resource.
        entity_id: the acquire's entity.
        disabled: what is switched off: ``"resource"`` or ``"entity"``.
        disabled_name: the disabled resource's or entity's name (the parent's id when the
            cascade parent is the one disabled).
        recheck_seconds: the longest time before the limiter reads the switches again.
    """

    def __init__(
        self,
        resource: str,
        entity_id: str,
        disabled: str,
        disabled_name: str,
        recheck_seconds: float,
    ) -> None:
        self.resource = resource
        self.entity_id = entity_id
        self.disabled = disabled
        self.disabled_name = disabled_name
        self.recheck_seconds = recheck_seconds
        if disabled == "resource":
            what = f"resource {resource!r} is disabled"
        elif disabled_name == entity_id:
            what = f"entity {entity_id!r} is disabled"
        else:
            what = f"entity {disabled_name!r}, parent of {entity_id!r}, is disabled"
        super().__init__(f"{what} by its operator (kill switch) [resource={resource}]")


# ---------------------------------------------------------------------------
# Entities
# ---------------------------------------------------------------------------


class EntityNotFoundError(EntityError):
    """The entity (or, with cascade, its parent) does not exist.

    Attributes:
        entity_id: the entity that was not found.
    """

    def __init__(self, entity_id: str) -> None:
        self.entity_id = entity_id
        super().__init__(f"Entity not found: {entity_id}")


class EntityExistsError(EntityError):
    """The entity to create already exists.

    Attributes:
        entity_id: the entity that exists.
    """

    def __init__(self, entity_id: str) -> None:
        self.entity_id = entity_id
        super().__init__(f"Entity already exists: {entity_id}")


# ---------------------------------------------------------------------------
# Infrastructure
# ---------------------------------------------------------------------------


class StackCreationError(InfrastructureError):
    """The infrastructure (the stack, or the table alone on a local endpoint) could not be
    created.

    Attributes:
        stack_name: the stack that failed.
        reason: why, as the deployment reported it.
        events: the deployment's events that explain it (may be empty).
    """

    def __init__(
        self, stack_name: str, reason: str, events: list[dict[str, Any]] | None = None
    ) -> None:
        self.stack_name = stack_name
        self.reason = reason
        self.events: list[dict[str, Any]] = list(events) if events else []
        super().__init__(f"Stack {stack_name} creation failed: {reason}")


class StackAlreadyExistsError(StackCreationError):
    """The stack already exists (informational; creation was not needed)."""


class ConfigurationError(InfrastructureError):
    """DynamoDB refused the request for a reason no retry and no failure mode can fix: the
    credentials are missing, unknown or expired, a permission is missing, the region is not set,
    or the request is malformed. Raised in every failure mode: `FAIL_OPEN` admits only when
    DynamoDB cannot be reached, never on a misconfiguration.

    Attributes:
        code: the cause as DynamoDB or the client library named it (e.g.
            ``AccessDeniedException``, ``UnrecognizedClientException``, ``NoCredentialsError``).
        cause: the underlying exception.
    """

    def __init__(self, code: str, message: str, cause: BaseException | None = None) -> None:
        self.code = code
        self.cause = cause
        super().__init__(f"DynamoDB refused the request ({code}): {message}")


class InfrastructureNotFoundError(InfrastructureError):
    """The table / stack has not been deployed.

    Attributes:
        name: the stack (table) name.
        stack_name: the same (zae-limiter 0.x's name for it).
        table_name: the same (the stack and its table share one name).
    """

    def __init__(
        self,
        stack_name: str | None = None,
        message: str | None = None,
        *,
        name: str | None = None,
    ) -> None:
        # `stack_name` is 0.x's keyword; `name` the one this project used first.
        if stack_name is None and name is None:
            raise TypeError("InfrastructureNotFoundError needs the stack (table) name")
        name = stack_name if stack_name is not None else name
        assert name is not None
        self.name = name
        # 0.x exposed both; the stack and its table share one name.
        self.stack_name = name
        self.table_name = name
        hint = (
            message
            if message is not None
            else "Run 'zae-limiter deploy' or pass stack_options=StackOptions()."
        )
        super().__init__(f"Infrastructure not found for '{name}'. {hint}")


# ---------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------


class VersionMismatchError(VersionError):
    """Client and deployed infrastructure versions differ and were not reconciled.

    Attributes:
        client_version: this client's version.
        schema_version: the deployed table's schema version.
        lambda_version: the deployed aggregator's version; ``None`` when unknown.
        can_auto_update: whether updating the infrastructure from this client
            (``auto_update``) would reconcile them.
    """

    def __init__(
        self,
        client_version: str,
        schema_version: str,
        lambda_version: str | None,
        message: str | None = None,
        can_auto_update: bool = False,
    ) -> None:
        self.client_version = client_version
        self.schema_version = schema_version
        self.lambda_version = lambda_version
        self.can_auto_update = can_auto_update
        detail = message if message is not None else "Infrastructure update required."
        super().__init__(
            f"Version mismatch: client={client_version}, schema={schema_version}, "
            f"lambda={lambda_version or 'unknown'}. {detail}"
        )


class MinimumClientVersionError(VersionMismatchError):
    """The client is older than the minimum client version the infrastructure accepts.

    Only upgrading the client helps; auto-update of the infrastructure cannot.

    Attributes:
        minimum_client_version: the oldest client version the infrastructure accepts.
    """

    def __init__(
        self,
        client_version: str,
        minimum_client_version: str,
        schema_version: str,
        lambda_version: str | None = None,
    ) -> None:
        self.minimum_client_version = minimum_client_version
        super().__init__(
            client_version,
            schema_version,
            lambda_version,
            f"This infrastructure requires client >= {minimum_client_version}; "
            "upgrade with `pip install --upgrade zae-limiter`.",
            can_auto_update=False,
        )


class IncompatibleSchemaError(VersionError):
    """The schema differs by a major version: a manual migration is required.

    Attributes:
        client_version: this client's version.
        schema_version: the deployed table's schema version.
        migration_guide_url: where the migration is described, when given.
    """

    def __init__(
        self,
        client_version: str,
        schema_version: str,
        message: str | None = None,
        migration_guide_url: str | None = None,
    ) -> None:
        self.client_version = client_version
        self.schema_version = schema_version
        self.migration_guide_url = migration_guide_url
        detail = message if message is not None else "Migration required."
        msg = (
            f"Incompatible schema: client {client_version} is not compatible "
            f"with schema {schema_version}. {detail}"
        )
        if migration_guide_url:
            msg += f" See: {migration_guide_url}"
        super().__init__(msg)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

_MAX_VALUE_CHARS = 50


class ValidationError(ZAELimiterError, ValueError):
    """An input failed validation.

    Subclasses ValueError so code written against plain ``ValueError`` keeps working.

    Attributes:
        field: the parameter or attribute that failed.
        value: the offending value (strings are truncated to keep logs bounded).
        reason: why it failed.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        if isinstance(value, str) and len(value) > _MAX_VALUE_CHARS:
            value = value[:_MAX_VALUE_CHARS] + "..."
        self.value = value
        self.reason = reason
        # The value stays out of the message: identifiers are often API keys, and messages end
        # up in logs and HTTP responses.
        super().__init__(f"Invalid {field}: {reason}")


class InvalidIdentifierError(ValidationError):
    """An identifier (entity_id, parent_id) is invalid."""


class InvalidNameError(ValidationError):
    """A name (limit name, resource) is invalid."""


class RequestTooLarge(RateLimitExceeded, ValidationError):
    """The request asks for more than a limit's burst: no bucket can ever hold it, so no wait
    helps (`retry_after_seconds`, `retry_after_ms` and `retry_after_header` are None,
    `retryable` is False).

    It is a `RateLimitExceeded` (code mapping denials to 429 catches it, and `violations` say
    which limit, `requested` and `available`) and a `ValidationError` (`field` names the
    amount, e.g. ``consume.tpm``). An HTTP layer should not answer 429 with a Retry-After for
    it: 413 (Content Too Large) when the cost comes from the request's size (an LLM prompt's
    tokens), else 400; see docs/compatibility.md.
    """

    def __init__(self, statuses: list[LimitStatus], field: str, value: object) -> None:
        RateLimitExceeded.__init__(self, statuses)
        self.field = field
        self.value = value
        never = next((v for v in self.violations if v.retry_after_seconds is None), None)
        where = (
            f"the burst ({never.limit.burst}) of {never.entity_id!r}'s limit {never.limit_name!r}"
            if never is not None
            else "the limit's burst"
        )
        self.reason = f"exceeds {where}; it could never be admitted"

    def as_dict(self) -> dict[str, Any]:
        """`RateLimitExceeded`'s body (same `error`, for code that dispatches on it), with
        `reason` saying that no wait helps."""
        body = super().as_dict()
        body["reason"] = "request_exceeds_burst"
        return body

    def client_dict(self) -> dict[str, Any]:
        """`RateLimitExceeded`'s client body, with `reason` saying that no wait helps."""
        body = super().client_dict()
        body["reason"] = "request_exceeds_burst"
        return body
