"""Client / infrastructure version compatibility.

The version record (`SYSTEM#` / `#VERSION`, see `schema.version_key`) says what the table holds:

| field | meaning |
|---|---|
| `schema_version` | layout of the items (changed only by `zae-limiter migrate`) |
| `lambda_version` | the deployed usage aggregator (absent when none is deployed) |
| `min_client_version` | the oldest client the infrastructure accepts |
| `updated_at`, `updated_by` | last writer |
| `migration_log`, `migration_state` | see `zae_limiter.migrations` |

Rules, checked in this order (`check_compatibility`):

1. The record's schema MAJOR differs from this client's `schema.SCHEMA_VERSION` →
   `IncompatibleSchemaError` (data must be migrated; nothing else can fix it). Minor and patch
   schema versions are compatible both ways: migrations within a major keep old readers working.
2. This client is older than `min_client_version` → `MinimumClientVersionError` (only upgrading
   the client helps).
3. The aggregator (`lambda_version`) is older than this client → `VersionMismatchError`, which
   auto-update (or `zae-limiter upgrade`) can fix by redeploying the aggregator.

A missing record (a table created by hand, or by a version before records existed) is treated as
compatible and logged: refusing would lock operators out of tables that work. `zae-limiter
upgrade` writes the record.

A table's first record is written by `write_initial_record` only (directly, or through
`record_deployment`): this client's schema version and a permissive minimum client version, in
one conditional write, so concurrent writers cannot overwrite each other's first record.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from . import schema
from ._version import __version__
from .exceptions import (
    IncompatibleSchemaError,
    MinimumClientVersionError,
    ValidationError,
    VersionMismatchError,
)

if TYPE_CHECKING:
    from .models import StackOptions
    from .storage.protocol import AdminStorage

log = logging.getLogger("zae_limiter.version")

CLIENT_VERSION: str = __version__
CLIENT_SCHEMA_VERSION: str = schema.SCHEMA_VERSION
MIGRATION_GUIDE = "docs/troubleshooting.md#incompatibleschemaerror"

VersionCheck = Literal["strict", "relaxed", "skip"]
VERSION_CHECKS: tuple[VersionCheck, ...] = ("strict", "relaxed", "skip")

Kind = Literal["ok", "missing_record", "schema", "min_client", "lambda"]

_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z.-]+)?$"
)


@dataclass(frozen=True, order=True, slots=True)
class SemVer:
    major: int
    minor: int
    patch: int
    # A release sorts after its pre-releases: () marks a release, see `_pre_key`.
    pre: tuple[tuple[int, int | str], ...] = ()

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        if not self.pre or self.pre == _RELEASE:
            return base
        return base + "-" + ".".join(str(part) for _, part in self.pre)


# Sorts after every pre-release tuple, whose first element is (0, ...) or (1, ...).
_RELEASE: tuple[tuple[int, int | str], ...] = ((2, 0),)


def _pre_key(pre: str | None) -> tuple[tuple[int, int | str], ...]:
    if pre is None:
        return _RELEASE
    # semver: numeric identifiers sort before alphanumeric ones.
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))


def parse(version: str) -> SemVer:
    """`1.2.3`, `1.2.3-rc.1`, `v1.2.3+build`; ValueError for anything else."""
    if not isinstance(version, str):
        raise ValueError(f"not a version: {version!r}")
    match = _SEMVER.match(version.strip())
    if match is None:
        raise ValueError(f"not a semantic version: {version!r}")
    major, minor, patch, pre = match.groups()
    return SemVer(int(major), int(minor), int(patch), _pre_key(pre))


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as `a` is older than, equal to or newer than `b` (build metadata ignored)."""
    pa, pb = parse(a), parse(b)
    return (pa > pb) - (pa < pb)


@dataclass(frozen=True, slots=True)
class Compatibility:
    """The outcome of comparing a version record with this client."""

    compatible: bool
    reason: str
    can_auto_update: bool = False
    kind: Kind = "ok"
    client_version: str = CLIENT_VERSION
    client_schema_version: str = CLIENT_SCHEMA_VERSION
    schema_version: str | None = None
    lambda_version: str | None = None
    min_client_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def error(self) -> IncompatibleSchemaError | VersionMismatchError | None:
        """The exception this outcome stands for (None when compatible)."""
        schema_version = self.schema_version or "unknown"
        if self.kind == "schema":
            return IncompatibleSchemaError(
                self.client_version,
                schema_version,
                f"Migration required: the table's schema is {schema_version}, this client "
                f"uses {self.client_schema_version}. Back up the table, then run "
                f"`zae-limiter migrate --to {self.client_schema_version} --name <name>` "
                "(or install a client of the table's major version).",
                migration_guide_url=MIGRATION_GUIDE,
            )
        if self.kind == "min_client":
            return MinimumClientVersionError(
                self.client_version,
                self.min_client_version or "unknown",
                schema_version,
                self.lambda_version,
            )
        if self.kind == "lambda":
            return VersionMismatchError(
                self.client_version,
                schema_version,
                self.lambda_version,
                "Lambda update available: run `zae-limiter upgrade --name <name>`, or pass "
                "stack_options=StackOptions() (auto_update) to the limiter.",
                can_auto_update=True,
            )
        return None


