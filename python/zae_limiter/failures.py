"""How storage failures become the library's public errors, in one place.

Data-plane calls (`acquire`) meet outages under the limiter's failure mode; management calls
have none: an unreachable table is always an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .exceptions import ConfigurationError, RateLimiterUnavailable
from .storage.protocol import RepositoryUnavailable, StorageError

# Every error the hot path can meet from storage is one of two kinds, decided here:
# - an outage: the store could not be reached, timed out, was throttled or kept failing past
#   the retries (`RepositoryUnavailable`); the failure mode applies (FAIL_OPEN admits);
# - a configuration error: the store answered and refused for a reason no retry can fix
#   (`StorageError`: access denied, unknown or expired credentials, no credentials or region,
#   a malformed request); raised as `ConfigurationError` in every failure mode.
# A missing table is `InfrastructureNotFoundError`, raised by the repository itself.
OUTAGES: tuple[type[BaseException], ...] = (RepositoryUnavailable,)


def unavailable(exc: BaseException) -> RateLimiterUnavailable:
    return RateLimiterUnavailable(f"rate limiter unavailable: {exc}", exc)


def misconfigured(exc: StorageError) -> ConfigurationError:
    return ConfigurationError(exc.code, exc.message or str(exc), exc)


@contextmanager
def public_errors() -> Iterator[None]:
    """Outages surface as the public `RateLimiterUnavailable` and refusals as
    `ConfigurationError`, never as storage's own exception types: lease operations and
    management calls have no failure mode."""
    try:
        yield
    except OUTAGES as exc:
        raise unavailable(exc) from exc
    except StorageError as exc:
        raise misconfigured(exc) from exc
