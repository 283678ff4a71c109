"""The package version, from the installed distribution's metadata (rust/Cargo.toml's version,
which maturin writes into it). A leaf: it imports nothing of the package. The Lambda bundle,
which has no metadata, replaces this file with the version written in (`infra.package`)."""

from importlib.metadata import version

__version__: str = version("zae-limiter")
