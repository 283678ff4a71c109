"""The CLI's shared toolkit and the newcomer fixes that go through it: one options decorator,
one error handler (shell advice, one line), one output function, tables that never truncate,
`local` on a busy port, `demo` against an unreachable endpoint, `bucket show` of nobody,
`migrate --dry-run` without `--to`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from zae_limiter import Limit, RateLimiter, StackOptions
from zae_limiter.cli import main, toolkit
from zae_limiter.exceptions import InfrastructureNotFoundError, RateLimiterUnavailable
from zae_limiter.ops.local import LocalDynamoDB

CLI_DIR = Path(__file__).resolve().parent.parent / "python" / "zae_limiter" / "cli"
CLI = [sys.executable, "-c", "from zae_limiter.cli import main; main()"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
SPINNER = set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")

pytestmark = pytest.mark.integration


def lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, list(args), env=env)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.fixture
def table(endpoint_url: str) -> str:
    async def setup() -> None:
        async with RateLimiter(name="kit", endpoint_url=endpoint_url,
                               stack_options=StackOptions()) as lim:
            await lim.create_entity("proj")
            await lim.create_entity("key", parent_id="proj")
            await lim.set_limits("key", [Limit.per_hour("rpm", 10),
                                         Limit.per_hour("tpm", 1000, 1500)], "gpt-4o")
            async with lim.acquire("key", "gpt-4o", None, {"rpm": 1, "tpm": 400},
                                   use_stored_limits=True):
                pass
    asyncio.run(setup())
    return endpoint_url


# -- structure: one of each ---------------------------------------------------------------------


def _walk(command: click.Command, path: str = "") -> list[tuple[str, click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _walk(sub, f"{path} {name}".strip())
    return found


def test_one_toolkit_for_every_command() -> None:
    sources = {p.name: p.read_text() for p in CLI_DIR.glob("*.py")}
    assert "ops.py" not in sources and "render.py" not in sources
    for name, text in sources.items():
        if name == "toolkit.py":
            continue
        assert "if as_json" not in text and "as_json" not in text, name
        assert "def _default_region" not in text and "def _common" not in text, name
        assert "def _friendly" not in text and "def _readable_errors" not in text, name
        assert "boto3.client(" not in text and "Repository(" not in text, name


def test_every_region_option_has_the_one_default() -> None:
    with_region = []
    for path, command in _walk(main):
        for param in command.params:
            if param.name == "region":
                with_region.append(path)
                assert param.default is toolkit.default_region, path
                assert param.show_default == toolkit.REGION_DEFAULT_TEXT, path
    assert {"usage", "aggregator run", "dlq replay", "deploy", "bucket show"} <= set(with_region)
    text = invoke("usage", "--help").output + invoke("aggregator", "run", "--help").output
    assert "".join(text.split()).count("$AWS_DEFAULT_REGIONorus-east-1") == 2


def test_usage_and_aggregator_run_need_no_region(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    base = ["--name", "kit", "--endpoint-url", table]
    assert json.loads(invoke("aggregator", "run", *base, "--json").output)["failed"] == 0
    shown = invoke("usage", *base, "--entity", "key", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["summary"]["totals"] == {"rpm": 1, "tpm": 400}


# -- the error handler ----------------------------------------------------------------------------


def test_missing_table_gives_shell_advice_not_python(endpoint_url: str) -> None:
    for args in (["entity", "create", "x"], ["version"], ["bucket", "show", "x"],
                 ["usage", "--entity", "x"], ["aggregator", "run"], ["status"],
                 ["limits", "get", "x"]):
        result = invoke(*args, "--name", "nope", "--endpoint-url", endpoint_url)
        assert result.exit_code == 1, (args, result.output)
        assert len(lines(result)) == 1, (args, result.output)
        assert "ZAEL-nope not found" in result.output, args
        assert f"zae-limiter deploy --name nope --endpoint-url {endpoint_url}" in result.output
        assert "StackOptions" not in result.output and "stack_options" not in result.output


def test_error_messages_are_for_a_shell() -> None:
    aws = toolkit.Target.of("app", "eu-west-1")
    message = toolkit.error_message(InfrastructureNotFoundError("ZAEL-app"), aws)
    assert message is not None and "StackOptions" not in message
    assert message.endswith("create it with: zae-limiter deploy --name app --region eu-west-1")
    stack = InfrastructureNotFoundError("ZAEL-app", "no Pulumi stack ZAEL-app in /state")
    message = toolkit.error_message(stack, aws)
    assert message is not None
    assert message.startswith("stack ZAEL-app not found in eu-west-1 (no Pulumi stack")
    local = toolkit.Target.of("app", None, "http://127.0.0.1:1")
    down = RateLimiterUnavailable('Could not connect to the endpoint URL: "http://127.0.0.1:1/"')
    message = toolkit.error_message(down, local)
    assert message is not None and "start one with: zae-limiter local" in message
    assert toolkit.error_message(KeyError("bug"), local) is None  # bugs keep their traceback


def test_bucket_show_of_a_missing_entity_fails(table: str) -> None:
    base = ["--name", "kit", "--endpoint-url", table]
    for extra in ([], ["--json"], ["--resource", "gpt-4o"]):
        result = invoke("bucket", "show", "nobody", *base, *extra)
        assert result.exit_code == 1, result.output
        assert lines(result) == ["Error: Entity not found: nobody"]
    # an entity without buckets, and buckets without an entity, are not errors
    assert invoke("bucket", "show", "proj", *base).output.strip() == "no buckets for proj"
    asyncio.run(_consume_unregistered(table))
    shown = json.loads(invoke("bucket", "show", "loose", *base, "--json").output)
    assert [r["limit"] for r in shown["limits"]] == ["rpm"]


async def _consume_unregistered(endpoint_url: str) -> None:
    async with (
        RateLimiter(name="kit", endpoint_url=endpoint_url) as lim,
        lim.acquire("loose", "gpt-4o", [Limit.per_minute("rpm", 5)], {"rpm": 1}),
    ):
        pass


async def _downgrade_record(endpoint_url: str) -> None:
    """Make the table's record say 1.0.0, as a table created by an earlier release does."""
    async with RateLimiter(name="kit", endpoint_url=endpoint_url) as lim:
        await lim.repository.set_version_record(schema_version="1.0.0")


