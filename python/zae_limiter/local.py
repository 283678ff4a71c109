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
from typing import TYPE_CHECKING

from . import schema
from .exceptions import ZAELimiterError

if TYPE_CHECKING:
    from werkzeug.serving import WSGIRequestHandler

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
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 30.0,
        keep_alive: bool = True,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        # HTTP/1.1 keep-alive, as DynamoDB does; False: a new connection for every request.
        self.keep_alive = keep_alive
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
        if not self.keep_alive:
            args.append("--no-keep-alive")
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


# An idle keep-alive connection is closed by the server after this long. Clients close theirs
# sooner (aiobotocore after 12 s idle), so a client never reuses one the server dropped; the
# timeout only reclaims the threads of clients that went away without closing.
KEEP_ALIVE_IDLE_TIMEOUT = 300.0


def serve(host: str, port: int, fd: int | None = None, keep_alive: bool = True) -> None:
    """Run moto's server in this process until interrupted, one request at a time.

    moto applies a request's read-check-write without isolation, so two concurrent UpdateItems
    on one item can lose an update (measured: 391 of 400 increments survived). DynamoDB applies
    every single-item write atomically; serializing requests behind one lock restores that
    guarantee while connections are still accepted concurrently.

    Connections are kept alive (HTTP/1.1), as DynamoDB's are (`keep_alive=False`: closed after
    every response, werkzeug's own behaviour). Keep-alive changes how requests arrive, not how
    they are applied: every request, on any connection, still runs alone behind the lock.
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

    handler = keep_alive_handler() if keep_alive else MotoRequestHandler
    # `fd`: the socket the parent bound and listens on (`LocalDynamoDB._listen`).
    server = make_server(host, port, serialized, threaded=True, request_handler=handler, fd=fd)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def keep_alive_handler() -> type[WSGIRequestHandler]:
    """moto's request handler, answering with a Content-Length and keeping the connection open.

    werkzeug's own `run_wsgi` always sends `Connection: close`: it cannot tell where a request
    body it did not read ends and the next request begins. This one reads the whole body
    (Content-Length) before calling the application, so the stream is always at the next
    request line. Requests it cannot frame that way (a chunked body, HEAD) and clients that ask
    for `Connection: close` (or speak HTTP/1.0) get werkzeug's handling and the connection is
    closed after them.
    """
    import io
    from collections.abc import Callable
    from typing import Any

    from moto.moto_server.werkzeug_app import MotoRequestHandler

    no_body = frozenset({204, 304})

    class KeepAliveRequestHandler(MotoRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = KEEP_ALIVE_IDLE_TIMEOUT

        def run_wsgi(self) -> None:
            length = self.headers.get("Content-Length", "0").strip()
            if (
                self.close_connection  # HTTP/1.0, or the client sent `Connection: close`
                or self.command == "HEAD"
                or "Transfer-Encoding" in self.headers
                or not length.isdigit()
            ):
                self.close_connection = True
                super().run_wsgi()
                return
            # http.server has already answered an `Expect: 100-continue` (parse_request).
            body = self.rfile.read(int(length)) if int(length) else b""
            if len(body) < int(length):  # the client went away mid-request
                self.close_connection = True
                return
            self.environ = environ = self.make_environ()
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            code, reason, headers, data = self._respond(environ)
            lines = [
                f"{self.protocol_version} {code} {reason}",
                f"Server: {self.version_string()}",
                f"Date: {self.date_time_string()}",
            ]
            lines += [
                f"{key}: {value}"
                for key, value in headers
                if key.lower() not in ("content-length", "connection", "transfer-encoding")
            ]
            if code >= 200 and code not in no_body:
                lines.append(f"Content-Length: {len(data)}")
            if self.close_connection:
                lines.append("Connection: close")
            # Head and body in one send: as two small writes they would meet Nagle's algorithm
            # and the client's delayed ACK (40 ms a response), and cost the client two reads.
            self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
            self.log_request(code, len(data))

        def _respond(
            self, environ: dict[str, Any]
        ) -> tuple[int, str, list[tuple[str, str]], bytes]:
            """The application's answer to one request: status, reason, headers, whole body."""
            status: list[str] = []
            headers: list[tuple[str, str]] = []
            chunks: list[bytes] = []

            def start_response(
                status_line: str, response_headers: list[tuple[str, str]], exc_info: Any = None
            ) -> Callable[[bytes], None]:
                status[:] = [status_line]
                headers[:] = response_headers
                return chunks.append

            try:
                result = self.server.app(environ, start_response)
                try:
                    chunks.extend(result)
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
                code_text, _, reason = status[0].partition(" ")
                code = int(code_text)
            except Exception as exc:  # as werkzeug does: a 500, logged; then close
                self.close_connection = True
                self.log_error("error on request: %r", exc)
                return 500, "Internal Server Error", [("Content-Type", "text/plain")], b""
            data = b"".join(chunks) if code >= 200 and code not in no_body else b""
            return code, reason, headers, data

    return KeepAliveRequestHandler


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="moto's DynamoDB server, serialized")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--fd", type=int, default=None, help="an inherited, listening socket")
    parser.add_argument(
        "--no-keep-alive", action="store_true", help="close the connection after every response"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    serve(args.host, args.port, args.fd, keep_alive=not args.no_keep_alive)


if __name__ == "__main__":
    main()
