"""A zae-limiter deployment's infrastructure: Pulumi component, Lambda bundle, local tables.

This package imports neither Pulumi nor boto3 at import time: Pulumi is the optional `infra` extra,
and `direct` (boto3 provisioning of a local table) must work without it. `ZaeLimiterStack` is
loaded on first access.

Resource names for a deployment called `<name>` (all derived from `zae_limiter.schema`):

| resource | name |
|---|---|
| table | `ZAEL-<name>` |
| aggregator Lambda | `ZAEL-<name>-aggregator` |
| its log group | `/aws/lambda/ZAEL-<name>-aggregator` |
| its dead-letter queue | `ZAEL-<name>-aggregator-dlq` |
| its role | `ZAEL-<name>-aggregator-role` (see `role_name_format`) |
| application policy | `ZAEL-<name>-app` (only with `create_app_policy`) |
| alarms | see `alarm_names` |
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .. import schema
from ..models import StackOptions

if TYPE_CHECKING:
    from .component import ZaeLimiterStack

__all__ = [
    "ALARM_SUFFIXES",
    "InfraOptions",
    "ZaeLimiterStack",
    "alarm_names",
    "app_policy_name",
    "coerce_options",
    "log_group_name",
    "role_name",
    "validate_deployment_name",
]

# Alarm name = f"{table_name}-{suffix}"; operators and runbooks depend on these, keep them stable.
ALARM_SUFFIXES: Final = {
    "errors": "aggregator-errors",
    "duration": "aggregator-duration",
    "iterator_age": "aggregator-iterator-age",
    "read_throttles": "read-throttles",
    "write_throttles": "write-throttles",
    "dlq_messages": "aggregator-dlq-messages",
    "audit_changes": "audit-trail-changes",
}
# The audit-trail alarm watches a metric the aggregator publishes, so it needs the aggregator too.
_AGGREGATOR_ALARMS: Final = frozenset(
    {"errors", "duration", "iterator_age", "dlq_messages", "audit_changes"}
)

# The strictest of the names derived from it: Lambda function names allow [A-Za-z0-9_-], SQS
# queue names the same, DynamoDB tables additionally '.', IAM roles more. No '#': key delimiter.
_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]*", re.ASCII)
_MAX_FUNCTION_NAME: Final = 64
_MAX_ROLE_NAME: Final = 64


def validate_deployment_name(name: str) -> str:
    """`name` without the ZAEL- prefix, if every name derived from it is valid in AWS.

    Raises ValueError otherwise.
    """
    short = schema.short_name(name)
    if not _NAME_RE.fullmatch(short):
        raise ValueError(
            f"invalid name {name!r}: use a letter followed by letters, digits, '-' or '_'"
        )
    function = schema.aggregator_function_name(short)
    if len(function) > _MAX_FUNCTION_NAME:
        longest = _MAX_FUNCTION_NAME - len(schema.aggregator_function_name(""))
        raise ValueError(f"invalid name {name!r}: at most {longest} characters "
                         f"(the Lambda function name {function!r} would exceed 64)")
    return short


def log_group_name(name: str) -> str:
    return f"/aws/lambda/{schema.aggregator_function_name(name)}"


def app_policy_name(name: str) -> str:
    return f"{schema.table_name(name)}-app"


def role_name(name: str, role_name_format: str | None = None) -> str:
    """The aggregator role's name: `ZAEL-<name>-aggregator-role`, or `role_name_format` with its
    `{}` replaced by that (`PowerUserPB-{}`, for organisations whose permission boundaries match
    role-name prefixes). Same rule as `StackOptions.get_role_name`."""
    default = f"{schema.aggregator_function_name(name)}-role"
    if not role_name_format:
        return default
    result = role_name_format.replace("{}", default)
    if len(result) > _MAX_ROLE_NAME:
        raise ValueError(f"role name {result!r} is longer than {_MAX_ROLE_NAME} characters")
    return result


def alarm_names(name: str, aggregator: bool = True) -> dict[str, str]:
    """The alarms of a deployment by key (ALARM_SUFFIXES); Lambda/DLQ ones need the aggregator."""
    table = schema.table_name(name)
    return {
        key: f"{table}-{suffix}"
        for key, suffix in ALARM_SUFFIXES.items()
        if aggregator or key not in _AGGREGATOR_ALARMS
    }


@dataclass(frozen=True, slots=True)
class InfraOptions(StackOptions):
    """Everything a deployment can be tuned with.

    A `StackOptions` (every field, default and rule of it is inherited, `alarms` and the
    point-in-time recovery settings included) plus the infrastructure details a limiter does not
    carry. `coerce_options` builds one from a StackOptions. The generated constructor takes the
    field names only; `from_dict` (and so `coerce_options` of a mapping) also takes zae-limiter
    0.2.0's names (`StackOptions.LEGACY_NAMES`).
    """

    error_threshold: float = 1
    throttle_threshold: float = 0
    dlq_threshold: float = 0
    batch_size: int = 100
    maximum_batching_window_seconds: int = 5
    maximum_retry_attempts: int = 3
    maximum_record_age_seconds: int = 3600
    log_level: str = "INFO"
    create_app_policy: bool = False
    # Adopt an existing table of this name into the stack instead of creating it (after a
    # `delete` that retained the table because of deletion protection).
    adopt_existing_table: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.tags, Mapping):  # a copy, so the caller's mapping cannot change us
            object.__setattr__(self, "tags", dict(self.tags))
        # Zero-argument super() does not work in a slots dataclass.
        StackOptions.__post_init__(self)
        problems: list[str] = []
        for attr in ("error_threshold", "throttle_threshold", "dlq_threshold"):
            if getattr(self, attr) < 0:
                problems.append(f"{attr} must be >= 0")
        if not 1 <= self.batch_size <= 10_000:
            problems.append("batch_size must be 1..10000")
        if not 0 <= self.maximum_batching_window_seconds <= 300:
            problems.append("maximum_batching_window_seconds must be 0..300")
        if not -1 <= self.maximum_retry_attempts <= 10_000:
            problems.append("maximum_retry_attempts must be -1 (forever) or 0..10000")
        if self.maximum_record_age_seconds != -1 and not (
            60 <= self.maximum_record_age_seconds <= 604_800
        ):
            problems.append("maximum_record_age_seconds must be -1 (forever) or 60..604800")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            problems.append("log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        if problems:
            raise ValueError("invalid infrastructure options: " + "; ".join(problems))

    def stack_options(self) -> StackOptions:
        """The StackOptions part alone."""
        shared = dataclasses.fields(StackOptions)
        return StackOptions(**{f.name: getattr(self, f.name) for f in shared})

    @property
    def provisioned(self) -> bool:
        return self.billing_mode == "PROVISIONED"

    def replace(self, **changes: Any) -> InfraOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for generated programs and Pulumi config)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["usage_windows"] = list(self.usage_windows)
        data["tags"] = dict(self.tags)
        return data

    @classmethod
    def from_config_values(cls, config: Mapping[str, str]) -> InfraOptions:
        """The inverse of `config_values` (keys without namespace; unknown keys such as `name`
        are ignored): what `status()["options"]` returns turns back into options."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = config.get(f.name)
            if raw is None:
                continue
            kind = str(f.type)
            if f.name == "usage_windows" and not raw.strip().startswith("["):
                values[f.name] = raw  # a comma list; from_dict splits it
            elif kind.startswith(("str", "Literal[")):
                values[f.name] = None if raw == "null" and "None" in kind else raw
            else:
                try:
                    values[f.name] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"option {f.name}: not valid JSON: {raw!r}") from exc
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InfraOptions:
        """Options from a mapping of option names (0.2.0's names too; see StackOptions)."""
        known = {f.name for f in dataclasses.fields(cls)} | set(StackOptions.LEGACY_NAMES)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown infrastructure options: {', '.join(unknown)}")
        values = StackOptions.translate_legacy_names(dict(data))
        windows = values.get("usage_windows")
        if isinstance(windows, str):
            values["usage_windows"] = tuple(w.strip() for w in windows.split(",") if w.strip())
        elif windows is not None:
            values["usage_windows"] = tuple(windows)
        if "tags" in values:
            values["tags"] = dict(values["tags"] or {})
        return cls(**values)


def coerce_options(options: object | None = None) -> InfraOptions:
    """An InfraOptions from None (defaults), an InfraOptions, a mapping, or a StackOptions.

    Other objects are read by attribute name (every InfraOptions field they have is taken, None
    included), so a StackOptions carries over exactly.
    """
    if options is None:
        return InfraOptions()
    if isinstance(options, InfraOptions):
        return options
    if isinstance(options, Mapping):
        return InfraOptions.from_dict(options)
    values = {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(InfraOptions)
        if hasattr(options, f.name)
    }
    return InfraOptions.from_dict(values)


def __getattr__(attr: str) -> Any:
    # Pulumi is optional: only touching the component pulls it in.
    if attr == "ZaeLimiterStack":
        from .component import ZaeLimiterStack

        return ZaeLimiterStack
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
