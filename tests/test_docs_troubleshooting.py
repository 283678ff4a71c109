"""docs/troubleshooting.md cannot rot: every `zae-limiter` line of its bash blocks runs against a
local endpoint (lines marked `# AWS only` are parsed with `--help`: the command and its options
must exist), and every Python block is executed."""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from zae_limiter import Limit, RateLimiter, StackOptions
from zae_limiter.cli import main

pytestmark = pytest.mark.integration

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "troubleshooting.md"
FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)
EXIT_MARK = re.compile(r"#\s*exits?\s+(\d+)")

PLACEHOLDERS = {
    "<name>": "guide",
    "<region>": "us-east-1",
    "<entity_id>": "key-1",
    "<child_id>": "key-1",
    "<parent_id>": "project-1",
    "<resource>": "gpt-4o",
    "<limit_name>": "tpm",
    "<version>": "1.2.0",
    "<previous_version>": "1.1.0",
}


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(GUIDE.read_text())]


def commands(bash: str) -> list[str]:
    """The `zae-limiter` command lines of a bash block, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", bash)
    return [line.strip() for line in joined.splitlines()
            if line.strip().startswith("zae-limiter ")]


def substitute(text: str, extra: dict[str, str] | None = None) -> str:
    for key, value in (PLACEHOLDERS | (extra or {})).items():
        text = text.replace(key, value)
    return text


async def _setup(endpoint_url: str) -> None:
    """Idempotent: the state the guide's commands talk about (some delete it)."""
    async with RateLimiter(name="guide", endpoint_url=endpoint_url,
                           stack_options=StackOptions()) as lim:
        if await lim.get_entity("key-1") is not None:
            return
        limits = [Limit.per_minute("rpm", 100), Limit.per_minute("tpm", 10_000)]
        if await lim.get_entity("project-1") is None:
            await lim.create_entity("project-1")
            await lim.set_limits("project-1", limits)
        await lim.create_entity("key-1", parent_id="project-1")
        await lim.set_limits("key-1", limits, resource="gpt-4o")
        async with lim.acquire("key-1", "gpt-4o", None, {"rpm": 1, "tpm": 500}, cascade=True,
                               use_stored_limits=True):
            pass


def test_guide_has_the_reference_sections() -> None:
    text = GUIDE.read_text()
    for heading in ("## 1. Rate Limit Enforcement Failures", "## 2. DynamoDB Throttling",
                    "## 3. Lambda Aggregator Malfunctions", "## 4. Version Compatibility Errors",
                    "## 5. Stream Processing Lag", "## 6. Recovery Procedures",
                    "## Quick Reference", "### CLI Diagnostic Commands",
                    "### DynamoDB Key Patterns", "### Migration Rollback"):
        assert heading in text
    assert "cfn-template" not in text and "cloudformation" not in text.lower()
    assert "#BUCKET#<resource>#" not in text  # the reference's per-limit bucket key is not ours


def test_every_command_and_snippet_runs(
    endpoint_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # exports land in ./zae-limiter-backups
    ran_cli = ran_py = 0
    seen: list[str] = []
    for lang, body in blocks():
        if lang == "bash":
            for line in commands(body):
                asyncio.run(_setup(endpoint_url))
                aws_only = "# AWS only" in line
                expected = EXIT_MARK.search(line)
                exports = sorted((tmp_path / "zae-limiter-backups").glob("*.json"))
                text = substitute(line, {"<file>": str(exports[-1]) if exports else "<file>"})
                argv = shlex.split(text, comments=True)[1:]
                if aws_only:
                    argv.append("--help")
                else:
                    argv += ["--endpoint-url", endpoint_url]
                result = CliRunner().invoke(main, argv, input="y\n" * 3)
                code = int(expected.group(1)) if expected else 0
                assert result.exit_code == code, f"{text}\n{result.output}\n{result.exception!r}"
                assert "Traceback" not in result.output
                seen.append(text)
                ran_cli += 1
        elif lang == "python":
            asyncio.run(_setup(endpoint_url))
            code_text = substitute(
                body.replace('region="<region>"',
                             f'region="<region>", endpoint_url={endpoint_url!r}')
                .replace('"<region>", None)', f'"<region>", {endpoint_url!r})')
            )
            assert "<" + "name>" not in code_text
            exec(compile(code_text, str(GUIDE), "exec"), {"__name__": "__guide__"})
            ran_py += 1
    assert ran_cli >= 30 and ran_py == 4
    # The guide's promises to operators are built-in commands, not hand-written aws calls.
    for command in ("check --name", "version --name", "upgrade --name", "migrate --to",
                    "migrate rollback", "migrate list", "backup create", "backup list",
                    "restore --name", "restore --from", "bucket show", "bucket reset",
                    "entity verify", "entity show", "entity children", "limits get",
                    "limits set", "status --name", "delete --name", "deploy --name"):
        assert any(f"zae-limiter {command}" in text for text in seen), command
