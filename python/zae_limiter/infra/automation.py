"""Deploy, preview, inspect and destroy a deployment with Pulumi's Automation API.

State lives in a local file backend (`~/.zae-limiter/pulumi`, or `$ZAE_LIMITER_PULUMI_HOME`):
one Pulumi stack `ZAEL-<name>` per deployment, in project `zae-limiter`. The program is the same
as `pulumi/__main__.py` (`component.stack_program`), driven by the same stack config, so a project
written by `write_program` and pointed at the same backend manages the same stacks by hand.

Automation drives the `pulumi` CLI, which is not a Python package: without it every operation
raises `PulumiNotInstalledError` saying how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .. import schema
from ..exceptions import InfrastructureError, InfrastructureNotFoundError, StackCreationError
from . import InfraOptions, coerce_options, validate_deployment_name

if TYPE_CHECKING:
    from pulumi import automation as auto

__all__ = [
    "INSTALL_HINT",
    "PROGRAM_SOURCE",
    "PROJECT_NAME",
    "ConcurrentDeploymentError",
    "PulumiNotInstalledError",
    "deploy",
    "destroy",
    "preview",
    "pulumi_cli_available",
    "require_pulumi",
    "stack_id",
    "stack_status",
    "state_dir",
    "status",
    "status_from_history",
    "write_program",
]

PROJECT_NAME: Final = "zae-limiter"
STATE_DIR_ENV: Final = "ZAE_LIMITER_PULUMI_HOME"

INSTALL_HINT: Final = (
    "the Pulumi CLI and the infra extra are needed to manage AWS infrastructure: "
    "install the CLI with `curl -fsSL https://get.pulumi.com | sh` "
    "(or `brew install pulumi/tap/pulumi`, `choco install pulumi`; "
    "see https://www.pulumi.com/docs/install/) and the Python side with "
    '`pip install "zae-limiter[infra]"`'
)

# `pulumi/__main__.py` is this text too (tests keep them identical).
PROGRAM_SOURCE: Final = '''"""zae-limiter as a Pulumi program: a deployment from the stack's config.

