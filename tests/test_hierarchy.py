"""Where limits come from: entity own > entity `_default_` > resource defaults > system defaults >
the caller's (docs/limits.md). Every combination of levels, with and without cascade and
`use_stored_limits`; the resolution cache's TTL across two limiters; the audit trails of the
default levels; the calls a resolution costs; the CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import pytest
from click.testing import CliRunner

from zae_limiter import (
    Limit,
    MemoryStorage,
    RateLimiter,
    StackOptions,
    SyncRateLimiter,
    ValidationError,
)
from zae_limiter.audit import verify_trail
from zae_limiter.cli import main

RESOURCE = "gpt-4o"
# One capacity per level, so what an acquire resolved is read off `available`.
CAPACITY = {"entity": 1, "entity default": 2, "resource": 3, "system": 4, "caller": 5}
CALLER = [Limit.per_minute("rpm", CAPACITY["caller"])]
OWN_LEVELS = ("entity", "entity default")
SHARED_LEVELS = ("resource", "system")


def subsets(levels: tuple[str, ...]) -> list[frozenset[str]]:
    return [frozenset(c) for n in range(len(levels) + 1)
            for c in itertools.combinations(levels, n)]


def expected(own: frozenset[str], shared: frozenset[str]) -> str:
    present = own | shared
    return next((lv for lv in ("entity", "entity default", "resource", "system")
                 if lv in present), "caller")


def limit_of(level: str) -> list[Limit]:
    return [Limit.per_minute("rpm", CAPACITY[level])]


async def store_levels(
    lim: RateLimiter, shared: frozenset[str], own: dict[str, frozenset[str]]
) -> None:
    if "resource" in shared:
        await lim.set_resource_defaults(RESOURCE, limit_of("resource"))
        # Another resource's defaults never apply to this one.
        await lim.set_resource_defaults("other", [Limit.per_minute("rpm", 99)])
    if "system" in shared:
        await lim.set_system_defaults(limit_of("system"))
    for entity_id, levels in own.items():
        if "entity" in levels:
            await lim.set_limits(entity_id, limit_of("entity"), RESOURCE)
        if "entity default" in levels:
            await lim.set_limits(entity_id, limit_of("entity default"))
        # An entity's limits for another resource never apply to this one.
        await lim.set_limits(entity_id, [Limit.per_minute("rpm", 98)], "other")


@pytest.mark.parametrize("use_stored", [True, False])
@pytest.mark.parametrize("shared", subsets(SHARED_LEVELS), ids=lambda s: "+".join(sorted(s)))
@pytest.mark.parametrize("own", subsets(OWN_LEVELS), ids=lambda s: "+".join(sorted(s)))
async def test_every_level_combination_resolves_to_the_most_specific(
    own: frozenset[str], shared: frozenset[str], use_stored: bool
) -> None:
    async with RateLimiter(name="h", repository=MemoryStorage()) as lim:
        await lim.create_entity("key")
        await store_levels(lim, shared, {"key": own})
        level = expected(own, shared) if use_stored else "caller"
        async with lim.acquire("key", RESOURCE, CALLER, {"rpm": 1},
                               use_stored_limits=use_stored):
            pass
        left = await lim.available("key", RESOURCE, CALLER, use_stored_limits=use_stored)
        assert left == {"rpm": CAPACITY[level] - 1}
        (resolved,) = await lim.get_effective_limits("key", RESOURCE)
        stored_level = expected(own, shared)
        assert resolved.level == (None if stored_level == "caller" else stored_level)
        assert resolved.limits == ([] if stored_level == "caller" else limit_of(stored_level))


@pytest.mark.parametrize("shared", subsets(SHARED_LEVELS), ids=lambda s: "+".join(sorted(s)))
@pytest.mark.parametrize("parent", subsets(OWN_LEVELS), ids=lambda s: "p:" + "+".join(sorted(s)))
@pytest.mark.parametrize("child", subsets(OWN_LEVELS), ids=lambda s: "c:" + "+".join(sorted(s)))
async def test_cascade_resolves_the_parent_through_its_own_levels(
    child: frozenset[str], parent: frozenset[str], shared: frozenset[str]
) -> None:
    async with RateLimiter(name="h", repository=MemoryStorage()) as lim:
        await lim.create_entity("proj")
        await lim.create_entity("key", parent_id="proj")
        await store_levels(lim, shared, {"key": child, "proj": parent})
        async with lim.acquire("key", RESOURCE, CALLER, {"rpm": 1}, cascade=True,
                               use_stored_limits=True):
            pass
        for entity_id, own in (("key", child), ("proj", parent)):
            level = expected(own, shared)
            left = await lim.available(entity_id, RESOURCE, CALLER, use_stored_limits=True)
            assert left == {"rpm": CAPACITY[level] - 1}, entity_id
        shown = await lim.get_effective_limits("key", RESOURCE)
        assert [(r.entity_id, r.level or "caller") for r in shown] == [
            ("key", expected(child, shared)), ("proj", expected(parent, shared))]


async def test_cascade_without_stored_limits_takes_the_callers_for_both() -> None:
    async with RateLimiter(name="h", repository=MemoryStorage()) as lim:
        await lim.create_entity("proj")
        await lim.create_entity("key", parent_id="proj")
        await store_levels(lim, frozenset(SHARED_LEVELS), {"key": frozenset(OWN_LEVELS),
                                                            "proj": frozenset(OWN_LEVELS)})
        async with lim.acquire("key", RESOURCE, CALLER, {"rpm": 2}, cascade=True):
            pass
        for entity_id in ("key", "proj"):
            assert await lim.available(entity_id, RESOURCE, CALLER) == {"rpm": 3}


async def test_a_level_wins_whole_limits_are_not_merged_across_levels() -> None:
    async with RateLimiter(name="h", repository=MemoryStorage()) as lim:
        await lim.set_system_defaults([Limit.per_minute("rpm", 10), Limit.per_minute("tpm", 100)])
        await lim.set_resource_defaults(RESOURCE, [Limit.per_minute("tpm", 50)])
        assert await lim.available("k", RESOURCE, None, use_stored_limits=True) == {"tpm": 50}
        # rpm is the system's, and the resource level that won has none: not a limit here.
        with pytest.raises(ValidationError) as err:
            async with lim.acquire("k", RESOURCE, None, {"rpm": 1}, use_stored_limits=True):
                pass
        assert "consume" in str(err.value) or "rpm" in str(err.value)
        assert await lim.available("k", "elsewhere", None, use_stored_limits=True) == {
            "rpm": 10, "tpm": 100}


async def test_nothing_stored_and_no_caller_limits_names_the_field() -> None:
    async with RateLimiter(name="h", repository=MemoryStorage()) as lim:
        with pytest.raises(ValidationError) as err:
            async with lim.acquire("k", RESOURCE, None, {"rpm": 1}, use_stored_limits=True):
                pass
        assert err.value.field == "limits"


async def test_management_calls_validate_and_round_trip() -> None:
    async with RateLimiter(name="h", repository=MemoryStorage()) as lim:
        with pytest.raises(ValidationError) as err:
            await lim.set_resource_defaults("_default_", limit_of("resource"))
        assert err.value.field == "resource"
        with pytest.raises(ValidationError) as err:
            await lim.set_resource_defaults("bad#name", limit_of("resource"))
        assert err.value.field == "resource"
        with pytest.raises(ValidationError) as err:
            await lim.set_system_defaults([])
        assert err.value.field == "limits"
        with pytest.raises(ValidationError) as err:
            await lim.set_system_defaults(limit_of("system"), principal="no spaces")
        assert err.value.field == "principal"
        await lim.set_resource_defaults("b", limit_of("resource"))
        await lim.set_resource_defaults("a", limit_of("system"))
        await lim.set_system_defaults(limit_of("system"))
        assert await lim.get_resource_defaults("b") == limit_of("resource")
        assert await lim.get_system_defaults() == limit_of("system")
        # The system level is not a resource's.
        assert list(await lim.list_resource_defaults()) == ["a", "b"]
        # Replacing drops the limits the new set lacks.
        await lim.set_resource_defaults("b", [Limit.per_minute("tpm", 7)])
        assert await lim.get_resource_defaults("b") == [Limit.per_minute("tpm", 7)]
        await lim.delete_resource_defaults("b")
        await lim.delete_system_defaults()
        assert await lim.get_resource_defaults("b") == []
        assert await lim.get_system_defaults() == []
        assert list(await lim.list_resource_defaults()) == ["a"]


def test_the_sync_limiter_manages_defaults_too() -> None:
    with SyncRateLimiter(name="h", repository=MemoryStorage()) as lim:
        lim.set_system_defaults(limit_of("system"), principal="ops")
        lim.set_resource_defaults(RESOURCE, limit_of("resource"))
        assert lim.get_system_defaults() == limit_of("system")
        assert lim.list_resource_defaults() == {RESOURCE: limit_of("resource")}
        assert lim.available("k", RESOURCE, None, use_stored_limits=True) == {"rpm": 3}
        assert lim.get_effective_limits("k", "x")[0].level == "system"
        lim.delete_resource_defaults(RESOURCE)
        lim.delete_system_defaults()
        assert lim.get_effective_limits("k", RESOURCE)[0].level is None


# -- the cache: one TTL, dropped at once on a local change --------------------------------------


def test_config_cache_ttl_and_its_alias() -> None:
    assert RateLimiter(repository=MemoryStorage()).config_cache_ttl == 30.0
    assert RateLimiter(repository=MemoryStorage(), config_cache_ttl=2).config_cache_ttl == 2.0
    # `limits_cache_ttl`, the earlier name, still sets it.
    assert RateLimiter(repository=MemoryStorage(), limits_cache_ttl=7).config_cache_ttl == 7.0
    with pytest.raises(ValidationError) as err:
        RateLimiter(repository=MemoryStorage(), config_cache_ttl=2, limits_cache_ttl=7)
    assert err.value.field == "limits_cache_ttl"
    for bad in (-1, "5", True, float("inf")):
        with pytest.raises(ValidationError) as err:
            RateLimiter(repository=MemoryStorage(), config_cache_ttl=bad)  # type: ignore[arg-type]
        assert err.value.field == "config_cache_ttl"


TTL = 0.4


@pytest.mark.parametrize("level", ["resource", "system", "entity"])
async def test_another_limiters_change_is_seen_within_the_ttl_and_not_before(level: str) -> None:
    storage = MemoryStorage()  # one table, two processes' limiters
    async with RateLimiter(name="h", repository=storage, config_cache_ttl=TTL) as reader, \
            RateLimiter(name="h", repository=storage, config_cache_ttl=TTL) as writer:
        assert await reader.available("k", RESOURCE, CALLER, use_stored_limits=True) == {
            "rpm": 5}  # nothing stored: the caller's, and that "none" is cached
        changed_at = asyncio.get_running_loop().time()
        if level == "resource":
            await writer.set_resource_defaults(RESOURCE, limit_of("resource"))
        elif level == "system":
            await writer.set_system_defaults(limit_of("system"))
        else:
            await writer.set_limits("k", limit_of("entity"), RESOURCE)
        # The writer's own resolver was told: it sees the change at once.
        assert await writer.available("k", RESOURCE, CALLER, use_stored_limits=True) == {
            "rpm": CAPACITY[level]}
        # The reader still resolves from its cache (the check ran well within the TTL) ...
        seen = await reader.available("k", RESOURCE, CALLER, use_stored_limits=True)
        assert asyncio.get_running_loop().time() - changed_at < TTL
        assert seen == {"rpm": 5}
        # ... and reads the change once its cache expired.
        await asyncio.sleep(TTL + 0.05)
        assert await reader.available("k", RESOURCE, CALLER, use_stored_limits=True) == {
            "rpm": CAPACITY[level]}
        # A local delete is seen at once too.
        if level == "resource":
            await reader.delete_resource_defaults(RESOURCE)
        elif level == "system":
            await reader.delete_system_defaults()
        else:
            await reader.delete_limits("k", RESOURCE)
        assert await reader.available("k", RESOURCE, CALLER, use_stored_limits=True) == {
            "rpm": 5}


CHILD = textwrap.dedent("""
    import asyncio, json, sys, time
    from zae_limiter import Limit, RateLimiter
    CALLER = [Limit.per_minute("rpm", 5)]

    async def main():
        async with RateLimiter(name="hier2", endpoint_url=sys.argv[1],
                               config_cache_ttl=float(sys.argv[2])) as lim:
            async def rpm():
                got = await lim.available("k", "gpt-4o", CALLER, use_stored_limits=True)
                return got["rpm"]
            print(await rpm(), flush=True)
            for line in sys.stdin:
                wanted, started = int(line), time.monotonic()
                first = await rpm()
                while await rpm() != wanted and time.monotonic() - started < 10:
                    await asyncio.sleep(0.02)
                print(json.dumps([first, time.monotonic() - started]), flush=True)

    asyncio.run(main())
