"""Limits as a file (docs/limits.md): plan, apply and export round-trip a file of tiers and many
keys; a bad file changes nothing and names its line; an interrupted apply is finished by the
next; prune removes what the file omits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from zae_limiter import Limit, MemoryStorage, RateLimiter, StackOptions
from zae_limiter.cli import main
from zae_limiter.ops import limits_file
from zae_limiter.ops.limits_file import LimitsFile, LimitsFileError

KEYS = 1000


def tiered_file(keys: int) -> str:
    """Three tiers as anchors, `keys` keys each on one of them (the third overrides a resource
    through a merge key)."""
    lines = [
        'system: ["rpm:1000/minute"]',
        "resources:",
        '  gpt-4o: ["tpm:100000/minute", "rpm:500/minute"]',
        '  embed: ["tpm:1000000/minute"]',
        "entities:",
        "  key-0000: &free",
        '    _default_: ["rpm:10/minute"]',
        "  key-0001: &pro",
        '    _default_: ["rpm:100/minute"]',
        '    gpt-4o: ["tpm:20000/minute", "monthly:1000000/quota,cron=0 0 1 * *"]',
        "  key-0002: &team",
        "    <<: *pro",
        '    embed: ["tpm:50000/minute,burst=80000", "streams:4/concurrent,lease_ttl=5m"]',
    ]
    tiers = ("free", "pro", "team")
    lines += [f"  key-{n:04d}: *{tiers[n % 3]}" for n in range(3, keys)]
    return "\n".join(lines) + "\n"


def cli(endpoint_url: str, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, [*args, "--name", "lfile", "--endpoint-url", endpoint_url])
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture
def table(endpoint_url: str) -> str:
    async def setup() -> None:
        async with RateLimiter(name="lfile", endpoint_url=endpoint_url,
                               stack_options=StackOptions()):
            pass
    asyncio.run(setup())
    return endpoint_url


def limiter(endpoint_url: str) -> RateLimiter:
    return RateLimiter(name="lfile", endpoint_url=endpoint_url, version_check="skip")


def test_parse_reads_tiers_through_anchors_and_merge_keys() -> None:
    parsed = limits_file.parse(tiered_file(6))
    assert parsed.system == (Limit.per_minute("rpm", 1000),)
    assert parsed.entities["key-0003"] == parsed.entities["key-0000"] == {
        "_default_": (Limit.per_minute("rpm", 10),)}
    team = parsed.entities["key-0005"]
    assert sorted(team) == ["_default_", "embed", "gpt-4o"]  # pro's, merged, and its own
    assert team["gpt-4o"] == parsed.entities["key-0001"]["gpt-4o"]
    assert [x.name for x in team["embed"]] == ["streams", "tpm"]  # sorted by name
    assert limits_file.parse("") == LimitsFile()


async def test_plan_apply_export_round_trip_a_thousand_keys() -> None:
    """The round trip at scale, through the library on MemoryStorage (the contract suite proves
    it stores and reads limits as DynamoDB does); the CLI's round trip on moto follows."""
    wanted = limits_file.parse(tiered_file(KEYS))
    # 1 system, 2 resources, and per key its tier's levels (free 1, pro 2, team 3).
    levels = 1 + 2 + sum((1, 2, 3)[n % 3] for n in range(KEYS))
    async with RateLimiter(name="f", repository=MemoryStorage()) as lim:
        planned = await limits_file.plan(lim, wanted)
        assert len(planned.changes) == levels
        assert {c.action for c in planned.changes} == {"add"}
        assert await limits_file.apply(lim, planned, principal="ops") == levels
        assert (await limits_file.plan(lim, wanted, prune=True)).empty
        assert await limits_file.apply(lim, await limits_file.plan(lim, wanted)) == 0
        exported = await limits_file.export(lim)
        assert exported.levels() == wanted.levels()
        text = limits_file.dump(exported)
        assert text.count("&") == 3  # one anchor per tier
        assert limits_file.parse(text).levels() == wanted.levels()
        # What the file set is what an acquire resolves, and each change is audited.
        (key,) = await lim.get_effective_limits("key-0004", "gpt-4o")
        assert (key.level, key.limits) == ("entity", list(wanted.entities["key-0001"]["gpt-4o"]))
        events = await lim.get_audit_events("key-0004")
        assert sorted((e.action, e.resource, e.principal) for e in events) == [
            ("limits_set", "_default_", "ops"), ("limits_set", "gpt-4o", "ops")]
        assert [e.action for e in await lim.get_audit_events("$SYSTEM")] == ["limits_set"]


