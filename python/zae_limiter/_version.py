"""The package version, from the installed distribution's metadata (rust/Cargo.toml's version,
which maturin writes into it). A leaf: it imports nothing of the package."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("zae-limiter")
except PackageNotFoundError:  # a source tree on sys.path without an install (e.g. a Lambda zip)
    __version__ = "0+unknown"
