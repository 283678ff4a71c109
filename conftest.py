"""Shared fixtures: one moto DynamoDB server per test session, on loopback, reset between tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Clients under test must never reach for real AWS credentials or a real region.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)

from zae_limiter.ops.local import LocalDynamoDB


@pytest.fixture(scope="session")
def moto_server() -> Iterator[LocalDynamoDB]:
    with LocalDynamoDB() as server:
        yield server


@pytest.fixture
def endpoint_url(moto_server: LocalDynamoDB) -> Iterator[str]:
    """A fresh, empty moto: tables with streams slow moto down as they grow, so never share."""
    moto_server.reset()
    yield moto_server.endpoint_url


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    # The suite runs on every core (`-n auto`), but a timed benchmark run must have the machine
    # to itself, and `-s` asks to see what tests print (workers' output is not shown): both run
    # in one process.
    if config.getoption("benchmark_enable", default=False) or config.getoption("capture") == "no":
        config.option.numprocesses = 0
        config.option.dist = "no"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    # Tests wait on moto's server and on child processes part of the time: one and a half
    # workers per core keep the cores busy (measured on 2 cores: 2 workers 4:47, 3 workers 3:57,
    # 4 workers 3:45).
    return min(12, max(1, ((os.cpu_count() or 1) * 3 + 1) // 2))


# Files whose tests run for seconds each (processes, real-time windows, hypothesis): started
# first, so that a parallel run does not end waiting on one of them started last.
_LONG_FIRST = (
    "tests/reliability/",
    "tests/test_retry_after.py",
    "tests/test_docs_troubleshooting.py",
    "tests/test_core_equivalence.py",
    "tests/test_packaging.py",
    "benches/",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = str(config.rootpath)

    def long_first(item: pytest.Item) -> int:
        path = str(item.path)[len(root) + 1 :]
        return 0 if path.startswith(_LONG_FIRST) else 1

    items.sort(key=long_first)  # stable: the order within each group is the collection's
