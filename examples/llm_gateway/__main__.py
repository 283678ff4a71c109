"""`python -m examples.llm_gateway`: the gateway on uvicorn, over an embedded DynamoDB.

Starts moto's DynamoDB on loopback (`zae_limiter.ops.local.LocalDynamoDB`), creates the table, the
project and its API keys, then serves until Ctrl+C or SIGTERM; both stop the server gracefully
and the embedded DynamoDB with it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

from zae_limiter import Limit, RateLimiter, StackOptions, ValidationError
from zae_limiter.ops.local import LocalDynamoDB

# What the `gateway` extra installs that this command imports: uvicorn and starlette here, moto's
# server (with flask) when the embedded DynamoDB starts.
EXTRA_MODULES = ("uvicorn", "starlette", "moto", "flask", "flask_cors")
INSTALL_HINT = "pip install 'zae-limiter[gateway]' (from a checkout: pip install -e '.[gateway]')"


def missing_extra(module: str) -> NoReturn:
    """One line naming the extra, and exit status 2 (a usage problem): a traceback would bury
    the fix under frames that say nothing about it."""
    print(f"python -m examples.llm_gateway needs {module}: {INSTALL_HINT}", file=sys.stderr)
    sys.exit(2)


try:
    import uvicorn

    from .gateway import Meter, create_app
    from .provision import (
        PROJECT,
        api_key,
        check_limits,
        provision,
        trial_api_key,
        trial_limits,
    )
except ModuleNotFoundError as exc:
    # Only as the command, and only for the extra's own packages: anything else is a real bug,
    # and a test importing this module wants the ImportError, not an exit.
    top = (exc.name or "").partition(".")[0]
    if __name__ != "__main__" or top not in EXTRA_MODULES:
        raise
    missing_extra(top)

TABLE = "llm-gateway"
KEY_LIMITS = (
    "rpm:20/minute",
    "tpm:2000/minute",
    "tokens-month:100000/quota,cron=0 0 1 * *",
    "streams:2/concurrent",
)
# Below the keys' caps together (three keys of 2 streams), so it is the one that binds first.
PROJECT_LIMITS = ("tpm:3000/minute", "streams:4/concurrent")
# Streams still running at Ctrl+C get this long to finish.
GRACEFUL_SHUTDOWN_SECONDS = 5
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.llm_gateway",
        description="An OpenAI-shaped chat completions gateway, rate limited per API key and "
        "per project, on an embedded DynamoDB.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (0: a free one)")
    parser.add_argument(
        "--keys", type=int, default=2, help="standard API keys to create (sk-demo-N; default: 2)"
    )
    parser.add_argument(
        "--trial-keys",
        type=int,
        default=1,
        help="trial API keys to create (sk-trial-N): the key limits with a soft tpm, measured "
        "but never refused (default: 1)",
    )
    parser.add_argument(
        "--key-limit",
        action="append",
        metavar="SPEC",
        help="a per-key limit, repeated: an rpm and a tpm bucket, any quotas (of tokens) and "
        f"concurrency caps (of streams) (default: {' | '.join(KEY_LIMITS)})",
    )
    parser.add_argument(
        "--project-limit",
        action="append",
        metavar="SPEC",
        help="a limit the project's keys share, repeated: some of the key limits' names, each "
        f"of the same kind (default: {' | '.join(PROJECT_LIMITS)})",
    )
    parser.add_argument(
        "--token-delay",
        type=float,
        default=0.02,
        help="seconds the simulated model takes per token (default: 0.02)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")
    options = parser.parse_args(argv)
    try:
        options.key_limits = [Limit.parse(s) for s in options.key_limit or KEY_LIMITS]
        options.project_limits = [Limit.parse(s) for s in options.project_limit or PROJECT_LIMITS]
        check_limits(options.key_limits, options.project_limits)
    except ValidationError as exc:
        parser.error(str(exc))
    if options.keys < 1:
        parser.error("--keys must be at least 1")
    if options.trial_keys < 0:
        parser.error("--trial-keys must not be negative")
    if options.token_delay < 0:
        parser.error("--token-delay must not be negative")
    return options


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM (and SIGHUP) end the process as Ctrl+C does, so the embedded DynamoDB is stopped
    on the way out. While uvicorn serves, its own handlers take over and stop it gracefully;
    it raises the signal again afterwards, and lands here."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Any] = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def listen(host: str, port: int) -> socket.socket:
    """The gateway's socket, bound before anything starts: a port in use fails at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock


def specs(limits: Sequence[Limit]) -> str:
    # Not ", ": a spec has commas of its own (its options) and a cron has spaces.
    return "; ".join(lim.spec for lim in limits)


def banner(url: str, db: LocalDynamoDB, options: argparse.Namespace, keys: dict[str, str]) -> str:
    standard = [api_key(n) for n in range(1, options.keys + 1)]
    trial = [trial_api_key(n) for n in range(1, options.trial_keys + 1)]
    first = standard[0]
    lines = [
        f"Embedded DynamoDB: {db.endpoint_url} (table ZAEL-{TABLE})",
        f"Project {PROJECT}: {specs(options.project_limits)}",
        f"API keys (each: {specs(options.key_limits)}):",
        *(f"  {token} -> entity {keys[token]}" for token in standard),
    ]
    if trial:
        lines += [
            f"Trial keys, tpm measured, never refused (each: "
            f"{specs(trial_limits(options.key_limits))}):",
            *(f"  {token} -> entity {keys[token]}" for token in trial),
        ]
    lines += [
        f"Gateway: {url}/v1/chat/completions",
        f"Try: curl -i {url}/v1/chat/completions -H 'Authorization: Bearer {first}' "
        """-d '{"model": "sim-1", "messages": [{"role": "user", "content": "Hello"}]}'""",
        "Press Ctrl+C to stop.",
    ]
    return "\n".join(lines)


async def serve(options: argparse.Namespace, db: LocalDynamoDB, sock: socket.socket) -> None:
    limiter = RateLimiter(
        name=TABLE,
        endpoint_url=db.endpoint_url,
        stack_options=StackOptions(),
    )
    try:
        keys = await provision(
            limiter,
            options.keys,
            options.key_limits,
            options.project_limits,
            trial_keys=options.trial_keys,
        )
        app = create_app(
            limiter, keys, token_delay=options.token_delay, meter=Meter.of(options.key_limits)
        )
        config = uvicorn.Config(
            app,
            log_level=options.log_level,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        host, port = sock.getsockname()[:2]
        print(banner(f"http://{host}:{port}", db, options, keys), flush=True)
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        await limiter.close()  # the app's shutdown closed it already, unless it never ran


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything starts: without moto the run would fail only once the embedded DynamoDB
    # starts, after the port is bound, with the `local` extra's hint rather than this one's.
    for module in EXTRA_MODULES:
        if importlib.util.find_spec(module) is None:
            missing_extra(module)
    options = parse_args(argv)
    with stop_signals():
        try:
            try:
                sock = listen(options.host, options.port)
            except OSError as exc:
                print(f"cannot serve on {options.host}:{options.port}: {exc}", file=sys.stderr)
                return 1
            with sock, LocalDynamoDB() as db:
                asyncio.run(serve(options, db, sock))
        except KeyboardInterrupt:
            pass
    print("Stopped the gateway and its embedded DynamoDB.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
