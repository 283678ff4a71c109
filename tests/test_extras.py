"""Without an extra's packages, what needs them says which extra in one line and exits 2.

Each case runs in a subprocess whose `-c` sets `sys.modules[name] = None` for the extra's
modules before anything imports them: `import name` then fails as if it were not installed,
while the test's own interpreter keeps them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CLI = "from zae_limiter.cli import main; main(sys.argv[1:], prog_name='zae-limiter')"
GATEWAY = (
    "import runpy; sys.argv = ['llm_gateway', '--port', '0']; "
    "runpy.run_module('examples.llm_gateway', run_name='__main__', alter_sys=True)"
)


def run_without(
    blocked: Sequence[str], code: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    prelude = f"import sys\nfor name in {list(blocked)!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code, *args],
        cwd=ROOT,  # `-c` puts the working directory first on sys.path: `examples` imports
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a run that exited 2 with no traceback and no other output."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(project["optional-dependencies"])


# -- [gateway]: python -m examples.llm_gateway ---------------------------------------------


@pytest.mark.parametrize("module", ["uvicorn", "starlette", "moto", "flask_cors"])
def test_the_gateway_without_its_extra_names_it(module: str) -> None:
    line = one_line(run_without([module], GATEWAY))
    assert module in line
    assert "pip install 'zae-limiter[gateway]'" in line


def test_the_gateway_extra_holds_what_the_example_imports() -> None:
    gateway = extras()["gateway"]
    names = {spec.split(">")[0].split("[")[0].split("!")[0].strip() for spec in gateway}
    assert {"starlette", "uvicorn", "zae-limiter"} <= names
    assert "zae-limiter[local]" in gateway  # the embedded DynamoDB: moto's server
    readme = (ROOT / "examples" / "llm_gateway" / "README.md").read_text()
    assert "pip install 'zae-limiter[gateway]'" in readme
    assert '.[gateway]"' in (ROOT / "README.md").read_text()


# -- [otel]: zae-limiter demo --metrics ------------------------------------------------------


def test_demo_metrics_without_the_sdk_names_the_otel_extra() -> None:
    # Told before the embedded DynamoDB starts: no output but the line.
    line = one_line(run_without(["opentelemetry.sdk"], CLI, "demo", "--metrics"))
    assert "pip install 'zae-limiter[otel]'" in line
    assert "demo --metrics" in line


def test_the_otel_extra_brings_an_sdk_and_the_prometheus_exporter() -> None:
    names = {spec.split(">")[0].strip() for spec in extras()["otel"]}
    assert names == {
        "opentelemetry-api",
        "opentelemetry-sdk",
        "opentelemetry-exporter-prometheus",
    }


# -- [infra]: the Pulumi commands --------------------------------------------------------------

PULUMI_COMMANDS = [["deploy"], ["preview"], ["status"], ["delete", "--yes"]]


@pytest.mark.parametrize("command", PULUMI_COMMANDS, ids=lambda c: c[0])
def test_pulumi_commands_without_the_packages_name_the_infra_extra(
    command: list[str], tmp_path: Path
) -> None:
    # A stand-in `pulumi` CLI on PATH: the packages are what is missing, not the CLI.
    cli = tmp_path / "pulumi"
    cli.write_text("#!/bin/sh\nexit 0\n")
    cli.chmod(0o755)
    result = run_without(
        ["pulumi", "pulumi_aws"], CLI, *command, "--name", "app", "--region", "us-east-1",
        env={"PATH": str(tmp_path)},
    )
    line = one_line(result)
    assert "Python package `pulumi`" in line
    assert 'pip install "zae-limiter[infra]"' in line


@pytest.mark.parametrize("command", PULUMI_COMMANDS, ids=lambda c: c[0])
def test_pulumi_commands_without_the_cli_say_how_to_install_it(
    command: list[str], tmp_path: Path
) -> None:
    result = run_without(
        [], CLI, *command, "--name", "app", "--region", "us-east-1", env={"PATH": str(tmp_path)}
    )
    line = one_line(result)
    assert "`pulumi` CLI" in line and "https://www.pulumi.com/docs/install/" in line
    assert 'pip install "zae-limiter[infra]"' in line
