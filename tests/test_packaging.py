"""The distribution: one version (Cargo's) everywhere, typing markers in the wheel."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import zae_limiter
from zae_limiter.infra.package import lambda_files

ROOT = Path(__file__).resolve().parents[1]


def cargo_version() -> str:
    return str(tomllib.loads((ROOT / "rust" / "Cargo.toml").read_text())["package"]["version"])


def test_the_version_is_cargos_everywhere() -> None:
    assert "version" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert zae_limiter.__version__ == version("zae-limiter") == cargo_version()


def test_the_lambda_bundle_carries_the_version() -> None:
    source = lambda_files()["zae_limiter/_version.py"].decode()
    assert re.search(r"__version__ = '([^']+)'", source).group(1) == cargo_version()  # type: ignore[union-attr]


def test_the_wheel_ships_py_typed_and_the_native_stub(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "maturin", "build", "--profile", "dev", "--out", str(tmp_path),
         "--quiet"],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "zae_limiter/py.typed" in names
    assert "zae_limiter/_native.pyi" in names
    assert any(re.fullmatch(r"zae_limiter/_native\..*\.so", n) for n in names)
    assert f"-{cargo_version()}-" in wheel.name
