"""This library against zae-limiter 0.17 on the unreserved request: client CPU per acquire and
acquires per second, as ratios measured in one run.

The workload: 2 per-minute limits far from exhausted, acquire rpm 1 + tpm 100 then adjust
tpm +20 inside the lease, 4 client processes (one entity each, so the figure is the cost of a
request and not of conflicts) against one embedded moto server (this repository's
`LocalDynamoDB`). Each client is benches/vs017_client.py; 0.17's runs under the interpreter of
its own venv (same package name), `ZAE_LIMITER_017_PYTHON` or `.venv-017/bin/python`, which
the bench creates from PyPI on first use (so the README's test command needs no extra step).
The two libraries take turns, a fresh table each, a few rounds; the ratios are medians over the
rounds.

- client CPU per acquire: `time.process_time` of each client over its timed loop, summed over
  the clients, divided by the acquires (the acquire and its adjust).
- throughput: all acquires over the longest client's wall time (the clients start together).

Timings depend on the machine and are never asserted; in CI's fast mode the test runs one short
round and asserts what does not: every client finished every acquire, and ours made at most 2
writes and no read per acquire in steady state (on a fresh machine, ours alone: the fast mode
does not build 0.17's venv). `pytest benches/bench_vs017.py -s` prints the
table; `--benchmark-enable` runs longer.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = Path(__file__).with_name("vs017_client.py")
CLIENTS = 4
VENV_017 = ROOT / ".venv-017"
CREATE_017 = (
    f"python3 -m venv {VENV_017} && {VENV_017}/bin/pip install zae-limiter==0.17.0"
)


def _create_venv_017() -> None:
    """Create `.venv-017` with 0.17.0 from PyPI; a failure is left to the probe to report."""
    made = subprocess.run([sys.executable, "-m", "venv", str(VENV_017)], check=False)
    if made.returncode == 0:
        subprocess.run(
            [str(VENV_017 / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", "zae-limiter==0.17.0"],
            check=False,
        )


def python_017() -> str:
    path = os.environ.get("ZAE_LIMITER_017_PYTHON") or str(VENV_017 / "bin" / "python")
    if "ZAE_LIMITER_017_PYTHON" not in os.environ and not Path(path).exists():
        _create_venv_017()
    probe = subprocess.run(
        [path, "-c", "import importlib.metadata as m; print(m.version('zae-limiter'))"],
        capture_output=True, text=True, check=False,
    ) if Path(path).exists() else None
    if probe is None or probe.returncode != 0 or probe.stdout.strip() != "0.17.0":
        pytest.fail(
            f"zae-limiter 0.17.0 is needed in its own venv at {path} (set ZAE_LIMITER_017_PYTHON "
            f"to use another interpreter); create it with: {CREATE_017}",
            pytrace=False,
        )
    return path


def server_cpu(server: Any) -> float:
    """CPU seconds the embedded server's process has used (Linux `/proc`; 0 elsewhere): the
    throughput of one server is its CPU per request, so the table shows it too."""
    process = getattr(server, "_process", None)
    try:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (AttributeError, OSError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_clients(python: str, lib: str, server: Any, table: str, acquires: int) -> dict[str, Any]:
    endpoint = server.endpoint_url
    # Start-up (imports, table and version reads, warm-up) takes a few seconds on a loaded
    # machine; every client waits for the same instant after it before its timed loop.
    start = time.time() + 6.0
    env = dict(os.environ)
    if lib == "0.17":  # its own venv's package, never one this run's PYTHONPATH points at
        env.pop("PYTHONPATH", None)
    procs = [
        subprocess.Popen(
            [python, str(CLIENT), lib, endpoint, table, f"e{i}", str(acquires), str(start)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(CLIENTS)
    ]
    # The server's CPU over the whole run (start-up and warm-up included, a few % of it).
    cpu0 = server_cpu(server)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{lib} client failed:\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    late = [r for r in results if r["wall"] <= 0]
    assert not late, results
    calls: dict[str, int] = {}
    for r in results:
        for name, n in r.get("calls", {}).items():
            calls[name] = calls.get(name, 0) + n
    total = sum(r["acquires"] for r in results)
    return {
        "acquires": total,
        "cpu_per_acquire": sum(r["cpu"] for r in results) / total,
        "per_second": total / max(r["wall"] for r in results),
        "server_cpu_per_acquire": (server_cpu(server) - cpu0) / total,
        "calls": calls,
    }


def test_vs_017(
    moto_server: Any, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    timed = bool(request.config.getoption("benchmark_enable", default=False))
    verbose = request.config.getoption("capture") == "no"
    rounds, acquires = (5, 400) if timed else (3, 150) if verbose else (1, 20)
    have_017 = "ZAE_LIMITER_017_PYTHON" in os.environ or (VENV_017 / "bin" / "python").exists()
    if not (timed or verbose or have_017):
        # CI's fast mode on a fresh machine: this library's side only (its call counts are what
        # is asserted); building 0.17's venv would cost a quarter of a minute of CI for figures
        # the fast mode never shows. `-s` or `--benchmark-enable` build it and compare.
        moto_server.reset()
        here = run_clients(sys.executable, "here", moto_server, "vs017-0", acquires)
        assert here["acquires"] == CLIENTS * acquires
        assert here["calls"].get("UpdateItem", 0) == 2 * here["acquires"], here["calls"]
        assert here["calls"].get("GetItem", 0) == 0, here["calls"]
        return
    python = python_017()
    rows = []
    for r in range(rounds):
        row = {}
        for lib, py in (("here", sys.executable), ("0.17", python)):
            moto_server.reset()
            row[lib] = run_clients(py, lib, moto_server, f"vs017-{r}", acquires)
        rows.append(row)

    cpu = statistics.median(r["here"]["cpu_per_acquire"] / r["0.17"]["cpu_per_acquire"]
                            for r in rows)
    tput = statistics.median(r["here"]["per_second"] / r["0.17"]["per_second"] for r in rows)
    with capsys.disabled():
        print(f"\nUnreserved acquire + adjust, {CLIENTS} clients, one embedded server, "
              f"{acquires} acquires per client, {rounds} rounds")
        print(f"{'round':>5} {'lib':>5} {'client CPU ms/acq':>17} {'server CPU ms/acq':>17} "
              f"{'acq/s':>7}  calls")
        for i, row in enumerate(rows):
            for lib in ("here", "0.17"):
                m = row[lib]
                print(f"{i:>5} {lib:>5} {m['cpu_per_acquire'] * 1e3:>17.2f} "
                      f"{m['server_cpu_per_acquire'] * 1e3:>17.2f} "
                      f"{m['per_second']:>7.0f}  {m['calls'] or '-'}")
        print(f"client CPU per acquire, here / 0.17: {cpu:.2f}x (median of rounds)")
        print(f"throughput, here / 0.17:            {tput:.2f}x (median of rounds)")

    for row in rows:
        here = row["here"]
        assert here["acquires"] == row["0.17"]["acquires"] == CLIENTS * acquires
        # One entity per client: nothing conflicts, so an acquire and its adjust are two writes
        # and the bucket is never read again after the warm-up.
        assert here["calls"].get("UpdateItem", 0) == 2 * here["acquires"], here["calls"]
        assert here["calls"].get("GetItem", 0) == 0, here["calls"]
