"""The table alone on AWS (`zae-limiter deploy --table-only`) and what a limiter needs of any
table (`zae-limiter check`).

`deploy_table` is the shortest way to a working limiter on AWS: the table the Pulumi program
creates (`schema.TABLE`: keys, GSI1, stream, TTL; billing from the options) and its version
record, through `Repository.create_table` with the ordinary AWS credentials. No Pulumi, so no
aggregator Lambda, alarms, point-in-time recovery or deletion protection: those are the stack's.

`check_table` verifies, one `Check` each, what the library and the aggregator rely on. It works
on any deployment (Pulumi's, the table-only one, a local endpoint) and changes nothing.

Neither imports Pulumi (tests/test_table_only.py runs them with Pulumi blocked).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import urlsplit

from .. import schema
from ..exceptions import InfrastructureNotFoundError
from ..storage.protocol import AdminStorage
from ..version import check_compatibility, write_initial_record

if TYPE_CHECKING:
    from ..storage.dynamodb.repository import Repository

__all__ = [
    "CHECKS", "Check", "check_table", "deploy_table", "is_loopback", "lines", "table_ready",
]

Status = Literal["ok", "failed", "skipped"]

# The checks, in the order they run and are printed; each later one needs the earlier to pass
# (no credentials, no table to read; no table, nothing in it to check).
CHECKS: Final = ("credentials", "table", "keys", "gsi", "ttl", "stream", "version record")
# The who of a version record this command writes first.
UPDATED_BY: Final = "zae-limiter deploy --table-only"


@dataclass(frozen=True, slots=True)
class Check:
    """One check's outcome: `detail` says what was found, `fix` what to do when it failed."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_loopback(endpoint_url: str | None) -> bool:
    """An endpoint on this machine (moto, DynamoDB Local): it takes any credentials."""
    if not endpoint_url:
        return False
    host = urlsplit(endpoint_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _credentials_check(region: str, endpoint_url: str | None) -> Check:
    if is_loopback(endpoint_url):
        return Check("credentials", "skipped", "loopback endpoint: any credentials do")
    import boto3

    # Resolving reads the environment, the shared files, SSO or the instance role; it does not
    # prove the keys work (the table check's DescribeTable does).
    credentials = boto3.Session(region_name=region).get_credentials()
    if credentials is None:
        return Check(
            "credentials", "failed", "no AWS credentials found",
            "configure them: `aws configure` (or AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY), or pass --endpoint-url for a local DynamoDB",
        )
    method = getattr(credentials, "method", None) or "resolved"
    return Check("credentials", "ok", f"found ({method})")


def _key_pairs(key_schema: list[dict[str, Any]]) -> dict[str, str]:
    return {k["KeyType"]: k["AttributeName"] for k in key_schema}


def _expected(table: str) -> dict[str, Any]:
    # The CreateTable request of schema.TABLE: the very definition the Pulumi component reads.
    return schema.TABLE.create_table_kwargs(table)


def _keys_check(description: dict[str, Any], expected: dict[str, Any]) -> Check:
    types = {a["AttributeName"]: a["AttributeType"]
             for a in description.get("AttributeDefinitions", [])}
    want_keys = _key_pairs(expected["KeySchema"])
    got_keys = _key_pairs(description.get("KeySchema", []))
    want_types = {a["AttributeName"]: a["AttributeType"] for a in expected["AttributeDefinitions"]}
    wrong_types = {n: types.get(n) for n in want_keys.values() if types.get(n) != want_types[n]}
    if got_keys != want_keys or wrong_types:
        return Check(
            "keys", "failed",
            f"key schema {got_keys} (types {types}); expected {want_keys}, all strings",
            "this table was not made by zae-limiter: use another --name, or delete and deploy it",
        )
    return Check("keys", "ok", f"{want_keys['HASH']} (hash), {want_keys['RANGE']} (range)")


def _gsi_check(description: dict[str, Any], expected: dict[str, Any], fix: str) -> Check:
    found = {g["IndexName"]: g for g in description.get("GlobalSecondaryIndexes", [])}
    for want in expected["GlobalSecondaryIndexes"]:
        name = want["IndexName"]
        got = found.get(name)
        if got is None:
            return Check("gsi", "failed", f"index {name} missing", fix)
        if (_key_pairs(got.get("KeySchema", [])) != _key_pairs(want["KeySchema"])
                or got.get("Projection", {}).get("ProjectionType")
                != want["Projection"]["ProjectionType"]):
            return Check(
                "gsi", "failed",
                f"index {name} has keys {_key_pairs(got.get('KeySchema', []))} and projection "
                f"{got.get('Projection')}; expected {_key_pairs(want['KeySchema'])}, ALL", fix,
            )
        # Absent in some local DynamoDBs; AWS reports CREATING while it backfills.
        status = got.get("IndexStatus", "ACTIVE")
        if status != "ACTIVE":
            return Check("gsi", "failed", f"index {name} is {status}",
                         "wait until it is ACTIVE, then check again")
    names = ", ".join(w["IndexName"] for w in expected["GlobalSecondaryIndexes"])
    return Check("gsi", "ok", f"{names} (parent -> children)")


def _ttl_check(ttl: dict[str, Any], cli_args: str) -> Check:
    status = ttl.get("TimeToLiveStatus", "DISABLED")
    attribute = ttl.get("AttributeName")
    if status in ("ENABLED", "ENABLING") and attribute == schema.TTL_ATTRIBUTE:
        return Check("ttl", "ok", f"{status.lower()} on `{attribute}`")
    found = f"on `{attribute}`" if attribute else "no attribute"
    return Check(
        "ttl", "failed",
        f"TTL {status.lower()} ({found}): audit events and usage snapshots would never expire",
        # create_table switches TTL on for an existing table too; a TTL on another attribute
        # must be switched off first (DynamoDB allows one), which is the operator's call.
        f"zae-limiter deploy --table-only {cli_args}" if not attribute or status == "DISABLED"
        else f"switch TTL off on `{attribute}`, then: zae-limiter deploy --table-only {cli_args}",
    )


def _stream_check(description: dict[str, Any], table: str) -> Check:
    stream = description.get("StreamSpecification") or {}
    view = stream.get("StreamViewType")
    if stream.get("StreamEnabled") and view == schema.STREAM_VIEW_TYPE:
        return Check("stream", "ok", f"{view}")
    spec = f"StreamEnabled=true,StreamViewType={schema.STREAM_VIEW_TYPE}"
    fix = f"aws dynamodb update-table --table-name {table} --stream-specification {spec}"
    if stream.get("StreamEnabled"):
        # DynamoDB changes a stream's view type only by switching the stream off and on.
        fix = (f"aws dynamodb update-table --table-name {table} --stream-specification "
               f"StreamEnabled=false, then {fix}")
    return Check(
        "stream", "failed",
        f"stream {'enabled with ' + str(view) if stream.get('StreamEnabled') else 'off'}: the "
        f"usage aggregator reads {schema.STREAM_VIEW_TYPE}",
        fix,
    )


async def _version_check(repo: AdminStorage, cli_args: str) -> Check:
    record = await repo.get_version_record()
    if record is None:
        return Check(
            "version record", "failed", "no version record: limiters cannot tell what the "
            "table holds", f"zae-limiter deploy --table-only {cli_args} (writes only the record)",
        )
    compat = check_compatibility(record)
    schema_version = record.get("schema_version")
    if compat.compatible:
        aggregator = record.get("lambda_version")
        deployed = f"aggregator {aggregator}" if aggregator else "no aggregator deployed"
        return Check("version record", "ok", f"schema {schema_version}, {deployed}, compatible")
    fixes = {
        "lambda": f"zae-limiter upgrade {cli_args}",
        "min_client": "pip install --upgrade zae-limiter",
        "schema": f"zae-limiter migrate {cli_args} (after a backup)",
    }
    return Check("version record", "failed", f"NOT compatible: {compat.reason}",
                 fixes.get(compat.kind))


async def check_table(
    repo: Repository, *, region: str, endpoint_url: str | None, cli_args: str
) -> list[Check]:
    """Every check of `CHECKS`, in order; those after a failed one that they need are
    "skipped". `cli_args` names the deployment in the advice (`--name x --region r`)."""
    table = repo.table_name
    results = [_credentials_check(region, endpoint_url)]
    create = f"zae-limiter deploy --table-only {cli_args}"

    def rest(reason: str) -> list[Check]:
        done = {c.name for c in results}
        return [Check(name, "skipped", reason) for name in CHECKS if name not in done]

    if not results[-1].ok:
        return results + rest("needs credentials")
    try:
        description = (await repo.call("describe_table", TableName=table))["Table"]
    except InfrastructureNotFoundError:
        where = f"at {endpoint_url}" if endpoint_url else f"in {region}"
        results.append(Check("table", "failed", f"{table} not found {where}",
                             f"create it with: {create}"))
        return results + rest("needs the table")
    status = description.get("TableStatus", "ACTIVE")
    if status != "ACTIVE":
        results.append(Check("table", "failed", f"{table} is {status}",
                             "wait until it is ACTIVE, then check again"))
        return results + rest("needs an ACTIVE table")
    billing = (description.get("BillingModeSummary") or {}).get("BillingMode", "PROVISIONED")
    results.append(Check("table", "ok", f"{table} ACTIVE ({billing.lower().replace('_', '-')})"))
    expected = _expected(table)
    results.append(_keys_check(description, expected))
    if not results[-1].ok:
        # Another application's table: nothing else in it is ours to judge.
        return results + rest("not a zae-limiter table")
    results.append(_gsi_check(description, expected,
                              "this table was not made by zae-limiter (GSI1 is set at creation)"))
    ttl = await repo.call("describe_time_to_live", TableName=table)
    results.append(_ttl_check(ttl.get("TimeToLiveDescription", {}), cli_args))
    results.append(_stream_check(description, table))
    results.append(await _version_check(repo, cli_args))
    return results


def table_ready(checks: list[Check]) -> bool:
    return all(c.ok for c in checks)


def lines(checks: list[Check]) -> list[str]:
    """One line per check that ran (skipped ones only add noise to a shell; --json has them):
    a mark, the name, what was found, and for a failure what to do."""
    shown = []
    for check in checks:
        if check.status == "skipped":
            continue
        mark = "\u2713" if check.ok else "\u2717"
        fix = f" -> {check.fix}" if check.fix and not check.ok else ""
        shown.append(f"{mark} {check.name}: {check.detail}{fix}")
    return shown


async def deploy_table(repo: AdminStorage, options: object | None = None) -> dict[str, bool]:
    """Create the table from `schema.TABLE` unless it exists, switch its TTL on, and write its
    first version record unless it has one. Idempotent.

    `options` (StackOptions, InfraOptions, mapping or None): billing mode, capacities and tags
    apply. The record has no `lambda_version`: no aggregator is deployed, and one would make every
    newer client ask for an aggregator upgrade that only Pulumi can do. Returns which parts this
    call did: `{"created": ..., "version_record_written": ...}`.
    """
    # InfraOptions' coercion, not Pulumi: `zae_limiter.infra` loads Pulumi only for the component.
    from ..infra import coerce_options

    opts = coerce_options(options)
    created = await repo.create_table(
        opts.billing_mode, opts.read_capacity, opts.write_capacity, tags=opts.tags
    )
    written = await write_initial_record(repo, updated_by=UPDATED_BY)
    return {"created": created, "version_record_written": written}
