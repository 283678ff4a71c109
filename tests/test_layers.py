"""The package's layers (docs/design.md section 3): which layer may import which, read from the
sources, so that a lower layer never imports a higher one, no module imports another's private
names or an earlier path kept for users, and the earlier paths still import."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import zae_limiter

PACKAGE = Path(zae_limiter.__file__).resolve().parent

# The layer of each top-level name of the package (a module or a subpackage).
LAYER_OF = {
    "core": "core", "_native": "core",
    "_version": "domain", "models": "domain", "exceptions": "domain", "validation": "domain",
    "schema": "domain", "audit": "domain", "usage": "domain", "stack_options": "domain",
    "storage": "storage",
    "engine": "engine",
    "__init__": "limiter", "limiter": "limiter", "sync": "limiter", "lease": "limiter",
    "arguments": "limiter", "deadline": "limiter", "failures": "limiter", "metrics": "limiter",
    "version": "limiter", "entities": "limiter", "resolver": "limiter",
    "http": "http",
    "ops": "ops",
    # the pytest fixtures for users' tests: a limiter (limiter) and the embedded DynamoDB (ops)
    "testing": "ops",
    "aggregator": "aggregator",
    "infra": "infra",
    "cli": "cli",
}
# What each layer may import besides itself.
MAY_USE = {
    "core": set(),
    "domain": {"core"},
    "storage": {"core", "domain"},
    "engine": {"core", "domain", "storage"},
    "limiter": {"core", "domain", "storage", "engine"},
    "http": {"core", "domain", "limiter"},
    "aggregator": {"core", "domain"},
    "infra": {"core", "domain"},
    "ops": {"core", "domain", "storage", "engine", "limiter", "aggregator", "infra"},
    "cli": {"core", "domain", "storage", "engine", "limiter", "aggregator", "infra", "ops"},
}
# The earlier paths of moved modules, kept for users (zae-limiter 0.2.0's modules and documented
# paths): module -> its home now. No module of the package imports them.
EARLIER_PATHS = {
    "zae_limiter.bucket": "zae_limiter.core.bucket",
    "zae_limiter.repository": "zae_limiter.storage.dynamodb.repository",
    "zae_limiter.transport": "zae_limiter.storage.dynamodb.transport",
    "zae_limiter.memory": "zae_limiter.storage.memory",
    "zae_limiter.asgi": "zae_limiter.http.asgi",
    "zae_limiter.fastapi": "zae_limiter.http.fastapi",
    "zae_limiter.ratelimit_fields": "zae_limiter.http.fields",
    "zae_limiter.stack_manager": "zae_limiter.ops.stacks",
    "zae_limiter.infra.stack_manager": "zae_limiter.ops.stacks",
    "zae_limiter.local": "zae_limiter.ops.local",
    "zae_limiter.migrations": "zae_limiter.ops.migrations",
    "zae_limiter.migrations.v1_1_0": "zae_limiter.ops.migrations.v1_1_0",
    "zae_limiter.migrations.v1_2_0": "zae_limiter.ops.migrations.v1_2_0",
}
# Upward imports made only when a function runs (or for the type checker), never when a module
# loads: features of the public API whose work belongs to a higher layer. Importing the lower
# module loads none of it.
CALL_TIME_UPWARD = {
    # RateLimiter(create_stack=...), create_stack and delete_stack (zae-limiter 0.2.0's API)
    ("zae_limiter.limiter", "zae_limiter.ops.provisioning"),
    # the package's face names StackManager (0.2.0) and loads it on first use
    ("zae_limiter", "zae_limiter.ops.stacks"),
    # auto_update on AWS redeploys the aggregator through Pulumi
    ("zae_limiter.version", "zae_limiter.infra"),
    ("zae_limiter.version", "zae_limiter.infra.automation"),
}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    name: str | None  # the imported name, when it is not a module
    line: int
    at_call_time: bool  # inside a function, or under `if TYPE_CHECKING:`


def module_name(path: Path) -> str:
    parts = ["zae_limiter", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or any(
        path.parent.glob(f"{path.name}.*.so")
    )


def layer(module: str) -> str:
    parts = module.split(".")
    return LAYER_OF[parts[1] if len(parts) > 1 else "__init__"]


def package_modules() -> Iterator[Path]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" not in path.parts and module_name(path) not in EARLIER_PATHS:
            yield path


def imports(path: Path) -> Iterator[Import]:
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    call_time = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        or (isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"))
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        later = id(node) in call_time
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("zae_limiter"):
                    yield Import(importer, alias.name, None, node.lineno, later)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if not source.startswith("zae_limiter"):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if is_module(full):
                    yield Import(importer, full, None, node.lineno, later)
                else:
                    yield Import(importer, source, alias.name, node.lineno, later)


ALL_IMPORTS = [found for path in package_modules() for found in imports(path)]


def test_the_scan_sees_the_package() -> None:
    """The rules below read real imports: a scan that found nothing would pass them all."""
    assert len(ALL_IMPORTS) > 300
    pairs = {(i.importer, i.target) for i in ALL_IMPORTS}
    assert ("zae_limiter.engine.engine", "zae_limiter.storage.protocol") in pairs
    assert ("zae_limiter.limiter", "zae_limiter.ops.provisioning") in pairs


def test_every_module_has_a_layer() -> None:
    unknown = {module_name(p).split(".")[1] for p in package_modules()
               if module_name(p) != "zae_limiter"} - set(LAYER_OF)
    assert unknown == set()


def test_no_layer_imports_a_higher_one() -> None:
    wrong = sorted(
        f"{i.importer}:{i.line} imports {i.target} ({layer(i.importer)} -> {layer(i.target)})"
        for i in ALL_IMPORTS
        if layer(i.importer) != layer(i.target)
        and layer(i.target) not in MAY_USE[layer(i.importer)]
        and not (i.at_call_time and (i.importer, i.target) in CALL_TIME_UPWARD)
    )
    assert wrong == []


def test_upward_imports_are_made_only_when_called_and_are_all_needed() -> None:
    upward = {(i.importer, i.target): i for i in ALL_IMPORTS
              if (i.importer, i.target) in CALL_TIME_UPWARD}
    assert set(upward) == CALL_TIME_UPWARD  # a stale exception is removed, not kept
    assert all(i.at_call_time for i in upward.values())


def test_the_engine_uses_the_storage_interface_not_an_implementation() -> None:
    engine_storage = {i.target for i in ALL_IMPORTS
                      if layer(i.importer) == "engine" and layer(i.target) == "storage"}
    assert engine_storage == {"zae_limiter.storage.protocol"}


def test_no_module_imports_a_private_name_of_another() -> None:
    private = sorted(
        f"{i.importer}:{i.line} imports {i.name} from {i.target}"
        for i in ALL_IMPORTS
        if i.name is not None and i.name.startswith("_") and not i.name.startswith("__")
    )
    # A private module of a subpackage is for that subpackage; the package's own (`_version`,
    # `_native`) are for the whole package.
    private_modules = sorted(
        f"{i.importer}:{i.line} imports {i.target}"
        for i in ALL_IMPORTS
        if i.target.rpartition(".")[2].startswith("_")
        and not i.target.endswith("__")
        and not i.importer.startswith(i.target.rpartition(".")[0])
    )
    assert private == [] and private_modules == []


def test_no_module_imports_an_earlier_path() -> None:
    assert [i for i in ALL_IMPORTS if i.target in EARLIER_PATHS] == []


def test_no_two_modules_import_each_other_when_they_load() -> None:
    edges = {(i.importer, i.target) for i in ALL_IMPORTS if not i.at_call_time}
    mutual = sorted((a, b) for a, b in edges if (b, a) in edges and a < b
                    and not b.startswith(a + ".") and not a.startswith(b + "."))
    assert mutual == []


@pytest.mark.parametrize("earlier", sorted(EARLIER_PATHS))
def test_an_earlier_path_is_the_same_module_as_its_home(earlier: str) -> None:
    assert importlib.import_module(earlier) is importlib.import_module(EARLIER_PATHS[earlier])


def test_every_earlier_path_is_kept() -> None:
    """zae-limiter 0.2.0's modules (those this package still has) and every module path the
    docs name import; the names docs/api.md lists import from the package."""
    zae_0_2_0 = ("bucket", "cli", "exceptions", "lease", "limiter", "models", "repository",
                 "schema", "version", "aggregator", "aggregator.handler", "infra",
                 "infra.stack_manager", "migrations")
    documented = ("asgi", "fastapi", "ratelimit_fields", "memory", "local", "ops", "transport",
                  "stack_manager", "core", "storage", "engine", "http", "audit", "usage",
                  "deadline", "failures", "metrics")
    for name in zae_0_2_0 + documented:
        importlib.import_module(f"zae_limiter.{name}")
    for name in zae_limiter.__all__:
        assert getattr(zae_limiter, name) is not None


def test_importing_the_limiter_loads_no_operations_or_pulumi() -> None:
    code = (
        "import sys, zae_limiter.limiter, zae_limiter.http.asgi\n"
        "from zae_limiter import RateLimiter, SyncRateLimiter, MemoryStorage\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('zae_limiter.ops',"
        " 'zae_limiter.infra', 'zae_limiter.cli', 'pulumi', 'moto')))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == ""
