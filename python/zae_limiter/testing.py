"""Pytest fixtures for services that use zae-limiter (docs/testing.md).

pytest loads this module by itself wherever zae-limiter is installed (the package's `pytest11`
entry point, named `zae_limiter`): a test asks for a fixture by name, nothing goes in a
conftest.py. `-p no:zae_limiter` turns it off; a fixture of the same name in a conftest.py
replaces it (to configure the limiter differently, say).

- `memory_limiter`: a `RateLimiter` on a fresh `MemoryStorage` for each test (no network, no
  table; the same decisions as against DynamoDB). With pytest-asyncio installed it is an
  async fixture of pytest-asyncio's (`pytest_asyncio.fixture`: strict and auto mode alike), run
  in the test's event loop and closed there at teardown, so the detached writes of the test's
  last operations are awaited. Without pytest-asyncio (anyio's plugin, or `asyncio.run` inside a
  plain test) it is a plain fixture: the limiter opens itself on its first operation, in
  whatever loop runs it, and is closed at teardown in a loop of its own, which `MemoryStorage`
  allows (it has no connection to close).
- `local_dynamodb_endpoint`: the URL of an embedded DynamoDB (moto's server on 127.0.0.1,
  `zae_limiter.ops.local.LocalDynamoDB`), one per test session (per xdist worker), stopped when
  the session ends. Tables persist for the whole session: give each test its own limiter name.
  Needs the `local` extra (`pip install "zae-limiter[local]"`); without moto the fixture fails
  the test with one line that names it.

This module defines fixtures and nothing else (no hooks): it loads in every pytest run of an
environment with zae-limiter installed, so it must neither slow a run down nor change one. The
library itself is imported only when a fixture runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .limiter import RateLimiter

__all__ = ["LIMITER_NAME", "local_dynamodb_endpoint", "memory_limiter", "new_memory_limiter"]

LIMITER_NAME = "test"
"""The name of `memory_limiter`'s limiter (its table, in memory: `ZAEL-test`)."""

# Imported under another name: pytest reads a plugin's `pytest_*` names as hooks.
try:
    from pytest_asyncio import fixture as asyncio_fixture
except ImportError:  # no pytest-asyncio: the plain fixture below
    HAS_PYTEST_ASYNCIO = False
else:
    HAS_PYTEST_ASYNCIO = True


def new_memory_limiter() -> RateLimiter:
    """A limiter on a storage of its own (the fixture's; also for a test that needs two)."""
    from .limiter import RateLimiter
    from .storage.memory import MemoryStorage

    return RateLimiter(name=LIMITER_NAME, repository=MemoryStorage())


async def _memory_limiter_in_the_tests_loop() -> AsyncIterator[RateLimiter]:
    async with new_memory_limiter() as limiter:
        yield limiter


def _memory_limiter_without_a_loop() -> Iterator[RateLimiter]:
    limiter = new_memory_limiter()
    yield limiter
    # The test's loop may be closed by now, or not running: a loop of our own. Closing a
    # limiter on MemoryStorage does no I/O (no reservations, nothing to disconnect); the
    # test's loop ended any detached write still pending.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(limiter.close())
    finally:
        loop.close()


memory_limiter: Any
if HAS_PYTEST_ASYNCIO:
    memory_limiter = asyncio_fixture(_memory_limiter_in_the_tests_loop, name="memory_limiter")
else:
    memory_limiter = pytest.fixture(_memory_limiter_without_a_loop, name="memory_limiter")


@pytest.fixture(scope="session")
def local_dynamodb_endpoint() -> Iterator[str]:
    """The URL of an embedded DynamoDB for this test session (the `local` extra)."""
    from .exceptions import ZAELimiterError
    from .ops.local import LocalDynamoDB

    server = LocalDynamoDB()
    failure: str | None = None
    try:
        server.start()
    except ZAELimiterError as exc:
        failure = str(exc)
    if failure is not None:
        # One line, no traceback (and, out of the `except`, no chained exceptions): moto
        # missing (the message names the extra), or a start that failed (its reason).
        pytest.fail(f"local_dynamodb_endpoint: {failure}", pytrace=False)
    try:
        yield server.endpoint_url
    finally:
        server.stop()
