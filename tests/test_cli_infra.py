"""The infrastructure commands: without the Pulumi CLI, against a local DynamoDB, program export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from zae_limiter import schema
from zae_limiter.cli import main
from zae_limiter.infra import automation

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_pulumi_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    assert not automation.pulumi_cli_available()


@pytest.mark.parametrize(
    "args",
    [
        ["deploy", "--name", "app"],
        ["preview", "--name", "app"],
        ["status", "--name", "app"],
        ["status", "--name", "app", "--json"],
        ["delete", "--name", "app", "--yes"],
        ["delete", "--name", "app"],
    ],
)
def test_aws_commands_without_pulumi_say_what_to_install(no_pulumi_cli: None,
                                                         args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "pulumi" in result.output and "get.pulumi.com" in result.output
    assert 'pip install "zae-limiter[infra]"' in result.output
    # One readable line.
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_bad_options_are_one_line_errors(no_pulumi_cli: None) -> None:
    result = CliRunner().invoke(main, ["deploy", "--name", "app", "--billing-mode",
                                       "PROVISIONED"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "read_capacity" in result.output
    result = CliRunner().invoke(main, ["deploy", "--name", "has space"])
    assert result.exit_code != 0 and "invalid name" in result.output


def test_pulumi_program_writes_a_runnable_project(no_pulumi_cli: None, tmp_path: Path) -> None:
    out = tmp_path / "project"
    result = CliRunner().invoke(main, [
        "pulumi-program", "--name", "app", "--region", "eu-west-1", "--output", str(out),
        "--lambda-memory", "512", "--no-pitr", "--tag", "team=payments", "--usage-windows",
        "hourly",
    ])
    assert result.exit_code == 0, result.output
    main_py = (out / "__main__.py").read_text()
    compile(main_py, str(out / "__main__.py"), "exec")
    assert "stack_program" in main_py and "zae_limiter.infra.component" in main_py
    assert main_py == (REPO / "pulumi" / "__main__.py").read_text() == automation.PROGRAM_SOURCE
    assert "name: zae-limiter" in (out / "Pulumi.yaml").read_text()
    assert "zae-limiter[infra]" in (out / "requirements.txt").read_text()
    assert "ZAEL-app" in (out / "README.md").read_text()
    config = (out / f"Pulumi.{schema.stack_name('app')}.yaml").read_text().splitlines()
    assert config[0] == "config:"
    # JSON scalars are YAML: parse each line back as a JSON key/value pair.
    values = dict(json.loads("{" + line.strip() + "}").popitem() for line in config[1:])
    assert values == {
        "aws:region": "eu-west-1",
        "zae-limiter:name": "app",
        "zae-limiter:lambda_memory_mb": "512",
        "zae-limiter:point_in_time_recovery": "false",
        "zae-limiter:tags": '{"team": "payments"}',
        "zae-limiter:usage_windows": "hourly",
    }
    again = CliRunner().invoke(main, ["pulumi-program", "--name", "app", "--output", str(out)])
    assert again.exit_code != 0 and "--force" in again.output


def test_program_config_round_trips_through_options_from_config() -> None:
    pytest.importorskip("pulumi")
    from zae_limiter.infra import InfraOptions
    from zae_limiter.infra.component import options_from_config

    options = InfraOptions(
        aggregator=False, usage_windows=("daily",), pitr_recovery_days=None,
        billing_mode="PROVISIONED", read_capacity=3, write_capacity=4, kms_key_arn="arn:aws:kms:k",
        alarm_sns_topic_arn="arn:aws:sns:t", tags={"a": "b"}, error_threshold=2.5,
        create_app_policy=True, log_level="DEBUG",
    )

    class FakeConfig:
        def __init__(self, values: dict[str, str]) -> None:
            self.values = values

        def get(self, key: str) -> str | None:
            return self.values.get(key)

    assert options_from_config(FakeConfig(options.config_values())) == options
    assert options_from_config(FakeConfig({})) == InfraOptions()
    # What status() reports (config without namespace, `name` included) reads back the same way.
    assert InfraOptions.from_config_values({"name": "x", **options.config_values()}) == options
    assert InfraOptions.from_config_values({"usage_windows": "daily"}).usage_windows == ("daily",)


def test_local_endpoint_deploy_status_delete(endpoint_url: str) -> None:
    runner = CliRunner()
    base = ["--name", "cli-app", "--endpoint-url", endpoint_url]
    result = runner.invoke(main, ["status", *base])
    assert result.exit_code != 0 and "ZAEL-cli-app not found" in result.output
    assert f"zae-limiter deploy --name cli-app --endpoint-url {endpoint_url}" in result.output

    result = runner.invoke(main, ["deploy", *base])
    assert result.exit_code == 0, result.output
    assert "ZAEL-cli-app created" in result.output
    result = runner.invoke(main, ["deploy", *base])
    assert result.exit_code == 0 and "already exists" in result.output

    result = runner.invoke(main, ["status", *base, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["exists"] and info["table_name"] == "ZAEL-cli-app"
    assert info["ttl_attribute"] == schema.TABLE.ttl_attribute
    assert info["ttl_status"] == "ENABLED"
    assert info["stream_enabled"] and info["stream_view_type"] == schema.TABLE.stream_view_type
    assert info["indexes"] == [i.name for i in schema.TABLE.global_secondary_indexes]
    assert info["billing_mode"] == "PAY_PER_REQUEST"
    # deploy wrote the version record that limiters check on first use
    from zae_limiter import __version__

    assert info["version"]["record_exists"] and info["version"]["compatible"]
    assert info["version"]["schema_version"] == schema.SCHEMA_VERSION
    assert info["version"]["lambda_version"] == __version__

    result = runner.invoke(main, ["status", *base])
    assert result.exit_code == 0 and "ZAEL-cli-app" in result.output

    result = runner.invoke(main, ["delete", *base], input="n\n")
    assert result.exit_code != 0
    result = runner.invoke(main, ["delete", *base, "--yes"])
    assert result.exit_code == 0 and "deleted" in result.output
    result = runner.invoke(main, ["status", *base, "--json"])
    assert result.exit_code == 1 and json.loads(result.output)["exists"] is False


def test_direct_provisioning_is_idempotent_and_honours_billing(endpoint_url: str) -> None:
    import boto3

    from zae_limiter.models import StackOptions
    from zae_limiter.ops import table as direct

    client = boto3.client("dynamodb", endpoint_url=endpoint_url, region_name="us-east-1")
    options = StackOptions(billing_mode="PROVISIONED", read_capacity=3, write_capacity=4)
    assert direct.ensure_table(client, "prov", options) is True
    assert direct.ensure_table(client, "prov", options) is False
    info = direct.describe(client, "prov")
    assert (info["billing_mode"], info["read_capacity"], info["write_capacity"]) == (
        "PROVISIONED", 3, 4)
    assert direct.delete_table(client, "prov") is True
    assert direct.delete_table(client, "prov") is False
    assert direct.describe(client, "prov") == {"exists": False, "table_name": "ZAEL-prov"}


def test_cli_module_imports_without_pulumi(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI must load (and `pulumi-program` work) when the infra extra is absent.
    import subprocess

    code = (
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pulumi', 'pulumi_aws'):\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, B())\n"
        "import zae_limiter.cli.infra, zae_limiter.infra.automation, zae_limiter.ops.table\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_automation_config_replaces_stale_options(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pulumi")
    from pulumi import automation as auto

    from zae_limiter.infra import InfraOptions

    class FakeStack:
        def __init__(self) -> None:
            self.config: dict[str, str] = {
                "zae-limiter:billing_mode": "PROVISIONED", "aws:region": "x", "other:key": "kept",
            }

        def get_all_config(self) -> dict[str, auto.ConfigValue]:
            return {k: auto.ConfigValue(v) for k, v in self.config.items()}

        def remove_all_config(self, keys: list[str]) -> None:
            for key in keys:
                del self.config[key]

        def set_all_config(self, values: dict[str, auto.ConfigValue]) -> None:
            self.config.update({k: v.value for k, v in values.items()})

    stack = FakeStack()
    automation.configure_stack(stack, "ZAEL-app", "eu-west-1",  # type: ignore[arg-type]
                          InfraOptions(lambda_memory_mb=512))
    assert stack.config == {
        "aws:region": "eu-west-1", "other:key": "kept", "zae-limiter:name": "app",
        "zae-limiter:lambda_memory_mb": "512",
    }


def test_state_dir_is_overridable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZAE_LIMITER_PULUMI_HOME", str(tmp_path / "state"))
    assert automation.state_dir() == tmp_path / "state"
    monkeypatch.delenv("ZAE_LIMITER_PULUMI_HOME")
    assert automation.state_dir() == Path.home() / ".zae-limiter" / "pulumi"


@pytest.fixture
def no_aws_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A newcomer's machine: no AWS credentials, profile, region or config files at all."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


@pytest.mark.integration
def test_local_endpoint_needs_no_aws_configuration(endpoint_url: str,
                                                   no_aws_configuration: None) -> None:
    runner = CliRunner()
    base = ["--name", "newcomer", "--endpoint-url", endpoint_url]
    result = runner.invoke(main, ["deploy", *base])
    assert result.exit_code == 0, result.output
    assert "ZAEL-newcomer created" in result.output and "Error" not in result.output

    result = runner.invoke(main, ["status", *base, "--json"])
    assert result.exit_code == 0, result.output
    version = json.loads(result.output)["version"]
    assert "error" not in version, version
    assert version["record_exists"] and version["compatible"]  # deploy wrote the record
    result = runner.invoke(main, ["status", *base])
    assert result.exit_code == 0 and "error" not in result.output, result.output
    assert "record_exists" in result.output

    # the operator commands too
    for args in (["entity", "create", "k"], ["limits", "set", "k", "--limit", "rpm:5/minute"],
                 ["bucket", "show", "k"], ["check"], ["aggregator", "run"],
                 ["usage", "--entity", "k"], ["delete", "--yes"]):
        result = runner.invoke(main, [*args, *base])
        assert result.exit_code == 0, (args, result.output)
        assert "credentials" not in result.output, (args, result.output)
    # and nothing was written into the environment to get there
    import os

    assert "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_DEFAULT_REGION" not in os.environ
