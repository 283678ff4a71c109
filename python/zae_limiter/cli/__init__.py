"""The `zae-limiter` command: operators' tools over the library (click + rich).

Each sub-module registers its commands on `main`; the library itself never imports this package.
"""

from __future__ import annotations

import importlib

import click


@click.group()
@click.version_option(package_name="zae-limiter")
def main() -> None:
    """zae-limiter: distributed rate limiting on DynamoDB."""


# Sub-modules add their commands to `main` on import. Missing optional parts (e.g. Pulumi) must not
# break the rest of the CLI, so each module guards its own optional imports.
for _module in ("local", "infra", "aggregator", "ops"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as exc:  # pragma: no cover - only while a module is absent
        if exc.name != f"{__name__}.{_module}":
            raise
