"""Creating and deleting what a limiter's table needs: Pulumi on AWS, the table alone locally.

On AWS the stack (table, aggregator, alarms) is Pulumi's to create, through the Automation API
(`zae_limiter.infra.automation`); against a local endpoint there is no stack, only the table.
Both `RateLimiter` (its `stack_options`, `create_stack`, `delete_stack`) and `StackManager`
(zae-limiter 0.2.0's deployment API) come here.

Stack statuses are CloudFormation's names, as zae-limiter 0.2.0 reported them: "CREATE_COMPLETE",
"UPDATE_COMPLETE", "CREATE_FAILED", ... (`automation.status_from_history`); a local table that
exists is "CREATE_COMPLETE".

The AWS paths need the Pulumi CLI and an AWS account; neither is available to this project's
tests, which check them against Pulumi's mocks and a stand-in for the Pulumi stack only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final, TypeAlias

from .. import schema
from ..exceptions import (
    InfrastructureError,
    InfrastructureNotFoundError,
    StackAlreadyExistsError,
    StackCreationError,
    ValidationError,
)
from ..models import StackOptions
from ..schema import default_region
from ..storage.protocol import AdminStorage
from ..version import CLIENT_VERSION, record_deployment, write_initial_record

# What create_stack returns (0.2.0's dict: "stack_id", "stack_name", "status", ...).
StackResult: TypeAlias = dict[str, Any]

# How create_stack waits for another process's deployment of the same stack to finish.
SETTLE_POLL_SECONDS: Final = 5.0
SETTLE_TIMEOUT_SECONDS: Final = 3600.0
# A stack in one of these states is deployed (again) by create_stack rather than reported as
# existing: its first deployment failed (Pulumi continues from what it created), or it was
# destroyed and kept in the backend.
_REDEPLOYABLE: Final = frozenset({"CREATE_FAILED", "DELETE_COMPLETE"})
LOCAL_STATUS: Final = "CREATE_COMPLETE"


async def provision(
    repository: AdminStorage,
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
        await _deploy(repository, options, name=name, region=region,
                      updated_by="zae-limiter provisioning")
        return
    await _create_local_table(repository, options)


async def _create_local_table(repository: AdminStorage, options: StackOptions) -> bool:
    created = await repository.create_table(
        options.billing_mode, options.read_capacity, options.write_capacity, tags=options.tags
    )
    await write_initial_record(
        repository, updated_by="zae-limiter local provisioning", lambda_version=CLIENT_VERSION
    )
    return created


async def _deploy(
    repository: AdminStorage, options: object, *, name: str, region: str | None, updated_by: str
) -> dict[str, Any]:
    """`pulumi up` of the deployment, then its version record; returns the stack's outputs."""
    from ..infra import automation

    try:
        outputs = await asyncio.to_thread(
            automation.deploy, name, default_region(region), options
        )
    except automation.PulumiNotInstalledError as exc:
        raise StackCreationError(repository.table_name, str(exc)) from exc
    await record_deployment(repository, updated_by=updated_by)
    return outputs


async def stack_status(
    repository: AdminStorage, *, name: str, endpoint_url: str | None
) -> str | None:
    """The stack's status (module docstring), None when there is none.

    On AWS this reads the Pulumi stack, so it raises `PulumiNotInstalledError` without Pulumi.
    """
    if endpoint_url is not None:
        return LOCAL_STATUS if await repository.table_exists() else None
    from ..infra import automation

    return await asyncio.to_thread(automation.stack_status, name)