@pytest.mark.integration
def test_the_cli_plans_applies_and_exports_a_tiered_file(table: str, tmp_path: Path) -> None:
    keys = 30
    path = tmp_path / "limits.yaml"
    path.write_text(tiered_file(keys))
    wanted = limits_file.load(str(path))
    planned = json.loads(cli(table, "limits", "plan", str(path), "--json"))
    levels = 1 + 2 + sum((1, 2, 3)[n % 3] for n in range(keys))
    assert planned["summary"] == {"add": levels, "change": 0, "remove": 0}

    applied = json.loads(cli(table, "limits", "apply", str(path), "--yes", "--principal", "ops",
                             "--json"))
    assert applied["applied"] == levels
    assert cli(table, "limits", "plan", str(path)).strip() == "no changes"
    again = json.loads(cli(table, "limits", "apply", str(path), "--yes", "--json"))
    assert again["applied"] == 0 and again["changes"] == []

    # The export is the file's limits, with its tiers as anchors, and applies as no change.
    exported = tmp_path / "exported.yaml"
    cli(table, "limits", "export", "--output", str(exported))
    text = exported.read_text()
    assert text.count("&") == 3  # one anchor per tier
    assert limits_file.parse(text).levels() == wanted.levels()
    assert cli(table, "limits", "plan", str(exported)).strip() == "no changes"
    assert cli(table, "limits", "export") == text  # stdout without --output

    async def check() -> None:
        async with limiter(table) as lim:
            (key,) = await lim.get_effective_limits("key-0004", "gpt-4o")
            assert (key.level, key.limits) == ("entity", list(
                wanted.entities["key-0001"]["gpt-4o"]))
            events = await lim.get_audit_events("key-0004")
            assert sorted((e.action, e.resource, e.principal) for e in events) == [
                ("limits_set", "_default_", "ops"), ("limits_set", "gpt-4o", "ops")]
    asyncio.run(check())


BAD_FILES = [
    # (text, line, words the message holds)
    ('system: ["rpm:100/minute"]\nresources:\n  gpt-4o: ["tpm:lots/minute"]\n', 3, "capacity"),
    ('entities:\n  key-1:\n    _default_: ["rpm:10/minute"]\n    gpt-4o:\n'
     '      - "tpm:5/minute"\n      - "rpm:5/fortnight"\n', 6, "period"),
    ('system: ["rpm:1/minute"]\nresource:\n  a: ["rpm:1/minute"]\n', 2, "unknown section"),
    ('entities:\n  "bad key":\n    _default_: ["rpm:1/minute"]\n', 2, "entities.bad key"),
    ('entities:\n  k:\n    _default_: ["rpm:1/minute", "rpm:2/minute"]\n', 3, "second limit"),
    ('entities:\n  k:\n    _default_: []\n', 3, "non-empty list"),
    ('resources:\n  gpt-4o: ["rpm:1/minute"]\n  gpt-4o: ["rpm:2/minute"]\n', 3, "given twice"),
    ('resources:\n  _default_: ["rpm:1/minute"]\n', 2, "system level"),
    ('system: ["rpm:1/minute"\nresources: {}\n', 2, "not YAML"),
    ("entities: [1, 2]\n", 1, "must be a mapping"),
]


@pytest.mark.parametrize(("text", "line", "words"), BAD_FILES)
def test_a_bad_file_is_rejected_with_its_line(text: str, line: int, words: str) -> None:
    with pytest.raises(LimitsFileError) as err:
        limits_file.parse(text)
    assert err.value.line == line, str(err.value)
    assert words in str(err.value) and f"line {line}:" in str(err.value)


@pytest.mark.integration
def test_a_bad_file_changes_nothing(table: str, tmp_path: Path) -> None:
    # Everything valid but one limit on the last line: nothing of it may be written.
    good = tiered_file(30)
    path = tmp_path / "bad.yaml"
    path.write_text(good + '  key-9999:\n    _default_: ["rpm:10/minute,burst=5"]\n')
    bad_line = len(good.splitlines()) + 2
    result = CliRunner().invoke(main, ["limits", "apply", str(path), "--yes", "--name", "lfile",
                                       "--endpoint-url", table])
    assert result.exit_code == 1
    assert f"line {bad_line}:" in result.output and "burst" in result.output
    assert cli(table, "limits", "export") == "{}\n"  # the table holds no limit at all


