"""The project, its API keys and their stored limits, written to the table at startup.

Two tiers of keys share the project: standard keys (`sk-demo-N`, entity `key-N`) with the key
limits as given, and trial keys (`sk-trial-N`, entity `trial-N`) with the same limits except a
soft `tpm`: their token rate is measured (debited, reported, counted) but never refused; `rpm`,
the quotas and the caps still apply to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final

from zae_limiter import Limit, RateLimiter, ValidationError
from zae_limiter.models import BUCKET

from .gateway import REQUESTS, RESOURCE, TOKENS

PROJECT: Final = "demo-project"
REQUIRED: Final = frozenset({REQUESTS, TOKENS})


def api_key(n: int) -> str:
    return f"sk-demo-{n}"


def key_entity(n: int) -> str:
    return f"key-{n}"


def trial_api_key(n: int) -> str:
    return f"sk-trial-{n}"


def trial_entity(n: int) -> str:
    return f"trial-{n}"


def trial_limits(key_limits: Sequence[Limit]) -> list[Limit]:
    """The key limits with a soft `tpm`."""
    return [
        dataclasses.replace(lim, soft=True) if lim.name == TOKENS else lim for lim in key_limits
    ]


def check_limits(key_limits: Sequence[Limit], project_limits: Sequence[Limit]) -> None:
    """What `gateway.Meter` can price. The keys: an `rpm` and a `tpm` token bucket, and any
    number of quotas (of tokens) and concurrency caps (of streams). The project: some of the
    keys' limits, each of the same kind (with cascade the project is charged the key's amounts,
    and an amount is only given for a key's limit)."""
    names = [lim.name for lim in key_limits]
    if len(set(names)) != len(names):
        raise ValidationError("key_limits", sorted(names), "must have distinct names")
    kinds = {lim.name: lim.kind for lim in key_limits}
    if any(kinds.get(name) != BUCKET for name in REQUIRED):
        raise ValidationError("key_limits", sorted(names), "must include an rpm and a tpm bucket")
    extra = [lim.name for lim in key_limits if lim.name not in REQUIRED and lim.kind == BUCKET]
    if extra:
        raise ValidationError(
            "key_limits", extra, "besides rpm and tpm, must be quotas or concurrency caps"
        )
    names = [lim.name for lim in project_limits]
    if not names or len(set(names)) != len(names):
        raise ValidationError("project_limits", sorted(names), "must be distinct, at least one")
    foreign = [lim.name for lim in project_limits if kinds.get(lim.name) != lim.kind]
    if foreign:
        raise ValidationError(
            "project_limits", foreign, "must be limits the keys have, of the same kind"
        )


async def provision(
    limiter: RateLimiter,
    keys: int,
    key_limits: Sequence[Limit],
    project_limits: Sequence[Limit],
    trial_keys: int = 0,
) -> dict[str, str]:
    """Create the project, `keys` standard and `trial_keys` trial API-key entities under it (if
    missing), store their limits; the bearer token of each key, mapped to its entity id."""
    check_limits(key_limits, project_limits)
    if keys < 1:
        raise ValidationError("keys", keys, "must be at least 1")
    if trial_keys < 0:
        raise ValidationError("trial_keys", trial_keys, "must not be negative")
    if await limiter.get_entity(PROJECT) is None:
        await limiter.create_entity(PROJECT, name="Demo project")
    await limiter.set_limits(PROJECT, project_limits, resource=RESOURCE)
    api_keys: dict[str, str] = {}
    tiers = [
        (keys, api_key, key_entity, "API key", list(key_limits)),
        (trial_keys, trial_api_key, trial_entity, "Trial key", trial_limits(key_limits)),
    ]
    for count, token_of, entity_of, label, limits in tiers:
        for n in range(1, count + 1):
            entity_id = entity_of(n)
            if await limiter.get_entity(entity_id) is None:
                await limiter.create_entity(entity_id, name=f"{label} {n}", parent_id=PROJECT)
            await limiter.set_limits(entity_id, limits, resource=RESOURCE)
            api_keys[token_of(n)] = entity_id
    return api_keys
