"""Kill switches: `resource disable | bypass | enable | state NAME`, `entity disable | bypass |
enable | state ENTITY_ID`, and `switches` (every switch that is set).

Each change is recorded in the audit trail (`audit ENTITY_ID`; a resource's in `audit
'$RESOURCE:<resource>'`) and seen by every limiter within its `config_cache_ttl`
(docs/limits.md, "Kill switch").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import click

from . import main
from .entities import PRINCIPAL_HELP, entity
from .toolkit import Output, Target, fields_table, rows_table, target_options

if TYPE_CHECKING:
    from ..limiter import RateLimiter

# command -> (what it sets, what the limiter calls it)
CHANGES = {
    "disable": ("disabled", "disable"),
    "bypass": ("bypass", "bypass"),
    "enable": ("enabled", "enable"),
}
HELP = {
    "disable": "Refuse every acquire of {what} (ResourceDisabled; HTTP 503), consuming nothing.",
    "bypass": "Admit every acquire of {what} without consuming anything (no limit applies).",
    "enable": "Clear the switch of {what}: its acquires are limited again.",
}


@main.group()
def resource() -> None:
    """Kill switches of resources: disable, bypass, enable, state."""


def _change(
    kind: str, target: Target, out: Output, name: str, command: str, principal: str | None
) -> None:
    state, verb = CHANGES[command]

    async def work(lim: RateLimiter) -> None:
        call: Callable[..., Awaitable[None]] = getattr(lim, f"{verb}_{kind}")
        await call(name, principal=principal)

    target.run_limiter(work)
    data: dict[str, Any] = {kind if kind == "resource" else "entity_id": name, "state": state}
    if principal is not None:
        data["principal"] = principal
    out.show(data, f"{kind} {name}: {state} (every limiter sees it within its cache TTL)")


def _state(kind: str, target: Target, out: Output, name: str) -> None:
    async def work(lim: RateLimiter) -> str:
        if kind == "resource":
            return await lim.get_resource_state(name)
        return await lim.get_entity_state(name)

    state = target.run_limiter(work)
    data = {kind if kind == "resource" else "entity_id": name, "state": state}
    out.show(data, fields_table(f"{kind} {name}", data))


def _register(group: click.Group, kind: str, argument: str, metavar: str, what: str) -> None:
    for command in CHANGES:

        def change(
            target: Target,
            out: Output,
            principal: str | None,
            _command: str = command,
            **names: str,
        ) -> None:
            _change(kind, target, out, names[argument], _command, principal)

        change.__doc__ = HELP[command].format(what=what) + " Recorded in the audit trail."
        decorated = click.option("--principal", default=None, help=PRINCIPAL_HELP)(change)
        decorated = click.argument(argument, metavar=metavar)(decorated)
        group.command(command)(target_options()(decorated))

    def state(target: Target, out: Output, **names: str) -> None:
        _state(kind, target, out, names[argument])

    state.__doc__ = f"Whether {what} is enabled, disabled or bypassed (as stored now)."
    group.command("state")(target_options()(click.argument(argument, metavar=metavar)(state)))


# The resource's argument is not called `name`: `--name` is the deployment's.
_register(resource, "resource", "resource", "NAME", "the resource NAME")
_register(
    entity, "entity", "entity_id", "ENTITY_ID", "the entity ENTITY_ID (with cascade, its children)"
)


@main.command("switches")
@target_options()
def switches(target: Target, out: Output) -> None:
    """Every kill switch that is set (resources and entities), with who set it and when."""
    found = target.run_limiter(lambda lim: lim.get_switches())
    rows = [
        {
            "kind": s.kind,
            "name": s.name,
            "state": s.state,
            "principal": s.principal,
            "changed_at": s.changed_at,
        }
        for s in found
    ]
    columns = ["kind", "name", "state", "principal", "changed_at"]
    out.show(rows, rows_table("kill switches", columns, rows))

