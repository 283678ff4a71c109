"""Every ```python block of README.md and docs/*.md is checked, so that none rots.

- A complete program (the default) runs unchanged, as `python -c <block>` in a fresh process
  whose only DynamoDB is an embedded one (`LocalDynamoDB`) named by `AWS_ENDPOINT_URL`, the way
  `zae-limiter local` users run it: no AWS region, credentials or config file in its
  environment, a fresh server state, a timeout. It must exit 0 and write nothing to stderr: no
  traceback, no warning (ResourceWarnings are shown), no "Unclosed client session".
- A fragment, a block not meant to run alone, says so in its leading comment lines (the first
  line, or after a file name such as `# app.py` that another test reads there):
  `# fragment: needs <what it needs>` (the names it takes from elsewhere, other files, or the
  placeholders to fill in). It is compiled, top-level `await` and `async with` allowed (it
  stands for the body of an async function), and its imports from `zae_limiter` are run: the
  names it imports from the library exist.
- The README's first block is the complete program the README promises: it creates a project
  and a key under it, acquires with cascade, adjusts, and handles a denial.
"""

from __future__ import annotations

import ast
import itertools
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from zae_limiter.ops.local import LocalDynamoDB

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A fenced block whose info string starts with "python" (indented fences too, as in lists).
FENCE = re.compile(r"^([ \t]*)```python[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
FRAGMENT = re.compile(r"#\s*fragment\b")
FRAGMENT_MARK = re.compile(r"#\s*fragment:\s*needs\s+\S")
RUN_TIMEOUT = 60.0
LIBRARY = "zae_limiter"
# What would give the programs a region, credentials or another endpoint than the embedded one.
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                 "AWS_ENDPOINT_URL_DYNAMODB", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


@dataclass(frozen=True)
class Block:
    document: str  # relative to the repository
    line: int  # of the opening fence
    code: str

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    @property
    def leading_comments(self) -> list[str]:
        lines = [line.strip() for line in self.code.strip().splitlines()]
        return list(itertools.takewhile(lambda line: line.startswith("#"), lines))

    @property
    def fragment(self) -> bool:
        return any(FRAGMENT.match(line) for line in self.leading_comments)


def python_blocks() -> list[Block]:
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            found.append(Block(
                str(path.relative_to(ROOT)),
                text.count("\n", 0, match.start()) + 1,
                textwrap.dedent(match.group(2)),
            ))
    return found


BLOCKS = python_blocks()
PROGRAMS = [block for block in BLOCKS if not block.fragment]
FRAGMENTS = [block for block in BLOCKS if block.fragment]


def test_the_blocks_are_found() -> None:
    # The README's first block alone is a program; the docs hold fragments too.
    assert len(BLOCKS) >= 10 and PROGRAMS and FRAGMENTS
    assert BLOCKS[0].document == "README.md" and not BLOCKS[0].fragment


@pytest.fixture(scope="module")
def local_dynamodb() -> Iterator[LocalDynamoDB]:
    with LocalDynamoDB() as db:
        yield db


def bare_environment(tmp_path: Path, endpoint_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
    env["AWS_ENDPOINT_URL"] = endpoint_url
    env["AWS_CONFIG_FILE"] = str(tmp_path / "missing-config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "missing-credentials")
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # no instance role either
    return env


def run(code: str, db: LocalDynamoDB, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`python -c code` as a user of `zae-limiter local` runs it (ResourceWarnings shown)."""
    return subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", code],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=tmp_path,
        env=bare_environment(tmp_path, db.endpoint_url),
    )


@pytest.mark.parametrize("block", PROGRAMS, ids=[block.where for block in PROGRAMS])
def test_a_program_runs_unchanged(
    block: Block, local_dynamodb: LocalDynamoDB, tmp_path: Path
) -> None:
    local_dynamodb.reset()  # each program starts from no tables, as on a new server
    result = run(block.code, local_dynamodb, tmp_path)
    assert result.returncode == 0, f"{block.where}\n{result.stdout}\n{result.stderr}"
    assert result.stderr == "", f"{block.where}\n{result.stderr}"


def imports_the_library(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] == LIBRARY
    if isinstance(node, ast.Import):
        return all(alias.name.split(".")[0] == LIBRARY for alias in node.names)
    return False


@pytest.mark.parametrize("block", FRAGMENTS, ids=[block.where for block in FRAGMENTS])
def test_a_fragment_compiles_and_its_imports_exist(block: Block) -> None:
    marks = [line for line in block.leading_comments if FRAGMENT.match(line)]
    assert all(FRAGMENT_MARK.match(mark) for mark in marks), f"{block.where}: needs what? {marks}"
    # To bytecode, not only to a tree: some errors (`await` in a plain function) appear there.
    compile(block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    # Only the library's: other modules may be the example's own files or not installed here.
    imports: list[ast.stmt] = [
        node for node in ast.parse(block.code).body if imports_the_library(node)
    ]
    exec(compile(ast.Module(body=imports, type_ignores=[]), block.where, "exec"), {})


def test_the_readme_program_does_what_it_shows(
    local_dynamodb: LocalDynamoDB, tmp_path: Path
) -> None:
    program = BLOCKS[0]
    for shown in ("create_entity(", "parent_id=", "cascade=True", "lease.adjust(",
                  "except RateLimitExceeded", "retry_after_seconds", "asyncio.run(main())"):
        assert shown in program.code, shown
    local_dynamodb.reset()
    # A second run against the same table finds its entities (and buckets) there.
    for _ in range(2):
        result = run(program.code, local_dynamodb, tmp_path)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "admitted: estimated 500 tokens, used 1234", lines
        # Denied by the key's tpm and, through the cascade, the project's.
        assert re.fullmatch(
            r"denied by api-key-1's tpm, project-1's tpm: retry after \d+\.\d s", lines[-1]
        ), lines
