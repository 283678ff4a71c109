"""What every `zae-limiter` command shares, in one place.

- `Target`: a deployment (`--name`, `--region`, `--endpoint-url`) and everything made from it:
  its table, the repository, a limiter, boto3 clients. AWS sessions for a local endpoint get a
  region and placeholder credentials here, and only here (`Target.credentials`).
- `target_options`: the one decorator of the common options (`--name`, `--region`,
  `--endpoint-url`, `--json`); it builds the `Target` and the `Output` and passes them to the
  command, and applies `cli_errors`.
- `cli_errors`: the one error handler: library, AWS and input errors become one line on stderr
  and exit code 1 (click's usage errors keep code 2); advice is for a shell, not Python. A
  missing extra (`MissingExtra`; the Pulumi CLI or packages for the infra commands) is one line
  naming it, with exit code 2.
- `Output.show`: a command builds its data once and passes what people should see with it; the
  output is that data as JSON with `--json`, or the human view without. `Output.fail` is the
  same for a failed check (exit code 1).
- `console`, `fields_table`, `rows_table`, `new_table`: rich output that never truncates a cell
  (wide when not on a terminal, columns fold instead of "…" on one).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from .. import schema

if TYPE_CHECKING:
    import aioboto3
    import boto3

    from ..limiter import RateLimiter
    from ..storage.dynamodb.repository import Repository

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_MISSING_EXTRA = 2
REGION_HELP = "AWS region."
REGION_DEFAULT_TEXT = "$AWS_DEFAULT_REGION or us-east-1"
# When stdout is not a terminal (a pipe, a file, click's test runner), rich would lay tables out
# for 80 columns and cut cells short; render them at their natural width instead.
NON_TERMINAL_WIDTH = 4096
_TARGET_KEY = "zae_limiter.target"


def default_region() -> str:
    return schema.default_region()


# -- the target -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A deployment: table `ZAEL-<name>` in `region`, or at `endpoint_url` (a local DynamoDB)."""

    name: str
    region: str
    endpoint_url: str | None = None

    @classmethod
    def of(cls, name: str, region: str | None = None, endpoint_url: str | None = None) -> Target:
        """Validates the name (`ZAEL-` prefix optional); raises ValueError when it is unusable."""
        from ..infra import validate_deployment_name

        return cls(validate_deployment_name(name), region or default_region(), endpoint_url or None)

    @property
    def table(self) -> str:
        return schema.table_name(self.name)

    @property
    def stack(self) -> str:
        return schema.stack_name(self.name)

    @property
    def local(self) -> bool:
        return self.endpoint_url is not None

    @property
    def where(self) -> str:
        return self.endpoint_url or self.region

    @property
    def options_text(self) -> str:
        """The command-line options that name this target again (for advice in messages)."""
        if self.endpoint_url:
            return f"--name {self.name} --endpoint-url {self.endpoint_url}"
        return f"--name {self.name} --region {self.region}"

    # -- AWS sessions and clients ---------------------------------------------------------------

    def credentials(self) -> tuple[str | None, str | None]:
        """The access key pair sessions get: none (the usual chain: environment, profile,
        instance role), or placeholders for a local endpoint when nothing is configured (a local
        DynamoDB accepts anything; nobody should have to invent AWS keys for it)."""
        if self.endpoint_url is not None:
            import boto3

            if boto3.Session(region_name=self.region).get_credentials() is None:
                from ..storage.dynamodb.endpoint import LOCAL_CREDENTIALS

                return (
                    LOCAL_CREDENTIALS["aws_access_key_id"],
                    LOCAL_CREDENTIALS["aws_secret_access_key"],
                )
        return None, None

    def session(self) -> boto3.Session:
        import boto3

        key, secret = self.credentials()
        return boto3.Session(
            aws_access_key_id=key, aws_secret_access_key=secret, region_name=self.region
        )

    def client(self, service: str, *, retries: int | None = None) -> Any:
        """A blocking boto3 client of `service` for this target."""
        from botocore.config import Config

        config = None if retries is None else Config(
            retries={"max_attempts": retries, "mode": "standard"}
        )
        return self.session().client(  # type: ignore[call-overload]
            service, endpoint_url=self.endpoint_url, config=config
        )

    def aio_session(self) -> aioboto3.Session:
        import aioboto3

        key, secret = self.credentials()
        return aioboto3.Session(
            aws_access_key_id=key, aws_secret_access_key=secret, region_name=self.region
        )

    def repository(self) -> Repository:
        from ..storage.dynamodb.repository import Repository

        return Repository(self.table, self.region, self.endpoint_url, session=self.aio_session())

    def limiter(self, **options: Any) -> RateLimiter:
        """A limiter over `repository()`. Operator tools skip the version check by default: they
        must be able to repair a table whatever its version."""
        from ..limiter import RateLimiter

        options.setdefault("version_check", "skip")
        return RateLimiter(
            self.name, self.region, self.endpoint_url, repository=self.repository(), **options
        )

    # -- running async work ---------------------------------------------------------------------

    def run(self, work: Callable[[Repository], Awaitable[T]]) -> T:
        """`work(repository)` on a fresh event loop; the repository is closed whatever happens."""

        async def go() -> T:
            repo = self.repository()
            try:
                return await work(repo)
            finally:
                await repo.close()

        return asyncio.run(go())

    def run_limiter(self, work: Callable[[RateLimiter], Awaitable[T]], **options: Any) -> T:
        """`work(limiter)` on a fresh event loop; the limiter is closed whatever happens (also
        when it fails to get ready, so no aiohttp session is left open)."""

        async def go() -> T:
            limiter = self.limiter(**options)
            try:
                return await work(limiter)
            finally:
                await limiter.close()

        return asyncio.run(go())


