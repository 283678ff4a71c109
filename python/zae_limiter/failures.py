"""How storage failures become the library's public errors, in one place.

Data-plane calls (`acquire`) meet outages under the limiter's failure mode; management calls
and lease operations have none: an unreachable table is always an error. Both classify with
`public_error`; the others take it as the decorator `public_errors`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from .exceptions import ConfigurationError, RateLimiterUnavailable
from .storage.protocol import RepositoryUnavailable, StorageError

P = ParamSpec("P")
T = TypeVar("T")

# Every error the hot path can meet from storage is one of two kinds, decided here:
# - an outage: the store could not be reached, timed out, was throttled or kept failing past
#   the retries (`RepositoryUnavailable`); the failure mode applies (FAIL_OPEN admits);
# - a configuration error: the store answered and refused for a reason no retry can fix
#   (`StorageError`: access denied, unknown or expired credentials, no credentials or region,
#   a malformed request); raised as `ConfigurationError` in every failure mode.
# A missing table is `InfrastructureNotFoundError`, raised by the repository itself.
STORAGE_FAILURES: tuple[type[Exception], ...] = (RepositoryUnavailable, StorageError)


def unavailable(exc: BaseException) -> RateLimiterUnavailable:
    return RateLimiterUnavailable(f"rate limiter unavailable: {exc}", exc)


def misconfigured(exc: StorageError) -> ConfigurationError:
    return ConfigurationError(exc.code, exc.message or str(exc), exc)


def public_error(exc: Exception) -> RateLimiterUnavailable | ConfigurationError:
    """The public error a storage failure (one of `STORAGE_FAILURES`) is raised as: an outage
    is a `RateLimiterUnavailable` (the failure mode may still admit), a refusal a
    `ConfigurationError` (it never does)."""
    if isinstance(exc, StorageError):
        return misconfigured(exc)
    return unavailable(exc)


def public_errors(
    call: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorates an async function so that storage failures leave it as public errors
    (`public_error`), never as storage's own exception types."""

    @functools.wraps(call)
    async def translated(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await call(*args, **kwargs)
        except STORAGE_FAILURES as exc:
            raise public_error(exc) from exc

    return translated
