"""The embedded DynamoDB dies with the process that started it, and listens on loopback only.

It used to outlive its parent: after SIGTERM to `zae-limiter local`, a SIGKILL or a crash of the
process that started `LocalDynamoDB`, the moto child kept running (PPID 1), serving
`/moto-api/reset` to anyone on the host.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from zae_limiter.exceptions import ZAELimiterError
from zae_limiter.ops.local import LocalDynamoDB

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the watchdog is portable"
)

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent / "python")
CLI = [sys.executable, "-c", "from zae_limiter.cli import main; main()"]

# A process that starts an embedded DynamoDB, reports it, then waits or crashes.
PARENT = textwrap.dedent(
    """
    import json, sys, time
    from zae_limiter.local import LocalDynamoDB

    db = LocalDynamoDB().start()  # no `with`, no stop(): nothing here cleans up
    print(json.dumps({"pid": db.pid, "port": db.port}), flush=True)
    if sys.argv[1] == "crash":
        sys.stdin.readline()
        raise RuntimeError("the parent crashes")
    time.sleep(60)
    """
)


def env() -> dict[str, str]:
    environ = dict(os.environ, PYTHONUNBUFFERED="1")
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_ROOT, environ.get("PYTHONPATH", "")) if p
    )
    return environ


def alive(pid: int) -> bool:
    """Running: a zombie (exited, not yet reaped by whoever adopted it) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_gone(pid: int, port: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while alive(pid) or answers(port):
        assert time.monotonic() < deadline, f"moto child {pid} (port {port}) outlived its parent"
        time.sleep(0.05)


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port` (/proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:  # IPv4, little-endian
                    found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                else:
                    found.add(address)
    return found


Parent = Callable[[str], "subprocess.Popen[str]"]


@pytest.fixture
def parent() -> Iterator[Parent]:
    processes: list[subprocess.Popen[str]] = []

    def start(mode: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", PARENT, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env(),
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def started(process: subprocess.Popen[str]) -> tuple[int, int]:
    assert process.stdout is not None
    info = json.loads(process.stdout.readline())
    pid, port = int(info["pid"]), int(info["port"])
    assert alive(pid) and answers(port)
    return pid, port


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_the_child_dies_with_a_killed_parent(parent: Parent, signum: int) -> None:
    process = parent("wait")
    pid, port = started(process)
    process.send_signal(signum)
    process.wait(timeout=5)
    assert_gone(pid, port)


def test_the_child_dies_with_a_crashed_parent(parent: Parent) -> None:
    process = parent("crash")
    pid, port = started(process)
    assert process.stdin is not None
    process.stdin.write("crash\n")
    process.stdin.flush()
    assert process.wait(timeout=5) == 1
    assert_gone(pid, port)


def cli_child(process: subprocess.Popen[str]) -> tuple[int, int]:
    """The moto child of a `zae-limiter local`, and its port (from the endpoint it prints)."""
    assert process.stdout is not None
    first = process.stdout.readline()
    assert "http://127.0.0.1:" in first, first
    port = int(first.rsplit(":", 1)[1].strip())
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0]), port


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_zae_limiter_local_takes_its_child_along(signum: int) -> None:
    process = subprocess.Popen(
        [*CLI, "local"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env()
    )
    try:
        pid, port = cli_child(process)
        process.send_signal(signum)
        code = process.wait(timeout=10)
        if signum != signal.SIGKILL:
            assert code == 0  # a clean stop, not a death by the signal
        assert_gone(pid, port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_server_started_from_a_worker_thread_outlives_the_thread() -> None:
    # PR_SET_PDEATHSIG fires when the starting *thread* ends: it must not kill this one.
    servers: list[LocalDynamoDB] = []
    worker = threading.Thread(target=lambda: servers.append(LocalDynamoDB().start()))
    worker.start()
    worker.join()
    with servers[0] as db:
        time.sleep(0.3)
        assert db.running and answers(db.port)


def test_the_server_listens_on_loopback_only(moto_server: LocalDynamoDB) -> None:
    assert listening_addresses(moto_server.port) == {"127.0.0.1"}
    # From any other address of this host, nothing answers.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing address
            outside = probe.getsockname()[0]
        except OSError:
            outside = "127.0.0.1"
    if not outside.startswith("127."):
        with socket.socket() as sock:
            sock.settimeout(1)
            assert sock.connect_ex((outside, moto_server.port)) != 0


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.2", "::", "example.com", ""])
def test_a_non_loopback_host_is_refused(host: str) -> None:
    with pytest.raises(ZAELimiterError, match="only listens on loopback"):
        LocalDynamoDB(host=host)
    result = subprocess.run(
        [sys.executable, "-m", "zae_limiter.local", "--host", host, "--port", "0"],
        capture_output=True, text=True, env=env(), timeout=20,
    )
    assert result.returncode == 2 and "only listens on loopback" in result.stderr


def test_localhost_means_127_0_0_1() -> None:
    assert LocalDynamoDB(host="localhost", port=1).endpoint_url == "http://127.0.0.1:1"
    assert LocalDynamoDB(host="127.0.0.2", port=1).host == "127.0.0.2"