def test_migrate_dry_run_without_to_plans_the_latest(table: str) -> None:
    base = ["--name", "kit", "--endpoint-url", table]
    assert "default: the latest" in invoke("migrate", "--help").output
    asyncio.run(_downgrade_record(table))
    plan = json.loads(invoke("migrate", "--dry-run", *base, "--json").output)
    assert plan["dry_run"] and plan["from_version"] == "1.0.0"
    assert plan["to_version"] == "1.2.0"
    assert [p["to_version"] for p in plan["planned"]] == ["1.1.0", "1.2.0"]
    text = invoke("migrate", "--dry-run", *base)
    assert text.exit_code == 0 and "migrate 1.0.0 -> 1.1.0" in text.output
    assert "migrate 1.1.0 -> 1.2.0" in text.output
    assert json.loads(invoke("version", *base, "--json").output)["schema_version"] == "1.0.0"
    assert invoke("migrate", "--dry-run").exit_code == 2  # still needs a table to plan for


# -- output ----------------------------------------------------------------------------------------


def test_tables_never_truncate_at_80_columns(table: str) -> None:
    base = ["--name", "kit", "--endpoint-url", table]
    env = {"COLUMNS": "80"}
    shown = invoke("bucket", "show", "key", *base, env=env)
    assert shown.exit_code == 0, shown.output
    for word in ("resource", "definition", "full_at", "available", "consumed", "released",
                 "gpt-4o", "1000:1500:1000:3600", "10:10:10:3600"):
        assert word in shown.output, word
    assert "…" not in shown.output
    got = invoke("limits", "get", "key", *base, env=env).output
    assert "tpm:1000/hour,burst=1500" in got and "refill_period_seconds" in got
    assert "…" not in got
    status = invoke("status", *base, env=env).output
    assert "arn:aws:dynamodb:us-east-1:123456789012:table/ZAEL-kit/stream/" in status
    assert "…" not in status


def test_json_and_human_views_come_from_the_same_data(table: str) -> None:
    base = ["--name", "kit", "--endpoint-url", table]
    data = json.loads(invoke("entity", "show", "key", *base, "--json").output)
    assert data["limits"] == {"gpt-4o": ["rpm:10/hour", "tpm:1000/hour,burst=1500"]}
    human = invoke("entity", "show", "key", *base).output
    assert "gpt-4o=rpm:10/hour, tpm:1000/hour,burst=1500" in human
    assert "{" not in human and "[" not in human


# -- local and demo --------------------------------------------------------------------------------


def test_local_refuses_a_port_already_in_use(moto_server: LocalDynamoDB) -> None:
    # Another embedded DynamoDB on the port: it used to answer, and `local` printed its endpoint
    # and exited 0 without serving anything.
    result = invoke("local", "--port", str(moto_server.port))
    assert result.exit_code == 1, result.output
    assert len(lines(result)) == 1 and "already in use" in result.output
    assert str(moto_server.port) in result.output
    # Any other program listening there.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("local", "--port", str(port))
    assert result.exit_code == 1 and len(lines(result)) == 1 and "already in use" in result.output


def test_local_serves_until_terminated() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([*CLI, "local", "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first, first
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # the moto child went with it: the port is free again
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as again:
            try:
                again.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.1)


def test_local_says_how_to_point_at_it_and_when_it_stopped() -> None:
    process = subprocess.Popen([*CLI, "local"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        endpoint = process.stdout.readline().split()[-1]
        shown = [process.stdout.readline() for _ in range(3)]
        assert any(f"export AWS_ENDPOINT_URL={endpoint}\n" in line for line in shown), shown
        process.send_signal(signal.SIGINT)  # Ctrl+C
        # A bound for a hang: the child's stop alone may take 10 s on a loaded machine.
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        assert "embedded DynamoDB stopped" in rest, rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_demo_against_an_unreachable_endpoint_is_one_line() -> None:
    result = subprocess.run([*CLI, "demo", "--endpoint-url", "http://127.0.0.1:1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Unclosed client session" not in result.stderr and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("Error: ") and "http://127.0.0.1:1" in errors[0]
    assert "zae-limiter local" in errors[0]


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_demo_spinner_stops_before_the_results() -> None:
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="160", LINES="50", TERM="xterm")
    process = subprocess.Popen([*CLI, "demo", "--keys", "2", "--clients", "2", "--requests", "4"],
                               stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=30) == 0
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()
    output = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
    assert "Starting the embedded DynamoDB" in output  # there was a spinner, on a terminal
    results = output[output.index("chat requests from"):]
    assert "API keys" in results and "Usage snapshots by the aggregator" in results
    assert "Starting the embedded DynamoDB" not in results and "Running " not in results
    assert not SPINNER & set(results), results
