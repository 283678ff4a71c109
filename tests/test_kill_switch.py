"""Kill switches (docs/limits.md, "Kill switch"): disable refuses with `ResourceDisabled` in every
failure mode and consumes nothing, bypass admits with no consumption and no I/O, enable restores
the limits; each change is audited, seen at once by the limiter that made it and by another
process within its cache TTL, and costs a limiter with clear switches no call per acquire."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest
from click.testing import CliRunner

from zae_limiter import (
    AuditAction,
    FailureMode,
    Limit,
    MemoryStorage,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    Reservations,
    ResourceDisabled,
    StackOptions,
    SyncRateLimiter,
    ValidationError,
)
from zae_limiter.cli import main
from zae_limiter.storage import RepositoryUnavailable, Switch

RPM = Limit.per_minute("rpm", 5)
T0 = 1_800_000_000_000


@pytest.fixture
async def limiter() -> AsyncIterator[RateLimiter]:
    async with RateLimiter(repository=MemoryStorage(), clock=lambda: T0) as lim:
        yield lim


async def take(limiter: RateLimiter, entity_id: str = "key", resource: str = "llm", **kw: Any
               ) -> Any:
    async with limiter.acquire(entity_id, resource, [RPM], {"rpm": 1}, **kw) as lease:
        return lease


# -- disable --------------------------------------------------------------------------------------


async def test_disabled_resource_refuses_in_every_failure_mode_and_consumes_nothing(
    limiter: RateLimiter,
) -> None:
    await take(limiter)
    await limiter.disable_resource("llm", principal="oncall")
    for mode in FailureMode:
        with pytest.raises(ResourceDisabled) as caught:
            await take(limiter, failure_mode=mode)
        assert (caught.value.resource, caught.value.disabled) == ("llm", "resource")
        assert not isinstance(caught.value, RateLimitExceeded | RateLimiterUnavailable)
    assert await limiter.available("key", "llm", [RPM]) == {"rpm": 4}  # only the first take
    assert await limiter.get_resource_state("llm") == "disabled"
    # Other resources are untouched; the name must match exactly.
    assert (await take(limiter, resource="llm/other")).consumed == {"rpm": 1}


async def test_fail_open_does_not_admit_a_disabled_resource_during_an_outage() -> None:
    store = FlakyStorage()
    async with RateLimiter(repository=store, limits_cache_ttl=0.05,
                           failure_mode=FailureMode.FAIL_OPEN) as lim:
        await lim.disable_resource("llm")
        await asyncio.sleep(0.1)  # the switches' TTL passes: the next acquire must read them
        store.down = True
        with pytest.raises(ResourceDisabled):
            await take(lim)
        # An outage admits what is not disabled (FAIL_OPEN), with the switches last read.
        lease = await take(lim, resource="other")
        assert lease.fail_open and not lease.bypassed


async def test_disabled_entity_and_with_cascade_its_parent(limiter: RateLimiter) -> None:
    await limiter.create_entity("proj")
    await limiter.create_entity("key", parent_id="proj")
    await limiter.disable_entity("proj", principal="oncall")
    with pytest.raises(ResourceDisabled) as caught:
        await take(limiter, cascade=True)
    assert (caught.value.disabled, caught.value.disabled_name) == ("entity", "proj")
    assert caught.value.entity_id == "key"
    # Without cascade the parent is not part of the acquire.
    assert (await take(limiter)).consumed == {"rpm": 1}
    await limiter.disable_entity("ghost")  # an entity that does not exist can be disabled
    with pytest.raises(ResourceDisabled):
        await take(limiter, entity_id="ghost")
    assert await limiter.get_entity_state("ghost") == "disabled"


# -- bypass ---------------------------------------------------------------------------------------


async def test_bypass_admits_without_consuming_or_any_call(limiter: RateLimiter) -> None:
    await take(limiter)
    await limiter.bypass_resource("llm")
    limiter.ledger.reset()
    for _ in range(20):  # four times the capacity
        lease = await take(limiter)
        assert lease.bypassed and not lease.fail_open
        assert lease.consumed == {} and lease.statuses() == []
        await lease.adjust(rpm=3)  # a no-op lease: nothing changes
    assert limiter.ledger.total_calls == 0
    assert await limiter.available("key", "llm", [RPM]) == {"rpm": 4}


async def test_bypassed_parent_bypasses_cascade_but_a_disabled_one_wins(
    limiter: RateLimiter,
) -> None:
    await limiter.create_entity("proj")
    await limiter.create_entity("key", parent_id="proj")
    await limiter.bypass_entity("proj")
    assert (await take(limiter, cascade=True)).bypassed
    assert not (await take(limiter)).bypassed
    await limiter.disable_entity("key")
    with pytest.raises(ResourceDisabled):
        await take(limiter, cascade=True)
    await limiter.enable_entity("key")
    await limiter.bypass_resource("llm")
    await limiter.disable_entity("proj")
    with pytest.raises(ResourceDisabled):  # disabled wins over a bypassed resource
        await take(limiter, cascade=True)


async def test_bypass_with_reservations_serves_no_block() -> None:
    async with RateLimiter(repository=MemoryStorage(), clock=lambda: T0,
                           reservations=Reservations()) as lim:
        await take(lim)
        await lim.bypass_resource("llm")
        lim.ledger.reset()
        assert (await take(lim)).bypassed
        assert lim.ledger.total_calls == 0


# -- enable, audit, state -------------------------------------------------------------------------


async def test_enable_restores_limiting_and_every_change_is_audited(limiter: RateLimiter) -> None:
    await limiter.disable_resource("llm", principal="alice")
    await limiter.bypass_resource("llm", principal="bob")
    await limiter.enable_resource("llm", principal="carol")
    for _ in range(5):
        await take(limiter)
    with pytest.raises(RateLimitExceeded):
        await take(limiter)
    assert await limiter.get_resource_state("llm") == "enabled"
    events = await limiter.get_audit_events("$RESOURCE:llm", oldest_first=True)
    assert [(e.action, e.principal, e.resource, e.details) for e in events] == [
        (AuditAction.RESOURCE_DISABLED, "alice", "llm", {"state": "disabled",
                                                          "previous": "enabled"}),
        (AuditAction.RESOURCE_BYPASSED, "bob", "llm", {"state": "bypass",
                                                        "previous": "disabled"}),
        (AuditAction.RESOURCE_ENABLED, "carol", "llm", {"state": "enabled",
                                                         "previous": "bypass"}),
    ]
    await limiter.bypass_entity("key", principal="dave")
    await limiter.enable_entity("key")
    trail = await limiter.get_audit_events("key", oldest_first=True)
    assert [e.action for e in trail] == [AuditAction.ENTITY_BYPASSED, AuditAction.ENTITY_ENABLED]
    assert await limiter.get_switches() == []


async def test_names_are_validated_and_name_the_field(limiter: RateLimiter) -> None:
    with pytest.raises(ValidationError) as caught:
        await limiter.disable_resource("bad#name")
    assert caught.value.field == "resource"
    with pytest.raises(ValidationError) as caught:
        await limiter.bypass_entity("")
    assert caught.value.field == "entity_id"
    with pytest.raises(ValidationError) as caught:
        await limiter.enable_resource("llm", principal="has space")
    assert caught.value.field == "principal"


async def test_a_storage_without_switches_is_refused_by_name() -> None:
    class Plain(MemoryStorage):
        get_switches = None  # type: ignore[assignment]

    async with RateLimiter(repository=Plain()) as lim:
        with pytest.raises(ValidationError) as caught:
            await lim.disable_resource("llm")
        assert caught.value.field == "repository"
        assert (await take(lim)).consumed == {"rpm": 1}  # acquires go on, unswitched


def test_sync_limiter_twins() -> None:
    with SyncRateLimiter(repository=MemoryStorage()) as lim:
        lim.disable_entity("key")
        assert lim.get_entity_state("key") == "disabled"
        with pytest.raises(ResourceDisabled), lim.acquire("key", "llm", [RPM], {"rpm": 1}):
            pass
        lim.bypass_entity("key")
        with lim.acquire("key", "llm", [RPM], {"rpm": 1}) as lease:
            assert lease.bypassed
        assert [s.state for s in lim.get_switches()] == ["bypass"]


# -- the TTL --------------------------------------------------------------------------------------


async def test_another_limiter_sees_a_change_within_its_ttl() -> None:
    store = MemoryStorage()
    async with RateLimiter(repository=store) as admin, \
            RateLimiter(repository=store, limits_cache_ttl=0.3) as other:
        await take(other)
        await admin.disable_resource("llm")
        # Within the TTL the other limiter still decides by what it read (no read per acquire).
        assert (await take(other)).consumed == {"rpm": 1}
        await asyncio.sleep(0.35)
        with pytest.raises(ResourceDisabled) as caught:
            await take(other)
        assert caught.value.recheck_seconds == pytest.approx(0.3)


class FlakyStorage(MemoryStorage):
    """A memory table that can be made unreachable."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise RepositoryUnavailable("down")

    async def get_switches(self) -> list[Switch]:
        self._check()
        return await super().get_switches()

    async def get_bucket(self, entity_id: str, resource: str) -> Any:
        self._check()
        return await super().get_bucket(entity_id, resource)

    async def write_bucket(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await super().write_bucket(*args, **kwargs)


# -- cost, on moto --------------------------------------------------------------------------------


@pytest.mark.integration
async def test_clear_switches_cost_one_query_per_ttl_and_none_per_acquire(
    endpoint_url: str,
) -> None:
    async with RateLimiter(name="kill", endpoint_url=endpoint_url, stack_options=StackOptions(),
                           clock=lambda: T0, limits_cache_ttl=0.5) as lim:
        lim.ledger.reset()
        await take(lim)  # cold: the switches were read when the limiter got ready
        assert lim.ledger.calls == {"GetItem": 1, "UpdateItem": 1}
        lim.ledger.reset()
        await take(lim)
        assert lim.ledger.calls == {"UpdateItem": 1}
        await asyncio.sleep(0.55)
        lim.ledger.reset()
        await take(lim)  # the TTL passed: one Query of the switch partition
        assert lim.ledger.calls == {"Query": 1, "UpdateItem": 1}
        # Bypass: no call at all past the cached switch, also after the TTL (one read).
        await lim.bypass_resource("llm")
        lim.ledger.reset()
        await take(lim)
        assert lim.ledger.total_calls == 0
        await asyncio.sleep(0.55)
        await take(lim)
        assert lim.ledger.calls == {"Query": 1}


# -- another process ------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import asyncio, json, sys, time
    from zae_limiter import Limit, RateLimiter, ResourceDisabled
    RPM = Limit.per_minute("rpm", 1000)

    async def state(lim):
        try:
            async with lim.acquire("key", "llm", [RPM], {"rpm": 1}) as lease:
                return "bypass" if lease.bypassed else "enabled"
        except ResourceDisabled:
            return "disabled"

    async def main():
        async with RateLimiter(name="kill2", endpoint_url=sys.argv[1],
                               limits_cache_ttl=float(sys.argv[2])) as lim:
            print(await state(lim), flush=True)
            for line in sys.stdin:
                wanted, started = line.split(), time.monotonic()
                while await state(lim) != wanted[0] and time.monotonic() - started < 10:
                    await asyncio.sleep(0.02)
                print(json.dumps(time.monotonic() - started), flush=True)

    asyncio.run(main())
""")


@pytest.mark.integration
async def test_a_second_process_sees_disable_bypass_and_enable_within_the_ttl(
    endpoint_url: str,
) -> None:
    ttl = 0.5
    async with RateLimiter(name="kill2", endpoint_url=endpoint_url,
                           stack_options=StackOptions()) as admin:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, endpoint_url, str(ttl)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "enabled"
            seen: dict[str, float] = {}
            for change, state in ((admin.disable_resource, "disabled"),
                                  (admin.bypass_resource, "bypass"),
                                  (admin.enable_resource, "enabled")):
                await change("llm")
                child.stdin.write(f"{state}\n")
                child.stdin.flush()
                seen[state] = json.loads(await asyncio.to_thread(child.stdout.readline))
        finally:
            child.stdin.close()
            child.wait(timeout=30)
        assert child.returncode == 0
    # Within the TTL (plus the polling and a loaded machine's slack), never right away for all.
    assert all(elapsed < ttl + 0.5 for elapsed in seen.values()), seen
    assert set(seen) == {"disabled", "bypass", "enabled"}


# -- the CLI, on moto -----------------------------------------------------------------------------


def cli(endpoint_url: str, *args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(
        main, [*args, "--name", "killcli", "--endpoint-url", endpoint_url, "--json"])
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if code == 0 else result.output


@pytest.mark.integration
def test_cli_commands(endpoint_url: str) -> None:
    async def setup() -> None:
        async with RateLimiter(name="killcli", endpoint_url=endpoint_url,
                               stack_options=StackOptions()):
            pass
    asyncio.run(setup())
    assert cli(endpoint_url, "resource", "disable", "llm", "--principal", "oncall") == {
        "resource": "llm", "state": "disabled", "principal": "oncall"}
    assert cli(endpoint_url, "resource", "state", "llm") == {"resource": "llm",
                                                             "state": "disabled"}
    assert cli(endpoint_url, "entity", "bypass", "key") == {"entity_id": "key",
                                                            "state": "bypass"}
    listed = cli(endpoint_url, "switches")
    assert [(s["kind"], s["name"], s["state"], s["principal"]) for s in listed] == [
        ("entity", "key", "bypass", None), ("resource", "llm", "disabled", "oncall")]

    async def acquire() -> str:
        async with RateLimiter(name="killcli", endpoint_url=endpoint_url) as lim:
            try:
                async with lim.acquire("key", "llm", [RPM], {"rpm": 1}):
                    return "admitted"
            except ResourceDisabled:
                return "disabled"
    assert asyncio.run(acquire()) == "disabled"
    assert cli(endpoint_url, "resource", "enable", "llm")["state"] == "enabled"
    assert cli(endpoint_url, "entity", "enable", "key")["state"] == "enabled"
    assert cli(endpoint_url, "entity", "state", "key")["state"] == "enabled"
    assert cli(endpoint_url, "switches") == []
    assert asyncio.run(acquire()) == "admitted"
    events = cli(endpoint_url, "audit", "$RESOURCE:llm")["events"]
    assert [e["action"] for e in events] == ["resource_enabled", "resource_disabled"]
    assert "resource" in cli(endpoint_url, "resource", "disable", "bad#name", code=1)


# -- several resources in one acquire (`also=`) ---------------------------------------------------


async def test_several_resources_a_disabled_one_refuses_all_a_bypass_needs_all(
    limiter: RateLimiter,
) -> None:
    def both() -> Any:
        return limiter.acquire("key", "llm", [RPM], {"rpm": 1}, also={"embed": {"rpm": 1}})

    await limiter.disable_resource("embed")
    with pytest.raises(ResourceDisabled) as caught:
        async with both():
            pass
    assert caught.value.disabled_name == "embed"
    assert await limiter.available("key", "llm", [RPM]) == {"rpm": 5}  # nothing taken
    await limiter.bypass_resource("embed")
    async with both() as lease:  # one bypassed, one not: both limited
        assert not lease.bypassed and lease.also_consumed == {"embed": {"rpm": 1}}
    await limiter.bypass_resource("llm")
    limiter.ledger.reset()
    async with both() as lease:
        assert lease.bypassed and lease.also_consumed == {"embed": {}}
        await lease.adjust(also={"embed": {"rpm": 2}})  # a no-op lease
    assert limiter.ledger.total_calls == 0
    await limiter.enable_resource("llm")
    await limiter.enable_resource("embed")
    await limiter.bypass_entity("key")
    async with both() as lease:  # the entity's bypass covers every resource
        assert lease.bypassed