""")


@pytest.mark.integration
async def test_a_second_process_sees_each_level_change_within_the_ttl(endpoint_url: str) -> None:
    """A limiter in another OS process resolves from its cache until its TTL passes, then
    sees the change: system, resource, then the entity's own (each overriding the last)."""
    ttl = 1.0
    async with RateLimiter(name="hier2", endpoint_url=endpoint_url,
                           stack_options=StackOptions()) as admin:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, endpoint_url, str(ttl)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        seen: dict[str, list[float]] = {}
        try:
            assert child.stdout.readline().strip() == str(CAPACITY["caller"])
            for level in ("system", "resource", "entity"):
                if level == "system":
                    await admin.set_system_defaults(limit_of("system"))
                elif level == "resource":
                    await admin.set_resource_defaults(RESOURCE, limit_of("resource"))
                else:
                    await admin.set_limits("k", limit_of("entity"), RESOURCE)
                child.stdin.write(f"{CAPACITY[level]}\n")
                child.stdin.flush()
                seen[level] = json.loads(await asyncio.to_thread(child.stdout.readline))
        finally:
            child.stdin.close()
            child.wait(timeout=30)
        assert child.returncode == 0
    # Within the TTL, with a loaded machine's slack.
    assert all(elapsed < ttl + 0.5 for _, elapsed in seen.values()), seen
    # Right after the change the child still resolved its cached level, at least once.
    assert any(first != CAPACITY[level] for level, (first, _) in seen.items()), seen