def _field(record: Mapping[str, Any], key: str) -> str | None:
    value = record.get(key)
    return str(value) if value not in (None, "") else None


def check_compatibility(
    record: Mapping[str, Any] | None,
    client_version: str = CLIENT_VERSION,
    client_schema_version: str = CLIENT_SCHEMA_VERSION,
) -> Compatibility:
    """Compare a version record (as `Repository.get_version_record` returns it) with a client."""
    base: dict[str, Any] = {
        "client_version": client_version,
        "client_schema_version": client_schema_version,
    }
    if record is None:
        return Compatibility(
            True,
            "no version record in the table: assuming compatible "
            "(`zae-limiter upgrade` writes one)",
            kind="missing_record",
            **base,
        )
    schema_version = _field(record, "schema_version")
    lambda_version = _field(record, "lambda_version")
    min_client = _field(record, "min_client_version")
    base |= {
        "schema_version": schema_version,
        "lambda_version": lambda_version,
        "min_client_version": min_client,
    }
    try:
        if (
            schema_version is not None
            and parse(schema_version).major != parse(client_schema_version).major
        ):
            return Compatibility(
                False,
                f"schema {schema_version} of the table and schema {client_schema_version} of "
                f"client {client_version} differ in major version: migration required",
                kind="schema",
                **base,
            )
        if min_client is not None and compare(client_version, min_client) < 0:
            return Compatibility(
                False,
                f"client {client_version} is older than the minimum client version "
                f"{min_client}: upgrade the client (pip install --upgrade zae-limiter)",
                kind="min_client",
                **base,
            )
        if lambda_version is not None and compare(lambda_version, client_version) < 0:
            return Compatibility(
                False,
                f"aggregator {lambda_version} is older than client {client_version}: "
                "run `zae-limiter upgrade`",
                can_auto_update=True,
                kind="lambda",
                **base,
            )
    except ValueError as exc:
        # A record we cannot read is as dangerous as a major mismatch: refuse.
        return Compatibility(False, f"unreadable version record: {exc}", kind="schema", **base)
    return Compatibility(True, "compatible", **base)


def legacy_version_check(
    version_check: VersionCheck, strict_version: object, skip_version_check: object
) -> VersionCheck:
    """`version_check` with 0.x's keywords folded in: `skip_version_check=True` is "skip",
    `strict_version=False` is "relaxed"; None leaves `version_check` as given. Keywords that
    contradict an explicit `version_check` are a `ValidationError`, not a silent choice."""
    for field, value in (("strict_version", strict_version),
                         ("skip_version_check", skip_version_check)):
        if value is not None and not isinstance(value, bool):
            raise ValidationError(field, value, "must be a bool or None")
    wanted: VersionCheck | None = None
    if skip_version_check:
        wanted = "skip"
    elif strict_version is not None:
        wanted = "strict" if strict_version else "relaxed"
    contradicts = (
        wanted is not None and wanted != version_check and version_check != "strict"
    ) or (skip_version_check is False and version_check == "skip")
    if contradicts:  # "strict" is the default: an explicit other value was given
        raise ValidationError(
            "version_check",
            version_check,
            f"contradicts strict_version={strict_version!r}, "
            f"skip_version_check={skip_version_check!r}",
        )
    return wanted or version_check


def enforce(compatibility: Compatibility, mode: VersionCheck = "strict") -> Compatibility:
    """Raise the exception of an incompatible outcome; `relaxed` raises only for the schema.

    `relaxed` and `skip` are dangerous: an aggregator older than the client may misread the
    items this client writes, and a client below the minimum version may write items the
    infrastructure no longer understands.
    """
    if mode not in VERSION_CHECKS:
        raise ValueError(f"version_check must be one of {', '.join(VERSION_CHECKS)}: {mode!r}")
    if compatibility.compatible or mode == "skip":
        if compatibility.kind == "missing_record":
            log.info(compatibility.reason)
        return compatibility
    error = compatibility.error()
    if mode == "relaxed" and compatibility.kind != "schema":
        log.warning("version check relaxed, continuing despite: %s", compatibility.reason)
        return compatibility
    assert error is not None
    raise error


