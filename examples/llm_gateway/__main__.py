"""`python -m examples.llm_gateway`: the gateway on uvicorn, over an embedded DynamoDB.

Starts moto's DynamoDB on loopback (`zae_limiter.ops.local.LocalDynamoDB`), creates the table, the
project and its API keys, then serves until Ctrl+C or SIGTERM; both stop the server gracefully
and the embedded DynamoDB with it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn

from zae_limiter import Limit, RateLimiter, StackOptions, ValidationError
from zae_limiter.ops.local import LocalDynamoDB

from .gateway import create_app
from .provision import PROJECT, check_limits, provision

TABLE = "llm-gateway"
KEY_LIMITS = ("rpm:20/minute", "tpm:2000/minute")
PROJECT_LIMITS = ("tpm:3000/minute",)
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
    parser.add_argument("--keys", type=int, default=2, help="API keys to create (sk-demo-N)")
    parser.add_argument(
        "--key-limit",
        action="append",
        metavar="SPEC",
        help=f"a per-key limit, rpm and tpm (default: {' '.join(KEY_LIMITS)})",
    )
    parser.add_argument(
        "--project-limit",
        action="append",
        metavar="SPEC",
        help=f"a limit the project's keys share (default: {' '.join(PROJECT_LIMITS)})",
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


def banner(url: str, db: LocalDynamoDB, options: argparse.Namespace, keys: dict[str, str]) -> str:
    key_limits = ", ".join(lim.spec for lim in options.key_limits)
    project_limits = ", ".join(lim.spec for lim in options.project_limits)
    first = next(iter(keys))
    lines = [
        f"Embedded DynamoDB: {db.endpoint_url} (table ZAEL-{TABLE})",
        f"Project {PROJECT}: {project_limits}",
        f"API keys (each: {key_limits}):",
        *(f"  {token} -> entity {entity}" for token, entity in keys.items()),
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
        keys = await provision(limiter, options.keys, options.key_limits, options.project_limits)
        app = create_app(limiter, keys, token_delay=options.token_delay)
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
