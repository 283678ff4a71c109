"""The pytest plugin for users' tests (`zae_limiter.testing`, docs/testing.md), run as a user runs
it: test files that name its fixtures and nothing else, in a pytest session of their own
(`pytester`: in this process, or a subprocess where the environment must differ)."""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import zae_limiter.testing

# Loaded here, before any inner session: an in-process session forgets the modules it imported
# when it ends, and a class imported again would no longer be the one the package's face holds.
from zae_limiter import MemoryStorage, RateLimiter

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "testing.md"
FIXTURES = {"memory_limiter", "local_dynamodb_endpoint"}
ENTRY_POINT = ("zae_limiter", "zae_limiter.testing")


def installed_entry_point() -> bool:
    return any((ep.name, ep.value) == ENTRY_POINT for ep in entry_points(group="pytest11"))


# An install made from this pyproject (CI installs the package afresh) registers the plugin
# through its entry point, as a user's does. An editable install older than the entry point
# has none: the inner sessions then name the plugin. Never both: pluggy refuses one module
# registered under two names. `test_the_entry_point_declared_in_pyproject_loads_the_plugin`
# checks the entry point itself either way.
PLUGIN = [] if installed_entry_point() else ["-p", "zae_limiter.testing"]
# pytest-asyncio warns when the fixtures' default loop scope is not set: set, as users should.
LOOP_SCOPE = ["-o", "asyncio_default_fixture_loop_scope=function"]
STRICT = ["-o", "asyncio_mode=strict", *LOOP_SCOPE]
AUTO = ["-o", "asyncio_mode=auto", *LOOP_SCOPE]

# A user's test that records, at the limiter's close, whether it ran in the test's own loop.
CLOSE_RECORDER = '''
import asyncio
from pathlib import Path

from zae_limiter import Limit, MemoryStorage, RateLimiter, RateLimitExceeded

ONE = [Limit.per_minute("rpm", 1)]


def record_close(limiter, name):
    test_loop = asyncio.get_running_loop()
    original = limiter.close

    async def close():
        same = asyncio.get_running_loop() is test_loop
        Path(name).write_text("test's loop" if same else "another loop")
        await original()

    limiter.close = close  # the fixture's teardown calls this


async def use(limiter, name):
    assert isinstance(limiter, RateLimiter)
    assert isinstance(limiter.repository, MemoryStorage)
    record_close(limiter, name)
    async with limiter.acquire("key-1", "chat", ONE, {"rpm": 1}):
        pass
    try:
        async with limiter.acquire("key-1", "chat", ONE, {"rpm": 1}):
            pass
    except RateLimitExceeded:
        return
    raise AssertionError("the second acquire was admitted")
'''


def guide_files() -> dict[str, str]:
    """docs/testing.md's Python blocks, by the file name on their first line (`# app.py`)."""
    found = {}
    for block in re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), re.S | re.M):
        first, _, rest = block.partition("\n")
        if first.startswith("# ") and first.endswith(".py"):
            found[first[2:]] = rest
    return found


