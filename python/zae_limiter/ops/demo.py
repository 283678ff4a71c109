"""The LLM-gateway demo workload: a project, its API keys, and concurrent clients sharing limits.

Used by `zae-limiter demo`; returns plain figures so the CLI can render them and tests can check
them. It prints nothing itself.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from ..exceptions import RateLimitExceeded
from ..limiter import RateLimiter
from ..models import Limit

PROJECT = "acme-project"
RESOURCE = "gpt-4o"
# The first key's prompts are this many times longer (a batch job): it meets its own tpm first.
HEAVY_PROMPT_FACTOR = 4


@dataclass
class KeyReport:
    entity_id: str
    admitted: int = 0
    rejected: int = 0
    rejected_by_key: int = 0  # its own limit was exceeded (the project's may have been too)
    rejected_by_project: int = 0  # only the project's limit was exceeded (cascade)
    tokens_estimated: int = 0
    tokens_actual: int = 0
    max_retry_after: float = 0.0
    remaining: dict[str, int] = field(default_factory=dict)


@dataclass
class DemoReport:
    keys: list[KeyReport]
    project_remaining: dict[str, int]
    project_limits: list[Limit]
    key_limits: list[Limit]
    calls: dict[str, int]
    write_units: float
    read_units: float
    acquires: int


async def run_workload(
    limiter: RateLimiter,
    *,
    keys: int = 3,
    clients_per_key: int = 2,
    requests_per_client: int = 12,
    seed: int = 7,
) -> DemoReport:
    """Each client sends chat requests: estimate tokens, acquire rpm+tpm with cascade to the
    project, then reconcile the estimate with the 'actual' count through `adjust`.

    The first key runs a batch job with long prompts: it exhausts its own tpm early and is
    rejected by its own limit, while the other keys together run into the project's limits
    (rejections by cascade).
    """
    rng = random.Random(seed)
    key_limits = [Limit.per_minute("rpm", 20), Limit.per_minute("tpm", 6_000)]
    project_limits = [Limit.per_minute("rpm", 50), Limit.per_minute("tpm", 12_000)]
    if await limiter.get_entity(PROJECT) is None:
        await limiter.create_entity(PROJECT, name="ACME project")
    await limiter.set_limits(PROJECT, project_limits, resource=RESOURCE)
    reports: list[KeyReport] = []
    for i in range(keys):
        key_id = f"api-key-{i + 1}"
        if await limiter.get_entity(key_id) is None:
            await limiter.create_entity(key_id, name=f"API key {i + 1}", parent_id=PROJECT)
        await limiter.set_limits(key_id, key_limits, resource=RESOURCE)
        reports.append(KeyReport(key_id))

    async def client(report: KeyReport, client_rng: random.Random, heavy: bool) -> None:
        for _ in range(requests_per_client):
            estimate = client_rng.randint(100, 600) * (HEAVY_PROMPT_FACTOR if heavy else 1)
            try:
                async with limiter.acquire(
                    report.entity_id,
                    RESOURCE,
                    None,
                    {"rpm": 1, "tpm": estimate},
                    cascade=True,
                    use_stored_limits=True,
                ) as lease:
                    actual = max(1, int(estimate * client_rng.uniform(0.6, 1.4)))
                    await lease.adjust(tpm=actual - estimate)
                    report.admitted += 1
                    report.tokens_estimated += estimate
                    report.tokens_actual += actual
            except RateLimitExceeded as exc:
                report.rejected += 1
                if any(v.entity_id == report.entity_id for v in exc.violations):
                    report.rejected_by_key += 1
                else:
                    report.rejected_by_project += 1
                report.max_retry_after = max(report.max_retry_after, exc.retry_after_seconds or 0.0)
            await asyncio.sleep(0)

    limiter.ledger.reset()
    await asyncio.gather(
        *(
            client(report, random.Random(rng.random()), heavy=index == 0)
            for index, report in enumerate(reports)
            for _ in range(clients_per_key)
        )
    )
    ledger = limiter.ledger.snapshot()
    for report in reports:
        report.remaining = await limiter.available(report.entity_id, RESOURCE, key_limits)
    project_remaining = await limiter.available(PROJECT, RESOURCE, project_limits)
    return DemoReport(
        keys=reports,
        project_remaining=project_remaining,
        project_limits=project_limits,
        key_limits=key_limits,
        calls=dict(ledger["calls"]),
        write_units=float(ledger["write_units"]),
        read_units=float(ledger["read_units"]),
        acquires=keys * clients_per_key * requests_per_client,
    )
