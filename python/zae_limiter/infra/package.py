"""The aggregator's Lambda bundle: a deterministic zip built from the installed package.

The Lambda runtime has boto3 but neither aioboto3 nor the compiled core, so the bundle carries only
the pure-Python modules the aggregator needs. Files come from the installed `zae_limiter`
directory, which makes this work from a wheel as well as from a source checkout.

Deterministic (fixed timestamps and permissions, sorted entries): the same sources always give the
same bytes, so Pulumi sees no change and does not redeploy the function when nothing changed.

The file Pulumi uploads lives in a private directory (created 0700; its owner, mode and type are
checked on every use, a symlink is never followed), and `source_code_hash` is computed from the
very bytes written there: nobody else can swap the file between hashing and upload. A directory
that fails the check is refused when given explicitly, and replaced by a fresh private temporary
directory when it is the default one (someone else may have created that path first).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import io
import os
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final, overload

from zae_limiter._version import __version__

__all__ = [
    "ENTRY_PACKAGE",
    "HANDLER",
    "LAMBDA_ENTRY_SOURCE",
    "build_lambda_zip",
    "bundled_parts",
    "cached_lambda_zip",
    "lambda_files",
    "private_directory",
    "source_code_hash",
    "stage_lambda_zip",
]

HANDLER: Final = "lambda_function.handler"

# The whole entry point. `aggregator/lambda_function.py` in the repository is the same text, for
# people who zip the function by hand; tests keep the two identical.
LAMBDA_ENTRY_SOURCE: Final = (
    '"""AWS Lambda entry point of the zae-limiter aggregator (handler lambda_function.handler)."""'
    "\n"
    "\n"
    "from zae_limiter.aggregator.handler import handler  # noqa: F401\n"
)

# The bundle is the aggregator package and what it imports of the library, found from the
# sources (`bundled_parts`): a module inside a subpackage brings its whole subpackage (the core,
# for one), a top-level module comes alone. Only imports a module makes when it loads count (not
# those under `TYPE_CHECKING` or inside functions): the package's __init__ imports the limiters on
# first use precisely so that it can ship here. Never bundled, and checked by the tests: `_native*`
# (compiled for the build host, not Lambda; the core falls back to its Python twin), storage
# (aioboto3), the limiter, `infra/` (Pulumi), `ops/` (moto), `cli/`.
ENTRY_PACKAGE: Final = "aggregator"

# 1980-01-01 is the earliest time a zip entry can carry.
_FIXED_TIME: Final = (1980, 1, 1, 0, 0, 0)
_UNIX: Final = 3


def _package_dir() -> Path:
    # This module is `zae_limiter/infra/package.py`: the package is two levels up.
    return Path(__file__).resolve().parents[1]


def _walk(directory: Path) -> Iterator[Path]:
    # Python sources only: no caches, compiled extensions or docs in the function's code.
    for path in sorted(directory.rglob("*.py")):
        if "__pycache__" not in path.parts and path.is_file():
            yield path


def _load_time_imports(path: Path, module: str, is_package: bool) -> Iterator[str]:
    """Absolute names of what `module` (the file `path`) imports when it loads."""
    package = module if is_package else module.rpartition(".")[0]

    def statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from statements(node.orelse)
            elif isinstance(node, ast.If | ast.Try):
                for block in (node.body, node.orelse, getattr(node, "finalbody", [])):
                    yield from statements(block)
                for handler in getattr(node, "handlers", []):
                    yield from statements(handler.body)
            else:
                yield node

    for node in statements(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)


def bundled_parts(root: Path | None = None) -> list[str]:
    """The package's files and directories (relative to it) the aggregator needs at run time:
    the aggregator package and the closure of its load-time imports."""
    root = _package_dir() if root is None else root
    parts: set[str] = set()
    pending = [f"zae_limiter.{ENTRY_PACKAGE}", "zae_limiter"]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or not (name == "zae_limiter" or name.startswith("zae_limiter.")):
            continue
        seen.add(name)
        inner = name.split(".")[1:]
        path = root.joinpath(*inner)
        if (path / "__init__.py").is_file():
            files = [(path / "__init__.py", name, True)]
        elif path.with_suffix(".py").is_file():
            files = [(path.with_suffix(".py"), name, False)]
        else:
            continue  # a name imported from a module, or the compiled extension
        if len(inner) > 1 or (len(inner) == 1 and files[0][2]):
            top = inner[0]  # a subpackage: all of it
            parts.add(top)
            files = [
                (file, "zae_limiter." + ".".join(file.relative_to(root).with_suffix("").parts)
                 .removesuffix(".__init__"), file.name == "__init__.py")
                for file in _walk(root / top)
            ]
            seen.update(module for _, module, _ in files)
        else:
            parts.add(files[0][0].relative_to(root).as_posix())
        for file, module, is_package in files:
            pending.extend(_load_time_imports(file, module, is_package))
    return sorted(parts)


def lambda_files() -> dict[str, bytes]:
    """Archive name → content of every file of the bundle."""
    root = _package_dir()
    aggregator = root / "aggregator"
    if not (aggregator / "handler.py").is_file():
        raise FileNotFoundError(
            f"the aggregator package is missing from {root} (expected aggregator/handler.py); "
            "reinstall zae-limiter"
        )
    files: dict[str, bytes] = {
        "lambda_function.py": LAMBDA_ENTRY_SOURCE.encode(),
        # The bundle carries no distribution metadata: the version is written in.
        "zae_limiter/_version.py": (
            f'"""Written by the bundler."""\n\n__version__ = {__version__!r}\n'
        ).encode(),
    }
    for part in bundled_parts(root):
        paths = _walk(root / part) if (root / part).is_dir() else iter([root / part])
        for path in paths:
            name = f"zae_limiter/{path.relative_to(root).as_posix()}"
            files.setdefault(name, path.read_bytes())
    return files


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = _UNIX
            info.external_attr = 0o100644 << 16
            archive.writestr(info, files[name], compresslevel=9)
    return buffer.getvalue()


@overload
def build_lambda_zip(dest: None = None) -> bytes: ...


@overload
def build_lambda_zip(dest: Path) -> Path: ...


def build_lambda_zip(dest: Path | None = None) -> bytes | Path:
    """The bundle as bytes, or written to `dest` (a file path) and that path returned."""
    data = _zip(lambda_files())
    if dest is None:
        return data
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(dest, data)
    return dest


def source_code_hash(data: bytes) -> str:
    """Base64 SHA-256, the form Lambda reports as CodeSha256."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def default_cache_directory() -> Path:
    """Per user, under the temp dir: `zae-limiter-lambda-<uid>`."""
    return Path(tempfile.gettempdir()) / f"zae-limiter-lambda-{os.getuid()}"