# -- what a resolution costs (moto: the ledger counts every call) ------------------------------


@pytest.fixture
async def moto_limiter(endpoint_url: str) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(name="hier", endpoint_url=endpoint_url, stack_options=StackOptions(),
                           clock=lambda: 1_800_000_000_000) as lim:
        yield lim


def reads(lim: RateLimiter) -> int:
    calls = lim.ledger.snapshot()["calls"]
    assert isinstance(calls, dict)
    return sum(n for op, n in calls.items() if op in ("Query", "GetItem", "Scan"))


@pytest.mark.integration
async def test_nothing_stored_costs_its_reads_once_per_ttl_not_per_acquire(
    moto_limiter: RateLimiter,
) -> None:
    lim = moto_limiter
    limits = [Limit.per_minute("rpm", 1000)]
    lim.ledger.reset()
    for _ in range(20):
        async with lim.acquire("key", RESOURCE, limits, {"rpm": 1}, use_stored_limits=True):
            pass
    # The entity's limits, the resource's defaults, the system's: one Query each, then every
    # acquire is resolved from the cache (negative results included); one GetItem for the
    # cold bucket, then one UpdateItem per acquire.
    snapshot = lim.ledger.snapshot()
    assert snapshot["calls"] == {"Query": 3, "GetItem": 1, "UpdateItem": 20}
    # With stored limits of its own, the defaults are never read.
    await lim.set_limits("key2", limits, RESOURCE)
    lim.ledger.reset()
    for _ in range(5):
        async with lim.acquire("key2", RESOURCE, None, {"rpm": 1}, use_stored_limits=True):
            pass
    assert lim.ledger.snapshot()["calls"] == {"Query": 1, "GetItem": 1, "UpdateItem": 5}
    # Without use_stored_limits nothing is read but the bucket.
    lim.ledger.reset()
    for _ in range(5):
        async with lim.acquire("key3", RESOURCE, limits, {"rpm": 1}):
            pass
    assert lim.ledger.snapshot()["calls"] == {"GetItem": 1, "UpdateItem": 5}
    assert reads(lim) == 1