def current_target() -> Target | None:
    """The target of the command being run, if it has one (for error messages)."""
    ctx = click.get_current_context(silent=True)
    found = None if ctx is None else ctx.find_root().meta.get(_TARGET_KEY)
    return found if isinstance(found, Target) else None


def use_target(target: Target) -> Target:
    """Make `target` the one error messages talk about (for commands that build their own)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.find_root().meta[_TARGET_KEY] = target
    return target


# -- output -----------------------------------------------------------------------------------


def console(*, err: bool = False) -> Console:
    """A console on stdout (or stderr). Built per call: click's test runner swaps sys.stdout."""
    stream = sys.stderr if err else sys.stdout
    terminal = hasattr(stream, "isatty") and stream.isatty()
    return Console(
        file=stream,
        highlight=False,
        soft_wrap=True,
        width=None if terminal else NON_TERMINAL_WIDTH,
    )


# Characters a terminal acts on rather than shows: C0 controls but tab and newline, DEL, C1
# controls (ESC's 8-bit twins), and the bidirectional overrides that reorder what is shown.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe(text: str) -> str:
    """`text` with the characters a terminal would act on shown as escapes (`\\x1b`). Stored
    strings (entity names, metadata, audit details) are anyone's with write access to the
    table: printed raw, an escape sequence could rewrite the screen or the window title."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                       else f"\\u{ord(m.group()):04x}", text)


def new_table(title: str, columns: Sequence[str], *, right: Iterable[str] = (),
              header: bool = True) -> Table:
    """A table whose cells fold rather than being cut short with "…". The title is plain text
    (no markup), made safe."""
    table = Table(title=Text(safe(title)), title_justify="left", show_header=header)
    right = set(right)
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in right else "left",
            overflow="fold",
            no_wrap=False,
        )
    return table


def _cell(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return "; ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    return "-" if value is None or value == "" else safe(str(value))


def fields_table(title: str, fields: Mapping[str, Any]) -> Table:
    """Key/value rows (one record)."""
    table = new_table(title, ["field", "value"], header=False)
    table.columns[0].style = "bold"
    for key, value in fields.items():
        table.add_row(Text(key), Text(_cell(value)))
    return table


def rows_table(
    title: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]], *,
    right: Iterable[str] = (),
) -> Table:
    """One row per record, the given columns of each."""
    table = new_table(title, columns, right=right)
    for row in rows:
        table.add_row(*(plain(row.get(c)) for c in columns))
    return table


def plain(value: Any) -> Text:
    """A table cell of a value as it is (no markup), made safe; "-" for None."""
    return Text("-" if value is None else safe(str(value)))


def markup(text: str) -> Text:
    """Text with rich markup (`[bold]...[/]`); plain strings are shown as they are."""
    return Text.from_markup(text)


@dataclass(frozen=True, slots=True)
class Stderr:
    """A part of the human view that belongs on stderr (warnings, failures)."""

    part: RenderableType


Human = RenderableType | Stderr


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _safe_part(part: RenderableType) -> RenderableType:
    return safe(part) if isinstance(part, str) else part


@dataclass(frozen=True, slots=True)
class Output:
    """How a command's result is shown: JSON (`--json`) or the human view."""

    as_json: bool = False

    def show(self, data: Any, *human: Human) -> None:
        """`data` as JSON, or the human parts (strings print as they are, rich renderables
        rendered, `Stderr(...)` on stderr)."""
        if self.as_json:
            emit_json(data)
            return
        out, err = console(), None
        for part in human:
            if isinstance(part, Stderr):
                err = err or console(err=True)
                err.print(_safe_part(part.part), markup=False)
            else:
                out.print(_safe_part(part), markup=False)

    def note(self, *human: Human) -> None:
        """Progress for people (nothing in JSON mode, which prints only the result)."""
        if not self.as_json:
            self.show(None, *human)

    def fail(self, data: Any, message: str, *human: Human) -> None:
        """A failed check: `data` as JSON, or the human parts and `message` as the one-line
        error; exit code 1 either way."""
        self.show(data, *human)
        if self.as_json:
            raise click.exceptions.Exit(EXIT_FAILED)
        raise click.ClickException(message)


