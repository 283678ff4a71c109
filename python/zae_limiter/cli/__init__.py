"""The `zae-limiter` command: operators' tools over the library (click + rich).

Each sub-module registers its commands on `main`, over the shared `toolkit` (target, common
options, error handler, output); the library itself never imports this package.

| module | commands |
|---|---|
| `local` | `local`, `demo` |
| `infra` | `deploy`, `preview`, `status`, `delete`, `pulumi-program` |
| `versioning` | `version`, `check`, `upgrade`, `migrate` (`rollback`, `list`) |
| `entities` | `entity create / show / delete / children / verify` |
| `limits` | `set/get/delete/show`, `*-resource`, `list-resources`, `*-system`, `plan/apply/export`|
| `buckets` | `bucket show / reset` |
| `backups` | `backup create / list`, `restore` |
| `aggregator` | `aggregator run`, `usage`, `dlq replay` |
| `audit` | `audit` (an entity's audit trail; = `audit list`), `audit verify` (its hash chain) |
| `switches` | `resource` / `entity` `disable / bypass / enable / state`, `switches` |
"""

from __future__ import annotations

import importlib

import click


@click.group()
@click.version_option(package_name="zae-limiter")
def main() -> None:
    """zae-limiter: distributed rate limiting on DynamoDB."""


MODULES = (
    "local",
    "infra",
    "versioning",
    "entities",
    "limits",
    "buckets",
    "backups",
    "aggregator",
    "audit",
    "switches",
)

# Sub-modules add their commands to `main` on import. Missing optional parts (e.g. Pulumi) must not
# break the rest of the CLI, so each module guards its own optional imports.
for _module in MODULES:
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as exc:  # pragma: no cover - only while a module is absent
        if exc.name != f"{__name__}.{_module}":
            raise