# -- audit trails of the default levels -----------------------------------------------------------


@pytest.mark.integration
async def test_every_change_of_a_default_level_is_an_audit_event(
    moto_limiter: RateLimiter,
) -> None:
    lim = moto_limiter
    await lim.set_system_defaults(limit_of("system"), principal="alice")
    await lim.set_resource_defaults(RESOURCE, limit_of("resource"), principal="bob")
    await lim.set_resource_defaults(RESOURCE, limit_of("entity"))
    await lim.delete_resource_defaults(RESOURCE, principal="carol")
    await lim.delete_system_defaults(principal="dave")
    system = await lim.get_audit_events("$SYSTEM", oldest_first=True)
    assert [(e.action, e.principal, e.resource) for e in system] == [
        ("limits_set", "alice", "_default_"), ("limits_deleted", "dave", "_default_")]
    assert system[0].details["limits"] == [x.to_dict() for x in limit_of("system")]
    assert system[1].details == {"limits_deleted": 1}
    trail = await lim.get_audit_events(f"$RESOURCE:{RESOURCE}", oldest_first=True)
    assert [(e.action, e.principal) for e in trail] == [
        ("limits_set", "bob"), ("limits_set", None), ("limits_deleted", "carol")]
    assert {e.entity_id for e in trail} == {f"$RESOURCE:{RESOURCE}"}
    # Each trail is a hash chain of its own, and intact.
    for audit_id in ("$SYSTEM", f"$RESOURCE:{RESOURCE}"):
        report = await verify_trail(lim.repository, audit_id)
        assert report.intact and report.chained == (2 if audit_id == "$SYSTEM" else 3)
    with pytest.raises(ValidationError) as err:
        await lim.get_audit_events("$OTHER")
    assert err.value.field == "entity_id"