def confirm(yes: bool, question: str) -> None:
    """Ask (on stderr, so stdout stays clean for --json) unless --yes; "no" exits 1."""
    if not yes:
        click.confirm(question, abort=True, err=True)


def key_values(pairs: Sequence[str], option: str) -> dict[str, str]:
    """`KEY=VALUE` option values (`--meta`, `--tag`) as a dict."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=option)
        result[key] = value
    return result


def fmt_num(value: float | None) -> str | None:
    if value is None:
        return None
    return f"{value:g}" if value != int(value) else str(int(value))


# -- errors -----------------------------------------------------------------------------------


def _error_code(exc: BaseException) -> str:
    return schema.error_code(exc) or ""


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        nested = getattr(current, "cause", None)
        current = current.__cause__ or (nested if isinstance(nested, BaseException) else None)


def not_found(what: str, target: Target | None, detail: str = "") -> str:
    """`what` is missing: the shell command that creates it (the library's message would say
    `stack_options=StackOptions()`, which is Python)."""
    if target is None:
        name = schema.short_name(what.split()[-1])
        return f"{what} not found{detail}; create it with: zae-limiter deploy --name {name}"
    where = f"at {target.where}" if target.local else f"in {target.region}"
    advice = f"zae-limiter deploy {target.options_text}"
    return f"{what} not found {where}{detail}; create it with: {advice}"


def _unreachable(exc: BaseException) -> bool:
    for cause in _causes(exc):
        name = type(cause).__name__
        if name in ("EndpointConnectionError", "ClientConnectorError", "ConnectionRefusedError"):
            return True
        if "Could not connect to the endpoint URL" in str(cause):
            return True
    return False


def error_message(exc: BaseException, target: Target | None = None) -> str | None:
    """The one line a command prints for an expected failure; None for a bug (traceback)."""
    from ..exceptions import InfrastructureNotFoundError, ZAELimiterError
    from ..storage.protocol import StorageError

    if isinstance(exc, InfrastructureNotFoundError):
        # The library's message advises Python (`stack_options=...`); a shell needs commands.
        text = str(exc)
        detail = text.partition(". ")[2]
        detail = "" if "StackOptions" in detail or "zae-limiter deploy" in detail else detail
        kind = "stack" if "stack" in detail.lower() else "table"
        what = f"{kind} {schema.table_name(exc.name)}" if target is not None else exc.name
        return not_found(what, target, f" ({detail.rstrip('.')})" if detail else "")
    if _error_code(exc) == "ResourceNotFoundException" and target is not None:
        return not_found(f"table {target.table}", target)
    if target is not None and target.local and _unreachable(exc):
        return (
            f"{exc} (is a local DynamoDB running at {target.endpoint_url}? start one with: "
            "zae-limiter local)"
        )
    if any(type(cause).__name__ == "NoCredentialsError" for cause in _causes(exc)):
        return f"{exc} (configure AWS credentials, or pass --endpoint-url for a local DynamoDB)"
    if isinstance(exc, ZAELimiterError | StorageError | ValueError | OSError | RuntimeError):
        return str(exc) or type(exc).__name__
    module = type(exc).__module__
    if module.startswith(("botocore", "boto3", "aiobotocore", "aiohttp")):
        code = _error_code(exc)
        if code:
            message = getattr(exc, "response", {}).get("Error", {}).get("Message")
            return f"{code}: {message or exc}"
        return f"{type(exc).__name__}: {exc}"
    return None


def _one_line(text: str) -> str:
    return safe(re.sub(r"\s*\n\s*", " ", text.strip()))


class MissingExtra(click.ClickException):
    """What the command needs is not installed: one line naming the extra (`pip install
    'zae-limiter[...]'`), exit code 2. Not 1: the command did not fail at its work, it could not
    run here at all, which a script should tell from a failed deployment or a denied check."""

    exit_code = EXIT_MISSING_EXTRA


def cli_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Expected failures become one readable line on stderr and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None
        except Exception as exc:
            from ..infra.automation import PulumiNotInstalledError  # only once something failed

            if isinstance(exc, PulumiNotInstalledError):
                raise MissingExtra(_one_line(str(exc))) from exc
            message = error_message(exc, current_target())
            if message is None:
                raise
            raise click.ClickException(_one_line(message)) from exc

    return wrapper


# -- the common options -----------------------------------------------------------------------


def target_options(
    *,
    name_required: bool = True,
    json_output: bool = True,
    name_help: str = "Deployment name (table ZAEL-<name>).",
    endpoint_help: str = "A local DynamoDB (moto, DynamoDB Local) instead of AWS.",
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """`--name`, `--region`, `--endpoint-url` (and `--json`) for a command, which receives them
    as `target: Target` (None when the name is optional and not given) and `out: Output`."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def command(
            *args: Any,
            name: str | None,
            region: str,
            endpoint_url: str | None,
            as_json: bool = False,
            **kwargs: Any,
        ) -> T:
            target = use_target(Target.of(name, region, endpoint_url)) if name else None
            return fn(*args, target=target, out=Output(as_json), **kwargs)

        wrapped: Callable[..., T] = cli_errors(command)
        if json_output:
            wrapped = click.option(
                "--json", "as_json", is_flag=True, help="Print JSON on stdout."
            )(wrapped)
        wrapped = click.option(
            "--endpoint-url", default=None, metavar="URL", help=endpoint_help
        )(wrapped)
        wrapped = click.option(
            "--region", default=default_region, show_default=REGION_DEFAULT_TEXT, help=REGION_HELP
        )(wrapped)
        return click.option("--name", required=name_required, help=name_help)(wrapped)

    return decorate


def require(target: Target | None) -> Target:
    """The target of a command whose `--name` is optional, where it is needed after all."""
    if target is None:
        raise click.UsageError("Missing option '--name'.")
    return target
