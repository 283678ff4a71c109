"""Embedded local DynamoDB: moto's server on loopback, for trying the library without AWS.

moto runs in a child process (not a thread) so that its request handling never competes with the
caller's event loop for the GIL. Requires the `local` extra (`pip install "zae-limiter[local]"`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from . import schema
from .exceptions import ZAELimiterError

LOCAL_REGION = schema.DEFAULT_REGION
# moto accepts any credentials; these keep botocore from searching the environment for real ones.
LOCAL_CREDENTIALS = {"aws_access_key_id": "local", "aws_secret_access_key": "local"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalDynamoDB:
    """A moto DynamoDB (and Streams, SQS) server on 127.0.0.1, started and stopped by this object.

    >>> with LocalDynamoDB() as db:
    ...     limiter = RateLimiter(name="demo", endpoint_url=db.endpoint_url,
    ...                           stack_options=StackOptions())
    """

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", startup_timeout: float = 30.0
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        if self._process is None:
            return False
        self.returncode = self._process.poll()
        return self.returncode is None

    def _listen(self) -> socket.socket:
        """The server's socket, bound and listening here: a port in use fails now, with a clear
        message, and no other server can answer the readiness probe in the child's place."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if os.name != "nt":  # as werkzeug does; Linux still refuses a port someone listens on
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"failed: {exc}"
            raise ZAELimiterError(
                f"cannot serve on {self.host}:{self.port}: the port {reason} (another "
                "`zae-limiter local`? choose another --port, or omit it for a free one)"
            ) from exc
        self.port = int(sock.getsockname()[1])
        return sock

    def start(self) -> LocalDynamoDB:
        if self.running:
            return self
        try:
            import moto.server  # noqa: F401
        except ImportError as exc:
            raise ZAELimiterError(
                'the embedded DynamoDB needs moto: pip install "zae-limiter[local]"'
            ) from exc
        env = dict(os.environ)
        env.setdefault("AWS_DEFAULT_REGION", LOCAL_REGION)
        # The child must import this very package, wherever it was imported from.
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        sock = self._listen()
        args = [sys.executable, "-m", "zae_limiter.local", "--host", self.host]
        args += ["--port", str(self.port)]
        try:
            if os.name != "nt":
                args += ["--fd", str(sock.fileno())]
            else:  # no descriptor passing: free the port for the child (a small race remains)
                sock.close()
            self._process = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                pass_fds=(sock.fileno(),) if os.name != "nt" else (),
            )
        finally:
            sock.close()  # the child has its own copy
        self.returncode = None
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise ZAELimiterError(
                    f"moto server exited with code {self._process.returncode} on port {self.port}"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise ZAELimiterError(f"moto server did not start on {self.endpoint_url} in time")

    def reset(self) -> None:
        """Forget every table, stream and queue (moto's `/moto-api/reset`)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        self.returncode = process.returncode

    def __enter__(self) -> LocalDynamoDB:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(host: str, port: int, fd: int | None = None) -> None:
    """Run moto's server in this process until interrupted, one request at a time.

    moto applies a request's read-check-write without isolation, so two concurrent UpdateItems
    on one item can lose an update (measured: 391 of 400 increments survived). DynamoDB applies
    every single-item write atomically; serializing requests behind one lock restores that
    guarantee while connections are still accepted concurrently.
    """
    import threading
    from collections.abc import Callable, Iterable
    from typing import Any

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialized(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            return list(app(environ, start_response))

    # `fd`: the socket the parent bound and listens on (`LocalDynamoDB._listen`).
    server = make_server(
        host, port, serialized, threaded=True, request_handler=MotoRequestHandler, fd=fd
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="moto's DynamoDB server, serialized")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--fd", type=int, default=None, help="an inherited, listening socket")
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    serve(args.host, args.port, args.fd)


if __name__ == "__main__":
    main()