def test_the_guides_files_pass_in_strict_mode(pytester: pytest.Pytester) -> None:
    files = guide_files()
    assert set(files) == {"app.py", "test_app.py", "test_app_dynamodb.py"}
    pytester.makepyfile(**{name.removesuffix(".py"): text for name, text in files.items()})
    pytester.syspathinsert()  # the tests import `app`, as from a project's root
    result = pytester.runpytest(*PLUGIN, *STRICT, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize("mode", [STRICT, AUTO], ids=["strict", "auto"])
def test_memory_limiter_is_fresh_per_test_and_closed_in_the_tests_loop(
    pytester: pytest.Pytester, mode: list[str]
) -> None:
    pytester.makepyfile(recorder=CLOSE_RECORDER)
    # Each test takes the whole of a 1-per-minute limit: both pass only on fresh storage.
    marked = "@pytest.mark.asyncio\n" if mode is STRICT else ""
    pytester.makepyfile(
        test_user=f"""
import pytest
from recorder import use

{marked}async def test_first(memory_limiter):
    await use(memory_limiter, "first.closed")

{marked}async def test_second(memory_limiter):
    await use(memory_limiter, "second.closed")
"""
    )
    pytester.syspathinsert()
    result = pytester.runpytest(*PLUGIN, *mode, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    for name in ("first.closed", "second.closed"):
        assert (pytester.path / name).read_text() == "test's loop"


def test_memory_limiter_without_pytest_asyncio(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pytest-asyncio to import: a plain fixture, for anyio's plugin and for `asyncio.run`
    in a plain test, closed at teardown in a loop of its own. A subprocess: this process has
    imported pytest_asyncio, and the plugin looks for it when it loads."""
    blocker = pytester.mkdir("no_pytest_asyncio") / "pytest_asyncio"
    blocker.mkdir()
    (blocker / "__init__.py").write_text('raise ImportError("pytest-asyncio is not installed")\n')
    pytester.makepyfile(recorder=CLOSE_RECORDER)
    pytester.makepyfile(
        test_user="""
import asyncio
import pytest
from recorder import use

@pytest.fixture
def anyio_backend():
    return "asyncio"

@pytest.mark.anyio
async def test_with_anyio(memory_limiter):
    await use(memory_limiter, "anyio.closed")

def test_with_asyncio_run(memory_limiter):
    asyncio.run(use(memory_limiter, "run.closed"))
"""
    )
    pythonpath = [str(blocker.parent), str(pytester.path), str(ROOT / "python")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(pythonpath))
    # `-p no:asyncio`: pytest-asyncio's own entry point would fail to import too.
    result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:asyncio", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    for name in ("anyio.closed", "run.closed"):
        assert (pytester.path / name).read_text() == "another loop"


def test_local_dynamodb_endpoint_is_one_server_per_session_stopped_at_its_end(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_user="""
import urllib.request
from pathlib import Path

def answer(endpoint, name):
    Path(name).write_text(endpoint)
    with urllib.request.urlopen(endpoint + "/moto-api/", timeout=5) as response:
        assert response.status == 200

def test_one(local_dynamodb_endpoint):
    answer(local_dynamodb_endpoint, "one.url")

def test_two(local_dynamodb_endpoint):
    answer(local_dynamodb_endpoint, "two.url")
"""
    )
    result = pytester.runpytest(*PLUGIN, *LOOP_SCOPE, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    first, second = ((pytester.path / f"{n}.url").read_text() for n in ("one", "two"))
    assert first == second  # one server for the session
    address = urlsplit(first)
    assert address.hostname == "127.0.0.1" and address.port is not None
    with pytest.raises(ConnectionRefusedError):  # stopped when the session ended
        socket.create_connection((address.hostname, address.port), timeout=5).close()


def test_without_moto_local_dynamodb_endpoint_fails_in_one_line_naming_the_extra(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "moto.server", None)  # `import moto.server` fails
    pytester.makepyfile(test_user="def test_it(local_dynamodb_endpoint):\n    pass\n")
    result = pytester.runpytest(*PLUGIN, *LOOP_SCOPE, "-p", "no:cacheprovider", "-rN")
    result.assert_outcomes(errors=1)
    expected = (
        'local_dynamodb_endpoint: the embedded DynamoDB needs moto: '
        'pip install "zae-limiter[local]"'
    )
    naming = [line for line in result.outlines if "zae-limiter[local]" in line]
    assert naming == [expected]
    assert not any("testing.py" in line for line in result.outlines)  # no traceback


def test_the_entry_point_declared_in_pyproject_loads_the_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytest's own entry-point loading, with the entry point exactly as pyproject.toml declares
    it, in a distribution's metadata made here: the one this environment's editable install has
    may predate it. Also: `-p no:zae_limiter` (its documented name) turns the plugin off."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared["pytest11"] == {ENTRY_POINT[0]: ENTRY_POINT[1]}
    site = pytester.mkdir("site")
    meta = site / "zae_limiter_plugin_probe-0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: zae-limiter-plugin-probe\nVersion: 0\n"
    )
    (meta / "entry_points.txt").write_text(
        "[pytest11]\n" + "".join(f"{k} = {v}\n" for k, v in declared["pytest11"].items())
    )
    pytester.makepyfile(
        test_user="""
from zae_limiter import RateLimiter

def test_it(memory_limiter):
    assert isinstance(memory_limiter, RateLimiter)
"""
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT / "python")]))
    loaded = pytester.runpytest_subprocess(*AUTO, "-p", "no:cacheprovider")
    loaded.assert_outcomes(passed=1)
    off = pytester.runpytest_subprocess(*AUTO, "-p", "no:zae_limiter", "-p", "no:cacheprovider")
    off.assert_outcomes(errors=1)
    off.stdout.fnmatch_lines(["*fixture 'memory_limiter' not found*"])


def test_the_plugin_defines_fixtures_only_with_names_the_suite_does_not_use() -> None:
    """It loads in every pytest run where zae-limiter is installed, this repository's too: no
    hook (`pytest_*`) that could change a run, and no fixture name of the suite's own."""
    hooks = [name for name in vars(zae_limiter.testing) if name.startswith("pytest_")]
    assert hooks == []
    suite_fixtures = set()
    for path in [ROOT / "conftest.py", *ROOT.glob("tests/**/*.py"), *ROOT.glob("benches/*.py")]:
        if path.name == Path(__file__).name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                "fixture" in ast.unparse(d) for d in node.decorator_list
            ):
                suite_fixtures.add(node.name)
    assert "endpoint_url" in suite_fixtures  # the scan sees the suite's fixtures
    assert suite_fixtures & FIXTURES == set()


def test_loading_the_plugin_loads_neither_the_limiter_nor_moto() -> None:
    """Loading it costs a pytest run only `import zae_limiter` (models and exceptions): the
    limiter, aioboto3 and moto are imported when a fixture runs."""
    code = (
        "import sys, zae_limiter.testing\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(("
        "'zae_limiter.limiter', 'zae_limiter.storage', 'zae_limiter.ops', 'aioboto3', 'moto'"
        ")))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == ""


def test_new_memory_limiter_gives_each_limiter_a_storage_of_its_own() -> None:
    first = zae_limiter.testing.new_memory_limiter()
    second = zae_limiter.testing.new_memory_limiter()
    assert isinstance(first, RateLimiter) and isinstance(first.repository, MemoryStorage)
    assert first.repository is not second.repository
    assert first.name == zae_limiter.testing.LIMITER_NAME