def _check_private(directory: Path) -> None:
    """Raise PermissionError unless `directory` is a real directory (not a symlink) owned by
    this user with no group or other permissions."""
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        raise PermissionError(f"{directory} is a symbolic link; refusing to use it")
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{directory} is owned by uid {info.st_uid}, not {os.getuid()}")
    if info.st_mode & 0o077:
        raise PermissionError(
            f"{directory} is accessible to other users (mode {stat.S_IMODE(info.st_mode):o}); "
            "expected 0700"
        )


def private_directory(directory: Path | None = None) -> Path:
    """`directory` (default: `default_cache_directory()`), created 0700 if missing, checked.

    An explicit directory that is not private raises PermissionError; a default one that is not
    is left alone and a fresh `tempfile.mkdtemp()` directory is used instead.
    """
    explicit = directory is not None
    path = Path(directory) if directory is not None else default_cache_directory()
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        _check_private(path)
    except (PermissionError, FileNotFoundError, NotADirectoryError):
        if explicit:
            raise
        path = Path(tempfile.mkdtemp(prefix="zae-limiter-lambda-"))
        _check_private(path)
    return path


def stage_lambda_zip(data: bytes, directory: Path | None = None) -> tuple[Path, str]:
    """`data` written once per content into a private directory; (path, hash of `data`).

    The hash is of the bytes given, and the file holding them is only writable by this user;
    a cached file is reused only if it is a regular file of this user holding exactly `data`.
    """
    digest = hashlib.sha256(data).hexdigest()
    path = private_directory(directory) / f"aggregator-{digest[:32]}.zip"
    if not _holds(path, data):
        _atomic_write(path, data)
    return path, source_code_hash(data)


def _holds(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            return False
        return handle.read() == data


def cached_lambda_zip(directory: Path | None = None) -> tuple[Path, str]:
    """The bundle written once per content to a private `directory`; (path, hash).

    Pulumi needs a file for the function's code; naming it by content lets concurrent programs
    share it without one overwriting the file another is reading.
    """
    return stage_lambda_zip(build_lambda_zip(), directory)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
