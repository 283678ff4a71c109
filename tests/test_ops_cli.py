"""Operator commands on a local endpoint: every command with --json, exit codes, one-line errors,
bucket reset back to full, backup / restore round trips."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from zae_limiter import Limit, RateLimiter, StackOptions, __version__
from zae_limiter.cli import main
from zae_limiter.storage.dynamodb.repository import Repository

pytestmark = pytest.mark.integration


def cli(endpoint_url: str, *args: str, code: int = 0, input: str | None = None) -> Result:
    result = CliRunner().invoke(main, [*args, "--name", "ops", "--endpoint-url", endpoint_url],
                                input=input)
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == code, result.output
    return result


def js(endpoint_url: str, *args: str, code: int = 0) -> Any:
    result = cli(endpoint_url, *args, "--json", code=code)
    return json.loads(result.stdout)


@pytest.fixture
def table(endpoint_url: str) -> str:
    async def setup() -> None:
        async with RateLimiter(name="ops", endpoint_url=endpoint_url,
                               stack_options=StackOptions()) as lim:
            await lim.create_entity("proj")
            await lim.create_entity("key", parent_id="proj")
    asyncio.run(setup())
    return endpoint_url


def consume(endpoint_url: str, entity_id: str, resource: str, amounts: dict[str, int]) -> None:
    async def go() -> None:
        async with RateLimiter(name="ops", endpoint_url=endpoint_url) as lim:  # noqa: SIM117
            async with lim.acquire(entity_id, resource, None, amounts, use_stored_limits=True):
                pass
    asyncio.run(go())


# -- syntax -----------------------------------------------------------------------------------


def test_limit_syntax() -> None:
    # The CLI's --limit is the library's text form (tests/test_limit_text.py covers the grammar).
    assert Limit.parse("rpm:100/minute") == Limit.per_minute("rpm", 100)
    assert Limit.parse("tpm:10000/1m,burst=20000") == Limit.per_minute("tpm", 10000, 20000)
    assert Limit.parse("name=rpm,capacity=100,period=60,burst=120") == Limit.per_minute(
        "rpm", 100, 120)
    assert Limit.parse("r:10/30s,refill=5") == Limit.custom("r", 10, 5, 30)
    assert Limit.parse("d:1000/day") == Limit.per_day("d", 1000)
    assert Limit.parse("p:1/3600").refill_period_seconds == 3600
    assert Limit.parse("p:1/2h").refill_period_seconds == 7200
    for bad in ("rpm", "rpm:100", "rpm:x/minute", "rpm:100/fortnight", "name=rpm,capacity=1",
                "rpm:100/minute,colour=red"):
        with pytest.raises(ValueError):
            Limit.parse(bad)


# -- versions ---------------------------------------------------------------------------------


def test_version_check_upgrade(table: str) -> None:
    info = js(table, "version")
    assert info["client_version"] == __version__ and info["compatible"]
    assert js(table, "check")["compatible"]
    # `check` prints one line per check; the version one ends in the verdict.
    assert "\u2713 version record: schema" in cli(table, "check").stdout

    async def age() -> None:
        async with Repository("ZAEL-ops", "us-east-1", table) as repo:
            await repo.set_version_record(lambda_version="0.5.0")
    asyncio.run(age())
    bad = js(table, "check", code=1)
    assert not bad["compatible"] and bad["can_auto_update"]
    result = cli(table, "check", code=1)
    assert "NOT compatible" in result.output and "zae-limiter upgrade" in result.output
    up = js(table, "upgrade")
    assert up["action"] == "upgraded" and up["compatible"]
    assert js(table, "upgrade")["action"] == "none"
    assert js(table, "version")["lambda_version"] == __version__

    async def major() -> None:
        async with Repository("ZAEL-ops", "us-east-1", table) as repo:
            await repo.set_version_record(schema_version="2.0.0")
    asyncio.run(major())
    result = cli(table, "upgrade", code=1)
    assert "upgrade cannot fix this" in result.output and "migration" in result.output


def test_missing_table_is_one_readable_line(endpoint_url: str) -> None:
    for args in (["version"], ["check"], ["entity", "show", "x"], ["bucket", "show", "x"]):
        result = cli(endpoint_url, *args, code=1)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "ZAEL-ops" in lines[0] and "not found" in lines[0], lines


# -- entities and limits ----------------------------------------------------------------------


def test_entity_commands(table: str) -> None:
    created = js(table, "entity", "create", "k2", "--parent", "proj", "--display-name", "Key 2",
                 "--meta", "team=ml")
    assert created == created | {"entity_id": "k2", "parent_id": "proj", "name": "Key 2",
                                 "metadata": {"team": "ml"}}
    assert "already exists" in cli(table, "entity", "create", "k2", code=1).output
    assert "orphan-parent" in cli(table, "entity", "create", "o", "--parent", "orphan-parent",
                                  code=1).output
    shown = js(table, "entity", "show", "k2")
    assert shown["parent_id"] == "proj" and shown["limits"] == {}
    assert sorted(c["entity_id"] for c in js(table, "entity", "children", "proj")) == ["k2", "key"]
    verified = js(table, "entity", "verify", "k2")
    assert verified["ok"] and [c["check"] for c in verified["checks"]] == [
        "entity exists", "parent exists", "limits readable", "available(health-check)"]
    assert not js(table, "entity", "verify", "nobody", code=1)["ok"]
    assert "FAILED" in cli(table, "entity", "verify", "nobody", code=1).output
    # destructive: asks, and "no" keeps the entity
    cli(table, "entity", "delete", "k2", input="n\n", code=1)
    assert js(table, "entity", "show", "k2")["entity_id"] == "k2"
    assert js(table, "entity", "delete", "k2", "--yes")["deleted_items"] == 1
    assert "not found" in cli(table, "entity", "show", "k2", code=1).output


def test_stored_strings_cannot_drive_the_terminal(table: str) -> None:
    """An entity's name and metadata are free text anyone with write access to the table may
    set: the human views show escape sequences, bidi overrides and other controls as escapes,
    never as the characters a terminal acts on. JSON keeps the stored value exactly."""
    evil = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil"

    async def setup() -> None:
        async with RateLimiter(name="ops", endpoint_url=table) as lim:
            await lim.create_entity("esc", name=evil, metadata={"note": evil})

    asyncio.run(setup())
    shown = cli(table, "entity", "show", "esc").output
    for char in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert char not in shown, repr(char)
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202eevil" in shown
    assert js(table, "entity", "show", "esc")["name"] == evil


def test_verify_reports_a_missing_parent(table: str) -> None:
    async def orphan() -> None:
        async with Repository("ZAEL-ops", "us-east-1", table) as repo:
            await repo.delete_entity("proj")
    asyncio.run(orphan())
    checks = js(table, "entity", "verify", "key", code=1)["checks"]
    assert [c["ok"] for c in checks[:2]] == [True, False]
    assert "cascade fails" in checks[1]["detail"]


def test_limits_commands(table: str) -> None:
    stored = js(table, "limits", "set", "key", "--resource", "llm", "--limit", "rpm:100/minute",
                "--limit", "name=tpm,capacity=1000,period=60,burst=2000")
    assert [x["spec"] for x in stored["limits"]] == ["rpm:100/minute",
                                                     "tpm:1000/minute,burst=2000"]
    js(table, "limits", "set", "key", "--limit", "rpm:10/second")
    got = js(table, "limits", "get", "key")["limits"]
    assert sorted((x["resource"], x["name"]) for x in got) == [
        ("_default_", "rpm"), ("llm", "rpm"), ("llm", "tpm")]
    only = js(table, "limits", "get", "key", "--resource", "llm")["limits"]
    assert {x["name"]: x["burst"] for x in only} == {"rpm": 100, "tpm": 2000}
    result = cli(table, "limits", "set", "key", "--limit", "rpm:lots/minute", code=2)
    assert "--limit" in result.output
    assert js(table, "limits", "delete", "key", "--resource", "llm", "--yes")["deleted"] == 2
    assert js(table, "limits", "get", "key", "--resource", "llm")["limits"] == []


def test_limits_set_takes_every_shape_and_the_bucket_view_reads_a_quota(table: str) -> None:
    specs = [
        "monthly:10/quota,cron=0 0 1 * *,tz=Europe/Paris",
        "session:5/quota,reset_after=1h",
        "streams:2/concurrent,lease_ttl=1m",
        "tpm:1000/minute,soft",
    ]
    stored = js(table, "limits", "set", "key", "--resource", "llm",
                *[arg for spec in specs for arg in ("--limit", spec)])  # fmt: skip
    assert sorted(x["spec"] for x in stored["limits"]) == sorted(
        Limit.parse(spec).spec for spec in specs
    )
    got = {x["name"]: x for x in js(table, "limits", "get", "key", "--resource", "llm")["limits"]}
    assert got["monthly"]["kind"] == "quota" and got["monthly"]["tz"] == "Europe/Paris"
    assert got["streams"]["lease_ttl_seconds"] == 60 and got["tpm"]["soft"] is True
    consume(table, "key", "llm", {"monthly": 4, "session": 1, "streams": 1, "tpm": 1500})
    rows = {r["limit"]: r for r in js(table, "bucket", "show", "key")["limits"]}
    # A quota's stored `fa#` is what its window used: the view shows what is left of it and
    # when the window resets, not a token bucket's refill.
    assert rows["monthly"]["available"] == 6 and rows["monthly"]["full_at"].endswith("Z")
    assert rows["session"]["available"] == 4
    assert rows["tpm"]["available"] < 0  # soft: in debt, admitted anyway
    result = cli(table, "limits", "set", "key", "--limit", "q:5/quota,cron=0 0 31 2 *", code=2)
    assert "cron" in result.output


# -- buckets ----------------------------------------------------------------------------------


def test_bucket_show_and_reset_restores_a_full_bucket(table: str) -> None:
    js(table, "limits", "set", "key", "--resource", "llm", "--limit", "rpm:10/hour",
       "--limit", "tpm:1000/hour,burst=1500")
    js(table, "limits", "set", "key", "--resource", "img", "--limit", "rpm:5/hour")
    consume(table, "key", "llm", {"rpm": 4, "tpm": 900})
    consume(table, "key", "img", {"rpm": 5})
    shown = js(table, "bucket", "show", "key")
    rows = {(r["resource"], r["limit"]): r for r in shown["limits"]}
    assert rows.keys() == {("llm", "rpm"), ("llm", "tpm"), ("img", "rpm")}
    llm_tpm = rows[("llm", "tpm")]
    assert llm_tpm["definition"] == "1000:1500:1000:3600"
    assert llm_tpm["burst"] == 1500 and llm_tpm["consumed"] == 900 and llm_tpm["released"] == 0
    assert 600 <= llm_tpm["available"] < 610
    assert llm_tpm["state"] == "ok" and llm_tpm["full_at"].endswith("Z")
    assert rows[("img", "rpm")]["available"] < 1
    assert "buckets of key" in cli(table, "bucket", "show", "key").output

    # one limit
    reset = js(table, "bucket", "reset", "key", "--resource", "llm", "--limit", "tpm", "--yes")
    assert reset["reset"] == [{"entity_id": "key", "resource": "llm", "limits": ["tpm"]}]
    rows = {(r["resource"], r["limit"]): r for r in js(table, "bucket", "show", "key")["limits"]}
    assert rows[("llm", "tpm")] == rows[("llm", "tpm")] | {
        "available": 1500, "full_at": None, "state": "reset (full)", "consumed": 900}
    assert rows[("llm", "rpm")]["available"] < 7
    # every bucket of the entity
    cli(table, "bucket", "reset", "key", input="n\n", code=1)
    done = js(table, "bucket", "reset", "key", "--yes")["reset"]
    assert sorted(d["resource"] for d in done) == ["img", "llm"]
    rows = {(r["resource"], r["limit"]): r for r in js(table, "bucket", "show", "key")["limits"]}
    assert {k: r["available"] for k, r in rows.items()} == {
        ("llm", "rpm"): 10, ("llm", "tpm"): 1500, ("img", "rpm"): 5}
    # and the data plane agrees: the full burst can be taken again
    consume(table, "key", "img", {"rpm": 5})
    consume(table, "key", "llm", {"rpm": 10, "tpm": 1500})
    only_img = js(table, "bucket", "show", "key", "--resource", "img")["limits"]
    assert [r["consumed"] for r in only_img] == [10]
    assert cli(table, "bucket", "reset", "key", "--limit", "rpm", "--yes", code=2)
    assert js(table, "bucket", "reset", "nobody", "--yes")["reset"] == []


# -- backups, restores, migrations ------------------------------------------------------------


def test_backup_and_restore_round_trip(table: str, tmp_path: Path) -> None:
    js(table, "limits", "set", "key", "--limit", "rpm:10/minute")
    taken = js(table, "backup", "create", "--backup-dir", str(tmp_path))
    # 2 entities, 1 limit, version, 3 audit events (2 entities created, limits set) and the
    # heads of the 2 entities' audit chains
    assert taken["kind"] == "export" and taken["items"] == 9
    assert Path(taken["id"]).is_file()
    listed = js(table, "backup", "list", "--backup-dir", str(tmp_path))
    assert [b["id"] for b in listed] == [taken["id"]]
    # damage: delete an entity, add another
    js(table, "entity", "delete", "key", "--yes")
    js(table, "entity", "create", "intruder")
    restored = js(table, "restore", "--from", taken["id"], "--yes")
    # only the intruder is removed: audit events since the export (key deleted, intruder
    # created) are kept, a restore does not erase the trail
    assert restored["restored_items"] == 9 and restored["deleted_items"] == 1
    trail = [e["action"] for e in js(table, "audit", "key")["events"]]
    assert trail == ["entity_deleted", "limits_set", "entity_created"]
    # nor move a chain's head back onto the export's
    assert js(table, "audit", "verify", "key")["intact"] is True
    assert js(table, "audit", "intruder")["events"][0]["action"] == "entity_created"
    assert js(table, "entity", "show", "key")["limits"] == {"_default_": ["rpm:10/minute"]}
    assert "not found" in cli(table, "entity", "show", "intruder", code=1).output
    hints = js(table, "restore")["commands"]
    assert any("restore-table-from-backup" in h for h in hints)
    assert any("restore-table-to-point-in-time" in h for h in hints)
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    assert "not a zae-limiter export" in cli(table, "restore", "--from", str(bogus), "--yes",
                                             code=1).output


def test_aws_backups_through_the_api(table: str) -> None:
    """The AWS path (create_backup / list_backups), exercised against moto's implementation."""
    from zae_limiter.ops import recovery as ops

    async def go() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with Repository("ZAEL-ops", "us-east-1", table) as repo:
            taken = await ops.backup(repo, local=False, label="pre-migration-1.1.0")
            return taken, await ops.list_backups(repo)
    taken, listed = asyncio.run(go())
    assert taken["kind"] == "aws-backup" and taken["id"].startswith("arn:aws:dynamodb")
    assert [b["id"] for b in listed] == [taken["id"]]