class FailingStorage(MemoryStorage):
    """A table whose limit writes fail after `budget` of them (a process killed midway)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self.writes = 0

    def _spend(self) -> None:
        if self.writes >= self.budget:
            raise ConnectionError("cut off")
        self.writes += 1

    async def set_limits(self, entity_id: str, resource: str, limits: Sequence[Limit]) -> None:
        self._spend()
        await super().set_limits(entity_id, resource, limits)

    async def set_defaults(self, resource: str, limits: Sequence[Limit]) -> None:
        self._spend()
        await super().set_defaults(resource, limits)


async def test_an_apply_cut_off_midway_is_finished_by_the_next() -> None:
    wanted = limits_file.parse(tiered_file(40))
    storage = FailingStorage(budget=0)
    async with RateLimiter(name="f", repository=storage) as lim:
        total = len((await limits_file.plan(lim, wanted)).changes)
        storage.budget = total // 2
        with pytest.raises(ConnectionError):
            await limits_file.apply(lim, await limits_file.plan(lim, wanted), principal="ops")
        assert storage.writes == total // 2
        left = await limits_file.plan(lim, wanted)
        assert len(left.changes) == total - total // 2
        assert {c.action for c in left.changes} == {"add"}
        storage.budget = total
        assert await limits_file.apply(lim, left, principal="ops") == total - total // 2
        assert (await limits_file.plan(lim, wanted, prune=True)).empty
        assert (await limits_file.export(lim)).levels() == wanted.levels()
        # Every level was written once: no write was repeated by the second run.
        assert storage.writes == total


@pytest.mark.integration
def test_prune_removes_what_the_file_omits(table: str, tmp_path: Path) -> None:
    async def setup() -> None:
        async with limiter(table) as lim:
            await lim.set_system_defaults([Limit.per_minute("rpm", 1)])
            await lim.set_resource_defaults("old-model", [Limit.per_minute("rpm", 2)])
            await lim.set_limits("gone", [Limit.per_minute("rpm", 3)])
            await lim.set_limits("kept", [Limit.per_minute("rpm", 4)], "old-model")
            await lim.set_limits("kept", [Limit.per_minute("rpm", 5)])
    asyncio.run(setup())
    path = tmp_path / "limits.yaml"
    path.write_text('entities:\n  kept:\n    _default_: ["rpm:6/minute"]\n')
    plain = json.loads(cli(table, "limits", "plan", str(path), "--json"))
    assert [(c["action"], c["entity_id"], c["resource"]) for c in plain["changes"]] == [
        ("change", "kept", "_default_")]
    pruned = json.loads(cli(table, "limits", "plan", str(path), "--prune", "--json"))
    assert [(c["action"], c["level"], c["entity_id"], c["resource"])
            for c in pruned["changes"]] == [
        ("remove", "system", None, "_default_"),
        ("remove", "resource", None, "old-model"),
        ("remove", "entity", "gone", "_default_"),
        ("change", "entity", "kept", "_default_"),
        ("remove", "entity", "kept", "old-model"),
    ]
    human = cli(table, "limits", "plan", str(path), "--prune")
    assert "- entity gone _default_: rpm:3/minute" in human
    assert "1 to add" not in human and "1 to change, 4 to remove" in human
    cli(table, "limits", "apply", str(path), "--prune", "--yes", "--principal", "ops")
    assert cli(table, "limits", "plan", str(path), "--prune").strip() == "no changes"
    exported = limits_file.parse(cli(table, "limits", "export"))
    assert exported == LimitsFile(None, {}, {"kept": {"_default_": (Limit.per_minute("rpm", 6),)}})

    async def trails() -> None:
        async with limiter(table) as lim:
            system = await lim.get_audit_events("$SYSTEM")
            assert (system[0].action, system[0].principal) == ("limits_deleted", "ops")
            gone = await lim.get_audit_events("gone")
            assert gone[0].action == "limits_deleted" and gone[0].principal == "ops"
    asyncio.run(trails())


@pytest.mark.integration
def test_apply_asks_first_unless_yes(table: str, tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text('system: ["rpm:7/minute"]\n')
    result = CliRunner().invoke(main, ["limits", "apply", str(path), "--name", "lfile",
                                       "--endpoint-url", table], input="n\n")
    assert result.exit_code == 1 and "+ system: rpm:7/minute" in result.output
    assert cli(table, "limits", "export") == "{}\n"
