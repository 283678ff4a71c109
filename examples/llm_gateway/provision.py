"""The project, its API keys and their stored limits, written to the table at startup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from zae_limiter import Limit, RateLimiter, ValidationError

from .gateway import RESOURCE

PROJECT: Final = "demo-project"
# What `cost` takes: every key needs both limits; the project may cap either.
KEY_LIMIT_NAMES: Final = frozenset({"rpm", "tpm"})


def api_key(n: int) -> str:
    return f"sk-demo-{n}"


def key_entity(n: int) -> str:
    return f"key-{n}"


def check_limits(key_limits: Sequence[Limit], project_limits: Sequence[Limit]) -> None:
    names = sorted(lim.name for lim in key_limits)
    if names != sorted(KEY_LIMIT_NAMES):
        raise ValidationError("key_limits", names, "must be one rpm and one tpm limit")
    names = sorted(lim.name for lim in project_limits)
    if not names or len(set(names)) != len(names) or not set(names) <= KEY_LIMIT_NAMES:
        raise ValidationError("project_limits", names, "must be an rpm and/or a tpm limit")


async def provision(
    limiter: RateLimiter,
    keys: int,
    key_limits: Sequence[Limit],
    project_limits: Sequence[Limit],
) -> dict[str, str]:
    """Create the project and `keys` API-key entities under it (if missing), store their
    limits; the bearer token of each key, mapped to its entity id."""
    check_limits(key_limits, project_limits)
    if keys < 1:
        raise ValidationError("keys", keys, "must be at least 1")
    if await limiter.get_entity(PROJECT) is None:
        await limiter.create_entity(PROJECT, name="Demo project")
    await limiter.set_limits(PROJECT, project_limits, resource=RESOURCE)
    api_keys: dict[str, str] = {}
    for n in range(1, keys + 1):
        entity_id = key_entity(n)
        if await limiter.get_entity(entity_id) is None:
            await limiter.create_entity(entity_id, name=f"API key {n}", parent_id=PROJECT)
        await limiter.set_limits(entity_id, key_limits, resource=RESOURCE)
        api_keys[api_key(n)] = entity_id
    return api_keys