See README.md for the config keys (`zae-limiter:name` is required).
"""

from zae_limiter.infra.component import stack_program

stack_program()
'''

OnOutput = Callable[[str], Any]


class PulumiNotInstalledError(InfrastructureError):
    """The Pulumi CLI (or the `infra` extra's Python packages) is not installed."""

    def __init__(self, missing: str) -> None:
        self.missing = missing
        super().__init__(f"{missing} not found; {INSTALL_HINT}")


class ConcurrentDeploymentError(StackCreationError):
    """Another deployment (or destroy) of the same stack is running."""


def pulumi_cli_available() -> bool:
    return shutil.which("pulumi") is not None


def require_pulumi() -> None:
    """Raise PulumiNotInstalledError unless both the CLI and the Python packages are present."""
    if not pulumi_cli_available():
        raise PulumiNotInstalledError("the `pulumi` CLI is")
    for module in ("pulumi", "pulumi_aws"):
        if importlib.util.find_spec(module) is None:
            raise PulumiNotInstalledError(f"the Python package `{module}` is")


def state_dir() -> Path:
    configured = os.environ.get(STATE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".zae-limiter" / "pulumi"


def _workspace_options(stack_name: str) -> auto.LocalWorkspaceOptions:
    from pulumi import automation as auto

    backend = state_dir()
    backend.mkdir(parents=True, exist_ok=True)
    work_dir = backend / "workspaces" / stack_name
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        # Stack config holds no secrets; an empty passphrase keeps the file backend
        # non-interactive. Set PULUMI_CONFIG_PASSPHRASE to use a real one.
        "PULUMI_CONFIG_PASSPHRASE": os.environ.get("PULUMI_CONFIG_PASSPHRASE", ""),
    }
    return auto.LocalWorkspaceOptions(
        work_dir=str(work_dir),
        env_vars=env,
        secrets_provider="passphrase",
        project_settings=auto.ProjectSettings(
            name=PROJECT_NAME,
            runtime="python",
            backend=auto.ProjectBackend(url=backend.as_uri()),
        ),
    )


def _program() -> None:
    from .component import stack_program

    stack_program()


def open_stack(name: str, create: bool) -> auto.Stack:
    require_pulumi()
    from pulumi import automation as auto

    stack_name = schema.stack_name(validate_deployment_name(name))
    opts = _workspace_options(stack_name)
    try:
        if create:
            return auto.create_or_select_stack(
                stack_name=stack_name, project_name=PROJECT_NAME, program=_program, opts=opts
            )
        return auto.select_stack(
            stack_name=stack_name, project_name=PROJECT_NAME, program=_program, opts=opts
        )
    except auto.StackNotFoundError as exc:
        raise InfrastructureNotFoundError(
            stack_name, f"no Pulumi stack {stack_name} in {state_dir()}"
        ) from exc


def configure_stack(stack: auto.Stack, name: str, region: str, options: InfraOptions) -> None:
    from pulumi import automation as auto

    wanted = {f"{PROJECT_NAME}:{k}": v for k, v in options.config_values().items()}
    wanted[f"{PROJECT_NAME}:name"] = schema.short_name(name)
    wanted["aws:region"] = region
    # Options dropped since the last deploy return to their defaults.
    stale = [
        key for key in stack.get_all_config()
        if key.startswith(f"{PROJECT_NAME}:") and key not in wanted
    ]
    if stale:
        stack.remove_all_config(stale)
    stack.set_all_config({key: auto.ConfigValue(value) for key, value in wanted.items()})


def _reason(exc: Exception) -> str:
    # The CLI's stderr ends with the useful part; keep the message to a readable size.
    text = str(exc).strip().splitlines()
    return " ".join(line.strip() for line in text[-6:] if line.strip()) or type(exc).__name__


def _error(stack_name: str, exc: Exception) -> InfrastructureError:
    return StackCreationError(stack_name, _reason(exc))


def deploy(name: str, region: str, options: object | None = None, *,
           on_output: OnOutput | None = None) -> dict[str, Any]:
    """Create or update the deployment; returns the stack's outputs (see component.EXPORTS)."""
    opts = coerce_options(options)
    stack = open_stack(name, create=True)
    configure_stack(stack, name, region, opts)
    from pulumi import automation as auto

    try:
        result = stack.up(on_output=on_output, color="never")
    except auto.ConcurrentUpdateError as exc:
        raise ConcurrentDeploymentError(
            stack.name, f"another update of the stack is in progress: {_reason(exc)}"
        ) from exc
    except auto.CommandError as exc:
        raise _error(stack.name, exc) from exc
    return {key: value.value for key, value in result.outputs.items()}


def stack_id(name: str) -> str:
    """The stack's fully qualified name in the local backend (`organization/zae-limiter/ZAEL-x`;
    a self-managed backend's organisation is always `organization`)."""
    return f"organization/{PROJECT_NAME}/{schema.stack_name(validate_deployment_name(name))}"


# CloudFormation's stack status names, which zae-limiter 0.2.0 reported, for the latest update or
# destroy of a Pulumi stack: (kind, result, deployed before) -> status.
_STATUS: Final = {
    ("update", "succeeded", False): "CREATE_COMPLETE",
    ("update", "succeeded", True): "UPDATE_COMPLETE",
    ("update", "in-progress", False): "CREATE_IN_PROGRESS",
    ("update", "in-progress", True): "UPDATE_IN_PROGRESS",
    ("update", "failed", False): "CREATE_FAILED",
    ("update", "failed", True): "UPDATE_FAILED",
    ("destroy", "succeeded", False): "DELETE_COMPLETE",
    ("destroy", "succeeded", True): "DELETE_COMPLETE",
    ("destroy", "in-progress", False): "DELETE_IN_PROGRESS",
    ("destroy", "in-progress", True): "DELETE_IN_PROGRESS",
    ("destroy", "failed", False): "DELETE_FAILED",
    ("destroy", "failed", True): "DELETE_FAILED",
}


def status_from_history(history: Sequence[Any]) -> str | None:
    """A CloudFormation-style status from a stack's update history (newest first, as
    `Stack.history()` returns it; entries with `kind` and `result`), None if nothing was ever
    deployed or destroyed. Refreshes, previews and imports do not count; an update is a creation
    ("CREATE_...") unless a successful update followed the last successful destroy before it."""
    entries = [u for u in history if getattr(u, "kind", None) in ("update", "destroy")]
    if not entries:
        return None
    latest, older = entries[0], entries[1:]
    deployed_before = False
    for entry in older:
        if entry.result != "succeeded":
            continue
        if entry.kind == "destroy":
            break
        deployed_before = True
        break
    return _STATUS.get((latest.kind, latest.result, deployed_before), "UNKNOWN")


def stack_status(name: str) -> str | None:
    """The deployment's status as CloudFormation would name it (see `status_from_history`);
    None when there is no such stack or it was never deployed."""
    try:
        stack = open_stack(name, create=False)
    except InfrastructureNotFoundError:
        return None
    from pulumi import automation as auto

    try:
        history = stack.history()
    except auto.CommandError as exc:
        raise InfrastructureError(f"cannot read stack {stack.name}: {exc}") from exc
    return status_from_history(history)


def preview(name: str, region: str, options: object | None = None, *,
            on_output: OnOutput | None = None) -> dict[str, int]:
    """What `deploy` would change: a count per operation ("create", "update", "same", ...)."""
    opts = coerce_options(options)
    stack = open_stack(name, create=True)
    configure_stack(stack, name, region, opts)
    from pulumi import automation as auto

    try:
        result = stack.preview(on_output=on_output, color="never")
    except auto.CommandError as exc:
        raise _error(stack.name, exc) from exc
    return {str(getattr(op, "value", op)): count for op, count in result.change_summary.items()}


def status(name: str, region: str | None = None) -> dict[str, Any]:
    """The stack's outputs and last update; raises InfrastructureNotFoundError if never deployed."""
    stack = open_stack(name, create=False)
    from pulumi import automation as auto

    try:
        outputs = {key: value.value for key, value in stack.outputs().items()}
        info = stack.info()
        config = {key: value.value for key, value in stack.get_all_config().items()}
    except auto.CommandError as exc:
        raise InfrastructureError(f"cannot read stack {stack.name}: {exc}") from exc
    return {
        "stack": stack.name,
        "backend": state_dir().as_uri(),
        "region": config.get("aws:region", region),
        "outputs": outputs,
        "options": {
            key.split(":", 1)[1]: value
            for key, value in config.items()
            if key.startswith(f"{PROJECT_NAME}:")
        },
        "last_update": None if info is None else {
            "kind": info.kind,
            "result": info.result,
            "started": info.start_time.isoformat() if info.start_time else None,
            "ended": info.end_time.isoformat() if info.end_time else None,
            "resource_changes": dict(info.resource_changes or {}),
        },
    }


def destroy(name: str, region: str | None = None, *, on_output: OnOutput | None = None,
            remove_stack: bool = True) -> None:
    """Destroy the deployment. A table with deletion protection is kept (released from the stack);
    redeploy with `adopt_existing_table=True` to take it back."""
    stack = open_stack(name, create=False)
    from pulumi import automation as auto

    if region is not None:
        stack.set_config("aws:region", auto.ConfigValue(region))
    try:
        stack.destroy(on_output=on_output, color="never")
        if remove_stack:
            stack.workspace.remove_stack(stack.name)
    except auto.CommandError as exc:
        raise _error(stack.name, exc) from exc


def write_program(output_dir: Path, name: str, region: str,
                  options: object | None = None) -> list[Path]:
    """Write a standalone Pulumi project for the deployment; returns the files written.

    `pulumi up` in it (after `pip install -r requirements.txt`) deploys what `deploy` would.
    """
    short = validate_deployment_name(name)
    opts = coerce_options(options)
    stack_name = schema.stack_name(short)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    from .._version import __version__

    config: dict[str, str] = {"aws:region": region, f"{PROJECT_NAME}:name": short}
    config.update({f"{PROJECT_NAME}:{k}": v for k, v in opts.config_values().items()})
    # JSON scalars are valid YAML, and quoting every value keeps YAML from reinterpreting them.
    stack_yaml = "config:\n" + "".join(
        f"  {json.dumps(key)}: {json.dumps(value)}\n" for key, value in config.items()
    )
    files = {
        "Pulumi.yaml": (
            f"name: {PROJECT_NAME}\n"
            "description: zae-limiter rate limiter infrastructure (DynamoDB table, aggregator)\n"
            "runtime:\n"
            "  name: python\n"
            "  options:\n"
            "    toolchain: pip\n"
            "    virtualenv: venv\n"
        ),
        f"Pulumi.{stack_name}.yaml": stack_yaml,
        "__main__.py": PROGRAM_SOURCE,
        "requirements.txt": f"zae-limiter[infra]=={__version__}\n",
        "README.md": _program_readme(stack_name, region),
    }
    written = []
    for filename, text in files.items():
        path = output_dir / filename
        path.write_text(text)
        written.append(path)
    return written


def _program_readme(stack_name: str, region: str) -> str:
    return f"""# zae-limiter deployment `{stack_name}`

Generated by `zae-limiter pulumi-program`. The program (`__main__.py`) instantiates
`zae_limiter.infra.component.ZaeLimiterStack` from the stack config in `Pulumi.{stack_name}.yaml`.

```bash
pulumi login file://~/.zae-limiter/pulumi   # the state `zae-limiter deploy` uses; or any backend
pulumi stack select --create {stack_name}
pulumi up                                   # installs requirements.txt into ./venv first
```

Region: `{region}` (`aws:region`). Change options with
`pulumi config set zae-limiter:<option> <value>` — every option is listed in the zae-limiter
repository's `pulumi/README.md`. Values other than strings are JSON
(`pulumi config set zae-limiter:tags '{{"team": "payments"}}'`).

The table has deletion protection by default and is *retained* by `pulumi destroy`; to manage a
retained table again, `pulumi config set zae-limiter:adopt_existing_table true` before `pulumi up`.
"""
