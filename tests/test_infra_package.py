"""The aggregator's Lambda bundle: contents, determinism, and that it imports in a bare runtime."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import boto3
import pytest

from zae_limiter.infra.package import (
    HANDLER,
    LAMBDA_ENTRY_SOURCE,
    build_lambda_zip,
    bundled_parts,
    cached_lambda_zip,
    source_code_hash,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle() -> bytes:
    return build_lambda_zip()


def names(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return archive.namelist()


def test_contains_handler_and_pure_python_library(bundle: bytes) -> None:
    content = names(bundle)
    assert content == sorted(content)
    for required in ("lambda_function.py", "zae_limiter/__init__.py", "zae_limiter/schema.py",
                     "zae_limiter/models.py", "zae_limiter/exceptions.py",
                     "zae_limiter/validation.py", "zae_limiter/core/__init__.py",
                     "zae_limiter/core/bucket.py", "zae_limiter/core/windows.py",
                     "zae_limiter/aggregator/__init__.py", "zae_limiter/aggregator/handler.py"):
        assert required in content
    assert HANDLER == "lambda_function.handler"
    with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
        assert archive.read("lambda_function.py").decode() == LAMBDA_ENTRY_SOURCE


def test_leaves_out_what_lambda_cannot_or_need_not_run(bundle: bytes) -> None:
    for name in names(bundle):
        assert not name.startswith(("zae_limiter/cli/", "zae_limiter/infra/",
                                    "zae_limiter/storage/", "zae_limiter/engine/",
                                    "zae_limiter/ops/", "zae_limiter/http/")), name
        assert name not in ("zae_limiter/repository.py", "zae_limiter/limiter.py",
                            "zae_limiter/local.py", "zae_limiter/lease.py"), name
        assert "_native" not in name and "__pycache__" not in name, name
        assert name.endswith(".py") or name.endswith(".pyi") or name.endswith(".typed"), name


def test_is_deterministic(bundle: bytes, tmp_path: Path) -> None:
    assert build_lambda_zip() == bundle
    written = build_lambda_zip(tmp_path / "out" / "a.zip")
    assert written == tmp_path / "out" / "a.zip" and written.read_bytes() == bundle
    with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    path, digest = cached_lambda_zip(tmp_path / "cache")
    assert path.read_bytes() == bundle and digest == source_code_hash(bundle)
    assert cached_lambda_zip(tmp_path / "cache") == (path, digest)


def test_repository_entry_file_matches_the_bundled_one() -> None:
    assert (REPO / "aggregator" / "lambda_function.py").read_text() == LAMBDA_ENTRY_SOURCE


# Runs with -I -S (no PYTHONPATH, no site-packages: an editable install would add the source
# tree) and a sys.path of: the standard library, the extracted bundle, and the directory holding
# boto3 — as in Lambda's python3.11 runtime. Anything Lambda lacks is made unimportable even if
# this virtualenv has it.
BARE_IMPORT = textwrap.dedent(
    """
    import importlib.abc, os, sys

    bundle, boto_dir = sys.argv[1], sys.argv[2]
    stdlib = [p for p in sys.path if p and "site-packages" not in p and "dist-packages" not in p]
    sys.path[:] = stdlib + [bundle, boto_dir]

    FORBIDDEN = {"aioboto3", "aiobotocore", "aiohttp", "pulumi", "pulumi_aws", "moto", "click",
                 "rich", "zae_limiter._native"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in FORBIDDEN or name.split(".")[0] in FORBIDDEN:
                raise ModuleNotFoundError(f"{name} is not available in Lambda", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import aioboto3  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the aioboto3 blocker does not work")

    os.environ.update(TABLE_NAME="ZAEL-app", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x")
    import lambda_function
    import zae_limiter
    assert zae_limiter.__file__.startswith(bundle), zae_limiter.__file__
    assert callable(lambda_function.handler)
    # No records: builds its boto3 client and settings, touches no network.
    print(lambda_function.handler({"Records": []}, None))
    loaded = sorted(m for m in sys.modules if m.startswith("zae_limiter"))
    print(" ".join(loaded))
    """
)


def test_imports_in_a_bare_lambda_like_runtime(bundle: bytes, tmp_path: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
        archive.extractall(tmp_path / "bundle")
    boto_dir = str(Path(boto3.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "AWS_"))}
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", BARE_IMPORT, str(tmp_path / "bundle"), boto_dir],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    response, loaded = result.stdout.strip().splitlines()[-2:]
    assert response == "{'batchItemFailures': []}"
    assert "zae_limiter.aggregator.handler" in loaded.split()
    assert "zae_limiter.repository" not in loaded.split()
    # Everything the handler loaded came from the bundle, which holds nothing it did not need
    # beyond whole packages (and the limiters' lazily imported names).
    assert not {m for m in loaded.split() if m.startswith(("zae_limiter.storage",
                                                            "zae_limiter.engine"))}


def test_the_bundle_follows_the_aggregators_imports(tmp_path: Path) -> None:
    """No list to keep: an import the aggregator gains brings its module (a top-level one alone,
    one in a subpackage with the whole subpackage); imports under TYPE_CHECKING or inside
    functions, which do not run when the handler loads, bring nothing."""
    root = tmp_path / "zae_limiter"
    files = {
        "__init__.py": "from ._version import __version__\nfrom .core import thing\n",
        "_version.py": "__version__ = '1'\n",
        "core/__init__.py": "from .math import x\n",
        "core/math.py": "x = 1\n",
        "core/extra.py": "y = 2\n",
        "engine/__init__.py": "",
        "engine/cache.py": "from .. import schema\n",
        "schema.py": "",
        "limiter.py": "import aioboto3\n",
        "typing_only.py": "",
        "aggregator/__init__.py": "",
        "aggregator/handler.py": (
            "from typing import TYPE_CHECKING\n"
            "from ..engine.cache import TTLCache\n"
            "if TYPE_CHECKING:\n    from .. import typing_only\n"
            "def later():\n    from .. import limiter\n"
        ),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert bundled_parts(root) == ["__init__.py", "_version.py", "aggregator", "core", "engine",
                                   "schema.py"]


# -- the private build directory -------------------------------------------------------------


def test_bundle_is_written_to_a_private_directory(tmp_path: Path) -> None:
    path, digest = cached_lambda_zip(tmp_path / "cache")
    mode = os.stat(tmp_path / "cache").st_mode & 0o777
    assert mode == 0o700 and os.stat(tmp_path / "cache").st_uid == os.getuid()
    assert os.stat(path).st_mode & 0o077 == 0
    assert source_code_hash(path.read_bytes()) == digest


def test_default_directory_is_per_user_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path, _ = cached_lambda_zip()
    assert path.parent == tmp_path / f"zae-limiter-lambda-{os.getuid()}"
    assert os.stat(path.parent).st_mode & 0o777 == 0o700


def test_group_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o770)
    with pytest.raises(PermissionError, match="accessible to other users"):
        cached_lambda_zip(shared)
    assert not list(shared.iterdir())


def test_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PermissionError, match="symbolic link"):
        cached_lambda_zip(tmp_path / "link")
    assert not list(real.iterdir())


def test_directory_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    # The directory's owner is this process's uid; pretend to be someone else.
    monkeypatch.setattr(os, "getuid", lambda: os.stat(theirs).st_uid + 1)
    with pytest.raises(PermissionError, match="owned by uid"):
        cached_lambda_zip(theirs)


def test_unsafe_default_directory_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Someone else created the predictable default path first (here: world-writable).
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    planted = tmp_path / f"zae-limiter-lambda-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    path, digest = cached_lambda_zip()
    assert path.parent != planted and not list(planted.iterdir())
    assert os.stat(path.parent).st_mode & 0o777 == 0o700
    assert source_code_hash(path.read_bytes()) == digest


def test_a_swapped_cached_file_is_not_reused(tmp_path: Path, bundle: bytes) -> None:
    path, digest = cached_lambda_zip(tmp_path / "cache")
    path.write_bytes(b"not the bundle")
    again, digest_again = cached_lambda_zip(tmp_path / "cache")
    assert (again, digest_again) == (path, digest)
    assert again.read_bytes() == bundle


def test_staged_zip_is_a_private_copy_of_the_hashed_bytes(tmp_path: Path) -> None:
    from zae_limiter.infra.package import stage_lambda_zip

    source = tmp_path / "given.zip"
    source.write_bytes(b"original")
    path, digest = stage_lambda_zip(source.read_bytes(), tmp_path / "cache")
    source.write_bytes(b"swapped after hashing")
    assert path != source and path.read_bytes() == b"original"
    assert digest == source_code_hash(b"original")
