"""Creating and deleting what a limiter's table needs: Pulumi on AWS, the table alone locally.

On AWS the stack (table, aggregator, alarms) is Pulumi's to create, through the Automation API
(`zae_limiter.infra.automation`); against a local endpoint there is no stack, only the table.
"""

from __future__ import annotations

import asyncio

from .exceptions import StackCreationError
from .models import StackOptions
from .repository import Repository
from .schema import default_region
from .version import CLIENT_VERSION, record_deployment, write_initial_record


async def provision(
    repository: Repository,
    options: StackOptions,
    *,
    name: str,
    region: str | None,
    endpoint_url: str | None,
) -> None:
    """Make sure the table exists (and on AWS the whole stack), with a version record."""
    if endpoint_url is None:
        # An existing table means it was deployed: a Pulumi run per limiter start would take
        # minutes, and keeping the aggregator current is the version check's auto-update.
        if await repository.table_exists():
            return
        from .infra import automation

        try:
            await asyncio.to_thread(automation.deploy, name, default_region(region), options)
        except automation.PulumiNotInstalledError as exc:
            raise StackCreationError(repository.table_name, str(exc)) from exc
        await record_deployment(repository, updated_by="zae-limiter provisioning")
        return
    await repository.create_table(
        options.billing_mode, options.read_capacity, options.write_capacity, tags=options.tags
    )
    await write_initial_record(
        repository, updated_by="zae-limiter local provisioning", lambda_version=CLIENT_VERSION
    )


async def delete_stack(
    repository: Repository, *, name: str, region: str | None, endpoint_url: str | None
) -> None:
    """Delete the table, and on AWS the Pulumi stack that holds it."""
    if endpoint_url is None:
        from .infra import automation

        await asyncio.to_thread(automation.destroy, name, default_region(region))
    else:
        await repository.delete_table()