async def update_aggregator(
    repo: AdminStorage,
    *,
    name: str,
    region: str,
    endpoint_url: str | None,
    options: StackOptions | None = None,
    client_version: str = CLIENT_VERSION,
    updated_by: str = "zae-limiter auto-update",
) -> str:
    """Bring the aggregator up to `client_version` and record it; returns what was done.

    On a local endpoint there is no Lambda: rewriting the record is the whole update. On AWS
    the Pulumi stack is redeployed (`zae_limiter.infra.automation`), then the record written.
    """
    if endpoint_url is None:
        try:
            from .infra import automation
        except ImportError as exc:
            raise VersionMismatchError(
                client_version,
                "unknown",
                None,
                'updating the aggregator on AWS needs Pulumi: pip install "zae-limiter[infra]" '
                f"and the Pulumi CLI (import failed: {exc})",
            ) from exc
        stack_options: object | None = options
        if stack_options is None:
            # Keep the options the stack was deployed with: a redeploy with defaults would
            # silently revert them.
            info = await asyncio.to_thread(automation.status, name, region)
            from .infra import InfraOptions

            stack_options = InfraOptions.from_config_values(info.get("options") or {})
        await asyncio.to_thread(automation.deploy, name, region, stack_options)
        action = f"redeployed stack {schema.stack_name(name)} in {region} with Pulumi"
    else:
        action = f"local endpoint {endpoint_url}: no Lambda to deploy"
    await repo.set_version_record(lambda_version=client_version, updated_by=updated_by)
    return f"{action}; lambda_version set to {client_version}"


async def record_deployment(
    repo: AdminStorage,
    *,
    client_version: str = CLIENT_VERSION,
    updated_by: str = "zae-limiter deploy",
) -> None:
    """Record that the infrastructure was just deployed by `client_version`.

    Call after a deploy: the Pulumi program does not write the record, and without it the next
    limiter would see the previous `lambda_version` and redeploy again. A table without a record
    also gets its schema version and a permissive minimum client version.
    """
    if not await write_initial_record(repo, updated_by=updated_by, lambda_version=client_version):
        await repo.set_version_record(lambda_version=client_version, updated_by=updated_by)


# The minimum client version of a first record (`schema.MIN_CLIENT_VERSION`).
INITIAL_MIN_CLIENT_VERSION = schema.MIN_CLIENT_VERSION


async def write_initial_record(
    repo: AdminStorage, *, updated_by: str, lambda_version: str | None = None
) -> bool:
    """Write the version record of a table that has none; False (nothing written) when it has.

    The record says `schema_version` = this client's schema (`schema.SCHEMA_VERSION`) and
    `min_client_version` 0.0.0; `lambda_version` only when given (an aggregator was just
    deployed, or a local table, which has none, is current). One conditional write: of
    concurrent writers exactly one succeeds.
    """
    fields = {
        "schema_version": CLIENT_SCHEMA_VERSION,
        "min_client_version": INITIAL_MIN_CLIENT_VERSION,
    }
    if lambda_version is not None:
        fields["lambda_version"] = lambda_version
    return await repo.create_version_record(fields, updated_by=updated_by)


async def ensure_compatible(
    repo: AdminStorage,
    *,
    mode: VersionCheck = "strict",
    auto_update: bool = False,
    name: str,
    region: str,
    endpoint_url: str | None,
    options: StackOptions | None = None,
    client_version: str = CLIENT_VERSION,
) -> Compatibility:
    """Read the version record, auto-update an old aggregator if allowed, else `enforce`."""
    if mode == "skip":
        return Compatibility(True, "version check skipped", kind="ok")
    compat = check_compatibility(await repo.get_version_record(), client_version)
    if not compat.compatible and compat.can_auto_update and auto_update:
        log.warning("%s; auto-updating", compat.reason)
        action = await update_aggregator(
            repo,
            name=name,
            region=region,
            endpoint_url=endpoint_url,
            options=options,
            client_version=client_version,
        )
        log.warning("auto-update: %s", action)
        compat = check_compatibility(await repo.get_version_record(), client_version)
    return enforce(compat, mode)


async def version_info(repo: AdminStorage, client_version: str = CLIENT_VERSION) -> dict[str, Any]:
    """The version part of a deployment's status, JSON-able (for `status` and `version`)."""
    record = await repo.get_version_record()
    compat = check_compatibility(record, client_version)
    record = record or {}
    return {
        "client_version": client_version,
        "client_schema_version": CLIENT_SCHEMA_VERSION,
        "schema_version": record.get("schema_version"),
        "lambda_version": record.get("lambda_version"),
        "min_client_version": record.get("min_client_version"),
        "updated_at": record.get("updated_at"),
        "updated_by": record.get("updated_by"),
        "migration_state": record.get("migration_state") or None,
        "record_exists": compat.kind != "missing_record",
        "compatible": compat.compatible,
        "reason": compat.reason,
        "can_auto_update": compat.can_auto_update,
    }
