"""`StackOptions`: how to provision or update the infrastructure, with its checks and
zae-limiter 0.2.0's field names (also importable from `zae_limiter.models`, as in 0.2.0)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .exceptions import ValidationError
from .schema import USAGE_WINDOWS
from .validation import check_int

__all__ = ["VALID_LOG_RETENTION_DAYS", "StackOptions"]


VALID_LOG_RETENTION_DAYS = frozenset(
    {1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557,
     2922, 3288, 3653}
)
# fmt: on

_IAM_ROLE_NAME_MAX = 64
# Longest suffix the deployment appends to a role name ("<stack>-aggregator-role" style); the
# format's fixed text must leave room for it.
_ROLE_NAME_FORMAT_MAX_FIXED = 40


@dataclass(frozen=True, init=False)
class StackOptions:
    """How to provision or update the infrastructure when passed to a limiter.

    Frozen so options validated here cannot be changed afterwards.

    Point-in-time recovery: on by default (`point_in_time_recovery=True`) with a recovery period
    of `pitr_recovery_days` days (1..35, default 35); None means AWS's default period, 35 days,
    as in zae-limiter 0.2.0. `point_in_time_recovery=False` turns it off (0.2.0 could not).

    zae-limiter 0.2.0's field names are accepted as keywords and readable as properties; each is
    another name of one field here (`LEGACY_NAMES`): `snapshot_windows` (a comma string,
    "hourly,daily") of `usage_windows`, `retention_days` of `snapshot_ttl_days`,
    `enable_aggregator` of `aggregator`, `lambda_timeout` of `lambda_timeout_seconds`,
    `lambda_memory` of `lambda_memory_mb`, `enable_alarms` of `alarms`, `alarm_sns_topic` of
    `alarm_sns_topic_arn`, `lambda_duration_threshold_pct` of `duration_threshold_pct`. Giving
    both names of a field with different values is a `ValidationError` naming both; an invalid
    value given under the 0.2.0 name is reported under that name. The 0.2.0 names are
    keyword-only and not dataclass fields (`dataclasses.replace` takes the names here).
    `to_parameters()` renders the options under 0.2.0's parameter keys.

    Positional arguments follow the fields below, in order.
    """

    create_table: bool = True
    aggregator: bool = True
    usage_windows: tuple[str, ...] = USAGE_WINDOWS
    snapshot_ttl_days: int = 90
    pitr_recovery_days: int | None = 35
    deletion_protection: bool = True
    billing_mode: Literal["PAY_PER_REQUEST", "PROVISIONED"] = "PAY_PER_REQUEST"
    read_capacity: int | None = None
    write_capacity: int | None = None
    lambda_memory_mb: int = 256
    lambda_timeout_seconds: int = 60
    log_retention_days: int = 30
    alarm_sns_topic_arn: str | None = None
    iterator_age_threshold_ms: int = 30000
    duration_threshold_pct: int = 80
    kms_key_arn: str | None = None
    # A policy ARN, or (as in 0.2.0) the name of a customer-managed policy of the deploying
    # account, which the Pulumi component turns into its ARN.
    permission_boundary: str | None = None
    role_name_format: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    auto_update: bool = True
    point_in_time_recovery: bool = True
    # CloudWatch alarms (0.2.0: `enable_alarms`); the thresholds are `InfraOptions`'.
    alarms: bool = True

    _BOOL_FIELDS: ClassVar[tuple[str, ...]] = (
        "create_table",
        "aggregator",
        "deletion_protection",
        "auto_update",
        "point_in_time_recovery",
        "alarms",
    )
    # AWS's default point-in-time recovery period, what `pitr_recovery_days=None` deploys.
    PITR_DEFAULT_RECOVERY_DAYS: ClassVar[int] = 35
    # zae-limiter 0.2.0's field name -> the field it names here.
    LEGACY_NAMES: ClassVar[dict[str, str]] = {
        "snapshot_windows": "usage_windows",
        "retention_days": "snapshot_ttl_days",
        "enable_aggregator": "aggregator",
        "lambda_timeout": "lambda_timeout_seconds",
        "lambda_memory": "lambda_memory_mb",
        "enable_alarms": "alarms",
        "alarm_sns_topic": "alarm_sns_topic_arn",
        "lambda_duration_threshold_pct": "duration_threshold_pct",
    }
    # 0.2.0's `to_parameters` keys, always present -> the option each carries.
    _PARAMETER_KEYS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("snapshot_windows", "usage_windows"),
        ("retention_days", "snapshot_ttl_days"),
        ("enable_aggregator", "aggregator"),
        ("log_retention_days", "log_retention_days"),
        ("lambda_timeout", "lambda_timeout_seconds"),
        ("lambda_memory_size", "lambda_memory_mb"),
        ("enable_alarms", "alarms"),
    )
    # ... and the ones present only when the option is set (same key as the option).
    _OPTIONAL_PARAMETER_KEYS: ClassVar[tuple[str, ...]] = (
        "pitr_recovery_days",
        "alarm_sns_topic_arn",
        "permission_boundary",
    )

    def __init__(
        self,
        create_table: bool = True,
        aggregator: bool | None = None,
        usage_windows: tuple[str, ...] | list[str] | None = None,
        snapshot_ttl_days: int | None = None,
        pitr_recovery_days: int | None = 35,
        deletion_protection: bool = True,
        billing_mode: Literal["PAY_PER_REQUEST", "PROVISIONED"] = "PAY_PER_REQUEST",
        read_capacity: int | None = None,
        write_capacity: int | None = None,
        lambda_memory_mb: int | None = None,
        lambda_timeout_seconds: int | None = None,
        log_retention_days: int = 30,
        alarm_sns_topic_arn: str | None = None,
        iterator_age_threshold_ms: int = 30000,
        duration_threshold_pct: int | None = None,
        kms_key_arn: str | None = None,
        permission_boundary: str | None = None,
        role_name_format: str | None = None,
        tags: dict[str, str] | None = None,
        auto_update: bool = True,
        point_in_time_recovery: bool = True,
        alarms: bool | None = None,
        *,
        snapshot_windows: str | None = None,
        retention_days: int | None = None,
        enable_aggregator: bool | None = None,
        lambda_timeout: int | None = None,
        lambda_memory: int | None = None,
        enable_alarms: bool | None = None,
        alarm_sns_topic: str | None = None,
        lambda_duration_threshold_pct: int | None = None,
    ) -> None:
        # A field that has a 0.2.0 name takes None for "not given", so that both names given
        # with different values can be told from one of them given.
        values: dict[str, Any] = {
            "create_table": create_table,
            "aggregator": aggregator,
            "usage_windows": usage_windows,
            "snapshot_ttl_days": snapshot_ttl_days,
            "pitr_recovery_days": pitr_recovery_days,
            "deletion_protection": deletion_protection,
            "billing_mode": billing_mode,
            "read_capacity": read_capacity,
            "write_capacity": write_capacity,
            "lambda_memory_mb": lambda_memory_mb,
            "lambda_timeout_seconds": lambda_timeout_seconds,
            "log_retention_days": log_retention_days,
            "alarm_sns_topic_arn": alarm_sns_topic_arn,
            "iterator_age_threshold_ms": iterator_age_threshold_ms,
            "duration_threshold_pct": duration_threshold_pct,
            "kms_key_arn": kms_key_arn,
            "permission_boundary": permission_boundary,
            "role_name_format": role_name_format,
            "tags": {} if tags is None else tags,
            "auto_update": auto_update,
            "point_in_time_recovery": point_in_time_recovery,
            "alarms": alarms,
            "snapshot_windows": snapshot_windows,
            "retention_days": retention_days,
            "enable_aggregator": enable_aggregator,
            "lambda_timeout": lambda_timeout,
            "lambda_memory": lambda_memory,
            "enable_alarms": enable_alarms,
            "alarm_sns_topic": alarm_sns_topic,
            "lambda_duration_threshold_pct": lambda_duration_threshold_pct,
        }
        used = {
            self.LEGACY_NAMES[legacy]: legacy
            for legacy in self.LEGACY_NAMES
            if values[legacy] is not None
        }
        values = self.translate_legacy_names(values)
        import dataclasses

        for f in dataclasses.fields(StackOptions):
            value = values[f.name]
            if value is None and f.name in self.LEGACY_NAMES.values():
                value = f.default  # not given under either name
            object.__setattr__(self, f.name, value)
        try:
            self.__post_init__()
        except ValidationError as exc:
            legacy = used.get(exc.field)
            if legacy is None:
                raise
            raise ValidationError(
                legacy, exc.value, f"{exc.reason} ({legacy} is 0.2.0's name for {exc.field})"
            ) from exc

    @classmethod
    def translate_legacy_names(cls, values: dict[str, Any]) -> dict[str, Any]:
        """`values` (option name -> value) with 0.2.0's names replaced by the fields they name.

        None stands for "not given". A 0.2.0 name given alongside its field with a different
        value is a ValidationError naming both; `snapshot_windows` is split at commas.
        """
        result = dict(values)
        for legacy, current in cls.LEGACY_NAMES.items():
            value = result.pop(legacy, None)
            if value is None:
                continue
            if legacy == "snapshot_windows" and isinstance(value, str):
                parts = [w.strip() for w in value.split(",")]
                if value.strip() and not all(parts):
                    raise ValidationError(
                        legacy, value, "must be a comma list of window names (e.g. 'hourly,daily')"
                    )
                value = tuple(p for p in parts if p)
            other = result.get(current)
            if other is not None:
                same = (
                    isinstance(other, (tuple, list))
                    and isinstance(value, (tuple, list))
                    and tuple(other) == tuple(value)
                ) or (type(other) is type(value) and other == value)
                if not same:
                    raise ValidationError(
                        legacy,
                        value,
                        f"conflicts with {current}: {legacy} is 0.2.0's name for {current}; "
                        "give one of them (or the same value to both)",
                    )
            result[current] = value
        return result

    # -- 0.2.0's names, read-only ---------------------------------------------------------------

    @property
    def snapshot_windows(self) -> str:
        """0.2.0's name: `usage_windows` as a comma string ("hourly,daily")."""
        return ",".join(self.usage_windows)

    @property
    def retention_days(self) -> int:
        """0.2.0's name of `snapshot_ttl_days`."""
        return self.snapshot_ttl_days

    @property
    def enable_aggregator(self) -> bool:
        """0.2.0's name of `aggregator`."""
        return self.aggregator

    @property
    def lambda_timeout(self) -> int:
        """0.2.0's name of `lambda_timeout_seconds`."""
        return self.lambda_timeout_seconds

    @property
    def lambda_memory(self) -> int:
        """0.2.0's name of `lambda_memory_mb`."""
        return self.lambda_memory_mb

    @property
    def enable_alarms(self) -> bool:
        """0.2.0's name of `alarms`."""
        return self.alarms

    @property
    def alarm_sns_topic(self) -> str | None:
        """0.2.0's name of `alarm_sns_topic_arn`."""
        return self.alarm_sns_topic_arn

    @property
    def lambda_duration_threshold_pct(self) -> int:
        """0.2.0's name of `duration_threshold_pct`."""
        return self.duration_threshold_pct

    @property
    def duration_threshold_ms(self) -> int:
        """The aggregator's Duration alarm threshold: `duration_threshold_pct` of the timeout."""
        return self.lambda_timeout_seconds * 10 * self.duration_threshold_pct

    def __post_init__(self) -> None:
        for name in self._BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValidationError(name, value, "must be a bool")

        self._check_windows()
        check_int("snapshot_ttl_days", self.snapshot_ttl_days, 1, 3650)
        if self.pitr_recovery_days is not None:
            check_int("pitr_recovery_days", self.pitr_recovery_days, 1, 35)
            if not self.point_in_time_recovery and (
                self.pitr_recovery_days != self.PITR_DEFAULT_RECOVERY_DAYS
            ):
                raise ValidationError(
                    "pitr_recovery_days",
                    self.pitr_recovery_days,
                    "a recovery period needs point_in_time_recovery=True",
                )
        self._check_billing()
        check_int("lambda_memory_mb", self.lambda_memory_mb, 128, 10240)
        check_int("lambda_timeout_seconds", self.lambda_timeout_seconds, 1, 900)
        if self.log_retention_days not in VALID_LOG_RETENTION_DAYS or isinstance(
            self.log_retention_days, bool
        ):
            raise ValidationError(
                "log_retention_days",
                self.log_retention_days,
                f"must be one of {sorted(VALID_LOG_RETENTION_DAYS)}",
            )
        # Streams keep records for 24 h; a larger threshold could never fire.
        check_int("iterator_age_threshold_ms", self.iterator_age_threshold_ms, 1, 86_400_000)
        check_int("duration_threshold_pct", self.duration_threshold_pct, 1, 100)
        if self.alarm_sns_topic_arn is not None and (
            not isinstance(self.alarm_sns_topic_arn, str)
            or not self.alarm_sns_topic_arn.startswith("arn:")
        ):
            raise ValidationError(
                "alarm_sns_topic_arn", self.alarm_sns_topic_arn, "must be an ARN ('arn:...')"
            )
        # DynamoDB also accepts a key id or alias here, so only emptiness is rejected.
        for name in ("kms_key_arn", "permission_boundary"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValidationError(name, value, "must be a non-empty string or None")
        self._check_role_name_format()
        self._check_tags()

    def _check_windows(self) -> None:
        windows = self.usage_windows
        if isinstance(windows, str) or not isinstance(windows, (tuple, list)):
            raise ValidationError("usage_windows", windows, "must be a tuple of window names")
        for w in windows:
            if w not in USAGE_WINDOWS:
                raise ValidationError("usage_windows", windows, f"unknown window {w!r}")
        if len(set(windows)) != len(windows):
            raise ValidationError("usage_windows", windows, "contains duplicates")
        if self.aggregator and not windows:
            raise ValidationError(
                "usage_windows", windows, "must not be empty when the aggregator is enabled"
            )
        # Accepting a list is convenient; storing a tuple keeps the frozen object immutable.
        object.__setattr__(self, "usage_windows", tuple(windows))

    def _check_billing(self) -> None:
        if self.billing_mode not in ("PAY_PER_REQUEST", "PROVISIONED"):
            raise ValidationError(
                "billing_mode", self.billing_mode, "must be 'PAY_PER_REQUEST' or 'PROVISIONED'"
            )
        for name in ("read_capacity", "write_capacity"):
            value = getattr(self, name)
            if self.billing_mode == "PROVISIONED":
                if value is None:
                    raise ValidationError(name, value, "is required with PROVISIONED billing")
                check_int(name, value, 1, 40000)
            elif value is not None:
                # Silently ignoring a capacity would hide a configuration mistake.
                raise ValidationError(name, value, "only applies to PROVISIONED billing")

    def _check_role_name_format(self) -> None:
        fmt = self.role_name_format
        if fmt is None:
            return
        if not isinstance(fmt, str):
            raise ValidationError("role_name_format", fmt, "must be a string or None")
        if fmt.count("{}") != 1:
            raise ValidationError(
                "role_name_format", fmt, "must contain exactly one '{}' placeholder"
            )
        if len(fmt) - 2 > _ROLE_NAME_FORMAT_MAX_FIXED:
            raise ValidationError(
                "role_name_format",
                fmt,
                f"is too long: role names are limited to {_IAM_ROLE_NAME_MAX} characters",
            )

    def _check_tags(self) -> None:
        tags = self.tags
        if not isinstance(tags, dict):
            raise ValidationError("tags", tags, "must be a dict of str to str")
        if len(tags) > 50:
            raise ValidationError("tags", len(tags), "at most 50 tags are allowed")
        for key, value in tags.items():
            if not isinstance(key, str) or not 1 <= len(key) <= 128:
                raise ValidationError("tags", key, "keys must be strings of 1..128 characters")
            if key.lower().startswith("aws:"):
                raise ValidationError("tags", key, "keys must not start with 'aws:' (reserved)")
            if not isinstance(value, str) or len(value) > 256:
                raise ValidationError("tags", value, "values must be strings of <= 256 characters")
        # Copy so later mutation of the caller's dict cannot bypass validation.
        object.__setattr__(self, "tags", dict(tags))

    def get_role_name(self, stack_name: str) -> str | None:
        """The role name ``role_name_format`` produces for ``stack_name`` (None: default)."""
        if self.role_name_format is None:
            return None
        return self.role_name_format.replace("{}", f"{stack_name}-aggregator-role")

    # -- the Pulumi stack configuration ---------------------------------------------------------

    @staticmethod
    def _config_text(value: object) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, tuple):  # usage_windows
            return ",".join(str(v) for v in value)

        return json.dumps(value, sort_keys=True)

    def config_values(self, *, defaults: bool = False) -> dict[str, str]:
        """These options as Pulumi stack config (option name -> string; the Pulumi program reads
        them as `zae-limiter:<option>`): strings as they are, `usage_windows` as a comma list,
        everything else as JSON. Only the options that differ from the defaults, unless
        `defaults=True`.

        The one rendering of the options: `zae_limiter.infra.automation` configures the stack
        with it, `InfraOptions.from_config_values` reads it back, `to_parameters` presents it
        under 0.2.0's keys.
        """
        import dataclasses

        reference = None if defaults else type(self)()
        return {
            f.name: self._config_text(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if reference is None or getattr(self, f.name) != getattr(reference, f.name)
        }

    def to_parameters(self, stack_name: str | None = None) -> dict[str, str]:
        """The deployment's configuration under zae-limiter 0.2.0's parameter keys, as strings.

        The same configuration the Pulumi program receives (`config_values`), keyed as 0.2.0's
        `to_parameters` keyed it: `snapshot_windows`, `retention_days`, `enable_aggregator`,
        `log_retention_days`, `lambda_timeout`, `lambda_memory_size`, `enable_alarms` and
        `lambda_duration_threshold` (milliseconds: `duration_threshold_pct` of the timeout, the
        Duration alarm's threshold) always; `pitr_recovery_days`, `alarm_sns_topic_arn` and
        `permission_boundary` when set; `role_name` (the aggregator role's name) when
        `role_name_format` and `stack_name` are given (`stack_name` with or without the `ZAEL-`
        prefix). Options 0.2.0 did not have appear under their own names when they differ from
        their defaults (`billing_mode`, `tags` as JSON, `point_in_time_recovery`, ...).
        Booleans are "true"/"false".
        """
        config = self.config_values(defaults=True)
        params = {key: config[option] for key, option in self._PARAMETER_KEYS}
        params["lambda_duration_threshold"] = str(self.duration_threshold_ms)
        for option in self._OPTIONAL_PARAMETER_KEYS:
            if getattr(self, option) is not None:
                params[option] = config[option]
        if self.role_name_format and stack_name:
            from .schema import table_name

            role = self.get_role_name(table_name(stack_name))
            if role:
                params["role_name"] = role
        covered = {option for _, option in self._PARAMETER_KEYS}
        covered.update(self._OPTIONAL_PARAMETER_KEYS, ["duration_threshold_pct"])
        for option, text in self.config_values().items():
            if option not in covered:
                params[option] = text
        return params


# ---------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------
