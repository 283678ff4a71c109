"""Embedded local DynamoDB: moto's server on loopback, for trying the library without AWS.

moto runs in a child process (not a thread) so that its request handling never competes with the
caller's event loop for the GIL. Requires the `local` extra (`pip install "zae-limiter[local]"`).

The child dies with the process that started it, however that one ends (`stop()`, an exception,
SIGTERM, SIGKILL): it holds the read end of a pipe whose only write end is the parent's, and
exits when the pipe reaches end-of-file (the kernel closes the write end whatever kills the
parent), or when its parent process changes; on Linux `PR_SET_PDEATHSIG` kills it too. It only
ever listens on loopback: anyone who can connect can reset or read every table.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ..exceptions import ZAELimiterError
from ..storage.dynamodb.endpoint import LOCAL_REGION

if TYPE_CHECKING:
    from werkzeug.serving import WSGIRequestHandler



def loopback_host(host: str) -> str:
    """`host` if it is an IPv4 loopback address ("localhost": 127.0.0.1), else a clear error.

    The embedded DynamoDB has no authentication and serves `/moto-api/reset`: bound to any other
    address, anyone on the network could read, change or wipe its tables.
    """
    if host.strip().lower() == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.IPv4Address(host.strip())
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ZAELimiterError(
            f"the embedded DynamoDB only listens on loopback (127.0.0.1), not on {host!r}: it "
            "has no authentication, and anyone who can reach it can read or wipe its tables"
        )
    return str(address)


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
        self.host = loopback_host(host)
        self.port = port or free_port(self.host)
        self.startup_timeout = startup_timeout
        # HTTP/1.1 keep-alive, as DynamoDB does; False: a new connection for every request.
        self.keep_alive = keep_alive
        self._process: subprocess.Popen[bytes] | None = None
        # Write end of the lifeline pipe: the child exits when it reaches end-of-file.
        self._lifeline: int | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (None before `start`)."""
        return None if self._process is None else self._process.pid

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
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        sock = self._listen()
        args = [sys.executable, "-m", "zae_limiter.ops.local", "--host", self.host]
        args += ["--port", str(self.port), "--parent-pid", str(os.getpid())]
        if not self.keep_alive:
            args.append("--no-keep-alive")
        # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: only ask for it
        # from the main thread, or a server started from a worker thread would die with it.
        if threading.current_thread() is threading.main_thread():
            args.append("--die-with-parent-thread")
        pass_fds: tuple[int, ...] = ()
        lifeline_read: int | None = None
        try:
            if os.name != "nt":
                # Both ends are non-inheritable: only the child gets the read end (pass_fds), and
                # no other child of this process gets the write end, which would keep it open.
                lifeline_read, self._lifeline = os.pipe()
                args += ["--fd", str(sock.fileno()), "--lifeline-fd", str(lifeline_read)]
                pass_fds = (sock.fileno(), lifeline_read)
            else:  # no descriptor passing: free the port for the child (a small race remains)
                sock.close()
            self._process = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                pass_fds=pass_fds,
            )
        except BaseException:
            self._close_lifeline()
            raise
        finally:
            sock.close()  # the child has its own copies
            if lifeline_read is not None:
                os.close(lifeline_read)
        self.returncode = None
        try:
            self._wait_until_ready()
        except BaseException:  # a failed start, or Ctrl+C / SIGTERM while waiting: no orphan
            self.stop()
            raise
        return self

    def _close_lifeline(self) -> None:
        lifeline, self._lifeline = self._lifeline, None
        if lifeline is not None:
            os.close(lifeline)

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
        if process is None:
            self._close_lifeline()
            return
        try:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        except BaseException:  # interrupted (a second Ctrl+C): never leave the child behind
            with contextlib.suppress(OSError):
                process.kill()
            raise
        finally:
            # Closing the write end alone makes the child exit, should it still be running.
            self._close_lifeline()
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
    bound = str(server.socket.getsockname()[0])
    try:
        loopback_host(bound)  # an inherited socket (`fd`) could be bound anywhere
    except ZAELimiterError:
        server.server_close()
        raise
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


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# How often the watchdog checks that the parent process is still this process's parent.
PARENT_POLL_INTERVAL = 0.5


def set_parent_death_signal() -> bool:
    """Linux: the kernel sends this process SIGKILL when the thread that started it ends.

    False where that is not available (not Linux, no libc); the watchdog still applies.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util
    import signal

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _parent_gone(parent_pid: int) -> bool:
    # Reparented (to init or a subreaper): the parent has exited.
    return os.getppid() != parent_pid


def watch_parent(parent_pid: int, lifeline_fd: int | None) -> threading.Thread:
    """A daemon thread that ends this process as soon as the parent is gone: the lifeline pipe
    reaches end-of-file (its write end, held by the parent only, is closed however the parent
    ended, even by SIGKILL) or the parent pid changes (no pipe: Windows, or an old caller).

    The exit is immediate (`os._exit`): there is no one left to serve, and a clean shutdown of
    a server that may be mid-request could hang.
    """

    def watch() -> None:
        while True:
            if lifeline_fd is not None:
                try:
                    ready, _, _ = select.select([lifeline_fd], [], [], PARENT_POLL_INTERVAL)
                    if ready and not os.read(lifeline_fd, 1):  # end-of-file
                        os._exit(0)
                except OSError:
                    os._exit(0)
            else:
                time.sleep(PARENT_POLL_INTERVAL)
            if _parent_gone(parent_pid):
                os._exit(0)

    thread = threading.Thread(target=watch, name="zae-limiter-parent-watchdog", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="moto's DynamoDB server, serialized")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address only")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--fd", type=int, default=None, help="an inherited, listening socket")
    parser.add_argument(
        "--no-keep-alive", action="store_true", help="close the connection after every response"
    )
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="exit once this is no longer the parent"
    )
    parser.add_argument(
        "--lifeline-fd", type=int, default=None, help="exit when this inherited pipe reaches EOF"
    )
    parser.add_argument(
        "--die-with-parent-thread",
        action="store_true",
        help="Linux: SIGKILL when the thread that started this process ends (PR_SET_PDEATHSIG)",
    )
    args = parser.parse_args(argv)
    try:
        host = loopback_host(args.host)
    except ZAELimiterError as exc:
        parser.error(str(exc))
    if args.parent_pid is not None:
        if args.die_with_parent_thread:
            set_parent_death_signal()
        # The parent may have died before the death signal was set: it would never come.
        if _parent_gone(args.parent_pid):
            os._exit(0)
        watch_parent(args.parent_pid, args.lifeline_fd)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    serve(host, args.port, args.fd, keep_alive=not args.no_keep_alive)


if __name__ == "__main__":
    main()
