"""zae-limiter 0.2.0's deployment API: `StackOptions` names, `to_parameters`, `StackManager`,
`create_stack`.

- 0.2.0's `StackOptions` field names and defaults next to this project's (docs/compatibility.md).
- `to_parameters()`: 0.2.0's keys, string values, and the very configuration the Pulumi program
  receives.
- `StackManager` / `RateLimiter.create_stack` against the embedded local DynamoDB (the table
  alone), and on the AWS path against a stand-in for the Pulumi stack whose `up` runs the real
  Pulumi program (`component.stack_program`) under Pulumi's mocks. A real `pulumi up` (the
  Pulumi CLI, an AWS account) is not available here and is not tested.
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from zae_limiter import (
    StackAlreadyExistsError,
    StackCreationError,
    StackOptions,
    ValidationError,
)
from zae_limiter.infra import InfraOptions, coerce_options

ARN = "arn:aws:sns:us-east-1:123456789012:alerts"

# 0.2.0's StackOptions defaults (src/zae_limiter/models.py of the 0.2.0 release).
V020_DEFAULTS: dict[str, Any] = {
    "snapshot_windows": "hourly,daily",
    "retention_days": 90,
    "enable_aggregator": True,
    "log_retention_days": 30,
    "lambda_timeout": 60,
    "lambda_memory": 256,
    "enable_alarms": True,
    "alarm_sns_topic": None,
    "lambda_duration_threshold_pct": 80,
    "permission_boundary": None,
    "role_name_format": None,
}
# 0.2.0's StackOptions().to_parameters().
V020_DEFAULT_PARAMETERS = {
    "snapshot_windows": "hourly,daily",
    "retention_days": "90",
    "enable_aggregator": "true",
    "log_retention_days": "30",
    "lambda_timeout": "60",
    "lambda_memory_size": "256",
    "enable_alarms": "true",
    "lambda_duration_threshold": "48000",
}

# (0.2.0 name, a value, the field here, the field's value)
ALIASES = [
    ("snapshot_windows", "daily", "usage_windows", ("daily",)),
    ("snapshot_windows", "daily,hourly", "usage_windows", ("daily", "hourly")),
    ("retention_days", 7, "snapshot_ttl_days", 7),
    ("enable_aggregator", False, "aggregator", False),
    ("lambda_timeout", 120, "lambda_timeout_seconds", 120),
    ("lambda_memory", 1024, "lambda_memory_mb", 1024),
    ("enable_alarms", False, "alarms", False),
    ("alarm_sns_topic", ARN, "alarm_sns_topic_arn", ARN),
    ("lambda_duration_threshold_pct", 50, "duration_threshold_pct", 50),
]


# -- item 4: 0.2.0's StackOptions names ------------------------------------------------------


def test_every_0_2_0_name_reads_back_its_0_2_0_default() -> None:
    options = StackOptions()
    for name, default in V020_DEFAULTS.items():
        assert getattr(options, name) == default, name
    # pitr_recovery_days: 0.2.0 None (AWS's default period, 35 days), here 35 (the same period)
    assert options.pitr_recovery_days == 35 == StackOptions.PITR_DEFAULT_RECOVERY_DAYS
    assert options.point_in_time_recovery is True
    legacy = StackOptions(pitr_recovery_days=None)
    assert legacy.pitr_recovery_days is None and legacy.point_in_time_recovery is True


@pytest.mark.parametrize(("legacy", "value", "current", "expected"), ALIASES)
def test_a_0_2_0_name_sets_the_field_it_names(
    legacy: str, value: Any, current: str, expected: Any
) -> None:
    options = StackOptions(**{legacy: value})
    assert getattr(options, current) == expected
    assert getattr(options, legacy) == value
    assert StackOptions.LEGACY_NAMES[legacy] == current
    # the two spellings build equal options
    assert options == StackOptions(**{current: expected})
    # naming both with the same value is fine
    assert StackOptions(**{legacy: value, current: expected}) == options


def test_the_table_of_0_2_0_names_is_complete() -> None:
    assert set(StackOptions.LEGACY_NAMES) == {legacy for legacy, *_ in ALIASES}
    assert set(StackOptions.LEGACY_NAMES) | {
        "pitr_recovery_days",
        "log_retention_days",
        "permission_boundary",
        "role_name_format",
    } == set(V020_DEFAULTS) | {"pitr_recovery_days"}


CONFLICTS = [
    ({"snapshot_windows": "hourly", "usage_windows": ("daily",)}, "usage_windows"),
    ({"retention_days": 7, "snapshot_ttl_days": 8}, "snapshot_ttl_days"),
    ({"enable_aggregator": False, "aggregator": True}, "aggregator"),
    ({"lambda_timeout": 120, "lambda_timeout_seconds": 60}, "lambda_timeout_seconds"),
    ({"lambda_memory": 512, "lambda_memory_mb": 256}, "lambda_memory_mb"),
    ({"enable_alarms": False, "alarms": True}, "alarms"),
    ({"alarm_sns_topic": ARN, "alarm_sns_topic_arn": ARN + "2"}, "alarm_sns_topic_arn"),
    ({"lambda_duration_threshold_pct": 50, "duration_threshold_pct": 80}, "duration_threshold_pct"),
]


@pytest.mark.parametrize(("kwargs", "current"), CONFLICTS)
def test_both_names_with_different_values_is_a_validation_error_naming_both(
    kwargs: dict[str, Any], current: str
) -> None:
    (legacy,) = set(kwargs) - {current}
    with pytest.raises(ValidationError) as info:
        StackOptions(**kwargs)
    assert info.value.field == legacy
    assert legacy in str(info.value) and current in str(info.value)
    # also through the mapping form the CLI and the Pulumi component accept
    with pytest.raises(ValidationError):
        InfraOptions.from_dict(kwargs)


@pytest.mark.parametrize(
    ("kwargs", "legacy"),
    [
        ({"lambda_timeout": 0}, "lambda_timeout"),
        ({"lambda_timeout": 901}, "lambda_timeout"),
        ({"lambda_memory": 64}, "lambda_memory"),
        ({"retention_days": 0}, "retention_days"),
        ({"snapshot_windows": "weekly"}, "snapshot_windows"),
        ({"snapshot_windows": "hourly,,daily"}, "snapshot_windows"),
        ({"snapshot_windows": "hourly,hourly"}, "snapshot_windows"),
        ({"snapshot_windows": ""}, "snapshot_windows"),  # the aggregator needs a window
        ({"alarm_sns_topic": "alerts"}, "alarm_sns_topic"),
        ({"lambda_duration_threshold_pct": 101}, "lambda_duration_threshold_pct"),
        ({"enable_alarms": "yes"}, "enable_alarms"),
        ({"enable_aggregator": 1}, "enable_aggregator"),
    ],
)
def test_an_invalid_value_under_a_0_2_0_name_is_reported_under_that_name(
    kwargs: dict[str, Any], legacy: str
) -> None:
    with pytest.raises(ValidationError) as info:
        StackOptions(**kwargs)
    assert info.value.field == legacy
    assert isinstance(info.value, ValueError)  # 0.2.0 raised ValueError


def test_snapshot_windows_is_a_comma_string() -> None:
    assert StackOptions(snapshot_windows=" hourly , daily ").usage_windows == ("hourly", "daily")
    assert StackOptions(snapshot_windows="", enable_aggregator=False).usage_windows == ()
    assert StackOptions(usage_windows=("daily", "hourly")).snapshot_windows == "daily,hourly"
    # usage_windows itself stays a sequence of names (a string there is a mistake)
    with pytest.raises(ValidationError, match="usage_windows"):
        StackOptions(usage_windows="hourly")  # type: ignore[arg-type]


def test_0_2_0_cli_construction_runs_unchanged() -> None:
    # 0.2.0's `zae-limiter deploy` built its options exactly like this.
    options = StackOptions(
        snapshot_windows="hourly,daily",
        retention_days=30,
        enable_aggregator=True,
        pitr_recovery_days=None,
        log_retention_days=int("90"),
        lambda_timeout=30,
        lambda_memory=512,
        enable_alarms=False,
        alarm_sns_topic=None,
        lambda_duration_threshold_pct=60,
        permission_boundary="MyBoundary",
        role_name_format="pb-{}",
    )
    assert (
        options.snapshot_ttl_days,
        options.lambda_timeout_seconds,
        options.lambda_memory_mb,
        options.alarms,
        options.duration_threshold_pct,
    ) == (30, 30, 512, False, 60)
    assert options.get_role_name("ZAEL-app") == "pb-ZAEL-app-aggregator-role"


def test_frozen_replace_and_fields_are_this_projects() -> None:
    options = StackOptions(lambda_timeout=120, enable_alarms=False)
    with pytest.raises(AttributeError):
        options.lambda_timeout = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.lambda_timeout_seconds = 5  # type: ignore[misc]
    changed = dataclasses.replace(options, lambda_timeout_seconds=30)
    assert changed.lambda_timeout == 30 and changed.enable_alarms is False
    names = {f.name for f in dataclasses.fields(StackOptions)}
    assert not names & set(StackOptions.LEGACY_NAMES)


def test_constructor_defaults_match_the_fields() -> None:
    params = inspect.signature(StackOptions).parameters
    targets = set(StackOptions.LEGACY_NAMES.values())
    for f in dataclasses.fields(StackOptions):
        param = params[f.name]
        assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f.name
        if f.name in targets or f.name == "tags":
            assert param.default is None, f.name  # "not given": the field's default applies
        else:
            assert param.default == f.default, f.name
        given_default = StackOptions(**{f.name: param.default})
        assert getattr(given_default, f.name) == getattr(StackOptions(), f.name)
    positional = [p for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == [f.name for f in dataclasses.fields(StackOptions)]
    for legacy in StackOptions.LEGACY_NAMES:
        assert params[legacy].kind is inspect.Parameter.KEYWORD_ONLY


def test_point_in_time_recovery() -> None:
    off = StackOptions(point_in_time_recovery=False)
    assert off.point_in_time_recovery is False
    with pytest.raises(ValidationError) as info:
        StackOptions(point_in_time_recovery=False, pitr_recovery_days=7)
    assert info.value.field == "pitr_recovery_days"
    assert (
        StackOptions(point_in_time_recovery=False, pitr_recovery_days=None).pitr_recovery_days
        is None
    )
    with pytest.raises(ValidationError, match="point_in_time_recovery"):
        StackOptions(point_in_time_recovery="no")  # type: ignore[arg-type]


def test_infra_options_take_0_2_0_names_through_mappings_and_stack_options() -> None:
    infra = InfraOptions.from_dict(
        {
            "lambda_timeout": 30,
            "enable_alarms": False,
            "snapshot_windows": "daily",
            "error_threshold": 2,
        }
    )
    assert (
        infra.lambda_timeout_seconds,
        infra.alarms,
        infra.usage_windows,
        infra.error_threshold,
    ) == (30, False, ("daily",), 2)
    assert coerce_options({"lambda_memory": 512}).lambda_memory_mb == 512
    carried = coerce_options(StackOptions(enable_alarms=False, point_in_time_recovery=False))
    assert carried.alarms is False and carried.point_in_time_recovery is False
    with pytest.raises(ValueError, match="unknown infrastructure options"):
        InfraOptions.from_dict({"enable_alarm": False})
    # the config round trip keeps the new fields
    assert InfraOptions.from_config_values(carried.config_values()) == carried


# -- item 5: to_parameters ---------------------------------------------------------------------


def test_to_parameters_defaults_are_0_2_0s() -> None:
    # With 0.2.0's default PITR setting the dict is exactly 0.2.0's.
    assert StackOptions(pitr_recovery_days=None).to_parameters() == V020_DEFAULT_PARAMETERS
    # This project's default period is explicit (35 days: what AWS's default gave in 0.2.0).
    assert StackOptions().to_parameters() == {**V020_DEFAULT_PARAMETERS, "pitr_recovery_days": "35"}


def test_to_parameters_values_are_strings_under_0_2_0_keys() -> None:
    options = StackOptions(
        snapshot_windows="daily",
        retention_days=30,
        enable_aggregator=False,
        lambda_timeout=7,
        lambda_memory=512,
        enable_alarms=False,
        alarm_sns_topic=ARN,
        lambda_duration_threshold_pct=33,
        pitr_recovery_days=7,
        log_retention_days=14,
        permission_boundary="arn:aws:iam::123456789012:policy/PB",
        role_name_format="app-{}",
    )
    params = options.to_parameters(stack_name="ZAEL-mytable")
    assert all(isinstance(v, str) for v in params.values())
    assert params == {
        "snapshot_windows": "daily",
        "retention_days": "30",
        "enable_aggregator": "false",
        "log_retention_days": "14",
        "lambda_timeout": "7",
        "lambda_memory_size": "512",
        "enable_alarms": "false",
        "lambda_duration_threshold": "2310",  # 7 s * 1000 * 33 %
        "pitr_recovery_days": "7",
        "alarm_sns_topic_arn": ARN,
        "permission_boundary": "arn:aws:iam::123456789012:policy/PB",
        "role_name": "app-ZAEL-mytable-aggregator-role",
        # an option 0.2.0 did not have, under its own name (the role name needs stack_name)
        "role_name_format": "app-{}",
    }
    # the ZAEL- prefix is optional, as everywhere else
    assert options.to_parameters("mytable")["role_name"] == params["role_name"]
    assert "role_name" not in options.to_parameters()
    assert "role_name" not in StackOptions().to_parameters("ZAEL-mytable")


def test_to_parameters_adds_this_projects_options_that_differ_from_defaults() -> None:
    options = StackOptions(
        billing_mode="PROVISIONED",
        read_capacity=3,
        write_capacity=4,
        tags={"team": "gw"},
        point_in_time_recovery=False,
        pitr_recovery_days=None,
        deletion_protection=False,
    )
    params = options.to_parameters()
    assert params == {
        **V020_DEFAULT_PARAMETERS,
        "billing_mode": "PROVISIONED",
        "read_capacity": "3",
        "write_capacity": "4",
        "tags": '{"team": "gw"}',
        "point_in_time_recovery": "false",
        "deletion_protection": "false",
    }
    assert InfraOptions(error_threshold=2.5).to_parameters()["error_threshold"] == "2.5"


class ConfigStack:
    """The part of a Pulumi automation Stack that `automation.configure_stack` uses."""

    def __init__(self) -> None:
        self.config: dict[str, str] = {}

    def get_all_config(self) -> dict[str, Any]:
        from pulumi import automation as auto

        return {k: auto.ConfigValue(v) for k, v in self.config.items()}

    def remove_all_config(self, keys: list[str]) -> None:
        for key in keys:
            del self.config[key]

    def set_all_config(self, values: dict[str, Any]) -> None:
        self.config.update({k: v.value for k, v in values.items()})

    def set_config(self, key: str, value: Any) -> None:
        self.config[key] = value.value


@pytest.mark.parametrize(
    "options",
    [
        StackOptions(),
        StackOptions(pitr_recovery_days=None),
        StackOptions(
            snapshot_windows="daily",
            retention_days=7,
            lambda_memory=512,
            enable_alarms=False,
            alarm_sns_topic=ARN,
            permission_boundary="PB",
            role_name_format="pb-{}",
            tags={"a": "b"},
            billing_mode="PROVISIONED",
            read_capacity=1,
            write_capacity=2,
        ),
    ],
)
def test_to_parameters_is_the_configuration_the_pulumi_stack_gets(options: StackOptions) -> None:
    pytest.importorskip("pulumi")
    from zae_limiter.infra import automation

    stack = ConfigStack()
    automation.configure_stack(stack, "app", "eu-west-1", coerce_options(options))  # type: ignore[arg-type]
    config = {
        k.split(":", 1)[1]: v
        for k, v in stack.config.items()
        if k.startswith("zae-limiter:") and k != "zae-limiter:name"
    }
    defaults = InfraOptions().config_values(defaults=True)
    received = {**defaults, **config}  # what the program reads (absent keys: defaults)
    params = options.to_parameters("app")
    for key, option in StackOptions._PARAMETER_KEYS:
        assert params[key] == received[option], key
    for option in StackOptions._OPTIONAL_PARAMETER_KEYS:
        assert params.get(option) == (
            None if getattr(options, option) is None else received[option]
        )
    # the derived keys are computed from the received options as the component computes them
    program_options = InfraOptions.from_config_values(config)
    assert params["lambda_duration_threshold"] == str(program_options.duration_threshold_ms)
    if options.role_name_format:
        from zae_limiter.infra import role_name

        assert params["role_name"] == role_name("app", program_options.role_name_format)
    # every option set away from its default reaches the program, under one key or the other
    assert program_options == coerce_options(options)
    extra = (
        set(params)
        - {k for k, _ in StackOptions._PARAMETER_KEYS}
        - set(StackOptions._OPTIONAL_PARAMETER_KEYS)
        - {"lambda_duration_threshold", "role_name"}
    )
    assert {k: params[k] for k in extra} == {
        k: v
        for k, v in config.items()
        if k not in {o for _, o in StackOptions._PARAMETER_KEYS}
        and k not in StackOptions._OPTIONAL_PARAMETER_KEYS
        and k != "duration_threshold_pct"
    }


# -- the Pulumi component receives 0.2.0's options (Pulumi's mocks) --------------------------


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("zip") / "aggregator.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("lambda_function.py", "def handler(event, context):\n    return {}\n")
    return path


def _mocks() -> Any:
    pytest.importorskip("pulumi")
    pytest.importorskip("pulumi_aws")
    import test_infra_component  # the harness: fresh mocks and loop per program

    return test_infra_component


def _component(options: object, zip_path: Path) -> Any:
    harness = _mocks()
    from zae_limiter.infra.component import ZaeLimiterStack

    return harness.run_program(
        lambda: ZaeLimiterStack("app", options, lambda_zip=zip_path).alarm_names
    )


ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"
FUNCTION = "aws:lambda/function:Function"


@pytest.mark.filterwarnings("ignore:aws.lambda/microvmsimage:DeprecationWarning")
def test_enable_alarms_false_creates_no_alarm(tiny_zip: Path) -> None:
    assert _component(StackOptions(), tiny_zip).of_type(ALARM)
    mocks = _component(StackOptions(enable_alarms=False), tiny_zip)
    assert mocks.of_type(ALARM) == []
    assert mocks.of_type(FUNCTION)  # the rest is deployed
    assert _component(InfraOptions(alarms=False), tiny_zip).of_type(ALARM) == []


@pytest.mark.filterwarnings("ignore:aws.lambda/microvmsimage:DeprecationWarning")
def test_0_2_0_names_reach_the_deployed_resources(tiny_zip: Path) -> None:
    options = StackOptions(
        snapshot_windows="daily",
        retention_days=7,
        lambda_timeout=100,
        lambda_memory=1024,
        alarm_sns_topic=ARN,
        lambda_duration_threshold_pct=50,
        pitr_recovery_days=None,
    )
    mocks = _component(options, tiny_zip)
    function = mocks.one(FUNCTION).inputs
    assert (function["memorySize"], function["timeout"]) == (1024, 100)
    env = function["environment"]["variables"]
    assert (env["USAGE_WINDOWS"], env["SNAPSHOT_TTL_DAYS"]) == ("daily", "7")
    alarms = {a.inputs["metricName"]: a.inputs for a in mocks.of_type(ALARM)}
    assert alarms["Duration"]["threshold"] == 50_000 == options.duration_threshold_ms
    assert (
        str(options.duration_threshold_ms) == options.to_parameters()["lambda_duration_threshold"]
    )
    assert all(a["alarmActions"] == [ARN] for a in alarms.values())
    table = mocks.one("aws:dynamodb/table:Table").inputs
    assert table["pointInTimeRecovery"] == {"enabled": True, "recoveryPeriodInDays": 35}
    off = _component(StackOptions(enable_aggregator=False), tiny_zip)
    assert not off.of_type(FUNCTION)


# -- item 11: StackManager, create_stack -----------------------------------------------------


def test_stack_manager_imports_lazily_from_zae_limiter_and_from_0_2_0s_path() -> None:
    import zae_limiter
    from zae_limiter import StackManager
    from zae_limiter.infra.stack_manager import StackManager as Old
    from zae_limiter.ops.stacks import StackManager as New

    assert StackManager is Old is New
    assert "StackManager" in zae_limiter.__all__
    # The aggregator's Lambda has boto3 but neither aioboto3 nor Pulumi: the package must still
    # import there, and StackManager only fails when asked for.
    code = (
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('aioboto3', 'aiobotocore', 'pulumi', 'pulumi_aws'):\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, B())\n"
        "import zae_limiter\n"
        "assert 'zae_limiter.stack_manager' not in sys.modules\n"
        "zae_limiter.StackOptions(enable_alarms=False)\n"
        "try:\n"
        "    zae_limiter.StackManager\n"
        "except ImportError:\n"
        "    print('lazy')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lazy"


def test_stack_manager_names() -> None:
    from zae_limiter import StackManager

    manager = StackManager("my-table", region="us-east-1")
    assert (manager.stack_name, manager.table_name) == ("ZAEL-my-table", "ZAEL-my-table")
    assert StackManager("ZAEL-my-table").stack_name == "ZAEL-my-table"
    assert (manager.region, manager.endpoint_url) == ("us-east-1", None)
    for bad in ("", "has space", "1app", "a#b", "x" * 60):
        with pytest.raises(ValidationError) as info:
            StackManager(bad)
        assert info.value.field == "name"


def test_stack_manager_has_0_2_0s_methods() -> None:
    from zae_limiter import StackManager

    def params(name: str) -> list[tuple[str, object]]:
        signature = inspect.signature(getattr(StackManager, name))
        return [(p.name, p.default) for p in signature.parameters.values()][1:]

    assert params("create_stack") == [("stack_options", None), ("wait", True)]
    assert params("delete_stack") == [("stack_name", None), ("wait", True)]
    assert params("stack_exists") == [("stack_name", None)]
    assert params("get_stack_status") == [("stack_name", None)]
    assert params("deploy_lambda_code") == [("function_name", None), ("wait", True)]
    assert [p.name for p in inspect.signature(StackManager).parameters.values()] == [
        "stack_name",
        "region",
        "endpoint_url",
    ]
    for name in (
        "create_stack",
        "delete_stack",
        "stack_exists",
        "get_stack_status",
        "deploy_lambda_code",
        "close",
        "__aenter__",
        "__aexit__",
    ):
        assert inspect.iscoroutinefunction(getattr(StackManager, name)), name


async def _version_record(endpoint_url: str, table: str) -> dict[str, Any] | None:
    from zae_limiter import Repository

    async with Repository(table, "us-east-1", endpoint_url) as repo:
        return await repo.get_version_record()


async def test_stack_manager_on_a_local_endpoint_is_the_table(endpoint_url: str) -> None:
    import boto3

    from zae_limiter import RateLimiter, StackManager
    from zae_limiter.ops import table as direct

    async with StackManager("local-app", "us-east-1", endpoint_url) as manager:
        assert await manager.get_stack_status(manager.stack_name) is None
        assert await manager.stack_exists(manager.stack_name) is False
        result = await manager.create_stack(
            StackOptions(billing_mode="PROVISIONED", read_capacity=3, write_capacity=4)
        )
        assert result == {
            "stack_id": "ZAEL-local-app",
            "stack_name": "ZAEL-local-app",
            "status": "CREATE_COMPLETE",
        }
        assert await manager.stack_exists(manager.stack_name) is True
        assert await manager.get_stack_status() == "CREATE_COMPLETE"
        assert await manager.stack_exists("other") is False
        again = await manager.create_stack()
        assert again["status"] == "CREATE_COMPLETE"
        assert again["message"] == "Stack already exists with status: CREATE_COMPLETE"
        assert (await manager.deploy_lambda_code())["status"] == "skipped_local"
        with pytest.raises(ValidationError, match="function_name"):
            await manager.deploy_lambda_code("other-function")
        repository = manager.repository
    assert manager.repository is None and repository is not None  # closed on exit

    client = boto3.client("dynamodb", endpoint_url=endpoint_url, region_name="us-east-1")
    info = direct.describe(client, "local-app")
    assert (info["billing_mode"], info["read_capacity"], info["write_capacity"]) == (
        "PROVISIONED",
        3,
        4,
    )
    record = await _version_record(endpoint_url, "ZAEL-local-app")
    assert record is not None  # limiters check it on first use
    async with RateLimiter("local-app", endpoint_url=endpoint_url) as limiter:
        from zae_limiter import Limit

        async with limiter.acquire("k", "gpt", [Limit.per_minute("rpm", 5)], {"rpm": 1}):
            pass

    manager = StackManager("local-app", "us-east-1", endpoint_url)
    await manager.delete_stack(manager.stack_name)
    assert await manager.get_stack_status() is None
    await manager.delete_stack()  # nothing to delete: no error, as in 0.2.0
    await manager.close()
    assert direct.describe(client, "local-app")["exists"] is False


async def test_local_create_race_raises_stack_already_exists(
    endpoint_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zae_limiter import StackManager
    from zae_limiter.storage.dynamodb.repository import Repository

    async with StackManager("race", endpoint_url=endpoint_url) as first:
        await first.create_stack()

    # Another process created the table between this one's check and its creation.
    async def absent(self: Repository) -> bool:
        return False

    monkeypatch.setattr(Repository, "table_exists", absent)
    async with StackManager("race", endpoint_url=endpoint_url) as second:
        with pytest.raises(StackAlreadyExistsError) as info:
            await second.create_stack()
    assert isinstance(info.value, StackCreationError)
    assert info.value.stack_name == "ZAEL-race"


async def test_local_create_without_create_table_needs_the_table(endpoint_url: str) -> None:
    from zae_limiter import StackManager

    async with StackManager("nothing", endpoint_url=endpoint_url) as manager:
        with pytest.raises(StackCreationError, match="create_table=False"):
            await manager.create_stack(StackOptions(create_table=False))
        await manager.create_stack()
        result = await manager.create_stack(StackOptions(create_table=False))
        assert "already exists" in result["message"]


async def test_rate_limiter_create_stack_on_a_local_endpoint(endpoint_url: str) -> None:
    from zae_limiter import RateLimiter, StackManager

    limiter = RateLimiter(
        "lim", endpoint_url=endpoint_url, stack_options=StackOptions(tags={"team": "gw"})
    )
    try:
        result = await limiter.create_stack()
        assert result["status"] == "CREATE_COMPLETE" and result["stack_name"] == "ZAEL-lim"
        assert "message" in await limiter.create_stack(StackOptions())
        async with StackManager("lim", endpoint_url=endpoint_url) as manager:
            assert await manager.stack_exists()
        await limiter.delete_stack()
        async with StackManager("lim", endpoint_url=endpoint_url) as manager:
            assert not await manager.stack_exists()
    finally:
        await limiter.close()


def test_sync_rate_limiter_create_stack(endpoint_url: str) -> None:
    from zae_limiter import SyncRateLimiter

    limiter = SyncRateLimiter("sync-lim", endpoint_url=endpoint_url)
    try:
        assert limiter.create_stack()["status"] == "CREATE_COMPLETE"
        assert "message" in limiter.create_stack()
        limiter.delete_stack()
        assert limiter.create_stack(StackOptions())["status"] == "CREATE_COMPLETE"
    finally:
        limiter.delete_stack()
        limiter.close()


# -- the AWS path: a stand-in Pulumi stack whose `up` runs the real program under mocks --------


@dataclass
class Update:
    kind: str
    result: str


@pytest.mark.parametrize(
    ("history", "status"),
    [
        ([], None),
        ([Update("refresh", "succeeded")], None),
        ([Update("update", "succeeded")], "CREATE_COMPLETE"),
        ([Update("update", "in-progress")], "CREATE_IN_PROGRESS"),
        ([Update("update", "failed")], "CREATE_FAILED"),
        (
            [
                Update("update", "succeeded"),
                Update("refresh", "succeeded"),
                Update("update", "succeeded"),
            ],
            "UPDATE_COMPLETE",
        ),
        ([Update("update", "failed"), Update("update", "succeeded")], "UPDATE_FAILED"),
        ([Update("update", "succeeded"), Update("update", "failed")], "CREATE_COMPLETE"),
        ([Update("update", "in-progress"), Update("update", "succeeded")], "UPDATE_IN_PROGRESS"),
        ([Update("destroy", "succeeded"), Update("update", "succeeded")], "DELETE_COMPLETE"),
        ([Update("destroy", "in-progress"), Update("update", "succeeded")], "DELETE_IN_PROGRESS"),
        ([Update("destroy", "failed"), Update("update", "succeeded")], "DELETE_FAILED"),
        (
            [
                Update("update", "succeeded"),
                Update("destroy", "succeeded"),
                Update("update", "succeeded"),
            ],
            "CREATE_COMPLETE",
        ),
    ],
)
def test_pulumi_history_reads_as_cloudformation_status(
    history: list[Update], status: str | None
) -> None:
    from zae_limiter.infra.automation import status_from_history

    assert status_from_history(history) == status


@dataclass
class FakeStack(ConfigStack):
    """A Pulumi automation Stack as `automation` uses it. `up` runs `component.stack_program`
    with this stack's config under Pulumi's mocks; `fail_with` makes the next `up` raise."""

    name: str = ""
    registry: dict[str, FakeStack] = field(default_factory=dict)
    updates: list[Update] = field(default_factory=list)
    runs: list[Any] = field(default_factory=list)
    fail_with: Exception | None = None
    history_script: list[list[Update]] = field(default_factory=list)

    def __post_init__(self) -> None:
        ConfigStack.__init__(self)
        self.workspace = SimpleNamespace(remove_stack=self._remove)

    def _remove(self, name: str) -> None:
        del self.registry[name]

    def up(self, on_output: Any = None, color: str | None = None) -> Any:
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            self.updates.insert(0, Update("update", "failed"))
            raise exc
        harness = _mocks()
        from zae_limiter.infra import component

        config = dict(self.config)
        collected: dict[str, Any] = {}

        def program() -> Any:
            import pulumi

            pulumi.runtime.set_all_config(config)
            stack = component.stack_program()
            return pulumi.Output.all(*(getattr(stack, k) for k in component.EXPORTS)).apply(
                lambda values: collected.update(zip(component.EXPORTS, values, strict=True))
            )

        self.runs.append(harness.run_program(program))
        self.updates.insert(0, Update("update", "succeeded"))
        return SimpleNamespace(outputs={k: SimpleNamespace(value=v) for k, v in collected.items()})

    def destroy(self, on_output: Any = None, color: str | None = None) -> None:
        self.updates.insert(0, Update("destroy", "succeeded"))

    def history(self) -> list[Update]:
        if self.history_script:
            return self.history_script.pop(0)
        return list(self.updates)

    def outputs(self) -> dict[str, Any]:
        return {}

    def info(self) -> None:
        return None


@dataclass
class FakePulumi:
    stacks: dict[str, FakeStack] = field(default_factory=dict)
    records: list[str] = field(default_factory=list)

    def stack(self, name: str) -> FakeStack:
        return self.stacks["ZAEL-" + name]


@pytest.fixture
def fake_pulumi(monkeypatch: pytest.MonkeyPatch, tiny_zip: Path) -> Iterator[FakePulumi]:
    pytest.importorskip("pulumi")
    pytest.importorskip("pulumi_aws")
    from zae_limiter import exceptions, schema
    from zae_limiter.infra import automation, component, package
    from zae_limiter.ops import provisioning

    fake = FakePulumi()

    def stack(name: str, create: bool) -> FakeStack:
        stack_name = schema.stack_name(automation.validate_deployment_name(name))
        if stack_name not in fake.stacks:
            if not create:
                raise exceptions.InfrastructureNotFoundError(stack_name, "no Pulumi stack")
            fake.stacks[stack_name] = FakeStack(name=stack_name, registry=fake.stacks)
        return fake.stacks[stack_name]

    async def record_deployment(repo: Any, **kwargs: Any) -> None:
        fake.records.append(repo.table_name)

    zipped = (tiny_zip, package.source_code_hash(tiny_zip.read_bytes()))
    monkeypatch.setattr(automation, "open_stack", stack)
    monkeypatch.setattr(provisioning, "record_deployment", record_deployment)
    monkeypatch.setattr(component, "cached_lambda_zip", lambda: zipped)
    monkeypatch.setattr(package, "cached_lambda_zip", lambda: zipped)
    monkeypatch.setattr(provisioning, "SETTLE_POLL_SECONDS", 0.01)
    yield fake


@pytest.mark.filterwarnings("ignore:aws.lambda/microvmsimage:DeprecationWarning")
async def test_stack_manager_deploys_the_pulumi_program_with_the_options(
    fake_pulumi: FakePulumi,
) -> None:
    from zae_limiter import StackManager

    options = StackOptions(
        lambda_memory=512,
        enable_alarms=False,
        snapshot_windows="daily",
        retention_days=7,
        role_name_format="app-{}",
        permission_boundary="MyBoundary",
        pitr_recovery_days=None,
    )
    async with StackManager("app", region="eu-west-1") as manager:
        assert await manager.get_stack_status() is None
        assert not await manager.stack_exists(manager.stack_name)
        result = await manager.create_stack(options)
        assert result["status"] == "CREATE_COMPLETE"
        assert result["stack_name"] == "ZAEL-app"
        assert result["stack_id"] == "organization/zae-limiter/ZAEL-app"
        assert result["outputs"]["table_name"] == "ZAEL-app"
        assert result["outputs"]["function_arn"].endswith(":function:ZAEL-app-aggregator")
        assert fake_pulumi.records == ["ZAEL-app"]  # the version record limiters check

        stack = fake_pulumi.stack("app")
        assert stack.config["aws:region"] == "eu-west-1"
        assert stack.config["zae-limiter:name"] == "app"
        (mocks,) = stack.runs
        function = mocks.one(FUNCTION).inputs
        assert function["memorySize"] == 512
        assert function["environment"]["variables"]["USAGE_WINDOWS"] == "daily"
        assert function["environment"]["variables"]["SNAPSHOT_TTL_DAYS"] == "7"
        assert mocks.of_type(ALARM) == []
        role = mocks.one("aws:iam/role:Role").inputs
        params = options.to_parameters(manager.stack_name)
        assert role["name"] == params["role_name"] == "app-ZAEL-app-aggregator-role"
        assert role["permissionsBoundary"].endswith(":policy/MyBoundary")
        table = mocks.one("aws:dynamodb/table:Table").inputs
        assert table["pointInTimeRecovery"] == {"enabled": True, "recoveryPeriodInDays": 35}

        assert await manager.get_stack_status(manager.stack_name) == "CREATE_COMPLETE"
        assert await manager.stack_exists()
        # an existing stack is reported, not redeployed (0.2.0)
        again = await manager.create_stack(StackOptions())
        assert again["status"] == "CREATE_COMPLETE"
        assert again["message"] == "Stack already exists with status: CREATE_COMPLETE"
        assert len(stack.runs) == 1

        # 0.2.0's deploy_lambda_code: a redeploy with the options the stack has
        deployed = await manager.deploy_lambda_code()
        assert deployed["status"] == "deployed"
        assert deployed["function_arn"].endswith(":function:ZAEL-app-aggregator")
        assert deployed["code_sha256"] == mocks.one(FUNCTION).inputs["sourceCodeHash"]
        assert deployed["size_bytes"] > 0
        assert stack.runs[1].one(FUNCTION).inputs["memorySize"] == 512
        assert await manager.get_stack_status() == "UPDATE_COMPLETE"

        await manager.delete_stack(manager.stack_name)
        assert await manager.get_stack_status() is None
        assert not await manager.stack_exists()
        await manager.delete_stack()  # nothing left: no error
        with pytest.raises(StackCreationError, match="Lambda deployment failed"):
            await manager.deploy_lambda_code()


async def test_failed_and_concurrent_creations(fake_pulumi: FakePulumi) -> None:
    from pulumi import automation as auto

    from zae_limiter import StackManager
    from zae_limiter.infra import automation

    async with StackManager("app") as manager:
        automation.open_stack("app", True).fail_with = auto.CommandError(
            auto.CommandResult("", "error: creating table: AccessDenied", 255)
        )
        with pytest.raises(StackCreationError, match="AccessDenied") as failed:
            await manager.create_stack()
        assert not isinstance(failed.value, StackAlreadyExistsError)
        assert await manager.get_stack_status() == "CREATE_FAILED"
        assert await manager.stack_exists()  # as 0.2.0 counted a failed stack
        # a failed first deployment is deployed again (Pulumi continues where it stopped)
        assert (await manager.create_stack())["status"] == "CREATE_COMPLETE"

    async with StackManager("other") as manager:
        automation.open_stack("other", True).fail_with = auto.ConcurrentUpdateError(
            auto.CommandResult("", "error: the stack is currently locked", 255)
        )
        with pytest.raises(StackAlreadyExistsError) as info:
            await manager.create_stack()
        assert info.value.stack_name == "ZAEL-other"


async def test_create_stack_waits_for_a_deployment_in_progress(fake_pulumi: FakePulumi) -> None:
    from zae_limiter import StackManager
    from zae_limiter.infra import automation

    stack = automation.open_stack("app", True)
    stack.updates = [Update("update", "succeeded")]
    stack.history_script = [[Update("update", "in-progress")]] * 3
    async with StackManager("app") as manager:
        result = await manager.create_stack()
        assert result["status"] == "already_exists_and_ready"
        stack.history_script = [[Update("update", "in-progress")]]
        result = await manager.create_stack(wait=False)
        assert result["status"] == "CREATE_IN_PROGRESS"
    assert stack.runs == []


async def test_rate_limiter_create_stack_on_aws_uses_its_stack_options(
    fake_pulumi: FakePulumi,
) -> None:
    from zae_limiter import RateLimiter

    limiter = RateLimiter("lim", region="us-east-1", stack_options=StackOptions(lambda_timeout=30))
    try:
        result = await limiter.create_stack()
        assert result["status"] == "CREATE_COMPLETE"
        (mocks,) = fake_pulumi.stack("lim").runs
        assert mocks.one(FUNCTION).inputs["timeout"] == 30
        await limiter.delete_stack()
        assert "ZAEL-lim" not in fake_pulumi.stacks
        await limiter.delete_stack()  # a missing stack is no error (0.2.0)
    finally:
        await limiter.close()


@pytest.fixture
def no_pulumi_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")


async def test_without_pulumi_the_errors_say_what_to_install(no_pulumi_cli: None) -> None:
    from zae_limiter import StackManager
    from zae_limiter.infra.automation import PulumiNotInstalledError

    async with StackManager("app", region="us-east-1") as manager:
        for call in (manager.create_stack, manager.delete_stack, manager.deploy_lambda_code):
            with pytest.raises(StackCreationError, match=r"get\.pulumi\.com"):
                await call()
        with pytest.raises(PulumiNotInstalledError):
            await manager.get_stack_status()


def test_compatibility_doc_lists_this_parts_differences() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "compatibility.md").read_text()
    for topic in (
        "`StackOptions` 0.2.0 field names",
        "`pitr_recovery_days`",
        "to_parameters(",
        "`StackManager`",
    ):
        assert topic in text, topic
