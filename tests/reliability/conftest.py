"""Reliability suite: sizes, the fault proxy, and the figures every run reports.

`pytest tests/reliability` runs the quick size (every scenario, fewer clients and rounds); CI
runs the `ci` size (`.ci/run` sets `ZAE_RELIABILITY_SIZE=ci`); `--reliability-size=large` (or
`ZAE_RELIABILITY_SIZE=large`) runs the large one. The figures (clients, operations,
faults injected per kind, over-admissions, lost updates, inputs tried) are printed at the end
of the run and written to `.reliability-figures.json` at the repository root.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_proxy import FaultProxy
from figures import SIZES, Figures, Size

from zae_limiter.ops.local import LocalDynamoDB

FIGURES_FILE = ".reliability-figures.json"


_FIGURES: Figures | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-size",
        choices=sorted(SIZES),
        default=None,
        help="reliability suite size (default: quick, or $ZAE_RELIABILITY_SIZE)",
    )


def _size_name(config: pytest.Config) -> str:
    name = config.getoption("--reliability-size", default=None) or os.environ.get(
        "ZAE_RELIABILITY_SIZE", "quick"
    )
    if name not in SIZES:
        raise pytest.UsageError(f"ZAE_RELIABILITY_SIZE must be one of {sorted(SIZES)}")
    return str(name)


@pytest.fixture(scope="session")
def size(pytestconfig: pytest.Config) -> Size:
    return SIZES[_size_name(pytestconfig)]


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config) -> Figures:
    global _FIGURES
    if _FIGURES is None:
        _FIGURES = Figures(_size_name(pytestconfig))
    return _FIGURES


@pytest.fixture(scope="session")
def proxy_server(moto_server: LocalDynamoDB) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.port) as proxy:
        yield proxy


@pytest.fixture
def proxy(
    proxy_server: FaultProxy, endpoint_url: str, figures: Figures
) -> Iterator[FaultProxy]:
    """The session's proxy with no fault armed, fresh counters and a fresh (empty) moto."""
    proxy_server.clear()
    proxy_server.reset_stats()
    yield proxy_server
    proxy_server.clear()
    figures.faults.update(proxy_server.stats.injected)
    figures.add(proxy_requests=len(proxy_server.stats.seen))


def pytest_sessionfinish(session: pytest.Session) -> None:
    # In a parallel run (pytest-xdist) each worker counts its own tests; the main process prints.
    output = getattr(session.config, "workeroutput", None)
    if output is not None and _FIGURES is not None:
        output["reliability_figures"] = json.dumps(_FIGURES.raw())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    global _FIGURES
    raw = getattr(node, "workeroutput", {}).get("reliability_figures")
    if raw is not None:
        data = json.loads(raw)
        if _FIGURES is None:
            _FIGURES = Figures(_size_name(node.config))
        _FIGURES.merge(data)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _FIGURES is None:
        return
    data = _FIGURES.as_dict()
    path = Path(str(config.rootpath)) / FIGURES_FILE
    path.write_text(json.dumps(data, indent=2) + "\n")
    # Two lines here (the verdicts and the volume); every counter is in the file.
    tr = terminalreporter
    tr.write_sep("=", f"reliability figures (size {data['size']})")
    tr.write_line(
        f"over-admissions {data['over_admissions']}, lost updates {data['lost_updates']}, "
        f"doubled updates {data['doubled_updates']}, ledger checks {data['ledger_checks']}; "
        f"{data['operations']} operations by {data['clients']} clients, "
        f"{data['faults_total']} faults injected"
    )
    tr.write_line(f"all figures: {path}")