# -- the CLI -------------------------------------------------------------------------------------


def cli(endpoint_url: str, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, [*args, "--name", "hcli", "--endpoint-url", endpoint_url])
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    return result.stdout


@pytest.mark.integration
def test_cli_sets_each_level_and_shows_where_limits_come_from(endpoint_url: str) -> None:
    async def setup() -> None:
        async with RateLimiter(name="hcli", endpoint_url=endpoint_url,
                               stack_options=StackOptions()) as lim:
            await lim.create_entity("proj")
            await lim.create_entity("key", parent_id="proj")
    asyncio.run(setup())

    def show() -> list[tuple[str, str, list[str]]]:
        data = json.loads(cli(endpoint_url, "limits", "show", "key", RESOURCE, "--json"))
        return [(r["entity_id"], r["level"], [x["spec"] for x in r["limits"]])
                for r in data["resolved"]]

    assert show() == [("key", "caller", []), ("proj", "caller", [])]
    cli(endpoint_url, "limits", "set-system", "--limit", "rpm:4/minute", "--principal", "ops")
    assert show() == [("key", "system", ["rpm:4/minute"]), ("proj", "system", ["rpm:4/minute"])]
    cli(endpoint_url, "limits", "set-resource", RESOURCE, "--limit", "rpm:3/minute")
    cli(endpoint_url, "limits", "set", "proj", "--limit", "rpm:2/minute")
    assert show() == [("key", "resource", ["rpm:3/minute"]),
                      ("proj", "entity default", ["rpm:2/minute"])]
    cli(endpoint_url, "limits", "set", "key", "--resource", RESOURCE, "--limit", "rpm:1/minute")
    assert show()[0] == ("key", "entity", ["rpm:1/minute"])
    human = cli(endpoint_url, "limits", "show", "key", RESOURCE)
    assert "entity default" in human and "rpm:1/minute" in human

    got = json.loads(cli(endpoint_url, "limits", "get-resource", RESOURCE, "--json"))
    assert [x["spec"] for x in got["limits"]] == ["rpm:3/minute"]
    got = json.loads(cli(endpoint_url, "limits", "get-system", "--json"))
    assert [x["spec"] for x in got["limits"]] == ["rpm:4/minute"]
    listed = json.loads(cli(endpoint_url, "limits", "list-resources", "--json"))
    assert [(r["resource"], r["spec"]) for r in listed["resources"]] == [
        (RESOURCE, "rpm:3/minute")]
    cli(endpoint_url, "limits", "set-resource", "_default_", "--limit", "rpm:1/minute", code=1)
    cli(endpoint_url, "limits", "delete-resource", RESOURCE, "--yes", "--principal", "ops")
    cli(endpoint_url, "limits", "delete-system", "--yes")
    assert json.loads(cli(endpoint_url, "limits", "get-system", "--json"))["limits"] == []
    events = json.loads(cli(endpoint_url, "audit", "$SYSTEM", "--json"))["events"]
    assert [(e["action"], e.get("principal")) for e in events] == [
        ("limits_deleted", None), ("limits_set", "ops")]
    cli(endpoint_url, "audit", "verify", f"$RESOURCE:{RESOURCE}")
