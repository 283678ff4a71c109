"""`StackManager`: zae-limiter 0.2.0's API to deploy a limiter's infrastructure from code.

0.2.0 drove CloudFormation; this one drives the Pulumi deployment of `zae_limiter.infra`
(`zae_limiter.provisioning`, `zae_limiter.infra.automation`) with the same constructor, methods,
return values and errors. Against a local endpoint (`endpoint_url`: moto, DynamoDB Local) the
"stack" is the table alone, created and deleted directly.

```python
from zae_limiter import StackManager, StackOptions

async with StackManager("my-app", region="eu-west-1") as manager:
    result = await manager.create_stack(StackOptions(lambda_memory=512))
    print(result["status"])                      # "CREATE_COMPLETE"
    print(await manager.get_stack_status(manager.stack_name))
```

On AWS every call runs the Pulumi CLI (state in `~/.zae-limiter/pulumi`, see
`zae_limiter.infra.automation`): without it they raise `StackCreationError` (creation, deletion)
or `PulumiNotInstalledError` (status), saying what to install. This module's tests run the AWS
paths against Pulumi's mocks and a stand-in for the Pulumi stack, never a real `pulumi up`.
Also importable as `zae_limiter.infra.stack_manager.StackManager` (0.2.0's path).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from .. import schema
from ..exceptions import ValidationError
from ..infra import validate_deployment_name
from ..models import StackOptions
from ..storage.dynamodb.repository import Repository
from . import provisioning

__all__ = ["StackManager"]


def _deployment_name(stack_name: str) -> str:
    try:
        return validate_deployment_name(stack_name)
    except ValueError as exc:
        raise ValidationError("name", stack_name, str(exc)) from exc


class StackManager:
    """The infrastructure of the limiter called `stack_name` (`ZAEL-` prefix optional).

    Attributes as in 0.2.0: `stack_name` and `table_name` (both `ZAEL-<name>`), `region`
    (None: `$AWS_DEFAULT_REGION`, `$AWS_REGION`, else us-east-1), `endpoint_url`. An invalid
    name raises `ValidationError` (field "name").

    The methods that take a `stack_name` (0.2.0 required it) default to this manager's own;
    another name addresses that deployment instead. `wait=False` is accepted, but Pulumi
    deploys from this process: the calls return once the work is done either way.
    """

    def __init__(
        self,
        stack_name: str,
        region: str | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.name = _deployment_name(stack_name)
        self.stack_name = schema.stack_name(self.name)
        self.table_name = schema.table_name(self.name)
        self.region = region
        self.endpoint_url = endpoint_url
        self._repository: Repository | None = None

    @property
    def repository(self) -> Repository | None:
        """The repository the manager opened for its table (None until used, and once closed)."""
        return self._repository

    def _own_repository(self) -> Repository:
        if self._repository is None:
            self._repository = Repository(self.table_name, self.region, self.endpoint_url)
        return self._repository

    @contextlib.asynccontextmanager
    async def _target(self, stack_name: str | None) -> AsyncIterator[tuple[str, Repository]]:
        name = self.name if stack_name is None else _deployment_name(stack_name)
        if name == self.name:
            yield name, self._own_repository()
            return
        repository = Repository(schema.table_name(name), self.region, self.endpoint_url)
        try:
            yield name, repository
        finally:
            await repository.close()

    async def stack_exists(self, stack_name: str | None = None) -> bool:
        """True when the stack exists and is not deleted ("DELETE_COMPLETE")."""
        status = await self.get_stack_status(stack_name)
        return status is not None and status != "DELETE_COMPLETE"

    async def get_stack_status(self, stack_name: str | None = None) -> str | None:
        """The stack's status in CloudFormation's words ("CREATE_COMPLETE", "UPDATE_COMPLETE",
        "CREATE_FAILED", ...; see `zae_limiter.provisioning`), None when there is none."""
        async with self._target(stack_name) as (name, repository):
            return await provisioning.stack_status(
                repository, name=name, endpoint_url=self.endpoint_url
            )

    async def create_stack(
        self,
        stack_options: StackOptions | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Create the stack (None: default options) unless it exists.

        Returns `{"stack_id", "stack_name", "status"}` ("CREATE_COMPLETE"; on AWS also
        "outputs"); an existing stack is not changed and is reported with its status and a
        "message". Raises StackAlreadyExistsError when another process created the stack
        between the check and the creation, StackCreationError when creation fails. See
        `zae_limiter.provisioning.create_stack`.
        """
        return await provisioning.create_stack(
            self._own_repository(),
            stack_options,
            name=self.name,
            region=self.region,
            endpoint_url=self.endpoint_url,
            wait=wait,
        )

    async def delete_stack(self, stack_name: str | None = None, wait: bool = True) -> None:
        """Delete the stack and its table (a table with deletion protection is kept on AWS). A
        stack that does not exist is no error. Raises StackCreationError when deletion fails."""
        async with self._target(stack_name) as (name, repository):
            await provisioning.delete_stack(
                repository, name=name, region=self.region, endpoint_url=self.endpoint_url
            )

    async def deploy_lambda_code(
        self,
        function_name: str | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Deploy this package's aggregator code to the stack's Lambda (Pulumi redeploys the
        stack with its current options) and record it in the version record.

        Returns `{"function_arn", "code_sha256", "status": "deployed", "size_bytes",
        "version"}`; "skipped_local" on a local endpoint, which has no Lambda. `function_name`
        may only name the stack's own aggregator (`ZAEL-<name>-aggregator`). Raises
        StackCreationError when the stack is missing or the deployment fails.
        """
        return await provisioning.deploy_aggregator(
            self._own_repository(),
            name=self.name,
            region=self.region,
            endpoint_url=self.endpoint_url,
            function_name=function_name,
        )

    async def close(self) -> None:
        """Close the DynamoDB client (used for the table and its version record)."""
        repository, self._repository = self._repository, None
        if repository is not None:
            await repository.close()

    async def __aenter__(self) -> StackManager:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