async def _settle(repository: AdminStorage, *, name: str, endpoint_url: str | None) -> str | None:
    """Wait (bounded) while another process deploys or destroys the stack; its final status.

    Best effort: Pulumi's file backend may record an update only once it has finished, and then
    there is nothing to wait for.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    status = await stack_status(repository, name=name, endpoint_url=endpoint_url)
    while status is not None and status.endswith("_IN_PROGRESS"):
        if time.monotonic() >= deadline:
            raise StackCreationError(
                repository.table_name, f"still {status} after {SETTLE_TIMEOUT_SECONDS:.0f} s"
            )
        await asyncio.sleep(SETTLE_POLL_SECONDS)
        status = await stack_status(repository, name=name, endpoint_url=endpoint_url)
    return status


async def create_stack(
    repository: AdminStorage,
    options: StackOptions | None,
    *,
    name: str,
    region: str | None,
    endpoint_url: str | None,
    wait: bool = True,
) -> StackResult:
    """Create the infrastructure unless it exists (zae-limiter 0.2.0's `create_stack`).

    Returns `{"stack_id", "stack_name", "status"}`: status "CREATE_COMPLETE" when it was
    created (on AWS also "outputs", the stack's outputs); an existing stack is left as it is
    (it is not updated: `zae-limiter deploy` or `automation.deploy` update one) and reported
    with its status and a "message", or, when another process was still deploying it and
    `wait`, with status "already_exists_and_ready" once that finished.

    `wait=False` is accepted for 0.2.0's sake, but Pulumi deploys from this process, so the
    call returns when the deployment has finished either way. A local endpoint gets the table
    and its version record (billing mode, capacities and tags apply; there is no Lambda, alarm
    or point-in-time recovery to deploy).

    Raises StackAlreadyExistsError when the stack did not exist when checked but another
    process created it meanwhile, StackCreationError when the deployment fails (or Pulumi is
    not installed).
    """
    options = options if options is not None else StackOptions()
    stack = schema.stack_name(name)
    if endpoint_url is not None:
        return await _create_local(repository, options, stack)

    from ..infra import automation

    try:
        status = await stack_status(repository, name=name, endpoint_url=None)
    except InfrastructureError as exc:  # no Pulumi, or its state unreadable
        raise StackCreationError(stack, str(exc)) from exc
    ident = automation.stack_id(name)
    if status is not None and status not in _REDEPLOYABLE:
        if wait and status.endswith("_IN_PROGRESS"):
            final = await _settle(repository, name=name, endpoint_url=None)
            if final is None or final.endswith("_FAILED") or final == "DELETE_COMPLETE":
                raise StackCreationError(stack, f"Waiting for existing stack failed: {final}")
            return {"stack_id": ident, "stack_name": stack, "status": "already_exists_and_ready"}
        return {
            "stack_id": ident,
            "stack_name": stack,
            "status": status,
            "message": f"Stack already exists with status: {status}",
        }
    try:
        outputs = await _deploy(repository, options, name=name, region=region,
                                updated_by="zae-limiter create_stack")
    except automation.ConcurrentDeploymentError as exc:
        # Another process is creating the very stack: 0.2.0's AlreadyExistsException race.
        if wait:
            with contextlib.suppress(StackCreationError):  # best effort, as in 0.2.0
                await _settle(repository, name=name, endpoint_url=None)
        raise StackAlreadyExistsError(stack, "Stack already exists") from exc
    return {"stack_id": ident, "stack_name": stack, "status": "CREATE_COMPLETE",
            "outputs": outputs}


async def _create_local(repository: AdminStorage, options: StackOptions, stack: str) -> StackResult:
    if await repository.table_exists():
        return {
            "stack_id": stack,
            "stack_name": stack,
            "status": LOCAL_STATUS,
            "message": f"Stack already exists with status: {LOCAL_STATUS}",
        }
    if not options.create_table:
        raise StackCreationError(
            stack, "create_table=False and the table does not exist: a local endpoint has "
            "nothing else to deploy"
        )
    if not await _create_local_table(repository, options):
        raise StackAlreadyExistsError(stack, "Stack already exists")
    return {"stack_id": stack, "stack_name": stack, "status": LOCAL_STATUS}


async def delete_stack(
    repository: AdminStorage, *, name: str, region: str | None, endpoint_url: str | None
) -> None:
    """Delete the table, and on AWS the Pulumi stack that holds it; nothing to delete is fine.

    On AWS a table with deletion protection is kept (`automation.destroy`). Raises
    StackCreationError when the deletion fails or Pulumi is not installed (as 0.2.0 did).
    """
    if endpoint_url is not None:
        await repository.delete_table()
        return
    from ..infra import automation

    try:
        await asyncio.to_thread(automation.destroy, name, default_region(region))
    except InfrastructureNotFoundError:
        return  # never deployed (or already deleted): 0.2.0 ignored a missing stack too
    except automation.PulumiNotInstalledError as exc:
        raise StackCreationError(repository.table_name, str(exc)) from exc


async def deploy_aggregator(
    repository: AdminStorage,
    *,
    name: str,
    region: str | None,
    endpoint_url: str | None,
    function_name: str | None = None,
) -> dict[str, Any]:
    """Bring the deployed aggregator Lambda to this package's code (0.2.0's
    `StackManager.deploy_lambda_code`): on AWS the Pulumi stack is deployed again with the
    options it has (the bundle is built from the installed package), and the version record
    updated. Returns `{"function_arn", "code_sha256", "status": "deployed", "size_bytes",
    "version"}`; on a local endpoint, where there is no Lambda, status "skipped_local" (as
    0.2.0's CLI knew it) and nothing is changed.
    """
    expected = schema.aggregator_function_name(name)
    if function_name is not None and function_name != expected:
        raise ValidationError(
            "function_name", function_name,
            f"the stack's aggregator is {expected}; Pulumi deploys only its own function",
        )
    if endpoint_url is not None:
        return {"function_arn": None, "code_sha256": None, "status": "skipped_local",
                "size_bytes": 0, "version": CLIENT_VERSION}
    from ..infra import InfraOptions, automation
    from ..infra.package import cached_lambda_zip

    stack = schema.stack_name(name)
    try:
        info = await asyncio.to_thread(automation.status, name, default_region(region))
    except (InfrastructureNotFoundError, automation.PulumiNotInstalledError) as exc:
        raise StackCreationError(stack, f"Lambda deployment failed: {exc}") from exc
    options = InfraOptions.from_config_values(info.get("options") or {})
    if not options.aggregator:
        raise StackCreationError(stack, "Lambda deployment failed: the stack has no aggregator")
    outputs = await _deploy(repository, options, name=name, region=region,
                            updated_by="zae-limiter deploy_lambda_code")
    zip_path, code_hash = await asyncio.to_thread(cached_lambda_zip)
    return {
        "function_arn": outputs.get("function_arn"),
        "code_sha256": code_hash,
        "status": "deployed",
        "size_bytes": zip_path.stat().st_size,
        "version": CLIENT_VERSION,
    }