async def _as_created_by_1_0(endpoint_url: str) -> None:
    async with RateLimiter(name="ops", endpoint_url=endpoint_url) as lim:
        await lim.repository.set_version_record(schema_version="1.0.0")


def test_migrate_commands(table: str, tmp_path: Path) -> None:
    js(table, "limits", "set", "key", "--limit", "rpm:10/minute")
    asyncio.run(_as_created_by_1_0(table))
    listing = js(table, "migrate", "list")
    assert listing["schema_version"] == "1.0.0"
    assert [x["version"] for x in listing["migrations"]] == ["1.1.0", "1.2.0"]
    plan = js(table, "migrate", "--to", "1.1.0", "--dry-run")
    assert plan["dry_run"] and [p["to_version"] for p in plan["planned"]] == ["1.1.0"]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert js(table, "version")["schema_version"] == "1.0.0"
    cli(table, "migrate", "--to", "1.1.0", "--backup-dir", str(tmp_path), input="n\n", code=1)
    done = js(table, "migrate", "--to", "1.1.0", "--backup-dir", str(tmp_path), "--yes")
    assert [a["to_version"] for a in done["applied"]] == ["1.1.0"]
    backups = sorted(tmp_path.iterdir())
    assert len(backups) == 1 and "pre-migration-1.1.0" in backups[0].name
    assert str(backups[0]) == done["backup"]
    assert js(table, "version")["schema_version"] == "1.1.0"
    assert js(table, "check")["compatible"]  # minor schema versions stay compatible
    assert "use `zae-limiter migrate rollback" in cli(table, "migrate", "--to", "1.0.0",
                                                      "--yes", code=1).output
    text = cli(table, "migrate", "rollback", "--to", "1.0.0", "--backup-dir", str(tmp_path),
               "--yes").output
    assert "roll back 1.1.0 -> 1.0.0" in text and "done" in text
    assert js(table, "version")["schema_version"] == "1.0.0"
    assert len(list(tmp_path.iterdir())) == 2
    assert "unknown schema version 9.9.9" in cli(table, "migrate", "--to", "9.9.9", code=1).output
    log = js(table, "migrate", "list")["log"]
    assert [e["direction"] for e in log] == ["forward", "backward"]
